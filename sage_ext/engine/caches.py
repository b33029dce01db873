"""The KV caches of a generation: one ``RowCache`` per model, every row (prompt) at its own length.

Rows of a batch accept different numbers of tokens every step, so their caches hold different lengths. A
``RowCache`` keeps each layer's keys and values in one buffer ``[B, H, columns, D]`` (grown by doubling as the
generation needs, up to its capacity), and every row in its own columns ``[0, length_b)``: a forward writes each row's new keys/values at
that row's own offset (``plan_writes``), and its attention sees the buffer's first ``max_b(offset_b) + n``
columns through the engine's additive mask, which blocks every column a row does not hold (the columns between
its length and the batch's longest are the only waste: at most the spread of the rows' lengths). Nothing
ever moves a row's past, so there are no holes to re-pack; the commit compacts a step's accepted tree rows in
place inside each row's own columns (``kv_compact_`` / ``commit_tree_`` on the row's view) and a row's length is
host bookkeeping, never a crop. A row that finishes leaves the batch (``keep_rows``: one copy of the others).

The prompt of every row is prefilled alone into an HF ``DynamicCache`` (the family adapters' prefill, draft-side
pruning included) and copied in with ``load_row``. ``CacheGroups`` groups the layers by device for the commit
(a model split with ``device_map`` has several groups).

A ``RowCache`` is an HF ``Cache`` (``transformers.cache_utils``): models call ``update`` per layer as with any
cache; ``get_seq_length`` reports the planned forward's past (the longest row's offset), which models use only
where the engine's explicit positions and 4-D masks do not already decide.

A *static* ``RowCache`` (``static_room``) serves a captured forward (``engine.capture``): its buffers have one
fixed width from the start (a power of two with room for a padded forward past the capacity), every forward sees
the whole width, and the writes go through a tensor index planned before the forward (``plan_static_writes``),
so the forward's shapes depend only on the batch and the padded row count, never on the rows' lengths.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


class RowLayer(CacheLayerMixin):
    """One decoder layer's keys and values ``[B, H, capacity, D]``, written at the owning cache's planned offsets."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "RowCache"):
        super().__init__()
        self.owner = owner

    def allocate(self, batch: int, keys: Tensor, values: Tensor) -> None:
        """Zeroed buffers of ``batch`` rows shaped, typed and placed like ``keys`` / ``values`` (``[b, H, n, D]``,
        each its own: multi-head latent attention (DeepSeek-V2/V3) has values narrower than its keys)."""
        # zeros, not empty: a masked column still enters q.k and p.v, and garbage could be inf / NaN
        for name, like in (("keys", keys), ("values", values)):
            shape = (batch, like.shape[1], self.owner.allocated, like.shape[3])
            setattr(self, name, torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.device = keys.device
        self.is_initialized = True
        self.owner.mark_static(self)

    def grow(self, columns: int) -> None:
        """Room for ``columns`` columns per row (the rows' contents kept)."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], columns, old.shape[3]))
            new[:, :, : old.shape[2]].copy_(old)
            setattr(self, name, new)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.allocate(key_states.shape[0], key_states, value_states)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if owner.static:  # a captured forward: the planned index tensor, the whole buffer seen
            rows, columns = owner.static_index
            self.keys[rows, :, columns] = key_states.transpose(1, 2)
            self.values[rows, :, columns] = value_states.transpose(1, 2)
            return self.keys, self.values
        count = key_states.shape[-2]
        if count != owner.planned_count:
            raise RuntimeError(f"RowCache: a forward of {count} rows, planned {owner.planned_count}")
        start = owner.uniform_start
        if start is not None:  # every row writes at the same offset (always for one row): a slice copy
            self.keys[:, :, start: start + count].copy_(key_states)
            self.values[:, :, start: start + count].copy_(value_states)
        else:  # per-row offsets: one index_put per tensor ([B, n] column indices, the heads sliced)
            rows, columns = owner.write_index(self.keys.device)
            self.keys[rows, :, columns] = key_states.transpose(1, 2)
            self.values[rows, :, columns] = value_states.transpose(1, 2)
        width = owner.planned_width
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.planned_width, 0

    def get_seq_length(self) -> int:
        return self.owner.planned_width - self.owner.planned_count

    def get_max_length(self) -> int:
        return self.owner.capacity

    def get_max_cache_shape(self) -> int:  # the name of get_max_length in transformers releases before 5.13
        return self.owner.capacity


class RowCache(Cache):
    """KV cache of ``batch`` rows, each at its own length, up to ``capacity`` columns per row (see module doc).

    The buffers start with room for ``initial`` columns and double (up to ``capacity``) when a forward needs more,
    so memory follows what the generation reaches rather than ``max_new_tokens``. ``version`` changes whenever the
    buffers are replaced (growth, ``keep_rows``): views of them must be taken again."""

    def __init__(self, batch: int, capacity: int, initial: int | None = None, static_room: int | None = None):
        super().__init__(layers=[])
        self.batch = batch
        self.capacity = capacity
        self.allocated = capacity if initial is None else min(max(initial, 1), capacity)
        #: fixed buffers for a captured forward (module doc): ``static_room`` columns past the capacity hold the
        #: padding rows of a forward padded to its shape bucket (written, never read)
        self.static = static_room is not None
        self.static_index: tuple[Tensor, Tensor] | None = None
        if self.static:
            self.allocated = static_width(capacity + static_room)
        self.version = 0
        self.planned_count = 0
        self.planned_width = 0
        self.uniform_start: int | None = 0
        self._starts: list[int] = [0] * batch
        self._index: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ HF Cache interface
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(RowLayer(self))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.planned_width - self.planned_count

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.planned_width, 0

    # ------------------------------------------------------------------ the engine's side
    def plan_writes(self, starts: list[int], count: int) -> None:
        """The next forward feeds ``count`` rows per batch row; row b's go to columns ``starts[b] ..``."""
        width = self._plan(starts, count, self.capacity, "the capacity")
        if width > self.allocated:
            self._grow(width)
        self.planned_width = width
        first = starts[0]
        self.uniform_start = first if all(start == first for start in starts) else None

    def _plan(self, starts: list[int], count: int, limit: int, limit_name: str) -> int:
        """The checks and bookkeeping of every planned forward; returns its width (the longest row's end)."""
        if len(starts) != self.batch:
            raise ValueError(f"RowCache: {len(starts)} offsets for {self.batch} rows")
        width = max(starts) + count
        if width > limit:
            raise RuntimeError(f"RowCache: a forward up to column {width} exceeds {limit_name} {limit}")
        self.planned_count = count
        self._starts = starts
        self._index.clear()
        return width

    def mark_static(self, layer: RowLayer) -> None:
        """A static cache's CUDA buffers keep their addresses for CUDA graphs (torch.compile's "reduce-overhead"
        mode updates them in place instead of copying them into the graph's own inputs)."""
        if self.static and layer.keys.device.type == "cuda":
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)

    def plan_static_writes(self, starts: list[int], count: int, device: torch.device) -> None:
        """A static cache's next forward: ``count`` rows per batch row (padding included), row b's to columns
        ``starts[b] ..``, through an index tensor made here, outside the captured forward."""
        if not self.static:
            raise RuntimeError("RowCache: plan_static_writes on a cache without static buffers")
        self._plan(starts, count, self.allocated, "the static width")
        self.planned_width = self.allocated
        self.static_index = self.write_index(device)

    def write_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(rows [B, 1], columns [B, n])`` of the planned per-row writes, made once per forward and device."""
        index = self._index.get(device)
        if index is None:
            starts = torch.tensor(self._starts, dtype=torch.int64)
            columns = starts[:, None] + torch.arange(self.planned_count, dtype=torch.int64)
            rows = torch.arange(self.batch, dtype=torch.int64)[:, None]
            index = (rows.to(device, non_blocking=True), columns.to(device, non_blocking=True))
            self._index[device] = index
        return index

    def _grow(self, width: int) -> None:
        columns = self.allocated
        while columns < width:
            columns *= 2
        self.allocated = min(columns, self.capacity)
        for layer in self.layers:
            if layer.is_initialized:
                layer.grow(self.allocated)
        self.version += 1

    def load_row(self, row: int, cache) -> int:
        """Copy a row's prefilled HF cache (every layer's keys/values ``[1, H, L, D]``) into columns ``[0, L)``
        of row ``row``; returns L."""
        length = 0
        for index, layer in enumerate(cache.layers):
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            while len(self.layers) <= index:
                self.layers.append(RowLayer(self))
            target = self.layers[index]
            if not target.is_initialized:
                target.allocate(self.batch, keys, layer.values)
            length = keys.shape[2]
            if length > self.allocated:
                raise RuntimeError(f"RowCache: a prompt of {length} rows exceeds the room {self.allocated}")
            target.keys[row, :, :length].copy_(keys[0])
            target.values[row, :, :length].copy_(layer.values[0])
        return length

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): finished rows leave the batch."""
        index: dict[torch.device, Tensor] = {}
        for layer in self.layers:
            if layer.is_initialized:
                device = layer.keys.device
                if device not in index:
                    index[device] = torch.tensor(rows, dtype=torch.int64, device=device)
                layer.keys = layer.keys.index_select(0, index[device])
                layer.values = layer.values.index_select(0, index[device])
                self.mark_static(layer)
        self.batch = len(rows)
        self._starts = [self._starts[row] for row in rows]
        self._index.clear()
        self.static_index = None
        self.version += 1

    def row_cache(self, row: int, length: int):
        """A ``DynamicCache`` copy of row ``row``'s first ``length`` columns (for checks and debugging)."""
        from transformers import DynamicCache

        copy = DynamicCache()
        for index, layer in enumerate(self.layers):
            if layer.is_initialized:
                copy.update(layer.keys[row: row + 1, :, :length].clone(),
                            layer.values[row: row + 1, :, :length].clone(), index)
        return copy


