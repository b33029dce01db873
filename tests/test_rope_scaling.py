"""Rope scaling: every rope type transformers ships (``ROPE_INIT_FUNCTIONS`` and "default") is either lossless under
tree decoding past ``max_position_embeddings`` or refused up front with the type named.

Types whose frequencies depend on the largest position in a forward ("dynamic" NTK, "longrope": the engine's
``support.position_dependent_ropes``) run exactly within their threshold and are refused when a generation would
reach past it (for "longrope": cross it after the prompt). The guard is shown to be needed: with it switched off,
the same crossing generation departs from ``target.generate`` (the negative control).
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_engine import POLICIES
from tiny_models import correlated_draft, one_thread, text_prompt  # noqa: F401  (one_thread: autouse fixture)
from tiny_vlms import finish, text_config_kwargs
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sage_ext.engine import SpeculativeGenerator
from sage_ext.families import FamilyAdapter, get_adapter
from sage_ext.families.support import position_dependent_ropes

MAX_POSITIONS = 24  # the threshold of every scaled type below
PROMPT_LEN = 10
HEAD_DIM = 16
TREE_POLICIES = ["chain", "static", "sage"]


def rope_parameters(rope_type: str) -> dict:
    """Parameters of each rope type for a model trained on ``MAX_POSITIONS`` positions, extended 2x."""
    params = {"rope_type": rope_type, "rope_theta": 10000.0}
    half = HEAD_DIM // 2
    extra = {
        "default": {},
        "linear": {"factor": 2.0},
        "dynamic": {"factor": 2.0},
        "yarn": {"factor": 2.0, "original_max_position_embeddings": MAX_POSITIONS},
        "longrope": {"short_factor": [1.0 + 0.1 * i for i in range(half)],
                     "long_factor": [1.0 + 0.5 * i for i in range(half)],
                     "original_max_position_embeddings": MAX_POSITIONS},
        "llama3": {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": MAX_POSITIONS},
        "proportional": {"partial_rotary_factor": 0.5},
    }
    if rope_type not in extra:
        pytest.fail(f"transformers ships rope type {rope_type!r}, unknown to this test: classify it here")
    return {**params, **extra[rope_type]}


def tiny_scaled_llama(rope_type: str, prompt_len: int = PROMPT_LEN):
    """A Llama whose decoder weights are large enough that positions matter (initializer_range 0.12), no EOS (every
    generation runs its full length); longrope's
    ``max_position_embeddings`` is its extended length (2x), the others' the trained one."""
    max_positions = 2 * MAX_POSITIONS if rope_type == "longrope" else MAX_POSITIONS
    config = LlamaConfig(**text_config_kwargs(
        False, vocab_size=128, eos_token_id=None, bos_token_id=1, max_position_embeddings=max_positions,
        initializer_range=0.12, rope_parameters=rope_parameters(rope_type), head_dim=HEAD_DIM))
    torch.manual_seed(3)
    model = finish(LlamaForCausalLM._from_config(config, attn_implementation="sdpa"), seed=7)
    return model, text_prompt(prompt_len, seed=5)


def generate_reference(model, inputs, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)


ALL_TYPES = ["default", *ROPE_INIT_FUNCTIONS]
POSITION_DEPENDENT = [t for t in ALL_TYPES if position_dependent_ropes(tiny_scaled_llama(t)[0].config)]
FIXED = [t for t in ALL_TYPES if t not in POSITION_DEPENDENT]


def test_the_classification_is_transformers_rule():
    assert POSITION_DEPENDENT == ["dynamic", "longrope"]


@pytest.mark.parametrize("rope_type", FIXED)
@pytest.mark.parametrize("policy", TREE_POLICIES)
def test_fixed_frequency_types_are_lossless_past_max_positions(rope_type, policy):
    target, inputs = tiny_scaled_llama(rope_type)
    max_new = 3 * MAX_POSITIONS  # far past max_position_embeddings
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), POLICIES[policy]()).generate(
        **inputs, max_new_tokens=max_new)
    assert torch.equal(out.sequences, generate_reference(target, inputs, max_new))


@pytest.mark.parametrize("rope_type", POSITION_DEPENDENT)
@pytest.mark.parametrize("policy", TREE_POLICIES)
def test_position_dependent_types_are_lossless_within_their_threshold(rope_type, policy):
    target, inputs = tiny_scaled_llama(rope_type)
    policy = POLICIES[policy]()
    # the deepest tree node of the last step: prompt + max_new - 2 + depth_bound must stay below the threshold
    max_new = MAX_POSITIONS - PROMPT_LEN + 1 - policy.depth_bound
    assert max_new > 1
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), policy).generate(
        **inputs, max_new_tokens=max_new)
    assert torch.equal(out.sequences, generate_reference(target, inputs, max_new))


@pytest.mark.parametrize("rope_type", POSITION_DEPENDENT)
def test_position_dependent_types_are_refused_when_a_tree_would_cross_the_threshold(rope_type):
    target, inputs = tiny_scaled_llama(rope_type)
    policy = POLICIES["chain"]()
    generator = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), policy)
    max_new = MAX_POSITIONS - PROMPT_LEN + 2 - policy.depth_bound  # one position too far
    with pytest.raises(ValueError, match=f"rope_type='{rope_type}'.*above {MAX_POSITIONS} positions.*a tree up to "
                                         f"{policy.depth_bound} deep.*lower max_new_tokens by 1 to keep it within"):
        generator.generate(**inputs, max_new_tokens=max_new)
    # one-token steps (policy 'ar') are generate's own forwards: allowed, and identical, past the threshold
    out = SpeculativeGenerator(target, None, "ar").generate(**inputs, max_new_tokens=2 * MAX_POSITIONS)
    assert torch.equal(out.sequences, generate_reference(target, inputs, 2 * MAX_POSITIONS))


