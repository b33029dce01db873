"""LLaVA-NeXT adapter (``LlavaNextForConditionalGeneration``): anyres image features (base crop, grid crops
unpadded to the image's aspect ratio, one newline embedding per feature row) scattered into the
``image_token_index`` placeholders (the processor expands them from ``image_sizes``), 1-D RoPE over the expanded
sequence, so the base adapter's forwards apply as they are; only the visual-token mask is family-specific (the
newline rows sit on placeholders too and count as visual tokens, prunable).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FamilyAdapter


class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (``config.model_type == "llava_next"``)."""

    model_types = ("llava_next",)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        return inputs["input_ids"] == self.config.image_token_index
