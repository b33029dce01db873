"""topk_confidence: the native op against the reference, golden values and special inputs."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import (
    LOGIT_DTYPES,
    assert_same_outputs,
    assert_two_infinity_golden,
    seeds,
    two_infinity_logits,
    vocabs,
)

from sage_ext import ops, reference


def run_both(logits, k, temperature=1.0):
    got = ops.topk_confidence(logits, k, temperature)
    want = reference.topk_confidence(logits, k, temperature)
    assert_same_outputs(got, want, atol=2e-5, rtol=1e-5)
    return got


@given(
    rows=st.integers(1, 8),
    vocab=vocabs,
    k_frac=st.floats(0, 1),
    dtype=st.sampled_from(LOGIT_DTYPES),
    temperature=st.sampled_from([1.0, 0.7, 0.3, 2.5]),
    scale=st.sampled_from([0.1, 1.0, 5.0, 40.0]),
    specials=st.booleans(),
    seed=seeds,
)
def test_matches_reference(rows, vocab, k_frac, dtype, temperature, scale, specials, seed):
    gen = torch.Generator().manual_seed(seed)
    k = 1 + int(k_frac * (min(vocab, ops.MAX_TOPK) - 1))
    logits = torch.randn(rows, vocab, generator=gen) * scale
    if specials:  # sprinkle NaN / +-inf, and make one row entirely -inf
        where = torch.randint(0, vocab, (rows, 3), generator=gen)
        logits.scatter_(1, where[:, :1], math.nan)
        logits.scatter_(1, where[:, 1:2], -math.inf)
        logits[rows // 2] = -math.inf
        if vocab > 3:
            logits[0, 3] = math.inf
    run_both(logits.to(dtype), k, temperature)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_ties_prefer_lower_token_id(dtype):
    # Integer-valued logits in a small range: many exact ties, in every dtype.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 3, (6, 500), generator=gen).to(dtype)
    alpha, lp, ids = run_both(logits, 20)
    for row in range(6):
        values = logits[row, ids[row]].float()
        assert torch.all(values[:-1] >= values[1:])
        same = values[:-1] == values[1:]
        assert torch.all(ids[row, :-1][same] < ids[row, 1:][same])


def test_golden_two_tokens():
    # Top-2 probabilities 0.75 / 0.25 (the other tokens are -inf): H = 0.5623..., alpha = 1 - H / log 2.
    logits = torch.tensor([[math.log(0.25), -math.inf, math.log(0.75), -math.inf]])
    alpha, lp, ids = ops.topk_confidence(logits, 2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ids.tolist() == [[2, 0]]
    assert lp[0].tolist() == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-6)
    assert alpha.item() == pytest.approx(1 - entropy / math.log(2), abs=1e-6)


def test_uniform_top_k_has_zero_confidence_and_one_hot_full():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, -5.0], [50.0, 0.0, 0.0, 0.0, 0.0]])
    alpha, lp, ids = ops.topk_confidence(logits, 4)
    assert alpha[0].item() == pytest.approx(0.0, abs=1e-6)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert alpha[1].item() == pytest.approx(1.0, abs=1e-6)
    # log-probs are over the full vocabulary, not the renormalized top-k
    assert lp[0, 0].item() == pytest.approx(math.log(math.e / (4 * math.e + math.exp(-5.0))), abs=1e-6)


def test_k_equal_one_gives_confidence_one():
    alpha, lp, ids = ops.topk_confidence(torch.randn(5, 100, generator=torch.Generator().manual_seed(0)), 1)
    assert alpha.tolist() == [1.0] * 5


def test_dead_rows_and_infinities():
    logits = torch.tensor(
        [
            [-math.inf, -math.inf, -math.inf, -math.inf],
            [math.nan, math.nan, -math.inf, math.nan],
            [math.inf, math.inf, 0.0, math.nan],
            [math.nan, 2.0, math.nan, -math.inf],
        ]
    )
    alpha, lp, ids = ops.topk_confidence(logits, 3)
    assert alpha[:2].tolist() == [0.0, 0.0]
    assert ids[:2].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert torch.all(lp[:2] == -math.inf)
    # +inf counts as the largest finite float: two equal maxima share the mass
    assert ids[2].tolist() == [0, 1, 2]
    assert lp[2, :2].tolist() == pytest.approx([math.log(0.5)] * 2, abs=1e-6)
    assert lp[2, 2].item() < -1e38  # 0 - FLT_MAX: finite, negligible
    assert alpha[2].item() == pytest.approx(1 - math.log(2) / math.log(3), abs=1e-6)
    # NaN counts as -inf: one finite token, then -inf ties by id
    assert ids[3].tolist() == [1, 0, 2]
    assert alpha[3].item() == pytest.approx(1.0)
    assert not torch.isnan(alpha).any()
    run_both(logits, 3)


def test_fp16_overflow_gives_two_infinities_their_exact_share():
    # two logits above fp16's largest value (65504) become +inf: log-probs (z - max) - log(sum) = -log 2 each,
    # not z - (max + log(sum)) = 0 (FLT_MAX + log 2 rounds to FLT_MAX)
    logits = torch.tensor([[7.0e4, 3.0, -1.0, 1.0e5, 2.0]]).to(torch.float16)
    assert torch.isinf(logits).sum().item() == 2
    alpha, lp, ids = run_both(logits, 3)
    assert ids[0].tolist() == [0, 3, 1]
    assert lp[0, :2].tolist() == [pytest.approx(-math.log(2), abs=1e-6)] * 2
    assert alpha.item() == pytest.approx(1 - math.log(2) / math.log(3), abs=1e-6)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("vocab, k", [(7, 1), (7, 2), (7, 5), (256000, 10), (256000, 64)])
def test_two_infinities_golden(dtype, vocab, k):
    logits = two_infinity_logits(3, vocab, dtype)
    assert_two_infinity_golden(*ops.topk_confidence(logits, k, 0.7), vocab)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_divides_logits(temperature):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    got = ops.topk_confidence(logits, 10, temperature)
    scaled = ops.topk_confidence(logits / temperature, 10, 1.0)
    assert_same_outputs(got, scaled, atol=1e-5, rtol=1e-5)


def test_large_vocab_half_precision():
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(8, 152064, generator=gen) * 3).to(torch.bfloat16)
    alpha, lp, ids = run_both(logits, 64)
    assert torch.all((alpha >= 0) & (alpha <= 1))
