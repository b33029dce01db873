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
* without ``mm_token_type_ids`` ``generate`` gives the prompt 1-D positions and puts the media given into every
  image placeholder (an image and a video in one prompt fail in transformers, with or without them); the engine
  does the same, as for every Qwen-VL family. A literal ``<|video|>`` token is text to GLM-4V.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .qwen2_vl import Qwen2VLAdapter


def shared_placeholder_videos(input_ids: Tensor, image_id: int, token_types: Tensor | None,
                              inputs: dict[str, Any]) -> Tensor:
    """bool like ``input_ids``: which of GLM-4V's image placeholders are a video's. Its processor marks them with
    ``mm_token_type_ids`` 2 (``token_types``, the rows' of ``input_ids``); without token types ``generate`` puts the
    media given into every placeholder, so they are a video's exactly when ``inputs`` (the prompt's or the batch's
    processor outputs) give videos and no images."""
    placeholders = input_ids == image_id
    if token_types is not None:
        return placeholders & (token_types.to(input_ids.device) == 2)
    videos_only = inputs.get("pixel_values_videos") is not None and inputs.get("pixel_values") is None
    return placeholders if videos_only else torch.zeros_like(placeholders)


class Glm4vAdapter(Qwen2VLAdapter):
    """Adapter for ``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration`` and
    ``Glm46VForConditionalGeneration``."""

    model_types = ("glm4v", "glm4v_moe", "glm46v")

    def split_media(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> tuple[list[dict[str, Tensor]], set[str]]:
        """As Qwen2-VL's, on ids where each video placeholder (an image placeholder, ``shared_placeholder_videos``)
        holds the video token and a literal video token, which GLM-4V reads as text, holds none."""
        input_ids, token_types = inputs["input_ids"], inputs.get("mm_token_type_ids")
        if token_types is not None and (not isinstance(token_types, Tensor) or token_types.shape != input_ids.shape):
            raise ValueError(f"mm_token_type_ids has shape {tuple(getattr(token_types, 'shape', ()))}; input_ids "
                             f"{tuple(input_ids.shape)}: give the processor's, one type per token")
        if token_types is None:
            if inputs.get("pixel_values") is not None and inputs.get("pixel_values_videos") is not None:
                raise ValueError(f"a {type(self.model).__name__} batch of images and videos needs mm_token_type_ids "
                                 f"(the processor's) to tell a video's placeholders from an image's")
        length = input_ids.shape[1]
        marked = []
        for b, ids in enumerate(row_ids):
            types = None if token_types is None else token_types[b, length - ids.shape[0]:]
            video = shared_placeholder_videos(ids, self.image_token_id, types, inputs)
            ids = torch.where(ids == self.video_token_id, -1, ids)
            marked.append(torch.where(video, self.video_token_id, ids))
        return super().split_media(inputs, marked)
