"""The speculative decoding engine: one loop for every tree policy, batch size 1.

A step (see docs/ENGINE.md for the full story):
  1. The policy builds a draft tree. The root is the last committed token, which is in neither KV cache
     yet. The draft's first forward of the step feeds the committed tokens it has not processed plus the
     root; then one draft forward per level over the level's frontier, with the tree mask on top of its cache.
  2. The target verifies the whole tree in one forward (rows at cache positions ``past_len .. past_len+N-1``,
     rope positions ``sequence index + depth``), and ``verify_greedy`` / ``verify_sampling`` pick the
     accepted path and the bonus token (target's own next token).
  3. ``kv_compact_`` moves the accepted rows of both caches to contiguous positions; the new tokens are
     written to a device-side sequence buffer; ONE small int64 tensor (accepted length, draft-processed
     count, tree size, root alpha, the new tokens) is read to the host — the step's only sync.
  4. Host: crop both caches, stop checks (EOS, stop strings, max_new_tokens), streamer, policy feedback.
     The bonus is the next step's root.

Models are used as loaded (any device / dtype / device_map); nothing in transformers is patched.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from . import ops
from .families import FamilyAdapter, causal_mask_4d, get_adapter
from .policies import TreePolicy, make_policy
from .stats import GenerationStats, StepRecord, Timeline

#: Target and draft vocabularies may differ by at most this many (padding) rows.
DEFAULT_MAX_VOCAB_PADDING = 256

# Layout of the per-step host read: [accept_len, draft_processed, real_tree_nodes, alpha_bits, new tokens...]
_HEADER = 4


class GenerationOutput(NamedTuple):
    """``sequences``: LongTensor ``[1, prompt_len + new_tokens]`` (like HF ``generate``); ``stats``."""

    sequences: Tensor
    stats: GenerationStats


@dataclass
class StepDebug:
    """What a test hook sees after every step (caches already compacted and cropped)."""

    step: int
    sequence: list[int]  # committed tokens (prompt + generated)
    target_cache: Any
    draft_cache: Any
    draft_done: int  # sequence tokens the draft cache holds (pruned prompt positions count as held)
    tree_tokens: Tensor
    tree_parents: Tensor
    tree_logprobs: Tensor
    accepted: Tensor
    tau: int
    finished: bool
    draft_keep: Tensor | None  # prompt positions the draft saw (visual pruning), None = all


def _cache_tensors(cache) -> dict[torch.device, list[Tensor]]:
    """Every layer's keys and values of a DynamicCache, grouped by device (kv_compact_ takes one device)."""
    groups: dict[torch.device, list[Tensor]] = {}
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        groups.setdefault(keys.device, []).extend((keys, layer.values))
    return groups


def _crop(cache, length: int) -> None:
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def _float_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


