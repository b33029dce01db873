"""Families served by the generic causal-LM adapter (Qwen3, Phi-3, Gemma 2, Gemma 3 text, GPT-2, DeepSeek-V3) and the
vision-language families LLaVA-NeXT, Gemma 3, Gemma 4, PaliGemma, Qwen3-VL (dense and MoE decoders; M-RoPE,
DeepStack), InternVL and Mistral 3 (tests/tiny_vlms_more.py).

- every family x every policy: greedy output token-identical to ``target.generate`` in fp32, and after every
  step both KV caches equal a from-scratch recomputation (tests/test_engine_kv.py's check), correlated draft;
- the VLMs with draft-side visual pruning: same two checks (static and SAGE trees);
- ``get_adapter`` picks the family's adapter, else the generic one, and refuses with the reason what cannot
  work: recurrent / hybrid caches, cross-attention layers (Mllama), encoder-decoders, forwards without
  ``position_ids`` or 4-D masks, ALiBi, multimodal models of unknown families;
- past a sliding window, every tree is lossless and the caches match (the window mask, with a negative control), a
  batch's rows each get their own window, and a window the engine cannot give is refused at ``generate``.
(Qwen3-VL's pruned prefill against a masked full forward runs in tests/test_pruning.py, its video in
tests/test_video.py; tests/test_families.py's prefill and tree-forward checks cover tests/tiny_vlms.py's families.)
"""
from __future__ import annotations

import pytest
import torch
import transformers
from test_engine import POLICIES
from test_engine_kv import MAX_NEW, run_with_cache_checks
from tiny_models import correlated_draft, one_thread  # noqa: F401  (one_thread: autouse fixture)
from tiny_vlms_more import (
    ALL_VLM_BUILDERS,
    CAUSAL_LM_BUILDERS,
    MORE_ADAPTER_CLASSES,
    MORE_VLM_BUILDERS,
    tiny_gemma2,
    tiny_gemma3_text,
)

from sage_ext.engine import SpeculativeGenerator
from sage_ext.families import get_adapter

BUILDERS = {**CAUSAL_LM_BUILDERS, **MORE_VLM_BUILDERS}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    target, inputs = BUILDERS[request.param]()
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    return request.param, target, inputs, correlated_draft(target, noise=0.1), reference


def _greedy(target, inputs) -> torch.Tensor:
    with torch.no_grad():
        return target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("name", ["llava", *ALL_VLM_BUILDERS])
def test_every_tiny_vlm_reads_its_pixels(name):
    """The tiny vision-language models' greedy output changes with the image's pixels (and video's): otherwise a
    lossless test of the family passes whatever the engine does with its media. (With HF's 0.02 initialization a
    tiny decoder barely moves the residual stream and follows the last token alone: the builders of LLaVA, Qwen2-VL,
    Qwen2.5-VL, LLaVA-OneVision, Idefics3 and SmolVLM were built that way until ``tiny_vlms.strengthen``, and a
    wrong-position bug in Qwen2-VL passed their lossless tests.)"""
    from tiny_models import tiny_llava

    target, inputs = tiny_llava() if name == "llava" else ALL_VLM_BUILDERS[name]()
    generator = torch.Generator().manual_seed(99)
    other = {key: torch.randn(value.shape, generator=generator) * value.std() + value.mean()
             if key.startswith("pixel_values") and value.is_floating_point() else value for key, value in inputs.items()}
    assert any(key.startswith("pixel_values") for key in inputs)
    assert not torch.equal(_greedy(target, inputs), _greedy(target, other))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", *CAUSAL_LM_BUILDERS, "llava", *ALL_VLM_BUILDERS])
def test_every_tiny_model_reads_its_context(name):
    """Every tiny model's greedy output changes with the prompt's text before its last token: a model that follows
    the last token alone (a bigram table) passes a lossless test whatever the engine's tree mask, positions and
    caches give its attention. Ordinary text ids (2-89 in every builder) are swapped for others; specials and media
    placeholders stay."""
    from tiny_models import tiny_llama, tiny_llava, tiny_mistral, tiny_qwen2

    builders = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, **CAUSAL_LM_BUILDERS,
                "llava": tiny_llava, **ALL_VLM_BUILDERS}
    target, inputs = builders[name]()
    ids = inputs["input_ids"]
    ordinary = (ids > 1) & (ids < 90)
    ordinary[:, -1] = False
    assert int(ordinary.sum()) >= 4
    other = dict(inputs, input_ids=torch.where(ordinary, 2 + (ids - 2 + 37) % 88, ids))
    assert not torch.equal(_greedy(target, inputs), _greedy(target, other))


