"""Qwen2-VL and Qwen2.5-VL adapter (M-RoPE: three rotary position axes: time, height, width).

Positions are the model's own (``_prepare_position_ids_for_generation``: a text row and three M-RoPE rows from
``get_rope_index``), and every token after the prompt, tree nodes included, continues each row from the
prompt's last position, as ``generate`` does (``FamilyAdapter.prefill_position_ids``). That is not
``sequence index + rope_deltas``: after a video whose temporal span exceeds its spatial advance the prompt's last
position is below its largest one. Every call passes explicit ``position_ids``, so the ``rope_deltas`` the HF
model caches on itself are never read here (and are restored after the prompt positions are computed).

``mm_token_type_ids`` (text 0, image 1, video 2) is what ``get_rope_index`` groups tokens by; when the
inputs lack it (a hand-built prompt), ``generate`` gives the prompt 1-D positions, and so does the engine: nothing is
derived (an adapter that derived them decoded such prompts with multimodal positions, other tokens than
``generate``'s: tests/test_families_more.py::test_qwen_prompt_without_token_types_decodes_as_generate).

In a batch, images and videos are concatenated: ``pixel_values`` holds t*h*w patch rows per ``image_grid_thw``
row and the image t*h*w / spatial_merge_size**2 placeholders (videos alike: ``pixel_values_videos``,
``video_grid_thw``, ``second_per_grid_ts``).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import BatchMedia, FamilyAdapter


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

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        merge = self.config.vision_config.spatial_merge_size ** 2
        media = []
        for name, token_id, grid_key, pixel_key, item_keys in (
            ("image", self.image_token_id, "image_grid_thw", "pixel_values", ()),
            ("video", self.video_token_id, "video_grid_thw", "pixel_values_videos", ("second_per_grid_ts",)),
        ):
            if not isinstance(inputs.get(grid_key), Tensor):
                continue
            patches = inputs[grid_key].prod(-1).tolist()
            # per-item values may come as a list (the Qwen2.5-VL processor's second_per_grid_ts): cut alike
            rows = {key: [1] * len(patches) for key in (grid_key, *item_keys)
                    if isinstance(inputs.get(key), (Tensor, list, tuple))}
            if isinstance(inputs.get(pixel_key), Tensor):
                rows[pixel_key] = patches
            media.append(BatchMedia(name, token_id, [count // merge for count in patches], rows))
        return media
