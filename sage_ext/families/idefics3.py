"""Idefics3 / SmolVLM adapter (``Idefics3ForConditionalGeneration``; SmolVLM v1 checkpoints use it,
SmolVLM2's ``SmolVLMForConditionalGeneration`` has the same layout): 1-D RoPE, so the base adapter's
forwards apply as they are; only the visual-token mask is family-specific.

Prompts hold one ``image_token_id`` placeholder per image feature (``image_seq_len`` per image or
image tile, each block wrapped in ``<fake_token_around_image>`` text tokens); ``pixel_values`` are
``[B, n_images, 3, H, W]`` with an optional ``pixel_attention_mask [B, n_images, H, W]``. Only the
placeholders count as visual tokens; the wrapper and ``<row_i_col_j>`` / ``<global-img>`` tokens are text.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FamilyAdapter


class Idefics3Adapter(FamilyAdapter):
    """Idefics3 and SmolVLM (``config.model_type`` "idefics3" or "smolvlm")."""

    model_types = ("idefics3", "smolvlm")

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        return inputs["input_ids"] == self.config.image_token_id
