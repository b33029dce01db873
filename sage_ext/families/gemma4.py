"""Gemma 4 adapter (``Gemma4ForConditionalGeneration``): images and video frames as a variable number of pooled
soft tokens each (the vision tower pools ``pooling_kernel_size``^2 patches into one; ``image_position_ids`` /
``video_position_ids`` mark padding patches with -1), audio as soft tokens of its own, a decoder with sliding and
full layers whose head sizes may differ per layer (``per_layer_config``), per-layer input embeddings read from the
token ids, and 1-D RoPE over the expanded sequence.

In the prompt, each image's soft tokens attend to each other both ways (``mm_token_type_ids`` marks them); the
prompt forward is the model's own (``TokenTypeAdapter``), so everything the processor gives (images, video, audio)
is read as ``generate`` reads it. Tree nodes after the prompt are text.

A batch's media are concatenated over its rows: ``pixel_values [num_images, max_patches, ...]`` with
``image_position_ids``, and ``pixel_values_videos [num_frames, max_patches, ...]`` with ``video_position_ids`` and
``num_frames_per_video``; a row takes the next images / videos whose soft tokens its placeholders hold. Audio in a
batch is refused (decode such prompts one per call); a single prompt with audio runs.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from .base import BatchMedia
from .token_types import TokenTypeAdapter


def soft_tokens_per_item(position_ids: Tensor, pooling_kernel_size: int) -> list[int]:
    """Soft tokens of each image or frame ``[n, max_patches, 2]``: its real (not -1) patches over the pooling
    kernel's area, as ``Gemma4Model.get_image_features`` / ``get_video_features`` split their outputs."""
    real = (position_ids != -1).all(dim=-1).sum(dim=-1)
    return (real // pooling_kernel_size**2).tolist()


class Gemma4Adapter(TokenTypeAdapter):
    """Gemma 4 (``config.model_type == "gemma4"``; the text-only ``gemma4_text`` is a plain causal LM)."""

    model_types = ("gemma4",)
    kept_token_inputs = ("mm_token_type_ids",)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        ids = inputs["input_ids"]
        return (ids == self.config.image_token_id) | (ids == self.config.video_token_id)

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        if isinstance(inputs.get("input_features"), Tensor):
            raise ValueError("a batch of Gemma 4 prompts with audio (input_features) cannot be split into its rows "
                             "here: decode prompts with audio one per call")
        kernel = int(self.config.vision_config.pooling_kernel_size)
        media = []
        if isinstance(inputs.get("pixel_values"), Tensor):
            counts = soft_tokens_per_item(inputs["image_position_ids"], kernel)
            media.append(BatchMedia("image", int(self.config.image_token_id), counts,
                                    {"pixel_values": [1] * len(counts), "image_position_ids": [1] * len(counts)}))
        if isinstance(inputs.get("pixel_values_videos"), Tensor):
            frames = torch.as_tensor(inputs["num_frames_per_video"]).tolist()
            per_frame = soft_tokens_per_item(inputs["video_position_ids"], kernel)
            edges = [0, *itertools.accumulate(frames)]  # video i holds frames edges[i] .. edges[i + 1]
            counts = [sum(per_frame[edges[i]:edges[i + 1]]) for i in range(len(frames))]
            media.append(BatchMedia("video", int(self.config.video_token_id), counts,
                                    {"pixel_values_videos": frames, "video_position_ids": frames,
                                     "num_frames_per_video": [1] * len(frames)}))
        return media
