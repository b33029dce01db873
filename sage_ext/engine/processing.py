"""The logits processors of transformers' ``generate`` that the engine applies to the target's scores, node by node.

A tree node's scores are those ``generate`` would compute after the node's context: the row's committed tokens
(prompt included) and the node's path from the root. ``TargetProcessing`` holds a generation's settings and applies,
in ``generate``'s order, the repetition penalty and the minimum lengths (EOS forbidden before them); the sampling
warpers (temperature, top-k, top-p) come after, HF's own classes (``SpeculativeGenerator._warpers``). Everything is
tensor work over all nodes at once (loops over tree depth, never over nodes), without a host read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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


@dataclass
class TargetProcessing:
    """A generation's processing of the target's scores (``generate``'s ``RepetitionPenaltyLogitsProcessor``,
    ``MinLengthLogitsProcessor``, ``MinNewTokensLengthLogitsProcessor``). ``eos`` ``[E]``: the EOS ids, on the
    scores' device."""

    repetition_penalty: float
    min_length: int
    min_new_tokens: int
    eos: Tensor

    @property
    def active(self) -> bool:
        return self.repetition_penalty != 1.0 or (self.eos.numel() > 0 and (self.min_length or self.min_new_tokens) > 0)

    def __call__(self, logits: Tensor, context: Tensor, prompt_len: int, tree: tuple[Tensor, Tensor, int] | None
                 ) -> Tensor:
        """Scores ``[N, V]`` (float32) of ``logits [N, V]``: node ``n`` continues ``context`` (the row's committed
        tokens, whose first ``prompt_len`` are its prompt) along its path in ``tree`` (``tokens``, ``parents``, depth
        bound; None: one continuation of ``context`` itself)."""
        scores = logits.float()
        paths, depths = tree_paths(*tree) if tree is not None else (None, None)
        if self.repetition_penalty != 1.0:
            scores = penalize_repeats(scores, context, paths, self.repetition_penalty)
        if self.eos.numel() and (self.min_length or self.min_new_tokens):
            # the length generate sees before node n's next token: the context, then n's path below the root
            length = context.shape[0] + (depths if depths is not None else torch.zeros(1, dtype=torch.int64,
                                                                                      device=scores.device))
            short = (length < self.min_length) | (length - prompt_len < self.min_new_tokens)
            scores[:, self.eos] = torch.where(short[:, None], float("-inf"), scores[:, self.eos])
        return scores
