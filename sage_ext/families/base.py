"""Base class of the family adapters: how the engine talks to one HuggingFace model.

The engine never calls a model directly. It asks the model's adapter to
  * ``prefill`` the prompt (any processor outputs: pixel values, grids, ...) into a ``DynamicCache``,
    optionally keeping only some prompt positions (draft-side visual token pruning), and
  * ``forward_tree`` a set of tree nodes on top of the cache, given the nodes' *sequence indices*
    (index of the token in the full prompt + generated sequence) and an additive float tree mask.
The adapter turns sequence indices into the family's position ids (1-D RoPE, M-RoPE, ...), so the engine
stays family-agnostic. Subclasses usually override only a few hooks: ``rope_position_ids`` (position
ids from sequence indices), ``prefill_position_ids`` (the prompt's positions and offset) and
``visual_token_mask``; families with their own position scheme (M-RoPE) override ``prefill`` too.

Models are used as loaded (device, dtype, device_map); nothing inside transformers is patched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .model_access import cache_kwarg, forward_kept
from .support import position_dependent_ropes, rope_refusal

# Attention backends that take an arbitrary additive 4-D mask and give exact results (flash-attention kernels take
# no arbitrary mask: docs/ENGINE.md, API).
TREE_MASK_ATTENTION = ("eager", "sdpa")


@dataclass
class PrefillResult:
    """What a prompt forward returns to the engine.

    logits_last: ``[1, V]`` logits after the last prompt token (predicts the first new token).
    position_offset: int 0 or a tensor ``[..., 1, 1]``; sequence index ``s`` after the prompt has position
        ids ``s + position_offset`` (``FamilyAdapter.prefill_position_ids``).
    extras: family-specific outputs (e.g. attentions asked for by visual pruning).
    """

    logits_last: Tensor
    position_offset: int | Tensor = 0
    extras: dict[str, Any] = field(default_factory=dict)


def causal_mask_4d(num_new: int, past_len: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive float mask ``[1, 1, num_new, past_len + num_new]`` for a causal chain on top of a cache."""
    blocked = torch.finfo(dtype).min
    mask = torch.full((num_new, past_len + num_new), blocked, dtype=dtype, device=device)
    mask[:, :past_len] = 0
    mask[:, past_len:] = torch.triu(mask[:, past_len:], diagonal=1)
    return mask[None, None]


@contextlib.contextmanager
def _kept_rope_deltas(model: torch.nn.Module):
    """Restore the ``rope_deltas`` attribute that M-RoPE models (Qwen2-VL, ...) set on their inner model while
    computing prompt positions: the engine passes explicit positions to every forward and leaves the model's
    state as it found it."""
    holder = getattr(model, "model", None)
    had = holder is not None and hasattr(holder, "rope_deltas")
    saved = getattr(holder, "rope_deltas", None) if had else None
    try:
        yield
    finally:
        if had:
            holder.rope_deltas = saved


