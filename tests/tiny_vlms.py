"""Tiny random-weight vision-language models for tests (no downloads, fp32, CPU-fast).

Each builder returns ``(model, inputs)``: a HuggingFace ``*ForConditionalGeneration`` in eval mode
and a dict shaped like the family's processor output (``input_ids`` with the image placeholder
tokens expanded, ``attention_mask``, ``pixel_values`` and the family's extras). Prompts are
``text prefix, image, text question``, a few dozen to ~100 tokens long.

The text embeddings and lm_head are re-initialized with a large std (``LOGIT_STD``) so greedy
argmaxes are well separated and exact-match checks are not decided by rounding noise, and the decoder and
vision projection with a large one (``strengthen``) so the output depends on the pixels, positions and context.

Drafts: ``correlated_draft(target)`` copies the target and perturbs every weight (same config,
tokens agree often but not always); every builder also takes ``small=True`` for a smaller config
with the same vocabulary and special tokens.

Families: Qwen2-VL, Qwen2.5-VL (M-RoPE, ``mm_token_type_ids``), LLaVA-OneVision (anyres image
packing with newline tokens), Idefics3 / SmolVLM (pixel_values ``[B, n_img, 3, H, W]``).
"""
from __future__ import annotations

import copy

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from sage_ext.families.idefics3 import Idefics3Adapter
from sage_ext.families.llava_onevision import LlavaOnevisionAdapter
from sage_ext.families.model_access import text_decoder
from sage_ext.families.qwen2_vl import Qwen2VLAdapter

VOCAB_SIZE = 256
# special ids live at the top of the vocabulary; ordinary prompt text is drawn below TEXT_VOCAB
TEXT_VOCAB = 240
IMAGE_TOKEN_ID = 250
VIDEO_TOKEN_ID = 251
VISION_START_ID = 252
VISION_END_ID = 253
FAKE_AROUND_IMAGE_ID = 252  # Idefics3 `<fake_token_around_image>`
EOS_TOKEN_ID = 255
LOGIT_STD = 0.5


def text_config_kwargs(small: bool, vocab_size: int = VOCAB_SIZE, eos_token_id: int = EOS_TOKEN_ID,
                       bos_token_id: int = 0, max_position_embeddings: int = 1024, **extra) -> dict:
    """Decoder config of every tiny test model (also the text-only ones of tiny_models)."""
    hidden, layers, heads, kv_heads = (32, 1, 2, 1) if small else (64, 2, 4, 2)
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def finish(model: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    """Large-std text embeddings and lm_head (well separated argmaxes), fp32, eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight.copy_(torch.randn(weight.shape, generator=generator) * LOGIT_STD)
    return model.float().eval()


#: The last linear layer from the vision tower into the decoder, per family (``strengthen``).
VISUAL_PROJECTIONS = ("multi_modal_projector.linear_2", "visual.merger.mlp.2", "connector.modality_projection.proj",
                      "embed_vision.embedding_projection")


def strengthen(model: torch.nn.Module, seed: int = 4321, decoder_std: float = 0.12,
               visual_gain: float = 30.0) -> torch.nn.Module:
    """``model`` (a vision-language builder's) with its decoder's linear layers drawn with std ``decoder_std`` and its
    vision-to-text projection scaled by ``visual_gain``. With HF's 0.02 a tiny decoder barely moves the residual
    stream and its greedy output follows the last token alone, blind to pixels, positions and context; the builders
    of this module and LLaVA's call this (tests/test_families_more.py: test_every_tiny_vlm_reads_its_pixels,
    test_every_tiny_model_reads_its_context)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in text_decoder(model).layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * decoder_std)
        for name, module in model.named_modules():
            if name.endswith(VISUAL_PROJECTIONS) and isinstance(module, torch.nn.Linear):
                module.weight.mul_(visual_gain)
                if module.bias is not None:
                    module.bias.mul_(visual_gain)
    return model


def _prompt(prefix_len: int, image_block: list[int], question_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, TEXT_VOCAB, (prefix_len,), generator=generator).tolist()
    question = torch.randint(1, TEXT_VOCAB, (question_len,), generator=generator).tolist()
    return torch.tensor([prefix + image_block + question])


def _qwen_inputs(model, grid_thw: tuple[int, int, int], seed: int, question_len: int) -> dict:
    vision = model.config.vision_config
    t, h, w = grid_thw
    n_patches = t * h * w
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    n_image_tokens = n_patches // vision.spatial_merge_size**2
    image_block = [VISION_START_ID] + [IMAGE_TOKEN_ID] * n_image_tokens + [VISION_END_ID]
    input_ids = _prompt(4, image_block, question_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(n_patches, patch_dim, generator=generator),
        "image_grid_thw": torch.tensor([list(grid_thw)]),
        # the processor marks image placeholders with 1 (video would be 2); M-RoPE needs it
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).long(),
    }


