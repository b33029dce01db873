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
``split_batch`` turns a batch of processor outputs into each row's own inputs (families declare their media
with ``batch_media``, or override ``split_media`` when their media tensors are batch-first).

Models are used as loaded (device, dtype, device_map); nothing inside transformers is patched.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .model_access import cache_kwarg, forward_kept, text_decoder
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


@dataclass
class BatchMedia:
    """Media items of one kind (images, videos) concatenated over a batch, in prompt order (row 0's first).

    ``tokens[i]``: the ``token_id`` placeholders of item i in the prompt; ``rows[key][i]``: the leading rows of
    ``inputs[key]`` that hold item i (1 per image in ``pixel_values [num_images, ...]``; t*h*w patches in Qwen's;
    a list, as processors give some per-item values, is cut alike).
    """

    name: str
    token_id: int
    tokens: list[int]
    rows: dict[str, list[int]]

    def split(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> list[dict[str, Tensor]]:
        """Each row's items: the next ones in order whose placeholders add up to the row's; ValueError when the
        counts do not add up."""
        edges = {key: [0, *itertools.accumulate(rows)] for key, rows in self.rows.items()}  # item i: [e[i], e[i+1])
        for key, edge in edges.items():
            if len(inputs[key]) != edge[-1]:
                raise ValueError(f"{key} has {len(inputs[key])} leading rows but the {len(self.tokens)} "
                                 f"{self.name}(s) need {edge[-1]}: the {self.name} counts do not add up")
        bounds = [0, *itertools.accumulate(self.tokens)]  # placeholders before item i
        parts, first = [], 0
        for b, ids in enumerate(row_ids):
            count = int((ids == self.token_id).sum())
            end = bisect.bisect_left(bounds, bounds[first] + count, lo=first)
            if end == len(bounds) or bounds[end] != bounds[first] + count:
                raise ValueError(f"row {b} holds {count} {self.name} placeholders (token {self.token_id}), not whole "
                                 f"{self.name}s of the batch (the next take {self.tokens[first:first + 4]} each): the "
                                 f"{self.name} counts do not add up")
            part = {key: inputs[key][edge[first]:edge[end]] for key, edge in edges.items()}
            parts.append(part if end > first else {})
            first = end
        if first != len(self.tokens):
            raise ValueError(f"the batch has {len(self.tokens)} {self.name}s but the rows' placeholders cover only "
                             f"{first}: the {self.name} counts do not add up")
        return parts


def fixed_count_images(inputs: dict[str, Any], token_id: int, tokens_per_image: int | list[int]) -> list[BatchMedia]:
    """``batch_media`` of families with ``tokens_per_image`` placeholders per image (or a count for each image) and
    ``pixel_values [num_images, ...]`` (and ``image_sizes``, if given) concatenated over the batch."""
    if not isinstance(inputs.get("pixel_values"), Tensor):
        return []
    count = inputs["pixel_values"].shape[0]
    keys = [key for key in ("pixel_values", "image_sizes") if isinstance(inputs.get(key), Tensor)]
    tokens = tokens_per_image if isinstance(tokens_per_image, list) else [tokens_per_image] * count
    return [BatchMedia("image", token_id, tokens, {key: [1] * count for key in keys})]


def token_id_list(value: Any) -> list[int]:
    """Token ids given as ``generate`` takes them (an int, a list / tuple / set, a tensor or a NumPy array of them;
    None: none) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    elif hasattr(value, "tolist"):  # a NumPy array or scalar
        value = value.tolist()
    return [int(e) for e in (value if isinstance(value, (list, tuple, set)) else [value])]


def height_width(size: Any) -> tuple[int, int]:
    """A vision config's image or patch size (an int, or ``(height, width)``) as ``(height, width)``."""
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def left_padding_starts(attention_mask: Tensor | None, batch: int, length: int) -> list[int]:
    """Where each row's tokens start (its number of left-padding positions); ValueError unless every row of
    ``attention_mask`` is zeros then ones with at least one one."""
    if attention_mask is None:
        return [0] * batch
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has {(batch, length)}")
    starts = length - attention_mask.long().sum(-1)
    left_padded = torch.arange(length, device=attention_mask.device) >= starts[:, None]
    if not torch.equal(attention_mask, left_padded.to(attention_mask.dtype)):
        raise ValueError("the batch must be left-padded (each attention_mask row zeros then ones), e.g. "
                         "processor(..., padding_side='left'); got right padding or holes")
    empty = (starts == length).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty} of the batch hold no token (attention_mask all zeros)")
    return starts.tolist()


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


