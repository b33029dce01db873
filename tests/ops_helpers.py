"""Shared generators and checks for the op tests (tests/test_ops_*.py).

Random trees, rank-path sets, verification targets and the hypothesis strategies built on them.
Everything is seeded: a failing hypothesis example reproduces from its printed arguments.
"""
from __future__ import annotations

import math
import random

import torch
from hypothesis import strategies as st

LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------
# trees
# --------------------------------------------------------------------------------------------
def random_parents_row(num_nodes: int, rng: random.Random, pad_prob: float = 0.15, chain_bias: float = 0.5) -> list[int]:
    """One random topological tree of `num_nodes` slots: root first, padding slots (parent -1) mixed in.

    `chain_bias` is the chance a node hangs under the most recent real node (deep, chain-like
    trees); otherwise its parent is a uniformly random earlier real node (bushy trees).
    """
    row = [-1]
    real = [0]
    for _ in range(1, num_nodes):
        if rng.random() < pad_prob:
            row.append(-1)
            continue
        parent = real[-1] if rng.random() < chain_bias else rng.choice(real)
        row.append(parent)
        real.append(len(row) - 1)
    return row


def random_parents(batch: int, num_nodes: int, seed: int, pad_prob: float = 0.15) -> torch.Tensor:
    """`[batch, num_nodes]` int64 random trees (each row its own shape and padding pattern)."""
    rng = random.Random(seed)
    rows = [random_parents_row(num_nodes, rng, pad_prob=pad_prob * rng.random() * 2, chain_bias=rng.random())
            for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.int64)


