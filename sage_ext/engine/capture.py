"""Captured draft forwards: the draft's per-level tree forward compiled for a few fixed shapes.

A small draft's forward is mostly per-call framework overhead (HF's Python modules, one kernel per op), and SAGE
runs one per tree level, about ten per step. Serving engines capture their draft steps for that reason; this
module does the same with ``torch.compile`` (inductor on the CPU; CUDA graphs, its "reduce-overhead" mode, on a
GPU). Capture needs static shapes, which the engine provides when ``SpeculativeGenerator(capture_draft=True)``:

* the draft's ``RowCache`` is *static*: one fixed buffer width (a power of two), every forward attends over the
  whole width through its additive mask, and writes go through an index tensor planned outside the forward;
* a forward's rows are padded to a power of two (``padded_rows``), the padding rows written to columns past the
  rows' lengths (never read) and attending to column 0 only.

So the shapes a forward can take are (batch rows, padded rows, buffer width, dtype): a handful per generation
(one graph per padded row count: 1, 2, 4, ... up to the tree's size), shared by later generations of the same
width. The first forward of each shape compiles (seconds on a CPU; inductor keeps its kernels on disk for the next
process). Later forwards of a shape the generator has run skip dynamo's full guard check (``set_stance(
skip_guard_eval_unsafe=True)``: only the guards that tell its variants apart run), which is safe here because
between two such calls only tensor data changes, never the models, the shapes or the Python state the variant
was traced with (dtype, device and the position offset's kind are part of the shape key). The draft's output never decides what is emitted (the target verifies every token), so capture changes
speed only, never the output; greedy outputs stay identical to ``target.generate`` (tested).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..families import FamilyAdapter

#: dynamo's per-function limit on compiled variants (8 by default) is raised for the shapes of new forwards
RECOMPILE_LIMIT = 256


def padded_rows(count: int) -> int:
    """The row count a captured forward of ``count`` rows runs at: the next power of two."""
    return 1 << (count - 1).bit_length()


def tree_forward(adapter: FamilyAdapter, tokens: Tensor, positions: Tensor, mask: Tensor, cache) -> Tensor:
    """The eager tree forward (what ``CapturedForward`` compiles)."""
    return adapter.forward_tree(tokens, positions, mask, cache)


class CapturedForward:
    """``adapter.forward_tree`` compiled with static shapes (one per device type: inductor, or CUDA graphs)."""

    def __init__(self, device: torch.device):
        mode = "reduce-overhead" if device.type == "cuda" else None
        self._compiled = torch.compile(tree_forward, dynamic=False, mode=mode)
        self._shapes: set[tuple] = set()

    def __call__(self, adapter: FamilyAdapter, tokens: Tensor, positions: Tensor, mask: Tensor, cache) -> Tensor:
        offset = adapter.position_offset  # an int (folded into the variant) or a tensor (an input of it)
        key = (tuple(tokens.shape), tuple(positions.shape), tuple(mask.shape), mask.dtype, mask.device,
               offset if isinstance(offset, int) else tuple(offset.shape))
        if key in self._shapes:
            # a shape this generator already ran: the variant exists and nothing but tensor data has changed, so
            # dynamo only tells its variants apart instead of checking every guard (~170 us a call on a CPU)
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._compiled(adapter, tokens, positions, mask, cache)
        self._shapes.add(key)
        # a new shape compiles a new variant: past dynamo's default limit it would silently fall back to eager
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(adapter, tokens, positions, mask, cache)
