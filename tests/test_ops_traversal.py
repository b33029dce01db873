"""verify_traversal (Traversal Verification): golden walks, the reference on random trees (chains, wide
trees, padding, batches), the same decisions as verify_sampling on depth-1 trees, seeded uniforms, a
chi-square test that the first two emitted tokens follow the target (with negative controls: deliberately
wrong traversals the same test must reject), and the mean accepted length against verify_sampling."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import (
    LOGIT_DTYPES,
    assert_same_outputs,
    batches,
    children_lists,
    sampling_inputs,
    seeds,
    vocabs,
)
from scipy.stats import chisquare

from sage_ext import ops, reference

SPECVLM_PARENTS = [-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21]


# --------------------------------------------------------------------------------------------
# golden walks
# --------------------------------------------------------------------------------------------
def test_chain_is_accepted_at_sequence_level():
    # root -> 1 -> 2 over vocab 2: alpha_1 = min(1, .5 / .8) = .625, alpha_2 = min(1, .625 * .9 / .5) = 1, so the
    # leaf and its whole path are accepted whatever uniforms[2]; token-level sampling rejects node 1 with u = .9
    tokens = torch.tensor([[1, 0, 0]])
    parents = torch.tensor([[-1, 0, 1]])
    target = torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]])
    draft = torch.tensor([[[0.8, 0.2], [0.5, 0.5], [0.5, 0.5]]])
    uniforms = torch.tensor([[0.5, 0.9, 0.999]])
    accepted, accept_len, bonus = torch.ops.sage_ext.verify_traversal(tokens, parents, target, draft, uniforms)
    assert accepted.tolist() == [[0, 1, 2]] and accept_len.tolist() == [2] and bonus.tolist() == [1]
    _, sampling_len, _ = torch.ops.sage_ext.verify_sampling(tokens, parents, target, draft, uniforms)
    assert sampling_len.tolist() == [0]


def test_rejected_subtree_hands_its_residual_to_a_sibling():
    #      0            node 4 is padding; deterministic draft (no draft_probs)
    #    /   \.
    #   1(0)  3(1)      alpha_1 = .6, alpha_2 = .3; rejecting 2 makes alpha_1 = .3 / (.4 + .3) = 3/7;
    #   |               rejecting 1 leaves the root [0, .4]: alpha_3 = 1
    #   2(1)
    tokens = torch.tensor([[7, 0, 1, 1, 0]])
    parents = torch.tensor([[-1, 0, 1, 0, -1]])
    target = torch.tensor([[[0.6, 0.4], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    op = torch.ops.sage_ext.verify_traversal
    accepted, accept_len, bonus = op(tokens, parents, target, None, torch.tensor([[0.0, 0.5, 0.9, 0.999, 0.0]]))
    assert accepted.tolist() == [[0, 3, -1, -1, -1]] and accept_len.tolist() == [1] and bonus.tolist() == [1]
    accepted, accept_len, bonus = op(tokens, parents, target, None, torch.tensor([[0.9, 0.42, 0.9, 0.999, 0.0]]))
    assert accepted.tolist() == [[0, 1, -1, -1, -1]] and bonus.tolist() == [0]  # token 1 was rejected below node 1


def test_wrapper_draws_the_uniforms_of_verify_sampling():
    tokens, parents, target, draft = sampling_inputs(3, 9, 40, torch.float32, True, seed=4)
    uniforms = torch.rand(3, 9, generator=torch.Generator().manual_seed(8))
    assert_same_outputs(ops.verify_traversal(tokens, parents, target, draft, generator=torch.Generator().manual_seed(8)),
                        torch.ops.sage_ext.verify_traversal(tokens, parents, target, draft, uniforms))
    torch.manual_seed(5)
    first = ops.verify_traversal(tokens, parents, target)
    torch.manual_seed(5)
    assert_same_outputs(ops.verify_traversal(tokens, parents, target), first)


# --------------------------------------------------------------------------------------------
# the reference, exactly
# --------------------------------------------------------------------------------------------
def shaped_parents(shape, batch, num_nodes, seed):
    """[batch, num_nodes] trees of one kind: "chain", "wide" (every node under the root), "two_level"
    (root children, each with children), "random" (ops_helpers.random_parents: padding mixed in)."""
    if shape == "random":
        from ops_helpers import random_parents

        return random_parents(batch, num_nodes, seed)
    if shape == "chain":
        row = [-1] + list(range(num_nodes - 1))
    elif shape == "wide":
        row = [-1] + [0] * (num_nodes - 1)
    else:
        width = max(1, int(num_nodes ** 0.5))
        row = [-1] + [0 if i <= width else 1 + (i - width - 1) % width for i in range(1, num_nodes)]
    return torch.tensor([row] * batch, dtype=torch.int64)


@given(batch=batches, num_nodes=st.integers(1, 64), vocab=vocabs, dtype=st.sampled_from(LOGIT_DTYPES),
       with_draft=st.booleans(), sharpness=st.sampled_from([0.5, 2.0, 6.0]),
       shape=st.sampled_from(["random", "random", "chain", "wide", "two_level"]), seed=seeds)
def test_matches_reference(batch, num_nodes, vocab, dtype, with_draft, sharpness, shape, seed):
    num_nodes = max(1, min(num_nodes, 4_000_000 // (batch * vocab)))  # bound the [B, N, V] memory
    tokens, parents, target, draft = sampling_inputs(batch, num_nodes, vocab, dtype, with_draft, seed, sharpness)
    if shape != "random":  # the same drawn tokens on another tree shape: children still ~ their parent's q
        parents = shaped_parents(shape, batch, num_nodes, seed)
        tokens = tokens_drawn_for(parents, draft if with_draft else target, seed)
    got = ops.verify_traversal(tokens, parents, target, draft, generator=torch.Generator().manual_seed(seed))
    want = reference.verify_traversal(tokens, parents, target, draft, generator=torch.Generator().manual_seed(seed))
    assert_same_outputs(got, want)
    accepted, accept_len, _ = got
    assert torch.all(accept_len == (accepted >= 0).sum(-1) - 1)
    for b in range(batch):  # the accepted nodes form a path from the root
        path = accepted[b, : accept_len[b] + 1].tolist()
        assert path[0] == 0 and all(parents[b, path[j]] == path[j - 1] for j in range(1, len(path)))


def tokens_drawn_for(parents, probs, seed):
    """Each real child's token drawn from its parent's row of `probs` [B, N, V]."""
    gen = torch.Generator().manual_seed(seed)
    parent_rows = probs.float()[torch.arange(parents.shape[0])[:, None], parents.clamp(min=0)]
    return torch.multinomial(parent_rows.flatten(0, 1), 1, generator=gen).view(parents.shape)


@pytest.mark.parametrize("shape", ["chain", "wide"])
@pytest.mark.parametrize("with_draft", [False, True])
def test_largest_trees_match_reference(shape, with_draft):
    num_nodes, vocab = ops.MAX_TREE_NODES, 16
    parents = shaped_parents(shape, 1, num_nodes, 0)
    gen = torch.Generator().manual_seed(1)
    target = torch.softmax(torch.randn(1, num_nodes, vocab, generator=gen) * 3, -1)
    draft = torch.softmax(torch.log(target) + 0.3 * torch.randn(1, num_nodes, vocab, generator=gen), -1)
    tokens = tokens_drawn_for(parents, draft, seed=2)
    for seed in range(3):
        args = (tokens, parents, target, draft if with_draft else None)
        assert_same_outputs(ops.verify_traversal(*args, generator=torch.Generator().manual_seed(seed)),
                            reference.verify_traversal(*args, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("with_draft", [False, True])
def test_depth_one_trees_decide_as_verify_sampling(with_draft):
    # children all under the root (alpha_root = 1): traversal makes token-level rejection sampling's decisions
    for seed in range(20):
        batch, num_nodes, vocab = 4, 2 + seed % 9, 3 + 7 * seed
        tokens, _, target, draft = sampling_inputs(batch, num_nodes, vocab, torch.float32, with_draft, seed)
        parents = shaped_parents("wide", batch, num_nodes, seed)
        parents[:, num_nodes // 2] = -1  # a padding slot
        uniforms = torch.rand(batch, num_nodes, generator=torch.Generator().manual_seed(seed))
        assert_same_outputs(torch.ops.sage_ext.verify_traversal(tokens, parents, target, draft, uniforms),
                            torch.ops.sage_ext.verify_sampling(tokens, parents, target, draft, uniforms))


# --------------------------------------------------------------------------------------------
# lossless: the first two emitted tokens follow the target
# --------------------------------------------------------------------------------------------
# The target and the draft are Markov chains over VOCAB tokens (the distribution of the next token depends on
# the last one), so every tree row is known and the token after a one-token emission can be drawn from the
# target too: the emitted pair (x1, x2) must follow TARGET[ROOT_TOKEN, x1] * TARGET[x1, x2].
VOCAB = 5
TRIALS_PER_CALL = 8192
CALLS = 5  # 40960 trials per test
ROOT_TOKEN = 0
TARGET = torch.softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)) * 0.8, -1)
DRAFT = 0.5 * torch.softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(1)) * 0.8, -1) + 0.5 * TARGET
# root with three children; node 1 has two, node 2 one; node 4 has two (depth 3); slot 7 is padding
LOSSLESS_PARENTS = [-1, 0, 0, 0, 1, 1, 2, -1, 4, 4]


def markov_tree(parents_row, batch, sampled_children, gen, target=TARGET, draft=DRAFT):
    """`batch` copies of one tree shape. Sampled draft: every child's token drawn (independently) from its
    parent's draft row; deterministic draft: the children of a node are its draft row's top tokens. Rows:
    target_probs[b, u] = target[tokens[b, u]] (and draft_probs likewise, None for the deterministic draft)."""
    num_nodes = len(parents_row)
    parents = torch.tensor(parents_row).expand(batch, -1).contiguous()
    tokens = torch.full((batch, num_nodes), ROOT_TOKEN, dtype=torch.int64)
    children = children_lists(parents_row)
    for u, kids in enumerate(children):
        if not kids:
            continue
        if sampled_children:
            drawn = torch.multinomial(draft[tokens[:, u]], len(kids), replacement=True, generator=gen)
        else:
            drawn = draft[tokens[:, u]].topk(len(kids), -1).indices
        tokens[:, kids] = drawn
    target_probs = target[tokens].contiguous()
    return tokens, parents, target_probs, (draft[tokens].contiguous() if sampled_children else None)


def first_two_tokens(tokens, accepted, accept_len, bonus, gen):
    """The first two emitted tokens; after a one-token emission (nothing accepted) the second is drawn from
    the target, as the next decoding step would."""
    rows = torch.arange(tokens.shape[0])
    first = torch.where(accept_len >= 1, tokens[rows, accepted[:, 1].clamp(min=0)], bonus)
    next_step = torch.multinomial(TARGET[first], 1, generator=gen).squeeze(1)
    second = torch.where(accept_len >= 2, tokens[rows, accepted[:, 2].clamp(min=0)],
                         torch.where(accept_len == 1, bonus, next_step))
    return first, second


def pair_counts(verify_fn, sampled_children):
    """Counts [VOCAB, VOCAB] of the first two emitted tokens over CALLS * TRIALS_PER_CALL seeded trials."""
    gen = torch.Generator().manual_seed(2024)
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.int64)
    for _ in range(CALLS):
        tokens, parents, target, draft = markov_tree(LOSSLESS_PARENTS, TRIALS_PER_CALL, sampled_children, gen)
        first, second = first_two_tokens(tokens, *verify_fn(tokens, parents, target, draft, gen), gen)
        counts += torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB)
    return counts.view(VOCAB, VOCAB)


def chi_square_pvalues(counts):
    """(p-value of the pair, p-value of the first token alone) against the target."""
    pair = (TARGET[ROOT_TOKEN][:, None] * TARGET).double().flatten()
    first = TARGET[ROOT_TOKEN].double()
    n = counts.sum()
    p_pair = chisquare(counts.flatten().double().numpy(), (pair / pair.sum() * n).numpy()).pvalue
    p_first = chisquare(counts.sum(1).double().numpy(), (first / first.sum() * n).numpy()).pvalue
    return p_pair, p_first


def op_traversal(tokens, parents, target, draft, gen):
    return ops.verify_traversal(tokens, parents, target, draft, generator=gen)


def python_traversal(bug):
    """Traversal verification written directly in PyTorch, vectorized over the batch (every row has the same
    tree shape), with an optional deliberate bug for the negative controls:
    "skip_residual": a rejected child leaves its parent's residual and alpha as they were;
    "keep_alpha": the residual is updated but the parent's alpha is not;
    "no_path_product": a child's alpha is min(1, p/q), without the parent's alpha (token-level ratios);
    "bonus_from_target": the bonus is drawn from the unmodified target row;
    "none": no bug (shows the harness itself accepts a correct traversal)."""

    def verify(tokens, parents, target, draft, gen):
        batch, num_nodes, vocab = target.shape
        parents_row = parents[0].tolist()
        children = children_lists(parents_row)
        uniforms = torch.rand(batch, num_nodes, generator=gen)
        alpha = torch.zeros(batch, num_nodes)
        alpha[:, 0] = 1.0
        residual = target.clone()
        decided = torch.zeros(batch, dtype=torch.bool)
        node = torch.zeros(batch, dtype=torch.int64)

        def visit(u):
            nonlocal decided
            for c in children[u]:
                x = tokens[:, c, None]
                p = residual[:, u] / residual[:, u].sum(-1, keepdim=True).clamp_min(1e-30)
                q = draft[:, u] if draft is not None else torch.nn.functional.one_hot(x[:, 0], vocab).float()
                weight = p.gather(1, x)[:, 0] if bug == "no_path_product" else alpha[:, u] * p.gather(1, x)[:, 0]
                alpha[:, c] = (weight / q.gather(1, x)[:, 0]).clamp(max=1.0)
                visit(c)
                if bug == "skip_residual":
                    continue
                rejected = ~decided
                new = torch.relu(alpha[:, u, None] * p - q)
                kept = new.sum(-1)
                residual[:, u] = torch.where(rejected[:, None], new, residual[:, u])
                if bug != "keep_alpha":
                    alpha[:, u] = torch.where(rejected, kept / (1 - alpha[:, u] + kept), alpha[:, u])
            accept = ~decided & ((uniforms[:, u] < alpha[:, u]) | (u == 0))
            node[accept] = u
            decided = decided | accept

        visit(0)
        rows = torch.arange(batch)
        source = target[rows, node] if bug == "bonus_from_target" else residual[rows, node]
        source = torch.where(source.sum(-1, keepdim=True) > 0, source, target[rows, node])
        bonus = torch.multinomial(source, 1, generator=gen).squeeze(1)
        depth = torch.zeros(num_nodes, dtype=torch.int64)
        for i in range(1, num_nodes):
            depth[i] = depth[parents_row[i]] + 1 if parents_row[i] >= 0 else 0
        accept_len = depth[node]
        accepted = torch.full((batch, num_nodes), -1, dtype=torch.int64)
        walk = node.clone()
        for j in range(int(depth.max()), -1, -1):  # fill the path from the accepted node up
            on_path = accept_len >= j
            accepted[on_path, j] = walk[on_path]
            walk = torch.where(on_path & (walk > 0), torch.tensor(parents_row)[walk], walk)
        return accepted, accept_len, bonus

    return verify


@pytest.mark.parametrize("sampled_children", [False, True], ids=["topk_draft", "sampled_draft_q"])
def test_traversal_is_lossless(sampled_children):
    counts = pair_counts(op_traversal, sampled_children)
    assert counts.sum() == CALLS * TRIALS_PER_CALL
    p_pair, p_first = chi_square_pvalues(counts)
    assert p_pair > 1e-3 and p_first > 1e-3, (p_pair, p_first)


@pytest.mark.parametrize(
    "bug, sampled_children",
    [("skip_residual", False), ("skip_residual", True), ("keep_alpha", False), ("keep_alpha", True),
     ("no_path_product", True), ("bonus_from_target", False)],
)
def test_chi_square_rejects_a_wrong_traversal(bug, sampled_children):
    p_pair, _ = chi_square_pvalues(pair_counts(python_traversal(bug), sampled_children))
    assert p_pair < 1e-6, p_pair


@pytest.mark.parametrize("sampled_children", [False, True], ids=["topk_draft", "sampled_draft_q"])
def test_correct_python_traversal_passes_the_same_test(sampled_children):
    """The negative-control harness itself is sound: without the bug it passes."""
    p_pair, p_first = chi_square_pvalues(pair_counts(python_traversal("none"), sampled_children))
    assert p_pair > 1e-3 and p_first > 1e-3, (p_pair, p_first)


# --------------------------------------------------------------------------------------------
# more accepted tokens than verify_sampling
# --------------------------------------------------------------------------------------------
ACCEPT_VOCAB = 32
ACCEPT_TARGET = torch.softmax(torch.randn(ACCEPT_VOCAB, ACCEPT_VOCAB, generator=torch.Generator().manual_seed(3)) * 2, -1)
ACCEPT_DRAFT = 0.5 * ACCEPT_TARGET + 0.5 * torch.softmax(
    torch.randn(ACCEPT_VOCAB, ACCEPT_VOCAB, generator=torch.Generator().manual_seed(4)) * 2, -1)
ACCEPT_TREES = {
    "chain6": [-1, 0, 1, 2, 3, 4, 5],
    "specvlm": SPECVLM_PARENTS,
    "binary3": [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6],
    "wide_two_level": [-1, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4],
}


def accept_lengths(op, parents_row, sampled_children):
    """accept_len of `op` over CALLS * TRIALS_PER_CALL Markov trees of one shape (seeded alike for both ops)."""
    gen = torch.Generator().manual_seed(11)
    lengths = []
    for _ in range(CALLS):
        tokens, parents, target, draft = markov_tree(parents_row, TRIALS_PER_CALL, sampled_children, gen,
                                                     ACCEPT_TARGET, ACCEPT_DRAFT)
        lengths.append(op(tokens, parents, target, draft, generator=gen)[1].double())
    return torch.cat(lengths)


def mean_and_error(lengths):
    return lengths.mean().item(), (lengths.std() / lengths.numel() ** 0.5).item()


@pytest.mark.parametrize("tree", list(ACCEPT_TREES))
def test_sampled_drafts_accept_more_than_verify_sampling(tree):
    traversal, t_err = mean_and_error(accept_lengths(ops.verify_traversal, ACCEPT_TREES[tree], True))
    sampling, s_err = mean_and_error(accept_lengths(ops.verify_sampling, ACCEPT_TREES[tree], True))
    margin = 4 * (t_err**2 + s_err**2) ** 0.5
    assert traversal > sampling + margin, (traversal, sampling, margin)


@pytest.mark.parametrize("tree", list(ACCEPT_TREES))
def test_deterministic_drafts_accept_as_much_as_verify_sampling(tree):
    # With a top-k draft both ops emit a sample of the target and accept the longest tree path it follows (a
    # bonus never repeats a rejected child's token), so accept_len has the same distribution under both, with
    # mean sum over the tree's nodes of the target probability of the path to the node.
    parents_row = ACCEPT_TREES[tree]
    tokens = markov_tree(parents_row, 1, False, None, ACCEPT_TARGET, ACCEPT_DRAFT)[0][0].tolist()
    path_prob = [1.0] * len(parents_row)
    for i in range(1, len(parents_row)):
        path_prob[i] = path_prob[parents_row[i]] * ACCEPT_TARGET[tokens[parents_row[i]], tokens[i]].item()
    exact = sum(path_prob[1:])
    for op in (ops.verify_traversal, ops.verify_sampling):
        mean, error = mean_and_error(accept_lengths(op, parents_row, False))
        assert abs(mean - exact) < 4 * error, (op, mean, exact, error)
