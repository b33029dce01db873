"""Gemma 3 adapter (``Gemma3ForConditionalGeneration``): SigLIP features pooled to ``mm_tokens_per_image``
placeholders per image, 1-D RoPE (separate local / global bases, both from the same positions), sliding-window
and full layers.

In the prompt, the image placeholders of one image attend to each other both ways (``token_type_ids`` 1 marks
them; each run of them is one image); the prompt forward is the model's own (``TokenTypeAdapter``). Tree nodes
after the prompt are text, causal over everything before them. Sliding windows shorter than the sequence are
refused by the engine. In a batch, ``pixel_values [num_images, ...]`` (pan-and-scan crops included) are concatenated,
``mm_tokens_per_image`` placeholders each.
"""
from __future__ import annotations

from typing import Any

from .base import BatchMedia, fixed_count_images
from .token_types import TokenTypeAdapter


class Gemma3Adapter(TokenTypeAdapter):
    """Gemma 3 with vision (``config.model_type == "gemma3"``; text-only ``gemma3_text`` is a plain causal LM)."""

    model_types = ("gemma3",)

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        return fixed_count_images(inputs, self.config.image_token_id, int(self.config.mm_tokens_per_image))