def test_registry_picks_the_adapter(family):
    name, target, *_ = family
    assert type(get_adapter(target)) is MORE_ADAPTER_CLASSES[name]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_equals_generate_and_caches_match_recomputation(family, policy):
    name, target, inputs, draft, reference = family
    out, taus = run_with_cache_checks(target, draft, inputs, POLICIES[policy]())
    assert torch.equal(out.sequences, reference), name
    if policy != "ar":
        assert max(taus) > 0, "the correlated draft should get tokens accepted"


@pytest.mark.parametrize("name", list(MORE_VLM_BUILDERS))
@pytest.mark.parametrize("policy", ["static", "sage"])
def test_pruned_draft_is_lossless_and_its_cache_matches_recomputation(name, policy):
    target, inputs = MORE_VLM_BUILDERS[name]()
    draft = correlated_draft(target, noise=0.1)
    assert get_adapter(target).visual_token_mask(inputs).sum() >= 16
    out, _ = run_with_cache_checks(target, draft, inputs, POLICIES[policy](), draft_prune_ratio=0.75)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


# ------------------------------------------------------------------------------------------------ refusals
def _on_meta(model_class, config):
    """A model instance without weights: refusals are decided from the config and class alone."""
    with torch.device("meta"):
        return model_class(config)


REFUSED = {
    "mamba (state-space)": (lambda: _on_meta(transformers.MambaForCausalLM, transformers.MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)), "recurrent"),
    "qwen3_next (linear attention)": (lambda: _on_meta(transformers.Qwen3NextForCausalLM, transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])),
        "'linear_attention'"),
    "jamba (hybrid)": (lambda: _on_meta(transformers.JambaForCausalLM, transformers.JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=4, mamba_expand=1, mamba_dt_rank=4)), "recurrent|linear-attention"),
    "mllama (cross-attention)": (lambda: _on_meta(transformers.MllamaForConditionalGeneration,
                                                  transformers.MllamaConfig()), "cross-attention layers"),
    "t5 (encoder-decoder)": (lambda: _on_meta(transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)), "encoder-decoder"),
    "bloom (no position_ids)": (lambda: _on_meta(transformers.BloomForCausalLM, transformers.BloomConfig(
        vocab_size=64, hidden_size=16, n_layer=1, n_head=2)), "takes no position_ids"),
    "falcon-rw (ALiBi)": (lambda: _on_meta(transformers.FalconForCausalLM, transformers.FalconConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, alibi=True)), "ALiBi"),
    "openai-gpt (no 4-D masks)": (lambda: _on_meta(transformers.OpenAIGPTLMHeadModel, transformers.OpenAIGPTConfig(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2)), "4-D attention mask"),
    "video_llava (unknown multimodal family)": (lambda: _on_meta(
        transformers.VideoLlavaForConditionalGeneration, transformers.VideoLlavaConfig()), "multimodal model"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_work_is_refused_with_the_reason(case):
    build, reason = REFUSED[case]
    model = build()
    with pytest.raises(ValueError, match=f"sage_ext does not support {type(model).__name__}") as error:
        SpeculativeGenerator(model, None, "ar")
    assert error.match(reason) and error.match("any decoder-only causal LM")


WINDOW_PAST = 24  # a sliding window the tests' prompt (12) + MAX_NEW (16) new tokens run past, longer than any tree


@pytest.mark.parametrize("builder", [tiny_gemma2, tiny_gemma3_text])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_past_the_sliding_window_every_tree_is_lossless_and_caches_match(builder, policy):
    """Past the sliding window, the tree forwards block for the sliding layers what lies outside the window
    (``FamilyAdapter.tree_attention_masks``: a dict of masks per layer type, as Gemma 2 / 3 take them): greedy
    output is ``generate``'s and both caches equal a recomputation (HF's own windowed attention) after every step."""
    target, inputs = builder(sliding_window=WINDOW_PAST)
    assert inputs["input_ids"].shape[1] + MAX_NEW - 1 > WINDOW_PAST
    draft = correlated_draft(target) if policy != "ar" else None
    out, _ = run_with_cache_checks(target, draft, inputs, POLICIES[policy]())
    with torch.no_grad():
        expected = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("name", ["gemma2", "mistral", "gemma3", "gemma4"])
def test_past_the_sliding_window_needs_the_window_mask(name, monkeypatch):
    """Every kind of windowed model the engine serves (mixed layers: Gemma 2; every layer sliding: Mistral; vision
    prompts: Gemma 3, Gemma 4), 60 new tokens past a 16-token window: lossless; and the negative control, the
    same generation with the window mask switched off (every earlier token seen), departs from ``generate``."""
    from tiny_gemma4 import tiny_gemma4
    from tiny_models import tiny_mistral
    from tiny_vlms_more import tiny_gemma3

    from sage_ext.families.base import FamilyAdapter

    target, inputs = {"gemma2": tiny_gemma2, "mistral": tiny_mistral, "gemma3": tiny_gemma3,
                      "gemma4": tiny_gemma4}[name]()
    target.config.get_text_config(decoder=True).sliding_window = 16
    draft = correlated_draft(target)
    with torch.no_grad():
        expected = target.generate(**inputs, do_sample=False, max_new_tokens=60, eos_token_id=None)

    def generate():
        return SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=60, eos_token_id=-1)

    assert torch.equal(generate().sequences, expected)
    monkeypatch.setattr(FamilyAdapter, "tree_attention_masks", lambda self, mask, positions: mask)
    assert not torch.equal(generate().sequences, expected)


