"""Draft-side visual token pruning (SpecVLM, arXiv 2508.16201; used by SAGE).

The draft sees only a small share of the image/video tokens; the target always sees everything.

1. Scoring. While the TARGET runs its ordinary prefill, :class:`VisualAttentionScorer` hooks the
   attention layers of its text decoder and measures the attention every prompt position receives
   from the text-prompt queries (the text tokens after the first visual token), averaged over heads,
   queries and layers. No transformers code is patched: forward hooks on each attention module's
   ``q_proj`` / ``k_proj`` capture the projections the model computes anyway, and a forward hook on
   the attention module (which receives the layer's ``position_embeddings``) applies the family's
   own rotary embedding and computes ``softmax(q k^T * scaling)`` for the T query rows only.
   Cost: per layer a ``[H, T, L]`` score block (T = text queries, L = prompt length), i.e. ~T/L of
   the prefill's attention FLOPs, and no second target forward. (The alternative, a separate
   ``output_attentions=True`` eager pass, costs a whole second target prefill and ``H * L^2``
   floats per layer; the tests use it as the oracle.) Works with sdpa and eager attention; assumes
   the Llama-style attention module layout (``q_proj``, ``k_proj``, optional ``q_norm`` / ``k_norm``,
   rotary from ``position_embeddings``), which every supported family's text decoder has. Sliding-
   window layers are scored as full causal attention.
2. Selection (:func:`select_visual_tokens`). ``budget = round_half_up((1 - ratio) * n_visual)``;
   keep the smallest top-score set holding 40 % of the total score (capped at the budget), then fill
   the rest of the budget with evenly spaced tokens among the remaining visual tokens. Text tokens are
   always kept. ``ratio = 0`` keeps everything.
3. Draft prefill. The family adapters' ``prefill(inputs, cache, keep=mask)`` call :func:`forward_kept`
   (``sage_ext/families/model_access.py``, re-exported here with ``multimodal_embeddings`` and ``text_decoder``):
   it builds the draft's full ``inputs_embeds`` through the model's own embedding + vision path
   (:func:`multimodal_embeddings`), keeps the selected rows and runs the draft on them with their
   ORIGINAL positions, so a later token at sequence index ``s`` still has rope position
   ``s + position_offset`` while the draft cache only holds ``keep.sum()`` entries. Families that feed
   visual features into later decoder layers too (Qwen3-VL's DeepStack) get the kept visual rows' features.

1 and 2 as one call: :func:`scored_prefill` (what the engine runs, timing the target's and the draft's prefill
apart); 1-3 as one call for a decoding loop: :func:`prefill_with_pruning`.
"""
from __future__ import annotations

import inspect
import math
import sys
from typing import Any, NamedTuple

import torch

from .families.model_access import forward_kept, multimodal_embeddings, text_decoder

DEFAULT_PRUNE_RATIO = 0.85
TOP_MASS_FRACTION = 0.4

__all__ = [
    "DEFAULT_PRUNE_RATIO",
    "TOP_MASS_FRACTION",
    "PrunedPrefill",
    "VisualAttentionScorer",
    "default_query_mask",
    "forward_kept",
    "multimodal_embeddings",
    "prefill_with_pruning",
    "scored_prefill",
    "pruning_budget",
    "select_visual_tokens",
    "text_decoder",
]


# ---------------------------------------------------------------------------------------------
# selection rule
# ---------------------------------------------------------------------------------------------

