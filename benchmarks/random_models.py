"""The benchmarks' random-weight models: built from transformers configs (no downloads), fp32, eval, CPU-fast.

bench_engine.py and bench_identical_draft.py measure on these (and on ``correlated_draft`` / ``contrary_draft``
copies of them). Their configs, seeds and weight recipes are those
the test suite's tiny models had until 2026-12-06 (tests/tiny_models.py ``tiny_llama`` / ``text_prompt``,
tests/tiny_vlms.py ``tiny_qwen2_vl`` / ``correlated_draft``), kept so the committed results in results/ stay
comparable; the tests' decoders have since been re-drawn with a larger std so that their output reads the context
and the pixels (these models' decoders keep HF's 0.02: their greedy output follows the last token, which changes
what they accept, not what an engine step costs).

``large_logits``: the token embeddings and the lm_head are re-drawn with std ``LOGIT_STD`` (well separated
argmaxes); without it a random transformer keeps HF's init (std 0.02: nearly uniform logits, near-ties at most
tokens, the stress case for reduced precision).
"""
from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

LOGIT_STD = 0.5

# tiny Llama: 96-token vocabulary, EOS last; prompt text is drawn from [2, 90)
LLAMA_VOCAB, LLAMA_TEXT_VOCAB = 96, 90
# tiny Qwen2-VL: 256-token vocabulary, special ids at the top; prompt text is drawn from [1, 240)
QWEN_VOCAB, QWEN_TEXT_VOCAB = 256, 240
QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END, QWEN_EOS = 250, 251, 252, 253, 255


def sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw the token embeddings and the lm_head with std ``LOGIT_STD`` (seeded), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight.copy_(torch.randn(weight.shape, generator=generator) * LOGIT_STD)
    return model


def llama(seed: int = 0, large_logits: bool = True, **config) -> torch.nn.Module:
    """A random LlamaForCausalLM (sdpa, untied lm_head, BOS 1, no pad) of ``config``; weights from ``seed``,
    large-logit embeddings from ``10_000 + seed``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
                                         attn_implementation="sdpa", **config))
    if large_logits:
        sharpen(model, 10_000 + seed)
    return model.float().eval()


def tiny_llama(seed: int = 0, large_logits: bool = True) -> torch.nn.Module:
    """Llama hidden 64, 2 layers, 4 heads (2 KV heads), vocabulary 96, large-std lm_head (the tests' tiny_llama);
    ``large_logits=False``: HF's initialization (nearly flat next-token distributions)."""
    return llama(seed, large_logits, vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=LLAMA_VOCAB - 1)


def random_llama(hidden: int, layers: int, vocab: int, large_logits: bool = True, seed: int = 0) -> torch.nn.Module:
    """A random Llama with heads of 64 dims (as many KV heads), MLP 2.6875x, EOS the last token."""
    heads = max(hidden // 64, 1)
    return llama(seed, large_logits, vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                 max_position_embeddings=1024, eos_token_id=vocab - 1)


def text_prompt(length: int, seed: int = 0) -> dict:
    """``length`` random tokens of the tiny Llama's text range (and a matching attention mask)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, LLAMA_TEXT_VOCAB, (1, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def tiny_qwen2_vl(seed: int = 0) -> torch.nn.Module:
    """Qwen2-VL: text hidden 64 (head dim 16, M-RoPE sections 2/3/3), 2 layers; a 1-layer vision tower with 4 px
    patches and a 2x2 merge; large-std lm_head (the tests' tiny_qwen2_vl)."""
    text = dict(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=QWEN_EOS,
                bos_token_id=0, pad_token_id=None, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        text_config=text, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return sharpen(Qwen2VLForConditionalGeneration(config), 1234).float().eval()


def qwen2_vl_inputs(model, grid_thw: tuple[int, int, int], seed: int, question_len: int) -> dict:
    """A processor-like Qwen2-VL prompt: 4 text tokens, the image block (vision start, one placeholder per merged
    patch, vision end), ``question_len`` text tokens; random pixels of the ``grid_thw`` patch grid."""
    vision = model.config.vision_config
    t, h, w = grid_thw
    n_patches = t * h * w
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    image_block = [QWEN_VISION_START] + [QWEN_IMAGE] * (n_patches // vision.spatial_merge_size**2) + [QWEN_VISION_END]
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, QWEN_TEXT_VOCAB, (4,), generator=generator).tolist()
    question = torch.randint(1, QWEN_TEXT_VOCAB, (question_len,), generator=generator).tolist()
    input_ids = torch.tensor([prefix + image_block + question])
    generator = torch.Generator().manual_seed(seed + 1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(n_patches, patch_dim, generator=generator),
        "image_grid_thw": torch.tensor([list(grid_thw)]),
        "mm_token_type_ids": (input_ids == QWEN_IMAGE).long(),  # image placeholders are 1 (M-RoPE needs them)
    }


def correlated_draft(target: torch.nn.Module, noise: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """A draft with the target's config and weights ``w + noise * std(w) * N(0, 1)`` per tensor (agrees with the
    target at most tokens, not all)."""
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            scale = param.std() if param.numel() > 1 else param.abs()
            param.add_(torch.randn(param.shape, generator=generator) * noise * scale)
    return draft.eval()


def contrary_draft(target: torch.nn.Module) -> torch.nn.Module:
    """A copy of the target with its lm_head negated (a head of its own, untied): its most likely tokens are the
    target's least likely, so nothing it proposes is accepted."""
    draft = copy.deepcopy(target)
    with torch.no_grad():
        head = draft.get_output_embeddings()
        head.weight = torch.nn.Parameter(-head.weight.detach().clone())
    return draft.eval()
