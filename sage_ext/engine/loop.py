"""The speculative decoding engine: one loop for every tree policy, batch size 1.

A step (see docs/ENGINE.md for the full story):
  1. The policy builds a draft tree. The root is the last committed token, which is in neither KV cache
     yet. The draft's first forward of the step feeds the committed tokens it has not processed plus the
     root; then one draft forward per level over the level's frontier, with the tree mask on top of its cache.
  2. The target verifies the whole tree in one forward (rows at cache positions ``past_len .. past_len+N-1``,
     rope positions ``sequence index + depth``), and ``verify_greedy`` / ``verify_sampling`` pick the
     accepted path and the bonus token (target's own next token).
  3. ``commit_tree_`` writes the new tokens to a device-side sequence buffer, moves the accepted rows of
     both caches to contiguous positions and packs the step's readback (accepted length, draft-processed
     count, tree size, root alpha, the new tokens) into ONE small int64 tensor, read to the host: the step's
     only sync. The workspace decodes it into a ``CommitResult`` (named host values). Both caches are cropped
     with HF's ``Cache.crop`` to what they now hold (the draft's length is the workspace's ``draft_len``;
     ``sage_ext.engine.caches``).
  4. Host: stop checks (EOS, stop strings, max_new_tokens), streamer, policy feedback. The bonus is the next
     step's root.

Hot-path rules: all tensor work between two model forwards is ONE native call into the ``TreeWorkspace``
(csrc/session: a SAGE level with the next draft forward's inputs, a fixed-tree or EAGLE-2 level, the target's
mask and positions, verification with the commit), which runs registered sage_ext ops (CPU or CUDA kernels,
one path on every device) and owns the step's tree; on the CPU each separate small call right after a model
forward pays again for the caches the forward evicted. Masks and positions are views of buffers made once per
generation (every mask view starts at a 64-element aligned row); the whole step runs under one
``torch.inference_mode``.

Models are used as loaded (any device / dtype / device_map); nothing in transformers is patched.
"""
from __future__ import annotations

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

from .. import ops
from ..families import FamilyAdapter, get_adapter
from ..pruning import scored_prefill
from .caches import CacheGroups
from .costs import StepCost, learning_for
from .draft_round import DraftRound
from .policies import TreePolicy, make_policy
from .stats import GenerationStats, StepRecord, Timeline

