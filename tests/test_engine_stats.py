"""Generation statistics and the SAGE policy's bookkeeping (history, D/W, static slot bounds)."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import contrary_draft, correlated_draft, one_thread, same_draft, tiny_llama, tokens_left  # noqa: F401

from sage_ext import ops
from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.policies import SagePolicy
from sage_ext.engine.stats import TIME_KEYS

MAX_NEW = 30


@pytest.fixture(scope="module")
def llama():
    target, inputs = tiny_llama()
    return target, inputs


@pytest.mark.parametrize("policy", ["ar", "chain", "static", "dynamic", "sage"])
def test_stats_are_consistent(llama, policy):
    target, inputs = llama
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), policy).generate(
        **inputs, max_new_tokens=MAX_NEW)
    check_stats(out.stats, policy, inputs["input_ids"].shape[1], MAX_NEW)


def check_stats(stats, policy: str, prompt_len: int, max_new: int) -> None:
    """The statistics of a generation of ``max_new`` tokens with ``policy`` (a name) agree with each other; every
    time category that ran is positive (CPU clock or CUDA events: tests/test_engine_cuda.py)."""
    assert stats.policy == policy and stats.prompt_len == prompt_len
    assert stats.new_tokens == max_new == 1 + sum(step.emitted for step in stats.steps)
    assert stats.target_forwards == len(stats.steps)
    assert stats.mean_tau == pytest.approx(sum(step.tau for step in stats.steps) / len(stats.steps))
    assert stats.tokens_per_target_forward == pytest.approx(stats.mean_tau + 1)
    assert all(step.emitted <= step.tau + 1 and step.tau <= step.tree_depth for step in stats.steps)
    assert all(step.tree_size <= step.tree_slots for step in stats.steps)
    assert set(stats.time) == set(TIME_KEYS) and all(value >= 0 for value in stats.time.values())
    assert stats.time["target_verify"] > 0 and stats.time["target_prefill"] > 0
    assert (stats.time["draft_decode"] > 0) == (policy != "ar")
    assert 0 < stats.step_time <= stats.wall_time
    assert stats.engine_overhead > 0 and 0 < stats.engine_overhead_fraction < 1
    assert stats.tokens_per_second > 0
    rates = stats.acceptance_by_depth
    assert len(rates) == max(step.tree_depth for step in stats.steps)
    assert all(0 <= rate <= 1 for rate in rates)
    encoded = json.loads(json.dumps(stats.to_dict()))
    assert encoded["new_tokens"] == max_new and len(encoded["steps"]) == len(stats.steps)


def test_sage_records_alpha_depth_and_width(llama):
    target, inputs = llama
    policy = SagePolicy()
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), policy).generate(
        **inputs, max_new_tokens=MAX_NEW)
    first, later = out.stats.steps[0], out.stats.steps[1:]
    assert first.alpha is None and first.tree_size == 25  # the static SpecVLM tree opens
    assert later and all(step.alpha is not None for step in later)
    for previous, step in zip(out.stats.steps, later):
        # lag: the alpha measured at the previous root shapes this tree
        assert step.alpha == pytest.approx(previous.alpha_measured)
        assert step.depth_target == pytest.approx(policy.d_min + step.alpha * (step.d_max - policy.d_min), rel=1e-5)
        assert step.width_target == pytest.approx(policy.w_min + (1 - step.alpha) * (policy.w_max - policy.w_min),
                                                  rel=1e-5)
        assert step.tree_size <= policy.n_max


def test_zero_lag_uses_this_steps_alpha(llama):
    target, inputs = llama
    out = SpeculativeGenerator(target, correlated_draft(target, noise=0.1), SagePolicy(lag=False)).generate(
        **inputs, max_new_tokens=MAX_NEW)
    assert all(step.alpha == step.alpha_measured for step in out.stats.steps[1:])


@pytest.mark.parametrize("draft_kind", ["same", "contrary"])
def test_d_max_follows_the_accepted_lengths(llama, draft_kind):
    target, inputs = llama
    if draft_kind == "same":
        # narrow trees and a negligible threshold: the identical draft accepts round(D) >= 4 > 3 every step
        draft, policy = same_draft(target), SagePolicy(d_min=4, d_max=6, d_max_cap=9, w_min=1, w_max=2,
                                                       theta_scale=1e-3)
    else:  # nothing accepted: mean 0 < 2
        draft, policy = contrary_draft(target), SagePolicy(d_max=6, d_max_cap=9)
    out = SpeculativeGenerator(target, draft, policy).generate(**inputs, max_new_tokens=60, eos_token_id=-1)
    # (a last step with one token left is the target's alone: no tree, no d_max)
    d_max = [step.d_max for step, left in zip(out.stats.steps, tokens_left(out.stats, 60)) if left > 1]
    assert d_max[0] == 6
    assert d_max[-1] == (9 if draft_kind == "same" else policy.d_min + 1)
    assert all(abs(b - a) <= 1 for a, b in zip(d_max, d_max[1:]))


def test_history_rule():
    policy = SagePolicy(d_min=3, d_max=8, d_max_cap=10, history=10)
    for tau in [5] * 4:  # mean > 3: grow, capped
        policy.update(tau, 0.5)
    assert policy.d_max == 10
    for tau in [0] * 30:  # mean < 2: shrink, floored at d_min + 1
        policy.update(tau, 0.5)
    assert policy.d_max == 4
    policy.reset()
    assert policy.d_max == 8 and not policy.history
    for tau in [2, 3, 2, 3]:  # 2 <= mean <= 3: unchanged
        policy.update(tau, 0.5)
    assert policy.d_max == 8
    assert policy.alpha_next == 0.5


@pytest.mark.parametrize("alpha", [0.0, 0.13, 0.5, 0.77, 1.0])
def test_host_shape_matches_the_sage_tree_op(alpha):
    policy = SagePolicy()
    depth, width, max_depth = policy.shape_of(alpha)
    widths, _, op_max_depth = ops.sage_tree(torch.tensor([alpha]), torch.zeros(1, 1), 1, policy.k, 3.0, 8.0, 2.0,
                                            10.0, 0.1)
    assert max_depth == int(op_max_depth)
    assert int(widths[0, 0]) == min(max(int(width + 0.5), 1), policy.k)
    slots = policy.static_level_slots(alpha)
    assert len(slots) == max_depth and sum(slots) <= policy.n_max and all(s >= 1 for s in slots)
    assert slots[0] == int(widths[0, 0])
    assert SagePolicy(lag=False).static_level_slots(None)[0] == policy.k  # worst case: the widest level 1


def test_timeline_books_every_boundary_once():
    """One clock reading per boundary; a category lasts until the next switch; a region gives back the category
    that ran before it; no category inside a step is ``other``, outside steps nobody's; a step spans begin to
    end."""
    from sage_ext.engine.stats import GenerationStats, StepRecord, Timeline

    ticks = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0, 28.0, 36.0, 45.0])  # the last: finish's closing mark
    timeline = Timeline(torch.device("cpu"), clock=lambda: next(ticks))
    timeline.step_begin("tree_ops")            # 0
    timeline.switch("draft_decode")            # 1
    timeline.switch("tree_ops")                # 3
    with timeline.region("target_verify"):     # 6 .. 10, then tree_ops again
        pass
    timeline.switch(None)                      # 15: no category inside a step is "other"
    timeline.step_end()                        # 21
    with timeline.region("target_prefill"):    # 28 .. 36, outside any step
        pass
    stats = GenerationStats(policy="test", steps=[StepRecord(0, 1, 0, 0, 0, 0)])
    timeline.finish(stats)
    assert stats.time == {"draft_prefill": 0.0, "draft_decode": 2.0, "target_prefill": 8.0, "target_verify": 4.0,
                          "tree_ops": 1.0 + 3.0 + 5.0, "other": 6.0}
    assert stats.steps[0].time == 21.0