def test_a_batch_past_the_sliding_window_decodes_each_row_as_alone():
    """Rows of different lengths sit at different sequence indices: each row's window is its own."""
    from test_batch_split import assemble

    target, first = tiny_gemma2(sliding_window=16, prompt_len=14)
    second = tiny_gemma2(seed=1, prompt_len=5)[1]
    pad = first["input_ids"].shape[1] - second["input_ids"].shape[1]
    batch = assemble([first, second])
    out = SpeculativeGenerator(target, correlated_draft(target), "sage_cost").generate(
        **batch, max_new_tokens=40, eos_token_id=-1)
    with torch.no_grad():
        for row, prompt, start in ((0, first, 0), (1, second, pad)):
            alone = target.generate(**prompt, do_sample=False, max_new_tokens=40, eos_token_id=None)
            assert torch.equal(out.sequences[row, start:], alone[0])


def test_a_window_the_engine_cannot_give_is_refused(monkeypatch):
    """Refused past the window, with the reason: a decoder of sliding and full layers whose forward takes no mask
    per layer type, and a window no longer than a tree; within the window both run."""
    import sage_ext.families.base as base

    target, inputs = tiny_gemma2(sliding_window=WINDOW_PAST)
    draft = correlated_draft(target)
    monkeypatch.setattr(base, "_takes_masks_per_layer_type", lambda module_class: False)
    with pytest.raises(ValueError, match="does not take a prepared mask per layer type"):
        SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=MAX_NEW)
    fits = WINDOW_PAST - inputs["input_ids"].shape[1] + 1
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=fits, eos_token_id=-1)
    with torch.no_grad():
        assert torch.equal(out.sequences, target.generate(**inputs, do_sample=False, max_new_tokens=fits,
                                                          eos_token_id=None))
    monkeypatch.undo()
    target.config.sliding_window = 12
    with pytest.raises(ValueError, match=r"sliding window \(12\) is not longer than a token tree \(12 deep\)"):
        SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("builder", [tiny_gemma2, tiny_gemma3_text])
