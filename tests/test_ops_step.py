"""The fused engine-step ops: sage_level_, expand_level_, gather_level_, rerank_select, tree_mask_feed_ and
commit_tree_ (what the engine's workspace calls between model forwards, on every device).

sage_level_ must be exactly the composition it fuses (topk_confidence -> sage_tree -> expand_tree of the
native ops, then the new slots' mask rows) and agree with the reference; a whole SAGE build with it leaves
the tree mask `tree_buffers` computes. commit_tree_ must equal the reference (sequence, both caches,
readback) on random verified trees and refuse paths it cannot commit.
"""
import math
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import LOGIT_DTYPES, assert_same_outputs, matching_argmax, random_parents, random_tokens_for, seeds

from sage_ext import ops, reference

SAGE_PARAMS = (3.0, 8.0, 2.0, 10.0)  # d_min, d_max, w_min, w_max


# --------------------------------------------------------------------------------------------
# sage_level_
# --------------------------------------------------------------------------------------------
def random_level_inputs(batch, capacity, frontier_start, num_frontier, slot_start, vocab, dtype, mask_dtype, seed):
    """Tree state whose frontier slots hold real nodes (some padding), logits for them, and a mask whose rows
    before slot_start are arbitrary (sage_level_ copies parents' rows whatever they hold)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, capacity), generator=gen)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64)
    logprobs = torch.log(torch.rand(batch, capacity, generator=gen))
    cum = -torch.rand(batch, capacity, generator=gen) * 3
    logprobs[:, 0] = cum[:, 0] = 0
    padding = torch.rand(batch, capacity, generator=gen) < 0.2
    padding[:, 0] = False
    logprobs[padding] = -math.inf
    cum[padding] = -math.inf
    logits = (torch.randn(batch, num_frontier, vocab, generator=gen) * 3).to(dtype)
    mask = None
    if mask_dtype is not None:
        mask = torch.where(torch.rand(batch, capacity + 1, capacity + 3, generator=gen) < 0.5, 0.0,
                           torch.finfo(mask_dtype).min).to(mask_dtype)
    alpha = torch.rand(batch, generator=gen)
    return [tokens, parents, logprobs, cum, mask, logits, alpha]


def composed_level(state, mask, logits, alpha, frontier_start, level, slot_start, num_slots, k, temperature):
    """sage_level_ spelled out with the separate native ops and a Python loop for the mask rows."""
    tokens, parents, logprobs, cum = state
    batch, num_frontier, vocab = logits.shape
    frontier_alpha, topk_lp, topk_ids = ops.topk_confidence(logits.reshape(-1, vocab), k, temperature)
    frontier_alpha = frontier_alpha.view(batch, num_frontier)
    shape_alpha = alpha if alpha is not None else frontier_alpha[:, 0].contiguous()
    widths, min_cum, max_depth = ops.sage_tree(shape_alpha, logprobs[:, frontier_start:frontier_start + num_frontier],
                                               level, k, *SAGE_PARAMS)
    frontier = torch.arange(frontier_start, frontier_start + num_frontier).expand(batch, -1)
    count = ops.expand_tree(tokens, parents, logprobs, cum, frontier, topk_lp.view(batch, num_frontier, k),
                            topk_ids.view(batch, num_frontier, k), widths, min_cum, slot_start, num_slots)
    if mask is not None:
        for b in range(batch):
            for i in range(slot_start, slot_start + num_slots):
                parent = int(parents[b, i])
                mask[b, i] = mask[b, parent] if parent >= 0 else torch.finfo(mask.dtype).min
                mask[b, i, i] = 0
    return count, frontier_alpha, max_depth


@given(
    batch=st.integers(1, 4),
    capacity=st.integers(3, 80),
    shape=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    vocab=st.integers(2, 300),
    k_frac=st.floats(0, 1),
    level=st.integers(1, 9),
    dtype=st.sampled_from(LOGIT_DTYPES),
    mask_dtype=st.sampled_from([None, *LOGIT_DTYPES]),
    lagged=st.booleans(),
    temperature=st.sampled_from([1.0, 0.6]),
    seed=seeds,
)
def test_sage_level_is_exactly_the_composition_it_fuses(batch, capacity, shape, vocab, k_frac, level, dtype,
                                                        mask_dtype, lagged, temperature, seed):
    slot_start = 1 + int(shape[0] * (capacity - 2))
    frontier_start = int(shape[1] * (slot_start - 1))
    num_frontier = 1 + int(shape[2] * (slot_start - frontier_start - 1))
    num_slots = int(shape[3] * (capacity - slot_start))
    k = 1 + int(k_frac * (min(vocab, 16) - 1))
    inputs = random_level_inputs(batch, capacity, frontier_start, num_frontier, slot_start, vocab, dtype, mask_dtype,
                                 seed)
    alpha = inputs[6] if lagged else None
    mine = [t.clone() if t is not None else None for t in inputs[:5]]
    theirs = [t.clone() if t is not None else None for t in inputs[:5]]
    got = ops.sage_level_(*mine, inputs[5], alpha, frontier_start, level, slot_start, num_slots, k, temperature,
                          *SAGE_PARAMS)
    want = composed_level(theirs[:4], theirs[4], inputs[5], alpha, frontier_start, level, slot_start, num_slots, k,
                          temperature)
    assert_same_outputs(got, want)
    assert_same_outputs([t for t in mine if t is not None], [t for t in theirs if t is not None])


@pytest.mark.parametrize("seed", range(6))
def test_sage_level_matches_the_reference(seed):
    batch, capacity, vocab, k = 2, 24, 60, 6
    inputs = random_level_inputs(batch, capacity, 1, 3, 5, vocab, torch.float32, torch.float32, seed)
    mine = [t.clone() for t in inputs[:5]]
    theirs = [t.clone() for t in inputs[:5]]
    alpha = inputs[6] if seed % 2 else None
    got = ops.sage_level_(*mine, inputs[5], alpha, 1, 2, 5, 12, k, 1.0, *SAGE_PARAMS)
    want = reference.sage_level_(*theirs, inputs[5], alpha, 1, 2, 5, 12, k, 1.0, *SAGE_PARAMS)
    assert_same_outputs(got, want, atol=2e-5, rtol=1e-5)
    assert_same_outputs(mine, theirs, atol=2e-5, rtol=1e-5)


@given(batch=st.integers(1, 3), budget=st.integers(1, 60), k=st.integers(1, 10), sharpness=st.floats(0.2, 6),
       lagged=st.booleans(), seed=seeds)
def test_sage_build_leaves_the_tree_buffers_mask(batch, budget, k, sharpness, lagged, seed):
    """Level by level as the engine drives it (frontier = the previous level's slots): the mask rows written
    along the way are the tree's own ancestor mask, and the tree equals the one built with the separate ops."""
    gen = torch.Generator().manual_seed(seed)
    vocab, capacity = 40, budget + 1
    draft_logits = torch.randn(batch, capacity, vocab, generator=gen) * sharpness  # after slot i: row i

    def build(level_fn):
        tokens = torch.zeros(batch, capacity, dtype=torch.int64)
        parents = torch.full((batch, capacity), -1, dtype=torch.int64)
        logprobs, cum = torch.zeros(batch, capacity), torch.zeros(batch, capacity)
        mask = torch.full((batch, capacity, capacity), torch.finfo(torch.float32).min)
        mask[:, 0, 0] = 0
        alpha = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) if lagged else None
        frontier_start, frontier_count, slot = 0, 1, 1
        level = 1
        while slot < capacity:
            logits = draft_logits[:, frontier_start:frontier_start + frontier_count]
            num_slots = min(capacity - slot, frontier_count * k)
            count, frontier_alpha, _ = level_fn([tokens, parents, logprobs, cum], mask, logits, alpha,
                                                frontier_start, level, slot, num_slots, k, 1.0)
            if alpha is None:
                alpha = frontier_alpha[:, 0].contiguous()
            frontier_start, frontier_count, slot, level = slot, num_slots, slot + num_slots, level + 1
            if int(count.max()) == 0:
                break
        return (tokens, parents, logprobs, cum, mask), slot  # rows [0, slot) are written

    def fused(state, mask, *args):
        return ops.sage_level_(*state, mask, *args, *SAGE_PARAMS)

    got, written = build(fused)
    want, _ = build(composed_level)
    assert_same_outputs(got, want)
    parents, mask = got[1][:, :written], got[4]
    float_mask = ops.tree_buffers(parents, 0, torch.float32)[6][:, 0]
    assert torch.equal(mask[:, :written, :written], float_mask)


