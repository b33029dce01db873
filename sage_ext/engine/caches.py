"""The KV caches as the engine's commit sees them, through HF's own Cache API.

After the prefill the engine groups the key/value tensors of a ``DynamicCache``'s layers by device (a model split
with ``device_map`` has several groups); every step the workspace's commit compacts each group (group 0, on the
tree's device, inside ``commit_tree_``, the others with ``kv_compact_`` on their own device: one commit call),
and then ``crop`` cuts the cache to what it holds with ``Cache.crop``. Layers keep their device for the whole
generation, while their tensors are new objects after every forward, so the tensors are listed again every step.
"""
from __future__ import annotations

import torch
from torch import Tensor


class CacheGroups:
    """The layers of ``cache`` that hold keys/values, grouped by device in layer order: group 0 the layers on
    ``device`` (the tree's; empty when none are), then one group per other device.

    ``split_from``: layers from this index on form a group of their own even on ``device`` (a test seam for the
    per-device commit of a model split over GPUs, on one device)."""

    def __init__(self, cache, device: torch.device, split_from: int | None = None):
        self.cache = cache
        groups: dict[tuple[torch.device, bool], list] = {(device, False): []}
        for index, layer in enumerate(cache.layers):
            keys = getattr(layer, "keys", None)
            if keys is not None and keys.numel() > 0:
                split = split_from is not None and index >= split_from
                groups.setdefault((keys.device, split), []).append(layer)
        self.groups: list[list] = list(groups.values())
        self.devices: list[torch.device] = [layer_device for layer_device, _ in groups]

    def tensors(self) -> list[list[Tensor]]:
        """Every group's keys and values, as ``kv_compact_`` / ``commit_tree_`` take them (this step's tensors)."""
        return [[tensor for layer in layers for tensor in (layer.keys, layer.values)] for layers in self.groups]

    def crop(self, length: int, new_length: int) -> None:
        """Cut the cache from ``length`` to ``new_length`` cached rows with HF's ``Cache.crop`` (a negative
        argument removes that many rows in every transformers 5 release)."""
        if new_length < length:
            self.cache.crop(new_length - length)
