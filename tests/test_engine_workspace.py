"""The engine's native TreeWorkspace: the step's tree it owns, the commit's named readback, draft_len's one writer,
and SAGE's host formulas from csrc/core.

Every piece of the workspace's tensor work is a registered op (one path on every device, tested op by op against
the reference in test_ops_step.py); the engine tests check the trees it builds end to end.
"""
from __future__ import annotations

import math

import pytest
import torch

from sage_ext import _C, ops


def test_commit_result_and_draft_len_have_one_writer():
    """The workspace decodes the commit's readback into named host values, and it alone keeps the draft cache
    length: ``start_generation`` sets it, a feed grows it, the commit shrinks it to what the draft keeps (the
    engine crops the draft cache to it); Python cannot write it. The commit takes no tree from Python: it verifies
    and commits the tree the workspace holds (here the slots [0, 3)), and the root alpha its first level measured."""
    sequence = torch.zeros(1, 16, dtype=torch.int64)
    sequence[0, :4] = torch.tensor([11, 12, 13, 14])  # 3 committed tokens the caches hold, then the root
    ws = _C.TreeWorkspace(4, 16, 3, sequence, torch.float32, torch.float32, None)
    with pytest.raises(AttributeError):
        ws.draft_len = 7
    ws.start_generation(3)
    assert ws.draft_len == 3
    ws.start(4, 3)  # the root row
    assert (ws.draft_base, ws.draft_len) == (3, 4)
    logits = torch.full((1, 1, 10), -30.0)
    logits[0, 0, 5], logits[0, 0, 6] = 1.0, 0.9  # two likely children, both kept
    count, frontier_alpha, _, inputs = ws.sage_level(logits, None, 0, 1, 1, 1, 2, 2, 1.0, 3.0, 8.0, 2.0, 10.0, 0.1,
                                                     0, 3, -1, -1)
    assert count == 2 and inputs is not None and ws.draft_len == 6  # the feed of slots 1, 2
    ws.use_slots(3)
    assert ws.tree_nodes == 3 and ws.tree_parents.tolist() == [[-1, 0, 0]]
    tree_tokens = ws.tree_tokens.clone()
    assert tree_tokens.tolist() == [[14, 5, 6]]
    target_tokens, positions, mask = ws.target_inputs(3)
    assert torch.equal(target_tokens, tree_tokens) and positions.tolist() == [[3, 4, 4]]
    assert torch.equal(mask, ops.tree_buffers(ws.tree_parents, 3)[6])

    target_cache = torch.arange(6.0).reshape(1, 1, 6, 1)  # rows 3, 4, 5 hold the tree's nodes 0, 1, 2
    draft_cache = torch.arange(6.0).reshape(1, 1, 6, 1) + 10
    accepted = torch.tensor([[0, 2, -1]])
    result = ws.commit(None, accepted, torch.tensor([1]), torch.tensor([7]), 4, [[target_cache]], 3, [[draft_cache]])
    assert isinstance(result, _C.CommitResult)
    assert (result.accept_len, result.draft_held, result.real_nodes) == (1, 2, 2)
    assert result.tokens == [6, 7] and sequence[0, 4:6].tolist() == result.tokens
    assert result.alpha == float(frontier_alpha[0, 0])  # the root alpha of the first level, the float32 value
    assert torch.equal(result.accepted, accepted)
    assert ws.draft_len == 3 + 2  # the root row and slot 2's row
    assert target_cache.flatten()[3:5].tolist() == [3.0, 5.0] and draft_cache.flatten()[3:5].tolist() == [13.0, 15.0]
    # a step whose tree is the root alone, no level measured an alpha: None
    ws.start(6, 5)
    ws.use_slots(1)
    root_only = ws.commit(None, torch.tensor([[0]]), torch.tensor([0]), torch.tensor([8]), 6, [], 5, [])
    assert root_only.alpha is None and root_only.tokens == [8] and root_only.draft_held == 1


def _two_children_level(stops, known_count: int = -1):
    """A workspace whose first SAGE level keeps two children of cumulative probabilities ~0.53 and ~0.47."""
    sequence = torch.zeros(1, 16, dtype=torch.int64)
    sequence[0, :4] = torch.tensor([11, 12, 13, 14])
    ws = _C.TreeWorkspace(8, 16, 3, sequence, torch.float32, torch.float32, None)
    ws.start_generation(3)
    ws.start(4, 3)
    logits = torch.full((1, 1, 10), -30.0)
    logits[0, 0, 5], logits[0, 0, 6] = 1.0, 0.9
    result = ws.sage_level(logits, None, 0, 1, 1, 1, 4, 2, 1.0, 3.0, 8.0, 2.0, 10.0, 0.1, 0, 7, known_count,
                           known_max_depth=-1 if known_count < 0 else 8, level_stops=stops)
    return ws, result


