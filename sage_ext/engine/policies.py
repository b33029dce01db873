"""Tree policies: how the draft's proposal tree is shaped each step.

Every policy runs inside the same engine loop (``sage_ext.engine``); it only decides which draft nodes
exist. It talks to the engine through a ``DraftRound`` (``ctx``), whose native workspace holds the tree:
``ctx.start_tree`` / ``ctx.root_inputs()`` (the inputs of the step's first draft forward: pending committed tokens
+ the root), the levels ``ctx.sage_level`` / ``ctx.static_level`` / ``ctx.topk_expand`` (a whole SAGE / fixed-tree /
EAGLE-2 level and the inputs of the draft forward over its new slots, one native call), then which tree the target
verifies: ``ctx.use_slots(n)`` (the slots ``[0, n)``), ``ctx.rerank``
(EAGLE-2's final selection) or ``ctx.root_only()`` (no draft). ``build`` is a generator: it yields the inputs of
each draft forward and gets the logits back (``logits = yield inputs``, ``[1, T, V]``; a level's frontier is their
last rows), so the engine runs one draft forward per level for every row of a batch, each row with its own
policy state and tree; ``build`` returns the ``TreeProposal``. Policies never loop over tree nodes in Python and never read device values, except SAGE with
``static_shapes=False`` reading per-level node counts (free on CPU). Trees are laid out level by level, so every
level (and every set of nodes fed to the draft) is a slot range. The engine books a policy's whole ``build`` as
``tree_ops`` except the draft forwards, so policies keep no clocks; ``build`` runs once per step on the hot
path: no per-level Python objects beyond views, constants cached per device. SAGE's host-side shapes (D, W,
round(D), level widths) are the kernels' own float32 formulas (csrc/core/formulas.h, through ``sage_ext._C``).

Policies (names for ``SpeculativeGenerator(policy=...)``):
  ``"ar"``       AutoregressivePolicy  — no draft; the target decodes one token per forward (the baseline).
  ``"chain"``    ChainPolicy           — a single chain of the draft's greedy tokens.
  ``"static"``   StaticTreePolicy      — the fixed 25-node SpecVLM tree of child ranks ("SD-Tree").
  ``"dynamic"``  DynamicTreePolicy     — EAGLE-2: per level the best ``topk`` new nodes expand their top
                                         ``topk`` children; a final global top-``num_nodes`` rerank.
  ``"sage"``     SagePolicy            — SAGE: depth and width from the draft's confidence alpha.
  ``"sage_cost"`` CostAwareSagePolicy  — SAGE whose depth maximizes measured tokens per second, or the
                                         draft's greedy chain where that pays more (``sage_ext.engine.costs``).
"""
from __future__ import annotations

import copy
import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import torch
from torch import Tensor

from .. import _C, ops
from .costs import (
    CostLearning,
    CostModel,
    DepthAcceptance,
    MassAcceptance,
    NodeAcceptance,
    ProposalChoice,
    StepCost,
    best_depth,
    expected_tokens,
    level_stops,
    node_threshold,
)

#: The 25-node, depth-5 static tree of SpecVLM (SAGE's first round and the "static" baseline).
SPECVLM_TREE_PATHS: list[list[int]] = [list(path) for path in ops.SPECVLM_TREE_PATHS]


@dataclass
class TreeProposal:
    """What a policy tells the engine about the tree it left in the workspace (the tree itself stays there).

    depth_bound: host int, no node is deeper.
    draft_forwards: draft forward passes spent on this tree.
    alpha_root: ``[1]`` float32 device tensor, the draft's confidence at the root (None when not measured).
    info: host values for the step record (alpha, depth_target, width_target, d_max).
    level_mass: the tree's draft probability mass per depth, when the policy ``measures_level_mass`` (None when
    not measured): host floats where the levels' counts were read as they were built (dynamic shapes: the workspace
    sums each level's mass in the same read), else a ``[levels]`` float64 device tensor read with the step's commit
    readback.
    shape: ``"tree"`` (the policy's own), ``"chain"`` (the draft's greedy chain that a cost-aware policy proposes
    instead of its tree, learned from apart), ``"fixed"`` (a fixed-shape tree, e.g. SAGE's first round) or
    ``"alone"`` (no draft: the root alone, the target's own step, where a cost-aware policy finds that drafting
    does not pay, every step of ``ar``, or the generation's last token: ``target_alone``).
    trial: the kind (tree or chain) was chosen as a trial, not as the preferred one (``costs.ProposalChoice``).
    """

    depth_bound: int
    draft_forwards: int
    alpha_root: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    level_mass: tuple[float, ...] | Tensor | None = None
    shape: str = "tree"
    trial: bool = False