@pytest.mark.parametrize("rope_type", POSITION_DEPENDENT)
def test_without_the_refusal_the_output_would_be_wrong(rope_type, monkeypatch):
    """Negative control: the guard switched off, a generation crossing the threshold departs from generate."""
    target, inputs = tiny_scaled_llama(rope_type)
    monkeypatch.setattr(FamilyAdapter, "rope_refusal", lambda self, *args: None)
    max_new = 2 * MAX_POSITIONS
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), POLICIES["static"]()).generate(
        **inputs, max_new_tokens=max_new)
    assert not torch.equal(out.sequences, generate_reference(target, inputs, max_new))


def test_longrope_with_the_prompt_already_past_its_threshold_is_lossless():
    """A prompt longer than longrope's threshold puts every forward on the long factors: nothing changes later."""
    target, inputs = tiny_scaled_llama("longrope", prompt_len=MAX_POSITIONS + 4)
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), POLICIES["static"]()).generate(
        **inputs, max_new_tokens=MAX_POSITIONS)
    assert torch.equal(out.sequences, generate_reference(target, inputs, MAX_POSITIONS))


def test_per_layer_type_rope_parameters_are_read():
    """Gemma 3 style: one rope per layer type; a dynamic rope on the full-attention layers is found."""
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=40,
        rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert position_dependent_ropes(config) == [("dynamic", 40)]


def _left_padded(rows: list[dict]) -> dict:
    length = max(row["input_ids"].shape[1] for row in rows)
    ids = torch.stack([torch.nn.functional.pad(row["input_ids"][0], (length - row["input_ids"].shape[1], 0), value=0)
                       for row in rows])
    mask = torch.stack([torch.nn.functional.pad(torch.ones_like(row["input_ids"][0]),
                                                (length - row["input_ids"].shape[1], 0)) for row in rows])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("rope_type", POSITION_DEPENDENT)
@pytest.mark.parametrize("policy", ["ar", "chain"])
def test_a_batch_with_rows_on_both_sides_of_the_threshold_is_refused(rope_type, policy):
    """A batched forward takes its frequencies from its longest row: a row that stays within the threshold beside
    one past it (each fine alone) would not decode as it does alone, for one-token steps too (found by an
    adversarial run: a longrope batch gave the short row other tokens than alone and than batched generate). Rows
    all within it decode as alone."""
    target, short = tiny_scaled_llama(rope_type, prompt_len=6)
    long = text_prompt(MAX_POSITIONS + 4, seed=6)
    draft = correlated_draft(target, noise=0.1) if policy != "ar" else None
    generator = SpeculativeGenerator(target, draft, POLICIES[policy]())
    with pytest.raises(ValueError, match=f"rope_type='{rope_type}'") as refusal:
        generator.generate(**_left_padded([long, short]), max_new_tokens=4)
    if policy == "ar" or rope_type == "longrope":  # (a dynamic rope refuses the long row's trees alone already)
        assert "a batch's forwards take the longest row's" in str(refusal.value)
    within = text_prompt(PROMPT_LEN, seed=7)
    out = generator.generate(**_left_padded([within, short]), max_new_tokens=4)
    for b, row in enumerate((within, short)):
        expected = generate_reference(copy.deepcopy(target), row, 4)[0, row["input_ids"].shape[1]:]
        assert torch.equal(out.sequences[b, -4:], expected), f"row {b}"


def test_phi3_longrope_crossing_is_refused_for_one_token_steps_too():
    """Phi-3's generate drops its cache and re-encodes the whole sequence when it first passes its longrope
    threshold, which one-token steps on a kept cache do not reproduce (found by an adversarial run: 'ar' gave other
    tokens); a prompt already past the threshold decodes as generate."""
    from transformers import Phi3Config, Phi3ForCausalLM

    half = 8  # rotary dims / 2: head_dim 32, partial rotary 0.5
    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2 * MAX_POSITIONS,
                        original_max_position_embeddings=MAX_POSITIONS, partial_rotary_factor=0.5,
                        eos_token_id=None, bos_token_id=1, pad_token_id=0, initializer_range=0.12,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                         "long_factor": [1.0 + 3.0 * i for i in range(half)],
                                         "original_max_position_embeddings": MAX_POSITIONS})
    torch.manual_seed(3)
    target = finish(Phi3ForCausalLM._from_config(config, attn_implementation="sdpa"), seed=7)
    assert get_adapter(target).reencodes_at_rope_threshold
    generator = SpeculativeGenerator(target, None, "ar")
    inputs = text_prompt(PROMPT_LEN, seed=5)
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        generator.generate(**inputs, max_new_tokens=2 * MAX_POSITIONS)
    past = text_prompt(MAX_POSITIONS + 2, seed=5)
    out = generator.generate(**past, max_new_tokens=12)
    assert torch.equal(out.sequences, generate_reference(target, past, 12))
    assert not get_adapter(tiny_scaled_llama("longrope")[0]).reencodes_at_rope_threshold  # Llama keeps its cache
