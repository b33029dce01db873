"""Tiny random-weight builders for the families added with the generic causal-LM adapter: LLaVA-NeXT (and -Video), Gemma 3,
PaliGemma, Qwen3-VL (image, video; dense and MoE decoder), InternVL, Mistral 3, GLM-4V (tests/tiny_glm4v.py:
GLM-4.1V, GLM-4.5V, GLM-4.6V), LLaVA-OneVision-1.5 (tests/tiny_llava_onevision1_5.py), Gemma 4 (tests/tiny_gemma4.py) (vision-language) and Qwen3, Phi-3, Gemma 2, Gemma 3 text, GPT-2, DeepSeek-V3 (plain causal LMs).

Same conventions as tests/tiny_vlms.py (no downloads, fp32, eval, ``LOGIT_STD`` embeddings and lm_head,
``(model, inputs)`` with the processor's layout, special ids at the top of a 256-token vocabulary, image
placeholders ``IMAGE_TOKEN_ID``); decoder weights use ``initializer_range`` 0.12 so the layers matter.

Layouts: LLaVA-NeXT anyres (base crop + 2x2 grid, one newline embedding per feature row, ``image_sizes``);
Gemma 3 two images, each ``<start_of_image>`` + 16 placeholders + ``<end_of_image>``, ``token_type_ids`` 1 on
the placeholders (bidirectional attention inside each image); PaliGemma the image first, then the text prefix,
``token_type_ids`` all 0 (the whole prompt is a bidirectional prefix, positions start at 1); Qwen3-VL an image of a
non-square grid between ``<vision_start>``/``<vision_end>``, a video as Qwen3VLProcessor writes it: per temporal
patch, timestamp text then ``<vision_start>`` + the frame's placeholders + ``<vision_end>`` (one
``video_grid_thw`` row for the whole video), DeepStack features from both vision blocks; InternVL two images of
3 and 1 tiles (16 placeholders per tile); Mistral 3 two images of other sizes (Pixtral's rows of placeholders). The Gemma decoders
have sliding-window layers with a window longer than any test sequence.
"""
from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Phi3Config,
    Phi3ForCausalLM,
    PixtralVisionConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from tiny_vlms import (
    ADAPTER_CLASSES,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    LOGIT_STD,
    TEXT_VOCAB,
    TINY_VLM_BUILDERS,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    _prompt,
    finish,
    text_config_kwargs,
)
from tiny_glm4v import tiny_glm4v, tiny_glm4v_moe, tiny_glm46v
from tiny_llava_onevision1_5 import tiny_llava_onevision1_5

from sage_ext.families.causal_lm import CausalLMAdapter
from sage_ext.families.gemma3 import Gemma3Adapter
from sage_ext.families.gemma4 import Gemma4Adapter
from sage_ext.families.glm4v import Glm4vAdapter
from sage_ext.families.internvl import InternVLAdapter
from sage_ext.families.llava import Mistral3Adapter
from sage_ext.families.llava_next import LlavaNextAdapter, LlavaNextVideoAdapter
from sage_ext.families.llava_onevision1_5 import LlavaOnevision15Adapter
from sage_ext.families.paligemma import PaliGemmaAdapter
from sage_ext.families.qwen3_vl import Qwen3VLAdapter
from tiny_gemma4 import tiny_gemma4

BOI_TOKEN_ID = 252  # Gemma 3 <start_of_image>
EOI_TOKEN_ID = 253  # Gemma 3 <end_of_image>
INIT_RANGE = 0.12
WINDOW = 512  # sliding window of the Gemma decoders: longer than every test sequence


def _text(small: bool, **extra) -> dict:
    return text_config_kwargs(small, initializer_range=INIT_RANGE, **extra)


def _gemma_text(small: bool) -> dict:
    return dict(_text(small, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16), pad_token_id=0)


