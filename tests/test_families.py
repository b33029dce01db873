"""Family adapters for Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and Idefics3/SmolVLM, on tiny random models.

For every family:
- prefill: the adapter's last-position logits and its KV cache equal the model's own forward;
- tree forward: a hand-made 6-node, 2-branch tree (tree mask and positions from
  ``sage_ext.ops.tree_buffers``) gives, for every node, the logits that plain HF decoding of that
  node's root-to-node path gives, one token at a time, on a copy of the prefill cache (HF picks the
  positions itself there, using the rope_deltas it cached during its own prefill for M-RoPE models);
  checked right after the prompt and after two more committed tokens;
- visual_token_mask marks exactly the image placeholders; text-only prompts work too;
- `sage_ext.families.get_adapter` finds each adapter from `config.model_type`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_vlms import ADAPTER_CLASSES, BRANCHING_TREE_PARENTS, IMAGE_TOKEN_ID, TINY_VLM_BUILDERS
from transformers import DynamicCache

from sage_ext.families import get_adapter
from sage_ext.families.base import cache_kwarg
from sage_ext.families.qwen2_vl import Qwen2VLAdapter
from sage_ext.ops import tree_buffers

FAMILIES = list(TINY_VLM_BUILDERS)
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("inference_mode")  # as the engine runs adapters (conftest.py)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, inputs = TINY_VLM_BUILDERS[request.param]()
    return request.param, model, inputs


def hf_prefill(model, inputs):
    """The model's own forward over the prompt (HF computes positions; Qwen caches rope_deltas)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(**inputs, **{cache_kwarg(model): cache}, use_cache=True)
    return out.logits[:, -1], cache


def hf_decode(model, cache, tokens):
    """Plain HF decoding, one token at a time; returns the logits after the last token."""
    with torch.no_grad():
        for token in tokens:
            out = model(input_ids=torch.tensor([[token]]), **{cache_kwarg(model): cache}, use_cache=True)
    return out.logits[0, -1]


def cache_len(cache) -> int:
    return cache.get_seq_length()


def test_adapter_declares_model_type(family):
    name, model, _ = family
    assert model.config.model_type in ADAPTER_CLASSES[name].model_types


def test_visual_token_mask_marks_image_placeholders(family):
    name, model, inputs = family
    mask = ADAPTER_CLASSES[name](model).visual_token_mask(inputs)
    assert mask.dtype == torch.bool and mask.shape == inputs["input_ids"].shape
    assert torch.equal(mask, inputs["input_ids"] == IMAGE_TOKEN_ID)
    assert mask.sum() >= 16


