"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration``): 1-D RoPE over the expanded sequence,
so the base adapter's forwards apply as they are; only the visual-token mask is family-specific.

Prompts hold ``image_token_index`` / ``video_token_index`` placeholders that the model fills with
anyres-packed image features (base crop, grid crops, one newline embedding per feature row). The
newline rows sit on image placeholders too, so they count as visual tokens (prunable).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FamilyAdapter


class LlavaOnevisionAdapter(FamilyAdapter):
    """LLaVA-OneVision (``config.model_type == "llava_onevision"``)."""

    model_types = ("llava_onevision",)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        input_ids = inputs["input_ids"]
        return (input_ids == self.config.image_token_index) | (input_ids == self.config.video_token_index)