class DraftRound:
    """Per-generation tree state and draft driver handed to the policies (``ctx``).

    Tree state lives in preallocated tensors of ``capacity`` slots: ``tokens, parents [1, cap]`` int64 and
    ``logprobs, cum_logprobs [1, cap]`` float32 (node 0 = root), and ``node_row [cap + 1]``: the draft-cache
    row (relative to the root's row) of every node the draft processed this step, -1 otherwise; its extra
    last entry is a permanent -1, so indexing it with a parent of -1 (padding) gives -1 without a branch.

    The draft's tree mask lives in ``mask [cap + 1, max_cache_len]`` (draft dtype, additive): row r is the
    mask of draft row r (columns before the root are the past, all 0; columns ``root_row + c`` are 0 when
    row c is an ancestor-or-self of r). A level's rows are built in one gather from their parents' rows
    (the extra last row is all-blocked: padding and the root's parent) plus a zeroed diagonal, and each
    forward uses a view of the rows. Nothing here reads device values.
    """

    def __init__(self, engine: "SpeculativeGenerator", capacity: int, max_cache_len: int, device: torch.device,
                 mask_dtype: torch.dtype | None, static_default: bool):
        self.engine = engine
        self.device = device
        self.capacity = capacity
        self.static_default = static_default
        self.arange = torch.arange(max(capacity, 2), device=device)
        self.tokens = torch.zeros(1, capacity, dtype=torch.int64, device=device)
        self.parents = torch.full((1, capacity), -1, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(1, capacity, dtype=torch.float32, device=device)
        self.cum_logprobs = torch.zeros(1, capacity, dtype=torch.float32, device=device)
        self.node_row = torch.full((capacity + 1,), -1, dtype=torch.int64, device=device)
        self._node_row_init = self.node_row[:capacity].clone()
        self._node_row_init[0] = 0
        self._zero_f32 = torch.zeros(1, 1, dtype=torch.float32, device=device)
        self.rows_used = 0
        self.draft_base = 0  # draft cache length at the root row
        if mask_dtype is not None:
            blocked = torch.finfo(mask_dtype).min
            width = -(-(max_cache_len + capacity + 1) // 64) * 64  # rows 64-element aligned for attention kernels
            self.mask = torch.zeros(capacity + 1, width, dtype=mask_dtype, device=device)
            self.mask[capacity] = blocked
            self._root_row = torch.full((capacity,), blocked, dtype=mask_dtype, device=device)
            self._root_row[0] = 0
        self._dirty = (0, 0)  # mask columns written by the previous step (rows [0, cap))

    # ------------------------------------------------------------------ helpers for policies
    def tree_ops(self):
        return self.engine.timeline.region("tree_ops")

    def full_f32(self, value: float) -> Tensor:
        return torch.full((1,), value, dtype=torch.float32, device=self.device)

    def zeros_f32(self, *shape: int) -> Tensor:
        return self._zero_f32.expand(*shape)

    def read_int(self, tensor: Tensor) -> int:
        """Read a one-element device value on the host (free on CPU; a sync on accelerators)."""
        return int(tensor)

    def start_tree(self, with_draft: bool = True, parents: Tensor | None = None) -> None:
        """Reset the tree to the root (the last committed token); optionally set a fixed ``parents`` layout.
        Slot 0's parent and log-probs never change."""
        engine = self.engine
        with self.tree_ops():
            self.tokens[0, :1].copy_(engine.seq[0, engine.cur_len - 1 : engine.cur_len])
            if with_draft:
                self.node_row[: self.capacity].copy_(self._node_row_init)
            if parents is not None:
                self.parents[0, : parents.shape[0]].copy_(parents)
        self.rows_used = 0

    # The three tree ops below are called by policies inside ``with ctx.tree_ops():`` blocks.
    def topk(self, logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``topk_confidence`` of draft logits (at the sampling temperature when sampling)."""
        return ops.topk_confidence(logits, k, self.engine.draft_temperature)

    def shape(self, alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale):
        """``sage_tree`` for one level."""
        return ops.sage_tree(alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale)

    def expand(self, frontier, topk_logprobs, topk_ids, widths, min_cum_logprob, slot_start, num_slots) -> Tensor:
        """``expand_tree`` into the tree state; returns the count of real nodes written (device)."""
        return ops.expand_tree(
            self.tokens, self.parents, self.logprobs, self.cum_logprobs, frontier, topk_logprobs,
            topk_ids, widths, min_cum_logprob, slot_start, num_slots,
        )

    # ------------------------------------------------------------------ draft forwards
    def _draft_logits(self, logits: Tensor) -> Tensor:
        if logits.device != self.device:
            logits = logits.to(self.device)
        limit = self.engine.shared_vocab
        return logits[..., :limit] if logits.shape[-1] > limit else logits

    def _draft_tokens(self, tokens: Tensor) -> Tensor:
        clamp = self.engine.draft_token_clamp
        return tokens.clamp_max(clamp) if clamp is not None else tokens

    def _forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        engine = self.engine
        device = engine.draft_device
        if device != self.device:  # draft on another device than the target's inputs
            tokens, positions, mask = tokens.to(device), positions.to(device), mask.to(device)
        return engine.draft.forward_tree(tokens, positions, mask, engine.draft_cache)

    def root_logits(self) -> Tensor:
        """The step's first draft forward: the committed tokens the draft has not processed yet, then the
        root. Returns the draft's logits after the root ``[1, V_shared]``."""
        engine = self.engine
        timeline = engine.timeline
        start, end = engine.draft_done, engine.cur_len
        pending = end - start - 1
        cache_len = engine.draft_cache.get_seq_length()
        base = cache_len + pending
        cap = self.capacity
        with timeline.region("tree_ops"):
            lo, hi = self._dirty
            self.mask[:cap, lo:hi].zero_()
            self.mask[0, base : base + cap].copy_(self._root_row)
            self._dirty = (base, base + cap)
            if pending == 0:
                mask = self.mask[:1, : base + 1][None, None]
            else:
                mask = causal_mask_4d(pending + 1, cache_len, self.mask.dtype, self.device)
            tokens = self._draft_tokens(engine.seq[:, start:end])
            positions = self.arange[: pending + 1][None] + start
        with timeline.region("draft_decode"):
            logits = self._forward(tokens, positions, mask)
        self.draft_base = base
        self.rows_used = 1
        return self._draft_logits(logits[0, -1:])

    def feed(self, start: int, count: int, depth: int) -> Tensor:
        """One draft forward over the tree slots ``[start, start + count)``, all at tree depth ``depth``
        (padding slots included; they attend to the past and themselves only). Returns their logits
        ``[count, V_shared]``; their keys/values become the next ``count`` draft-cache rows."""
        engine = self.engine
        first, last = self.rows_used, self.rows_used + count
        if last > self.capacity:
            raise RuntimeError("draft tree exceeds the preallocated capacity")
        base, cap = self.draft_base, self.capacity
        with engine.timeline.region("tree_ops"):
            self.node_row[start : start + count].copy_(self.arange[first:last])
            parent_rows = self.node_row[self.parents[0, start : start + count]]
            tree_columns = self.mask[:, base : base + cap]
            tree_columns[first:last] = tree_columns[parent_rows]
            tree_columns[first:last].diagonal(offset=first).zero_()
            mask = self.mask[first:last, : base + last][None, None]
            positions = torch.full((1, count), engine.cur_len - 1 + depth, dtype=torch.int64, device=self.device)
            tokens = self._draft_tokens(self.tokens[:, start : start + count])
        with engine.timeline.region("draft_decode"):
            logits = self._forward(tokens, positions, mask)
        self.rows_used = last
        return self._draft_logits(logits[0])


class SpeculativeGenerator:
    """Lossless speculative decoding of ``target`` with ``draft`` proposals shaped by a tree policy.

    ``policy``: ``"ar"``, ``"chain"``, ``"static"``, ``"dynamic"``, ``"sage"`` or a ``TreePolicy`` object.
    ``draft_prune_ratio``: share of the image/video tokens the draft does NOT see (SpecVLM/SAGE draft-side
    visual pruning scored by the target's prefill attention; 0 = the draft sees everything).
    ``max_vocab_padding``: how many padding rows the two vocabularies may differ by.
    Batch size 1 only. Target and draft must be the same family, share EOS ids and special tokens, and
    use an attention implementation that takes additive 4-D masks ("sdpa" or "eager").
    """

    def __init__(
        self,
        target: torch.nn.Module,
        draft: torch.nn.Module | None,
        policy: str | TreePolicy = "sage",
        *,
        draft_prune_ratio: float = 0.0,
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ):
        self.policy = make_policy(policy)
        self.target = get_adapter(target)
        self.target.check_supported()
        if draft is None and self.policy.uses_draft:
            raise ValueError(f"policy {self.policy.name!r} needs a draft model")
        self.draft: FamilyAdapter | None = None
        if draft is not None:
            self.draft = get_adapter(draft)
            self.draft.check_supported()
            self._check_pair(max_vocab_padding)
        if not 0.0 <= draft_prune_ratio <= 1.0:
            raise ValueError(f"draft_prune_ratio must be in [0, 1], got {draft_prune_ratio}")
        self.draft_prune_ratio = draft_prune_ratio
        vocab_t = self.target.vocab_size
        vocab_d = self.draft.vocab_size if self.draft is not None else vocab_t
        self.shared_vocab = min(vocab_t, vocab_d)
        self.draft_token_clamp = vocab_d - 1 if vocab_t > vocab_d else None
        if self.policy.uses_draft and self.policy.topk > self.shared_vocab:
            raise ValueError(f"policy top-k {self.policy.topk} exceeds the vocabulary ({self.shared_vocab})")
        #: test hook: called with a StepDebug after every step
        self.step_hook: Callable[[StepDebug], None] | None = None
        #: host clock of the time statistics off CUDA (e.g. ``time.thread_time`` on a shared machine)
        self.host_clock: Callable[[], float] = time.perf_counter

    # ------------------------------------------------------------------ checks
    def _check_pair(self, max_vocab_padding: int) -> None:
        target, draft = self.target, self.draft
        if type(target) is not type(draft):
            raise ValueError(
                f"target ({type(target.model).__name__}) and draft ({type(draft.model).__name__}) must be the "
                f"same model family"
            )
        vocab_t, vocab_d = target.vocab_size, draft.vocab_size
        if vocab_t != vocab_d:
            shared = min(vocab_t, vocab_d)
            # ids beyond both vocabularies are unused config defaults, not tokens
            special = {i for i in target.special_token_ids() + draft.special_token_ids() if i < max(vocab_t, vocab_d)}
            if abs(vocab_t - vocab_d) > max_vocab_padding or any(i >= shared for i in special):
                raise ValueError(
                    f"target and draft vocabularies differ (target {vocab_t}, draft {vocab_d} logits); only padding "
                    f"rows may differ (at most {max_vocab_padding}, with every special token id < {shared}). "
                    f"Use a draft with the target's tokenizer."
                )
        eos_t, eos_d = set(target.eos_token_ids()), set(draft.eos_token_ids())
        if eos_t and eos_d and eos_t != eos_d:
            raise ValueError(f"target and draft disagree on EOS token ids ({sorted(eos_t)} vs {sorted(eos_d)})")

    # ------------------------------------------------------------------ sampling helpers
    def _warpers(self, temperature: float, top_k: int | None, top_p: float | None) -> list:
        """HF-equivalent logits warpers (same classes and order as ``generate``), applied in float32."""
        config = getattr(self.target.model, "generation_config", None)
        if top_k is None:
            top_k = getattr(config, "top_k", None)
            top_k = 50 if top_k is None else top_k  # HF's default
        if top_p is None:
            top_p = getattr(config, "top_p", None)
            top_p = 1.0 if top_p is None else top_p
        warpers: list = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p))
        return warpers

    def _target_probs(self, logits: Tensor) -> Tensor:
        scores = logits.float()
        for warper in self._active_warpers:
            scores = warper(None, scores)
        return torch.softmax(scores, dim=-1)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
        streamer=None,
        generator: torch.Generator | None = None,
        **inputs: Any,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after the prompt.

        ``input_ids`` and every other processor output (``attention_mask``, ``pixel_values``,
        ``image_grid_thw``, ...) are passed as keyword arguments. Greedy output equals
        ``target.generate(do_sample=False)``; with ``do_sample`` the output is distributed exactly like the
        target's sampling with the same ``temperature`` / ``top_k`` / ``top_p`` (None → the target's
        generation_config, then HF's defaults: top_k 50, top_p 1.0; 0 disables top-k).
        ``eos_token_id`` (int or list; default: the target's generation_config), ``stop_strings`` (needs
        ``tokenizer``; same rule as HF's StopStringCriteria), ``streamer`` (``put``/``end``, receives the
        prompt first, then the tokens of every step), ``generator`` (torch.Generator for sampling).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"sage_ext speculative decoding supports batch size 1 only; got input_ids of shape "
                f"{tuple(input_ids.shape)}. Run prompts one at a time."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask has padded positions; pass the unpadded prompt (batch size 1)")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer (pass tokenizer=...)")
        for adapter in (self.target, self.draft if self.policy.uses_draft else None):
            window = adapter.sliding_window() if adapter is not None else None
            if window is not None and input_ids.shape[1] + max_new_tokens + self.policy.capacity > window:
                raise ValueError(
                    f"{type(adapter.model).__name__} uses sliding-window attention (window {window}); tree "
                    f"attention here supports sequences up to the window only (prompt {input_ids.shape[1]} + "
                    f"{max_new_tokens} new tokens + a {self.policy.capacity}-node tree)"
                )
        with torch.inference_mode():
            return self._generate(
                input_ids, inputs, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                stop_strings, tokenizer, streamer, generator,
            )

    def _generate(self, input_ids, inputs, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                  stop_strings, tokenizer, streamer, generator) -> GenerationOutput:
        wall_start = time.perf_counter()
        policy = self.policy
        policy.reset()
        # devices and dtypes as the models are now (looked up once: HF's accessors are slow)
        self.device = device = self.target.input_device
        target_dtype = self.target.dtype
        self.draft_device = self.draft.input_device if policy.uses_draft else device
        use_draft = policy.uses_draft
        self.timeline = timeline = Timeline(device, clock=self.host_clock)
        stats = GenerationStats(policy=policy.name, prompt_len=input_ids.shape[1])
        self.do_sample = do_sample
        self.draft_temperature = temperature if do_sample else 1.0
        self._active_warpers = self._warpers(temperature, top_k, top_p) if do_sample else []

        eos = eos_token_id if eos_token_id is not None else self.target.eos_token_ids()
        eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}
        stop_criteria = None
        if stop_strings:
            stop_criteria = StopStringCriteria(tokenizer, stop_strings)

        prompt_len = input_ids.shape[1]
        depth_bound = policy.depth_bound
        self.seq = torch.zeros(1, prompt_len + max_new_tokens + depth_bound + 2, dtype=torch.int64, device=device)
        self.seq[0, :prompt_len] = input_ids[0].to(device)
        # processor outputs go where the models' embeddings are (accelerate hooks move them further)
        inputs = {key: value.to(device) if isinstance(value, Tensor) else value
                  for key, value in {"input_ids": input_ids, **inputs}.items()}
        draft_inputs = inputs
        if use_draft and self.draft_device != device:
            draft_inputs = {key: value.to(self.draft_device) if isinstance(value, Tensor) else value
                            for key, value in inputs.items()}

        # ---------------------------------------------------------- prefill
        self.target_cache = DynamicCache()
        self.draft_cache = DynamicCache() if use_draft else None
        keep = None
        if use_draft and self.draft_prune_ratio > 0:
            from .pruning import VisualAttentionScorer, default_query_mask, select_visual_tokens

            visual = self.target.visual_token_mask(inputs)
            if visual is not None and bool(visual.any()):
                queries = default_query_mask(visual, inputs.get("attention_mask"))
                with timeline.region("target_prefill"):
                    with VisualAttentionScorer(self.target.model, queries, inputs.get("attention_mask")) as scorer:
                        target_prefill = self.target.prefill(inputs, self.target_cache)
                    keep = select_visual_tokens(scorer.scores, visual, self.draft_prune_ratio)
                    keep[:, -1] = True
        if keep is None:
            with timeline.region("target_prefill"):
                target_prefill = self.target.prefill(inputs, self.target_cache)
        if use_draft:
            with timeline.region("draft_prefill"):
                self.draft.prefill(draft_inputs, self.draft_cache,
                                   keep=None if keep is None else keep.to(self.draft_device))
        with timeline.region("tree_ops"):
            first_logits = target_prefill.logits_last.to(device)
            if do_sample:
                first = torch.multinomial(self._target_probs(first_logits), 1, generator=generator).reshape(())
            else:
                first = first_logits.argmax(dim=-1).reshape(())
            self.seq[0, prompt_len] = first
        first_token = int(first)  # the prefill's one host read
        self.cur_len = prompt_len + 1
        self.draft_done = prompt_len
        generated = [first_token]
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(torch.tensor([first_token]))
        sequence_host = input_ids[0].tolist() + [first_token]
        stop_reason = self._stop_reason(first_token, sequence_host, eos_ids, stop_criteria)
        if stop_reason is None and max_new_tokens == 1:
            stop_reason = "max_new_tokens"

        ctx = DraftRound(
            self, policy.capacity, prompt_len + max_new_tokens + depth_bound + 2, device,
            self.draft.dtype if use_draft else None, static_default=device.type == "cuda",
        )
        no_alpha = torch.zeros(1, dtype=torch.float32, device=device)
        no_count = torch.zeros(1, dtype=torch.int64, device=device)
        cache_groups = lambda cache: [(group, dev) for dev, group in _cache_tensors(cache).items()]  # noqa: E731
        step = 0
        # ---------------------------------------------------------- steps
        while stop_reason is None:
            timeline.step_begin()
            target_len = self.cur_len - 1  # the root is not in the target cache
            proposal = policy.build(ctx)
            tokens, parents = proposal.tokens, proposal.parents
            num_nodes = tokens.shape[1]
            with timeline.region("tree_ops"):
                buffers = ops.tree_buffers(parents, target_len, mask_dtype=target_dtype)
            with timeline.region("target_verify"):
                logits = self.target.forward_tree(tokens, buffers[1], buffers[6], self.target_cache)
            with timeline.region("tree_ops"):
                if logits.device != device:  # lm_head on another device (device_map)
                    logits = logits.to(device)
                if do_sample:
                    probs = self._target_probs(logits[0])[None]
                    accepted, accept_len, bonus = self._verify_sampling(tokens, parents, probs, generator)
                else:
                    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, logits)
                # new tokens into the sequence buffer: the accepted path (entries past tau are junk that the
                # next step overwrites), then the bonus at cur_len + tau
                block = min(proposal.depth_bound, num_nodes - 1) + 1
                self.seq[0, self.cur_len : self.cur_len + block - 1] = tokens[0, accepted[0, 1:block]]
                self.seq[0].index_put_((accept_len + self.cur_len,), bonus)
                for group, dev in cache_groups(self.target_cache):
                    ops.kv_compact_(group, accepted.to(dev), target_len)
                if use_draft:
                    # draft rows of the accepted nodes the draft processed (a prefix of the path)
                    draft_rows = proposal.node_row[accepted]
                    processed = (draft_rows >= 0).sum()
                    for group, dev in cache_groups(self.draft_cache):
                        ops.kv_compact_(group, draft_rows.to(dev), ctx.draft_base)
                else:
                    processed = accept_len[0]
                real_nodes = (parents[0, 1:] >= 0).sum().view(1) if proposal.num_real is None else no_count
                alpha = proposal.alpha_root if proposal.alpha_root is not None else no_alpha
                packed = torch.cat((
                    accept_len, processed.view(1), real_nodes, alpha.view(torch.int32).long(),
                    self.seq[0, self.cur_len : self.cur_len + block],
                ))
            values = packed.tolist()  # the step's one host sync
            tau, processed_n, real_n, bits = values[:_HEADER]
            if proposal.num_real is not None:
                real_n = proposal.num_real
            new_host = values[_HEADER : _HEADER + tau + 1]

            # host bookkeeping
            _crop(self.target_cache, target_len + tau + 1)
            if use_draft:
                _crop(self.draft_cache, ctx.draft_base + processed_n)
                self.draft_done = self.cur_len - 1 + processed_n
            remaining = max_new_tokens - len(generated)
            emitted: list[int] = []
            for token in new_host[:remaining]:
                emitted.append(token)
                sequence_host.append(token)
                stop_reason = self._stop_reason(token, sequence_host, eos_ids, stop_criteria)
                if stop_reason is not None:
                    break
            generated.extend(emitted)
            self.cur_len += len(emitted)
            if stop_reason is None and len(generated) >= max_new_tokens:
                stop_reason = "max_new_tokens"
            if streamer is not None and emitted:
                streamer.put(torch.tensor(emitted))
            alpha_measured = _float_from_bits(bits) if proposal.alpha_root is not None else None
            info = policy.step_info(proposal.info, alpha_measured)
            stats.steps.append(StepRecord(
                tau=tau, emitted=len(emitted), tree_size=real_n, tree_slots=num_nodes - 1,
                tree_depth=proposal.depth_bound, draft_forwards=proposal.draft_forwards,
                alpha=info.get("alpha"), alpha_measured=alpha_measured, depth_target=info.get("depth_target"),
                width_target=info.get("width_target"), d_max=info.get("d_max"),
            ))
            policy.update(tau, alpha_measured)
            step += 1
            if self.step_hook is not None:
                self.step_hook(StepDebug(
                    step=step, sequence=list(sequence_host), target_cache=self.target_cache,
                    draft_cache=self.draft_cache, draft_done=self.draft_done, tree_tokens=tokens,
                    tree_parents=parents, tree_logprobs=proposal.logprobs,
                    accepted=accepted, tau=tau, finished=stop_reason is not None, draft_keep=keep,
                ))
            timeline.step_end()

        if streamer is not None:
            streamer.end()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.wall_time = time.perf_counter() - wall_start
        timeline.finish(stats)
        stats.new_tokens = len(generated)
        stats.stop_reason = stop_reason
        sequences = self.seq[:, : self.cur_len].clone().to(input_ids.device)
        return GenerationOutput(sequences, stats)

    def _verify_sampling(self, tokens: Tensor, parents: Tensor, probs: Tensor, generator) -> tuple:
        """Lossless tree rejection sampling for deterministic top-k drafts (q = 1 rule)."""
        return ops.verify_sampling(tokens, parents, probs, None, generator)

    @staticmethod
    def _stop_reason(token: int, sequence: list[int], eos_ids: set[int], stop_criteria) -> str | None:
        if token in eos_ids:
            return "eos"
        if stop_criteria is not None:
            tail = torch.tensor([sequence[-stop_criteria.maximum_token_len :]])
            if bool(stop_criteria(tail, None)[0]):
                return "stop_string"
        return None


def generate(target: torch.nn.Module, draft: torch.nn.Module | None, policy: str | TreePolicy = "sage",
             **kwargs: Any) -> GenerationOutput:
    """One-call shortcut: ``SpeculativeGenerator(target, draft, policy).generate(**kwargs)``.

    ``draft_prune_ratio`` and ``max_vocab_padding`` go to the generator; everything else to ``generate``.
    """
    generator_kwargs = {key: kwargs.pop(key) for key in ("draft_prune_ratio", "max_vocab_padding") if key in kwargs}
    return SpeculativeGenerator(target, draft, policy, **generator_kwargs).generate(**kwargs)
