"""The speculative decoding engine: one loop for every tree policy, one prompt or a batch.

Every prompt (a row of the batch) is prefilled alone, then all rows step together, each with its own policy state,
tree workspace and cache columns (``caches.RowCache``): one draft forward per level and one target forward per
step for the whole batch; a row that finishes leaves the batch. One prompt is the batch of one.

A step (see docs/ENGINE.md for the full story):
  1. Every row's policy builds a draft tree. The root is the last committed token, which is in neither KV cache
     yet. The draft's first forward of the step feeds the committed tokens it has not processed plus the
     root; then one draft forward per level over the level's frontier, with the tree mask on top of its cache.
  2. The target verifies the whole tree in one forward (rows at cache positions ``past_len .. past_len+N-1``,
     rope positions ``sequence index + depth``), and ``verify_greedy`` / ``verify_sampling`` pick the
     accepted path and the bonus token (target's own next token).
  3. ``commit_tree_`` writes the new tokens to the row's device-side sequence buffer, moves the accepted rows of
     both caches to contiguous positions and packs the step's readback (accepted length, draft-processed
     count, tree size, root alpha, the new tokens) into ONE small int64 tensor, read to the host: the step's
     sync per row. The workspace decodes it into a ``CommitResult`` (named host values); the caches' lengths are
     host bookkeeping (the target's ``cur_len - 1``, the draft's the workspace's ``draft_len``).
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

import numbers
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.stopping_criteria import StopStringCriteria

from .. import ops
from ..families import FamilyAdapter, get_adapter
from ..families.base import token_id_list
from ..families.support import batch_rope_refusal
from ..pruning import scored_prefill
from .caches import CacheGroups, RowCache
from .capture import CapturedForward, padded_rows, tree_forward
from .costs import RowOutcome, StepCost, learning_for
from .coupled import PositionNoise, coupled_token, no_distribution, row_generators, verify_coupled
from .draft_round import DraftRound
from .policies import DEFAULT_POLICY, AutoregressivePolicy, TreePolicy, make_policy
from .processing import TargetProcessing, sampling_warpers
from .stats import GenerationStats, StepRecord, Timeline

if TYPE_CHECKING:
    from ..validation import GenerationSettings

#: The build of a step with one token left to ``max_new_tokens``, whatever the policy: the root alone (the target's
#: next token; a draft level could only propose tokens past the end).
_LAST_TOKEN = AutoregressivePolicy()
#: Target and draft vocabularies may differ by at most this many (padding) rows.
DEFAULT_MAX_VOCAB_PADDING = 256
#: Tree nodes (roots included) the target verifies per step for a whole batch, shared equally by the rows still
#: running; a row's tree is cut to its share. 128 leaves one prompt's default trees (at most 65 nodes) as they are
#: and gives each of 8 rows 16 (benchmarks/results/batch_*.md measures budgets against batch size).
DEFAULT_BATCH_NODE_BUDGET = 128
#: How a sampled tree is verified, all lossless for the deterministic top-k trees every policy builds:
#: "specinfer" (``ops.verify_sampling``: from the root, each node's children tried in turn against the residual
#: distribution), "traversal" (``ops.verify_traversal``: Traversal Verification, Weng et al. 2025: leaf to root,
#: a whole path accepted at once) and "gumbel" (``coupled.verify_coupled``: each sequence index's token is the
#: Gumbel-max sample of its own noise, so a seeded call's tokens do not depend on the trees: the same for every
#: policy and however ``sage_cost`` has learned). On such trees all accept the same number of tokens in distribution
#: (measured for the first two: benchmarks/bench_sampling_rules.py); Traversal Verification gains with sampled
#: drafts only (docs/ENGINE.md).
SAMPLING_RULES = ("specinfer", "traversal", "gumbel")
DEFAULT_SAMPLING_RULE = "specinfer"


class GenerationOutput(NamedTuple):
    """``sequences``: LongTensor ``[B, prompt_len + new_tokens]`` (like HF ``generate``); ``stats``: the
    ``GenerationStats`` of a single prompt, a list of them (one per row) for a batch."""

    sequences: Tensor
    stats: GenerationStats | list[GenerationStats]


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
    draft_keep: Tensor | None  # prompt positions the draft saw (visual pruning, a text draft's text), None = all
    row: int = 0  # the row of the batch
    level_mass: tuple[float, ...] = ()  # the tree's draft probability mass per depth (policies that measure it)


class SpeculativeGenerator:
    """Lossless speculative decoding of ``target`` with ``draft`` proposals shaped by a tree policy.

    ``policy``: ``"ar"``, ``"chain"``, ``"static"``, ``"dynamic"``, ``"sage"`` or a ``TreePolicy`` object.
    ``draft_prune_ratio``: share of the image/video tokens the draft does NOT see (SpecVLM/SAGE draft-side
    visual pruning scored by the target's prefill attention; 0 = the draft sees everything).
    ``max_vocab_padding``: how many padding rows the two vocabularies may differ by.
    ``batch_node_budget``: the most tree nodes (roots included) one target forward verifies for a batch; every
    step each running row may use an equal share (at least 2: its root and one draft token), and its policy cuts
    its tree to that (``None``: no budget, every tree as its policy shapes it).
    ``capture_draft``: run the draft's tree forwards captured (``engine.capture``: ``torch.compile`` with static
    shapes; CUDA graphs on a GPU). Each new forward shape compiles once (seconds on a CPU); afterwards a small
    draft's per-level call costs a fraction of the eager one (benchmarks/bench_draft_compile.py). Never changes
    the output.
    ``sampling_rule``: how sampled trees are verified, ``"specinfer"`` or ``"traversal"`` (``SAMPLING_RULES``); greedy
    decoding does not use it.
    Target and draft must be the same family, share EOS ids and special tokens, and
    use an attention implementation that takes additive 4-D masks ("sdpa" or "eager"). A vision-language target
    may also have a text-only causal LM of its tokenizer as its draft (e.g. Gemma-3-1B for a Gemma 3 model,
    Qwen2.5-0.5B for Qwen2.5-VL): the draft reads the prompt's text tokens alone, at consecutive positions
    (``draft_prune_ratio`` does not apply to it).
    """

    def __init__(
        self,
        target: torch.nn.Module,
        draft: torch.nn.Module | None,
        policy: str | TreePolicy = DEFAULT_POLICY,
        *,
        draft_prune_ratio: float = 0.0,
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
        batch_node_budget: int | None = DEFAULT_BATCH_NODE_BUDGET,
        capture_draft: bool = False,
        sampling_rule: str = DEFAULT_SAMPLING_RULE,
    ):
        if sampling_rule not in SAMPLING_RULES:
            raise ValueError(f"sampling_rule must be one of {', '.join(SAMPLING_RULES)}, got {sampling_rule!r}")
        self.sampling_rule = sampling_rule
        self._verify_sampled_tree = ops.verify_traversal if sampling_rule == "traversal" else ops.verify_sampling
        self.coupled_sampling = sampling_rule == "gumbel"
        self.policy = make_policy(policy)
        self.target = get_adapter(target)
        self.target.check_supported()
        self.target.applies_window = True  # its tree forwards reproduce its sliding windows (a draft's need not)
        if self.policy.uses_draft and _quantizes_activations_per_forward(target):
            warnings.warn(
                f"{type(target).__name__} has dynamically quantized Linear layers (quantize_dynamic): they quantize "
                f"their input with one scale over every row of a forward, so a tree verification (many rows) "
                f"rounds otherwise than generate's one row, and the output can part from target.generate's (a "
                f"quantized draft is exact; so is policy 'ar'; docs/ENGINE.md, Precision)", stacklevel=2)
        if draft is None and self.policy.uses_draft:
            raise ValueError(f"policy {self.policy.name!r} needs a draft model")
        self.draft: FamilyAdapter | None = None
        #: a text-only draft of a vision-language target: it reads the prompt's text tokens alone (``prefill_text``)
        self.text_draft = False
        if draft is not None:
            self.draft = get_adapter(draft)
            self.draft.check_supported()
            self.text_draft = self.target.reads_media and not self.draft.reads_media
            self._check_pair(max_vocab_padding)
        if isinstance(draft_prune_ratio, bool) or not isinstance(draft_prune_ratio, numbers.Real) \
                or not 0.0 <= draft_prune_ratio <= 1.0:
            raise ValueError(f"draft_prune_ratio must be a number in [0, 1], got {draft_prune_ratio!r}")
        self.draft_prune_ratio = draft_prune_ratio
        if batch_node_budget is not None and (isinstance(batch_node_budget, bool) or
                                              not isinstance(batch_node_budget, int) or batch_node_budget < 2):
            raise ValueError(f"batch_node_budget must be an int >= 2 or None, got {batch_node_budget!r}")
        self.batch_node_budget = batch_node_budget
        if not isinstance(capture_draft, bool):
            raise ValueError(f"capture_draft must be True or False, got {capture_draft!r}")
        self.capture_draft = capture_draft and self.draft is not None
        if self.capture_draft and len({param.device for param in draft.parameters()}) > 1:
            raise ValueError("capture_draft needs the draft on one device (its static cache's writes are planned "
                             "for one); this draft is split over several (device_map)")
        self._captured: dict[str, CapturedForward] = {}  # per device type of the draft's inputs
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
        if type(target) is not type(draft) and not self.text_draft:
            raise ValueError(
                f"target ({type(target.model).__name__}) and draft ({type(draft.model).__name__}) must be the "
                f"same model family (or, for a vision-language target, a text-only causal LM of its tokenizer)"
            )
        vocab_t, vocab_d = target.vocab_size, draft.vocab_size
        if vocab_t != vocab_d:
            shared = min(vocab_t, vocab_d)
            if abs(vocab_t - vocab_d) > max_vocab_padding:
                raise ValueError(
                    f"target and draft vocabularies differ (target {vocab_t}, draft {vocab_d} logits); only padding "
                    f"rows may differ (at most max_vocab_padding={max_vocab_padding}). Use a draft with the target's "
                    f"tokenizer."
                )
            # A text draft is exempt: it never reads the target's media placeholders or padding, and an EOS or BOS
            # outside its vocabulary only changes its proposals (it never proposes the end); a vision-language
            # draft of the same family holds the family's special tokens unless its tokenizer is another.
            # (Ids beyond both vocabularies are unused config defaults, not tokens.)
            special = set() if self.text_draft else {
                i for i in target.special_token_ids() + draft.special_token_ids() if i < max(vocab_t, vocab_d)}
            outside = sorted(i for i in special if i >= shared)
            if outside:
                raise ValueError(
                    f"target and draft vocabularies differ (target {vocab_t}, draft {vocab_d} logits) and the special "
                    f"token id(s) {outside} (EOS, BOS, pad, image/video) lie outside the smaller one: only padding "
                    f"rows may differ. Use a draft with the target's tokenizer."
                )
        if self.text_draft:  # it is given the prompt's text alone
            return
        from ..validation import media_layout

        media_t, media_d = media_layout(target.config), media_layout(draft.config)
        differ = [f"{name} {media_t[name]} vs {media_d[name]}" for name in media_t
                  if name in media_d and media_t[name] != media_d[name]]
        if differ:
            raise ValueError(
                f"target and draft read images/videos differently ({'; '.join(differ)}, target vs draft): the draft is "
                f"given the processor outputs made for the target, so both need the same media tokens and vision "
                f"geometry (a draft of the same model series, e.g. a smaller checkpoint with the target's processor)"
            )

    # ------------------------------------------------------------------ sampling helpers
    def _target_scores(self, logits: Tensor, row: "_Row", context_len: int, tree: tuple | None) -> Tensor:
        """The target's scores ``[N, V]`` as ``generate``'s logits processors leave them, before the sampling warpers:
        the logits themselves, or in float32 after the generation's ``TargetProcessing`` (repetition penalty, minimum
        lengths, transformers' processors of the other settings) of each node's context: the row's first
        ``context_len`` tokens, then the node's path in ``tree`` (``tokens``, ``parents``, depth bound; None: no
        tree)."""
        if self._processing is None:
            return logits
        return self._processing(logits, row.seq[0, :context_len], row.prompt_len, tree)

    def _warped(self, scores: Tensor) -> Tensor:
        scores = scores.float()
        for warper in self._active_warpers:
            scores = warper(None, scores)
        return scores

    def _target_probs(self, scores: Tensor) -> Tensor:
        return torch.softmax(self._warped(scores), dim=-1)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
        streamer=None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
        generation_config=None,
        **inputs: Any,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after the prompt (or after each prompt of a batch).

        ``input_ids`` and every other processor output (``attention_mask``, ``pixel_values``,
        ``image_grid_thw``, ...) are passed as keyword arguments. Greedy output equals
        ``target.generate(do_sample=False)`` in float32 (in bf16/fp16 the tree forward can round a near-tie
        differently from one-token decoding: docs/ENGINE.md, Precision); with ``do_sample`` the output is
        distributed exactly like the target's sampling with the same ``temperature`` / ``top_k`` / ``top_p``
        (top_k 0 disables top-k). ``repetition_penalty``, ``min_new_tokens`` and ``min_length`` (keyword) are applied
        to every tree node as ``generate`` applies them. Every setting left None is read as ``generate`` reads it:
        from ``generation_config`` (a GenerationConfig, over the target's own), then the target's
        ``generation_config``, then HF's defaults (greedy, temperature 1.0, top_k 50, top_p 1.0, 64 new tokens here);
        a generation-config entry the engine does not implement raises ValueError instead of being ignored.
        ``eos_token_id`` (int, list or tensor; default: the target's generation_config's, as ``generate``), ``stop_strings`` (needs
        ``tokenizer``; same rule as HF's StopStringCriteria), ``streamer`` (``put``/``end``, receives the
        prompt first, then the tokens of every step; one prompt only), ``generator`` (torch.Generator for sampling).

        A batch (``input_ids [B, L]``, left-padded with its ``attention_mask`` as processors give it with
        ``padding_side="left"``, and the batch's media) decodes every row with its own tree; each row's greedy output
        is what the call gives for that row alone (sampling: its distribution; the rows share ``generator``).
        ``sequences`` is then ``[B, L + longest new]``, every row after its end filled with ``pad_token_id`` (the
        argument, else the target's generation_config, else the first EOS id), and ``stats`` a list of
        ``GenerationStats``, one per row.
        """
        from ..validation import check_generate_call, check_row_inputs

        # the models may have been switched since the constructor (set_attn_implementation): checked per call, since
        # a kernel that cannot take the tree mask may read out of bounds instead of failing
        for adapter in (self.target, self.draft):
            if adapter is not None:
                adapter.check_supported()
        arguments = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                         top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, stop_strings=stop_strings, generation_config=generation_config)
        input_ids, settings, inputs = check_generate_call(self.target, input_ids, arguments, inputs=inputs,
                                                          generator=generator)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        max_new_tokens, eos_token_id, pad_token_id = settings.max_new_tokens, settings.eos_token_id, settings.pad_token_id
        if settings.stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer (pass tokenizer=...); they may come from the generation "
                             "config")
        samples = settings.num_return_sequences
        batch = input_ids.shape[0] * samples
        if batch > 1 and streamer is not None:
            raise ValueError(f"a streamer takes one sequence (as transformers' streamers do); got {batch} sequences "
                             f"({input_ids.shape[0]} prompt(s) x num_return_sequences {samples}). Stream one prompt "
                             f"and one sample at a time, or generate without a streamer.")
        # every row as the processor would have given it alone (left padding and other rows' media removed)
        rows = self.target.split_batch({"input_ids": input_ids, **inputs})
        for row_inputs in rows:
            if batch > 1:
                check_row_inputs(self.target, row_inputs["input_ids"], row_inputs)
            self._check_row_fits(row_inputs, max_new_tokens)
        if batch > 1:  # a position-dependent rope: every row in the same regime (batched forwards take the longest)
            spans = [self.target.rope_span(row_inputs, max_new_tokens, self.policy.depth_bound) for row_inputs in rows]
            if spans[0] is not None:
                reason = batch_rope_refusal(type(self.target.model).__name__, self.target.text_config, spans)
                if reason is not None:
                    raise ValueError(reason)
        if batch > 1 and pad_token_id is None:
            eos = _eos_ids(eos_token_id, self.target)
            if eos:
                pad_token_id = int(eos[0])
            elif settings.stop_strings:  # without EOS or stop strings every row runs to max_new_tokens: none to fill
                raise ValueError("a batch with stop_strings needs pad_token_id (the generation config has none, nor an "
                                 "EOS id) to fill the rows that end early")
        if samples > 1:  # each prompt's row that many times in a row, as generate expands its inputs
            rows = [row for row in rows for _ in range(samples)]
            input_ids = input_ids.repeat_interleave(samples, dim=0)
        with torch.inference_mode():
            return self._generate(input_ids, rows, settings, tokenizer, streamer, generator, pad_token_id)

    def _check_row_fits(self, row_inputs: dict, max_new_tokens: int) -> None:
        """Refuse a prompt whose output tree attention could not reproduce: past a sliding window the model cannot
        be given, past a learned position table, or across a position-dependent rope threshold.

        The target's queries that decide emitted tokens end at sequence index L + max_new_tokens - 2 (deeper tree
        nodes are never emitted). While prompt + max_new_tokens - 1 positions fit the target's sliding window, the
        tree mask (every earlier token) is the windowed one; past it, the tree forwards block what lies outside the
        window (``FamilyAdapter.tree_attention_masks``) where the model takes that (``window_refusal``). Those
        positions must fit its learned position table if it has one (GPT-2's: deeper tree nodes are capped at the
        table's last row, ``FamilyAdapter.rope_position_ids``). A draft's window and table are not
        checked: its cache holds every position whatever its window (the engine's caches keep them all), its tree
        forwards attend beyond the window or sit at the table's last row, and that changes only its proposals, never
        the output (``test_families_more.py``: ``test_a_draft_window_shorter_than_the_prompt``,
        ``test_learned_position_tables``)."""
        length = row_inputs["input_ids"].shape[1]
        window = self.target.sliding_window()
        if window is not None and length + max_new_tokens - 1 > window:
            reason = self.target.window_refusal(self.policy.depth_bound)
            if reason is not None:
                raise ValueError(
                    f"{type(self.target.model).__name__} uses sliding-window attention (window {window}), and this "
                    f"generation reaches past it (prompt {length} + {max_new_tokens} new tokens - 1 = "
                    f"{length + max_new_tokens - 1} positions): {reason}"
                )
        limit = self.target.position_limit
        if limit is not None and length + max_new_tokens - 1 > limit:  # generate feeds all but the last new token
            raise ValueError(
                f"{type(self.target.model).__name__} embeds positions from a learned table of {limit} "
                f"(max_position_embeddings); prompt {length} + {max_new_tokens} new tokens - 1 = "
                f"{length + max_new_tokens - 1} positions do not fit: shorten the prompt or lower max_new_tokens"
            )
        rope_reason = self.target.rope_refusal(row_inputs, max_new_tokens, self.policy.depth_bound)
        if rope_reason is not None:
            raise ValueError(rope_reason)

    def _text_draft_keep(self, row_inputs: dict) -> Tensor:
        """bool ``[1, L]``: the prompt tokens a text-only draft reads, every token but the target's image/video
        placeholders (the last token when the prompt holds nothing else: the draft's prompt cannot be empty)."""
        visual = self.target.visual_token_mask(row_inputs)
        if visual is None:
            return torch.ones_like(row_inputs["input_ids"], dtype=torch.bool)
        keep = ~visual.bool()
        if not bool(keep.any()):
            keep[:, -1] = True
        return keep

    def _generate(self, input_ids, row_inputs, settings: "GenerationSettings", tokenizer, streamer, generator,
                  pad_token_id) -> GenerationOutput:
        wall_start = time.perf_counter()
        max_new_tokens, do_sample, temperature = settings.max_new_tokens, settings.do_sample, settings.temperature
        max_time = settings.max_time
        policy = self.policy
        batch = len(row_inputs)
        # devices and dtypes as the models are now (looked up once: HF's accessors are slow)
        self.device = device = self.target.input_device
        target_dtype = self.target.dtype
        use_draft = policy.uses_draft
        self.draft_device = self.draft.input_device if use_draft else device
        self.draft_dtype = self.draft.dtype if use_draft else None
        self.timeline = timeline = Timeline(device, clock=self.host_clock)
        self.do_sample = do_sample
        self.draft_temperature = temperature if do_sample else 1.0
        self._active_warpers = sampling_warpers(settings, device) if do_sample else []

        eos_ids = set(_eos_ids(settings.eos_token_id, self.target))
        # EOS ids the scores have (generate's rule: an id outside them matches nothing); transformers' processors get
        # them all, as generate hands them over
        scored_eos = [i for i in sorted(eos_ids) if 0 <= i < self.target.vocab_size]
        processing = TargetProcessing(settings.repetition_penalty, settings.min_length, settings.min_new_tokens,
                                      torch.tensor(scored_eos, dtype=torch.int64, device=device),
                                      sorted(eos_ids) if eos_ids else None, settings.processors, max_new_tokens)
        self._processing = processing if processing.active else None
        stop_criteria = StopStringCriteria(tokenizer, settings.stop_strings) if settings.stop_strings else None

        # one state per row; row 0 runs the generator's own policy object (its state is inspected after a call)
        prompt_lens = [inputs["input_ids"].shape[1] for inputs in row_inputs]
        if processing.settings:  # each row's processors built (and their values checked) before any forward
            for prompt_len in prompt_lens:
                processing.row_processors(prompt_len)
        # sequence buffers: bound every cache length, with room for a whole tree's new tokens (commit_tree_)
        max_len = max(prompt_lens) + max_new_tokens + policy.capacity + 2
        rows = [_Row(index, policy if index == 0 else policy.for_row(), prompt_len, max_len, device)
                for index, prompt_len in enumerate(prompt_lens)]
        # every forward feeds at most max(first draft forward, tree) rows past a row's length; the buffers start with
        # room for the prompts and a few steps, and grow by doubling as the rows get longer
        tree_room = policy.forward_rows
        cache_capacity = max_len + tree_room
        initial = max(prompt_lens) + min(max_new_tokens, 64) + 2 * tree_room
        self.target_cache = RowCache(batch, cache_capacity, initial)
        self.draft_cache = None
        if use_draft:
            # a captured draft needs static buffers, with room for a forward padded to its shape bucket
            static_room = padded_rows(tree_room) if self.capture_draft else None
            self.draft_cache = RowCache(batch, cache_capacity, initial, static_room=static_room)

        # ---------------------------------------------------------- prefill, row by row
        target_offsets, draft_offsets, first_logits = [], [], []
        for row, inputs in zip(rows, row_inputs):
            row.seq[0, : row.prompt_len] = inputs["input_ids"][0].to(device)
            # processor outputs go where the models' embeddings are (accelerate hooks move them further)
            inputs = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in inputs.items()}
            prefill_cache = DynamicCache()
            # the target's prefill, scoring the visual tokens for the draft's pruning when it is on
            with timeline.region("target_prefill"):
                target_prefill, row.keep, _ = scored_prefill(
                    self.target, inputs, prefill_cache,
                    self.draft_prune_ratio if use_draft and not self.text_draft else 0.0)
                self.target_cache.load_row(row.index, prefill_cache)
            if use_draft and self.text_draft:
                row.keep = self._text_draft_keep(inputs)
            target_offsets.append(self.target.position_offset)
            first_logits.append(target_prefill.logits_last.to(device))
            if use_draft:
                # a text draft reads the prompt's text tokens only (no media to move)
                draft_inputs = {"input_ids": inputs["input_ids"]} if self.text_draft else inputs
                if self.draft_device != device:
                    draft_inputs = {key: value.to(self.draft_device) if isinstance(value, Tensor) else value
                                    for key, value in draft_inputs.items()}
                if self.draft_token_clamp is not None:  # target-only padding ids (a sampled one, fed back) as the
                    # tree's tokens are: clamped into the draft's vocabulary (what the draft reads, never the output)
                    draft_inputs = {**draft_inputs, "input_ids": draft_inputs["input_ids"].clamp_max(
                        self.draft_token_clamp)}
                prefill_cache = DynamicCache()
                with timeline.region("draft_prefill"):
                    if self.text_draft:
                        self.draft.prefill_text(draft_inputs["input_ids"], row.keep, prefill_cache)
                    else:
                        self.draft.prefill(draft_inputs, prefill_cache,
                                           keep=None if row.keep is None else row.keep.to(self.draft_device))
                    row.draft_start = self.draft_cache.load_row(row.index, prefill_cache)
                draft_offsets.append(self.draft.position_offset)
        self.target.position_offset = _batch_offsets(target_offsets, device)
        if use_draft:
            self.draft.position_offset = _batch_offsets(draft_offsets, self.draft_device)
        with timeline.region("tree_ops"):
            logits = torch.cat([self._target_scores(row_logits, row, row.prompt_len, None)
                                for row, row_logits in zip(rows, first_logits)])
            if do_sample and self.coupled_sampling:
                warped = self._warped(logits)
                # the prefill's tokens are read on the host just below anyway
                if bool(no_distribution(warped).any()):
                    raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
                for row, row_generator in zip(rows, row_generators(batch, generator)):
                    row.noise = PositionNoise(row_generator, device)
                first = torch.stack([coupled_token(warped[row.index], row.noise.at(row.prompt_len, warped.shape[-1]))
                                     for row in rows])
            elif do_sample:
                # drawn on the generator's device (a CPU generator with a model on CUDA works too): this is the
                # prefill, whose tokens are read on the host just below anyway
                probs = self._target_probs(logits)
                if generator is not None:
                    probs = probs.to(generator.device)
                first = torch.multinomial(probs, 1, generator=generator).to(device)[:, 0]
            else:
                first = logits.argmax(dim=-1)
            for row in rows:
                row.seq[0, row.prompt_len] = first[row.index]
        first_tokens = first.tolist()  # the prefill's one host read
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(torch.tensor(first_tokens[:1]))
        for row, inputs, token in zip(rows, row_inputs, first_tokens):
            row.start(inputs["input_ids"][0].tolist(), token, max_new_tokens, eos_ids, stop_criteria)

        capacity = policy.capacity
        row_table = self._row_tables.get((device, capacity))
        for row in rows:
            row.ctx = DraftRound(
                self, row, capacity, max_len, device, self.draft_dtype, target_dtype,
                static_default=device.type == "cuda", row_table=row_table,
            )
            row_table = row.ctx.ws.row_table
            if use_draft:
                row.ctx.ws.start_generation(row.draft_start, sorted(eos_ids))
        self._row_tables[(device, capacity)] = row_table
        # the caches' key/value tensors grouped by device (a model split with device_map has several groups): the
        # workspace's commit compacts every group of the row
        target_from, draft_from = self.elsewhere_from
        target_groups = CacheGroups(self.target_cache, device, target_from)
        draft_groups = CacheGroups(self.draft_cache, device, draft_from) if use_draft else None
        self._draft_vocab_limit = None
        if use_draft and self.draft.vocab_size > self.shared_vocab:
            self._draft_vocab_limit = self.shared_vocab
        no_groups: list = []
        switch, step_begin, step_end = timeline.switch, timeline.step_begin, timeline.step_end
        live = [row for row in rows if row.stop_reason is None]
        if 0 < len(live) < batch:  # rows that ended with their first token leave the batch before any step
            self._keep_rows([row.index for row in live])
        learns_costs = policy.learns_costs
        step = 0
        # ---------------------------------------------------------- steps
        while live:
            step_begin("tree_ops")
            node_limit = self._node_limit(len(live))
            # every row's policy builds its tree level by level; one draft forward per level for the whole batch
            builds = {}  # batch slot -> (row, its build, the inputs of its next draft forward)
            for slot, row in enumerate(live):
                row.ctx.node_limit = node_limit
                # nodes deeper than the tokens left (the bonus aside) are never emitted: with one token left the step
                # is the root alone, an ordinary decode step, whatever the policy
                row.ctx.depth_limit = max_new_tokens - row.n_generated - 1
                build = row.policy.build(row.ctx) if row.ctx.depth_limit > 0 else _LAST_TOKEN.build(row.ctx)
                request = _advance(row, build, None)
                if request is not None:
                    builds[slot] = (row, build, request)
            while builds:
                logits = self._draft_forward(live, builds)
                for slot, (row, build, _) in list(builds.items()):
                    request = _advance(row, build, logits[slot: slot + 1, : row.fed])
                    if request is None:
                        del builds[slot]
                    else:
                        builds[slot] = (row, build, request)
            # the target verifies every row's tree in one forward
            target_requests = []
            for row in live:
                row.num_nodes = row.ctx.ws.tree_nodes
                row.target_len = row.cur_len - 1  # the root is not in the target cache
                target_requests.append(row.ctx.ws.target_inputs(row.target_len))
            switch("target_verify")
            logits = self._batch_forward(self.target, self.target_cache, target_requests,
                                         [row.target_len for row in live], target_dtype, device)
            switch("tree_ops")
            if logits.device != device:  # lm_head on another device (device_map)
                logits = logits.to(device)
            # per row: verification, then the commit (new tokens into the row's sequence buffer, both caches'
            # accepted rows compacted in the row's columns); then all rows' readbacks read to the host at once
            readbacks = []
            for slot, (row, (tokens, positions, _)) in enumerate(zip(live, target_requests)):
                num_nodes = row.num_nodes
                workspace = row.ctx.ws
                target_tensors = target_groups.tensors(slot) if num_nodes > 1 else no_groups
                draft_tensors = draft_groups.tensors(slot) if use_draft and num_nodes > 1 else no_groups
                tree = None  # each node's path, only when the scores are processed (read from the workspace)
                if self._processing is not None and num_nodes > 1:
                    tree = (tokens[:, :num_nodes], workspace.tree_parents, row.proposal.depth_bound)
                scores = self._target_scores(logits[slot, :num_nodes], row, row.cur_len, tree)
                if do_sample and self.coupled_sampling:
                    # node at depth d predicts sequence index cur_len + d: its index's noise
                    noise = row.noise.for_nodes(row.cur_len, positions[0, :num_nodes] - (row.cur_len - 1),
                                                row.proposal.depth_bound + 1, scores.shape[-1])
                    verified = verify_coupled(tokens[:, :num_nodes], workspace.tree_parents[:, :num_nodes],
                                              self._warped(scores), noise)
                    readback = workspace.commit_async(None, *verified, row.cur_len, target_tensors, row.target_len,
                                                      draft_tensors)
                elif do_sample:
                    probs = self._target_probs(scores)[None]
                    verified = self._verify_sampling(tokens, workspace.tree_parents, probs, generator)
                    readback = workspace.commit_async(None, *verified, row.cur_len, target_tensors, row.target_len,
                                                      draft_tensors)
                else:
                    readback = workspace.commit_async(scores[None], None, None, None, row.cur_len, target_tensors,
                                                      row.target_len, draft_tensors)
                level_mass = row.proposal.level_mass
                if isinstance(level_mass, Tensor):  # the tree's mass per depth rides along (float64 bits as int64)
                    readback = torch.cat([readback, level_mass.view(torch.int64)[None]], dim=1)
                readbacks.append(readback)
            for row, readback in zip(live, _to_host(readbacks)):  # the step's one sync
                level_mass = row.proposal.level_mass
                if isinstance(level_mass, Tensor):  # the last entries (host-known count) are the mass
                    levels = level_mass.shape[0]
                    row.level_mass = tuple(readback[-levels:].view(torch.float64).tolist())
                    readback = readback[:-levels]
                else:  # host floats, read as the levels were built, or not measured
                    row.level_mass = level_mass or ()
                row.committed = row.ctx.ws.read_commit(readback)
            switch("other")
            step += 1
            for slot, row in enumerate(live):
                row.finish_step(max_new_tokens, eos_ids, stop_criteria, streamer)
                if self.step_hook is not None:
                    self._debug(row, slot, target_requests[slot][0], step)
            if max_time is not None and time.perf_counter() - wall_start > max_time:  # generate's MaxTimeCriteria
                for row in live:
                    row.stop_reason = row.stop_reason or "max_time"
            if learns_costs and step >= 2:  # the step before this one: its times are final (see Timeline)
                policy.observe_cost(self._step_cost(rows, step - 1))
            finished = [slot for slot, row in enumerate(live) if row.stop_reason is not None]
            if finished:  # finished rows leave the batch: no more draft or target compute for them
                kept = [slot for slot in range(len(live)) if slot not in finished]
                live = [live[slot] for slot in kept]
                if live:
                    self._keep_rows(kept)
            step_end()

        if streamer is not None:
            streamer.end()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_time = time.perf_counter() - wall_start
        all_stats = []
        for row in rows:
            stats = row.stats(policy.name if row.index == 0 else row.policy.name)
            stats.wall_time = wall_time
            timeline.finish(stats)
            all_stats.append(stats)
        padded_len = input_ids.shape[1]
        # like generate: the prompts as given (left padding kept), each row's new tokens, pad_token_id after its end
        longest_new = max(row.cur_len - row.prompt_len for row in rows)
        fill = 0 if pad_token_id is None else pad_token_id  # (only a batch has rows to fill: pad_token_id is set)
        sequences = torch.full((batch, padded_len + longest_new), fill, dtype=torch.int64)
        sequences[:, :padded_len] = input_ids.cpu()
        for row in rows:
            new = row.seq[0, row.prompt_len: row.cur_len].cpu()
            sequences[row.index, padded_len: padded_len + new.shape[0]] = new
        return GenerationOutput(sequences.to(input_ids.device), all_stats if batch > 1 else all_stats[0])

    def _step_cost(self, rows: list["_Row"], step: int) -> StepCost:
        """The measured costs of step ``step`` (1-based, finished) and the trees it verified, over the rows it ran
        (a row's records start at step 1; the batch pads every tree to the largest and runs the deepest's levels)."""
        seconds, draft_seconds, verify_seconds = self.timeline.step_costs(step - 1)
        records = [row.step_rows[step - 1] for row in rows if len(row.step_rows) >= step]
        return StepCost(seconds, draft_seconds, verify_seconds,
                        draft_forwards=max(r.draft_forwards for r in records),
                        verified_slots=max(r.slots for r in records), tree_depth=max(r.depth_bound for r in records),
                        outcomes=tuple(RowOutcome(r.tau, r.depth_bound, r.level_mass, r.shape, r.trial)
                                       for r in records))

    def _node_limit(self, rows: int) -> int:
        """Each of ``rows`` running rows' share of the batch's node budget (roots included), at most the policy's
        capacity, at least 2."""
        capacity = self.policy.capacity
        if self.batch_node_budget is None:
            return capacity
        return max(2, min(capacity, self.batch_node_budget // rows))

    # ------------------------------------------------------------------ batched forwards
    def _batch_forward(self, adapter: FamilyAdapter, cache: RowCache, requests: list, starts: list[int],
                       mask_dtype: torch.dtype, device: torch.device) -> Tensor:
        """One forward of ``adapter``'s model over every live row: row b's request ``(tokens [1, n_b], positions
        [1, n_b], mask [1, 1, n_b, starts[b] + n_b])`` (None: the row feeds nothing this time) goes to its cache
        columns ``starts[b] ..``; rows are padded to the longest request (padding rows see column 0 only and are
        never read). Returns logits ``[B, n, V]`` (row b's first n_b rows are its own).

        A static ``cache`` (a captured draft) pads the rows further, to ``padded_rows``, and the mask to the
        cache's whole width, so the forward's shapes stay among a few captured ones."""
        count = max(request[0].shape[1] for request in requests if request is not None)
        if cache.static:
            count = padded_rows(count)
            cache.plan_static_writes(starts, count, device)
            width = cache.allocated
            forward = self._captured_forward(device)
        elif len(requests) == 1:  # one row: its inputs as they are
            tokens, positions, mask = requests[0]
            cache.plan_writes(starts, tokens.shape[1])
            return adapter.forward_tree(tokens, positions, mask, cache)
        else:
            cache.plan_writes(starts, count)
            width = max(starts) + count
            forward = tree_forward
        tokens = torch.zeros(len(requests), count, dtype=torch.int64, device=device)
        positions = torch.zeros(len(requests), count, dtype=torch.int64, device=device)
        mask = torch.full((len(requests), 1, count, width), torch.finfo(mask_dtype).min, dtype=mask_dtype,
                          device=device)
        mask[:, :, :, 0] = 0  # every row holds its first prompt token: padding rows attend to it alone
        for slot, request in enumerate(requests):
            if request is None:
                continue
            row_tokens, row_positions, row_mask = request
            n = row_tokens.shape[1]
            tokens[slot, :n] = row_tokens[0]
            positions[slot, :n] = row_positions[0]
            mask[slot, 0, :n, : row_mask.shape[-1]] = row_mask[0, 0]
        return forward(adapter, tokens, positions, mask, cache)

    def _captured_forward(self, device: torch.device) -> CapturedForward:
        captured = self._captured.get(device.type)
        if captured is None:
            captured = self._captured[device.type] = CapturedForward(device)
        return captured

    def _draft_forward(self, live: list["_Row"], builds: dict[int, tuple]) -> Tensor:
        """One draft forward over the live rows (``builds``: batch slot -> (row, build, the workspace's forward
        inputs); the other rows feed nothing), booked as ``draft_decode``. Logits ``[B, n, V_shared]`` on the
        tree's device."""
        row_requests, starts = [], []
        for slot, row in enumerate(live):
            request = builds[slot][2] if slot in builds else None
            row_requests.append(request)
            # a request's rows go right after what the row's draft cache holds (the mask's past); an idle row's
            # padding goes past its length, where nothing is read and the next feed writes over it
            if request is None:
                starts.append(row.ctx.ws.draft_len)
                row.fed = 0
            else:
                row.fed = request[0].shape[1]
                starts.append(request[2].shape[-1] - row.fed)
        if self.draft_token_clamp is not None:
            row_requests = [None if r is None else (r[0].clamp_max(self.draft_token_clamp), r[1], r[2])
                            for r in row_requests]
        other_device = self.draft_device != self.device
        if other_device:  # draft on another device than the target's inputs
            row_requests = [None if r is None else tuple(t.to(self.draft_device) for t in r) for r in row_requests]
        switch = self.timeline.switch
        switch("draft_decode")
        logits = self._batch_forward(self.draft, self.draft_cache, row_requests, starts, self.draft_dtype,
                                     self.draft_device)
        if other_device:
            # inside draft_decode: the copy waits for the draft's forward on its device, which is draft time
            logits = logits.to(self.device)
        switch("tree_ops")
        limit = self._draft_vocab_limit
        return logits if limit is None else logits[..., :limit]

    def _keep_rows(self, kept: list[int]) -> None:
        """Only the rows ``kept`` (batch slots) go on: caches and position offsets shrink to them."""
        self.target_cache.keep_rows(kept)
        self.target.position_offset = _select_offsets(self.target.position_offset, kept)
        if self.draft_cache is not None:
            self.draft_cache.keep_rows(kept)
            self.draft.position_offset = _select_offsets(self.draft.position_offset, kept)

    def _debug(self, row: "_Row", slot: int, tokens: Tensor, step: int) -> None:
        """The test hook's view of one row after a step: its caches as DynamicCache copies of what it holds."""
        workspace = row.ctx.ws
        target_cache = self.target_cache.row_cache(slot, row.cur_len - 1)
        draft_cache = self.draft_cache.row_cache(slot, workspace.draft_len) if self.draft_cache is not None else None
        self.step_hook(StepDebug(
            step=step, sequence=list(row.sequence_host), target_cache=target_cache, draft_cache=draft_cache,
            draft_done=row.draft_done, tree_tokens=tokens, tree_parents=workspace.tree_parents,
            tree_logprobs=workspace.tree_logprobs, accepted=row.committed.accepted, tau=row.committed.accept_len,
            finished=row.stop_reason is not None, draft_keep=row.keep, row=row.index,
            level_mass=row.level_mass,
        ))

    def _verify_sampling(self, tokens: Tensor, parents: Tensor, probs: Tensor, generator) -> tuple:
        """Lossless verification of a sampled step's deterministic top-k tree (q = 1) by ``sampling_rule``."""
        return self._verify_sampled_tree(tokens, parents, probs, None, generator)

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


def _quantizes_activations_per_forward(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds dynamically quantized Linear layers (``torch.ao.quantization.quantize_dynamic``), whose
    activation scale is computed over the whole input of each call: their output for a row depends on the other
    rows of the forward."""
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    return any(isinstance(module, dynamic_linear) for module in model.modules())


#: The keyword arguments of ``generate`` / ``stream`` that go to the ``SpeculativeGenerator``.
GENERATOR_ARGUMENTS = ("draft_prune_ratio", "max_vocab_padding", "batch_node_budget", "capture_draft", "sampling_rule")


def generate(target: torch.nn.Module, draft: torch.nn.Module | None, policy: str | TreePolicy = DEFAULT_POLICY,
             **kwargs: Any) -> GenerationOutput:
    """One-call shortcut: ``SpeculativeGenerator(target, draft, policy).generate(**kwargs)``.

    The generator's own arguments (``GENERATOR_ARGUMENTS``: ``draft_prune_ratio``, ``max_vocab_padding``,
    ``batch_node_budget``, ``capture_draft``, ``sampling_rule``) go to it; everything else to
    ``generate``.
    """
    generator_kwargs = {key: kwargs.pop(key) for key in GENERATOR_ARGUMENTS if key in kwargs}
    return SpeculativeGenerator(target, draft, policy, **generator_kwargs).generate(**kwargs)


def stream(target: torch.nn.Module, draft: torch.nn.Module | None, policy: str | TreePolicy = DEFAULT_POLICY,
           **kwargs: Any):
    """One-call streaming: ``SpeculativeGenerator(target, draft, policy).stream(**kwargs)`` (see
    ``SpeculativeGenerator.stream``); the generator's own arguments go to it, as in ``generate``."""
    generator_kwargs = {key: kwargs.pop(key) for key in GENERATOR_ARGUMENTS if key in kwargs}
    return SpeculativeGenerator(target, draft, policy, **generator_kwargs).stream(**kwargs)


# ---------------------------------------------------------------------------------------------- per-row state
class _StepRow(NamedTuple):
    """The host record of one row's step, made into a ``StepRecord`` after the generation (and read one step late
    by cost-aware policies)."""

    tau: int
    emitted: int
    real_nodes: int
    slots: int  # draft slots verified (padding included, root excluded)
    depth_bound: int
    draft_forwards: int
    info: dict
    alpha_measured: float | None
    level_mass: tuple[float, ...]
    shape: str  # the proposal's shape and whether it was a trial (TreeProposal's)
    trial: bool


def _eos_ids(eos_token_id: int | list[int] | Tensor | None, target: FamilyAdapter) -> list[int]:
    """The generation's EOS ids: ``eos_token_id`` (an int, a list or a tensor of them, as ``generate`` takes) or, when
    None, the target's generation config's (none there: no EOS)."""
    return token_id_list(eos_token_id) if eos_token_id is not None else target.eos_token_ids()


def _stop_reason(token: int, sequence: list[int], eos_ids: set[int], stop_criteria) -> str | None:
    if token in eos_ids:
        return "eos"
    if stop_criteria is not None:
        tail = torch.tensor([sequence[-stop_criteria.maximum_token_len :]])
        if bool(stop_criteria(tail, None)[0]):
            return "stop_string"
    return None


class _Row:
    """One prompt of a generation (a row of the batch): its sequence buffer, policy, tree workspace (``ctx``) and
    the host bookkeeping of its steps. ``index`` is the row in the caller's batch; the row's slot in the caches
    is its place among the rows still running."""

    def __init__(self, index: int, policy: TreePolicy, prompt_len: int, max_len: int, device: torch.device):
        self.index = index
        self.policy = policy
        policy.reset()
        self.prompt_len = prompt_len
        self.seq = torch.zeros(1, max_len, dtype=torch.int64, device=device)
        self.keep: Tensor | None = None  # prompt positions the draft sees (visual pruning, a text draft's), None = all
        self.draft_start = 0  # the draft cache's length after the prefill
        self.ctx: DraftRound | None = None
        self.step_rows: list[_StepRow] = []
        self.fed = 0  # rows of the current draft forward that are this row's
        self.proposal = None
        self.committed = None
        self.num_nodes = 1
        self.target_len = 0
        self.level_mass: tuple[float, ...] = ()  # the step's tree mass per depth, when the policy measures it
        self.noise: PositionNoise | None = None  # the row's noise per sequence index (sampling_rule "gumbel")

    def start(self, prompt: list[int], first_token: int, max_new_tokens: int, eos_ids: set[int],
              stop_criteria) -> None:
        """After the prefill: the first new token is committed (not yet in either cache)."""
        self.cur_len = self.prompt_len + 1
        self.draft_done = self.prompt_len
        self.n_generated = 1
        self.sequence_host = prompt + [first_token]
        self.stop_reason = _stop_reason(first_token, self.sequence_host, eos_ids, stop_criteria)
        if self.stop_reason is None and max_new_tokens == 1:
            self.stop_reason = "max_new_tokens"

    def finish_step(self, max_new_tokens: int, eos_ids: set[int], stop_criteria, streamer) -> None:
        """The host side of a committed step: emitted tokens, stop checks, streamer, policy feedback."""
        committed, proposal = self.committed, self.proposal
        # the readback, decoded by the workspace (host ints, a float, a list: no device access)
        tau, processed_n, real_n = committed.accept_len, committed.draft_held, committed.real_nodes
        new_host, alpha_measured = committed.tokens, committed.alpha
        if new_host and min(new_host) < 0:  # the verify ops' bonus when the target row is not a distribution
            raise RuntimeError("the target's sampling probabilities after the accepted tokens hold inf or nan (no "
                               "positive entry; a float16 overflow?): transformers' sampling raises here as well "
                               "('probability tensor contains either inf, nan or element < 0')")
        if proposal.draft_forwards:  # (a step of the root alone leaves the draft where it was: what it commits is
            self.draft_done = self.target_len + processed_n  # fed with the next drafted step's root)
        remaining = max_new_tokens - self.n_generated
        emitted = new_host if len(new_host) <= remaining else new_host[:remaining]
        sequence_host = self.sequence_host
        if stop_criteria is None:
            if not eos_ids.isdisjoint(emitted):
                for position, token in enumerate(emitted):
                    if token in eos_ids:
                        emitted = emitted[: position + 1]
                        self.stop_reason = "eos"
                        break
            sequence_host.extend(emitted)
        else:
            accepted_host = []
            for token in emitted:
                accepted_host.append(token)
                sequence_host.append(token)
                self.stop_reason = _stop_reason(token, sequence_host, eos_ids, stop_criteria)
                if self.stop_reason is not None:
                    break
            emitted = accepted_host
        self.n_generated += len(emitted)
        self.cur_len += len(emitted)
        if self.stop_reason is None and self.n_generated >= max_new_tokens:
            self.stop_reason = "max_new_tokens"
        if streamer is not None and emitted:
            streamer.put(torch.tensor(emitted))
        # the step's record, assembled into a StepRecord after the generation (off the hot path)
        self.step_rows.append(_StepRow(tau, len(emitted), real_n, self.num_nodes - 1, proposal.depth_bound,
                                       proposal.draft_forwards, proposal.info, alpha_measured, self.level_mass,
                                       proposal.shape, proposal.trial))
        self.policy.update(tau, alpha_measured)

    def stats(self, name: str) -> GenerationStats:
        stats = GenerationStats(policy=name, prompt_len=self.prompt_len)
        for tau, emitted_n, real_n, slots, depth_bound, forwards, info, alpha_measured, *_ in self.step_rows:
            info = self.policy.step_info(info, alpha_measured)
            stats.steps.append(StepRecord(
                tau=tau, emitted=emitted_n, tree_size=real_n, tree_slots=slots, tree_depth=depth_bound,
                draft_forwards=forwards, alpha=info.get("alpha"), alpha_measured=alpha_measured,
                depth_target=info.get("depth_target"), width_target=info.get("width_target"), d_max=info.get("d_max"),
            ))
        stats.new_tokens = self.n_generated
        stats.stop_reason = self.stop_reason
        return stats


def _advance(row: _Row, build, logits: Tensor | None):
    """Run a row's tree build up to its next draft forward: that forward's inputs, or None when the tree is done
    (the proposal is then in ``row.proposal``)."""
    try:
        return build.send(logits)
    except StopIteration as done:
        row.proposal = done.value
        return None


def _to_host(readbacks: list[Tensor]) -> list[Tensor]:
    """The rows' commit readbacks (``[1, 4 + N_b]`` int64 each) on the host, read with one device-to-host copy."""
    if readbacks[0].is_cpu:
        return [readback.view(-1) for readback in readbacks]
    if len(readbacks) == 1:
        return [readbacks[0].view(-1).cpu()]
    host = torch.cat([readback.view(-1) for readback in readbacks]).cpu()
    return list(host.split([readback.numel() for readback in readbacks]))


def _batch_offsets(offsets: list, device: torch.device) -> int | Tensor:
    """The rows' position offsets (``PrefillResult.position_offset``: an int, or ``[1, 1]`` / ``[R, 1, 1]``) as one
    offset over the batch (``[B, 1]`` / ``[R, B, 1]``; the int when every row's is that int)."""
    tensors = [offset for offset in offsets if isinstance(offset, Tensor)]
    if not tensors:
        if all(offset == offsets[0] for offset in offsets):
            return offsets[0]
        return torch.tensor(offsets, dtype=torch.int64, device=device)[:, None]
    if len(offsets) == 1:
        return offsets[0]
    parts = [offset if isinstance(offset, Tensor) else torch.full_like(tensors[0], offset) for offset in offsets]
    return torch.cat(parts, dim=-2)


def _select_offsets(offset: int | Tensor, kept: list[int]) -> int | Tensor:
    """The position offset of the rows ``kept`` (batch slots)."""
    if not isinstance(offset, Tensor):
        return offset
    return offset.index_select(offset.dim() - 2, torch.tensor(kept, device=offset.device))