def _mask_building_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward builds a model's attention masks: its text decoder and, for a vision-language
    model, the multimodal base model around it (``model.model``)."""
    decoder = text_decoder(model)
    base = getattr(model, "model", None)
    return [decoder] if base is None or base is decoder else [base, decoder]


@functools.lru_cache(maxsize=None)
def _takes_masks_per_layer_type(module_class: type) -> bool:
    """Whether ``module_class.forward`` takes its masks prepared as a dict per layer type (transformers writes
    ``if not isinstance(causal_mask_mapping := attention_mask, dict):`` in every decoder of mixed layers)."""
    try:
        source = inspect.getsource(module_class.forward)
    except (OSError, TypeError):
        return False
    return "causal_mask_mapping := attention_mask, dict" in source


def learned_position_limit(model: torch.nn.Module, text_config) -> int | None:
    """How many positions the decoder's learned absolute position table embeds (GPT-2's ``wpe``, OPT's
    ``embed_positions``: an embedding of ``max_position_embeddings`` rows of the hidden size, OPT's two more), or None
    when positions are rotary or ALiBi (nothing to run past: ``max_position_embeddings`` is then no hard limit)."""
    limit = getattr(text_config, "max_position_embeddings", None)
    hidden = getattr(text_config, "hidden_size", None)
    if not isinstance(limit, int) or hidden is None:
        return None
    tokens = model.get_input_embeddings()
    for module in model.modules():
        if (isinstance(module, torch.nn.Embedding) and module is not tokens and module.embedding_dim == hidden
                and module.num_embeddings in (limit, limit + 2)):
            return limit
    return None


class FamilyAdapter:
    """Adapter for one model family; one instance per model (it remembers the prompt's position offset).

    ``model_types`` lists the ``config.model_type`` values the adapter serves; ``sage_ext.families.get_adapter``
    picks the adapter from it.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: whether the model reads images or videos (a vision-language family); False for text-only causal LMs, which
    #: may draft for a vision-language target (``prefill_text``)
    reads_media: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.position_offset: int | Tensor = 0
        self.cache_kwarg = cache_kwarg(model)
        self.position_limit = learned_position_limit(model, self.text_config)
        #: whether tree forwards block what lies outside the decoder's sliding window (``tree_attention_masks``):
        #: the engine sets it for its target, whose output depends on it; a draft's forwards attend to everything
        #: its cache holds (its window changes only its proposals, and a pruned or text-only draft's cache columns
        #: are not its sequence indices)
        self.applies_window = False

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
        """Width of the logits the model returns (the lm_head's rows; may include padding rows). Read from the
        head's ``out_features`` where it has one: a quantized head's ``weight`` is a method, not a tensor."""
        head = self.model.get_output_embeddings()
        rows = getattr(head, "out_features", None)
        if rows is None:
            weight = head.weight
            rows = (weight() if callable(weight) else weight).shape[0]
        return int(rows)

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as ``generate`` reads them: the generation config's (None there: no EOS, even when the
        model config names one); the model config's only for a model without a generation config."""
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            return token_id_list(generation_config.eos_token_id)
        return token_id_list(getattr(self.text_config, "eos_token_id", None))

    def special_token_ids(self) -> list[int]:
        """Ids the engine may feed or emit that both vocabularies of a same-family pair must hold (eos, bos, pad,
        media tokens)."""
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

    def sliding_layers_only(self) -> bool:
        """Whether every attention layer of the decoder slides (Mistral: one ``sliding_window``, no ``layer_types``),
        so one windowed mask serves them all."""
        layer_types = getattr(self.text_config, "layer_types", None)
        return layer_types is None or all(kind == "sliding_attention" for kind in layer_types)

    def window_refusal(self, tree_depth: int) -> str | None:
        """Why tree forwards cannot give the decoder's sliding layers their window (``tree_attention_masks``), or
        None when they can (or no layer slides). A decoder of sliding and full layers needs a mask per layer type,
        which transformers' forwards take as a dict (``{"full_attention": ..., "sliding_attention": ...}``, as
        ``generate`` may prepare them); and the window must be longer than a tree, so that a node's ancestors stay
        inside it (the window is applied by cache column, which is a node's sequence index only for the past)."""
        window = self.sliding_window()
        if window is None:
            return None
        name = type(self.model).__name__
        if not self.sliding_layers_only() and not all(
                _takes_masks_per_layer_type(type(module)) for module in _mask_building_modules(self.model)):
            return (f"{name} has sliding-window and full layers (window {window}) and its forward does not take a "
                    f"prepared mask per layer type, so a token tree cannot be given the window")
        if window <= tree_depth + 1:
            return f"{name}'s sliding window ({window}) is not longer than a token tree ({tree_depth} deep)"
        return None

    def tree_attention_masks(self, mask_4d: Tensor, seq_positions: Tensor) -> Tensor | dict[str, Tensor]:
        """The tree forward's attention mask(s): ``mask_4d`` as it is when no layer slides (or ``applies_window`` is
        off: a draft); with a sliding window ``w``, also blocking every column at or before ``seq_positions - w`` (a
        query at sequence index q sees keys at ``q - w < k``, transformers' ``sliding_window_overlay``), for every
        layer when all slide, else as the ``"sliding_attention"`` entry beside the plain ``"full_attention"`` one. Cache column c of a row holds its
        sequence index c up to the tree, and the tree's own columns are all inside the window
        (``window_refusal``). No host sync: one comparison on the device."""
        window = self.sliding_window() if self.applies_window else None
        if window is None:
            return mask_4d
        columns = torch.arange(mask_4d.shape[-1], device=mask_4d.device)
        outside = columns <= (seq_positions.to(mask_4d.device) - window)[:, None, :, None]
        windowed = mask_4d.masked_fill(outside, torch.finfo(mask_4d.dtype).min)
        if self.sliding_layers_only():
            return windowed
        return {"full_attention": mask_4d, "sliding_attention": windowed}

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

    def rope_span(self, inputs: dict[str, Any], max_new_tokens: int, depth_bound: int) -> tuple[int, int] | None:
        """``(largest prompt position, bound of the largest position a forward of this generation reaches)`` with
        trees up to ``depth_bound`` deep, for a decoder with a position-dependent rope; None for any other (the
        prompt's positions are computed only then)."""
        if not position_dependent_ropes(self.text_config):
            return None
        positions, offset = self.prefill_position_ids(self.prefill_inputs(inputs))
        length = inputs["input_ids"].shape[1]
        # the deepest node of the last possible step: root at sequence index L + max_new - 2, depth_bound below it
        deepest = length + max_new_tokens - 2 + depth_bound + int(torch.as_tensor(offset).max())
        prompt_max = int(positions.max())
        return prompt_max, max(deepest, prompt_max)

    @property
    def reencodes_at_rope_threshold(self) -> bool:
        """Whether the model's ``generate`` drops its cache and re-encodes the whole sequence when it first passes
        its longrope threshold (Phi-3's ``prepare_inputs_for_generation``): then even one-token steps on a kept
        cache would not reproduce ``generate``."""
        try:
            source = inspect.getsource(type(self.model).prepare_inputs_for_generation)
        except (OSError, TypeError):
            return False
        return "original_max_position_embeddings" in source

    def rope_refusal(self, inputs: dict[str, Any], max_new_tokens: int, depth_bound: int) -> str | None:
        """Why trees up to ``depth_bound`` deep would not reproduce ``generate``'s output under the decoder's rope
        scaling (a position-dependent type reached or crossed: ``support.rope_refusal``), or None. One-token steps
        (``depth_bound`` 0) follow ``generate`` unless the model re-encodes at the threshold."""
        if depth_bound < 1 and not self.reencodes_at_rope_threshold:
            return None
        span = self.rope_span(inputs, max_new_tokens, depth_bound)
        return None if span is None else rope_refusal(type(self.model).__name__, self.text_config, *span, depth_bound)

    # ------------------------------------------------------------------ forwards
    def prefill_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor outputs passed to the prompt forward (None values dropped)."""
        return {key: value for key, value in inputs.items() if value is not None}

    def rope_position_ids(self, seq_positions: Tensor) -> Tensor:
        """Position ids for tokens at sequence indices ``seq_positions [1, n]`` after the prompt:
        ``seq_positions + position_offset`` (``[1, n]``, or ``[R, 1, n]`` when the model has R position rows).

        Floored at 0: a batched or shape-padded forward's padding slots sit at sequence index 0, which a negative
        offset (a text draft's, an M-RoPE prompt's) puts below 0, and a model with learned absolute positions
        (GPT-2) cannot embed that; every real token's position is >= 0 and unchanged.

        Capped at the last row of a learned position table (``position_limit``): only tree nodes deeper than any
        token the target emits reach past it (``_check_row_fits`` refuses a target whose emitted tokens would), and a
        draft's positions past it change only its proposals, never the output."""
        positions = (seq_positions + self.position_offset).clamp_min(0)
        return positions if self.position_limit is None else positions.clamp_max(self.position_limit - 1)

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

    def prefill_text(self, input_ids: Tensor, keep: Tensor, cache) -> PrefillResult:
        """Prefill a text-only model drafting for a vision-language target: the prompt's kept tokens
        ``input_ids[keep]`` (``keep``: bool ``[1, L]``, the target's text tokens) as a prompt of their own, at the
        positions the model would give that text alone (0, 1, ...). The tokens after the prompt go on from there:
        sequence index ``s >= L`` sits at ``s - (L - kept)``, which ``position_offset`` holds. (Visual pruning
        keeps the original positions instead, ``prefill(keep=...)``: there the draft reads the same positions as
        the target, media included; a text model's positions should not jump over media it never saw, nor run
        past its own context because the target's media are long.)"""
        kept_ids = input_ids[:, keep[0].to(input_ids.device)]
        result = self.prefill({"input_ids": kept_ids}, cache)
        self.position_offset = result.position_offset + (kept_ids.shape[1] - input_ids.shape[1])
        return PrefillResult(result.logits_last, self.position_offset)

    def forward_tree(self, tokens: Tensor, seq_positions: Tensor, mask_4d: Tensor, cache) -> Tensor:
        """Forward tree nodes on top of ``cache``; returns logits ``[1, n, V]``.

        tokens ``[1, n]``; seq_positions ``[1, n]`` sequence index of each node; mask_4d additive float
        ``[1, 1, n, cache_len + n]``, all on ``input_device``. The nodes' keys/values are appended to ``cache``.
        """
        out = self.model(
            input_ids=tokens,
            position_ids=self.rope_position_ids(seq_positions),
            attention_mask=self.tree_attention_masks(mask_4d, seq_positions),
            **{self.cache_kwarg: cache},
            use_cache=True,
        )
        return out.logits

    def visual_token_mask(self, inputs: dict[str, Any]) -> Tensor | None:
        """bool ``[1, L]``: which prompt tokens are image/video tokens (None for text-only families)."""
        return None

    # ------------------------------------------------------------------ batches
    def split_batch(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Split a left-padded batch of processor outputs into what the processor returns for each row alone.

        ``input_ids [B, L]`` and every per-token tensor (``[B, L, ...]``: attention_mask, token_type_ids,
        mm_token_type_ids, ...) are cut to the row without its left padding (``attention_mask`` zeros then ones;
        absent: no padding); media tensors go to the rows whose placeholders they fill (``split_media``; a row
        without media gets no media keys); other values pass through unchanged. ValueError for right padding or
        holes, an empty row, a tensor that fits neither rule (named), and media counts that do not add up to the
        rows' placeholders. A batch of one without padding comes back as it is.
        """
        input_ids = inputs["input_ids"]
        batch, length = input_ids.shape
        starts = left_padding_starts(inputs.get("attention_mask"), batch, length)
        if batch == 1 and starts[0] == 0:
            return [dict(inputs)]
        media, media_keys = self.split_media(inputs, [input_ids[b, start:] for b, start in enumerate(starts)])
        rows: list[dict[str, Any]] = [{} for _ in range(batch)]
        for key, value in inputs.items():
            per_token = isinstance(value, Tensor) and tuple(value.shape[:2]) == (batch, length)
            if isinstance(value, Tensor) and key not in media_keys and not per_token:
                raise ValueError(f"cannot split {key!r} (shape {tuple(value.shape)}) into the rows of a {batch} x "
                                 f"{length} batch: neither a per-token tensor [B, L, ...] nor media of this family")
            for b, row in enumerate(rows):
                if key in media_keys:
                    if key in media[b]:
                        row[key] = media[b][key]
                else:
                    row[key] = value[b:b + 1, starts[b]:] if per_token else value
        return rows

    def split_media(self, inputs: dict[str, Any], row_ids: list[Tensor]) -> tuple[list[dict[str, Tensor]], set[str]]:
        """Each row's media tensors (``row_ids``: the rows' tokens without padding) and the keys they come from.
        Default: the items of ``batch_media``, each row taking the next ones whose placeholders it holds."""
        rows: list[dict[str, Tensor]] = [{} for _ in row_ids]
        keys: set[str] = set()
        for media in self.batch_media(inputs):
            keys |= media.rows.keys()
            for row, part in zip(rows, media.split(inputs, row_ids)):
                row.update(part)
        return rows, keys

    def batch_media(self, inputs: dict[str, Any]) -> list[BatchMedia]:
        """The media concatenated over the batch in ``inputs``, one ``BatchMedia`` per kind (none: text-only)."""
        return []
