"""Draft-side visual token pruning (sage_ext.pruning).

- the budget arithmetic and the selection rule on hand-made scores (exact kept indices);
- the hook-based attention scorer equals scores computed from the model's own eager
  ``output_attentions`` (every family; Qwen3-VL too);
- a pruned draft prefill (kept tokens only, original positions) gives the same logits, and a later
  tree forward the same logits, as the unpruned model whose pruned tokens are masked out by a 4D mask
  (Qwen3-VL: with the kept visual rows' DeepStack features; dropping them is seen);
- ``prefill_with_pruning`` end to end: the target sees everything, the draft cache holds the kept count;
- the engine with a pruned draft still returns exactly the target's greedy output.
"""
from __future__ import annotations

import pytest
import torch
from tiny_vlms import ADAPTER_CLASSES, BRANCHING_TREE_PARENTS, TINY_VLM_BUILDERS, correlated_draft
from tiny_vlms_more import tiny_qwen3_vl, tiny_qwen3_vl_video
from transformers import DynamicCache

from sage_ext.families import model_access
from sage_ext.families.base import cache_kwarg
from sage_ext.families.qwen3_vl import Qwen3VLAdapter
from sage_ext.ops import tree_buffers
from sage_ext.pruning import (
    VisualAttentionScorer,
    default_query_mask,
    prefill_with_pruning,
    pruning_budget,
    select_visual_tokens,
)

FAMILIES = list(TINY_VLM_BUILDERS)
# Qwen3-VL feeds visual features into early decoder layers too (DeepStack): its image, and an image + video prompt.
# Always the 2-layer decoder: with one layer the features land after the last layer and reach no logit or cache.
DEEPSTACK_BUILDERS = {
    "qwen3_vl": lambda small=False: tiny_qwen3_vl(),
    "qwen3_vl-image-and-video": lambda small=False: tiny_qwen3_vl_video(image_grid=(1, 8, 12)),
}
BUILDERS = {**TINY_VLM_BUILDERS, **DEEPSTACK_BUILDERS}
ADAPTERS = {**ADAPTER_CLASSES, **{name: Qwen3VLAdapter for name in DEEPSTACK_BUILDERS}}
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("inference_mode")  # as the engine runs adapters (conftest.py)


def _layout(visual_scores: list[float], text_before: int = 2, text_after: int = 3):
    """scores [1, L] and visual_mask [1, L] for a prompt `text, visual..., text` (text scores are
    large on purpose: they must not influence the visual selection)."""
    n_visual = len(visual_scores)
    scores = torch.tensor([[9.0] * text_before + visual_scores + [9.0] * text_after])
    visual = torch.tensor([[False] * text_before + [True] * n_visual + [False] * text_after])
    return scores, visual


def _kept_visual(keep: torch.Tensor, visual: torch.Tensor) -> list[int]:
    """Kept visual tokens, as indices among the visual tokens."""
    return keep[0, visual[0]].nonzero().flatten().tolist()


# ------------------------------------------------------------------------------------------------
# budget and selection rule
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_visual, ratio, budget", [
    (100, 0.85, 15), (48, 0.85, 7), (10, 0.75, 3), (88, 0.9, 9), (88, 0.8, 18),
    (10, 0.0, 10), (10, 1.0, 0), (0, 0.85, 0), (1, 0.85, 0), (4, 0.5, 2),
])
def test_pruning_budget(n_visual, ratio, budget):
    assert pruning_budget(n_visual, ratio) == budget


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_pruning_budget_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        pruning_budget(10, ratio)


def test_select_top_set_then_evenly_spaced_fill():
    # total 10, 40 % = 4: token 1 (score 5) alone reaches it. budget = round(0.4 * 10) = 4,
    # so 3 more come evenly spaced from the 9 others [0,2,3,4,5,6,7,8,9]: picks 1, 4, 7 -> 2, 5, 8
    scores, visual = _layout([0.1, 5.0, 0.2, 3.0, 0.3, 0.1, 0.2, 0.1, 1.0, 0.0])
    keep = select_visual_tokens(scores, visual, ratio=0.6)
    assert _kept_visual(keep, visual) == [1, 2, 5, 8]
    assert keep[~visual].all()


def test_select_top_set_of_two():
    # total 8.5, 40 % = 3.4: 3.0 (token 1) is not enough, + 2.5 (token 6) is; budget 4, fill 2 from
    # the 6 others [0,2,3,4,5,7]: picks floor(6/4) = 1 and floor(18/4) = 4 -> tokens 2 and 5
    scores, visual = _layout([1.0, 3.0, 0.0, 2.0, 0.0, 0.0, 2.5, 0.0])
    keep = select_visual_tokens(scores, visual, ratio=0.5)
    assert _kept_visual(keep, visual) == [1, 2, 5, 6]


