"""Shared base of the families whose prompt mask depends on ``token_type_ids`` (Gemma 3: bidirectional attention
inside each image; PaliGemma: a bidirectional prefix; Gemma 4: the same from ``mm_token_type_ids``).

The prompt forward is the model's own, with the processor's ``token_type_ids``, so the prompt's keys/values are
exactly what ``generate`` computes. Everything after the prompt is text that attends to all earlier tokens: the
tree forwards' additive 4-D mask (which transformers' masking utilities pass through as given) is all they need,
as in ``generate``, which drops ``token_type_ids`` after the prompt.

Draft-side pruning keeps that structure: the kept rows' ``token_type_ids`` go with them into the kept-rows
forward (``kept_token_inputs``), so kept image tokens still attend to each other (and to the kept prefix) both ways.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FamilyAdapter, PrefillResult
from .model_access import forward_kept

class TokenTypeAdapter(FamilyAdapter):
    """Base of the adapters of ``token_type_ids`` families (no model types of its own)."""

    #: the per-token inputs that travel with the kept rows of a pruned prefill
    kept_token_inputs: tuple[str, ...] = ("token_type_ids",)

    def prefill(self, inputs: dict[str, Any], cache, keep: Tensor | None = None) -> PrefillResult:
        if keep is None:
            return super().prefill(inputs, cache)
        model_inputs = self.prefill_inputs(inputs)
        position_ids, offset = self.prefill_position_ids(model_inputs)
        out = forward_kept(self.model, model_inputs, cache, keep, position_ids, token_inputs=self.kept_token_inputs)
        self.position_offset = offset
        return PrefillResult(out.logits[:, -1], offset)

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor:
        return inputs["input_ids"] == self.config.image_token_id