def _built(model_class, config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return finish(model_class._from_config(config, attn_implementation="sdpa"), seed=1234 + seed)


def _text_prompt(length: int, seed: int) -> dict:
    input_ids = torch.randint(1, TEXT_VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


# ------------------------------------------------------------------------------------------- vision-language
LLAVA_NEXT_CROP = 16


def _llava_next_config(small: bool) -> dict:
    """LLaVA-NeXT's (and -Video's) settings: CLIP crops of 16 px (4 px patches, CLS dropped), one 2x2 anyres grid."""
    crop = LLAVA_NEXT_CROP
    return dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=crop, patch_size=4, projection_dim=32),
        text_config=dict(model_type="llama", **_text(small)),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[2 * crop, 2 * crop]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _anyres_image(model, generator: torch.Generator) -> tuple[dict, int]:
    """One 32x32 anyres image (base crop + 2x2 grid) and its placeholder count, asked of the model (the processor
    computes it from the size)."""
    crop = LLAVA_NEXT_CROP
    image = {"pixel_values": torch.randn(1, 5, 3, crop, crop, generator=generator),
             "image_sizes": torch.tensor([[2 * crop, 2 * crop]])}
    with torch.no_grad():
        features = model.model.get_image_features(image["pixel_values"], image["image_sizes"]).pooler_output
    return image, sum(f.shape[0] for f in features)


def tiny_llava_next(seed: int = 0, small: bool = False, question_len: int = 12):
    """LLaVA-NeXT: an anyres 2x2 grid + base crop -> 88 tokens."""
    model = _built(LlavaNextForConditionalGeneration, LlavaNextConfig(**_llava_next_config(small)), seed)
    image, count = _anyres_image(model, torch.Generator().manual_seed(seed + 1))
    input_ids = _prompt(4, [IMAGE_TOKEN_ID] * count, question_len, seed)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **image}


