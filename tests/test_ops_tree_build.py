"""Tree construction ops: build_static_tree, sage_tree, expand_tree and rerank_tree.

Each op is compared with the reference on random inputs, checked on hand-built golden cases, and
the full SAGE level-by-level build (sage_tree + expand_tree) and EAGLE-2 rerank are checked for
their invariants: topological, ancestor-closed, widths / threshold / budget respected, best-first.
"""
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import assert_same_outputs, children_lists, is_ancestor_closed, random_parents, random_rank_paths, seeds

from sage_ext import ops, reference

SPECVLM_PARENTS = [-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21]
SPECVLM_RANKS = [-1, 0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1]
SPECVLM_DEPTH = [0] + [1] * 4 + [2] * 8 + [3] * 8 + [4] * 3 + [5] * 2


# --------------------------------------------------------------------------------------------
# build_static_tree
# --------------------------------------------------------------------------------------------
def test_specvlm_static_tree_golden():
    paths = ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS)
    assert paths.shape == (25, 5)
    parents, ranks, depth = ops.build_static_tree(paths)
    assert parents.tolist() == SPECVLM_PARENTS
    assert ranks.tolist() == SPECVLM_RANKS
    assert depth.tolist() == SPECVLM_DEPTH
    assert torch.bincount(depth).tolist() == [1, 4, 8, 8, 3, 2]
    assert_same_outputs((parents, ranks, depth), reference.build_static_tree(paths))


def test_static_tree_input_order_does_not_matter():
    shuffled = list(ops.SPECVLM_TREE_PATHS)
    random.Random(0).shuffle(shuffled)
    parents, ranks, depth = ops.build_static_tree(ops.paths_to_tensor(shuffled))
    assert parents.tolist() == SPECVLM_PARENTS and ranks.tolist() == SPECVLM_RANKS


def test_static_tree_lexicographic_within_level():
    # [0, 5] sorts after [0, 1] and before [1, 0]; wider padding than needed is fine
    paths = torch.tensor([[1, -1, -1], [0, 5, -1], [0, -1, -1], [1, 0, -1], [0, 1, -1]])
    parents, ranks, depth = ops.build_static_tree(paths)
    assert parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert ranks.tolist() == [-1, 0, 1, 1, 5, 0]
    assert depth.tolist() == [0, 1, 1, 2, 2, 2]


@given(num_paths=st.integers(1, 200), max_rank=st.integers(1, 64), seed=seeds)
def test_static_tree_matches_reference(num_paths, max_rank, seed):
    paths = ops.paths_to_tensor(random_rank_paths(random.Random(seed), num_paths, max_rank=max_rank, max_depth=8))
    got = ops.build_static_tree(paths)
    assert_same_outputs(got, reference.build_static_tree(paths))
    parents = got[0].tolist()
    assert all(parents[i] < i for i in range(1, len(parents)))


