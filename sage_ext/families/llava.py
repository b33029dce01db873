"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP features scattered into the
``<image>`` placeholder positions of a Llama/Vicuna decoder, 1-D RoPE over the expanded sequence.
The base adapter's forwards apply as they are; only the visual-token mask and the batch media are family-specific
(``config.image_seq_length`` placeholders per image, ``pixel_values [num_images, ...]`` concatenated over a batch).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import BatchMedia, FamilyAdapter, fixed_count_images


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 (``config.model_type == "llava"``)."""

    model_types = ("llava",)

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        value = getattr(cfg, "image_token_id", None)
        return int(value if value is not None else cfg.image_token_index)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor | None:
        return inputs["input_ids"] == self.image_token_id

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        return fixed_count_images(inputs, self.image_token_id, int(self.config.image_seq_length))