@pytest.mark.parametrize("cost_fixed, goes_on", [(0.99, True), (1.01, False)])
def test_sage_level_goes_on_only_while_the_next_level_pays(cost_fixed, goes_on):
    """With ``level_stops`` the tree goes on past a level only if value(level, mass) >= cost_fixed + cost_per_node x
    count, mass being the level's draft probability mass (here both children's) and value piecewise linear in it,
    scaled per level: no feed, so the draft cache does not grow, when it does not pay. The level itself is kept
    either way."""
    mass = float(torch.tensor([1.0, 0.9, *[-30.0] * 8]).softmax(0)[:2].sum())
    # level 1's scale decides (level 2's would always pay)
    stops = _C.LevelStops(masses=[0.0, mass, 2.0], values=[0.0, 1.0, 5.0], scales=[1.0, 100.0],
                          cost_fixed=cost_fixed - 2 * 0.01, cost_per_node=0.01)
    ws, (count, _, _, inputs) = _two_children_level(stops)
    assert count == 2
    assert (inputs is not None) == goes_on
    assert ws.draft_len == (6 if goes_on else 4)
    assert stops.pays(1, mass, 2) == goes_on and stops.pays(2, mass, 2)
    # linear between the points, flat beyond them, scaled per level
    assert stops.value(1, mass / 2) == pytest.approx(0.5) and stops.value(1, 3.0) == 5.0
    assert stops.value(1, -1.0) == 0.0 and stops.value(2, mass / 2) == pytest.approx(50.0)


def test_sage_level_stops_need_the_count_read():
    """Static shapes (the count known on the host, nothing read mid-step) cannot judge a level's mass: refused."""
    with pytest.raises(ValueError, match="level_stops need the level's count read"):
        _two_children_level(_C.LevelStops([0.0], [1.0], [1.0], 0.0, 0.0), known_count=4)


def test_level_masses_are_read_with_dynamic_counts_only():
    """Dynamic shapes: each level's draft probability mass is summed on the host as its count is read (what the
    cost-aware policy learns from, with or without ``level_stops``), equal to the device sum the engine takes with
    static shapes (``DraftRound.level_mass``); a new step starts with none. Static shapes read nothing: none listed."""
    mass = float(torch.tensor([1.0, 0.9, *[-30.0] * 8]).softmax(0)[:2].sum())
    ws, (count, _, _, _) = _two_children_level(None)
    assert count == 2 and ws.level_masses == pytest.approx([mass], rel=1e-6)
    device_sum = torch.where(ws.parents[0, 1:3] >= 0, ws.cum_logprobs[0, 1:3].exp(), 0.0).double().sum()
    assert ws.level_masses[0] == pytest.approx(float(device_sum), rel=1e-6)
    ws.start(5, 4)
    assert ws.level_masses == []
    static_ws, _ = _two_children_level(None, known_count=4)
    assert static_ws.level_masses == []


def _chain_layout(length: int) -> "_C.FixedLayout":
    """The fixed layout of a chain of ``length`` draft tokens (``DraftRound.fixed_layout``'s rule): the draft
    processes the root and the first ``length - 1`` tokens, row r = slot r."""
    parents = torch.arange(-1, length)
    depth, *_, mask, _ = ops.tree_buffers(parents[None], 0, torch.float32)
    node_row = torch.full((1, length + 2), -1)
    node_row[0, :length] = torch.arange(length)
    return _C.FixedLayout(parents, node_row, mask[0, :, :length, :length], depth, mask[0, 0])


def _chain_workspace(stop_tokens=()):
    sequence = torch.zeros(1, 32, dtype=torch.int64)
    sequence[0, :4] = torch.tensor([11, 12, 13, 14])
    ws = _C.TreeWorkspace(8, 32, 6, sequence, torch.float32, torch.float32, None)
    ws.start_generation(3, list(stop_tokens))
    layout = _chain_layout(5)
    ws.start(4, 3, layout)
    return ws, layout