# --------------------------------------------------------------------------------------------
# sage_tree
# --------------------------------------------------------------------------------------------
def test_sage_tree_golden():
    # alpha 0.5 with the paper defaults: D = 5.5, W = 6, max_depth = round(5.5) = 6
    alpha = torch.tensor([0.5, 1.0, 0.0])
    widths, min_cum, max_depth = ops.sage_tree(alpha, torch.zeros(3, 2), 1, 10, 3, 8, 2, 10)
    assert widths.tolist() == [[6, 6], [2, 2], [10, 10]]
    assert max_depth.tolist() == [6, 8, 3]
    assert min_cum.tolist() == pytest.approx([math.log(0.1 / 5.5), math.log(0.1 / 8), math.log(0.1 / 3)], rel=1e-6)

    # level 2: W (0.5 + P) / 2 with P = 1, 0.5, 0.01 and an empty slot -> 4.5 -> 5, 3, 1.53 -> 2, 0
    frontier = torch.log(torch.tensor([[1.0, 0.5, 0.01, 0.0]]))
    widths, min_cum, _ = ops.sage_tree(alpha[:1], frontier, 2, 10, 3, 8, 2, 10, theta_scale=0.2)
    assert widths.tolist() == [[5, 3, 2, 0]]
    assert min_cum.item() == pytest.approx(math.log(0.2 * 2 / 5.5), rel=1e-6)

    # clamp to k, and no children below max_depth (alpha 0: D = 3)
    widths, _, _ = ops.sage_tree(torch.tensor([0.0]), torch.zeros(1, 3), 1, 4, 3, 8, 2, 10)
    assert widths.tolist() == [[4, 4, 4]]
    widths, _, _ = ops.sage_tree(torch.tensor([0.0]), torch.zeros(1, 3), 4, 4, 3, 8, 2, 10)
    assert widths.tolist() == [[0, 0, 0]]

    # theta_scale 0: no threshold (a greedy chain: width 1 at every level, d_min = d_max)
    widths, min_cum, max_depth = ops.sage_tree(alpha, torch.zeros(3, 1), 3, 10, 5, 5, 1, 1, theta_scale=0.0)
    assert widths.tolist() == [[1], [1], [1]] and max_depth.tolist() == [5, 5, 5]
    assert min_cum.tolist() == [-math.inf] * 3


@given(
    batch=st.integers(1, 8),
    num_frontier=st.integers(1, 64),
    level=st.integers(1, 12),
    k=st.integers(1, 64),
    d_range=st.tuples(st.floats(0.5, 8), st.floats(0, 8)),
    w_range=st.tuples(st.floats(0, 10), st.floats(0, 20)),
    theta_scale=st.one_of(st.just(0.0), st.floats(0.01, 1.0)),
    seed=seeds,
)
def test_sage_tree_matches_reference(batch, num_frontier, level, k, d_range, w_range, theta_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.rand(batch, generator=gen)
    alpha[0] = float(seed % 3) / 2  # exact 0, 0.5, 1 too
    frontier = torch.log(torch.rand(batch, num_frontier, generator=gen))
    frontier[torch.rand(batch, num_frontier, generator=gen) < 0.2] = -math.inf
    d_min, d_max = d_range[0], d_range[0] + d_range[1]
    w_min, w_max = w_range[0], w_range[0] + w_range[1]
    args = (alpha, frontier, level, k, d_min, d_max, w_min, w_max, theta_scale)
    assert_same_outputs(ops.sage_tree(*args), reference.sage_tree(*args), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# expand_tree
# --------------------------------------------------------------------------------------------
def test_expand_tree_golden():
    tokens = torch.tensor([[5, 0, 0, 0, 0, 0]])
    parents = torch.full((1, 6), -1)
    logprobs = torch.zeros(1, 6)
    cum = torch.zeros(1, 6)
    # two frontier slots (the root and an empty one), widths 3; threshold -3 drops the -4 candidate
    topk_lp = torch.tensor([[[-1.0, -2.0, -4.0], [-0.5, -1.0, -1.5]]])
    topk_ids = torch.tensor([[[11, 12, 13], [21, 22, 23]]])
    count = ops.expand_tree(tokens, parents, logprobs, cum, torch.tensor([[0, -1]]), topk_lp, topk_ids,
                            torch.tensor([[3, 3]]), torch.tensor([-3.0]), 1, 4)
    assert count.tolist() == [2]
    assert tokens.tolist() == [[5, 11, 12, 0, 0, 0]]
    assert parents.tolist() == [[-1, 0, 0, -1, -1, -1]]
    assert logprobs.tolist() == [[0.0, -1.0, -2.0, -math.inf, -math.inf, 0.0]]  # slot 5: outside the range
    assert cum.tolist() == [[0.0, -1.0, -2.0, -math.inf, -math.inf, 0.0]]

    # next level, frontier = slots 1 and 2: cum = parent's cum + child logprob; the tie at -2.0
    # between (f0, r0) and (f1, r0) goes to the smaller f; -inf candidates are never kept
    topk_lp = torch.tensor([[[-1.0, -1.5], [0.0, -math.inf]]])
    count = ops.expand_tree(tokens, parents, logprobs, cum, torch.tensor([[1, 2]]), topk_lp,
                            torch.tensor([[[31, 32], [41, 42]]]), torch.tensor([[2, 2]]),
                            torch.tensor([-10.0]), 3, 3)
    assert count.tolist() == [3]
    assert tokens[0, 3:].tolist() == [31, 41, 32]
    assert parents[0, 3:].tolist() == [1, 2, 1]
    assert cum[0, 3:].tolist() == [-2.0, -2.0, -2.5]

    # a width of 1 and a budget of 1 slot keep only the single best candidate
    count = ops.expand_tree(tokens, parents, logprobs, cum, torch.tensor([[1, 2]]), topk_lp,
                            torch.tensor([[[31, 32], [41, 42]]]), torch.tensor([[1, 1]]),
                            torch.tensor([-10.0]), 3, 1)
    assert count.tolist() == [1] and tokens[0, 3].item() == 31


def random_expand_inputs(batch, capacity, slot_start, num_frontier, top_k, seed, quantize):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (batch, capacity), generator=gen)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64)
    logprobs = torch.log(torch.rand(batch, capacity, generator=gen))
    cum = -torch.rand(batch, capacity, generator=gen) * 4
    cum[:, 0] = 0
    frontier = torch.randint(-1, slot_start, (batch, num_frontier), generator=gen)
    topk_lp = torch.log(torch.rand(batch, num_frontier, top_k, generator=gen)).sort(-1, descending=True).values
    topk_lp[torch.rand(batch, num_frontier, top_k, generator=gen) < 0.1] = -math.inf
    topk_lp = topk_lp.sort(-1, descending=True).values
    if quantize:  # coarse values make equal cumulative log-probs (ties) common
        cum = (cum * 2).round() / 2
        topk_lp = (topk_lp * 2).round() / 2
    topk_ids = torch.randint(0, 1000, (batch, num_frontier, top_k), generator=gen)
    widths = torch.randint(-1, top_k + 3, (batch, num_frontier), generator=gen)
    min_cum = -torch.rand(batch, generator=gen) * 6
    return tokens, parents, logprobs, cum, frontier, topk_lp, topk_ids, widths, min_cum


