"""LLaVA-OneVision-1.5 adapter (``LlavaOnevision15ForConditionalGeneration``: a RICE vision tower with 2-D rotary
patches, a Qwen3 decoder).

Its media are Qwen2-VL's (``pixel_values`` / ``pixel_values_videos`` of patch rows with ``image_grid_thw`` /
``video_grid_thw``, t*h*w / spatial_merge_size^2 placeholders per item, no temporal patching), so the Qwen2-VL
adapter's batch handling applies (``qwen2_vl.py``); its decoder's positions are plain 1-D over the expanded sequence
(the model's own ``_prepare_position_ids_for_generation``), and it takes no ``mm_token_type_ids``: nothing is derived.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """Adapter for ``LlavaOnevision15ForConditionalGeneration``."""

    model_types = ("llava_onevision1_5",)
