"""LLaVA-NeXT and LLaVA-NeXT-Video adapters (``LlavaNextForConditionalGeneration``,
``LlavaNextVideoForConditionalGeneration``): anyres image features (base crop, grid crops
unpadded to the image's aspect ratio, one newline embedding per feature row) scattered into the
``image_token_index`` placeholders (the processor expands them from ``image_sizes``), 1-D RoPE over the expanded
sequence, so the base adapter's forwards apply as they are; only the visual-token mask is family-specific (the
newline rows sit on placeholders too and count as visual tokens, prunable).

In a batch, ``pixel_values [num_images, patches, 3, H, W]`` and ``image_sizes`` are concatenated, the patches
padded to the batch's largest count; each image's placeholder count follows from its size (``anyres_tokens``, the
model's ``pack_image_features`` rule) and a row's pixel_values are cut to its own largest patch count.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .base import BatchMedia, FamilyAdapter


def anyres_tokens(config, image_size: list[int], max_num_patches: int | None = None) -> int:
    """Placeholders of one anyres image of ``image_size`` (h, w), as the model packs its features: the base
    crop's, then the grid crops' unpadded to the image's aspect ratio (LLaVA-OneVision: shrunk to about
    ``max_num_patches`` crops' worth when larger), one newline per feature row."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    grid_h, grid_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    height, width = unpad_image(torch.empty(0, grid_h * side, grid_w * side), image_size).shape[1:]
    if max_num_patches is not None:
        ratio = math.sqrt(height * width / (max_num_patches * side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    return side * side + height * (width + 1)


def trim_patch_padding(config, row: dict[str, Tensor], patched: bool = True) -> None:
    """Cut a row's ``pixel_values [n, patches, 3, H, W]`` to its own images' largest patch count (the processor
    pads to the largest of the batch it is given); ``patched`` False: one patch per image (LLaVA-OneVision's
    multi-image prompts)."""
    pixels, sizes = row.get("pixel_values"), row.get("image_sizes")
    if pixels is None or sizes is None or pixels.dim() != 5:
        return
    counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
              if patched else 1 for size in sizes.tolist()]
    row["pixel_values"] = pixels[:, :max(counts)]


class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (``config.model_type == "llava_next"``)."""

    model_types = ("llava_next",)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        return inputs["input_ids"] == self.config.image_token_index

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        sizes = inputs.get("image_sizes")
        if not isinstance(sizes, Tensor) or not isinstance(inputs.get("pixel_values"), Tensor):
            return []
        tokens = [anyres_tokens(self.config, size) for size in sizes.tolist()]
        ones = [1] * len(tokens)
        return [BatchMedia("image", self.config.image_token_index, tokens, {"pixel_values": ones, "image_sizes": ones})]

    def split_media(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> tuple[list[dict[str, Tensor]], set[str]]:
        rows, keys = super().split_media(inputs, row_ids)
        for row in rows:
            trim_patch_padding(self.config, row)
        return rows, keys


def video_tokens_per_frame(config) -> int:
    """LLaVA-NeXT-Video's placeholders per video frame: the tower's (side x side) patch grid pooled with kernel and
    stride ``spatial_pool_stride``, side = image_size // patch_size."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size // config.spatial_pool_stride) ** 2


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video (``config.model_type == "llava_next_video"``): LLaVA-NeXT's anyres images, plus videos whose
    frames go through the same tower and a spatial pool (``spatial_pool_stride``) into ``video_token_index``
    placeholders (``video_tokens_per_frame`` per frame). In a batch,
    ``pixel_values_videos [num_videos, frames, 3, H, W]`` is one row per video."""

    model_types = ("llava_next_video",)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        input_ids = inputs["input_ids"]
        return (input_ids == self.config.image_token_index) | (input_ids == self.config.video_token_index)

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        media = super().batch_media(inputs)
        videos = inputs.get("pixel_values_videos")
        if isinstance(videos, Tensor) and videos.dim() == 5:
            count, frames = videos.shape[:2]
            per_frame = video_tokens_per_frame(self.config)
            media.append(BatchMedia("video", self.config.video_token_index, [frames * per_frame] * count,
                                    {"pixel_values_videos": [1] * count}))
        return media