def tiny_llava_next_video(seed: int = 0, small: bool = False, question_len: int = 12, image: bool = True,
                          frames: int = 3):
    """LLaVA-NeXT-Video: LLaVA-NeXT's anyres image (88 tokens; left out when ``image`` is False) and a video of
    ``frames`` 16-px frames, each pooled (stride 2) to 2x2 tokens."""
    config = LlavaNextVideoConfig(**_llava_next_config(small), video_token_index=VIDEO_TOKEN_ID, spatial_pool_stride=2)
    model = _built(LlavaNextVideoForConditionalGeneration, config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs, block = {}, []
    if image:
        inputs, count = _anyres_image(model, generator)
        block += [IMAGE_TOKEN_ID] * count + [7]
    crop = LLAVA_NEXT_CROP
    inputs["pixel_values_videos"] = torch.randn(1, frames, 3, crop, crop, generator=generator)
    block += [VIDEO_TOKEN_ID] * frames * (crop // 4 // 2) ** 2
    input_ids = _prompt(4, block, question_len, seed)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **inputs}


def tiny_gemma3(seed: int = 0, small: bool = False, question_len: int = 12):
    """Gemma 3: SigLIP 32 px images (4 px patches, 8x8 pooled 2x2 -> 16 tokens), two images in one prompt."""
    config = Gemma3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=4, vision_use_head=False),
        text_config=dict(_gemma_text(small), layer_types=["sliding_attention", "full_attention"][-(1 if small else 2):]),
        mm_tokens_per_image=16,
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=BOI_TOKEN_ID,
        eoi_token_index=EOI_TOKEN_ID,
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
    )
    config.eos_token_id = config.text_config.eos_token_id
    model = _built(Gemma3ForConditionalGeneration, config, seed)
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():  # zeros after init (no image at all); drawn about as large as the scaled text embeddings
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed)) * LOGIT_STD)
    one_image = [BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * 16 + [EOI_TOKEN_ID]
    input_ids = _prompt(4, one_image + [7, 9] + one_image, question_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
                   "token_type_ids": (input_ids == IMAGE_TOKEN_ID).long()}


def tiny_internvl(seed: int = 0, small: bool = False, question_len: int = 12, tiles: tuple[int, ...] = (3, 1)):
    """InternVL: 32 px tiles (4 px patches, 8x8 pixel-shuffled by 0.5 -> 16 tokens each; ``image_seq_length`` left at
    its default 256), a Qwen2 decoder; two images of ``tiles`` tiles each, each ``<img>`` + placeholders + ``</img>``
    (``BOI_TOKEN_ID`` / ``EOI_TOKEN_ID`` stand for them)."""
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1 if small else 2,
                                  num_attention_heads=2, image_size=32, patch_size=4)
    config = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text(small)),
                            image_token_id=IMAGE_TOKEN_ID, downsample_ratio=0.5, tie_word_embeddings=False)
    config.eos_token_id = EOS_TOKEN_ID
    model = _built(InternVLForConditionalGeneration, config, seed)
    images = [[BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * 16 * count + [EOI_TOKEN_ID] for count in tiles]
    input_ids = _prompt(4, [token for image in images for token in image + [7]], question_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(sum(tiles), 3, 32, 32, generator=generator)}


def pixtral_images(sizes, generator: torch.Generator, image_token: int = IMAGE_TOKEN_ID,
                   break_token: int = BOI_TOKEN_ID, end_token: int = EOI_TOKEN_ID) -> tuple[list[list[int]], torch.Tensor]:
    """Images of ``sizes`` (h, w) as Pixtral's processor lays them out, at 8 px per feature: per image a row of
    placeholders per feature row, each closed by a break token, the last by the end token; and ``pixel_values``
    padded to the largest image (random pixels from ``generator``). Returns (placeholder blocks, pixel_values)."""
    blocks = []
    for height, width in sizes:
        rows = height // 8
        blocks.append([token for row in range(rows)
                       for token in [image_token] * (width // 8) + [break_token if row < rows - 1 else end_token]])
    pixel_values = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for index, (height, width) in enumerate(sizes):
        pixel_values[index, :, :height, :width] = torch.randn(3, height, width, generator=generator)
    return blocks, pixel_values


def tiny_mistral3(seed: int = 0, small: bool = False, question_len: int = 12,
                  sizes: tuple[tuple[int, int], ...] = ((32, 24), (16, 16))):
    """Mistral 3: a Pixtral tower (4 px patches, any image size, ``image_sizes``) merged 2x2 (8 px per feature), a
    Mistral decoder; two images of ``sizes`` (``BOI_TOKEN_ID`` / ``EOI_TOKEN_ID`` stand for the break / end tokens),
    pixel_values padded to the largest as the processor pads them."""
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1 if small else 2,
                                 num_attention_heads=2, image_size=64, patch_size=4, head_dim=16)
    config = Mistral3Config(vision_config=vision, text_config=MistralConfig(**_text(small)),
                            image_token_index=IMAGE_TOKEN_ID, spatial_merge_size=2, tie_word_embeddings=False)
    config.eos_token_id = EOS_TOKEN_ID
    model = _built(Mistral3ForConditionalGeneration, config, seed)
    blocks, pixel_values = pixtral_images(sizes, torch.Generator().manual_seed(seed + 1))
    input_ids = _prompt(4, [token for block in blocks for token in block + [7]], question_len, seed)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
                   "image_sizes": torch.tensor(sizes)}


def tiny_paligemma(seed: int = 0, small: bool = False, question_len: int = 12, vocab_size: int = VOCAB_SIZE):
    """PaliGemma: SigLIP 16 px image (4 px patches -> 16 tokens) first, then the text prefix. A ``vocab_size``
    below the image token id works too (the model maps out-of-vocabulary placeholders to the pad embedding)."""
    text = dict(_gemma_text(small), vocab_size=vocab_size, eos_token_id=min(EOS_TOKEN_ID, vocab_size - 1))
    text.pop("sliding_window"), text.pop("query_pre_attn_scalar")
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                           vision_use_head=False),
        text_config=dict(model_type="gemma", **text),
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=vocab_size,
        tie_word_embeddings=False,
    )
    config.eos_token_id = text["eos_token_id"]
    model = _built(PaliGemmaForConditionalGeneration, config, seed)
    prompt = torch.randint(1, min(TEXT_VOCAB, vocab_size), (question_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    input_ids = torch.tensor([[IMAGE_TOKEN_ID] * 16 + prompt])
    generator = torch.Generator().manual_seed(seed + 1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(1, 3, 16, 16, generator=generator),
                   "token_type_ids": torch.zeros_like(input_ids)}


def _qwen3_ids(vocab_size: int) -> dict:
    """Special ids at the top of a ``vocab_size`` vocabulary, as tests/tiny_vlms.py places them in 256; ordinary
    text below ``text_vocab``."""
    shift = VOCAB_SIZE - vocab_size
    return dict(image=IMAGE_TOKEN_ID - shift, video=VIDEO_TOKEN_ID - shift, start=VISION_START_ID - shift,
                end=VISION_END_ID - shift, eos=EOS_TOKEN_ID - shift, text_vocab=TEXT_VOCAB - shift)


def _qwen3_vl_model(seed: int, small: bool, moe: bool, vocab_size: int = VOCAB_SIZE):
    """Qwen3-VL (``moe``: Qwen3-VL-MoE): vision tower of 2 blocks (4 px patches, 2 frames per temporal patch, 2x2
    merge), both blocks feeding DeepStack features into the decoder; interleaved M-RoPE over head_dim 16."""
    ids = _qwen3_ids(vocab_size)
    text = _text(small, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]},
                 vocab_size=vocab_size, eos_token_id=ids["eos"])
    if moe:  # every layer sparse: 4 experts, 2 per token
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text["hidden_size"])
    config_class, model_class = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                                 else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_class(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                           out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        text_config=text,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        tie_word_embeddings=False,
    )
    return _built(model_class, config, seed)