def test_prefill_matches_model_forward(family):
    name, model, inputs = family
    adapter = ADAPTER_CLASSES[name](model)
    cache = DynamicCache(config=model.config)
    result = adapter.prefill(inputs, cache)
    expected_logits, expected_cache = hf_prefill(model, inputs)

    assert result.logits_last.shape == (1, model.config.get_text_config().vocab_size)
    torch.testing.assert_close(result.logits_last, expected_logits, atol=ATOL, rtol=0)
    assert cache_len(cache) == inputs["input_ids"].shape[1]
    for ours, theirs in zip(cache.layers, expected_cache.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_position_offset_follows_the_prompts_last_position(name):
    model, inputs = TINY_VLM_BUILDERS[name]()
    result = Qwen2VLAdapter(model).prefill(inputs, DynamicCache(config=model.config))
    # 4 text tokens + <vision_start> (positions 0..4), a 12x16 patch grid merged 2x2 spans positions
    # 5..12 (max(6, 8) = 8 of them) for its 48 tokens, so later text runs 48 - 8 = 40 positions behind on the
    # three M-RoPE rows; the text row (generate's first row, used for packed-sequence masks) is the plain index
    assert result.position_offset.flatten().tolist() == [0, 8 - 48, 8 - 48, 8 - 48]


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_prefill_without_token_types_is_one_dimensional(name):
    """A hand-built Qwen prompt without mm_token_type_ids gets what generate gives it, 1-D positions on every row
    (nothing derived: the output equals generate's, tests/test_families_more.py), and its prefill is the model's
    forward at those positions."""
    model, inputs = TINY_VLM_BUILDERS[name]()
    bare = {key: value for key, value in inputs.items() if key != "mm_token_type_ids"}
    adapter = Qwen2VLAdapter(model)
    positions, offset = adapter.prefill_position_ids(adapter.prefill_inputs(bare))
    length = bare["input_ids"].shape[1]
    assert torch.equal(positions, torch.arange(length).expand_as(positions)) and not torch.as_tensor(offset).any()
    result = adapter.prefill(bare, DynamicCache(config=model.config))
    with torch.no_grad():
        expected = model(**bare, position_ids=positions, use_cache=False).logits[:, -1]
    torch.testing.assert_close(result.logits_last, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("committed", [0, 2], ids=["after-prompt", "after-2-tokens"])
def test_tree_forward_matches_sequential_decoding(family, committed):
    name, model, inputs = family
    adapter = ADAPTER_CLASSES[name](model)
    cache = DynamicCache(config=model.config)
    result = adapter.prefill(inputs, cache)
    _, reference_cache = hf_prefill(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    generator = torch.Generator().manual_seed(7)

    # tokens committed after the prompt, fed as a 2-node chain through forward_tree
    history = [int(result.logits_last.argmax())]
    if committed:
        history.append(int(torch.randint(0, 240, (1,), generator=generator)))
        chain_parents = torch.tensor([[-1, 0]])
        _, positions, *_, chain_mask, _ = tree_buffers(chain_parents, cache_len(cache))
        adapter.forward_tree(torch.tensor([history]), positions, chain_mask, cache)
        hf_decode(model, reference_cache, history)
        history = [int(torch.randint(0, 240, (1,), generator=generator))]

    past_len = cache_len(cache)
    assert past_len == prompt_len + committed
    tokens = torch.cat([torch.tensor([history[-1:]]),
                        torch.randint(0, 240, (1, BRANCHING_TREE_PARENTS.shape[1] - 1), generator=generator)], dim=1)
    _, positions, _, _, paths, _, float_mask, _ = tree_buffers(BRANCHING_TREE_PARENTS, past_len)
    tree_logits = adapter.forward_tree(tokens, positions, float_mask, copy.deepcopy(cache))
    assert tree_logits.shape == (1, BRANCHING_TREE_PARENTS.shape[1], model.config.get_text_config().vocab_size)

    for node in range(BRANCHING_TREE_PARENTS.shape[1]):
        path = [int(i) for i in paths[0, node] if i >= 0]
        expected = hf_decode(model, copy.deepcopy(reference_cache), tokens[0, path].tolist())
        torch.testing.assert_close(tree_logits[0, node], expected, atol=ATOL, rtol=0,
                                   msg=lambda m: f"{name} node {node} (path {path}): {m}")


def test_registry_finds_adapter(family):
    name, model, _ = family
    adapter = get_adapter(model)
    assert type(adapter) is ADAPTER_CLASSES[name] and adapter.model is model


def test_text_only_prompt(family):
    """A VLM adapter also serves prompts without images (M-RoPE degenerates to offset 0)."""
    name, model, _ = family
    input_ids = torch.randint(0, 240, (1, 20), generator=torch.Generator().manual_seed(11))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    adapter = ADAPTER_CLASSES[name](model)
    result = adapter.prefill(inputs, DynamicCache(config=model.config))
    expected_logits, _ = hf_prefill(model, inputs)
    torch.testing.assert_close(result.logits_last, expected_logits, atol=ATOL, rtol=0)
    assert not torch.as_tensor(result.position_offset).any()
    assert not adapter.visual_token_mask(inputs).any()


def test_cache_kwarg_follows_the_forward_signature():
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; adapters pass whichever the
    installed model class takes (the deprecated name warns from 5.24 and goes away in 5.40)."""

    class Before(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class After(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return input_ids

    assert cache_kwarg(Before()) == "past_key_values"
    assert cache_kwarg(After()) == "cache"