@given(
    batch=st.integers(1, 8),
    capacity=st.integers(2, 128),
    start_frac=st.floats(0, 1),
    slots_frac=st.floats(0, 1),
    num_frontier=st.integers(1, 32),
    top_k=st.integers(1, 16),
    quantize=st.booleans(),
    seed=seeds,
)
def test_expand_tree_matches_reference(batch, capacity, start_frac, slots_frac, num_frontier, top_k, quantize, seed):
    slot_start = 1 + int(start_frac * (capacity - 1))
    num_slots = int(slots_frac * (capacity - slot_start))
    inputs = random_expand_inputs(batch, capacity, slot_start, num_frontier, top_k, seed, quantize)
    mine = [t.clone() for t in inputs]
    theirs = [t.clone() for t in inputs]
    count = ops.expand_tree(*mine, slot_start, num_slots)
    want = reference.expand_tree(*theirs, slot_start, num_slots)
    assert_same_outputs([count] + mine[:4], [want] + theirs[:4])
    assert torch.all(count <= num_slots)


# --------------------------------------------------------------------------------------------
# the full SAGE build: sage_tree + expand_tree level by level
# --------------------------------------------------------------------------------------------
SAGE_PARAMS = dict(d_min=3, d_max=8, w_min=2, w_max=10)


