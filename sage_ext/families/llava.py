"""Adapter for LLaVA-1.5 and the other ``LlavaForConditionalGeneration`` models (a CLIP, SigLIP or Pixtral vision
tower: llava-interleave, Pixtral-12B), and for Mistral 3 (a Pixtral tower with merged patches): image features scattered into the ``<image>`` placeholder positions of the
decoder, 1-D RoPE over the expanded sequence. The base adapter's forwards apply as they are; only the visual-token
mask and the batch media are family-specific (``llava_image_tokens`` placeholders per image, ``pixel_values
[num_images, ...]`` and ``image_sizes`` concatenated over a batch).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import BatchMedia, FamilyAdapter, fixed_count_images


def llava_image_tokens(model: torch.nn.Module, pixel_values: Tensor, image_sizes: Tensor | None) -> list[int] | None:
    """The placeholders each image of ``pixel_values`` fills, as ``LlavaModel.get_image_features`` makes its features.

    With ``image_sizes`` (towers that take images of any size, e.g. Pixtral): ``(h // patch) * (w // patch)`` per
    image (Mistral 3: ``patch * spatial_merge_size`` pixels per feature). Else the tower's tokens per image (its position embeddings: the patches, plus a class token for CLIP,
    none for SigLIP) less the first one for the "default" feature strategy. None when the tower does not say
    (transformers then checks the count itself)."""
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    if image_sizes is not None:
        patch = getattr(tower, "patch_size", None) or getattr(model.config.vision_config, "patch_size", None)
        if patch is None:
            return None
        # Mistral 3 merges spatial_merge_size x spatial_merge_size patches into one feature
        pixels = int(patch) * int(getattr(model.config, "spatial_merge_size", 1))
        return (torch.as_tensor(image_sizes).long() // pixels).prod(-1).tolist()
    positions = getattr(getattr(tower, "embeddings", None), "num_positions", None)
    if not isinstance(positions, int):
        return None
    dropped = int(getattr(model.config, "vision_feature_select_strategy", "default") == "default")
    return [positions - dropped] * pixel_values.shape[0]


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
        pixel_values = inputs.get("pixel_values")
        if not isinstance(pixel_values, Tensor):
            return []
        counts = llava_image_tokens(self.model, pixel_values, inputs.get("image_sizes"))
        return fixed_count_images(inputs, self.image_token_id,
                                  counts if counts is not None else int(self.config.image_seq_length))


class Mistral3Adapter(LlavaAdapter):
    """Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.1 / 3.2, Ministral 3): a Pixtral tower whose
    features are merged ``spatial_merge_size``^2 to one, images of any size (``image_sizes``), a Mistral / Ministral
    decoder with 1-D RoPE; LLaVA's layout otherwise."""

    model_types = ("mistral3",)
