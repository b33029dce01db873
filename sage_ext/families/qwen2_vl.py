"""Qwen2-VL and Qwen2.5-VL adapter (M-RoPE: three rotary position axes: time, height, width).

Prompt positions come from the model's own ``model.model.get_rope_index``; it also returns
``rope_deltas`` = (largest prompt position + 1) - prompt length, so every token after the prompt, tree
nodes included, sits at ``sequence index + rope_delta`` on all three axes. Every call passes explicit
``position_ids``, so the ``rope_deltas`` the HF model caches on itself between calls are never read
(nor written) here.

``mm_token_type_ids`` (text 0, image 1, video 2) is what ``get_rope_index`` groups tokens by; when the
inputs lack it (a hand-built prompt), it is derived from the image/video token ids, because without
it Qwen2.5-VL silently falls back to 1-D positions.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FamilyAdapter

# get_rope_index arguments besides input_ids / mm_token_type_ids that a processor may return
_ROPE_INDEX_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")


class Qwen2VLAdapter(FamilyAdapter):
    """Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    model_types = ("qwen2_vl", "qwen2_5_vl")

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        input_ids = inputs["input_ids"]
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def prefill_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Processor outputs, with ``mm_token_type_ids`` derived from the token ids when missing."""
        model_inputs = super().prefill_inputs(inputs)
        if model_inputs.get("mm_token_type_ids") is None:
            input_ids = model_inputs["input_ids"]
            token_types = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
            model_inputs["mm_token_type_ids"] = token_types
        return model_inputs

    def prefill_position_ids(self, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``position_ids [3, B, L]`` of the prompt and its rope delta (0-d for B = 1), from the model itself."""
        extra = {key: inputs[key] for key in _ROPE_INDEX_KEYS if inputs.get(key) is not None}
        position_ids, rope_deltas = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], **extra
        )
        return position_ids, (rope_deltas.reshape(()) if rope_deltas.numel() == 1 else rope_deltas)

    def rope_position_ids(self, seq_positions: Tensor) -> Tensor:
        # text tokens after the prompt: the same position on the three M-RoPE axes
        return (seq_positions + self.position_offset).unsqueeze(0).expand(3, -1, -1)
