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


class PositionNoise:
    """One row's Gumbel noise per sequence index, drawn in index order from the row's own generator: the stream of
    draws is the same whatever trees ask for it (each index's ``[V]`` vector is one draw of its own)."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator = generator
        self.device = device
        self.start = 0  # the sequence index of rows[0]
        self.rows: list[Tensor] = []
        self._buffer = torch.empty(0, device=device)

    def buffer(self, nodes: int, vocab: int) -> Tensor:
        """A float32 ``[nodes, vocab]`` work buffer, reused from step to step (grown when a tree is larger)."""
        if self._buffer.numel() < nodes * vocab:
            self._buffer = torch.empty(nodes * vocab, device=self.device)
        return self._buffer[: nodes * vocab].view(nodes, vocab)

    def window(self, index: int, count: int, vocab: int) -> Tensor:
        """The noise of indices ``index .. index + count - 1`` ``[count, vocab]`` (indices below ``index`` are
        dropped: they are committed and never asked again)."""
        if not self.rows:
            self.start = index
        drop = min(index - self.start, len(self.rows))
        del self.rows[:drop]
        self.start += drop
        if not self.rows:
            self.start = index
        while len(self.rows) < count:
            uniform = torch.rand(vocab, generator=self.generator, device=self.generator.device)
            # Gumbel(0, 1) = -log(Exp(1)); the uniform is kept off 0 and 1 so both logs stay finite
            uniform = uniform.clamp_(torch.finfo(uniform.dtype).tiny, 1.0 - torch.finfo(uniform.dtype).eps)
            self.rows.append((-torch.log(-torch.log(uniform))).to(self.device))
        return torch.stack(self.rows[:count])


def row_generators(count: int, generator: torch.Generator | None) -> list[torch.Generator]:
    """``count`` rows' own generators on ``generator``'s device (the default CPU generator's when None), seeded from
    it (one host read per call: the generator advances, so the next call samples afresh)."""
    device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (count,), generator=generator, device=device).tolist()
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def verify_coupled(tokens: Tensor, parents: Tensor, scores: Tensor, noise: Tensor, depths: Tensor, out: Tensor):
    """Verify one row's tree (``tokens``, ``parents`` ``[1, N]``) against the target's warped ``scores [N, V]`` (logits
    after temperature, top-k and top-p: ``log_softmax`` would shift each row by a constant, which no argmax sees):
    greedy verification of the scores plus each node's noise (``noise [D, V]`` from the root's index on, ``depths
    [N]`` each node's depth below the root; padding slots are clamped, never read), summed in ``out [N, V]`` (a buffer
    kept across steps: a fresh [N, V] tensor a step costs more than the rest on a CPU at V = 152064). Returns
    ``ops.verify_greedy``'s ``(accepted, accept_len, bonus)``; the bonus is -1 when a row on the accepted path is no
    distribution (NaN, or every score -inf), as the sampling ops give it, for the engine to raise as ``generate``'s
    multinomial does."""
    from .. import ops

    torch.index_select(noise, 0, depths.clamp(0, noise.shape[0] - 1), out=out)
    out.add_(scores)
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, out[None])
    on_path = no_distribution(out)[accepted.clamp_min(0)] & (accepted >= 0)
    return accepted, accept_len, torch.where(on_path.any(dim=-1), torch.full_like(bonus, -1), bonus)


def no_distribution(scores: Tensor) -> Tensor:
    """bool ``[...]``: which rows of ``scores [..., V]`` sample nothing (a NaN, or every score -inf), where
    ``generate``'s multinomial raises."""
    return ~(scores.amax(dim=-1) > float("-inf"))  # NaN compares false too


def coupled_token(scores: Tensor, noise: Tensor) -> Tensor:
    """The token sampled from the warped ``scores [V]`` with its index's ``noise [V]`` (the prefill's first token)."""
    return (scores + noise).argmax()
