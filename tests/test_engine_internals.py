"""The engine's preallocated tree state against from-scratch recomputation, every step.

The hot path builds masks and positions as views of persistent buffers (see docs/ENGINE.md): the draft's
tree mask rows are written level by level in a block that moves with the cache length (by ``sage_level_``
for SAGE, by a gather otherwise), ``node_row`` is a table view while slots equal draft rows, a root-only
tree (``ar``) takes its target mask and position as views, a fixed layout (static, chain, SAGE's first
round) copies precomputed draft and target blocks. Here every draft-mask row the draft used (past columns
included) and every target forward's mask and positions are compared with what ``tree_buffers`` computes
from the tree's parents, for every policy of test_engine (SAGE with and without lag and static shapes),
with a short and a long prompt; the mask views must start at 64-element aligned addresses; and the nodes
the draft holds must be ancestor-closed (so an accepted path's held nodes, which ``commit_tree_``
compacts, are a prefix of it).
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_engine import POLICIES
from tiny_models import correlated_draft, one_thread, text_prompt, tiny_llama, tokens_left  # noqa: F401  (autouse)

from sage_ext import ops
from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.policies import SagePolicy, StaticTreePolicy

MAX_NEW = 20
#: the tests' policies plus a static tree whose level-2 feed range covers a childless node (rank path [1]), and
#: SAGE with a flat draft: after the static first round no candidate passes the threshold, so the trees are the
#: root alone (the target mask buffer must not keep the first round's block)
INTERNAL_POLICIES = {**POLICIES, "static_gap": lambda: StaticTreePolicy([[0], [1], [2], [0, 0], [2, 0], [2, 0, 0]]),
                     "sage_flat_draft": lambda: SagePolicy()}


@pytest.fixture(scope="module")
def pair():
    target, _ = tiny_llama()
    return target, correlated_draft(target, noise=0.1)


def flat_draft(target: torch.nn.Module) -> torch.nn.Module:
    """The target with its lm_head scaled down: a near-uniform draft distribution."""
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.get_output_embeddings().weight.mul_(1e-3)
    return draft


def ancestors(parents: list[int], node: int) -> set[int]:
    found = set()
    while node >= 0:
        found.add(node)
        node = parents[node]
    return found


def check_draft_tree(ws) -> None:
    """Every draft row of this step: its tree-block columns open exactly at its ancestors-or-self."""
    parents = ws.tree_parents[0].tolist()
    assert ws.tree_node_row.shape[0] == 1
    node_row = ws.tree_node_row[0].tolist()
    assert node_row[-1] == -1 and len(node_row) >= len(parents) + 1
    rows = {slot: row for slot, row in enumerate(node_row[: len(parents)]) if row >= 0}
    # distinct rows below the rows used, the root in row 0 (a rerank may drop fed nodes: rows can have gaps)
    assert len(set(rows.values())) == len(rows) and max(rows.values()) < ws.rows_used and rows.get(0) == 0
    base = ws.draft_base
    assert not ws.mask[0, 0, : ws.rows_used, :base].any()  # the past: all zeros
    block = ws.mask[0, 0, :, base : base + ws.rows_used]
    for slot, row in rows.items():
        if slot > 0 and parents[slot] < 0:  # padding: itself only
            expected = {row}
        else:
            expected = {rows[a] for a in ancestors(parents, slot)}
        opened = set((block[row] == 0).nonzero().flatten().tolist())
        assert opened == expected, (slot, row, opened, expected)
    # the real nodes the draft holds are ancestor-closed, so every path's held nodes are a prefix of it
    assert all(parents[slot] in rows for slot in rows if slot > 0 and parents[slot] >= 0)


@pytest.mark.parametrize("prompt_len", [12, 300])
@pytest.mark.parametrize("policy", list(INTERNAL_POLICIES))
def test_masks_and_positions_match_tree_buffers(pair, policy, prompt_len):
    target, draft = pair
    if policy == "sage_flat_draft":
        draft = flat_draft(target)
    generator = SpeculativeGenerator(target, draft, INTERNAL_POLICIES[policy]())
    policy_object = generator.policy
    build, forward_tree = policy_object.build, generator.target.forward_tree
    draft_forward = generator.draft.forward_tree

    def aligned_draft_forward(tokens, positions, mask, cache):
        # rows start 64 elements into an allocator-aligned buffer; the stride keeps every row aligned
        assert mask.storage_offset() % 64 == 0 and mask.stride(-2) % 64 == 0 and mask.data_ptr() % 16 == 0
        return draft_forward(tokens, positions, mask, cache)

    generator.draft.forward_tree = aligned_draft_forward
    seen = {"builds": 0, "targets": 0}
    state = {}

    def checked_build(ctx):
        proposal = yield from build(ctx)
        if proposal.shape == "alone":  # sage_cost's step of the target alone: no draft rows at all
            assert ctx.ws.tree_node_row is None and ctx.ws.tree_nodes == 1 and proposal.draft_forwards == 0
        elif policy_object.uses_draft:
            check_draft_tree(ctx.ws)
        state["parents"] = ctx.ws.tree_parents.clone()
        seen["builds"] += 1
        return proposal

    def checked_forward(tokens, positions, mask, cache):
        past_len = cache.get_seq_length()
        if mask.shape[-2] == tokens.shape[1] and "parents" in state:  # a verification forward
            parents = state.pop("parents")
            expected = ops.tree_buffers(parents, past_len, mask_dtype=mask.dtype)
            # a padding slot's position is free (it sees only itself and its output is never used): the workspace
            # gives it its level's, tree_buffers 0
            real = (parents >= 0) | (torch.arange(parents.shape[1]) == 0)
            assert torch.equal(positions[real], expected[1][real])
            assert torch.equal(mask, expected[6])
            seen["targets"] += 1
        return forward_tree(tokens, positions, mask, cache)

    policy_object.build = checked_build
    generator.target.forward_tree = checked_forward
    inputs = text_prompt(prompt_len, seed=3)
    out = generator.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=-1)  # every step runs (no EOS)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=-1)
    assert torch.equal(out.sequences, reference)
    # every step the policy's tree and its verify, but the last when one token was left (the root alone, no build)
    built = sum(left > 1 for left in tokens_left(out.stats, MAX_NEW))
    assert seen["builds"] == seen["targets"] == built > 0 and out.stats.target_forwards == len(out.stats.steps)
    if policy == "sage_flat_draft":  # the case it exists for: root-only trees after the fixed first round
        assert out.stats.steps[0].tree_size == 25 and any(step.tree_size == 0 for step in out.stats.steps[1:])