def _qwen3_patches(model, grid_thw, generator) -> torch.Tensor:
    vision = model.config.vision_config
    t, h, w = grid_thw
    return torch.randn(t * h * w, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,
                       generator=generator)


def _qwen3_tokens(model, grid_thw) -> int:
    """Placeholders per image, or per video frame (temporal patch) when ``grid_thw``'s t is 1."""
    t, h, w = grid_thw
    return t * h * w // model.config.vision_config.spatial_merge_size**2


def tiny_qwen3_vl(seed: int = 0, small: bool = False, grid_thw=(1, 12, 16), question_len: int = 12,
                  moe: bool = False, vocab_size: int = VOCAB_SIZE):
    """Qwen3-VL: an image of 12x16 patches (6x8 merged: 48 tokens), ~66-token prompt. A smaller ``vocab_size``
    moves the special ids to its top and draws the text below them."""
    model = _qwen3_vl_model(seed, small, moe, vocab_size)
    ids = _qwen3_ids(vocab_size)
    image_block = [ids["start"]] + [ids["image"]] * _qwen3_tokens(model, grid_thw) + [ids["end"]]
    generator = torch.Generator().manual_seed(seed)
    prefix, question = (torch.randint(1, ids["text_vocab"], (n,), generator=generator).tolist()
                        for n in (4, question_len))
    input_ids = torch.tensor([prefix + image_block + question])
    return model, {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": _qwen3_patches(model, grid_thw, torch.Generator().manual_seed(seed + 1)),
        "image_grid_thw": torch.tensor([list(grid_thw)]),
        "mm_token_type_ids": (input_ids == ids["image"]).long(),
    }


def tiny_qwen3_vl_moe(seed: int = 0, small: bool = False, **kwargs):
    """Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): the Qwen3-VL image prompt, sparse decoder."""
    return tiny_qwen3_vl(seed, small, moe=True, **kwargs)


def tiny_qwen3_vl_video(seed: int = 0, small: bool = False, video_grid=(4, 4, 6), image_grid=None,
                        question_len: int = 6, timestamp_len: int = 3):
    """Qwen3-VL with a video of ``video_grid`` (t, h, w) patches (default: 4 frames of 2x3 merged tokens), after an
    image of ``image_grid`` when given. Qwen3VLProcessor's layout: every frame is ``<t seconds>`` (here
    ``timestamp_len`` text tokens) + ``<vision_start>`` + its placeholders + ``<vision_end>``; ``video_grid_thw``
    keeps one row for the whole video (the model splits it per frame)."""
    model = _qwen3_vl_model(seed, small, moe=False)
    generator = torch.Generator().manual_seed(seed + 1)
    frames, h, w = video_grid
    per_frame = [VISION_START_ID] + [VIDEO_TOKEN_ID] * _qwen3_tokens(model, (1, h, w)) + [VISION_END_ID]
    media = []
    for _ in range(frames):
        media += torch.randint(1, TEXT_VOCAB, (timestamp_len,), generator=generator).tolist() + per_frame
    inputs = {}
    if image_grid is not None:
        image_block = [VISION_START_ID] + [IMAGE_TOKEN_ID] * _qwen3_tokens(model, image_grid) + [VISION_END_ID]
        media = image_block + [7, 8, 9] + media
        inputs.update(pixel_values=_qwen3_patches(model, image_grid, generator),
                      image_grid_thw=torch.tensor([list(image_grid)]))
    input_ids = _prompt(4, media, question_len, seed)
    inputs.update(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values_videos=_qwen3_patches(model, video_grid, generator),
        video_grid_thw=torch.tensor([list(video_grid)]),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).long() + 2 * (input_ids == VIDEO_TOKEN_ID).long(),
    )
    return model, inputs


# ------------------------------------------------------------------------------------------- causal LMs
def tiny_qwen3(seed: int = 0, small: bool = False, prompt_len: int = 12):
    """Qwen3: q/k RMS norms, head_dim 24 (not hidden / heads)."""
    config = Qwen3Config(**_text(small, head_dim=24))
    return _built(Qwen3ForCausalLM, config, seed), _text_prompt(prompt_len, seed)