def children_lists(parents_row: list[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents_row]
    for i in range(1, len(parents_row)):
        if parents_row[i] >= 0:
            children[parents_row[i]].append(i)
    return children


def random_tokens_for(parents: torch.Tensor, vocab: int, seed: int, small_alphabet: bool = False) -> torch.Tensor:
    """Random tokens for a tree; with `small_alphabet` siblings often share a token (duplicates)."""
    gen = torch.Generator().manual_seed(seed)
    high = min(vocab, 4) if small_alphabet else vocab
    return torch.randint(0, high, parents.shape, generator=gen, dtype=torch.int64)


def matching_argmax(tokens: torch.Tensor, parents: torch.Tensor, vocab: int, seed: int, hit_prob: float = 0.75) -> torch.Tensor:
    """A target argmax `[B, N]` that follows a random child at each node with prob `hit_prob`,
    so greedy verification walks several levels deep."""
    rng = random.Random(seed)
    argmax = torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        children = children_lists(parents[b].tolist())
        for u in range(tokens.shape[1]):
            if children[u] and rng.random() < hit_prob:
                argmax[b, u] = tokens[b, rng.choice(children[u])]
            else:
                argmax[b, u] = rng.randrange(vocab)
    return argmax


def sampling_inputs(batch, num_nodes, vocab, dtype, with_draft, seed, sharpness=2.0):
    """verify_sampling / verify_traversal inputs: a random tree whose children are likely under the
    target, so walks go deep; each child's token is drawn from its parent's draft distribution."""
    parents = random_parents(batch, num_nodes, seed)
    gen = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(batch, num_nodes, vocab, generator=gen) * sharpness
    draft_logits = target_logits + torch.randn(batch, num_nodes, vocab, generator=gen)
    target = torch.softmax(target_logits, -1)
    draft = torch.softmax(draft_logits, -1)
    tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for b in range(batch):
        for i in range(1, num_nodes):
            if parents[b, i] >= 0:
                tokens[b, i] = torch.multinomial(draft[b, parents[b, i]], 1, generator=gen)
    return tokens, parents, target.to(dtype), (draft.to(dtype) if with_draft else None)


def logits_with_argmax(argmax: torch.Tensor, vocab: int, dtype: torch.dtype, seed: int, ties: bool = False) -> torch.Tensor:
    """Logits `[B, N, V]` whose argmax is `argmax`; with `ties`, a lower id sometimes ties with it
    (the lower id must then win, so the expected argmax is recomputed by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*argmax.shape, vocab, generator=gen)
    logits.scatter_(-1, argmax[..., None], 6.0)
    if ties:
        tie_ids = torch.randint(0, vocab, argmax.shape, generator=gen)
        logits.scatter_(-1, tie_ids[..., None], 6.0)
    return logits.to(dtype)


def random_rank_paths(rng: random.Random, num_paths: int, max_rank: int = 6, max_depth: int = 6) -> list[list[int]]:
    """A random ancestor-closed set of distinct rank paths, in random order."""
    paths: list[tuple[int, ...]] = []
    known: set[tuple[int, ...]] = set()
    attempts = 0
    while len(paths) < num_paths and attempts < 50 * num_paths:
        attempts += 1
        base = rng.choice([()] + paths)
        if len(base) >= max_depth:
            continue
        path = base + (rng.randrange(max_rank),)
        if path not in known:
            known.add(path)
            paths.append(path)
    rng.shuffle(paths)
    return [list(p) for p in paths]


def is_ancestor_closed(parents_row: list[int], real: list[bool]) -> bool:
    """Every real non-root node hangs under a real node with a smaller index."""
    return all(parents_row[i] < i and real[parents_row[i]] for i in range(1, len(parents_row)) if real[i])


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def assert_same_outputs(actual, expected, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Tuples of tensors equal: integers/bools exactly, floats to tolerance (inf/-inf matching)."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"output {index}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"output {index}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        a, e = a.cpu(), e.cpu()
        if a.is_floating_point():
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"output {index}: {m}")
        else:
            assert torch.equal(a, e), f"output {index} differs:\n{a}\nvs\n{e}"


# --------------------------------------------------------------------------------------------
# hypothesis strategies
# --------------------------------------------------------------------------------------------
seeds = st.integers(min_value=0, max_value=2**31 - 1)
batches = st.integers(min_value=1, max_value=8)
# Large vocabularies are costly for the reference; sample them less often.
vocabs = st.one_of(st.integers(min_value=1, max_value=300), st.sampled_from([1000, 32000, 152064, 160000]))


# --------------------------------------------------------------------------------------------
# topk_confidence with several +inf logits (fp16 overflow)
# --------------------------------------------------------------------------------------------
def two_infinity_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """`[rows, vocab]` logits of `dtype` with +inf at token ids 0 and `vocab - 1 - r` in row r (far apart: in
    different splits of a split top-k) and finite values below 10 elsewhere: fp16 logits where two overflowed.
    Needs `vocab > rows`."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    logits[:, 0] = math.inf
    logits[torch.arange(rows), vocab - 1 - torch.arange(rows)] = math.inf
    return logits.to(dtype)


def assert_two_infinity_golden(alpha: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, vocab: int) -> None:
    """The exact topk_confidence of `two_infinity_logits` (any k): +inf counts as FLT_MAX, so the two share the
    whole mass: log-probs -log 2, -log 2, then (z - FLT_MAX) - log 2 (finite, below -1e38); alpha 1 for k = 1,
    else 1 - log 2 / log k (0 for k = 2)."""
    alpha, logprobs, ids = alpha.cpu(), logprobs.cpu(), ids.cpu()
    rows, k = logprobs.shape
    expected_ids = torch.stack([torch.zeros(rows, dtype=torch.int64), vocab - 1 - torch.arange(rows)], 1)
    top = min(k, 2)
    assert torch.equal(ids[:, :top], expected_ids[:, :top])
    torch.testing.assert_close(logprobs[:, :top], torch.full((rows, top), -math.log(2)), atol=1e-6, rtol=0)
    if k > 2:
        assert torch.isfinite(logprobs[:, 2:]).all() and (logprobs[:, 2:] < -1e38).all()
    expected_alpha = 1.0 if k == 1 else 1 - math.log(2) / math.log(k)
    torch.testing.assert_close(alpha, torch.full((rows,), expected_alpha), atol=1e-6, rtol=0)
