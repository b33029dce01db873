"""Adapter for InternVL (``InternVLForConditionalGeneration``: InternVL 3 / 3.5 in transformers' format, 1B to 78B,
so a small checkpoint drafts for a large one with the same processor): every image tile (the processor's dynamic
tiling, a video's frames alike) becomes ``((image_size / patch_size) * downsample_ratio)^2`` features (256 at 448 px)
scattered into the ``image_token_id`` (``<IMG_CONTEXT>``) placeholders of a Qwen2 / Llama decoder with 1-D RoPE, so
the base adapter's forwards apply as they are. In a batch ``pixel_values [num_tiles, 3, H, W]`` are concatenated
over the rows: a row takes the tiles its placeholders fill.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import BatchMedia, FamilyAdapter, fixed_count_images, height_width


def internvl_tile_tokens(config) -> int:
    """Features (placeholders) of one tile, from the vision geometry (``config.image_seq_length`` may be left at its
    default whatever the geometry)."""
    vision = config.vision_config
    (height, width), (patch_h, patch_w) = height_width(vision.image_size), height_width(vision.patch_size)
    ratio = float(config.downsample_ratio)
    return int(height // patch_h * ratio) * int(width // patch_w * ratio)


class InternVLAdapter(FamilyAdapter):
    """InternVL (``config.model_type == "internvl"``)."""

    model_types = ("internvl",)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        return inputs["input_ids"] == self.image_token_id

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        return fixed_count_images(inputs, self.image_token_id, internvl_tile_tokens(self.config))
