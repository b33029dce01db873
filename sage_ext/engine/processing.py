"""The logits processors of transformers' ``generate`` that the engine applies to the target's scores, node by node.

A tree node's scores are those ``generate`` would compute after the node's context: the row's committed tokens
(prompt included) and the node's path from the root. ``TargetProcessing`` holds a generation's settings and applies,
in ``generate``'s order, the sequence bias, the repetition penalty, repeated n-grams, banned words, the minimum
lengths (EOS forbidden before them), forced BOS/EOS, invalid-value removal, the exponential length penalty and
suppressed tokens: the penalty and the minimum lengths with the engine's own code (bit-identical, over all nodes at
once), the others with transformers' own processors (``transformers_processors``), called once per tree depth on
every node's ids (its context, then its path) and kept for the nodes at that depth. The sampling warpers come after
(``sampling_warpers``: HF's own classes, in ``generate``'s order and under its conditions; each reads a node's own
scores only, so it applies to all of a tree's nodes at once). Everything is tensor work over all nodes at once
(loops over tree depth, never over nodes), without a host read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)


def tree_paths(tokens: Tensor, parents: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """``(paths [N, depth + 1], depths [N])``: each node's token, then its ancestors' up to ``depth`` levels (past the
    root: the root's token again), and each node's depth below the root. ``tokens`` / ``parents`` ``[N]`` or
    ``[1, N]`` (the root's parent negative); ``depth`` bounds the tree's depth."""
    tokens, parents = tokens.reshape(-1), parents.reshape(-1).clamp(min=0)
    node = torch.arange(tokens.shape[0], device=tokens.device)
    columns, depths = [tokens], torch.zeros_like(node)
    for _ in range(depth):
        depths += node != 0
        node = parents[node]
        columns.append(tokens[node])
    return torch.stack(columns, dim=1), depths


def penalize_repeats(scores: Tensor, context: Tensor, paths: Tensor | None, penalty: float) -> Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` for ``N`` continuations of one row at once: node ``n``'s
    scores ``[V]`` (float32) get the penalty on every token id in ``context [L]`` (the row's committed tokens) or in
    ``paths[n]`` (its path in the tree; None: no tree). The same arithmetic as transformers' (a negative score times
    the penalty, a positive one divided by it), so the result is bit-identical; ids beyond the scores' width (a
    prompt id only a larger embedding holds) are not penalized, as there."""
    vocab = scores.shape[-1]
    seen = torch.zeros(vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(0, context.to(scores.device).clamp(max=vocab), True)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    out = torch.where(seen[:vocab], penalized, scores)
    if paths is not None:  # each node's own path; a token also in the context gets the same value twice
        out.scatter_(1, paths, penalized.gather(1, paths))
    return out


#: generate's settings whose processors the engine applies with transformers' own classes (``transformers_processors``)
PROCESSOR_SETTINGS = ("sequence_bias", "no_repeat_ngram_size", "bad_words_ids", "forced_bos_token_id",
                      "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
                      "suppress_tokens", "begin_suppress_tokens")


class RowProcessors(NamedTuple):
    """transformers' processors of one row, by where ``generate`` puts them around the engine's own steps."""

    before_penalty: list  # sequence bias
    before_min_lengths: list  # repeated n-grams, banned words
    after_min_lengths: list  # forced BOS / EOS, invalid values, exponential length penalty, suppressed tokens

    def __bool__(self) -> bool:
        return bool(self.before_penalty or self.before_min_lengths or self.after_min_lengths)


def transformers_processors(settings: dict[str, Any], eos: list[int] | None, prompt_len: int, max_new_tokens: int,
                            device: torch.device | str = "cpu") -> RowProcessors:
    """The processors ``generate`` builds for the ``PROCESSOR_SETTINGS`` in ``settings`` (those set: not None), for a
    row of ``prompt_len`` prompt tokens (lengths count from it: forced EOS at the last of ``max_new_tokens``, the
    decay's start, the first new token for ``begin_suppress_tokens``) with the generation's EOS ids ``eos`` (all of
    them, as ``generate`` hands them over; None: no EOS). HF's classes under ``generate``'s conditions; their
    constructors check the values (ValueError), as in ``generate``."""
    before_penalty, before_min_lengths, after = [], [], []
    eos_tensor = None if eos is None else torch.tensor(eos, dtype=torch.int64)
    if settings.get("sequence_bias") is not None:
        before_penalty.append(SequenceBiasLogitsProcessor(sequence_bias=settings["sequence_bias"]))
    if settings.get("no_repeat_ngram_size") is not None and settings["no_repeat_ngram_size"] > 0:
        before_min_lengths.append(NoRepeatNGramLogitsProcessor(settings["no_repeat_ngram_size"]))
    if settings.get("bad_words_ids") is not None:
        before_min_lengths.append(NoBadWordsLogitsProcessor(settings["bad_words_ids"], eos_tensor))
    forced_bos = settings.get("forced_bos_token_id")
    if forced_bos is not None:
        after.append(ForcedBOSTokenLogitsProcessor(forced_bos))
    if settings.get("forced_eos_token_id") is not None:
        after.append(ForcedEOSTokenLogitsProcessor(prompt_len + max_new_tokens, settings["forced_eos_token_id"],
                                                   device=device))
    if settings.get("remove_invalid_values") is True:
        after.append(InfNanRemoveLogitsProcessor())
    if settings.get("exponential_decay_length_penalty") is not None:
        if eos_tensor is None:  # (generate fails inside the processor's constructor)
            raise ValueError("exponential_decay_length_penalty raises the EOS scores: it needs an EOS id "
                             "(eos_token_id, or the target's generation config's)")
        after.append(ExponentialDecayLengthPenalty(settings["exponential_decay_length_penalty"], eos_tensor,
                                                   prompt_len))
    if settings.get("suppress_tokens") is not None:
        after.append(SuppressTokensLogitsProcessor(settings["suppress_tokens"], device=device))
    if settings.get("begin_suppress_tokens") is not None:
        begin = prompt_len if prompt_len > 1 or forced_bos is None else prompt_len + 1
        after.append(SuppressTokensAtBeginLogitsProcessor(settings["begin_suppress_tokens"], begin, device=device))
    return RowProcessors(before_penalty, before_min_lengths, after)


def node_ids(context: Tensor, paths: Tensor, depths: Tensor) -> Tensor:
    """``[N, L + D]``: each node's ids as ``generate`` would hold them before its next token -- the ``L`` committed
    tokens, then its path below the root (``paths [N, D + 1]`` and ``depths [N]`` from ``tree_paths``); a node at
    depth d holds ``L + d`` of them (past those: any token, never read)."""
    span = paths.shape[1] - 1
    below = (depths[:, None] - 1 - torch.arange(span, device=paths.device)[None]).clamp(min=0)
    return torch.cat([context.to(paths.device).expand(paths.shape[0], -1), paths.gather(1, below)], dim=1)


#: transformers' processors that read no ids (the same for every node): applied once to all nodes, not per depth
READS_NO_IDS = (SuppressTokensLogitsProcessor, InfNanRemoveLogitsProcessor)


def apply_per_depth(processors: list, scores: Tensor, context: Tensor, ids: Tensor | None, depths: Tensor | None,
                    depth_bound: int) -> Tensor:
    """``processors`` (transformers', each reading a row's own ids and scores) on every node, in order: with a tree
    (``ids`` from ``node_ids``), those that read ids once per depth d on all nodes' ids cut to ``L + d``, kept for the
    nodes at depth d (a loop over the depths, never over the nodes, no host read), the others (``READS_NO_IDS``)
    once on all nodes; without a tree, each on ``context`` alone."""
    if ids is None:
        for processor in processors:
            scores = processor(context[None], scores)
        return scores
    segment: list = []  # consecutive processors that read ids
    for processor in [*processors, None]:
        if processor is not None and not isinstance(processor, READS_NO_IDS):
            segment.append(processor)
            continue
        if segment:
            out = scores
            for depth in range(depth_bound + 1):
                processed = scores
                for each in segment:
                    processed = each(ids[:, : context.shape[0] + depth], processed)
                if processed is not scores:  # (a processor whose length does not apply here returns its input)
                    out = torch.where((depths == depth)[:, None], processed, out)
            scores, segment = out, []
        if processor is not None:
            scores = processor(ids, scores)
    return scores


@dataclass
class TargetProcessing:
    """A generation's processing of the target's scores (see the module docstring). ``eos`` ``[E]``: the EOS ids the
    scores have, on their device; ``eos_ids``: every EOS id of the generation, on the host (None: none), for
    transformers' processors; ``settings``: the ``PROCESSOR_SETTINGS`` set, applied with each row's
    ``transformers_processors`` (built once per prompt length)."""

    repetition_penalty: float
    min_length: int
    min_new_tokens: int
    eos: Tensor
    eos_ids: list[int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 0
    _rows: dict[int, RowProcessors] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return (self.repetition_penalty != 1.0 or bool(self.settings)
                or (self.eos.numel() > 0 and (self.min_length or self.min_new_tokens) > 0))

    def row_processors(self, prompt_len: int) -> RowProcessors:
        processors = self._rows.get(prompt_len)
        if processors is None:
            processors = self._rows[prompt_len] = transformers_processors(
                self.settings, self.eos_ids, prompt_len, self.max_new_tokens, self.eos.device)
        return processors

    def __call__(self, logits: Tensor, context: Tensor, prompt_len: int, tree: tuple[Tensor, Tensor, int] | None
                 ) -> Tensor:
        """Scores ``[N, V]`` (float32) of ``logits [N, V]``: node ``n`` continues ``context`` (the row's committed
        tokens, whose first ``prompt_len`` are its prompt) along its path in ``tree`` (``tokens``, ``parents``, depth
        bound; None: one continuation of ``context`` itself)."""
        scores = logits.float()
        paths, depths = tree_paths(*tree) if tree is not None else (None, None)
        hf = self.row_processors(prompt_len) if self.settings else RowProcessors([], [], [])
        ids = node_ids(context, paths, depths) if hf and tree is not None else None
        depth_bound = tree[2] if tree is not None else 0
        scores = apply_per_depth(hf.before_penalty, scores, context, ids, depths, depth_bound)
        if self.repetition_penalty != 1.0:
            scores = penalize_repeats(scores, context, paths, self.repetition_penalty)
        scores = apply_per_depth(hf.before_min_lengths, scores, context, ids, depths, depth_bound)
        if self.eos.numel() and (self.min_length or self.min_new_tokens):
            # the length generate sees before node n's next token: the context, then n's path below the root
            length = context.shape[0] + (depths if depths is not None else torch.zeros(1, dtype=torch.int64,
                                                                                      device=scores.device))
            short = (length < self.min_length) | (length - prompt_len < self.min_new_tokens)
            scores[:, self.eos] = torch.where(short[:, None], float("-inf"), scores[:, self.eos])
        return apply_per_depth(hf.after_min_lengths, scores, context, ids, depths, depth_bound)


def sampling_warpers(settings: Any, device: torch.device | str = "cpu") -> list:
    """The logits warpers ``generate`` samples with for ``settings`` (a ``GenerationSettings``): HF's classes, in
    ``generate``'s order and under its conditions (temperature unless 1, top-h when set, top-k unless 0, top-p below
    1, min-p when set, typical-p below 1, epsilon and eta cutoffs strictly between 0 and 1). Their constructors check
    the values (ValueError), so the call is checked before any work. Applied in float32 to every node's scores."""
    warpers: list = []
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_h is not None:
        warpers.append(TopHLogitsWarper(top_h=settings.top_h))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p))
    if settings.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=settings.min_p))
    if settings.typical_p is not None and settings.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=settings.typical_p))
    if settings.epsilon_cutoff is not None and 0.0 < settings.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=settings.epsilon_cutoff))
    if settings.eta_cutoff is not None and 0.0 < settings.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=settings.eta_cutoff, device=device))
    return warpers