def pruning_budget(n_visual: int, ratio: float) -> int:
    """Visual tokens the draft keeps: ``round_half_up((1 - ratio) * n_visual)``; ``ratio`` in [0, 1]."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    # the 1e-9 absorbs float error such as (1 - 0.85) * 100 = 15.000000000000002 vs 14.999999...
    return min(n_visual, int(math.floor((1.0 - ratio) * n_visual + 0.5 + 1e-9)))


def select_visual_tokens(scores: torch.Tensor, visual_mask: torch.Tensor, ratio: float = DEFAULT_PRUNE_RATIO,
                         top_mass: float = TOP_MASS_FRACTION) -> torch.Tensor:
    """Choose which prompt positions the draft keeps.

    Args:
        scores: ``[1, L]`` float, importance of each prompt position (only visual entries are read;
            negative values count as 0).
        visual_mask: ``[1, L]`` bool, True at image/video tokens.
        ratio: share of visual tokens to drop (0 disables pruning).
        top_mass: the top-score set is the smallest set (by descending score, ties → lower position)
            whose score sum reaches ``top_mass`` of the total visual score; capped at the budget.

    Returns:
        keep ``[1, L]`` bool: all non-visual positions, the top-score set, and ``budget - |top|``
        evenly spaced visual tokens among the rest: the j-th pick (j = 0..F-1) is remaining token
        ``floor((2j + 1) * R / (2F))`` in position order, R remaining, F to fill.
    """
    if scores.dim() != 2 or scores.shape[0] != 1 or visual_mask.shape != scores.shape:
        raise ValueError(f"scores and visual_mask must both be [1, L]; got {tuple(scores.shape)} "
                         f"and {tuple(visual_mask.shape)}")
    visual_mask = visual_mask.bool()
    keep = ~visual_mask
    visual_idx = visual_mask[0].nonzero().squeeze(1)
    n_visual = visual_idx.numel()
    budget = pruning_budget(n_visual, ratio)
    if budget >= n_visual:
        return torch.ones_like(keep)
    if budget == 0:
        return keep

    visual_scores = scores.detach().to(visual_idx.device)[0, visual_idx].double().clamp_min(0.0)
    order = torch.sort(visual_scores, descending=True, stable=True).indices
    cumulative = visual_scores[order].cumsum(0)
    needed = top_mass * float(cumulative[-1])
    # smallest m with cumulative[m - 1] >= needed (m = 0 when there is no score mass at all)
    n_top = 0 if needed <= 0.0 else min(int((cumulative < needed).sum()) + 1, n_visual)
    n_top = min(n_top, budget)

    chosen = torch.zeros(n_visual, dtype=torch.bool, device=visual_idx.device)
    chosen[order[:n_top]] = True
    n_fill = budget - n_top
    if n_fill > 0:
        remaining = (~chosen).nonzero().squeeze(1)  # position order
        n_remaining = remaining.numel()
        picks = (2 * torch.arange(n_fill, device=visual_idx.device) + 1) * n_remaining // (2 * n_fill)
        chosen[remaining[picks]] = True
    keep[0, visual_idx[chosen]] = True
    return keep


def default_query_mask(visual_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Text-prompt queries: non-visual positions after the first visual token (text before the
    image cannot attend to it). Falls back to the last position when there is none."""
    visual_mask = visual_mask.bool()
    after_first_visual = visual_mask.long().cumsum(-1) > 0
    queries = after_first_visual & ~visual_mask
    if attention_mask is not None:
        queries &= attention_mask.bool()
    empty = ~queries.any(-1)
    queries[:, -1] |= empty
    return queries