def _sure_logits(token: int, vocab: int = 10) -> torch.Tensor:
    logits = torch.full((1, 1, vocab), -30.0)
    logits[0, 0, token], logits[0, 0, (token + 1) % vocab] = 2.0, 0.0  # p(token) = 1 / (1 + e^-2) ~ 0.88
    return logits


@pytest.mark.parametrize("stop_level", [1, 2, 5])
def test_static_level_stops_a_fixed_chain_as_a_prefix(stop_level):
    """A fixed layout's levels with ``cumulative`` and ``dynamic``: each level's cumulative log-prob kept and its
    draft mass read (``level_masses``, as SAGE's dynamic levels), and, given ``level_stops``, no feed once the next
    level does not pay. The tree verified is then a prefix of the layout: its target mask and positions those of the
    prefix, the unfed last slot without a draft row, and the commit keeps only the rows the draft processed."""
    ws, layout = _chain_workspace()
    p = float(_sure_logits(5).softmax(-1)[0, 0, 5])
    # the level-l mass is p ** l: pays at levels below stop_level only (values scaled per level, mass-independent)
    stops = _C.LevelStops(masses=[0.0, 1.0], values=[1.0, 1.0],
                          scales=[2.0 if level < stop_level else 0.5 for level in range(1, 6)],
                          cost_fixed=1.0, cost_per_node=0.0)
    for level in range(1, 6):
        next_feed = (level, 1, level) if level < 5 else (0, 0, 0)
        _, inputs = ws.static_level(_sure_logits(4 + level), 1, torch.tensor([0]), level, 3 if level == 1 else 1,
                                    1.0, level == 1, *next_feed, True, True, stops)
        if inputs is None:
            break
        assert inputs[0].tolist() == [[4 + level]] and inputs[1].tolist() == [[3 + level]]
    assert level == stop_level
    assert ws.level_masses == pytest.approx([p ** depth for depth in range(1, level + 1)], rel=1e-5)
    assert ws.cum_logprobs[0, 1:level + 1].tolist() == pytest.approx([depth * math.log(p) for depth in
                                                                      range(1, level + 1)], rel=1e-5)
    assert ws.draft_len == 3 + level  # the root row and the fed tokens: the last level is never fed
    ws.use_slots(level + 1)
    tokens, positions, mask = ws.target_inputs(3)
    assert tokens.tolist() == [[14, *range(5, 5 + level)]] and positions.tolist() == [list(range(3, 4 + level))]
    assert torch.equal(mask, ops.tree_buffers(torch.arange(-1, level)[None], 3)[6])
    assert ws.tree_node_row[0, :level + 1].tolist() == [*range(level), -1]
    target_cache = torch.arange(16.0).reshape(1, 1, 16, 1)
    draft_cache = target_cache + 100
    accepted = torch.tensor([list(range(level + 1))])  # every node accepted
    result = ws.commit(None, accepted, torch.tensor([level]), torch.tensor([9]), 4, [[target_cache]], 3,
                       [[draft_cache]])
    assert result.tokens == [*range(5, 5 + level), 9] and result.draft_held == level
    assert ws.draft_len == 3 + level
    # the next step on the whole layout: its own node rows again
    ws.start(4 + level + 1, ws.draft_len, layout)
    assert torch.equal(ws.node_row, layout.node_row)


def test_static_level_stop_tokens_end_a_dynamic_chain():
    """Dynamic shapes: a level whose every node is a stop token is not fed on (what follows an accepted stop token
    is dropped), as with SAGE's levels; without ``dynamic`` the fixed tree goes on."""
    for dynamic in (True, False):
        ws, _ = _chain_workspace(stop_tokens=[6])
        _, inputs = ws.static_level(_sure_logits(5), 1, torch.tensor([0]), 1, 1, 1.0, False, 1, 1, 1, True, dynamic)
        assert inputs is not None
        _, inputs = ws.static_level(_sure_logits(6), 1, torch.tensor([0]), 2, 1, 1.0, False, 2, 1, 2, True, dynamic)
        assert (inputs is None) == dynamic
        assert len(ws.level_masses) == (2 if dynamic else 0)


