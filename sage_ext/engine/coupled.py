"""Gumbel-coupled sampling: each sequence position's sampled token is fixed before any tree is verified.

The token at sequence index ``s`` of a row is ``argmax(log p_s + g_s)``, where ``p_s`` is the target's (processed,
warped) distribution after the accepted prefix and ``g_s`` a vector of independent Gumbel(0, 1) noise drawn for that
index alone: an exact sample from ``p_s`` (the Gumbel-max trick), so the output is distributed as the target's own
sampling. Verification is then greedy verification on the perturbed scores of every tree node (a node at depth d
below the root predicts index ``cur_len + d`` and gets ``g_(cur_len + d)``): a draft token is accepted exactly when
it is the token the target samples there. For the deterministic top-k trees the engine builds, it accepts the
longest tree path that the target's sample follows, as the SpecInfer rule does (the same number of tokens in
distribution), and because the noise belongs to the index, not to the tree, the sampled output of a seeded call
does not depend on the trees at all: every policy, and a cost-aware policy whatever it has learned, gives the same
tokens for the same seed (each row draws from its own generator, seeded from the caller's at the start).
"""
from __future__ import annotations

import torch
from torch import Tensor


def gumbel_noise(uniform: Tensor) -> Tensor:
    """Gumbel(0, 1) noise from a uniform draw kept off 0 and 1: ``-log(Exp(1))`` with ``Exp(1) = -log(u)``."""
    return -torch.log(-torch.log(uniform))


class PositionNoise:
    """One row's Gumbel noise per sequence index, drawn in index order from the row's own generator: the stream of
    draws is the same whatever trees ask for it (each index's ``[V]`` vector is one draw of its own).

    The noise lives in a ring, ``table [capacity, V]`` with index ``s`` in row ``s % capacity``: a step draws only the
    indices it has not drawn yet and reads its nodes' rows straight from the ring (no ``[depth, V]`` copy a step;
    indices below the one asked for are committed and their rows are drawn over)."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator = generator
        self.device = device
        self.table = torch.empty(0, 0, device=device)
        self.start = 0  # the lowest index still held
        self.end = 0  # one past the highest index drawn
        self._buffer = torch.empty(0, device=device)

    def buffer(self, nodes: int, vocab: int) -> Tensor:
        """A float32 ``[nodes, vocab]`` work buffer, reused from step to step (grown when a tree is larger)."""
        if self._buffer.numel() < nodes * vocab:
            self._buffer = torch.empty(nodes * vocab, device=self.device)
        return self._buffer[: nodes * vocab].view(nodes, vocab)

    def _hold(self, index: int, count: int, vocab: int) -> None:
        """Make the ring hold indices ``index .. index + count - 1`` (drawing the new ones in order) and let go of
        those below ``index``."""
        if self.end <= index or self.table.shape[-1] != vocab:  # nothing held is wanted any more (or a first call)
            self.start = self.end = index
        self.start = max(self.start, index)
        capacity = self.table.shape[0]
        if index + count - self.start > capacity:  # grow: the held rows move to their rows in the larger ring
            capacity = max(16, 1 << (index + count - self.start - 1).bit_length())
            table = torch.empty(capacity, vocab, device=self.device)
            held = torch.arange(self.start, self.end, device=self.device)
            if held.numel():
                table[held % capacity] = self.table[held % self.table.shape[0]]
            self.table = table
        while self.end < index + count:
            uniform = torch.rand(vocab, generator=self.generator, device=self.generator.device)
            # kept off 0 and 1 so both logs of the transform stay finite
            uniform = uniform.clamp_(torch.finfo(uniform.dtype).tiny, 1.0 - torch.finfo(uniform.dtype).eps)
            self.table[self.end % capacity] = gumbel_noise(uniform).to(self.device)
            self.end += 1

    def at(self, index: int, vocab: int) -> Tensor:
        """The noise ``[vocab]`` of sequence index ``index``."""
        self._hold(index, 1, vocab)
        return self.table[index % self.table.shape[0]]

    def for_nodes(self, index: int, depths: Tensor, count: int, vocab: int) -> Tensor:
        """Each tree node's noise, ``[N, vocab]`` in the reused ``buffer``: the node at depth ``depths[n]`` below a
        root at sequence index ``index - 1`` predicts index ``index + depths[n]`` (``count``: the tree's depth bound
        plus one; padding slots' depths are clamped into it, never read)."""
        self._hold(index, count, vocab)
        rows = (depths.clamp(0, count - 1) + index) % self.table.shape[0]
        return torch.index_select(self.table, 0, rows, out=self.buffer(depths.shape[0], vocab))


def row_generators(count: int, generator: torch.Generator | None) -> list[torch.Generator]:
    """``count`` rows' own generators on ``generator``'s device (the default CPU generator's when None), seeded from
    it (one host read per call: the generator advances, so the next call samples afresh)."""
    device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (count,), generator=generator, device=device).tolist()
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def verify_coupled(tokens: Tensor, parents: Tensor, scores: Tensor, noise: Tensor):
    """Verify one row's tree (``tokens``, ``parents`` ``[1, N]``) against the target's warped ``scores [N, V]`` (logits
    after temperature, top-k and top-p: ``log_softmax`` would shift each row by a constant, which no argmax sees):
    greedy verification of the scores plus each node's noise (``noise [N, V]``, ``PositionNoise.for_nodes``: a
    buffer kept across steps, to which the scores are added in place -- a fresh [N, V] tensor a step costs more than
    the rest on a CPU at V = 152064). Returns ``ops.verify_greedy``'s ``(accepted, accept_len, bonus)``; the bonus is
    -1 when a row on the accepted path is no distribution (NaN, or every score -inf), as the sampling ops give it,
    for the engine to raise as ``generate``'s multinomial does."""
    from .. import ops

    noise.add_(scores)
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, noise[None])
    on_path = no_distribution(noise)[accepted.clamp_min(0)] & (accepted >= 0)
    return accepted, accept_len, torch.where(on_path.any(dim=-1), torch.full_like(bonus, -1), bonus)


def no_distribution(scores: Tensor) -> Tensor:
    """bool ``[...]``: which rows of ``scores [..., V]`` sample nothing (a NaN, or every score -inf), where
    ``generate``'s multinomial raises."""
    return ~(scores.amax(dim=-1) > float("-inf"))  # NaN compares false too


def coupled_token(scores: Tensor, noise: Tensor) -> Tensor:
    """The token sampled from the warped ``scores [V]`` with its index's ``noise [V]`` (the prefill's first token)."""
    return (scores + noise).argmax()