class TreePolicy:
    """Base class. Subclasses define ``name``, ``capacity`` (tree slots incl. root), ``depth_bound``
    and ``build(ctx)``; stateful ones override ``reset`` and ``update``."""

    name: str = "policy"
    uses_draft: bool = True
    #: True: the engine hands every finished step's measured costs to ``observe_cost`` (one step late)
    learns_costs: bool = False
    def measures_level_mass(self, static_shapes: bool) -> bool:
        """True: this step's tree carries its draft probability mass per depth (``TreeProposal.level_mass``), a
        little device work and 8 bytes a depth in the step's readback, done only when something reads it."""
        return False

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    @property
    def depth_bound(self) -> int:
        raise NotImplementedError

    @property
    def topk(self) -> int:
        """Largest top-k the policy asks of the draft (must not exceed the vocabulary)."""
        return 1

    @property
    def forward_rows(self) -> int:
        """The most rows one forward feeds past a row's cache length: a tree's slots, or the pending tokens and the
        root of a step's first draft forward (the engine's cache room per forward; a captured draft's shapes)."""
        return max(self.capacity, self.depth_bound + 2)

    def reset(self) -> None:
        """Forget per-generation state (called at the start of every generate)."""

    def build(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        """This step's tree for one row, in ``ctx``'s workspace: a generator that yields the inputs of each draft
        forward, receives its logits ``[1, T, V]`` and returns the ``TreeProposal``."""
        raise NotImplementedError

    def for_row(self) -> "TreePolicy":
        """The policy of another row of a batch: the same arguments and shared constants (fixed layouts, learned
        costs), its own per-generation state (``reset`` gives it fresh containers)."""
        row = copy.copy(self)
        row.reset()
        return row

    def update(self, tau: int, alpha_root: float | None) -> None:
        """Host-side feedback after a step: accepted draft tokens and the root confidence measured."""

    def observe_cost(self, cost: StepCost) -> None:
        """A finished step's measured seconds and tree (policies with ``learns_costs``)."""

    def step_info(self, info: dict[str, Any], alpha_root: float | None) -> dict[str, Any]:
        """The step record's policy fields (alpha, depth_target, width_target, d_max), given the build-time
        ``info`` and the root alpha measured in that step. Called after the generation, for every step: it may
        use ``info`` only, not the policy's state (which has moved on)."""
        return info

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class AutoregressivePolicy(TreePolicy):
    """No speculation: the tree is the root alone, so every step is one ordinary target decode step."""

    name = "ar"
    uses_draft = False

    @property
    def capacity(self) -> int:
        return 1

    @property
    def depth_bound(self) -> int:
        return 0

    def build(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        return target_alone(ctx)
        yield  # a generator like every build (this one needs no draft forward)


def target_alone(ctx, **fields) -> TreeProposal:
    """The step's tree is the root alone: no draft forward, an ordinary decode step (the root is read straight from
    the engine's sequence buffer: no tree state is written). ``fields``: the proposal's other fields."""
    ctx.root_only()
    return TreeProposal(0, 0, shape="alone", **fields)


class StaticTreePolicy(TreePolicy):
    """A fixed tree given as paths of child ranks (default: the 25-node SpecVLM tree).

    Node ``[r1, ..., rd]`` gets the draft's ``rd``-th most likely token after node ``[r1, ..., r(d-1)]``.
    One draft forward per level, over the smallest slot range of the previous level that covers every node
    with children (exactly those nodes for the SpecVLM tree); all index maps are precomputed, and a level's
    tokens and log-probs are two ``index_select`` calls into the tree state. (Cumulative log-probs are not
    kept: nothing reads them for a fixed tree.)
    """

    name = "static"

    def __init__(self, paths: Sequence[Sequence[int]] = SPECVLM_TREE_PATHS):
        if not paths:
            raise ValueError("paths must hold at least one path")
        self.paths = [list(p) for p in paths]
        parents, ranks, depth = ops.build_static_tree(ops.paths_to_tensor(self.paths))
        self._parents, self._ranks, self._depth = parents, ranks, depth
        parents_l, depth_l, ranks_l = parents.tolist(), depth.tolist(), ranks.tolist()
        self._num_nodes = len(parents_l)
        self._max_depth = max(depth_l)
        self._topk = int(ranks.max()) + 1
        has_children = set(parents_l[1:])
        # Per level l >= 1: the children's slot range and the slot range fed to the draft to get them (the
        # smallest range of depth-(l-1) nodes covering every node with children; order is by depth, so
        # it is contiguous), and where each child's token sits in the fed rows' flattened top-k
        # (parent position inside the fed range * topk + rank).
        self._levels: list[tuple[int, int, int, int, list[int]]] = []
        for level in range(1, self._max_depth + 1):
            children = [i for i, d in enumerate(depth_l) if d == level]
            parents_fed = [i for i, d in enumerate(depth_l) if d == level - 1 and i in has_children]
            fed_start, fed_end = parents_fed[0], parents_fed[-1] + 1
            flat = [(parents_l[c] - fed_start) * self._topk + ranks_l[c] for c in children]
            self._levels.append((children[0], children[-1] + 1, fed_start, fed_end - fed_start, flat))
        # the draft processes the root, then every fed range in order: draft row r = slot _fed_slots[r]
        self._fed_slots = [0] + [slot for _, _, fed_start, fed_count, _ in self._levels[1:]
                                 for slot in range(fed_start, fed_start + fed_count)]
        self._device_cache: dict[tuple, dict[str, Any]] = {}
        # (node limit, depth limit) -> this tree cut to them (a batch's node budget, the tokens left to generate)
        self._trimmed: dict[tuple[int, int], StaticTreePolicy] = {}

    @property
    def capacity(self) -> int:
        return self._num_nodes

    @property
    def depth_bound(self) -> int:
        return self._max_depth

    @property
    def topk(self) -> int:
        return self._topk

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": self._num_nodes - 1, "depth": self._max_depth}

    def on_device(self, ctx) -> dict[str, Any]:
        """This tree on ``ctx``'s device and dtypes, made once per ``ctx.layout_key``: ``layout`` (its
        ``FixedLayout``) and ``levels``, per level l >= 1 ``(first slot, end slot, first fed slot, fed count, child
        index [children] on the device)``."""
        key = ctx.layout_key
        cached = self._device_cache.get(key)
        if cached is None:
            levels = [
                (start, end, fed_start, fed_count, torch.tensor(flat, dtype=torch.int64, device=ctx.device))
                for start, end, fed_start, fed_count, flat in self._levels
            ]
            cached = {"layout": ctx.fixed_layout(self._parents, self._fed_slots), "levels": levels}
            self._device_cache[key] = cached
        return cached

    def trimmed(self, node_limit: int, depth_limit: int | None = None) -> "StaticTreePolicy":
        """This tree cut to its nodes at most ``depth_limit`` deep (>= 1; None: all), then to ``node_limit`` nodes
        (root included): its shallowest paths, best ranks first (a prefix of that order always holds every kept
        node's parent)."""
        depth_limit = self._max_depth if depth_limit is None else depth_limit
        cut = self._trimmed.get((node_limit, depth_limit))
        if cut is None:
            ordered = sorted((path for path in self.paths if len(path) <= depth_limit),
                             key=lambda path: (len(path), path))
            cut = self._trimmed[node_limit, depth_limit] = StaticTreePolicy(ordered[: node_limit - 1])
        return cut

    def build(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        # a batch's node budget may leave this row fewer nodes than the tree's; the end of the generation fewer levels
        if ctx.node_limit < self._num_nodes or ctx.depth_limit < self._max_depth:
            cut = self.trimmed(min(ctx.node_limit, self._num_nodes), min(ctx.depth_limit, self._max_depth))
            return (yield from cut.build(ctx))
        ctx.start_tree(layout=self.on_device(ctx)["layout"])
        logits = yield ctx.root_inputs()
        levels, slots, alpha_root = yield from self.grow_fixed(ctx, logits, self._max_depth)
        ctx.use_slots(slots)
        return TreeProposal(self._max_depth, levels, alpha_root, shape="fixed")

    def grow_fixed(self, ctx, logits: Tensor, depth: int, root_k: int | None = None, cumulative: bool = False,
                   dynamic: bool = False, level_stops: "_C.LevelStops | None" = None
                   ) -> Generator[tuple, Tensor, tuple[int, int, Tensor | None]]:
        """Levels 1..``depth`` of this tree on its layout (the caller started the step on it, and the root forward
        gave ``logits``): per level one native call (``ctx.static_level``: the children from the fed rows' top-k,
        and the next level's feed), whose inputs are yielded for the next draft forward. ``root_k``: the top-k at
        level 1 (where the root's alpha is measured; default this tree's). ``cumulative``, ``dynamic`` and
        ``level_stops`` as ``static_level``'s: with ``dynamic`` the tree may stop early, a prefix of the layout.
        Returns (levels built, slots they end at, the root's alpha [1])."""
        levels = self.on_device(ctx)["levels"]
        alpha_root = None
        for index in range(depth):
            start, end, _, fed_count, child_index = levels[index]
            next_feed = None
            if index + 1 < depth:
                _, _, next_start, next_count, _ = levels[index + 1]
                next_feed = (next_start, next_count, index + 1)
            k = root_k if index == 0 and root_k is not None else self._topk
            alpha, inputs = ctx.static_level(logits, fed_count, child_index, start, k, index == 0, next_feed,
                                             cumulative, dynamic, level_stops)
            if index == 0:
                alpha_root = alpha
            if inputs is None:
                return index + 1, end, alpha_root
            logits = yield inputs
        return depth, levels[depth - 1][1], alpha_root


class ChainPolicy(StaticTreePolicy):
    """A chain of ``length`` greedy draft tokens (classic speculative decoding)."""

    name = "chain"

    def __init__(self, length: int = 5):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = length
        super().__init__([[0] * depth for depth in range(1, length + 1)])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "length": self.length}


class DynamicTreePolicy(TreePolicy):
    """EAGLE-2 dynamic tree.

    Level 1: the root's top ``topk`` children. Each further level: the ``topk`` best nodes of the previous
    level (by cumulative draft log-prob) are fed to the draft and each proposes its top ``topk`` children.
    After ``depth`` levels the ``num_nodes`` best nodes overall (ancestor-closed, ``rerank_tree``) form the tree.
    """

    name = "dynamic"

    def __init__(self, depth: int = 6, topk: int = 8, num_nodes: int = 64):
        if depth < 1 or topk < 1 or num_nodes < 1:
            raise ValueError("depth, topk and num_nodes must all be >= 1")
        self.depth, self._topk, self.num_nodes = depth, topk, num_nodes
        self._pool = 1 + topk + (depth - 1) * topk * topk
        if self._pool > ops.MAX_TREE_NODES:
            raise ValueError(f"1 + topk + (depth - 1) * topk^2 = {self._pool} exceeds {ops.MAX_TREE_NODES} nodes")
        if num_nodes + 1 > self._pool:
            raise ValueError(f"num_nodes={num_nodes} exceeds the {self._pool - 1} candidates the tree can hold")

    @property
    def capacity(self) -> int:
        return self._pool

    @property
    def depth_bound(self) -> int:
        return self.depth

    @property
    def topk(self) -> int:
        return self._topk

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "depth": self.depth, "topk": self._topk, "num_nodes": self.num_nodes}

    def build(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        k = self._topk
        ctx.start_tree()
        logits = yield ctx.root_inputs()
        # per level (one native call): the frontier's top-k, each frontier node's k children best-first into the
        # level's slots, and the next feed: the level's first k slots, its best nodes (expand_tree sorts them)
        frontier_start, frontier_count, next_slot = 0, 1, 1
        alpha_root = None
        depth = min(self.depth, ctx.depth_limit)  # (the tokens left to generate may want fewer levels)
        for level in range(1, depth + 1):
            num_slots = k if level == 1 else k * k
            next_feed = (next_slot, k, level) if level < depth else None
            alpha, inputs = ctx.topk_expand(logits, frontier_count, frontier_start, k, next_slot, num_slots,
                                            level == 1, next_feed)
            if level == 1:
                alpha_root = alpha
            frontier_start, frontier_count, next_slot = next_slot, k, next_slot + num_slots
            if inputs is not None:
                logits = yield inputs
        ctx.rerank(next_slot, min(self.num_nodes + 1, ctx.node_limit, next_slot))
        return TreeProposal(depth, depth, alpha_root)


class SagePolicy(TreePolicy):
    """SAGE: entropy-guided adaptive tree (arXiv 2602.00523), paper defaults.

    alpha = 1 - H(renormalized draft top-k) / log k. Depth ``D = d_min + alpha (d_max - d_min)``, level-1
    width ``W = w_min + (1 - alpha)(w_max - w_min)``, deeper widths ``round(W (0.5 + P_parent) / l)``, a
    node is kept only if its cumulative probability exceeds ``theta_scale * l / D``, at most ``n_max``
    draft nodes, best-first per level (``sage_tree`` + ``expand_tree``).

    lag=True (paper): the alpha measured at this step's root shapes the NEXT step's tree (known on the host
    when the step starts). lag=False (zero-lag): the root distribution of this step shapes this tree.
    History: the last ``history`` accepted lengths; mean < 2 → d_max -= 1 (not below d_min + 1), mean > 3 →
    d_max += 1 (at most ``d_max_cap``). The first step uses the static ``first_round_paths`` tree
    (None: start adaptive with ``alpha_init``).

    static_shapes: None → True on CUDA, False elsewhere. False: the per-level count of real nodes is read
    (free on CPU), so only real nodes are fed to the draft and the tree has no padding. True: level sizes
    are host-known bounds (from the host alpha when lag=True, else worst case), padding slots (parent -1)
    fill the rest, and nothing is read from the device mid-step.
    """

    name = "sage"

    def __init__(
        self,
        d_min: int = 3,
        d_max: int = 8,
        w_min: int = 2,
        w_max: int = 10,
        k: int = 10,
        n_max: int = 64,
        alpha_init: float = 0.5,
        theta_scale: float = 0.1,
        lag: bool = True,
        history: int = 10,
        d_max_cap: int = 12,
        first_round_paths: Sequence[Sequence[int]] | None = SPECVLM_TREE_PATHS,
        static_shapes: bool | None = None,
        history_low: float = 2.0,
        history_high: float = 3.0,
    ):
        if not 1 <= d_min <= d_max <= d_max_cap:
            raise ValueError(f"need 1 <= d_min <= d_max <= d_max_cap, got {d_min}, {d_max}, {d_max_cap}")
        if not 1 <= w_min <= w_max:
            raise ValueError(f"need 1 <= w_min <= w_max, got {w_min}, {w_max}")
        if not 1 <= k <= ops.MAX_TOPK:
            raise ValueError(f"k must be in [1, {ops.MAX_TOPK}], got {k}")
        if not 1 <= n_max < ops.MAX_TREE_NODES:
            raise ValueError(f"n_max must be in [1, {ops.MAX_TREE_NODES - 1}], got {n_max}")
        if not 0.0 <= alpha_init <= 1.0 or theta_scale <= 0 or history < 1:
            raise ValueError("alpha_init must be in [0, 1], theta_scale > 0, history >= 1")
        self.d_min, self.d_max_init, self.w_min, self.w_max = d_min, d_max, w_min, w_max
        self.k, self.n_max, self.alpha_init, self.theta_scale = k, n_max, alpha_init, theta_scale
        self.lag, self.history_len, self.d_max_cap = lag, history, d_max_cap
        self.history_low, self.history_high = history_low, history_high
        self.static_shapes = static_shapes
        self.first_round = StaticTreePolicy(first_round_paths) if first_round_paths else None
        if self.first_round is not None and self.first_round.capacity > 1 + n_max:
            raise ValueError("first_round_paths has more nodes than n_max")
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.d_max = self.d_max_init
        self.history: deque[int] = deque(maxlen=self.history_len)
        self.alpha_next: float | None = None  # measured at the last root (lag mode uses it)
        self._alpha_next_device: Tensor | None = None  # the same value as the device tensor it was read from
        self.rounds = 0

    def update(self, tau: int, alpha_root: float | None) -> None:
        self.rounds += 1
        if alpha_root is not None:
            self.alpha_next = alpha_root
        self.history.append(tau)
        mean = sum(self.history) / len(self.history)
        if mean < self.history_low:
            self.d_max = max(self.d_max - 1, self.d_min + 1)
        elif mean > self.history_high:
            self.d_max = min(self.d_max + 1, self.d_max_cap)

    def node_floor(self) -> float:
        """The least cumulative draft probability a node of the next tree needs besides SAGE's threshold (0: none)."""
        return 0.0

    def current_stops(self) -> "_C.LevelStops | None":
        """When the tree goes on past each level besides SAGE's own rules (its depth, thresholds and node budget),
        judged by the workspace at the level's draft probability mass (``_C.LevelStops``); None: SAGE's rules
        alone. Applies with dynamic shapes only (the level's count and mass are read)."""
        return None

    def level_theta(self, level: int, depth: float, floor: float) -> float:
        """The threshold scale of ``level`` that makes its threshold ``theta l / D`` equal ``max(theta_scale l / D,
        floor)`` at ``D = depth``: SAGE's rule with a floor, through the kernels' own threshold argument."""
        return self.theta_scale if floor <= 0.0 else max(self.theta_scale, floor * depth / level)

    @property
    def capacity(self) -> int:
        return 1 + self.n_max

    @property
    def depth_bound(self) -> int:
        bound = self.d_max_cap
        return max(bound, self.first_round.depth_bound) if self.first_round else bound

    @property
    def topk(self) -> int:
        return max(self.k, self.first_round.topk) if self.first_round else self.k

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "d_min": self.d_min, "d_max": self.d_max_init, "w_min": self.w_min,
            "w_max": self.w_max, "k": self.k, "n_max": self.n_max, "alpha_init": self.alpha_init,
            "theta_scale": self.theta_scale, "lag": self.lag, "history": self.history_len,
            "d_max_cap": self.d_max_cap, "static_shapes": self.static_shapes,
            "first_round": self.first_round.describe() if self.first_round else None,
        }

    # ------------------------------------------------------------------ shape formulas on the host
    def shape_of(self, alpha: float, d_max: int | None = None) -> tuple[float, float, int]:
        """``(D, W, round(D))`` for a host alpha with ``d_max`` (default: the current one): the kernels' own
        float32 formulas (``sage_ext._C.sage_shape``), so they agree with ``sage_tree`` bit for bit."""
        d_max = self.d_max if d_max is None else d_max
        return _C.sage_shape(alpha, self.d_min, d_max, self.w_min, self.w_max)  # csrc/core/formulas.h

    def static_level_slots(self, alpha: float | None, n_max: int | None = None, floor: float = 0.0) -> list[int]:
        """Host-known slot count of every level for static shapes.

        Level 1 holds at most ``clamp(round(W), 1, k)`` nodes; level l at most (slots of l-1) x
        ``clamp(round(1.5 W / l), 1, k)`` and at most ``D / (theta_scale l)`` (a level's nodes have cumulative
        probabilities > theta summing to <= 1). Level 1 gets its bound; each deeper level at most its fair
        share of the remaining budget (``ceil(remaining / levels left)``), so every level up to round(D) gets
        slots. Unknown alpha (zero-lag): the worst case over alpha. Expansion keeps the best candidates of a
        level when it has more than its slots. ``n_max``: the node budget (default the policy's); ``floor``: a
        node floor (``level_theta``).
        """
        if alpha is None:
            depth_limit, width, max_depth = float(self.d_max), float(self.w_max), self.d_max
        else:
            depth_limit, width, max_depth = self.shape_of(alpha)
        slots, remaining, previous = [], self.n_max if n_max is None else n_max, 1
        for level in range(1, max_depth + 1):
            # the kernels' width rule (csrc/core/formulas.h) at the largest parent probability, 1
            bound = previous * _C.sage_level_width(width, 0.0, level, self.k)
            bound = min(bound, int(depth_limit / (self.level_theta(level, depth_limit, floor) * level)) + 1)
            share = remaining if level == 1 else -(-remaining // (max_depth - level + 1))
            count = min(bound, share)
            if count <= 0:
                break
            slots.append(count)
            remaining -= count
            previous = count
        return slots

    # ------------------------------------------------------------------ one tree
    def opens_with_first_round(self) -> bool:
        """Whether this step is the static first round: the first step of a generation, when a first round is set
        (no root confidence has been measured yet to shape a tree)."""
        return self.rounds == 0 and self.first_round is not None

    def build(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        proposal = yield from self.propose(ctx)
        if proposal.alpha_root is not None:  # a drafted step measured its root: the next step reads it on the device
            self._alpha_next_device = proposal.alpha_root
        return proposal

    def propose(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        """The step's proposal (``build`` returns it, keeping its root alpha for the next step): the static first
        round, then SAGE's tree."""
        if self.opens_with_first_round():
            proposal = yield from self.first_round.build(ctx)
            proposal.info = {"d_max": self.d_max}
            return proposal
        static_shapes = ctx.static_default if self.static_shapes is None else self.static_shapes
        host_alpha = None
        if self.lag:
            host_alpha = self.alpha_next if self.alpha_next is not None else self.alpha_init
        # the step record's D(alpha) and W(alpha) are computed from this after the generation (step_info)
        info: dict[str, Any] = {"d_max": self.d_max, "alpha": host_alpha, "zero_lag": not self.lag}
        floor = self.node_floor()
        floor_depth = 0.0  # the depth D the floor's per-level thetas assume: the host alpha's (lag), else the last
        if floor > 0.0:    # root's (zero-lag)
            floor_depth = self.shape_of(host_alpha if host_alpha is not None else
                                        self.alpha_next if self.alpha_next is not None else self.alpha_init)[0]

        def shape(level: int) -> tuple:
            return (self.k, float(self.d_min), float(self.d_max), float(self.w_min), float(self.w_max),
                    self.level_theta(level, floor_depth, floor))

        ctx.start_tree()
        logits = yield ctx.root_inputs()
        if host_alpha is None:
            alpha = None  # zero-lag: level 1 is shaped by this root's own alpha, measured by the same op
        elif self.alpha_next is not None and self._alpha_next_device is not None:
            alpha = self._alpha_next_device  # last step's root alpha, still on the device: no upload
        else:
            alpha = ctx.full_f32(host_alpha)
        n_max = min(self.n_max, ctx.node_limit - 1)  # a batch's node budget may leave this row fewer
        slots = self.static_level_slots(host_alpha, n_max, floor) if static_shapes else None
        proposal = yield from self.grow_levels(ctx, logits, alpha, shape, n_max, slots, self.current_stops())
        proposal.info = info
        return proposal

    def grow_levels(self, ctx, logits: Tensor, alpha: Tensor | None, shape, n_max: int, slots: list[int] | None,
                    level_stops: "_C.LevelStops | None") -> Generator[tuple, Tensor, TreeProposal]:
        """The levels of a tree whose root forward gave ``logits``, one ``ctx.sage_level`` each (top-k, widths and
        threshold from ``shape(level)``, best-first expansion, the new slots' mask rows and, when the tree goes on,
        the inputs of the draft forward over them), at most ``n_max`` nodes. ``alpha``: the device alpha that shapes
        the levels (None: the root's own, measured by level 1). ``slots``: static shapes' host-known slots per level
        (None: dynamic shapes, each level's count read, free on the CPU, and ``level_stops`` may stop the tree)."""
        static_shapes = slots is not None
        if static_shapes:  # nothing is read mid-step: no level stop
            level_stops = None
        num_slots = slots[0] if static_shapes else n_max
        known_max_depth = len(slots) if static_shapes else -1
        count, frontier_alpha, _, inputs = ctx.sage_level(
            logits, alpha, 0, 1, 1, 1, num_slots, shape(1), 0, n_max, num_slots if static_shapes else -1,
            known_max_depth, level_stops)
        alpha_root = frontier_alpha[0]
        if alpha is None:
            alpha = alpha_root
        forwards, next_slot, used, level = 1, 1, 0, 1
        level_counts = []  # slots per level (levels are contiguous slot ranges from slot 1)
        while count > 0:
            level_counts.append(count)
            frontier_start, frontier_count, next_slot = next_slot, count, next_slot + count
            used += count
            level += 1
            # deeper than max_depth, the node budget spent, or deeper than the tokens left to generate
            if inputs is None or level > ctx.depth_limit:
                break
            logits = yield inputs
            forwards += 1
            num_slots = slots[level - 1] if static_shapes else n_max - used
            count, _, _, inputs = ctx.sage_level(
                logits, alpha, frontier_start, frontier_count, level, next_slot, num_slots, shape(level), used, n_max,
                num_slots if static_shapes else -1, known_max_depth, level_stops)
        ctx.use_slots(next_slot)
        measured = level_counts and self.measures_level_mass(static_shapes)
        level_mass = ctx.level_mass(level_counts, counts_read=not static_shapes) if measured else None
        return TreeProposal(level - 1, forwards, alpha_root, level_mass=level_mass)

    def step_info(self, info: dict[str, Any], alpha_root: float | None) -> dict[str, Any]:
        # zero-lag: this step's root alpha shaped the tree; lag: the host alpha it was built with; the first
        # (static) round: none
        if not info:  # a step the policy did not build (the generation's last token alone)
            return info
        alpha = alpha_root if info.get("zero_lag") else info.get("alpha")
        if alpha is None:
            return {"d_max": info["d_max"]}
        depth, width, _ = self.shape_of(alpha, info["d_max"])
        return {"d_max": info["d_max"], "alpha": alpha, "depth_target": depth, "width_target": width}


class CostAwareSagePolicy(SagePolicy):
    """SAGE whose depth follows measured costs: a depth cap on average and, with dynamic shapes, a stop per step
    (and, with ``width_from_cost``, a node threshold); or, in the steps where it pays more, the draft's greedy chain.

    The tree is SAGE's (depth and width from alpha, probability threshold, node budget); ``d_max`` moves
    differently: after every step it takes one step (at most) towards the depth cap with the most expected
    tokens per second, from a ``CostModel`` (seconds per draft forward, verify against tree size, the rest of a
    step) and a ``DepthAcceptance`` (how often each depth is accepted) learned from the engine's own
    measurements (``sage_ext.engine.costs``). A slow draft or a fast verify makes trees shallower, a draft that
    is accepted deep makes them deeper, on whatever machine it runs. Within a step (dynamic shapes: the CPU
    default, where each level's count is read anyway), the tree stops as soon as one more draft level is worth
    less than it costs at the probability mass the tree holds at its current depth (``current_stops``,
    ``costs.level_stops``: SpecDec++'s stop rule; how often a depth is accepted at a given mass is learned
    too, ``MassAcceptance``): a step whose draft loses confidence halfway stops there, a confident one goes on to the
    cap, which with this stop is at least as deep as a sure step pays for (``LevelStops.sure_depth``; the average
    optimum cut sure steps short). A generation after the costs are known starts from the learned root confidence,
    not from SAGE's static first round. With static shapes (CUDA) nothing is read mid-step and the cap alone
    applies, as in a batch (the shared draft forward runs while any row goes on: one row's stop would save none).
    ``width_from_cost``: the node threshold too: a node whose expected accepted tokens (``NodeAcceptance``: its
    cumulative draft probability, calibrated from every step's outcome) are worth less than the verify time it adds
    is not proposed, so a dear verify (a large batch, a slow target) narrows the trees. That least probability is a
    floor under SAGE's threshold at every level (``level_theta``), which stays the rule above it. Off by default: on
    the fixture pair on a CPU it measured within noise of the policy without it (benchmarks/README.md, "Batches").
    ``chains`` (on by default): each step proposes SAGE's tree or the draft's greedy chain, the chain where it gives
    more tokens per second than the tree beyond doubt (``costs.ProposalChoice``: the two compared by rounds of
    trials, every 16 to 128 steps a trial of each kind close together whatever the preference, each after a step of
    its own kind, so that neither is credited with the passages it happened to run in; the chain's rate must be
    above the tree's by more than a standard error of the difference). The chain is shaped like the tree: its length is the one with the most expected tokens per second
    from how deep chains are accepted (with the level stop, at least how deep a sure chain pays), and with dynamic
    shapes it stops at the level where one more stops paying (the level stop, learned from chain steps). A draft whose greedy token is right more often than its confidence
    says (SAGE then builds shallow, wide trees that drop the greedy path), or a sure draft whose long chains cost
    less than a tree's width brings, gets chains. One prompt at a time, like the level stop. ``alone`` (on by
    default, with ``chains``): the trials take in the target alone too, a step without any draft forward, and where
    it gives 1.2x what drafting gave over its recent steps the steps run it (at most ``max_alone_run`` in a
    row, then the draft catches up): a draft that is never right, or one as dear as the target, then costs about
    what plain decoding does (a contrary draft as large as the target: 0.45x of target-only decoding without it,
    0.9x with it).
    The estimates (``learned``) outlast ``reset``: they belong to the pair of models and the device, not to one
    generation; a generator given the policy by name shares them with every other such generator of the same
    models and device in the process (``costs.learning_for``). Arguments as ``SagePolicy`` plus
    ``width_from_cost``, ``chains`` and ``alone`` (``history``, ``history_low``, ``history_high`` are not used).
    """

    name = "sage_cost"
    learns_costs = True

    def __init__(self, *args, width_from_cost: bool = False, chains: bool = True, alone: bool = True, **kwargs):
        self.learned: CostLearning | None = None  # none yet: SagePolicy's constructor resets before it is known
        self.width_from_cost, self.chains, self.alone = width_from_cost, chains, alone
        super().__init__(*args, **kwargs)
        self.learned = self.fresh_learning()
        # the fixed layout every chain step is built on (a shorter chain is a prefix of it)
        self._longest_chain = ChainPolicy(min(self.d_max_cap, self.n_max))

    def fresh_learning(self) -> CostLearning:
        """Priors: no costs measured, the acceptance priors, the constructor's depth cap and alpha."""
        return CostLearning(CostModel(), DepthAcceptance(self.d_max_cap), self.d_max_init, self.alpha_init,
                            NodeAcceptance(self.d_max_cap), masses=MassAcceptance(),
                            proposals=ProposalChoice(min(self.d_max_cap, self.n_max),
                                                     max_alone_run=self.max_alone_run if self.alone else 0))

    @property
    def max_alone_run(self) -> int:
        """Steps of the target alone in a row at most: the draft's first forward after them feeds every token they
        committed (plus an accepted one it never processed and the root), as many rows as the engine makes room for
        in one forward (``forward_rows``: a captured draft's static shapes too). Longer runs make the catch-up
        rarer: a contrary draft as large as the target ran at 0.83x of target-only decoding with runs of 12, 0.9x
        with 63."""
        return self.forward_rows - 2

    def opens_with_first_round(self) -> bool:
        # a generation after the costs are known starts from the confidence learned on this pair (``reset``)
        return super().opens_with_first_round() and self.alpha_next is None

    def propose(self, ctx) -> Generator[tuple, Tensor, TreeProposal]:
        """SAGE's proposal, or the draft's greedy chain, or the target alone, as ``ProposalChoice`` decides."""
        if self.chains and not self.opens_with_first_round():
            length, trial = self.learned.proposals.next_length(min(self.d_max_cap, self.n_max, ctx.node_limit - 1))
            if length == ProposalChoice.ALONE:  # drafting does not pay here: the target's own step
                return target_alone(ctx, info={"d_max": self.d_max}, trial=trial)
            if trial and ctx.depth_limit < (length or self.d_max):
                # a trial cut short by the end of the generation (max_new_tokens) would price its kind by a step it
                # could not take: the step is an ordinary one and the trial waits for a step that can take it whole
                self.learned.proposals.defer_trial()
                trial = False
            proposal = yield from (self.build_chain(ctx, length) if length else super().propose(ctx))
            proposal.trial = trial
            return proposal
        return (yield from super().propose(ctx))

    def build_chain(self, ctx, length: int) -> Generator[tuple, Tensor, TreeProposal]:
        """The draft's greedy chain of at most ``length`` tokens, on the fixed layout of the longest chain
        (``ChainPolicy``'s: no mask work per level) and cut to the tokens left to generate; with dynamic shapes
        stopped at the level where one more stops paying (``ProposalChoice.chain_go_on``) or that reached a stop
        token, the chain then a prefix of the layout. The root's alpha is measured over SAGE's top-k, for the next
        tree."""
        static_shapes = ctx.static_default if self.static_shapes is None else self.static_shapes
        chain = self._longest_chain
        ctx.start_tree(layout=chain.on_device(ctx)["layout"])
        logits = yield ctx.root_inputs()
        measured, dynamic = self.measures_level_mass(static_shapes), not static_shapes
        levels, slots, alpha_root = yield from chain.grow_fixed(
            ctx, logits, min(length, ctx.depth_limit), root_k=self.k, cumulative=measured, dynamic=dynamic,
            level_stops=self.chain_stops() if dynamic else None)
        ctx.use_slots(slots)
        level_mass = ctx.level_mass([1] * levels, counts_read=dynamic) if measured else None
        return TreeProposal(levels, levels, alpha_root, info={"d_max": self.d_max, "chain": length},
                            level_mass=level_mass, shape="chain")

    def share_learning(self, learned: CostLearning) -> None:
        """Learn into (and start from) ``learned``: what other policies with these arguments learned about the
        same pair of models on the same device (``SpeculativeGenerator`` hands over the process's record)."""
        self.learned = learned
        self.d_max = learned.depth_goal

    @property
    def costs(self) -> CostModel:
        return self.learned.costs

    @property
    def acceptance(self) -> DepthAcceptance:
        return self.learned.acceptance

    @property
    def depth_goal(self) -> int:
        return self.learned.depth_goal

    def reset(self) -> None:
        super().reset()
        learned = self.learned
        if learned is not None:
            learned.proposals.new_generation()
            self.d_max = learned.depth_goal  # a new generation starts where the last one's costs pointed
            if learned.costs.estimated:
                # and from the root confidence recent steps measured, instead of SAGE's static first round (a
                # 25-node tree 5 deep that a sure draft outgrows: the first of a caption's 5-8 steps)
                self.alpha_next = learned.mean_alpha

    def update(self, tau: int, alpha_root: float | None) -> None:
        self.rounds += 1
        learned = self.learned
        if alpha_root is not None:
            self.alpha_next = alpha_root
            learned.mean_alpha += 0.2 * (alpha_root - learned.mean_alpha)
        if learned.costs.estimated:
            if self.d_max < learned.depth_goal:
                self.d_max += 1
            elif self.d_max > learned.depth_goal:
                self.d_max -= 1

    def measures_level_mass(self, static_shapes: bool) -> bool:
        # what the level stop learns from (dynamic shapes only: static shapes read nothing mid-step) and the cost
        # floor's calibration
        return self.width_from_cost or not static_shapes

    def node_floor(self) -> float:
        floor = self.learned.node_floor if self.learned is not None and self.width_from_cost else None
        return 0.0 if floor is None else floor

    def current_stops(self) -> "_C.LevelStops | None":
        return self.learned.go_on if self.learned is not None else None

    def chain_stops(self) -> "_C.LevelStops | None":
        """When a chain step goes on past each level (dynamic shapes): the chain's own level stop, learned from chain
        steps (``ProposalChoice.chain_go_on``); None: to its length."""
        return self.learned.proposals.chain_go_on

    def observe_cost(self, cost: StepCost) -> None:
        learned = self.learned
        if all(outcome.shape == "alone" for outcome in cost.outcomes):  # no draft: what the target alone costs
            if self.chains:  # (the choice is made again after trials and drafted steps: an ordinary step alone,
                # which changes no drafting rate, costs no more than plain decoding's bookkeeping)
                learned.proposals.observe_alone(cost.seconds)
                if any(outcome.trial for outcome in cost.outcomes):
                    learned.proposals.decide(learned.costs, cost.rows)
            return
        learned.costs.observe(cost)
        for outcome in cost.outcomes:
            if outcome.shape == "alone":  # a row's last token in a batch step: nothing drafted
                continue
            if outcome.shape == "chain":  # the draft's greedy chain: what it teaches is the chain's acceptance only
                learned.proposals.observe_chain(outcome.accepted, outcome.tree_depth, outcome.level_mass, outcome.trial)
                continue
            if outcome.shape == "tree":  # (not SAGE's fixed first round: the tree's rate is that of adaptive trees)
                learned.proposals.observe_tree(outcome.accepted, cost.draft_forwards, cost.verified_slots,
                                               outcome.trial)
            learned.acceptance.observe(outcome.accepted, outcome.tree_depth)
            learned.nodes.observe(outcome.accepted, outcome.level_mass)
            learned.masses.observe(outcome.accepted, outcome.level_mass)
        d_min, alpha = self.d_min, learned.mean_alpha

        def depth_of(cap: int) -> float:
            return d_min + alpha * (cap - d_min)

        learned.depth_goal = best_depth(learned.costs, learned.acceptance, d_min + 1, self.d_max_cap,
                                        depth_of=depth_of, rows=cost.rows)
        if learned.costs.estimated and learned.nodes.steps >= 1:
            depth = depth_of(learned.depth_goal)
            tokens = cost.rows * expected_tokens(learned.acceptance.probabilities(), depth)
            seconds_per_token = learned.costs.step_seconds(depth, cost.rows) / tokens
            if self.width_from_cost:  # (a record shared by policies made by name: their default, without it)
                # a node pays while calibration x p x (seconds per token) > one more verified token's seconds: that
                # least p is a floor under SAGE's threshold at every level
                learned.node_floor = node_threshold(learned.costs, seconds_per_token, learned.nodes.calibration()[0])
            # the level stop for one prompt only: in a batch the draft forward runs while any row goes on, so one
            # row's stop saves no forward and only costs its acceptance (measured: B = 4 lost a quarter of its
            # tokens/s with it); the cap alone shapes a batch's trees
            learned.go_on = level_stops(learned.costs, learned.acceptance, learned.masses,
                                        seconds_per_token) if cost.rows == 1 else None
            if learned.go_on is not None:
                # each step now stops where its own mass stops paying, so the cap need only let a sure step go as
                # deep as it pays: the depth cap best on average cuts the sure steps short (held-out LLaVA scenes:
                # 8-9 deep trees accepted whole in most steps)
                sure = learned.go_on.sure_depth(self.d_max_cap)
                learned.depth_goal = next((cap for cap in range(learned.depth_goal, self.d_max_cap + 1)
                                           if depth_of(cap) >= sure), self.d_max_cap)
        if self.chains:  # (the chain's length and stop follow too, when a chain step asks: ProposalChoice)
            learned.proposals.decide(learned.costs, cost.rows)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "name": self.name, "width_from_cost": self.width_from_cost, "chains": self.chains,
                "alone": self.alone,
                "costs": self.costs.describe(),
                "acceptance_by_depth": [round(p, 3) for p in self.acceptance.probabilities()],
                "node_calibration_by_depth": [round(c, 3) for c in self.learned.nodes.calibration()],
                "acceptance_by_mass": [round(a, 3) for a in self.learned.masses.curve()[1]],
                "node_floor": self.learned.node_floor, **self.learned.proposals.describe()}


# SagePolicy's parameters, width_from_cost, chains and alone, for introspection (the CLI's --policy-args check lists them)
_sage_signature = inspect.signature(SagePolicy.__init__)
CostAwareSagePolicy.__init__.__signature__ = _sage_signature.replace(parameters=[
    *_sage_signature.parameters.values(),
    inspect.Parameter("width_from_cost", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
    inspect.Parameter("chains", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool),
    inspect.Parameter("alone", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)])


#: The policy of SpeculativeGenerator, sage_ext.generate, custom_generate and the CLI when none is named: SAGE with
#: the depth cap that maximizes measured tokens per second; the fastest of every policy on the committed benchmarks
#: (benchmarks/README.md, "End-to-end benchmark"). The paper's fixed rules stay available as "sage".
DEFAULT_POLICY = "sage_cost"

POLICIES = {
    "ar": AutoregressivePolicy,
    "chain": ChainPolicy,
    "static": StaticTreePolicy,
    "dynamic": DynamicTreePolicy,
    "sage": SagePolicy,
    "sage_cost": CostAwareSagePolicy,
}


def make_policy(policy: str | TreePolicy) -> TreePolicy:
    """A policy object from a name (paper defaults) or the object itself."""
    if isinstance(policy, TreePolicy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)} or pass a TreePolicy object")