def test_static_level_measurement_arguments_are_checked():
    """The mass needs the cumulative log-probs, the stop needs the mass read, and cumulative log-probs need the
    layout's parents: refused otherwise."""
    stops = _C.LevelStops([0.0], [1.0], [1.0], 0.0, 0.0)
    ws, _ = _chain_workspace()
    with pytest.raises(ValueError, match="dynamic needs cumulative"):
        ws.static_level(_sure_logits(5), 1, torch.tensor([0]), 1, 1, 1.0, False, 1, 1, 1, False, True)
    with pytest.raises(ValueError, match="level_stops need dynamic"):
        ws.static_level(_sure_logits(5), 1, torch.tensor([0]), 1, 1, 1.0, False, 1, 1, 1, True, False, stops)
    ws.start(5, 4)  # no layout
    with pytest.raises(ValueError, match="need a fixed layout"):
        ws.static_level(_sure_logits(5), 1, torch.tensor([0]), 1, 1, 1.0, False, 0, 0, 0, True, False)
    ws.start(6, 5, _chain_layout(3))
    with pytest.raises(ValueError, match="fewer than 5"):
        ws.use_slots(5)


def test_commit_compacts_every_device_group_alike():
    """Cache groups the commit does not hand to commit_tree_ (another device; here a second group on the same
    device, as the engine's split seam makes) are compacted with the same path: equal to the group that is."""
    sequence = torch.zeros(1, 16, dtype=torch.int64)
    sequence[0, :3] = torch.tensor([1, 2, 3])
    ws = _C.TreeWorkspace(8, 16, 3, sequence, torch.float32, torch.float32, None)
    ws.start_generation(2)
    ws.start(3, 2)
    logits = torch.randn(1, 1, 12)
    ws.topk_expand(logits, 1, 0, 3, 1.0, 1, 3, True, 1, 3, 1)  # slots 1..3, fed as rows 1..3
    ws.use_slots(4)
    caches = [torch.randn(1, 2, 6, 4) for _ in range(4)]  # 2 + 4 rows: target (2 groups), draft (2 groups)
    expected = [cache.clone() for cache in caches]
    accepted = torch.tensor([[0, 3, -1, -1]])
    draft_rows = ws.tree_node_row[0, accepted[0]]  # the node_row entry of each accepted node (-1 past the path)
    for cache in expected[:2]:
        cache[:, :, 3] = cache[:, :, 2 + 3]
    for cache in expected[2:]:
        cache[:, :, ws.draft_base + 1] = cache[:, :, ws.draft_base + int(draft_rows[1])]
    result = ws.commit(None, accepted, torch.tensor([1]), torch.tensor([9]), 3, [[caches[0]], [caches[1]]], 2,
                       [[caches[2]], [caches[3]]])
    assert result.draft_held == 2
    for got, want in zip(caches, expected):
        assert torch.equal(got[:, :, :4], want[:, :, :4])


def test_workspace_trees_selection_and_root():
    """``rerank`` makes EAGLE-2's selection the step's tree (tokens, parents, draft rows of the kept slots);
    ``root_only`` the root alone, read from the sequence buffer."""
    from sage_ext import reference

    sequence = torch.zeros(1, 32, dtype=torch.int64)
    sequence[0, :5] = torch.tensor([4, 3, 2, 1, 9])
    ws = _C.TreeWorkspace(13, 32, 4, sequence, torch.float32, torch.float32, None)
    ws.start_generation(4)
    torch.manual_seed(0)
    ws.start(5, 4)
    ws.topk_expand(torch.randn(1, 1, 20), 1, 0, 3, 1.0, 1, 3, True, 1, 3, 1)
    ws.topk_expand(torch.randn(1, 3, 20), 3, 1, 3, 1.0, 4, 9, False, 0, 0, 0)
    slots = (ws.tokens.clone(), ws.parents.clone(), ws.logprobs.clone(), ws.cum_logprobs.clone(), ws.node_row.clone())
    ws.rerank(13, 6)
    want = reference.rerank_select(*slots, 6)
    assert ws.tree_nodes == 6
    assert torch.equal(ws.tree_tokens, want[0]) and torch.equal(ws.tree_parents, want[1])
    assert torch.equal(ws.tree_logprobs, want[2]) and torch.equal(ws.tree_node_row, want[3])
    root = _C.TreeWorkspace(1, 32, 2, sequence, None, torch.float32, None)
    root.root_only(5)
    tokens, positions, mask = root.target_inputs(4)
    assert tokens.tolist() == [[9]] and positions.tolist() == [[4]] and mask.shape == (1, 1, 1, 5) and not mask.any()


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