def _qwen_common(small: bool) -> dict:
    head_dim = 16  # mrope_section must sum to head_dim / 2
    text = text_config_kwargs(small, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 3]})
    text["hidden_size"] = head_dim * text["num_attention_heads"]
    text["intermediate_size"] = 2 * text["hidden_size"]
    return dict(text_config=text, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
                tie_word_embeddings=False)


def tiny_qwen2_vl(seed: int = 0, small: bool = False, grid_thw=(1, 12, 16), question_len: int = 12):
    """Qwen2-VL: 48 image tokens (grid 12x16 patches, 2x2 merge), ~66-token prompt."""
    common = _qwen_common(small)
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=common["text_config"]["hidden_size"],
                           num_heads=2, mlp_ratio=2, patch_size=4, temporal_patch_size=2,
                           spatial_merge_size=2, in_channels=3),
        **common,
    )
    torch.manual_seed(seed)
    model = strengthen(finish(Qwen2VLForConditionalGeneration(config)), seed=4321 + seed)
    return model, _qwen_inputs(model, grid_thw, seed, question_len)


def tiny_qwen2_5_vl(seed: int = 0, small: bool = False, grid_thw=(1, 12, 16), question_len: int = 12):
    """Qwen2.5-VL: same prompt layout as Qwen2-VL; window attention in the vision tower."""
    common = _qwen_common(small)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=16,
                           out_hidden_size=common["text_config"]["hidden_size"],
                           fullatt_block_indexes=[1]),
        **common,
    )
    torch.manual_seed(seed)
    model = strengthen(finish(Qwen2_5_VLForConditionalGeneration(config)), seed=4321 + seed)
    return model, _qwen_inputs(model, grid_thw, seed, question_len)


def tiny_llava_onevision(seed: int = 0, small: bool = False, question_len: int = 12):
    """LLaVA-OneVision: 16x16 crops, anyres grid 2x2 + base crop -> 16 + 8*(8+1) = 88 image tokens."""
    crop = 16
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=crop, patch_size=4,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", **text_config_kwargs(small)),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[2 * crop, 2 * crop]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = strengthen(finish(LlavaOnevisionForConditionalGeneration(config)), seed=4321 + seed)
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(1, 5, 3, crop, crop, generator=generator)  # base crop + 2x2 grid
    image_sizes = torch.tensor([[2 * crop, 2 * crop]])
    with torch.no_grad():  # the processor computes this count from the sizes; asking the model is exact
        features = model.model.get_image_features(pixel_values, image_sizes).pooler_output
    n_image_tokens = sum(f.shape[0] for f in features)
    input_ids = _prompt(4, [IMAGE_TOKEN_ID] * n_image_tokens, question_len, seed)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
    return model, inputs


def _idefics3_like(config_class, model_class, seed: int, small: bool, question_len: int):
    config = config_class(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=4),
        text_config=dict(model_type="llama", **text_config_kwargs(small)),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = strengthen(finish(model_class(config)), seed=4321 + seed)
    tokens_per_image = model.model.image_seq_len
    one_image = [FAKE_AROUND_IMAGE_ID] + [IMAGE_TOKEN_ID] * tokens_per_image
    input_ids = _prompt(4, one_image * 2 + [FAKE_AROUND_IMAGE_ID], question_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 2, 3, 32, 32, generator=generator),
        "pixel_attention_mask": torch.ones(1, 2, 32, 32, dtype=torch.bool),
    }
    return model, inputs


def tiny_idefics3(seed: int = 0, small: bool = False, question_len: int = 12):
    """Idefics3 / SmolVLM v1: 2 images (a tile and the global view) of 16 tokens each (32x32 px,
    4 px patches, pixel-shuffle 2), each after a `<fake_token_around_image>`."""
    return _idefics3_like(Idefics3Config, Idefics3ForConditionalGeneration, seed, small, question_len)


def tiny_smolvlm(seed: int = 0, small: bool = False, question_len: int = 12):
    """SmolVLM2 (model_type "smolvlm", Idefics3 architecture): same layout as `tiny_idefics3`."""
    return _idefics3_like(SmolVLMConfig, SmolVLMForConditionalGeneration, seed, small, question_len)


TINY_VLM_BUILDERS = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "llava_onevision": tiny_llava_onevision,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
}

#: The sage_ext adapter each family must get (``get_adapter`` finds it from ``config.model_type``).
ADAPTER_CLASSES = {
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": Idefics3Adapter,
}

#: A hand-made 6-node tree for tree-forward checks: root (node 0), branch A: 1 -> 2 -> 3, branch B: 4 -> 5.
BRANCHING_TREE_PARENTS = torch.tensor([[-1, 0, 1, 2, 0, 4]])


def correlated_draft(target: torch.nn.Module, noise: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """A draft with the target's config and weights ``w + noise * std(w) * N(0, 1)`` per tensor.

    Small ``noise`` keeps most greedy tokens equal to the target's (high acceptance) while still
    disagreeing sometimes, so both accept and reject paths of an engine get exercised.
    """
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            scale = param.std() if param.numel() > 1 else param.abs()
            param.add_(torch.randn(param.shape, generator=generator) * noise * scale)
    return draft.eval()