def test_select_top_set_capped_at_budget_ties_to_lower_index():
    # uniform scores need 4 tokens for 40 % but the budget is 2: the first two by index
    scores, visual = _layout([1.0] * 10)
    keep = select_visual_tokens(scores, visual, ratio=0.8)
    assert _kept_visual(keep, visual) == [0, 1]


def test_select_zero_scores_is_evenly_spaced():
    # no score mass: everything comes from the even spacing, floor((2j + 1) * 12 / 6) = 2, 6, 10
    scores, visual = _layout([0.0] * 12)
    keep = select_visual_tokens(scores, visual, ratio=0.75)
    assert _kept_visual(keep, visual) == [2, 6, 10]


def test_select_ratio_zero_keeps_everything_and_ratio_one_only_text():
    scores, visual = _layout([0.5, 2.0, 0.1, 0.7])
    assert select_visual_tokens(scores, visual, ratio=0.0).all()
    assert torch.equal(select_visual_tokens(scores, visual, ratio=1.0), ~visual)


def test_select_keeps_text_plus_budget_on_random_scores():
    generator = torch.Generator().manual_seed(3)
    for n_visual in (1, 7, 48, 88):
        for ratio in (0.5, 0.8, 0.85, 0.9):
            scores, visual = _layout(torch.rand(n_visual, generator=generator).tolist(), 5, 7)
            keep = select_visual_tokens(scores, visual, ratio)
            assert keep[~visual].all()
            assert int(keep[visual].sum()) == pruning_budget(n_visual, ratio)


def test_default_query_mask_is_text_after_first_visual():
    visual = torch.tensor([[False, False, True, True, False, True, False, False]])
    expected = torch.tensor([[False, False, False, False, True, False, True, True]])
    assert torch.equal(default_query_mask(visual), expected)
    # no text after the image: the last position is the query
    visual_last = torch.tensor([[False, True, True]])
    assert torch.equal(default_query_mask(visual_last), torch.tensor([[False, False, True]]))


# ------------------------------------------------------------------------------------------------
# scoring from the target's prefill
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES + ["qwen3_vl"])
def test_scorer_matches_eager_output_attentions(name):
    model, inputs = BUILDERS[name]()
    adapter = ADAPTERS[name](model)
    visual = adapter.visual_token_mask(inputs)
    queries = default_query_mask(visual)
    with VisualAttentionScorer(model, queries) as scorer:  # default (sdpa) attention
        adapter.prefill(inputs, DynamicCache(config=model.config))
    scores = scorer.scores

    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    text_layers = model.config.get_text_config().num_hidden_layers
    assert len(out.attentions) == text_layers
    attention = torch.stack(out.attentions)  # [layers, B, H, L, L]
    expected = attention[:, :, :, queries[0]].mean(dim=(0, 2, 3))  # mean over layers, heads, queries
    assert scores.shape == expected.shape == visual.shape
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert scores[visual].sum() > 0


# ------------------------------------------------------------------------------------------------
# pruned draft prefill
# ------------------------------------------------------------------------------------------------

def _full_positions(adapter, inputs):
    """The prompt's position ids as the adapter computes them ([3, 1, L] for M-RoPE, else [1, L])."""
    return adapter.prefill_position_ids(adapter.prefill_inputs(inputs))[0]


def _masked_reference(model, adapter, inputs, keep):
    """Unpruned prefill in which no position attends to a pruned one (4D additive mask)."""
    length = inputs["input_ids"].shape[1]
    allowed = torch.ones(length, length).tril().bool() & keep[0][None, :]
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cache = DynamicCache(config=model.config)
    forward_inputs = {**adapter.prefill_inputs(inputs), "attention_mask": mask}
    with torch.no_grad():
        out = model(**forward_inputs, position_ids=_full_positions(adapter, inputs), **{cache_kwarg(model): cache},
                    use_cache=True)
    return out.logits[:, -1], cache


@pytest.mark.parametrize("name", FAMILIES + list(DEEPSTACK_BUILDERS))
def test_pruned_prefill_matches_masked_full_model(name):
    draft, inputs = BUILDERS[name](small=True)
    adapter = ADAPTERS[name](draft)
    visual = adapter.visual_token_mask(inputs)
    generator = torch.Generator().manual_seed(5)
    scores = torch.rand(visual.shape, generator=generator)
    keep = select_visual_tokens(scores, visual, ratio=0.85)
    n_kept = int(keep.sum())
    length = inputs["input_ids"].shape[1]
    assert n_kept == int((~visual).sum()) + pruning_budget(int(visual.sum()), 0.85) < length

    cache = DynamicCache(config=draft.config)
    result = adapter.prefill(inputs, cache, keep=keep)
    assert cache.get_seq_length() == n_kept
    reference_logits, reference_cache = _masked_reference(draft, adapter, inputs, keep)
    torch.testing.assert_close(result.logits_last, reference_logits, atol=ATOL, rtol=0)

    # decoding after a pruned prefill: sequence index s (full prompt counted) -> position s + offset;
    # the pruned cache is shorter, so the tree mask is built for its own length
    tokens = torch.randint(0, 240, BRANCHING_TREE_PARENTS.shape, generator=generator)
    _, positions, *_, reference_mask, _ = tree_buffers(BRANCHING_TREE_PARENTS, length)
    *_, pruned_mask, _ = tree_buffers(BRANCHING_TREE_PARENTS, n_kept)
    reference_mask[..., :length] = reference_mask[..., :length].masked_fill(~keep[:, None, None, :],
                                                                            torch.finfo(torch.float32).min)
    pruned_logits = adapter.forward_tree(tokens, positions, pruned_mask, cache)
    reference_tree = adapter.forward_tree(tokens, positions, reference_mask, reference_cache)
    torch.testing.assert_close(pruned_logits, reference_tree, atol=ATOL, rtol=0)


