"""verify_greedy and verify_sampling: golden walks, the reference on random trees, seeded
reproducibility, and a chi-square test that tree rejection sampling is lossless (with negative
controls: deliberately wrong samplers the same test must reject)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import (
    LOGIT_DTYPES,
    assert_same_outputs,
    batches,
    logits_with_argmax,
    matching_argmax,
    random_parents,
    random_tokens_for,
    sampling_inputs,
    seeds,
    vocabs,
)
from scipy.stats import chisquare

from sage_ext import ops, reference

SPECVLM_PARENTS = torch.tensor([-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21])


# --------------------------------------------------------------------------------------------
# verify_greedy
# --------------------------------------------------------------------------------------------
def test_greedy_golden():
    tokens = torch.tensor([[5, 7, 8, 9]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, torch.tensor([[8, 1, 9, 4]]))
    assert accepted.tolist() == [[0, 2, 3, -1]] and accept_len.tolist() == [2] and bonus.tolist() == [4]
    # nothing matches at the root: tau = 0, the bonus is the root's argmax
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, torch.tensor([[6, 1, 9, 4]]))
    assert accepted.tolist() == [[0, -1, -1, -1]] and accept_len.tolist() == [0] and bonus.tolist() == [6]


def test_greedy_specvlm_tree_walks_to_depth_five():
    tokens = torch.arange(100, 126)[None]
    argmax = torch.randint(0, 50, (1, 26), generator=torch.Generator().manual_seed(0))
    for node, child in [(0, 1), (1, 5), (5, 13), (13, 21), (21, 25)]:
        argmax[0, node] = tokens[0, child]
    argmax[0, 25] = 777
    accepted, accept_len, bonus = ops.verify_greedy(tokens, SPECVLM_PARENTS[None], argmax)
    assert accepted[0, :7].tolist() == [0, 1, 5, 13, 21, 25, -1]
    assert accept_len.tolist() == [5] and bonus.tolist() == [777]


def test_greedy_first_matching_child_wins_and_padding_is_never_accepted():
    # children 2 and 3 of the root share token 4: the lower index (2) is followed even though 3 has
    # a matching subtree; node 1 is padding with the matching token
    tokens = torch.tensor([[9, 4, 4, 4, 6]])
    parents = torch.tensor([[-1, -1, 0, 0, 3]])
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, torch.tensor([[4, 0, 1, 6, 2]]))
    assert accepted.tolist() == [[0, 2, -1, -1, -1]] and accept_len.tolist() == [1] and bonus.tolist() == [1]


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_greedy_logits_ties_go_to_lowest_id(dtype):
    tokens = torch.tensor([[0, 3, 2]])
    parents = torch.tensor([[-1, 0, 0]])
    logits = torch.zeros(1, 3, 5, dtype=dtype)
    logits[0, 0, [2, 3]] = 1.0  # tie between ids 2 and 3 -> 2 -> node 2
    logits[0, 2, [1, 4]] = 2.0
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, logits)
    assert accepted.tolist() == [[0, 2, -1]] and bonus.tolist() == [1]


@given(batch=batches, num_nodes=st.integers(1, 128), vocab=st.integers(2, 1000), as_logits=st.booleans(),
       dtype=st.sampled_from(LOGIT_DTYPES), small_alphabet=st.booleans(), ties=st.booleans(), seed=seeds)
def test_greedy_matches_reference(batch, num_nodes, vocab, as_logits, dtype, small_alphabet, ties, seed):
    parents = random_parents(batch, num_nodes, seed)
    tokens = random_tokens_for(parents, vocab, seed, small_alphabet)
    argmax = matching_argmax(tokens, parents, vocab, seed)
    target = logits_with_argmax(argmax, vocab, dtype, seed, ties) if as_logits else argmax
    got = ops.verify_greedy(tokens, parents, target)
    assert_same_outputs(got, reference.verify_greedy(tokens, parents, target))
    assert torch.all(got[1] == (got[0] >= 0).sum(-1) - 1)


def test_greedy_large_vocab_logits():
    parents = random_parents(4, 64, seed=5)
    tokens = random_tokens_for(parents, 152064, seed=5)
    argmax = matching_argmax(tokens, parents, 152064, seed=5, hit_prob=0.9)
    target = logits_with_argmax(argmax, 152064, torch.bfloat16, seed=5)
    assert_same_outputs(ops.verify_greedy(tokens, parents, target), reference.verify_greedy(tokens, parents, target))


# --------------------------------------------------------------------------------------------
# verify_sampling: exact agreement with the reference
# --------------------------------------------------------------------------------------------
def test_sampling_golden_deterministic_probabilities():
    tokens = torch.tensor([[0, 1, 2]])
    parents = torch.tensor([[-1, 0, 0]])
    probs = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    # q = 1: token 1 has p = 0 (rejected, removed), token 2 has the whole residual (accepted);
    # node 2 has no children: the bonus comes from target_probs[2]
    for seed in range(5):
        accepted, accept_len, bonus = ops.verify_sampling(tokens, parents, probs,
                                                          generator=torch.Generator().manual_seed(seed))
        assert accepted.tolist() == [[0, 2, -1]] and accept_len.tolist() == [1] and bonus.tolist() == [0]
    # with q: a child whose draft probability is 0 is always accepted
    draft = torch.tensor([[[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    accepted, accept_len, bonus = ops.verify_sampling(tokens, parents, torch.full((1, 3, 3), 1 / 3), draft)
    assert accepted.tolist() == [[0, 1, -1]] and accept_len.tolist() == [1]


def test_sampling_rejects_everything_then_samples_the_residual():
    # q = 1, the root's children cover tokens 0 and 1 with p = 0: both rejected; residual = token 2 only
    tokens = torch.tensor([[5, 0, 1]])
    parents = torch.tensor([[-1, 0, 0]])
    probs = torch.tensor([[[0.0, 0.0, 2.0, 0.0], [0.25] * 4, [0.25] * 4]])  # unnormalized is fine
    accepted, accept_len, bonus = ops.verify_sampling(tokens, parents, probs, generator=torch.Generator().manual_seed(1))
    assert accept_len.tolist() == [0] and bonus.tolist() == [2]


#: A root whose two children hold the only tokens of positive probability (top-k 2): after the first is rejected
#: the running float32 mass rounds above the second's probability (ratio 0.99994, not 1), so the largest uniform
#: torch.rand gives (1 - 2^-24) rejects it too, and only rounding is left on the zeroed tokens. (Found by an
#: adversarial run: the bonus was then token 0, of target probability 0.)
ROUNDING_ROW = (0.81585354, 0.00050428516)


def _verify_with(implementation: str, verify: str, tokens, parents, probs, uniforms):
    """The op given ``uniforms``, or the oracle drawing exactly these (its torch.rand call is the op wrapper's)."""
    if implementation == "op":
        return getattr(torch.ops.sage_ext, verify)(tokens, parents, probs, None, uniforms)
    original, torch.rand = torch.rand, lambda *args, **kwargs: uniforms.clone()
    try:
        return getattr(reference, verify)(tokens, parents, probs)
    finally:
        torch.rand = original


@pytest.mark.parametrize("verify", ["verify_sampling", "verify_traversal"])
@pytest.mark.parametrize("implementation", ["op", "reference"])
def test_a_residual_left_with_rounding_only_draws_a_token_the_target_can_give(verify, implementation):
    probs = torch.zeros(1, 3, 8)
    probs[0, 0, 3], probs[0, 0, 5] = ROUNDING_ROW
    probs[0, 1:, 1] = 1.0
    tokens, parents = torch.tensor([[7, 3, 5]]), torch.tensor([[-1, 0, 0]])
    uniforms = torch.tensor([[0.5, 0.9999, 1 - 2 ** -24]])
    _, accept_len, bonus = _verify_with(implementation, verify, tokens, parents, probs, uniforms)
    assert accept_len.tolist() == [0]
    assert float(probs[0, 0, int(bonus[0])]) > 0, f"bonus {int(bonus[0])} has target probability 0"
    # random two-token rows, both children met by the largest uniform: the bonus always has positive probability
    gen = torch.Generator().manual_seed(0)
    worst = torch.tensor([[0.5, 1 - 2 ** -24, 1 - 2 ** -24]])
    for _ in range(300):
        a = float(torch.rand((), generator=gen))
        probs[0, 0].zero_()
        probs[0, 0, 3], probs[0, 0, 5] = a, float(torch.rand((), generator=gen)) * (1 - a)
        accepted, accept_len, bonus = _verify_with(implementation, verify, tokens, parents, probs, worst)
        row = int(accepted[0, int(accept_len[0])])  # the bonus follows the last accepted node
        assert float(probs[0, row, int(bonus[0])]) > 0


@given(batch=batches, num_nodes=st.integers(1, 64), vocab=vocabs, dtype=st.sampled_from(LOGIT_DTYPES),
       with_draft=st.booleans(), sharpness=st.sampled_from([0.5, 2.0, 6.0]), seed=seeds)
def test_sampling_matches_reference(batch, num_nodes, vocab, dtype, with_draft, sharpness, seed):
    num_nodes = max(1, min(num_nodes, 4_000_000 // (batch * vocab)))  # bound the [B, N, V] memory
    tokens, parents, target, draft = sampling_inputs(batch, num_nodes, vocab, dtype, with_draft, seed, sharpness)
    got = ops.verify_sampling(tokens, parents, target, draft, generator=torch.Generator().manual_seed(seed))
    want = reference.verify_sampling(tokens, parents, target, draft, generator=torch.Generator().manual_seed(seed))
    assert_same_outputs(got, want)


def test_sampling_draws_from_a_generator_of_another_device():
    # tensors on the meta device (no data; what runs for CUDA tensors is the same wrapper code) with a CPU
    # generator: the uniforms come from the CPU generator (it advances by B * N values, exactly as a call on
    # CPU tensors advances it) and reach the op on the tensors' device
    tokens, parents, target, _ = sampling_inputs(3, 7, 20, torch.float32, False, seed=2)
    generator = torch.Generator().manual_seed(42)
    meta = ops.verify_sampling(tokens.to("meta"), parents.to("meta"), target.to("meta"), generator=generator)
    assert [t.device.type for t in meta] == ["meta"] * 3
    assert [tuple(t.shape) for t in meta] == [(3, 7), (3,), (3,)]
    same_draws = torch.Generator().manual_seed(42)
    torch.rand(3, 7, generator=same_draws)
    assert torch.equal(generator.get_state(), same_draws.get_state())
    # the next draw continues the same stream on CPU tensors
    assert_same_outputs(ops.verify_sampling(tokens, parents, target, generator=generator),
                        ops.verify_sampling(tokens, parents, target, generator=same_draws))


def test_sampling_seeded_runs_repeat_exactly():
    tokens, parents, target, draft = sampling_inputs(8, 48, 300, torch.float32, True, seed=11)
    runs = [ops.verify_sampling(tokens, parents, target, draft, generator=torch.Generator().manual_seed(123))
            for _ in range(3)]
    for run in runs[1:]:
        assert_same_outputs(run, runs[0])
    # the global generator is used when none is given, so torch.manual_seed makes runs repeat too
    torch.manual_seed(5)
    first = ops.verify_sampling(tokens, parents, target)
    torch.manual_seed(5)
    assert_same_outputs(ops.verify_sampling(tokens, parents, target), first)
    # and a different seed draws different uniforms: over 8 rows some outcome changes
    others = [ops.verify_sampling(tokens, parents, target, draft, generator=torch.Generator().manual_seed(s))
              for s in range(124, 130)]
    assert any(not torch.equal(o[0], runs[0][0]) or not torch.equal(o[2], runs[0][2]) for o in others)


# --------------------------------------------------------------------------------------------
# verify_sampling is lossless: the first emitted token follows the target distribution
# --------------------------------------------------------------------------------------------
VOCAB = 8
TRIALS_PER_CALL = 8192
CALLS = 5  # 40960 trials per test
TARGET_ROOT = torch.tensor([0.22, 0.03, 0.17, 0.05, 0.25, 0.04, 0.14, 0.10])
DRAFT_ROOT = torch.tensor([0.10, 0.05, 0.30, 0.05, 0.20, 0.10, 0.15, 0.05])
# root with three children (tried in this order) and a grandchild under the first one
LOSSLESS_PARENTS = torch.tensor([-1, 0, 0, 0, 1])


def first_emitted_token(tokens, accepted, accept_len, bonus):
    """The token emitted right after the root: the first accepted child's token, else the bonus."""
    first_child = accepted[:, 1].clamp(min=0)
    return torch.where(accept_len > 0, tokens.gather(1, first_child[:, None]).squeeze(1), bonus)


def lossless_trial_inputs(sampled_children, gen):
    """B copies of a small tree: root distributions TARGET_ROOT / DRAFT_ROOT, other rows random.
    Deterministic draft: the root's children are the draft's top-3 tokens (same in every row).
    Sampled draft: each row's children are drawn i.i.d. from DRAFT_ROOT."""
    batch, num_nodes = TRIALS_PER_CALL, LOSSLESS_PARENTS.numel()
    parents = LOSSLESS_PARENTS.expand(batch, -1).contiguous()
    target = torch.softmax(torch.randn(num_nodes, VOCAB, generator=torch.Generator().manual_seed(0)), -1)
    target[0] = TARGET_ROOT
    draft = torch.softmax(torch.randn(num_nodes, VOCAB, generator=torch.Generator().manual_seed(1)), -1)
    draft[0] = DRAFT_ROOT
    target, draft = target.expand(batch, -1, -1).contiguous(), draft.expand(batch, -1, -1).contiguous()
    if sampled_children:
        tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
        tokens[:, 1:4] = torch.multinomial(DRAFT_ROOT.expand(batch, -1), 3, replacement=True, generator=gen)
        tokens[:, 4] = torch.multinomial(draft[0, 1], batch, replacement=True, generator=gen)
    else:
        top3 = DRAFT_ROOT.topk(3).indices
        tokens = torch.tensor([0, *top3.tolist(), 1]).expand(batch, -1).contiguous()
    return tokens, parents, target, draft


def first_token_counts(first_token_fn, sampled_children):
    """Counts of the first emitted token over CALLS * TRIALS_PER_CALL seeded trials."""
    gen = torch.Generator().manual_seed(2024)
    counts = torch.zeros(VOCAB, dtype=torch.int64)
    for _ in range(CALLS):
        tokens, parents, target, draft = lossless_trial_inputs(sampled_children, gen)
        first = first_token_fn(tokens, parents, target, draft if sampled_children else None, gen)
        counts += torch.bincount(first, minlength=VOCAB)
    return counts


def chi_square_pvalue(counts):
    expected = TARGET_ROOT.double() / TARGET_ROOT.sum() * counts.sum()
    return chisquare(counts.double().numpy(), expected.numpy()).pvalue


def op_first_token(tokens, parents, target, draft, gen):
    accepted, accept_len, bonus = ops.verify_sampling(tokens, parents, target, draft, generator=gen)
    return first_emitted_token(tokens, accepted, accept_len, bonus)


def vectorized_first_token(bug):
    """The root step of tree rejection sampling written directly (vectorized over the batch), with
    an optional deliberate bug for the negative controls:
    "bonus_from_target": the bonus is drawn from the unmodified target instead of the residual;
    "inverted_ratio": a sampled child is accepted with min(1, q(x)/p(x)) instead of min(1, p(x)/q(x));
    "none": no bug (shows the harness itself accepts a correct sampler)."""

    def first_token(tokens, parents, target, draft, gen):
        batch = tokens.shape[0]
        uniforms = torch.rand(batch, tokens.shape[1], generator=gen)
        residual = target[:, 0].clone()
        chosen = torch.full((batch,), -1, dtype=torch.int64)
        for c in (1, 2, 3):  # the root's children, in index order
            x = tokens[:, c]
            undecided = chosen < 0
            p_x = residual.gather(1, x[:, None]).squeeze(1) / residual.sum(-1)
            if draft is None:
                accept = uniforms[:, c] < p_x
                update = residual.scatter(1, x[:, None], 0.0)
            else:
                q_x = draft[:, 0].gather(1, x[:, None]).squeeze(1)
                ratio = q_x / p_x if bug == "inverted_ratio" else p_x / q_x
                accept = uniforms[:, c] < ratio.clamp(max=1)
                update = torch.relu(residual / residual.sum(-1, keepdim=True) - draft[:, 0])
            chosen = torch.where(undecided & accept, x, chosen)
            residual = torch.where((undecided & ~accept)[:, None], update, residual)
        bonus_source = target[:, 0] if bug == "bonus_from_target" else residual
        bonus = torch.multinomial(bonus_source, 1, generator=gen).squeeze(1)
        return torch.where(chosen >= 0, chosen, bonus)

    return first_token


@pytest.mark.parametrize("sampled_children", [False, True], ids=["topk_draft_q1", "sampled_draft_q"])
def test_sampling_is_lossless(sampled_children):
    counts = first_token_counts(op_first_token, sampled_children)
    assert counts.sum() == CALLS * TRIALS_PER_CALL
    assert chi_square_pvalue(counts) > 1e-3


@pytest.mark.parametrize(
    "bug, sampled_children",
    [("bonus_from_target", False), ("bonus_from_target", True), ("inverted_ratio", True)],
)
def test_chi_square_rejects_a_wrong_sampler(bug, sampled_children):
    counts = first_token_counts(vectorized_first_token(bug), sampled_children)
    assert chi_square_pvalue(counts) < 1e-6


def test_correct_vectorized_sampler_passes_the_same_test():
    """The negative-control harness itself is sound: without the bug it passes."""
    for sampled_children in (False, True):
        counts = first_token_counts(vectorized_first_token("none"), sampled_children)
        assert chi_square_pvalue(counts) > 1e-3
