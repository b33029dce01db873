"""KV-cache bookkeeping of the speculative engine: after every step, both caches equal the caches
obtained by recomputing the committed sequence from scratch.

Target: its cache must hold exactly the committed tokens except the last (the next root), with the
keys/values a fresh prefill of the prompt plus a causal forward of the generated tokens gives.
Draft: its cache must hold the first ``draft_done`` tokens of the sequence (the rest are fed in the
next step's first draft forward), again equal to a fresh recomputation — with the same pruned prompt
when draft-side visual pruning is on. Every family x every policy, correlated draft (accepts and rejects).
"""
from __future__ import annotations

import pytest
import torch
from test_engine import POLICIES
from tiny_models import all_family_builders, correlated_draft, one_thread  # noqa: F401  (autouse fixture)
from transformers import DynamicCache

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.costs import ProposalChoice
from sage_ext.engine.policies import CostAwareSagePolicy
from sage_ext.families import causal_mask_4d, get_adapter

BUILDERS = all_family_builders()
MAX_NEW = 16
ATOL = 2e-4


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    target, inputs = BUILDERS[request.param]()
    return target, inputs, correlated_draft(target, noise=0.1)


def recomputed_cache(model, inputs, sequence: list[int], length: int, keep=None, target: bool = False) -> DynamicCache:
    """Prefill the prompt (``keep``: the draft's pruned prompt) and forward the generated tokens as one causal
    chain, up to sequence index ``length``; through the family adapter, which sets the positions. A ``target`` with
    a sliding window gets the chain with a 2-D mask, from which the model builds its own masks (its windows
    included), as in ``generate``; a draft's tree forwards attend to all its cache holds, and so does its chain."""
    adapter = get_adapter(model)
    device = adapter.input_device  # the model's (CPU, or CUDA; a draft may sit elsewhere than the inputs)
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    cache = DynamicCache()
    adapter.prefill(inputs, cache, keep=None if keep is None else keep.to(device))
    prompt_len = inputs["input_ids"].shape[1]
    extra = length - prompt_len
    if extra > 0:
        tokens = torch.tensor([sequence[prompt_len:length]], device=device)
        positions = torch.arange(prompt_len, length, device=device)[None]
        if target and adapter.sliding_window() is not None:
            model(input_ids=tokens, position_ids=adapter.rope_position_ids(positions),
                  attention_mask=torch.ones(1, length, dtype=torch.int64, device=device),
                  **{adapter.cache_kwarg: cache}, use_cache=True)
        else:
            mask = causal_mask_4d(extra, cache.get_seq_length(), adapter.dtype, tokens.device)
            adapter.forward_tree(tokens, positions, mask, cache)
    return cache


def assert_same_cache(actual, expected):
    assert actual.get_seq_length() == expected.get_seq_length()
    for layer_actual, layer_expected in zip(actual.layers, expected.layers):
        torch.testing.assert_close(layer_actual.keys, layer_expected.keys, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(layer_actual.values, layer_expected.values, atol=ATOL, rtol=1e-4)


def check_step_caches(info, target, draft, inputs) -> None:
    """The step hook's check: after a step (``info``, a ``StepDebug``) of the prompt ``inputs``, both caches equal a
    recomputation of the committed sequence (the draft's with its pruned prompt)."""
    if info.finished:  # the last block may be cut (EOS / max_new_tokens); the caches are not used again
        return
    sequence = info.sequence
    assert info.target_cache.get_seq_length() == len(sequence) - 1
    assert_same_cache(info.target_cache, recomputed_cache(target, inputs, sequence, len(sequence) - 1, target=True))
    if info.draft_cache is not None:
        assert info.draft_done <= len(sequence) - 1
        expected = recomputed_cache(draft, inputs, sequence, info.draft_done, keep=info.draft_keep)
        assert_same_cache(info.draft_cache, expected)


def run_with_cache_checks(target, draft, inputs, policy, elsewhere_from=(None, None), **generator_kwargs):
    """One generation with ``check_step_caches`` after every step; ``elsewhere_from``: the cache layers (target,
    draft) from which on are committed as another device's group (``SpeculativeGenerator.elsewhere_from``)."""
    generator = SpeculativeGenerator(target, draft, policy, **generator_kwargs)
    generator.elsewhere_from = elsewhere_from
    checked = []

    def check(info):
        checked.append(info.tau)
        check_step_caches(info, target, draft, inputs)

    generator.step_hook = check
    out = generator.generate(**inputs, max_new_tokens=MAX_NEW)
    assert len(checked) == out.stats.target_forwards > 0
    return out, checked


@pytest.mark.parametrize("policy", list(POLICIES))
def test_caches_match_recomputation_after_every_step(family, policy):
    target, inputs, draft = family
    _, taus = run_with_cache_checks(target, draft, inputs, POLICIES[policy]())
    if policy != "ar":
        assert max(taus) > 0


@pytest.mark.parametrize("family_name", [name for name in BUILDERS if name not in ("llama", "qwen2", "mistral")])
@pytest.mark.parametrize("policy", ["static", "sage"])
def test_pruned_draft_cache_matches_recomputation(family_name, policy):
    target, inputs = BUILDERS[family_name]()
    draft = correlated_draft(target, noise=0.1)
    assert get_adapter(target).visual_token_mask(inputs).any()
    out, _ = run_with_cache_checks(target, draft, inputs, POLICIES[policy](), draft_prune_ratio=0.75)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


def test_caches_match_recomputation_with_steps_of_the_target_alone(family):
    """sage_cost's steps of the target alone leave the draft behind: the next drafted step feeds every token they
    committed with its root, one run shorter than the workspace's first-forward buffer and one longer (a fresh
    causal mask), then trees and chains go on; both caches equal a recomputation after every step and the output is
    the target's own."""
    target, inputs, draft = family
    policy = CostAwareSagePolicy()
    alone = ProposalChoice.ALONE
    runs = [alone] * 2 + [0] + [alone] + [4] + [alone] * (policy.depth_bound + 2) + [0, alone, 3]
    plan = iter(runs)
    policy.learned.proposals.next_length = lambda limit: (max(-1, min(next(plan, 0), limit)), False)
    generator = SpeculativeGenerator(target, draft, policy)
    checked = []

    def check(info):
        checked.append(info.tau)
        check_step_caches(info, target, draft, inputs)

    generator.step_hook = check
    out = generator.generate(**inputs, max_new_tokens=40, eos_token_id=-1)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=40, eos_token_id=-1)
    assert torch.equal(out.sequences, reference)
    steps = out.stats.steps
    alone_steps = [step for step in steps[1:len(runs) + 1] if step.draft_forwards == 0]  # (after SAGE's first round)
    assert len(alone_steps) == runs.count(alone) and all(step.tau == 0 and step.tree_size == 0 for step in alone_steps)
    assert len(checked) == len(steps) and max(checked) > 0
