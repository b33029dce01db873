"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration``): 1-D RoPE over the expanded sequence,
so the base adapter's forwards apply as they are; only the visual-token mask is family-specific.

Prompts hold ``image_token_index`` / ``video_token_index`` placeholders that the model fills with
anyres-packed image features (base crop, grid crops, one newline embedding per feature row). The
newline rows sit on image placeholders too, so they count as visual tokens (prunable).

In a batch, images are concatenated as for LLaVA-NeXT (``llava_next.anyres_tokens`` placeholders each, shrunk to
``vision_aspect_ratio``'s crop budget), except that an image of a row with several images (the processor's
``batch_num_images``, one count per row) is one crop: side**2 + 1 placeholders. Videos: ``pixel_values_videos
[num_videos, frames, 3, H, W]``, frames * ceil(side / 2)**2 + 1 placeholders each.
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import BatchMedia, FamilyAdapter
from .llava_next import anyres_tokens, trim_patch_padding


class LlavaOnevisionAdapter(FamilyAdapter):
    """LLaVA-OneVision (``config.model_type == "llava_onevision"``)."""

    model_types = ("llava_onevision",)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        input_ids = inputs["input_ids"]
        return (input_ids == self.config.image_token_index) | (input_ids == self.config.video_token_index)

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        media = []
        sizes = inputs.get("image_sizes")
        if isinstance(sizes, Tensor) and isinstance(inputs.get("pixel_values"), Tensor):
            aspect_ratio = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
            max_num_patches = int(aspect_ratio.removeprefix("anyres_max_"))
            tokens = [anyres_tokens(self.config, size, max_num_patches) if patched else side * side + 1
                      for size, patched in zip(sizes.tolist(), self._patched(inputs, len(sizes)))]
            ones = [1] * len(tokens)
            media.append(BatchMedia("image", self.config.image_token_index, tokens,
                                    {"pixel_values": ones, "image_sizes": ones}))
        videos = inputs.get("pixel_values_videos")
        if isinstance(videos, Tensor):
            per_video = videos.shape[1] * math.ceil(side / 2) ** 2 + 1
            media.append(BatchMedia("video", self.config.video_token_index, [per_video] * videos.shape[0],
                                    {"pixel_values_videos": [1] * videos.shape[0]}))
        return media

    @staticmethod
    def _patched(inputs: dict[str, Any], count: int) -> list[bool]:
        """Which images are anyres-patched: those alone in their row (all when ``batch_num_images`` is absent)."""
        per_row = inputs.get("batch_num_images")
        if not isinstance(per_row, Tensor):
            return [True] * count
        patched = [n == 1 for n in per_row.tolist() for _ in range(n)]
        if len(patched) != count:
            raise ValueError(f"batch_num_images {per_row.tolist()} counts {len(patched)} images, image_sizes {count}: "
                             f"the image counts do not add up")
        return patched

    def split_media(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> tuple[list[dict[str, Tensor]], set[str]]:
        rows, keys = super().split_media(inputs, row_ids)
        per_row = inputs.get("batch_num_images")
        if isinstance(per_row, Tensor):
            if tuple(per_row.shape) != (len(rows),):
                raise ValueError(f"batch_num_images has shape {tuple(per_row.shape)}; expected one count per row")
            keys.add("batch_num_images")
        for b, row in enumerate(rows):
            count = len(row["image_sizes"]) if "image_sizes" in row else 0
            if isinstance(per_row, Tensor):
                if int(per_row[b]) != count:
                    raise ValueError(f"batch_num_images gives row {b} {int(per_row[b])} images, its placeholders "
                                     f"{count}: the image counts do not add up")
                if count:
                    row["batch_num_images"] = per_row[b:b + 1]
            trim_patch_padding(self.config, row, patched=per_row is None or count == 1)
        return rows, keys
