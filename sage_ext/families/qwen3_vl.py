"""Qwen3-VL adapter (``Qwen3VLForConditionalGeneration``, and its MoE variant ``Qwen3VLMoeForConditionalGeneration``).

What differs from Qwen2-VL, and where it is handled:
  * M-RoPE layout: interleaved frequency sections, and a video is split per frame (the processor writes
    ``<t seconds> <vision_start> frame <vision_end>`` for every temporal patch; ``get_rope_index`` splits
    ``video_grid_thw`` to match, each frame at one temporal position). The positions are the model's own
    (``_prepare_position_ids_for_generation``: a text row and three rope rows), and every token after the prompt
    continues each row from the prompt's last position (``FamilyAdapter.prefill_position_ids``), so none of this
    is re-derived here. With the processor's layout the text after a frame always starts past the frame's largest
    position, so the prompt's last position is its largest on every row.
  * DeepStack: the vision tower's intermediate features are added to the hidden states of the visual rows after
    the first decoder layers (``visual_pos_masks`` / ``deepstack_visual_embeds``, passed to the text decoder).
    The prompt forward is the model's own, so the target's prompt is exact; tokens after the prompt are text and
    get no visual features, as in ``generate``. Draft-side pruning carries the kept visual rows' DeepStack
    features into the kept-rows forward (``sage_ext.pruning.forward_kept``).
Without ``mm_token_type_ids`` (a hand-built prompt) ``generate`` gives every token 1-D text positions, images and
videos included; the engine does the same, so the output stays ``generate``'s.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