#: Target and draft vocabularies may differ by at most this many (padding) rows.
DEFAULT_MAX_VOCAB_PADDING = 256


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
        if isinstance(policy, str) and self.policy.learns_costs and draft is not None:
            # a policy made here by name has the default arguments: it continues what earlier generators of
            # these models on this device measured (a policy object passed in keeps its own record)
            device = str(target.get_input_embeddings().weight.device)
            self.policy.share_learning(learning_for(target, draft, device, self.policy.fresh_learning))
        #: test hook: called with a StepDebug after every step
        self.step_hook: Callable[[StepDebug], None] | None = None
        #: host clock of the time statistics off CUDA (e.g. ``time.thread_time`` on a shared machine)
        self.host_clock: Callable[[], float] = time.perf_counter
        self._row_tables: dict[tuple[torch.device, int], Tensor] = {}  # DraftRound's slot == row tables
        #: test seam for a model split over devices on one device: (target, draft) cache layers from these indices
        #: on form a device group of their own (``CacheGroups``), as the layers a device_map puts on another GPU
        self.elsewhere_from: tuple[int | None, int | None] = (None, None)

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
        max_new_tokens: int | None = None,
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
        ``target.generate(do_sample=False)`` in float32 (in bf16/fp16 the tree forward can round a near-tie
        differently from one-token decoding: docs/ENGINE.md, Precision); with ``do_sample`` the output is
        distributed exactly like the target's sampling with the same ``temperature`` / ``top_k`` / ``top_p``
        (None → the target's generation_config, then HF's defaults: top_k 50, top_p 1.0; 0 disables top-k).
        ``eos_token_id`` (int or list; default: the target's generation_config), ``stop_strings`` (needs
        ``tokenizer``; same rule as HF's StopStringCriteria), ``streamer`` (``put``/``end``, receives the
        prompt first, then the tokens of every step), ``generator`` (torch.Generator for sampling).
        """
        from ..validation import check_generate_call  # lists, max_length, refused generate arguments, image inputs

        input_ids, max_new_tokens, inputs = check_generate_call(
            self.target, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, inputs=inputs)
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
        rope_reason = self.target.rope_refusal({"input_ids": input_ids, **inputs}, max_new_tokens,
                                               self.policy.depth_bound)
        if rope_reason is not None:
            raise ValueError(rope_reason)
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
        # sequence buffer: bounds every cache length, with room for a whole tree's new tokens (commit_tree_)
        max_len = prompt_len + max_new_tokens + policy.capacity + 2
        self.seq = torch.zeros(1, max_len, dtype=torch.int64, device=device)
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
        # the target's prefill, scoring the visual tokens for the draft's pruning when it is on
        with timeline.region("target_prefill"):
            target_prefill, keep, _ = scored_prefill(self.target, inputs, self.target_cache,
                                                     self.draft_prune_ratio if use_draft else 0.0)
        if use_draft:
            with timeline.region("draft_prefill"):
                self.draft.prefill(draft_inputs, self.draft_cache,
                                   keep=None if keep is None else keep.to(self.draft_device))
        with timeline.region("tree_ops"):
            first_logits = target_prefill.logits_last.to(device)
            if do_sample:
                # drawn on the generator's device (a CPU generator with a model on CUDA works too): this is the
                # prefill, whose token is read on the host just below anyway
                probs = self._target_probs(first_logits)
                if generator is not None:
                    probs = probs.to(generator.device)
                first = torch.multinomial(probs, 1, generator=generator).reshape(()).to(device)
            else:
                first = first_logits.argmax(dim=-1).reshape(())
            self.seq[0, prompt_len] = first
        first_token = int(first)  # the prefill's one host read
        self.cur_len = prompt_len + 1
        self.draft_done = prompt_len
        n_generated = 1
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(torch.tensor([first_token]))
        sequence_host = input_ids[0].tolist() + [first_token]
        stop_reason = self._stop_reason(first_token, sequence_host, eos_ids, stop_criteria)
        if stop_reason is None and max_new_tokens == 1:
            stop_reason = "max_new_tokens"

        capacity = policy.capacity
        row_table = self._row_tables.get((device, capacity))
        ctx = DraftRound(
            self, capacity, max_len, device, self.draft.dtype if use_draft else None, target_dtype,
            static_default=device.type == "cuda", row_table=row_table,
        )
        self._row_tables[(device, capacity)] = ctx.ws.row_table
        workspace = ctx.ws
        if use_draft:
            workspace.start_generation(self.draft_cache.get_seq_length())
        # the caches' key/value tensors grouped by device (a model split with device_map has several groups): the
        # workspace's commit compacts every group, then HF's Cache.crop cuts both caches
        target_from, draft_from = self.elsewhere_from
        target_groups = CacheGroups(self.target_cache, device, target_from)
        draft_groups = CacheGroups(self.draft_cache, device, draft_from) if use_draft else None
        no_groups: list = []
        verify_sampling = self._verify_sampling
        switch, step_begin, step_end = timeline.switch, timeline.step_begin, timeline.step_end
        step_rows: list[tuple] = []
        learns_costs = policy.learns_costs
        step = 0
        # ---------------------------------------------------------- steps
        while stop_reason is None:
            step_begin("tree_ops")
            cur_len = self.cur_len
            target_len = cur_len - 1  # the root is not in the target cache
            proposal = policy.build(ctx)  # the tree is in the workspace now
            num_nodes = workspace.tree_nodes
            tokens, positions, mask = workspace.target_inputs(target_len)
            switch("target_verify")
            logits = self.target.forward_tree(tokens, positions, mask, self.target_cache)
            switch("tree_ops")
            if logits.device != device:  # lm_head on another device (device_map)
                logits = logits.to(device)
            # verification, then the commit: new tokens into the sequence buffer at cur_len, both caches compacted,
            # the readback (accepted length, draft-held nodes, tree size, root alpha, new tokens) read to the host
            # (the step's one sync); then both caches cropped to what they hold
            draft_len_before = workspace.draft_len
            target_tensors = target_groups.tensors() if num_nodes > 1 else no_groups
            draft_tensors = draft_groups.tensors() if use_draft and num_nodes > 1 else no_groups
            if do_sample:
                probs = self._target_probs(logits[0])[None]
                verified = verify_sampling(tokens, workspace.tree_parents, probs, generator)
                committed = workspace.commit(None, *verified, cur_len, target_tensors, target_len, draft_tensors)
            else:
                committed = workspace.commit(logits, None, None, None, cur_len, target_tensors, target_len,
                                             draft_tensors)
            switch("other")
            # the readback, decoded by the workspace (host ints, a float, a list: no device access)
            tau, processed_n, real_n = committed.accept_len, committed.draft_held, committed.real_nodes
            new_host, alpha_measured, accepted = committed.tokens, committed.alpha, committed.accepted
            target_groups.crop(target_len + num_nodes, target_len + tau + 1)
            if use_draft:
                draft_groups.crop(draft_len_before, workspace.draft_len)
                self.draft_done = target_len + processed_n
            remaining = max_new_tokens - n_generated
            emitted = new_host if len(new_host) <= remaining else new_host[:remaining]
            if stop_criteria is None:
                if not eos_ids.isdisjoint(emitted):
                    for position, token in enumerate(emitted):
                        if token in eos_ids:
                            emitted = emitted[: position + 1]
                            stop_reason = "eos"
                            break
                sequence_host.extend(emitted)
            else:
                accepted_host = []
                for token in emitted:
                    accepted_host.append(token)
                    sequence_host.append(token)
                    stop_reason = self._stop_reason(token, sequence_host, eos_ids, stop_criteria)
                    if stop_reason is not None:
                        break
                emitted = accepted_host
            n_generated += len(emitted)
            self.cur_len = cur_len + len(emitted)
            if stop_reason is None and n_generated >= max_new_tokens:
                stop_reason = "max_new_tokens"
            if streamer is not None and emitted:
                streamer.put(torch.tensor(emitted))
            # the step's record, assembled into a StepRecord after the generation (off the hot path)
            step_rows.append((tau, len(emitted), real_n, num_nodes - 1, proposal.depth_bound, proposal.draft_forwards,
                              proposal.info, alpha_measured))
            policy.update(tau, alpha_measured)
            step += 1
            if learns_costs and step >= 2:  # the step before this one: its times are final (see Timeline)
                before = step_rows[step - 2]
                seconds, draft_seconds, verify_seconds = timeline.step_costs(step - 2)
                policy.observe_cost(StepCost(seconds, draft_seconds, verify_seconds, draft_forwards=before[5],
                                             verified_slots=before[3], tree_depth=before[4], accepted=before[0]))
            if self.step_hook is not None:
                self.step_hook(StepDebug(
                    step=step, sequence=list(sequence_host), target_cache=self.target_cache,
                    draft_cache=self.draft_cache, draft_done=self.draft_done, tree_tokens=tokens,
                    tree_parents=workspace.tree_parents, tree_logprobs=workspace.tree_logprobs,
                    accepted=accepted, tau=tau, finished=stop_reason is not None, draft_keep=keep,
                ))
            step_end()

        if streamer is not None:
            streamer.end()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.wall_time = time.perf_counter() - wall_start
        for tau, emitted_n, real_n, slots, depth_bound, forwards, info, alpha_measured in step_rows:
            info = policy.step_info(info, alpha_measured)
            stats.steps.append(StepRecord(
                tau=tau, emitted=emitted_n, tree_size=real_n, tree_slots=slots, tree_depth=depth_bound,
                draft_forwards=forwards, alpha=info.get("alpha"), alpha_measured=alpha_measured,
                depth_target=info.get("depth_target"), width_target=info.get("width_target"), d_max=info.get("d_max"),
            ))
        timeline.finish(stats)
        stats.new_tokens = n_generated
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

    # ------------------------------------------------------------------ streaming (sage_ext/streaming.py)
    def stream(self, *, tokenizer=None, skip_special_tokens: bool = True, **kwargs: Any):
        """``generate(**kwargs)`` as an iterator over its output: with ``tokenizer`` (or a processor) the decoded
        text pieces (str, prompt excluded; ``tokenizer`` also serves ``stop_strings``), without it the new tokens
        of every step as a 1-D LongTensor. The same loop runs in a worker thread behind the ``streamer`` hook;
        ``.output`` holds the ``GenerationOutput`` once the iteration ends; ``break`` stops the generation.

            for text in gen.stream(tokenizer=processor, **inputs, max_new_tokens=64):
                print(text, end="", flush=True)
        """
        from ..streaming import GenerationStream

        if tokenizer is not None:
            kwargs["tokenizer"] = getattr(tokenizer, "tokenizer", tokenizer)
        return GenerationStream(self.generate, kwargs, tokenizer, skip_special_tokens)


def generate(target: torch.nn.Module, draft: torch.nn.Module | None, policy: str | TreePolicy = "sage",
             **kwargs: Any) -> GenerationOutput:
    """One-call shortcut: ``SpeculativeGenerator(target, draft, policy).generate(**kwargs)``.

    ``draft_prune_ratio`` and ``max_vocab_padding`` go to the generator; everything else to ``generate``.
    """
    generator_kwargs = {key: kwargs.pop(key) for key in ("draft_prune_ratio", "max_vocab_padding") if key in kwargs}
    return SpeculativeGenerator(target, draft, policy, **generator_kwargs).generate(**kwargs)


def stream(target: torch.nn.Module, draft: torch.nn.Module | None, policy: str | TreePolicy = "sage",
           **kwargs: Any):
    """One-call streaming: ``SpeculativeGenerator(target, draft, policy).stream(**kwargs)`` (see
    ``SpeculativeGenerator.stream``); ``draft_prune_ratio`` and ``max_vocab_padding`` go to the generator."""
    generator_kwargs = {key: kwargs.pop(key) for key in ("draft_prune_ratio", "max_vocab_padding") if key in kwargs}
    return SpeculativeGenerator(target, draft, policy, **generator_kwargs).stream(**kwargs)
