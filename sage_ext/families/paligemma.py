"""PaliGemma adapter (``PaliGemmaForConditionalGeneration``, PaliGemma 1 and 2): SigLIP features in the
``image_token_index`` placeholders at the start of the prompt, a Gemma / Gemma 2 decoder.

Two family specifics: the whole prompt (image + text prefix, ``token_type_ids`` 0) attends both ways, handled by
running the model's own prompt forward (``TokenTypeAdapter``); and rope positions start at 1 (``generate`` adds 1
to every position), so the prompt sits at ``1..L`` and sequence index ``s`` at ``s + 1``. In a batch,
``pixel_values [num_images, ...]`` are concatenated, ``text_config.num_image_tokens`` placeholders each.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import BatchMedia, fixed_count_images
from .token_types import TokenTypeAdapter


class PaliGemmaAdapter(TokenTypeAdapter):
    """PaliGemma (``config.model_type == "paligemma"``)."""

    model_types = ("paligemma",)

    def prefill_position_ids(self, inputs: dict[str, Any]) -> tuple[Tensor, int | Tensor]:
        # generate's positions, shifted by the one PaliGemma's prepare_inputs_for_generation adds
        positions, offset = super().prefill_position_ids(inputs)
        return positions + 1, offset + 1

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        return fixed_count_images(inputs, self.config.image_token_id, int(self.config.text_config.num_image_tokens))