def static_width(columns: int) -> int:
    """The width of a static cache's buffers for ``columns`` columns: the next power of two, at least 256, so
    generations of different lengths share a few captured shapes."""
    return max(256, 1 << (columns - 1).bit_length())


class CacheGroups:
    """The layers of a ``RowCache`` that hold keys/values, grouped by device in layer order: group 0 the layers on
    ``device`` (the tree's; empty when none are), then one group per other device. The commit compacts group 0
    inside ``commit_tree_`` and every other group with ``kv_compact_`` on its own device (one workspace call).

    ``split_from``: layers from this index on form a group of their own even on ``device`` (a test seam for the
    per-device commit of a model split over GPUs, on one device)."""

    def __init__(self, cache: RowCache, device: torch.device, split_from: int | None = None):
        self.cache = cache
        self.device = device
        self.split_from = split_from
        self._rows: list[list[list[Tensor]]] | None = None
        self._version = -1

    def groups(self) -> list[list[RowLayer]]:
        """The layers holding keys/values, per device group (group 0 the tree device's, possibly empty)."""
        groups: dict[tuple[torch.device, bool], list] = {(self.device, False): []}
        for index, layer in enumerate(self.cache.layers):
            if layer.is_initialized:
                split = self.split_from is not None and index >= self.split_from
                groups.setdefault((layer.keys.device, split), []).append(layer)
        return list(groups.values())

    def tensors(self, row: int) -> list[list[Tensor]]:
        """Every group's keys and values of batch row ``row`` (``[1, H, capacity, D]`` views), as ``kv_compact_`` /
        ``commit_tree_`` take them; listed again only when the cache's buffers were replaced (``RowCache.version``)."""
        if self._version != self.cache.version:
            self._version = self.cache.version
            groups = self.groups()
            self._rows = [[[tensor[b: b + 1] for layer in layers for tensor in (layer.keys, layer.values)]
                           for layers in groups] for b in range(self.cache.batch)]
        return self._rows[row]
