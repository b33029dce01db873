"""The policies' handle on the engine's native workspace: ``DraftRound`` (``ctx``) and ``FixedLayout``.

A policy builds each step's tree of one prompt (a batch row) through that row's ``DraftRound``: the levels, the
inputs of the draft forwards between them, then which tree the target verifies. The tree itself and all tensor
work live in ``sage_ext._C.TreeWorkspace`` (csrc/session/tree_workspace.h), one per row; the engine runs the draft
forwards, one per level for every row of the batch together (``SpeculativeGenerator._draft_forward``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import _C, ops

if TYPE_CHECKING:
    from .loop import SpeculativeGenerator, _Row

#: A tree whose shape and feed schedule never change (static trees, chains): ``parents [N]``, ``node_row [1, N + 1]``
#: (the draft row of every slot the draft processes, -1 for the others), ``draft_block [1, R, R]`` (the additive
#: tree block of the step's R draft rows, draft dtype), ``depth [1, N]`` and ``target_block [N, N]`` (target dtype):
#: what ``tree_buffers`` would compute every step, made once (``DraftRound.fixed_layout``), held by the workspace.
FixedLayout = _C.FixedLayout


class DraftRound:
    """One row's per-generation tree state handed to its policy (``ctx``).

    The tree state and all the tensor work between two model forwards live in a native
    ``sage_ext._C.TreeWorkspace`` (``self.ws``, csrc/session/tree_workspace.h): on the CPU every separate
    small call right after a model forward pays again for the caches the forward evicted, so each gap is one
    native call. The workspace owns the step's tree: a policy starts it (``start_tree`` + ``root_inputs``), grows it
    level by level (``sage_level`` / ``static_level`` / ``topk_expand``, each with the inputs of the next draft
    forward, which the policy yields to the engine to get the logits back), no deeper than ``depth_limit`` and with
    at most ``node_limit`` nodes, and says which tree the target verifies (``use_slots``: the slots ``[0, N)``;
    ``rerank``: EAGLE-2's selection; ``root_only``: no draft). The engine then asks the workspace for the target's
    inputs and the commit; no tree tensor goes back to it from Python. Nothing here reads device values except
    SAGE's per-level counts with ``static_shapes=False`` (the CPU default).

    Python keeps the control flow, the model forwards and the time accounting: the engine books the whole tree
    build as ``tree_ops`` and the draft forwards as ``draft_decode``.
    """

    def __init__(self, engine: "SpeculativeGenerator", row: "_Row", capacity: int, max_cache_len: int,
                 device: torch.device, mask_dtype: torch.dtype | None, target_dtype: torch.dtype, static_default: bool,
                 row_table: Tensor | None = None):
        self.engine = engine
        self.row = row  # the prompt this round builds trees for (its sequence buffer, lengths)
        self.device = device
        self.static_default = static_default  # SAGE's static_shapes default (True on CUDA)
        self._mask_dtype = mask_dtype
        self._target_dtype = target_dtype
        chain_rows = engine.policy.depth_bound + 2  # the longest first forward: pending tokens + the root
        self.ws = _C.TreeWorkspace(capacity, max_cache_len, chain_rows, row.seq, mask_dtype, target_dtype,
                                   row_table)
        self._layout: FixedLayout | None = None  # this step's fixed layout (static trees), None = built per level
        # the most tree nodes (root included) this step's tree may have: the capacity, or the row's share of a
        # batch's node budget (the engine sets it before every build; policies cut their trees to it)
        self.node_limit = capacity
        # the deepest node worth proposing this step: a tree d deep emits at most d + 1 tokens, so with r tokens left
        # to max_new_tokens nodes deeper than r - 1 are never emitted (the engine sets it before every build; 0: the
        # step is the root alone, policies never see it)
        self.depth_limit = engine.policy.depth_bound
        self._level_index: dict[tuple[int, ...], Tensor] = {}  # level_mass's slot -> level maps, per level layout

    # ------------------------------------------------------------------ helpers for policies
    def full_f32(self, value: float) -> Tensor:
        return torch.full((1,), value, dtype=torch.float32, device=self.device)

    def start_tree(self, layout: FixedLayout | None = None) -> None:
        """Start this step's tree at the root, optionally on a ``FixedLayout`` (parents, node rows and mask blocks
        known in advance: no per-level mask work). ``root_inputs`` then writes the root and gives the inputs of the
        step's first draft forward."""
        self._layout = layout

    def fixed_layout(self, parents: Tensor, fed_slots: list[int]) -> FixedLayout:
        """A ``FixedLayout`` on this round's device and dtypes for the tree ``parents [N]`` (host) whose draft
        forwards process the slots ``fed_slots`` in that order (draft row r = ``fed_slots[r]``; the root first).
        Policies make it once per device and dtypes (``layout_key``)."""
        device = self.device
        # the tree's additive masks [N, N] in both dtypes, straight from tree_buffers (the ops' one mask rule)
        depth, *_, target_mask, _ = ops.tree_buffers(parents[None], 0, self._target_dtype)
        draft_mask = ops.tree_buffers(parents[None], 0, self._mask_dtype)[6][0, 0]
        rows = torch.tensor(fed_slots, dtype=torch.int64)
        node_row = torch.full((1, parents.shape[0] + 1), -1, dtype=torch.int64)
        node_row[0, rows] = torch.arange(len(fed_slots))
        return FixedLayout(parents.to(device), node_row.to(device), draft_mask[rows][:, rows][None].to(device),
                           depth.to(device), target_mask[0, 0].to(device))

    @property
    def layout_key(self) -> tuple:
        """What a ``FixedLayout`` depends on besides the tree: device and the two mask dtypes."""
        return self.device, self._mask_dtype, self._target_dtype

    # The levels below are what policies call between draft forwards, one native call each. Draft logits are
    # [1, T, V]; a level's frontier is their last rows (the step's first forward also returns the pending tokens').
    def sage_level(self, logits: Tensor, alpha: Tensor | None, frontier_start: int, frontier_count: int, level: int,
                   slot_start: int, num_slots: int, shape: tuple, used: int, n_max: int, known_count: int = -1,
                   known_max_depth: int = -1, level_stops: "_C.LevelStops | None" = None) -> tuple:
        """One SAGE level (``sage_level_``) on the last ``frontier_count`` rows of the draft logits (the frontier
        slots ``[frontier_start, ...)``), ``shape`` = ``(k, d_min, d_max, w_min, w_max, theta_scale)``; with the
        inputs of the next draft forward when the tree goes on (count > 0, level < max_depth, used + count <
        n_max and, given ``level_stops`` (``_C.LevelStops``), the next level is worth its cost at this level's draft
        probability mass). Counts come from the host when given (``known_*`` >= 0: static shapes), else are read
        (free on the CPU, a sync elsewhere; ``level_stops`` need them read, the mass comes with the same copy).
        Returns ``(count, frontier_alpha [1, F], max_depth, next forward inputs or None)``."""
        k, d_min, d_max, w_min, w_max, theta_scale = shape
        return self.ws.sage_level(logits, alpha, frontier_start, frontier_count, level, slot_start, num_slots, k,
                                  self.engine.draft_temperature, d_min, d_max, w_min, w_max, theta_scale, used, n_max,
                                  known_count, known_max_depth, level_stops)

    def static_level(self, logits: Tensor, frontier_count: int, child_index: Tensor, start: int, k: int,
                     want_alpha: bool, next_feed: tuple[int, int, int] | None, cumulative: bool = False,
                     dynamic: bool = False, level_stops: "_C.LevelStops | None" = None) -> tuple:
        """One level of a fixed tree (``gather_level_``): the top-``k`` of the last ``frontier_count`` draft-logit
        rows, the children's tokens and log-probs gathered into the slots from ``start`` (``child_index`` into the
        flattened top-k), then the inputs of the next feed ``(start, count, depth)`` if any (its depth is this
        level's). ``cumulative``: the slots' cumulative log-probs kept too (what ``level_mass`` sums). ``dynamic``
        (with ``cumulative``): the level's mass read (free on the CPU, a sync elsewhere) and kept for ``level_mass``,
        and the tree stopped as a dynamic SAGE level stops it (every node a stop token, or ``level_stops`` say the
        next level does not pay): no inputs then, and the tree is a prefix of its layout (``use_slots``). Returns
        ``(alpha [F] if want_alpha else None, inputs or None)``."""
        next_start, next_count, next_depth = next_feed if next_feed is not None else (0, 0, 0)
        return self.ws.static_level(logits, frontier_count, child_index, start, k, self.engine.draft_temperature,
                                    want_alpha, next_start, next_count, next_depth, cumulative, dynamic, level_stops)

    def topk_expand(self, logits: Tensor, frontier_count: int, frontier_start: int, k: int, slot_start: int,
                    num_slots: int, want_alpha: bool, next_feed: tuple[int, int, int] | None) -> tuple:
        """One EAGLE-2 level (``expand_level_``): the top-``k`` of the last ``frontier_count`` draft-logit rows (the
        frontier slots from ``frontier_start``), every frontier node allowed ``k`` children and no threshold,
        best-first into ``[slot_start, slot_start + num_slots)``; then the inputs of the next feed ``(start, count,
        depth)`` if any. Returns ``(alpha [F] if want_alpha else None, inputs or None)``."""
        next_start, next_count, next_depth = next_feed if next_feed is not None else (0, 0, 0)
        return self.ws.topk_expand(logits, frontier_count, frontier_start, k, self.engine.draft_temperature,
                                   slot_start, num_slots, want_alpha, next_start, next_count, next_depth)

    def level_mass(self, level_counts: list[int], counts_read: bool) -> tuple[float, ...] | Tensor:
        """The draft probability mass of each level of the tree built in the slots (level l holds the
        ``level_counts[l - 1]`` slots after the previous level's, from slot 1): the sum of its real nodes' cumulative
        draft probabilities (padding slots, parent -1, count 0). ``counts_read`` (dynamic shapes): the workspace
        summed each level's mass as ``sage_level`` read its count, host floats at no cost. Otherwise ``[levels]``
        float64 on the device, device work only: the engine reads it with the step's commit readback."""
        if counts_read:
            return tuple(self.ws.level_masses)
        end = 1 + sum(level_counts)
        ws = self.ws
        probabilities = torch.where(ws.parents[0, 1:end] >= 0, ws.cum_logprobs[0, 1:end].exp(), 0.0)
        key = tuple(level_counts)
        index = self._level_index.get(key)
        if index is None:
            flat = [level for level, count in enumerate(level_counts) for _ in range(count)]
            index = self._level_index[key] = torch.tensor(flat, dtype=torch.int64, device=self.device)
        mass = torch.zeros(len(level_counts), dtype=torch.float64, device=self.device)
        return mass.index_add_(0, index, probabilities.double())

    # ------------------------------------------------------------------ the tree the target verifies
    def use_slots(self, num_nodes: int) -> None:
        """The step's tree is the slots ``[0, num_nodes)`` as the levels wrote them (on a fixed layout: all its nodes
        or, where ``static_level`` stopped early, a prefix)."""
        self.ws.use_slots(num_nodes)

    def rerank(self, num_slots: int, num_select: int) -> None:
        """The step's tree is EAGLE-2's final global top-``num_select`` over the slots ``[0, num_slots)``
        (``rerank_select``)."""
        self.ws.rerank(num_slots, num_select)

    def root_only(self) -> None:
        """The step's tree is the root alone (no draft): one ordinary decode step."""
        self.ws.root_only(self.row.cur_len)

    # ------------------------------------------------------------------ draft forwards
    def root_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """The inputs of the step's first draft forward: the committed tokens the draft has not processed yet,
        then the root (written into slot 0 here). The policy yields them; the logits it gets back are
        ``[1, T, V_shared]``, the last row the root's."""
        row = self.row
        return self.ws.start(row.cur_len, row.draft_done, self._layout)