# --------------------------------------------------------------------------------------------
# commit_tree_
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# expand_level_, gather_level_, rerank_select, tree_mask_feed_
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("batch, capacity, frontier_start, num_frontier, slot_start, num_slots, k", [
    (1, 9, 0, 1, 1, 8, 8), (3, 40, 1, 4, 5, 16, 4), (2, 80, 3, 6, 12, 60, 10), (1, 20, 2, 3, 5, 0, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_expand_level_matches_the_reference(dtype, batch, capacity, frontier_start, num_frontier, slot_start,
                                            num_slots, k, seed):
    inputs = random_level_inputs(batch, capacity, frontier_start, num_frontier, slot_start, 300, dtype, None, seed)
    mine = [t.clone() for t in inputs[:4]]
    theirs = [t.clone() for t in inputs[:4]]
    args = (inputs[5], frontier_start, k, 0.7, slot_start, num_slots)
    got = ops.expand_level_(*mine, *args)
    want = reference.expand_level_(*theirs, *args)
    assert_same_outputs(got, want, atol=1e-5, rtol=1e-5)
    assert_same_outputs(mine, theirs, atol=1e-5, rtol=1e-5)
    assert int(got[0].max()) <= num_slots


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("batch, num_frontier, k, child_index, slot_start", [
    (1, 1, 4, [0, 1, 2, 3], 1), (2, 3, 3, [0, 1, 3, 8, 4], 4), (3, 2, 1, [1], 7)])
def test_gather_level_matches_the_reference(dtype, batch, num_frontier, k, child_index, slot_start):
    gen = torch.Generator().manual_seed(num_frontier * 7 + k)
    tokens = torch.randint(0, 50, (batch, 12), generator=gen)
    logprobs = torch.randn(batch, 12, generator=gen)
    logits = (torch.randn(batch, num_frontier, 50, generator=gen) * 2).to(dtype)
    index = torch.tensor(child_index)
    mine, theirs = (tokens.clone(), logprobs.clone()), (tokens.clone(), logprobs.clone())
    got = ops.gather_level_(*mine, logits, index, slot_start, k, 0.9)
    want = reference.gather_level_(*theirs, logits, index, slot_start, k, 0.9)
    assert_same_outputs([got], [want], atol=1e-6, rtol=1e-6)
    assert_same_outputs(mine, theirs, atol=1e-6, rtol=1e-6)
    untouched = [i for i in range(12) if not slot_start <= i < slot_start + len(child_index)]
    assert torch.equal(mine[0][:, untouched], tokens[:, untouched])


def test_gather_level_refuses_an_index_outside_the_top_k():
    tokens, logprobs = torch.zeros(1, 6, dtype=torch.int64), torch.zeros(1, 6)
    with pytest.raises(ValueError, match=r"child_index\[1\] = 4 must be in \[0, F \* k\)"):
        ops.gather_level_(tokens, logprobs, torch.randn(1, 2, 10), torch.tensor([0, 4]), 1, 2, 1.0)
    with pytest.raises(ValueError, match="slot_start"):
        ops.gather_level_(tokens, logprobs, torch.randn(1, 2, 10), torch.tensor([0, 1]), 5, 2, 1.0)


@given(seed=seeds, batch=st.integers(1, 4), num_nodes=st.integers(1, 40), select_frac=st.floats(0.0, 1.0))
def test_rerank_select_matches_the_reference(seed, batch, num_nodes, select_frac):
    parents = random_parents(batch, num_nodes, seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = random_tokens_for(parents, 1000, seed)
    logprobs = torch.log(torch.rand(batch, num_nodes, generator=gen))
    cum = -torch.rand(batch, num_nodes, generator=gen) * 5
    node_row = torch.where(torch.rand(batch, num_nodes + 3, generator=gen) < 0.7,
                           torch.randint(0, 50, (batch, num_nodes + 3), generator=gen), -1)
    num_select = 1 + int(select_frac * (num_nodes - 1))
    got = ops.rerank_select(tokens, parents, logprobs, cum, node_row, num_select)
    want = reference.rerank_select(tokens, parents, logprobs, cum, node_row, num_select)
    assert_same_outputs(got, want)
    keep, new_parents = ops.rerank_tree(parents, cum, num_select)
    assert torch.equal(got[1], new_parents) and (got[3][:, -1] == -1).all()


@pytest.mark.parametrize("mask_dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("with_node_row", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_tree_mask_feed_matches_the_reference(mask_dtype, with_node_row, seed):
    batch, capacity, rows, columns = 2, 30, 17, 20
    parents = random_parents(batch, capacity, seed)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.where(torch.rand(batch, rows, columns, generator=gen) < 0.5, 0.0,
                       torch.finfo(mask_dtype).min).to(mask_dtype)
    mask[:, -1] = torch.finfo(mask_dtype).min  # the padding row
    node_row = None
    slot_start, first_row, count = 9, 6, 8
    if with_node_row:  # some slots fed before (rows < first_row), others not (-1), one with a row too late
        node_row = torch.randint(-1, first_row, (batch, capacity + 1), generator=gen)
        node_row[:, 0] = 0
        node_row[:, 2] = first_row + 3
    else:
        slot_start = first_row  # slots are rows
    mine, theirs = mask.clone(), mask.clone()
    ops.tree_mask_feed_(mine, parents, node_row, slot_start, first_row, count)
    reference.tree_mask_feed_(theirs, parents, node_row, slot_start, first_row, count)
    assert torch.equal(mine, theirs)
    untouched = [r for r in range(rows) if not first_row <= r < first_row + count]
    assert torch.equal(mine[:, untouched], mask[:, untouched])


def test_tree_mask_feed_refuses_rows_past_the_padding_row():
    mask = torch.zeros(1, 5, 8)
    with pytest.raises(ValueError, match="first_row"):
        ops.tree_mask_feed_(mask, torch.tensor([[-1, 0, 0, 1]]), None, 1, 2, 3)


def depths_of(parents_row):
    depth = [0] * len(parents_row)
    for i in range(1, len(parents_row)):
        if parents_row[i] >= 0:
            depth[i] = depth[parents_row[i]] + 1
    return depth


def random_commit_inputs(batch, num_nodes, vocab, fed_depth, seed, dtype=torch.float32):
    """A verified random tree (greedy verification against an argmax that often follows the tree), caches with
    room for it, and draft rows: the draft processed the real nodes shallower than fed_depth, in slot order."""
    parents = random_parents(batch, num_nodes, seed)
    tokens = random_tokens_for(parents, vocab, seed)
    argmax = matching_argmax(tokens, parents, vocab, seed)
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, argmax)
    gen = torch.Generator().manual_seed(seed)
    target_past, draft_past = 5, 3
    target = [torch.randn(batch, 2, target_past + num_nodes + 2, 4, generator=gen).to(dtype) for _ in range(4)]
    draft_rows = torch.full((batch, num_nodes + 1), -1, dtype=torch.int64)
    processed = 0
    for b in range(batch):
        row = parents[b].tolist()
        depth = depths_of(row)
        fed = [i for i in range(num_nodes) if (i == 0 or row[i] >= 0) and depth[i] < fed_depth]
        draft_rows[b, fed] = torch.arange(len(fed))
        processed = max(processed, len(fed))
    draft = [torch.randn(batch, 1, draft_past + processed + 1, 4, generator=gen).to(dtype) for _ in range(2)]
    sequence = torch.randint(0, vocab, (batch, 7 + num_nodes + 3), generator=gen)
    alpha = torch.rand(batch, generator=gen)
    return dict(tokens=tokens, parents=parents, accepted=accepted, accept_len=accept_len, bonus=bonus,
                sequence=sequence, seq_start=7, target_caches=target, target_past=target_past, draft_caches=draft,
                draft_rows=draft_rows, draft_past=draft_past, alpha=alpha)


def cloned(args):
    return {key: [t.clone() for t in value] if isinstance(value, list)
            else value.clone() if isinstance(value, torch.Tensor) else value for key, value in args.items()}


@given(batch=st.integers(1, 4), num_nodes=st.integers(1, 40), fed_depth=st.integers(1, 8),
       dtype=st.sampled_from(LOGIT_DTYPES), with_alpha=st.booleans(), with_draft=st.booleans(), seed=seeds)
def test_commit_tree_matches_the_reference(batch, num_nodes, fed_depth, dtype, with_alpha, with_draft, seed):
    args = random_commit_inputs(batch, num_nodes, 30, fed_depth, seed, dtype)
    if not with_alpha:
        args["alpha"] = None
    if not with_draft:
        args["draft_rows"], args["draft_caches"] = None, []
    mine, theirs = cloned(args), cloned(args)
    readback = ops.commit_tree_(**mine)
    want = reference.commit_tree_(**theirs)
    assert_same_outputs([readback, mine["sequence"], *mine["target_caches"], *mine["draft_caches"]],
                        [want, theirs["sequence"], *theirs["target_caches"], *theirs["draft_caches"]])
    for b in range(batch):  # the readback's own meaning, independently of the reference
        tau = int(args["accept_len"][b])
        path = args["accepted"][b, 1 : tau + 1]
        assert readback[b, 0] == tau
        assert readback[b, 4 : 5 + tau].tolist() == [*args["tokens"][b, path].tolist(), int(args["bonus"][b])]
        assert readback[b, 2] == int((args["parents"][b, 1:] >= 0).sum())
        if with_alpha:
            assert struct_float(int(readback[b, 3])) == float(args["alpha"][b])


def struct_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def test_commit_tree_golden():
    tokens = torch.tensor([[5, 7, 8, 9]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, torch.tensor([[8, 1, 9, 4]]))  # path 0, 2, 3
    sequence = torch.zeros(1, 8, dtype=torch.int64)
    keys = torch.arange(7.0).reshape(1, 1, 7, 1)
    draft_keys = torch.arange(10.0, 14.0).reshape(1, 1, 4, 1)  # root, node 1, node 2 at rows 1.. (past 1)
    draft_rows = torch.tensor([[0, 1, 2, -1, -1]])
    readback = ops.commit_tree_(tokens, parents, accepted, accept_len, bonus, sequence, 2, [keys], 3, [draft_keys],
                                draft_rows, 1, torch.tensor([0.5]))
    assert readback.tolist() == [[2, 2, 3, struct_bits(0.5), 8, 9, 4, -1]]
    assert sequence.tolist() == [[0, 0, 8, 9, 4, 0, 0, 0]]
    assert keys.flatten().tolist() == [0, 1, 2, 3, 5, 6, 6]  # rows 3 + [0, 2, 3]
    assert draft_keys.flatten().tolist() == [10, 11, 13, 13]  # rows 1 + [0, 2]; node 3 was never fed


def struct_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


@pytest.mark.parametrize("case", ["not a prefix", "accept_len", "root", "past the path", "draft row too small"])
def test_commit_tree_refuses_bad_paths_before_writing(case):
    args = random_commit_inputs(1, 6, 10, 3, seed=1)
    args.update(tokens=torch.tensor([[1, 2, 3, 4, 5, 6]]), parents=torch.tensor([[-1, 0, 1, 2, 3, 4]]),
                accepted=torch.tensor([[0, 1, 2, 3, -1, -1]]), accept_len=torch.tensor([3]),
                draft_rows=torch.tensor([[0, 1, 2, -1, -1, -1, -1]]))
    argument = "accepted"
    if case == "not a prefix":
        args["draft_rows"] = torch.tensor([[0, -1, 2, -1, -1, -1, -1]])
        argument = "prefix"
    elif case == "accept_len":
        args["accept_len"] = torch.tensor([6])
        argument = "accept_len"
    elif case == "root":
        args["accepted"] = torch.tensor([[1, 1, 2, 3, -1, -1]])
    elif case == "past the path":
        args["accepted"] = torch.tensor([[0, 1, 2, 3, 4, -1]])
    else:
        args["draft_rows"] = torch.tensor([[1, 0, 2, -1, -1, -1, -1]])
    before = cloned(args)
    with pytest.raises(ValueError, match=argument):
        ops.commit_tree_(**args)
    for key in ("sequence", "target_caches", "draft_caches"):
        value, old = args[key], before[key]
        pairs = zip(value, old) if isinstance(value, list) else [(value, old)]
        assert all(torch.equal(a, b) for a, b in pairs)


def test_commit_tree_without_caches_only_writes_the_sequence():
    tokens, parents = torch.tensor([[3, 4]]), torch.tensor([[-1, 0]])
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, torch.tensor([[4, 6]]))
    sequence = torch.zeros(1, 4, dtype=torch.int64)
    readback = ops.commit_tree_(tokens, parents, accepted, accept_len, bonus, sequence, 1, [], 0, [], None, 0, None)
    assert readback.tolist() == [[1, 0, 1, 0, 4, 6]] and sequence.tolist() == [[0, 4, 6, 0]]


def test_random_inputs_cover_partial_draft_holdings():
    """The generator above makes paths the draft holds only partly (the case draft_rows exist for)."""
    partial = 0
    for seed in range(30):
        args = random_commit_inputs(1, 20, 8, 2, seed)
        tau = int(args["accept_len"][0])
        held = (args["draft_rows"][0, args["accepted"][0, : tau + 1]] >= 0).sum()
        partial += int(0 < held < tau + 1)
    assert partial >= 3
