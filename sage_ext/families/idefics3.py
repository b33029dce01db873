"""Idefics3 / SmolVLM adapter (``Idefics3ForConditionalGeneration``; SmolVLM v1 checkpoints use it,
SmolVLM2's ``SmolVLMForConditionalGeneration`` has the same layout): 1-D RoPE, so the base adapter's
forwards apply as they are; only the visual-token mask is family-specific.

Prompts hold one ``image_token_id`` placeholder per image feature (``image_seq_len`` per image or
image tile, each block wrapped in ``<fake_token_around_image>`` text tokens); ``pixel_values`` are
``[B, n_images, 3, H, W]`` with an optional ``pixel_attention_mask [B, n_images, H, W]``. Only the
placeholders count as visual tokens; the wrapper and ``<row_i_col_j>`` / ``<global-img>`` tokens are text.

In a batch the image tensors are batch-first, each row's images first and then all-zero padding slots (which the
model skips); a row keeps its own images only: as many as its placeholders fill, ``image_seq_len`` each.
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

    def split_media(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> tuple[list[dict[str, Tensor]], set[str]]:
        pixels = inputs.get("pixel_values")
        if not isinstance(pixels, Tensor):
            return super().split_media(inputs, row_ids)
        keys = {key for key in ("pixel_values", "pixel_attention_mask") if isinstance(inputs.get(key), Tensor)}
        for key in keys:
            if inputs[key].dim() < 2 or inputs[key].shape[0] != len(row_ids):
                raise ValueError(f"{key} has shape {tuple(inputs[key].shape)}; expected [B, n_images, ...] for "
                                 f"{len(row_ids)} rows")
        vision = self.config.vision_config
        per_image = int((vision.image_size // vision.patch_size) ** 2 / self.config.scale_factor**2)
        rows = []
        for b, ids in enumerate(row_ids):
            count = int((ids == self.config.image_token_id).sum())
            real = pixels[b].flatten(1).ne(0).any(1)  # the model's rule: an all-zero slot is padding
            n = count // per_image
            if count % per_image or n > len(real) or not real[:n].all() or real[n:].any():
                raise ValueError(f"row {b} holds {count} image placeholders ({per_image} per image) and "
                                 f"{int(real.sum())} of {len(real)} image slots are images: the image counts do not "
                                 f"add up")
            rows.append({key: inputs[key][b:b + 1, :n] for key in keys} if n else {})
        return rows, keys
