"""The engine's native TreeWorkspace: its in-place CPU loops against the registered ops.

On the CPU the workspace runs a level's work (SAGE level, fixed-tree level, EAGLE-2 level, mask rows of a feed,
the final rerank) with core/'s row loops in place; on other devices, or with ``_WORKSPACE_DIRECT_CPU`` off, the
same work goes through the registered ops (the ops' own tests check those against the reference). Both must
build the same trees step by step, for every policy, greedy and sampling; the engine internals tests check
either path's masks and positions against ``tree_buffers``.
"""
from __future__ import annotations

import pytest
import torch
from test_engine import POLICIES
from tiny_models import correlated_draft, one_thread, text_prompt, tiny_llama  # noqa: F401  (autouse fixture)

import sage_ext.engine as engine_module
from sage_ext.engine import SpeculativeGenerator

MAX_NEW = 30


@pytest.fixture(scope="module")
def pair():
    target, _ = tiny_llama()
    return target, correlated_draft(target, noise=0.1)


def run_steps(monkeypatch, target, draft, policy, direct: bool, **options):
    """Generate with the workspace's CPU loops on or off; returns the output and every step's verified tree."""
    monkeypatch.setattr(engine_module, "_WORKSPACE_DIRECT_CPU", direct)
    generator = SpeculativeGenerator(target, draft, POLICIES[policy]())
    steps = []

    def record(debug):
        parents = debug.tree_parents.clone()
        real = (parents >= 0) | (torch.arange(parents.shape[1]) == 0)  # padding slots carry arbitrary tokens
        steps.append((parents, torch.where(real, debug.tree_tokens, -1), debug.tau))

    generator.step_hook = record
    out = generator.generate(**text_prompt(12, seed=5), max_new_tokens=MAX_NEW, **options)
    return out, steps


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_cpu_loops_build_the_trees_the_ops_build(monkeypatch, pair, policy, sampling):
    target, draft = pair
    options = {"do_sample": True, "temperature": 0.8} if sampling else {}
    runs = {}
    for direct in (True, False):
        if sampling:
            options["generator"] = torch.Generator().manual_seed(11)
        runs[direct] = run_steps(monkeypatch, target, draft, policy, direct, **options)
    (out_direct, steps_direct), (out_ops, steps_ops) = runs[True], runs[False]
    assert torch.equal(out_direct.sequences, out_ops.sequences)
    assert len(steps_direct) == len(steps_ops) > 0
    for (parents_a, tokens_a, tau_a), (parents_b, tokens_b, tau_b) in zip(steps_direct, steps_ops):
        assert torch.equal(parents_a, parents_b) and torch.equal(tokens_a, tokens_b) and tau_a == tau_b
    for a, b in zip(out_direct.stats.steps, out_ops.stats.steps):
        assert (a.tau, a.tree_size, a.tree_slots, a.alpha_measured) == (b.tau, b.tree_size, b.tree_slots,
                                                                        b.alpha_measured)