def build_sage_tree(impl, draft_logits, budget, k):
    """Drive a SAGE build with the tree ops of `impl` (ops or reference): the draft's distribution
    after node i of row b is draft_logits[b, i], its top-k always from `ops.topk_confidence` (so
    both builds see bit-identical proposals). Returns the tree state, alpha and per-level records."""
    batch = draft_logits.shape[0]
    capacity = budget + 1
    tokens = torch.zeros(batch, capacity, dtype=torch.int64)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64)
    logprobs = torch.zeros(batch, capacity)
    cum = torch.zeros(batch, capacity)
    alpha, _, _ = ops.topk_confidence(draft_logits[:, 0], k)
    frontier = torch.zeros(batch, 1, dtype=torch.int64)
    frontier_lp = torch.zeros(batch, 1)
    slot, level, levels = 1, 1, []
    while slot < capacity:
        widths, min_cum, max_depth = impl.sage_tree(alpha, frontier_lp, level, k, **SAGE_PARAMS)
        rows = draft_logits[torch.arange(batch)[:, None], frontier.clamp(min=0)]
        _, topk_lp, topk_ids = ops.topk_confidence(rows.flatten(0, 1), k)
        topk_lp, topk_ids = topk_lp.view(batch, -1, k), topk_ids.view(batch, -1, k)
        num_slots = min(capacity - slot, frontier.shape[1] * k)
        count = impl.expand_tree(tokens, parents, logprobs, cum, frontier, topk_lp, topk_ids, widths, min_cum,
                                 slot, num_slots)
        levels.append(dict(level=level, start=slot, num_slots=num_slots, count=count, frontier=frontier,
                           widths=widths, min_cum=min_cum, topk_lp=topk_lp, topk_ids=topk_ids))
        frontier = torch.arange(slot, slot + num_slots).expand(batch, -1).clone()
        frontier_lp = logprobs[:, slot:slot + num_slots].clone()
        frontier[frontier_lp == -math.inf] = -1
        slot += num_slots
        level += 1
        if count.sum() == 0:
            break
    return (tokens, parents, logprobs, cum), alpha, levels


