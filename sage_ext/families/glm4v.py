"""GLM-4V adapter (``Glm4vForConditionalGeneration``: GLM-4.1V; ``Glm4vMoeForConditionalGeneration``: GLM-4.5V;
``Glm46VForConditionalGeneration``: GLM-4.6V).

GLM-4V is built like Qwen2-VL in transformers: M-RoPE (three rotary axes over part of each head), positions from
the model's own ``_prepare_position_ids_for_generation`` (``get_rope_index`` grouping tokens by
``mm_token_type_ids``), and every token after the prompt continuing each row from the prompt's last position; so
the Qwen2-VL adapter's handling applies (``qwen2_vl.py``). What differs:

* a video's frames are written with the IMAGE placeholder (``<|begin_of_image|>`` + ``<|image|>``... +
  ``<|end_of_image|>`` + the frame's timestamp, inside ``<|begin_of_video|>`` ... ``<|end_of_video|>``); only
  ``mm_token_type_ids`` (2 on a video's placeholders, 1 on an image's) tells them apart, and ``get_rope_index``
  splits ``video_grid_thw`` per frame. The visual tokens are the image placeholders (and the video token, which a
  processor's output does not hold); a batch's videos are cut by the token types.
* without ``mm_token_type_ids`` the model raises (its forward asks for them): nothing is derived, as for Qwen3-VL.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .qwen2_vl import Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    """Adapter for ``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration`` and
    ``Glm46VForConditionalGeneration``."""

    model_types = ("glm4v", "glm4v_moe", "glm46v")
    derives_token_types = False

    def split_media(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> tuple[list[dict[str, Tensor]], set[str]]:
        """As Qwen2-VL's, with each row's video placeholders told apart by its token types (2: a video's): they
        are image placeholders in the ids."""
        token_types = inputs.get("mm_token_type_ids")
        if isinstance(token_types, Tensor):
            length = inputs["input_ids"].shape[1]
            row_ids = [torch.where(token_types[b, length - ids.shape[0]:].to(ids.device) == 2, self.video_token_id, ids)
                       for b, ids in enumerate(row_ids)]
        return super().split_media(inputs, row_ids)
