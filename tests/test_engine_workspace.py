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


@pytest.mark.parametrize("direct", [True, False])
def test_commit_result_and_draft_len_have_one_writer(direct):
    """The workspace decodes the commit's readback into named host values, and it alone keeps the draft cache
    length: ``start_generation`` sets it, a feed grows it, the commit shrinks it to what the draft keeps (the
    binding crops the draft layers to it); Python cannot write it."""
    from types import SimpleNamespace

    from sage_ext import _C

    sequence = torch.zeros(1, 16, dtype=torch.int64)
    sequence[0, :4] = torch.tensor([11, 12, 13, 14])  # 3 committed tokens the caches hold, then the root
    ws = _C.TreeWorkspace(4, 16, 3, sequence, torch.float32, torch.float32, None, direct)
    with pytest.raises(AttributeError):
        ws.draft_len = 7
    ws.start_generation(3)
    assert ws.draft_len == 3
    ws.start(4, 3, None, None, None)  # the root row
    assert (ws.draft_base, ws.draft_len) == (3, 4)
    logits = torch.full((1, 1, 10), -30.0)
    logits[0, 0, 5], logits[0, 0, 6] = 1.0, 0.9  # two likely children, both kept
    count, frontier_alpha, _, inputs = ws.sage_level(logits, None, 0, 1, 1, 1, 2, 2, 1.0, 3.0, 8.0, 2.0, 10.0, 0.1,
                                                     0, 3, -1, -1)
    assert count == 2 and inputs is not None and ws.draft_len == 6  # the feed of slots 1, 2
    tree_tokens, tree_parents = ws.tokens[:, :3].clone(), ws.parents[:, :3].clone()

    def layers(length):
        return [SimpleNamespace(keys=torch.randn(1, 1, length, 2), values=torch.randn(1, 1, length, 2))]

    target_layers, draft_layers = layers(6), layers(6)
    alpha = torch.tensor([0.1])
    accepted = torch.tensor([[0, 2, -1]])
    result = ws.commit(tree_tokens, tree_parents, None, accepted, torch.tensor([1]), torch.tensor([7]), 4,
                       target_layers, 3, draft_layers, ws.node_row, alpha)
    assert isinstance(result, _C.CommitResult)
    assert (result.accept_len, result.draft_held, result.real_nodes) == (1, 2, 2)
    assert result.tokens == [int(tree_tokens[0, 2]), 7] and sequence[0, 4:6].tolist() == result.tokens
    assert result.alpha == float(alpha[0])  # the float32 value, exactly
    assert torch.equal(result.accepted, accepted)
    assert ws.draft_len == 3 + 2  # the root row and slot 2's row
    assert draft_layers[0].keys.shape[2] == 5 and target_layers[0].keys.shape[2] == 3 + 1 + 1
    # no alpha passed: None
    ws.start(6, 5, None, None, None)
    root_only = ws.commit(ws.tokens[:, :1], ws.parents[:, :1], None, torch.tensor([[0]]), torch.tensor([0]),
                          torch.tensor([8]), 6, target_layers, 5, draft_layers, ws.node_row, None)
    assert root_only.alpha is None and root_only.tokens == [8] and root_only.draft_held == 1


def test_sage_formulas_come_from_the_core():
    """policies' host shapes are csrc/core/formulas.h's float32 values: ``sage_shape`` and ``sage_level_width``
    agree with the sage_tree op bit for bit, alpha near rounding edges included."""
    from sage_ext import _C, ops

    alphas = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 0.099999994, 0.70000005, 1 / 3], dtype=torch.float32)
    for level in (1, 2, 3, 5):
        logprobs = torch.tensor([[0.0, -0.1, -0.7, -2.5]]).expand(len(alphas), 4).contiguous()
        widths, _, max_depth = ops.sage_tree(alphas, logprobs, level, 10, 3.0, 8.0, 2.0, 10.0, 0.1)
        for b, alpha in enumerate(alphas.tolist()):
            depth, width, rounded = _C.sage_shape(alpha, 3, 8, 2, 10)
            assert rounded == int(max_depth[b])
            for f, lp in enumerate(logprobs[b].tolist()):
                expected = _C.sage_level_width(width, lp, level, 10) if level <= rounded else 0
                assert int(widths[b, f]) == expected
