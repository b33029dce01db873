"""The speculative decoding engine: one loop for every tree policy, batch size 1.

A step (see docs/ENGINE.md for the full story):
  1. The policy builds a draft tree. The root is the last committed token, which is in neither KV cache
     yet. The draft's first forward of the step feeds the committed tokens it has not processed plus the
     root; then one draft forward per level over the level's frontier, with the tree mask on top of its cache.
  2. The target verifies the whole tree in one forward (rows at cache positions ``past_len .. past_len+N-1``,
     rope positions ``sequence index + depth``), and ``verify_greedy`` / ``verify_sampling`` pick the
     accepted path and the bonus token (target's own next token).
  3. ``kv_compact_`` moves the accepted rows of both caches to contiguous positions; the new tokens are
     written to a device-side sequence buffer; ONE small int64 tensor (accepted length, draft-processed
     count, tree size, root alpha — each only when the host does not know it already — then the new
     tokens) is read to the host: the step's only sync.

Hot-path rules: the draft's masks and positions are views of buffers made once per generation (every mask
view starts at a 64-element aligned row), the only per-step tensor work is the ops and a few
gathers/copies, and the whole step runs under one ``torch.inference_mode``.
  4. Host: crop both caches, stop checks (EOS, stop strings, max_new_tokens), streamer, policy feedback.
     The bonus is the next step's root.

Models are used as loaded (any device / dtype / device_map); nothing in transformers is patched.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from . import ops
from .families import FamilyAdapter, causal_mask_4d, get_adapter
from .policies import TreePolicy, make_policy
from .stats import GenerationStats, StepRecord, Timeline

#: Target and draft vocabularies may differ by at most this many (padding) rows.
DEFAULT_MAX_VOCAB_PADDING = 256

# The registered overloads of the hot-path ops, resolved once (the sage_ext.ops wrappers of these are plain
# pass-throughs; calling the overload directly saves the per-call overload lookup).
_op_topk_confidence = torch.ops.sage_ext.topk_confidence.default
_op_sage_tree = torch.ops.sage_ext.sage_tree.default
_op_expand_tree = torch.ops.sage_ext.expand_tree.default
_op_tree_buffers = torch.ops.sage_ext.tree_buffers.default
_op_verify_greedy = torch.ops.sage_ext.verify_greedy.default
_op_kv_compact = torch.ops.sage_ext.kv_compact_.default


class GenerationOutput(NamedTuple):
    """``sequences``: LongTensor ``[1, prompt_len + new_tokens]`` (like HF ``generate``); ``stats``."""

    sequences: Tensor
    stats: GenerationStats


@dataclass
class StepDebug:
    """What a test hook sees after every step (caches already compacted and cropped)."""

    step: int
    sequence: list[int]  # committed tokens (prompt + generated)
    target_cache: Any
    draft_cache: Any
    draft_done: int  # sequence tokens the draft cache holds (pruned prompt positions count as held)
    tree_tokens: Tensor
    tree_parents: Tensor
    tree_logprobs: Tensor
    accepted: Tensor
    tau: int
    finished: bool
    draft_keep: Tensor | None  # prompt positions the draft saw (visual pruning), None = all


def _cache_layout(cache) -> list[tuple[torch.device, list[int]]]:
    """Which layers of a DynamicCache hold keys/values, grouped by device (kv_compact_ takes one device).

    Computed once per generation after the prefill: layers keep their device, while their tensors are new
    objects after every forward, so the tensors themselves are collected per step (``_cache_tensors``)."""
    groups: dict[torch.device, list[int]] = {}
    for index, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        groups.setdefault(keys.device, []).append(index)
    return list(groups.items())


def _cache_tensors(cache, layer_indices: list[int]) -> list[Tensor]:
    layers = cache.layers
    return [tensor for index in layer_indices for tensor in (layers[index].keys, layers[index].values)]


def _float_from_bits(bits: int) -> float:
    return _F32.unpack(_I32.pack(bits))[0]


_I32 = struct.Struct("<i")
_F32 = struct.Struct("<f")


def _aligned_width(columns: int) -> int:
    """Row length of a mask buffer: a multiple of 64 elements, so every row view starts at an aligned address
    (CUDA's memory-efficient attention requires an aligned bias pointer and row stride)."""
    return -(-columns // 64) * 64


class FixedLayout(NamedTuple):
    """A tree whose shape and feed schedule never change (static trees, chains), on one device and dtypes:
    ``parents [N]``, ``node_row [>= N + 1]`` (the draft row of every slot the draft processes, -1 terminated),
    ``draft_block [R, R]`` (the additive tree block of the step's R draft rows, draft dtype), ``depth [1, N]``
    and ``target_block [N, N]`` (the whole tree's additive block, target dtype): what ``tree_buffers`` would
    compute every step, made once."""

    parents: Tensor
    node_row: Tensor
    draft_block: Tensor
    depth: Tensor
    target_block: Tensor


class DraftRound:
    """Per-generation tree state and draft driver handed to the policies (``ctx``).

    Tree state lives in preallocated tensors of ``capacity`` slots: ``tokens, parents [1, cap]`` int64 and
    ``logprobs, cum_logprobs [1, cap]`` float32 (node 0 = root). ``node_row [cap + 1]``: the draft-cache row
    (relative to the root's row) of every node the draft processed this step, -1 otherwise; its last entry is
    -1, so indexing it with a parent of -1 (padding) gives -1 without a branch. While every draft forward
    of the step has fed the slot range that starts where the draft rows end (SAGE, chains, the first levels
    of the other trees), slot == row and ``node_row`` is a view of a precomputed table, so nothing is written
    per level; the first feed that breaks this writes the explicit map once.

    The draft's tree mask lives in ``mask [1, 1, cap + 1, W]`` (draft dtype, additive, rows 64-element
    aligned): row r is the mask of draft row r of this step's tree. Columns before ``base`` (the draft cache
    length at the root) are the past, all 0; the tree block sits at columns ``base .. base + cap`` (0 where row
    c is an ancestor-or-self). Every forward uses the view of its rows from column 0, so each view starts at
    an aligned address. Per step the previous block's columns are zeroed and the block's two fixed rows are
    written (row 0: the root, row cap: all-blocked, what a parent of -1, padding, indexes): two ops. A level's
    rows are one gather of their parents' rows with the node's own column opened, one ``torch.maximum``
    against a constant pattern (blocked, 0 on the diagonal). The step's first draft forward (pending tokens
    + root, a causal chain) uses a second buffer kept the same way. Positions are views of one device
    ``arange``. Nothing here reads device values.

    Time accounting: the engine books the whole tree build as ``tree_ops`` and ``_forward`` moves the draft
    forwards to ``draft_decode``, so policies need no clock of their own.
    """

    def __init__(self, engine: "SpeculativeGenerator", capacity: int, max_cache_len: int, device: torch.device,
                 mask_dtype: torch.dtype | None, target_dtype: torch.dtype, static_default: bool,
                 row_table: Tensor | None = None):
        self.engine = engine
        self.device = device
        self.capacity = capacity
        self.static_default = static_default
        self.arange = torch.arange(max(capacity, 2), device=device)
        #: ``[1, L]`` sequence index → itself, for position views (rope positions are sequence index based)
        self.positions = torch.arange(max_cache_len + capacity + 2, device=device)[None]
        self.tokens = torch.zeros(1, capacity, dtype=torch.int64, device=device)
        self.parents = torch.full((1, capacity), -1, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(1, capacity, dtype=torch.float32, device=device)
        self.cum_logprobs = torch.zeros(1, capacity, dtype=torch.float32, device=device)
        self._node_row = torch.full((capacity + 1,), -1, dtype=torch.int64, device=device)
        # row_table[r] = node_row while slot == row and r rows are fed: [0, 1, ..., r-1, -1, ..., -1]
        if row_table is None:
            index = torch.arange(capacity + 1, device=device)
            row_table = torch.where(index[None, :] < index[:, None], index[None, :], -1)
        self._row_table = row_table
        self._zero_f32 = torch.zeros(1, 1, dtype=torch.float32, device=device)
        self.arange2 = self.arange[None]  # [1, cap]: frontier slot ranges as one view
        self.rows_used = 0
        self._identity = True
        self.draft_base = 0  # draft cache length at the root row
        self.draft_len = 0  # draft cache length (host bookkeeping, no get_seq_length per step)
        self._layout_parents: Tensor | None = None  # fixed parents last copied by start_tree
        self.mask_dtype = mask_dtype
        self.target_dtype = target_dtype
        self._fixed: FixedLayout | None = None  # this step's fixed layout (static trees), None = built per level
        if mask_dtype is not None:
            blocked = torch.finfo(mask_dtype).min
            width = _aligned_width(max_cache_len + capacity + 1)
            self.mask = torch.zeros(1, 1, capacity + 1, width, dtype=mask_dtype, device=device)
            self._mask_strides = self.mask.stride()
            self._block_base = 0  # column of the tree block (zeros everywhere else)
            self._block = self.mask[0, 0, :, :capacity]
            # the block's fixed rows: 0 = the root (itself only), cap = all blocked (padding's parent)
            self._edge_rows = torch.tensor([0, capacity], dtype=torch.int64, device=device)
            self._edge_values = torch.full((2, capacity), blocked, dtype=mask_dtype, device=device)
            self._edge_values[0, 0] = 0
            self._self_columns = torch.full((capacity, capacity), blocked, dtype=mask_dtype,
                                            device=device).fill_diagonal_(0)
            # pending committed tokens + root: a causal chain of at most depth_bound + 2 rows
            chain = engine.policy.depth_bound + 2
            self._chain = torch.zeros(1, 1, chain, _aligned_width(max_cache_len + chain), dtype=mask_dtype,
                                      device=device)
            self._chain_base = 0
            self._chain_block = torch.full((chain, chain), blocked, dtype=mask_dtype, device=device).triu_(1)
        timeline = engine.timeline
        self._tree_region = timeline.region("tree_ops")
        self._draft_region = timeline.region("draft_decode")
        self._draft_other_device = engine.draft_device != device
        limit = engine.shared_vocab
        self._vocab_limit = limit if engine.draft is not None and engine.draft.vocab_size > limit else None
        self._token_clamp = engine.draft_token_clamp

    # ------------------------------------------------------------------ helpers for policies
    @property
    def node_row(self) -> Tensor:
        """``[cap + 1]`` draft-cache row of every slot the draft processed this step (relative to the root
        row), -1 for the others; the last entry is always -1."""
        if self._fixed is not None:
            return self._fixed.node_row
        return self._row_table[self.rows_used] if self._identity else self._node_row

    def full_f32(self, value: float) -> Tensor:
        return torch.full((1,), value, dtype=torch.float32, device=self.device)

    def zeros_f32(self, *shape: int) -> Tensor:
        return self._zero_f32 if shape == (1, 1) else self._zero_f32.expand(*shape)

    def read_int(self, tensor: Tensor) -> int:
        """Read a one-element device value on the host (free on CPU; a sync on accelerators)."""
        return int(tensor)

    def root_token(self) -> Tensor:
        """``[1, 1]`` view of the root (the last committed token) in the engine's sequence buffer."""
        engine = self.engine
        return engine.seq[:, engine.cur_len - 1 : engine.cur_len]

    def start_tree(self, layout: FixedLayout | None = None) -> None:
        """Reset the tree to the root (the last committed token); optionally on a ``FixedLayout`` (parents, node
        rows and mask blocks known in advance: no per-level mask work).

        Slot 0's parent and log-probs never change. The layout's ``parents`` copy is skipped when the same layout
        was the last one set and no ``expand`` has written the tree since."""
        self.tokens[0, :1].copy_(self.root_token()[0])
        if layout is not None and layout.parents is not self._layout_parents:
            self.parents[0, : layout.parents.shape[0]].copy_(layout.parents)
            self._layout_parents = layout.parents
        self._fixed = layout
        self.rows_used = 0
        self._identity = True

    def fixed_layout(self, parents: Tensor, fed_slots: list[int]) -> FixedLayout:
        """A ``FixedLayout`` on this round's device and dtypes for the tree ``parents [N]`` (host) whose draft
        forwards process the slots ``fed_slots`` in that order (draft row r = ``fed_slots[r]``; the root first).
        Policies make it once per device and dtypes (``layout_key``)."""
        device = self.device
        buffers = ops.tree_buffers(parents[None], 0)
        depth, tree_mask = buffers[0], buffers[6]
        opened = tree_mask[0, 0] == 0  # [N, N]: column c is an ancestor-or-self of row r
        rows = torch.tensor(fed_slots, dtype=torch.int64)
        node_row = torch.full((parents.shape[0] + 1,), -1, dtype=torch.int64)
        node_row[rows] = torch.arange(len(fed_slots))

        def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
            blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype)
            return blocked.masked_fill_(allowed, 0).to(device)

        return FixedLayout(parents.to(device), node_row.to(device), additive(opened[rows][:, rows], self.mask_dtype),
                           depth.to(device), additive(opened, self.target_dtype))

    @property
    def layout_key(self) -> tuple:
        """What a ``FixedLayout`` depends on besides the tree: device and the two mask dtypes."""
        return self.device, self.mask_dtype, self.target_dtype

    # The three tree ops below are what policies call between draft forwards.
    def topk(self, logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``topk_confidence`` of draft logits (at the sampling temperature when sampling)."""
        return _op_topk_confidence(logits, k, self.engine.draft_temperature)

    def shape(self, alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale):
        """``sage_tree`` for one level."""
        return _op_sage_tree(alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale)

    def expand(self, frontier, topk_logprobs, topk_ids, widths, min_cum_logprob, slot_start, num_slots) -> Tensor:
        """``expand_tree`` into the tree state; returns the count of real nodes written (device)."""
        self._layout_parents = None
        return _op_expand_tree(
            self.tokens, self.parents, self.logprobs, self.cum_logprobs, frontier, topk_logprobs,
            topk_ids, widths, min_cum_logprob, slot_start, num_slots,
        )

    # ------------------------------------------------------------------ draft forwards
    def _forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """One draft forward, booked as ``draft_decode`` (the caller is inside the engine's tree_ops region)."""
        engine = self.engine
        if self._token_clamp is not None:
            tokens = tokens.clamp_max(self._token_clamp)
        if self._draft_other_device:  # draft on another device than the target's inputs
            device = engine.draft_device
            tokens, positions, mask = tokens.to(device), positions.to(device), mask.to(device)
        self._tree_region.__exit__()
        self._draft_region.__enter__()
        logits = engine.draft.forward_tree(tokens, positions, mask, engine.draft_cache)
        self._draft_region.__exit__()
        self._tree_region.__enter__()
        if self._draft_other_device:
            logits = logits.to(self.device)
        return logits if self._vocab_limit is None else logits[..., : self._vocab_limit]

    def root_logits(self) -> Tensor:
        """The step's first draft forward: the committed tokens the draft has not processed yet, then the
        root. Returns the draft's logits after the root ``[1, V_shared]``."""
        engine = self.engine
        start, end = engine.draft_done, engine.cur_len
        rows = end - start  # pending tokens + the root
        cache_len = self.draft_len
        base = cache_len + rows - 1
        cap = self.capacity
        # move the tree block to the new base: clear the old one, write the root row and the padding row (a
        # fixed layout: all the step's rows)
        self.mask[0, 0, :, self._block_base : self._block_base + cap].zero_()
        self._block = block = self.mask[0, 0, :, base : base + cap]
        fixed = self._fixed
        if fixed is None:
            block.index_copy_(0, self._edge_rows, self._edge_values)
        else:  # every row of the step at once
            size = fixed.draft_block.shape[0]
            block[:size, :size].copy_(fixed.draft_block)
        self._block_base = base
        if rows == 1:
            mask = self.mask.as_strided((1, 1, 1, base + 1), self._mask_strides, 0)
        elif rows <= self._chain_block.shape[0]:
            chain = self._chain
            chain[0, 0, :, self._chain_base : self._chain_base + self._chain_block.shape[0]].zero_()
            chain[0, 0, :, cache_len : cache_len + self._chain_block.shape[0]] = self._chain_block
            self._chain_base = cache_len
            mask = chain[:, :, :rows, : cache_len + rows]
        else:
            mask = causal_mask_4d(rows, cache_len, self.mask.dtype, self.device)
        logits = self._forward(engine.seq[:, start:end], self.positions[:, start:end], mask)
        self.draft_base = base
        self.draft_len = cache_len + rows
        self.rows_used = 1
        return logits[0, -1:]

    def feed(self, start: int, count: int, depth: int) -> Tensor:
        """One draft forward over the tree slots ``[start, start + count)``, all at tree depth ``depth``
        (padding slots included; they attend to the past and themselves only). Returns their logits
        ``[count, V_shared]``; their keys/values become the next ``count`` draft-cache rows."""
        engine = self.engine
        first, last = self.rows_used, self.rows_used + count
        if last > self.capacity:
            raise RuntimeError("draft tree exceeds the preallocated capacity")
        if self._fixed is None:  # (a fixed layout's rows were all written with the block in root_logits)
            if self._identity and start == first:
                parent_rows = self.parents[0, start : start + count]  # slot == row for every fed node so far
            else:
                if self._identity:  # first feed where slots and rows part: write the map once
                    self._identity = False
                    self._node_row.copy_(self._row_table[first])
                self._node_row[start : start + count].copy_(self.arange[first:last])
                parent_rows = self._node_row[self.parents[0, start : start + count]]
            # a row = its parent's row (a parent of -1, padding, picks the all-blocked last row) with its own
            # column opened: max(parent row, [blocked except 0 on the diagonal]) in one op, into the block
            block = self._block
            torch.maximum(block[parent_rows], self._self_columns[first:last], out=block[first:last])
        # views made with as_strided (one call instead of a multi-axis slice: this runs once per level):
        # mask rows [first, last), columns [0, base + last); every position cur_len - 1 + depth
        mask = self.mask.as_strided((1, 1, count, self.draft_base + last), self._mask_strides,
                                    first * self._mask_strides[2])
        positions = self.positions.as_strided((1, count), (0, 0), engine.cur_len - 1 + depth)
        logits = self._forward(self.tokens[:, start : start + count], positions, mask)
        self.rows_used = last
        self.draft_len += count
        return logits[0]


class _TargetMasks:
    """The target's additive masks without ``tree_buffers``, as views of one persistent buffer (rows 64-element
    aligned, like the draft's): a root-only tree (``ar``) takes a view of zeros; a fixed layout's precomputed
    ``[N, N]`` block is written at columns ``past_len ..`` after the previous block is zeroed (the past stays all
    zeros). The buffer grows to the layout's size at its first use."""

    def __init__(self, max_columns: int, dtype: torch.dtype, device: torch.device):
        self.width, self.dtype, self.device = _aligned_width(max_columns), dtype, device
        self.buffer = torch.zeros(1, 1, 1, self.width, dtype=dtype, device=device)
        self.block_at = self.block_size = 0  # where the last block was written

    def root(self, past_len: int) -> Tensor:
        return self.buffer[:, :, :1, : past_len + 1]

    def fixed(self, block: Tensor, past_len: int) -> Tensor:
        size = block.shape[0]
        if self.buffer.shape[2] < size:  # once per generation
            self.buffer = torch.zeros(1, 1, size, self.width, dtype=self.dtype, device=self.device)
            self.block_size = 0
        rows = self.buffer[0, 0]
        rows[: self.block_size, self.block_at : self.block_at + self.block_size].zero_()
        rows[:size, past_len : past_len + size].copy_(block)
        self.block_at, self.block_size = past_len, size
        return self.buffer.as_strided((1, 1, size, past_len + size), self.buffer.stride(), 0)


class SpeculativeGenerator:
    """Lossless speculative decoding of ``target`` with ``draft`` proposals shaped by a tree policy.

    ``policy``: ``"ar"``, ``"chain"``, ``"static"``, ``"dynamic"``, ``"sage"`` or a ``TreePolicy`` object.
    ``draft_prune_ratio``: share of the image/video tokens the draft does NOT see (SpecVLM/SAGE draft-side
    visual pruning scored by the target's prefill attention; 0 = the draft sees everything).
    ``max_vocab_padding``: how many padding rows the two vocabularies may differ by.
    Batch size 1 only. Target and draft must be the same family, share EOS ids and special tokens, and
    use an attention implementation that takes additive 4-D masks ("sdpa" or "eager").
    """

    def __init__(
        self,
        target: torch.nn.Module,
        draft: torch.nn.Module | None,
        policy: str | TreePolicy = "sage",
        *,
        draft_prune_ratio: float = 0.0,
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ):
        self.policy = make_policy(policy)
        self.target = get_adapter(target)
        self.target.check_supported()
        if draft is None and self.policy.uses_draft:
            raise ValueError(f"policy {self.policy.name!r} needs a draft model")
        self.draft: FamilyAdapter | None = None
        if draft is not None:
            self.draft = get_adapter(draft)
            self.draft.check_supported()
            self._check_pair(max_vocab_padding)
        if not 0.0 <= draft_prune_ratio <= 1.0:
            raise ValueError(f"draft_prune_ratio must be in [0, 1], got {draft_prune_ratio}")
        self.draft_prune_ratio = draft_prune_ratio
        vocab_t = self.target.vocab_size
        vocab_d = self.draft.vocab_size if self.draft is not None else vocab_t
        self.shared_vocab = min(vocab_t, vocab_d)
        self.draft_token_clamp = vocab_d - 1 if vocab_t > vocab_d else None
        if self.policy.uses_draft and self.policy.topk > self.shared_vocab:
            raise ValueError(f"policy top-k {self.policy.topk} exceeds the vocabulary ({self.shared_vocab})")
        #: test hook: called with a StepDebug after every step
        self.step_hook: Callable[[StepDebug], None] | None = None
        #: host clock of the time statistics off CUDA (e.g. ``time.thread_time`` on a shared machine)
        self.host_clock: Callable[[], float] = time.perf_counter
        self._row_tables: dict[tuple[torch.device, int], Tensor] = {}  # DraftRound's slot == row tables

    # ------------------------------------------------------------------ checks
    def _check_pair(self, max_vocab_padding: int) -> None:
        target, draft = self.target, self.draft
        if type(target) is not type(draft):
            raise ValueError(
                f"target ({type(target.model).__name__}) and draft ({type(draft.model).__name__}) must be the "
                f"same model family"
            )
        vocab_t, vocab_d = target.vocab_size, draft.vocab_size
        if vocab_t != vocab_d:
            shared = min(vocab_t, vocab_d)
            # ids beyond both vocabularies are unused config defaults, not tokens
            special = {i for i in target.special_token_ids() + draft.special_token_ids() if i < max(vocab_t, vocab_d)}
            if abs(vocab_t - vocab_d) > max_vocab_padding or any(i >= shared for i in special):
                raise ValueError(
                    f"target and draft vocabularies differ (target {vocab_t}, draft {vocab_d} logits); only padding "
                    f"rows may differ (at most {max_vocab_padding}, with every special token id < {shared}). "
                    f"Use a draft with the target's tokenizer."
                )
        eos_t, eos_d = set(target.eos_token_ids()), set(draft.eos_token_ids())
        if eos_t and eos_d and eos_t != eos_d:
            raise ValueError(f"target and draft disagree on EOS token ids ({sorted(eos_t)} vs {sorted(eos_d)})")

    # ------------------------------------------------------------------ sampling helpers
    def _warpers(self, temperature: float, top_k: int | None, top_p: float | None) -> list:
        """HF-equivalent logits warpers (same classes and order as ``generate``), applied in float32."""
        config = getattr(self.target.model, "generation_config", None)
        if top_k is None:
            top_k = getattr(config, "top_k", None)
            top_k = 50 if top_k is None else top_k  # HF's default
        if top_p is None:
            top_p = getattr(config, "top_p", None)
            top_p = 1.0 if top_p is None else top_p
        warpers: list = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p))
        return warpers

    def _target_probs(self, logits: Tensor) -> Tensor:
        scores = logits.float()
        for warper in self._active_warpers:
            scores = warper(None, scores)
        return torch.softmax(scores, dim=-1)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
        streamer=None,
        generator: torch.Generator | None = None,
        **inputs: Any,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after the prompt.

        ``input_ids`` and every other processor output (``attention_mask``, ``pixel_values``,
        ``image_grid_thw``, ...) are passed as keyword arguments. Greedy output equals
        ``target.generate(do_sample=False)`` in float32 (in bf16/fp16 the tree forward can round a near-tie
        differently from one-token decoding: docs/ENGINE.md, Precision); with ``do_sample`` the output is
        distributed exactly like the target's sampling with the same ``temperature`` / ``top_k`` / ``top_p``
        (None → the target's generation_config, then HF's defaults: top_k 50, top_p 1.0; 0 disables top-k).
        ``eos_token_id`` (int or list; default: the target's generation_config), ``stop_strings`` (needs
        ``tokenizer``; same rule as HF's StopStringCriteria), ``streamer`` (``put``/``end``, receives the
        prompt first, then the tokens of every step), ``generator`` (torch.Generator for sampling).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"sage_ext speculative decoding supports batch size 1 only; got input_ids of shape "
                f"{tuple(input_ids.shape)}. Run prompts one at a time."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask has padded positions; pass the unpadded prompt (batch size 1)")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer (pass tokenizer=...)")
        for adapter in (self.target, self.draft if self.policy.uses_draft else None):
            window = adapter.sliding_window() if adapter is not None else None
            if window is not None and input_ids.shape[1] + max_new_tokens + self.policy.capacity > window:
                raise ValueError(
                    f"{type(adapter.model).__name__} uses sliding-window attention (window {window}); tree "
                    f"attention here supports sequences up to the window only (prompt {input_ids.shape[1]} + "
                    f"{max_new_tokens} new tokens + a {self.policy.capacity}-node tree)"
                )
        with torch.inference_mode():
            return self._generate(
                input_ids, inputs, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                stop_strings, tokenizer, streamer, generator,
            )

    def _generate(self, input_ids, inputs, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                  stop_strings, tokenizer, streamer, generator) -> GenerationOutput:
        wall_start = time.perf_counter()
        policy = self.policy
        policy.reset()
        # devices and dtypes as the models are now (looked up once: HF's accessors are slow)
        self.device = device = self.target.input_device
        target_dtype = self.target.dtype
        self.draft_device = self.draft.input_device if policy.uses_draft else device
        use_draft = policy.uses_draft
        self.timeline = timeline = Timeline(device, clock=self.host_clock)
        stats = GenerationStats(policy=policy.name, prompt_len=input_ids.shape[1])
        self.do_sample = do_sample
        self.draft_temperature = temperature if do_sample else 1.0
        self._active_warpers = self._warpers(temperature, top_k, top_p) if do_sample else []

        eos = eos_token_id if eos_token_id is not None else self.target.eos_token_ids()
        eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}
        stop_criteria = None
        if stop_strings:
            stop_criteria = StopStringCriteria(tokenizer, stop_strings)

        prompt_len = input_ids.shape[1]
        depth_bound = policy.depth_bound
        max_len = prompt_len + max_new_tokens + depth_bound + 2  # sequence buffer; bounds every cache length
        self.seq = torch.zeros(1, max_len, dtype=torch.int64, device=device)
        self.seq[0, :prompt_len] = input_ids[0].to(device)
        # processor outputs go where the models' embeddings are (accelerate hooks move them further)
        inputs = {key: value.to(device) if isinstance(value, Tensor) else value
                  for key, value in {"input_ids": input_ids, **inputs}.items()}
        draft_inputs = inputs
        if use_draft and self.draft_device != device:
            draft_inputs = {key: value.to(self.draft_device) if isinstance(value, Tensor) else value
                            for key, value in inputs.items()}

        # ---------------------------------------------------------- prefill
        self.target_cache = DynamicCache()
        self.draft_cache = DynamicCache() if use_draft else None
        keep = None
        if use_draft and self.draft_prune_ratio > 0:
            from .pruning import VisualAttentionScorer, default_query_mask, select_visual_tokens

            visual = self.target.visual_token_mask(inputs)
            if visual is not None and bool(visual.any()):
                queries = default_query_mask(visual, inputs.get("attention_mask"))
                with timeline.region("target_prefill"):
                    with VisualAttentionScorer(self.target.model, queries, inputs.get("attention_mask")) as scorer:
                        target_prefill = self.target.prefill(inputs, self.target_cache)
                    keep = select_visual_tokens(scorer.scores, visual, self.draft_prune_ratio)
                    keep[:, -1] = True
        if keep is None:
            with timeline.region("target_prefill"):
                target_prefill = self.target.prefill(inputs, self.target_cache)
        if use_draft:
            with timeline.region("draft_prefill"):
                self.draft.prefill(draft_inputs, self.draft_cache,
                                   keep=None if keep is None else keep.to(self.draft_device))
        with timeline.region("tree_ops"):
            first_logits = target_prefill.logits_last.to(device)
            if do_sample:
                first = torch.multinomial(self._target_probs(first_logits), 1, generator=generator).reshape(())
            else:
                first = first_logits.argmax(dim=-1).reshape(())
            self.seq[0, prompt_len] = first
        first_token = int(first)  # the prefill's one host read
        self.cur_len = prompt_len + 1
        self.draft_done = prompt_len
        n_generated = 1
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(torch.tensor([first_token]))
        sequence_host = input_ids[0].tolist() + [first_token]
        stop_reason = self._stop_reason(first_token, sequence_host, eos_ids, stop_criteria)
        if stop_reason is None and max_new_tokens == 1:
            stop_reason = "max_new_tokens"

        capacity = policy.capacity
        row_table = self._row_tables.get((device, capacity))
        ctx = DraftRound(
            self, capacity, max_len, device, self.draft.dtype if use_draft else None, target_dtype,
            static_default=device.type == "cuda", row_table=row_table,
        )
        self._row_tables[(device, capacity)] = ctx._row_table
        if use_draft:
            ctx.draft_len = self.draft_cache.get_seq_length()
        target_groups = _cache_layout(self.target_cache)
        draft_groups = _cache_layout(self.draft_cache) if use_draft else []
        target_masks = _TargetMasks(max_len + capacity, target_dtype, device)
        positions_all = ctx.positions
        seq = self.seq
        verify_sampling = self._verify_sampling
        tree_enter, tree_exit = ctx._tree_region.__enter__, ctx._tree_region.__exit__
        target_region = timeline.region("target_verify")
        target_enter, target_exit = target_region.__enter__, target_region.__exit__
        step_begin, step_end = timeline.step_begin, timeline.step_end
        step = 0
        # ---------------------------------------------------------- steps
        while stop_reason is None:
            step_begin()
            tree_enter()
            cur_len = self.cur_len
            target_len = cur_len - 1  # the root is not in the target cache
            proposal = policy.build(ctx)
            tokens, parents = proposal.tokens, proposal.parents
            num_nodes = tokens.shape[1]
            if num_nodes == 1:
                positions = positions_all[:, target_len : target_len + 1]
                mask = target_masks.root(target_len)
            elif proposal.layout is not None:
                positions = torch.add(proposal.layout.depth, target_len)
                mask = target_masks.fixed(proposal.layout.target_block, target_len)
            else:
                buffers = _op_tree_buffers(parents, target_len, target_dtype)
                positions, mask = buffers[1], buffers[6]
            tree_exit()
            target_enter()
            logits = self.target.forward_tree(tokens, positions, mask, self.target_cache)
            target_exit()
            tree_enter()
            if logits.device != device:  # lm_head on another device (device_map)
                logits = logits.to(device)
            if do_sample:
                probs = self._target_probs(logits[0])[None]
                accepted, accept_len, bonus = verify_sampling(tokens, parents, probs, generator)
            else:
                accepted, accept_len, bonus = _op_verify_greedy(tokens, parents, logits)
            # What the host reads, in order: [tau][draft-processed][real nodes][alpha bits] new tokens...
            # (each header entry only when the host does not know it already)
            parts = []
            fed_depth = proposal.fed_depth
            read_processed = use_draft and fed_depth is None and num_nodes > 1
            if num_nodes == 1:  # the root alone: tau = 0, nothing to compact, the bonus is the new token
                seq[0, cur_len : cur_len + 1] = bonus
                new_tokens = bonus
            else:
                parts.append(accept_len)
                # new tokens into the sequence buffer: the accepted path (entries past tau are junk that the
                # next step overwrites), then the bonus at cur_len + tau
                block = min(proposal.depth_bound, num_nodes - 1) + 1
                # (take wraps the -1 padding of accepted like indexing does; it is 3x cheaper than tensor[index] = ...)
                torch.take(tokens[0], accepted[0, 1:block], out=seq[0, cur_len : cur_len + block - 1])
                seq[0, cur_len:].index_copy_(0, accept_len, bonus)
                new_tokens = seq[0, cur_len : cur_len + block]
                for dev, layer_indices in target_groups:
                    _op_kv_compact(_cache_tensors(self.target_cache, layer_indices),
                                   accepted if dev == device else accepted.to(dev), target_len)
                if use_draft:
                    # draft rows of the accepted nodes the draft processed (a prefix of the path)
                    draft_rows = proposal.node_row[accepted]
                    for dev, layer_indices in draft_groups:
                        _op_kv_compact(_cache_tensors(self.draft_cache, layer_indices),
                                       draft_rows if dev == device else draft_rows.to(dev), ctx.draft_base)
                    if read_processed:
                        parts.append((draft_rows >= 0).sum().view(1))
            if proposal.num_real is None:
                parts.append((parents[0, 1:] >= 0).sum().view(1))
            alpha_root = proposal.alpha_root
            if alpha_root is not None:
                parts.append(alpha_root.view(torch.int32))  # float bits; cat promotes them to int64 exactly
            if parts:
                parts.append(new_tokens)
                packed = torch.cat(parts)
            else:
                packed = new_tokens
            tree_exit()
            values = packed.tolist()  # the step's one host sync

            # host bookkeeping
            index = 0
            tau = 0
            if num_nodes > 1:
                tau = values[0]
                index = 1
            if read_processed:
                processed_n = values[index]
                index += 1
            elif fed_depth is not None:
                processed_n = min(tau + 1, fed_depth)
            else:
                processed_n = min(ctx.rows_used, 1)  # the root alone: fed or not
            if proposal.num_real is None:
                real_n = values[index]
                index += 1
            else:
                real_n = proposal.num_real
            alpha_measured = None
            if alpha_root is not None:
                alpha_measured = _float_from_bits(values[index])
                index += 1
            new_host = values[index : index + tau + 1]

            excess = num_nodes - tau - 1  # the target cache holds target_len + num_nodes rows
            if excess > 0:
                self.target_cache.crop(-excess)
            if use_draft:
                kept = ctx.draft_base + processed_n
                if ctx.draft_len > kept:
                    self.draft_cache.crop(kept - ctx.draft_len)
                    ctx.draft_len = kept
                self.draft_done = target_len + processed_n
            remaining = max_new_tokens - n_generated
            emitted = new_host if len(new_host) <= remaining else new_host[:remaining]
            if stop_criteria is None:
                if not eos_ids.isdisjoint(emitted):
                    for position, token in enumerate(emitted):
                        if token in eos_ids:
                            emitted = emitted[: position + 1]
                            stop_reason = "eos"
                            break
                sequence_host.extend(emitted)
            else:
                accepted_host = []
                for token in emitted:
                    accepted_host.append(token)
                    sequence_host.append(token)
                    stop_reason = self._stop_reason(token, sequence_host, eos_ids, stop_criteria)
                    if stop_reason is not None:
                        break
                emitted = accepted_host
            n_generated += len(emitted)
            self.cur_len = cur_len + len(emitted)
            if stop_reason is None and n_generated >= max_new_tokens:
                stop_reason = "max_new_tokens"
            if streamer is not None and emitted:
                streamer.put(torch.tensor(emitted))
            info = policy.step_info(proposal.info, alpha_measured)
            stats.steps.append(StepRecord(
                tau=tau, emitted=len(emitted), tree_size=real_n, tree_slots=num_nodes - 1,
                tree_depth=proposal.depth_bound, draft_forwards=proposal.draft_forwards,
                alpha=info.get("alpha"), alpha_measured=alpha_measured, depth_target=info.get("depth_target"),
                width_target=info.get("width_target"), d_max=info.get("d_max"),
            ))
            policy.update(tau, alpha_measured)
            step += 1
            if self.step_hook is not None:
                self.step_hook(StepDebug(
                    step=step, sequence=list(sequence_host), target_cache=self.target_cache,
                    draft_cache=self.draft_cache, draft_done=self.draft_done, tree_tokens=tokens,
                    tree_parents=parents, tree_logprobs=proposal.logprobs,
                    accepted=accepted, tau=tau, finished=stop_reason is not None, draft_keep=keep,
                ))
            step_end()

        if streamer is not None:
            streamer.end()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.wall_time = time.perf_counter() - wall_start
        timeline.finish(stats)
        stats.new_tokens = n_generated
        stats.stop_reason = stop_reason
        sequences = self.seq[:, : self.cur_len].clone().to(input_ids.device)
        return GenerationOutput(sequences, stats)

    def _verify_sampling(self, tokens: Tensor, parents: Tensor, probs: Tensor, generator) -> tuple:
        """Lossless tree rejection sampling for deterministic top-k drafts (q = 1 rule)."""
        return ops.verify_sampling(tokens, parents, probs, None, generator)

    @staticmethod
    def _stop_reason(token: int, sequence: list[int], eos_ids: set[int], stop_criteria) -> str | None:
        if token in eos_ids:
            return "eos"
        if stop_criteria is not None:
            tail = torch.tensor([sequence[-stop_criteria.maximum_token_len :]])
            if bool(stop_criteria(tail, None)[0]):
                return "stop_string"
        return None


def generate(target: torch.nn.Module, draft: torch.nn.Module | None, policy: str | TreePolicy = "sage",
             **kwargs: Any) -> GenerationOutput:
    """One-call shortcut: ``SpeculativeGenerator(target, draft, policy).generate(**kwargs)``.

    ``draft_prune_ratio`` and ``max_vocab_padding`` go to the generator; everything else to ``generate``.
    """
    generator_kwargs = {key: kwargs.pop(key) for key in ("draft_prune_ratio", "max_vocab_padding") if key in kwargs}
    return SpeculativeGenerator(target, draft, policy, **generator_kwargs).generate(**kwargs)