@pytest.mark.parametrize("policy", ["chain", "dynamic", "sage", "sage_cost"])
def test_a_draft_window_shorter_than_the_prompt(builder, policy):
    """A draft's sliding window bounds nothing: its cache keeps every position, its tree forwards attend past the
    window (its proposals change, the output does not). A draft whose window is a fifth of the prompt is lossless
    and accepted."""
    target, inputs = builder(sliding_window=64, prompt_len=20)
    draft = correlated_draft(target)
    draft.config.sliding_window = 4
    assert get_adapter(draft).sliding_window() == 4
    out = SpeculativeGenerator(target, draft, POLICIES[policy]()).generate(**inputs, max_new_tokens=24, eos_token_id=-1)
    with torch.no_grad():
        expected = target.generate(**inputs, do_sample=False, max_new_tokens=24, eos_token_id=-1)
    assert torch.equal(out.sequences, expected)
    assert out.stats.mean_tau > 0


def test_learned_position_tables():
    """GPT-2's learned position table (``n_positions``) bounds what generate can feed: a target whose emitted tokens fit
    decodes as generate although deeper tree nodes reach past the table (capped at its last row: never emitted),
    one that does not fit is refused up front (generate fails at the table's end with an IndexError), and a draft
    with a short table drafts past it (its proposals change, the output does not). OPT's table (two rows more) is
    found as well; rotary models have none."""
    from transformers import OPTConfig, OPTForCausalLM
    from tiny_vlms_more import tiny_gpt2, tiny_qwen3

    target, inputs = tiny_gpt2(n_positions=32)  # a 12-token prompt: 21 new tokens fit, 22 do not
    assert get_adapter(target).position_limit == 32
    draft = correlated_draft(target)
    with torch.no_grad():
        expected = target.generate(**inputs, do_sample=False, max_new_tokens=21, eos_token_id=-1)
        with pytest.raises(IndexError):
            target.generate(**inputs, do_sample=False, max_new_tokens=22, eos_token_id=-1)
    for policy in ("chain", "dynamic", "sage", "sage_cost"):
        out = SpeculativeGenerator(target, draft, policy).generate(**inputs, max_new_tokens=21, eos_token_id=-1)
        assert torch.equal(out.sequences, expected), policy
        with pytest.raises(ValueError, match=r"learned table of 32 .*12 \+ 22 new tokens - 1 = 33 positions"):
            SpeculativeGenerator(target, draft, policy).generate(**inputs, max_new_tokens=22)
    wide, _ = tiny_gpt2()
    short_draft, _ = tiny_gpt2(seed=1, small=True, n_positions=16)
    out = SpeculativeGenerator(wide, short_draft, "sage").generate(**inputs, max_new_tokens=40, eos_token_id=-1)
    with torch.no_grad():
        assert torch.equal(out.sequences, wide.generate(**inputs, do_sample=False, max_new_tokens=40, eos_token_id=-1))
    opt = OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1,
                                   ffn_dim=64, num_attention_heads=2, max_position_embeddings=48))
    assert get_adapter(opt).position_limit == 48
    assert get_adapter(tiny_qwen3()[0]).position_limit is None


@pytest.mark.parametrize("policy", ["ar", "sage", "sage_cost"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl-video"])
def test_qwen_prompt_without_token_types_decodes_as_generate(name, policy):
    """A hand-built Qwen prompt without mm_token_type_ids: generate decodes it with 1-D positions, its output then
    differs from the one with the key (Qwen2-VL and Qwen2.5-VL too: the engine derived the token types for them
    and gave the keyed output, unseen while the tiny models were blind to positions); the engine gives generate's
    output, pruned draft too."""
    from tiny_vlms import tiny_qwen2_5_vl, tiny_qwen2_vl
    from tiny_vlms_more import tiny_qwen3_vl, tiny_qwen3_vl_video

    builder = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl,
               "qwen3_vl-video": tiny_qwen3_vl_video}[name]
    target, inputs = builder()
    bare = {key: value for key, value in inputs.items() if key != "mm_token_type_ids"}
    with torch.no_grad():
        expected = target.generate(**bare, max_new_tokens=MAX_NEW, do_sample=False)
        with_key = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert not torch.equal(expected, with_key)  # the case is what the docstring says
    draft = correlated_draft(target, noise=0.1) if policy != "ar" else None
    for prune in ([0.0, 0.5] if draft is not None else [0.0]):
        out = SpeculativeGenerator(target, draft, policy, draft_prune_ratio=prune).generate(
            **bare, max_new_tokens=MAX_NEW)
        assert torch.equal(out.sequences, expected), prune