# ---------------------------------------------------------------------------------------------
# scoring: target attention from text queries to every prompt position, via forward hooks
# ---------------------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_function(attention: torch.nn.Module):
    """The family's own ``apply_rotary_pos_emb(q, k, cos, sin)`` (handles partial rotary and the like),
    else the standard rotate-half form."""
    family_rope = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    if family_rope is not None:
        if list(inspect.signature(family_rope).parameters)[:3] == ["x", "cos", "sin"]:  # one tensor at a time (Gemma 4)
            return lambda q, k, cos, sin: (family_rope(q, cos, sin), family_rope(k, cos, sin))
        return family_rope

    def standard_rope(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    return standard_rope


class VisualAttentionScorer:
    """Context manager measuring, during one full-prompt forward of ``model``, the attention each
    prompt position receives from the query positions (mean over heads, queries and layers).

    ``with VisualAttentionScorer(target, query_mask) as scorer: target_adapter.prefill(inputs, cache)``
    then ``scorer.scores`` is ``[1, L]`` float32. The wrapped forward must process exactly the L
    prompt tokens starting at cache position 0 (a normal prefill). Batch size 1.
    """

    def __init__(self, model: torch.nn.Module, query_mask: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if query_mask.dim() != 2 or query_mask.shape[0] != 1:
            raise ValueError(f"query_mask must be [1, L], got {tuple(query_mask.shape)}")
        self.layers = text_decoder(model).layers
        self.query_idx = query_mask[0].bool().nonzero().squeeze(1)
        self.seq_len = query_mask.shape[1]
        self.attention_mask = attention_mask
        self._sum: torch.Tensor | None = None
        self._layers_seen = 0
        self._n_heads = 0
        self._handles: list[Any] = []
        self._captured: dict[int, dict[str, torch.Tensor]] = {}

    # -- hooks ---------------------------------------------------------------------------------
    def _capture(self, layer_id: int, name: str):
        def hook(module, args, output):
            self._captured.setdefault(layer_id, {})[name] = output
        return hook

    def _score(self, layer_id: int):
        @torch.no_grad()
        def hook(attention, args, kwargs, output):
            captured = self._captured.pop(layer_id)
            q_full, k_full = captured["q"], captured["k"]
            batch, length, _ = k_full.shape
            if length != self.seq_len:
                raise ValueError(f"VisualAttentionScorer expected a {self.seq_len}-token prefill, got {length}")
            head_dim = attention.head_dim
            query_idx = self.query_idx.to(k_full.device)  # layers may sit on different devices
            q = q_full[:, query_idx].view(batch, query_idx.numel(), -1, head_dim)
            k = k_full.view(batch, length, -1, head_dim)
            if hasattr(attention, "q_norm"):
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, Hkv, L, D]
            cos, sin = kwargs["position_embeddings"]
            rope = _rope_function(attention)
            q, _ = rope(q, q, cos[..., query_idx, :], sin[..., query_idx, :])
            _, k = rope(k, k, cos, sin)
            n_heads, n_kv = q.shape[1], k.shape[1]
            q = q.view(batch, n_kv, n_heads // n_kv, -1, head_dim)  # group query heads by their kv head
            logits = torch.einsum("bgrtd,bgld->bgrtl", q.float(), k.float()) * attention.scaling
            allowed = torch.arange(length, device=k.device)[None, :] <= query_idx[:, None]  # causal
            if self.attention_mask is not None:
                allowed = allowed & self.attention_mask[0].bool().to(k.device)[None, :]
            logits = logits.masked_fill(~allowed, float("-inf"))
            received = logits.softmax(-1).sum(dim=(1, 2, 3))  # [B, L]: summed over heads and queries
            self._sum = received if self._sum is None else self._sum + received.to(self._sum.device)
            self._layers_seen += 1
            self._n_heads = n_heads
        return hook

    def __enter__(self) -> "VisualAttentionScorer":
        # Layers that read another layer's keys (KV sharing: Gemma 4's last layers have no k_proj) are not scored.
        scored = [(layer_id, layer.self_attn) for layer_id, layer in enumerate(self.layers)
                  if hasattr(layer.self_attn, "q_proj") and hasattr(layer.self_attn, "k_proj")]
        if not scored:
            raise NotImplementedError(f"{type(self.layers[0].self_attn).__name__} has no q_proj/k_proj to score from")
        for layer_id, attention in scored:
            self._handles += [
                attention.q_proj.register_forward_hook(self._capture(layer_id, "q")),
                attention.k_proj.register_forward_hook(self._capture(layer_id, "k")),
                attention.register_forward_hook(self._score(layer_id), with_kwargs=True),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    @property
    def scores(self) -> torch.Tensor:
        """``[1, L]`` float32: mean attention received per prompt position."""
        if self._sum is None:
            raise RuntimeError("no forward ran inside the VisualAttentionScorer context")
        return self._sum / (self._layers_seen * self._n_heads * self.query_idx.numel())


# ---------------------------------------------------------------------------------------------
# engine entry point
# ---------------------------------------------------------------------------------------------

class PrunedPrefill(NamedTuple):
    """Results of :func:`prefill_with_pruning`: the two adapters' PrefillResults, the draft's keep
    mask (``None`` when nothing was pruned) and the target's attention scores (``None`` likewise)."""
    target: Any
    draft: Any
    keep: torch.Tensor | None
    scores: torch.Tensor | None


def scored_prefill(target_adapter, inputs: dict, target_cache, ratio: float = DEFAULT_PRUNE_RATIO):
    """The target's ordinary prefill, scoring the visual tokens when pruning is on (1 and 2 above).

    Returns ``(target PrefillResult, keep, scores)``: ``keep`` the ``[1, L]`` mask of prompt positions the draft
    sees (every text position, the top-scored visual ones, and the last position, whose logits give the draft's
    first prediction), ``scores`` the target's attention scores; both ``None`` when ``ratio`` is 0 or the prompt has
    no visual token (then this is a plain prefill)."""
    visual = target_adapter.visual_token_mask(inputs) if ratio > 0.0 else None
    if visual is None or not bool(visual.any()):
        return target_adapter.prefill(inputs, target_cache), None, None
    queries = default_query_mask(visual, inputs.get("attention_mask"))
    with VisualAttentionScorer(target_adapter.model, queries, inputs.get("attention_mask")) as scorer:
        target_result = target_adapter.prefill(inputs, target_cache)
    keep = select_visual_tokens(scorer.scores, visual, ratio)
    keep[:, -1] = True  # the draft's last-position logits must belong to the last prompt token
    return target_result, keep, scorer.scores


def prefill_with_pruning(target_adapter, draft_adapter, inputs: dict, target_cache, draft_cache,
                         ratio: float = DEFAULT_PRUNE_RATIO) -> PrunedPrefill:
    """Prefill target (full prompt, scored) and draft (kept tokens only).

    ``ratio`` = share of visual tokens the draft drops (0 disables; then this is two plain
    prefills). After it, the draft cache holds ``keep.sum()`` entries while sequence indices stay
    those of the full prompt: build the draft's tree mask with ``past_len = draft cache length`` but
    its ``seq_positions`` from the full sequence length (as for the target).
    """
    target_result, keep, scores = scored_prefill(target_adapter, inputs, target_cache, ratio)
    return PrunedPrefill(target_result, draft_adapter.prefill(inputs, draft_cache, keep=keep), keep, scores)