def tiny_phi3(seed: int = 0, small: bool = False, prompt_len: int = 12):
    """Phi-3: fused qkv / gate_up projections, partial rotary."""
    config = Phi3Config(**_text(small, partial_rotary_factor=0.5))
    config.pad_token_id = None
    return _built(Phi3ForCausalLM, config, seed), _text_prompt(prompt_len, seed)


def tiny_gemma2(seed: int = 0, small: bool = False, prompt_len: int = 12, sliding_window: int = WINDOW):
    """Gemma 2: alternating sliding / full layers, logit soft-capping (eager attention: no sdpa in transformers)."""
    config = Gemma2Config(**dict(_gemma_text(small), sliding_window=sliding_window))
    torch.manual_seed(seed)
    model = finish(Gemma2ForCausalLM._from_config(config, attn_implementation="eager"), seed=1234 + seed)
    return model, _text_prompt(prompt_len, seed)


def tiny_gemma3_text(seed: int = 0, small: bool = False, prompt_len: int = 12, sliding_window: int = WINDOW):
    """Gemma 3 text (``Gemma3ForCausalLM``): local (sliding) and global layers with their own rope bases."""
    config = Gemma3TextConfig(**dict(_gemma_text(small), sliding_window=sliding_window),
                              layer_types=["sliding_attention", "full_attention"][-(1 if small else 2):])
    return _built(Gemma3ForCausalLM, config, seed), _text_prompt(prompt_len, seed)


def tiny_gpt2(seed: int = 0, small: bool = False, prompt_len: int = 12, n_positions: int = 1024):
    """GPT-2 (``GPT2LMHeadModel``): learned absolute position embeddings (``n_positions`` of them), no RoPE."""
    hidden, layers = (32, 1) if small else (64, 2)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=hidden, n_layer=layers, n_head=2, n_positions=n_positions,
                        bos_token_id=0, eos_token_id=255, initializer_range=INIT_RANGE, tie_word_embeddings=False)
    return _built(GPT2LMHeadModel, config, seed), _text_prompt(prompt_len, seed)


def tiny_deepseek_v3(seed: int = 0, small: bool = False, prompt_len: int = 12):
    """DeepSeek-V3: multi-head latent attention, whose cached keys (``qk_nope_head_dim + qk_rope_head_dim`` = 24) are
    wider than its values (``v_head_dim`` = 8); a dense first layer, then routed + shared experts."""
    text = _text(small)
    config = DeepseekV3Config(**dict(
        text, num_key_value_heads=text["num_attention_heads"], kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1))
    return _built(DeepseekV3ForCausalLM, config, seed), _text_prompt(prompt_len, seed)


MORE_VLM_BUILDERS = {
    "gemma4": tiny_gemma4,
    "glm4v": tiny_glm4v,
    "glm4v_moe": tiny_glm4v_moe,
    "glm46v": tiny_glm46v,
    "llava_next": tiny_llava_next,
    "llava_next_video": tiny_llava_next_video,
    "llava_onevision1_5": tiny_llava_onevision1_5,
    "gemma3": tiny_gemma3,
    "paligemma": tiny_paligemma,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
    "internvl": tiny_internvl,
    "mistral3": tiny_mistral3,
}

CAUSAL_LM_BUILDERS = {
    "qwen3": tiny_qwen3,
    "phi3": tiny_phi3,
    "gemma2": tiny_gemma2,
    "gemma3_text": tiny_gemma3_text,
    "gpt2": tiny_gpt2,
    "deepseek_v3": tiny_deepseek_v3,
}

#: Every vision-language builder: tests/tiny_vlms.py's and these.
ALL_VLM_BUILDERS = {**TINY_VLM_BUILDERS, **MORE_VLM_BUILDERS}

#: The adapter each family must get.
MORE_ADAPTER_CLASSES = {
    "gemma4": Gemma4Adapter,
    "glm4v": Glm4vAdapter,
    "glm4v_moe": Glm4vAdapter,
    "glm46v": Glm4vAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_next_video": LlavaNextVideoAdapter,
    "llava_onevision1_5": LlavaOnevision15Adapter,
    "gemma3": Gemma3Adapter,
    "paligemma": PaliGemmaAdapter,
    "qwen3_vl": Qwen3VLAdapter,
    "qwen3_vl_moe": Qwen3VLAdapter,
    "internvl": InternVLAdapter,
    "mistral3": Mistral3Adapter,
    **{name: CausalLMAdapter for name in CAUSAL_LM_BUILDERS},
}
ALL_VLM_ADAPTER_CLASSES = {**ADAPTER_CLASSES, **MORE_ADAPTER_CLASSES}