@given(batch=st.integers(1, 4), budget=st.integers(1, 96), k=st.integers(1, 12), sharpness=st.floats(0.1, 8), seed=seeds)
def test_sage_build_invariants(batch, budget, k, sharpness, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = 50
    draft_logits = torch.randn(batch, budget + 1, vocab, generator=gen) * sharpness
    state, alpha, levels = build_sage_tree(ops, draft_logits, budget, k)
    tokens, parents, logprobs, cum = state

    ref_state, _, _ = build_sage_tree(reference, draft_logits, budget, k)
    assert_same_outputs(state, ref_state)

    depth_cap = reference.sage_tree(alpha, torch.zeros(batch, 1), 1, k, **SAGE_PARAMS)[2]
    for b in range(batch):
        row = parents[b].tolist()
        real = [i == 0 or row[i] >= 0 for i in range(len(row))]
        assert is_ancestor_closed(row, real)
        assert sum(real) - 1 <= budget
        depth = [0] * len(row)
        for i in range(1, len(row)):
            if real[i]:
                depth[i] = depth[row[i]] + 1
                assert depth[i] <= depth_cap[b]
                assert cum[b, i] == (cum[b, row[i]] + logprobs[b, i])  # float32, exactly
        for rec in levels:
            start, stop, count = rec["start"], rec["start"] + rec["num_slots"], int(rec["count"][b])
            level_real = [i for i in range(start, stop) if real[i]]
            assert level_real == list(range(start, start + count))  # real nodes first, padding after
            assert all(depth[i] == rec["level"] for i in level_real)
            assert all(cum[b, i] > rec["min_cum"][b] for i in level_real)  # threshold
            values = cum[b, start:start + count]
            assert torch.all(values[:-1] >= values[1:])  # best-first
            children = children_lists(row)
            allowed = set()
            for f, node in enumerate(rec["frontier"][b].tolist()):
                if node < 0:
                    continue
                width = int(rec["widths"][b, f])
                assert len([c for c in children[node] if start <= c < stop]) <= width
                for r in range(width):
                    c = float(cum[b, node] + rec["topk_lp"][b, f, r])
                    allowed.add((node, int(rec["topk_ids"][b, f, r]), c))
            chosen = {(row[i], int(tokens[b, i]), float(cum[b, i])) for i in level_real}
            assert chosen <= allowed  # every child is one of its parent's leading `width` ranks
            # nothing better than the worst chosen node was left out unless the level was full
            left_out = [c for (_, _, c) in allowed - chosen if c > rec["min_cum"][b] and c > -math.inf]
            if count < rec["num_slots"]:
                assert not left_out
            elif left_out:
                assert max(left_out) <= float(values[-1])


# --------------------------------------------------------------------------------------------
# rerank_tree
# --------------------------------------------------------------------------------------------
def test_rerank_golden():
    parents = torch.tensor([[-1, 0, 0, 1, -1, 3]])
    cum = torch.log(torch.tensor([[1.0, 0.5, 0.4, 0.45, 0.99, 0.2]]))
    keep, new_parents = ops.rerank_tree(parents, cum, 3)
    assert keep.tolist() == [[0, 1, 3]] and new_parents.tolist() == [[-1, 0, 1]]
    keep, new_parents = ops.rerank_tree(parents, cum, 6)  # 5 real nodes: one -1 pad, padding never chosen
    assert keep.tolist() == [[0, 1, 2, 3, 5, -1]] and new_parents.tolist() == [[-1, 0, 0, 1, 3, -1]]
    keep, new_parents = ops.rerank_tree(parents, cum, 1)
    assert keep.tolist() == [[0]] and new_parents.tolist() == [[-1]]


def test_rerank_score_is_path_minimum_and_ties_go_to_lower_index():
    # node 3 has a high cum (0.9) but sits under node 1 (0.1): its score is 0.1, so it is dropped;
    # node 4 (0.3) is best, then nodes 2 and 5 tie at 0.2 -> the lower index (2) is kept
    parents = torch.tensor([[-1, 0, 0, 1, 0, 0]])
    cum = torch.log(torch.tensor([[1.0, 0.1, 0.2, 0.9, 0.3, 0.2]]))
    keep, new_parents = ops.rerank_tree(parents, cum, 3)
    assert keep.tolist() == [[0, 2, 4]] and new_parents.tolist() == [[-1, 0, 0]]


@given(batch=st.integers(1, 8), num_nodes=st.integers(1, 128), select_frac=st.floats(0, 1), quantize=st.booleans(),
       seed=seeds)
def test_rerank_matches_reference_and_invariants(batch, num_nodes, select_frac, quantize, seed):
    parents = random_parents(batch, num_nodes, seed)
    gen = torch.Generator().manual_seed(seed)
    cum = -torch.rand(batch, num_nodes, generator=gen) * 8
    if quantize:
        cum = cum.round()
    cum[torch.rand(batch, num_nodes, generator=gen) < 0.05] = -math.inf
    num_select = 1 + int(select_frac * (num_nodes - 1))
    keep, new_parents = ops.rerank_tree(parents, cum, num_select)
    assert_same_outputs((keep, new_parents), reference.rerank_tree(parents, cum, num_select))

    for b in range(batch):
        row = parents[b].tolist()
        real = [i == 0 or row[i] >= 0 for i in range(num_nodes)]
        kept = [i for i in keep[b].tolist() if i >= 0]
        assert kept[0] == 0 and kept == sorted(set(kept))
        assert len(kept) == min(num_select, sum(real))
        assert all(real[i] for i in kept)
        assert keep[b, len(kept):].eq(-1).all() and new_parents[b, len(kept):].eq(-1).all()
        for pos, node in enumerate(kept[1:], start=1):  # ancestor-closed, parent links remapped
            assert 0 <= new_parents[b, pos] < pos and kept[new_parents[b, pos]] == row[node]
        # every kept node scores at least as well as every dropped real node
        score = [math.inf] * num_nodes
        for i in range(1, num_nodes):
            if real[i]:
                score[i] = min(float(cum[b, i]), score[row[i]])
        dropped = [score[i] for i in range(num_nodes) if real[i] and i not in kept]
        if dropped:
            assert min(score[i] for i in kept) >= max(dropped)