def test_pruned_prefill_without_the_kept_deepstack_features_is_seen(monkeypatch):
    """Negative control of the Qwen3-VL cases above: a kept-rows forward that drops the DeepStack features (as the
    kept rows' embeddings alone would) misses the masked full forward by far more than the tolerance."""
    draft, inputs = tiny_qwen3_vl()
    adapter = Qwen3VLAdapter(draft)
    visual = adapter.visual_token_mask(inputs)
    keep = select_visual_tokens(torch.rand(visual.shape, generator=torch.Generator().manual_seed(5)), visual, 0.85)
    reference_logits, _ = _masked_reference(draft, adapter, inputs, keep)
    kept = adapter.prefill(inputs, DynamicCache(config=draft.config), keep=keep)
    torch.testing.assert_close(kept.logits_last, reference_logits, atol=ATOL, rtol=0)
    monkeypatch.setattr(model_access, "_kept_deepstack", lambda captured, kept: {})
    dropped = adapter.prefill(inputs, DynamicCache(config=draft.config), keep=keep)
    assert (dropped.logits_last - reference_logits).abs().max() > 100 * ATOL


@pytest.mark.parametrize("name", ["qwen2_vl", "llava_onevision"])
def test_prefill_keeping_everything_equals_plain_prefill(name):
    """keep = all True goes through the embeddings path and must change nothing."""
    model, inputs = TINY_VLM_BUILDERS[name]()
    adapter = ADAPTER_CLASSES[name](model)
    plain = adapter.prefill(inputs, DynamicCache(config=model.config))
    keep_all = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    kept = adapter.prefill(inputs, DynamicCache(config=model.config), keep=keep_all)
    torch.testing.assert_close(kept.logits_last, plain.logits_last, atol=ATOL, rtol=0)
    assert torch.equal(torch.as_tensor(kept.position_offset), torch.as_tensor(plain.position_offset))


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_with_pruning_end_to_end(name):
    target, inputs = TINY_VLM_BUILDERS[name]()
    draft = correlated_draft(target)
    target_adapter, draft_adapter = ADAPTER_CLASSES[name](target), ADAPTER_CLASSES[name](draft)
    length = inputs["input_ids"].shape[1]
    visual = target_adapter.visual_token_mask(inputs)

    target_cache, draft_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    out = prefill_with_pruning(target_adapter, draft_adapter, inputs, target_cache, draft_cache, ratio=0.85)
    assert target_cache.get_seq_length() == length  # the target sees everything
    assert int(out.keep.sum()) == int((~visual).sum()) + pruning_budget(int(visual.sum()), 0.85)
    assert draft_cache.get_seq_length() == int(out.keep.sum())
    assert torch.equal(out.keep, select_visual_tokens(out.scores, visual, 0.85))

    plain_target = target_adapter.prefill(inputs, DynamicCache(config=target.config))
    torch.testing.assert_close(out.target.logits_last, plain_target.logits_last, atol=ATOL, rtol=0)
    pruned_draft = draft_adapter.prefill(inputs, DynamicCache(config=draft.config), keep=out.keep)
    torch.testing.assert_close(out.draft.logits_last, pruned_draft.logits_last, atol=ATOL, rtol=0)

    # ratio 0 disables pruning: two plain prefills
    draft_cache = DynamicCache(config=draft.config)
    out = prefill_with_pruning(target_adapter, draft_adapter, inputs, DynamicCache(config=target.config),
                               draft_cache, ratio=0.0)
    assert out.keep is None and out.scores is None
    assert draft_cache.get_seq_length() == length


@pytest.mark.parametrize("name", FAMILIES)
def test_engine_with_pruned_draft_keeps_target_greedy_output(name):
    """Pruning changes only what the draft sees: the engine's output stays the target's greedy output."""
    from sage_ext.engine import SpeculativeGenerator

    target, inputs = TINY_VLM_BUILDERS[name]()
    draft = correlated_draft(target, noise=0.05)
    expected = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    generator = SpeculativeGenerator(target, draft, policy="sage", draft_prune_ratio=0.85)
    out = generator.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(out.sequences, expected)