class FamilyAdapter:
    """Adapter for one model family; one instance per model (it remembers the prompt's position offset).

    ``model_types`` lists the ``config.model_type`` values the adapter serves; ``sage_ext.families.get_adapter``
    picks the adapter from it.
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.position_offset: int | Tensor = 0
        self.cache_kwarg = cache_kwarg(model)

    # ------------------------------------------------------------------ facts about the model
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        """The decoder's config (the model's own config for plain causal LMs)."""
        return self.model.config.get_text_config(decoder=True)

    @property
    def family(self) -> str:
        return type(self).__name__

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings (where input ids must go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the decoder activations (the tree mask uses it)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        """Width of the logits the model returns (the lm_head's rows; may include padding rows)."""
        return self.model.get_output_embeddings().weight.shape[0]

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from the generation config (falls back to the model config)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.text_config, "eos_token_id", None)
        if eos is None:
            return []
        if isinstance(eos, Tensor):
            eos = eos.tolist()
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def special_token_ids(self) -> list[int]:
        """Ids the engine may feed or emit that both vocabularies must hold (eos, bos, pad, media tokens)."""
        ids = list(self.eos_token_ids())
        for cfg in (self.config, self.text_config):
            for name in ("bos_token_id", "pad_token_id", "image_token_id", "image_token_index", "video_token_id"):
                value = getattr(cfg, name, None)
                if isinstance(value, int) and value >= 0:
                    ids.append(value)
        return sorted(set(ids))

    def sliding_window(self) -> int | None:
        """The smallest sliding-attention window of the decoder, or None when every layer attends fully."""
        cfg = self.text_config
        window = getattr(cfg, "sliding_window", None)
        if window is None:
            return None
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if getattr(cfg, "use_sliding_window", True) is False:
            return None
        return int(window)

    def check_supported(self) -> None:
        """Raise ValueError when the model cannot run tree attention as loaded."""
        impl = getattr(self.text_config, "_attn_implementation", None) or getattr(
            self.config, "_attn_implementation", None
        )
        if impl is not None and impl not in TREE_MASK_ATTENTION:
            raise ValueError(
                f"{type(self.model).__name__} uses attn_implementation={impl!r}, which cannot take the additive "
                f"tree attention mask that speculative tree verification needs. Load the model with "
                f"attn_implementation='sdpa' (or 'eager'); sage_ext does not switch it for you."
            )

    def rope_refusal(self, inputs: dict[str, Any], max_new_tokens: int, depth_bound: int) -> str | None:
        """Why trees up to ``depth_bound`` deep would not reproduce ``generate``'s output under the decoder's rope
        scaling (a position-dependent type reached or crossed: ``support.rope_refusal``), or None. Decided from the
        config; the prompt's positions are computed only for models with such a rope."""
        if depth_bound < 1 or not position_dependent_ropes(self.text_config):
            return None
        positions, offset = self.prefill_position_ids(self.prefill_inputs(inputs))
        length = inputs["input_ids"].shape[1]
        # the deepest node of the last possible step: root at sequence index L + max_new - 2, depth_bound below it
        deepest = length + max_new_tokens - 2 + depth_bound + int(torch.as_tensor(offset).max())
        prompt_max = int(positions.max())
        return rope_refusal(type(self.model).__name__, self.text_config, prompt_max, max(deepest, prompt_max))

    # ------------------------------------------------------------------ forwards
    def prefill_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor outputs passed to the prompt forward (None values dropped)."""
        return {key: value for key, value in inputs.items() if value is not None}

    def rope_position_ids(self, seq_positions: Tensor) -> Tensor:
        """Position ids for tokens at sequence indices ``seq_positions [1, n]`` after the prompt:
        ``seq_positions + position_offset`` (``[1, n]``, or ``[R, 1, n]`` when the model has R position rows)."""
        return seq_positions + self.position_offset

    def prefill_position_ids(self, inputs: dict[str, Any]) -> tuple[Tensor, int | Tensor]:
        """The prompt's position ids as ``generate`` computes them, and the offset of the tokens after it.

        The positions are the model's own ``_prepare_position_ids_for_generation`` (``[1, L]``; ``[4, 1, L]``
        for Qwen2-VL-style M-RoPE: a text row and three rope axes), so a family's position rule is never
        re-derived here. ``generate`` places each new token at the previous one's position + 1, row by row;
        so sequence index ``s >= L`` sits at ``positions[..., -1] + (s - L + 1)``, i.e. ``s + offset`` with
        ``offset = positions[..., -1:] - (L - 1)`` (an int 0 when that is 0 on a single row: plain RoPE).
        """
        input_ids = inputs["input_ids"]
        length = input_ids.shape[1]
        prepare = getattr(self.model, "_prepare_position_ids_for_generation", None)
        if prepare is None:
            return torch.arange(length, device=input_ids.device)[None], 0
        model_kwargs = {key: value for key, value in inputs.items() if key != "input_ids"}
        with _kept_rope_deltas(self.model):  # M-RoPE models cache rope_deltas on themselves: not our business
            positions = prepare(input_ids, model_kwargs)
        offset = positions[..., -1:] - (length - 1)
        if positions.dim() == 2 and not bool(offset.any()):  # one host read per prompt
            return positions, 0
        return positions, offset

    def prefill(self, inputs: dict[str, Any], cache, keep: Tensor | None = None) -> PrefillResult:
        """Run the prompt through the model, filling ``cache``.

        ``keep``: optional bool ``[1, L]``; only those prompt positions enter the cache (they keep their
        original positions). Used for draft-side visual token pruning (``sage_ext.pruning``).
        """
        model_inputs = self.prefill_inputs(inputs)
        position_ids, offset = self.prefill_position_ids(model_inputs)
        if keep is None:
            out = self.model(**model_inputs, position_ids=position_ids, **{self.cache_kwarg: cache}, use_cache=True,
                             logits_to_keep=1)
        else:
            out = forward_kept(self.model, model_inputs, cache, keep, position_ids)
        self.position_offset = offset
        return PrefillResult(out.logits[:, -1], offset)

    def forward_tree(self, tokens: Tensor, seq_positions: Tensor, mask_4d: Tensor, cache) -> Tensor:
        """Forward tree nodes on top of ``cache``; returns logits ``[1, n, V]``.

        tokens ``[1, n]``; seq_positions ``[1, n]`` sequence index of each node; mask_4d additive float
        ``[1, 1, n, cache_len + n]``, all on ``input_device``. The nodes' keys/values are appended to ``cache``.
        """
        out = self.model(
            input_ids=tokens,
            position_ids=self.rope_position_ids(seq_positions),
            attention_mask=mask_4d,
            **{self.cache_kwarg: cache},
            use_cache=True,
        )
        return out.logits

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor | None:
        """bool ``[1, L]``: which prompt tokens are image/video tokens (None for text-only families)."""
        return None
