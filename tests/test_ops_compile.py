"""The ops under torch.compile and on meta tensors: registration consistency (torch.library.opcheck),
fake implementations with the right shapes/dtypes, and fullgraph compiled results equal to eager."""
import math

import pytest
import torch

from sage_ext import ops

BACKEND = "aot_eager"  # traces through the fake implementations and functionalization, fast to compile


def sample_inputs():
    """One valid argument tuple per registered op (B=2), built fresh each call (some ops mutate)."""
    gen = torch.Generator().manual_seed(0)
    parents = torch.tensor([[-1, 0, 0, 1, -1, 3], [-1, 0, 1, 2, 3, 0]])
    tokens = torch.randint(0, 16, parents.shape, generator=gen)
    capacity = 8
    state = (torch.zeros(2, capacity, dtype=torch.int64), torch.full((2, capacity), -1, dtype=torch.int64),
             torch.zeros(2, capacity), torch.zeros(2, capacity))
    topk_lp = torch.log_softmax(torch.randn(2, 1, 16, generator=gen), -1).topk(4).values
    probs = torch.softmax(torch.randn(2, 6, 16, generator=gen), -1)
    return {
        "topk_confidence": (torch.randn(3, 100, generator=gen), 5, 0.8),
        "build_static_tree": (ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS),),
        "sage_tree": (torch.tensor([0.2, 0.9]), torch.tensor([[0.0, -math.inf], [-0.5, -1.0]]), 2, 10, 3.0, 8.0,
                      2.0, 10.0, 0.1),
        "expand_tree": (*state, torch.zeros(2, 1, dtype=torch.int64), topk_lp, torch.randint(0, 16, (2, 1, 4), generator=gen),
                        torch.tensor([[3], [4]]), torch.tensor([-3.0, -3.0]), 1, 5),
        "rerank_tree": (parents, -torch.rand(2, 6, generator=gen), 4),
        "tree_buffers": (parents, 7, torch.float16),
        "verify_greedy": (tokens, parents, torch.randn(2, 6, 16, generator=gen)),
        "verify_sampling": (tokens, parents, probs, probs.flip(-1), torch.rand(2, 6, generator=gen)),
        "verify_traversal": (tokens, parents, probs, probs.flip(-1), torch.rand(2, 6, generator=gen)),
        "kv_compact_": ([torch.randn(2, 2, 10, 4, generator=gen), torch.randn(2, 2, 10, 4, generator=gen)],
                        torch.tensor([[0, 1, 3, -1], [0, 2, 3, 4]]), 3),
        "sage_level_": (*state, torch.zeros(2, capacity, capacity, dtype=torch.float16),
                        torch.randn(2, 1, 16, generator=gen), None, 0, 1, 1, 5, 4, 1.0, 3.0, 8.0, 2.0, 10.0, 0.1),
        "expand_level_": (*state, torch.randn(2, 2, 16, generator=gen), 1, 3, 0.9, 3, 5),
        "gather_level_": (state[0], state[2], torch.randn(2, 2, 16, generator=gen), torch.tensor([0, 4, 1, 5]), 1, 3,
                          1.0),
        "rerank_select": (tokens, parents, -torch.rand(2, 6, generator=gen), -torch.rand(2, 6, generator=gen),
                          torch.tensor([[0, 1, 2, -1, -1, -1, -1], [0, 1, 2, 3, -1, -1, -1]]), 4),
        "tree_mask_feed_": (torch.zeros(2, capacity + 1, capacity, dtype=torch.bfloat16), parents,
                            torch.tensor([[0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 4, -1]]), 2, 3, 3),
        "commit_tree_": (tokens, parents, torch.tensor([[0, 1, 3, -1, -1, -1], [0, 1, 2, 3, -1, -1]]),
                         torch.tensor([2, 3]), torch.tensor([7, 9]), torch.zeros(2, 12, dtype=torch.int64), 4,
                         [torch.randn(2, 2, 10, 4, generator=gen)], 3, [torch.randn(2, 1, 6, 4, generator=gen)],
                         torch.tensor([[0, 1, -1, -1, -1, -1], [0, 1, 2, -1, -1, -1]]), 2, torch.rand(2, generator=gen)),
    }


OP_NAMES = list(sample_inputs())


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    """Schema, fake implementation and (dynamic-shape) AOT dispatch agree with the real kernel."""
    op = getattr(torch.ops.sage_ext, name).default
    torch.library.opcheck(op, sample_inputs()[name])


def to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, list):
        return [to_meta(v) for v in value]
    return value


@pytest.mark.parametrize("name", OP_NAMES)
def test_meta_tensors_give_the_real_shapes(name):
    op = getattr(torch.ops.sage_ext, name)
    real = op(*sample_inputs()[name])
    meta = op(*to_meta(list(sample_inputs()[name])))
    real = real if isinstance(real, tuple) else (real,)
    meta = meta if isinstance(meta, tuple) else (meta,)
    assert len(real) == len(meta)
    for r, m in zip(real, meta):
        if r is None:
            assert m is None
            continue
        assert m.device.type == "meta" and m.shape == r.shape and m.dtype == r.dtype


def wrapper_call(name, args):
    """The `sage_ext.ops` wrapper of op `name` on `args` (verify_sampling / verify_traversal: the op with
    explicit uniforms)."""
    if name in ("verify_sampling", "verify_traversal"):
        return getattr(torch.ops.sage_ext, name)(*args)
    return getattr(ops, name)(*args)


@pytest.mark.parametrize("name", OP_NAMES)
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    eager_args, compiled_args = sample_inputs()[name], sample_inputs()[name]
    eager = wrapper_call(name, eager_args)
    compiled = torch.compile(lambda *a: wrapper_call(name, a), fullgraph=True, backend=BACKEND)(*compiled_args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    for e, c in zip(eager, compiled):
        assert (e is None and c is None) or torch.equal(e, c)
    # in-place ops mutate their inputs the same way when compiled
    for e, c in zip(eager_args, compiled_args):
        if isinstance(e, torch.Tensor):
            assert torch.equal(e, c)
        elif isinstance(e, list):
            assert all(torch.equal(x, y) for x, y in zip(e, c))


@pytest.mark.parametrize("name", ["verify_sampling", "verify_traversal"])
def test_compiled_sampling_wrapper_draws_its_own_uniforms(name):
    torch._dynamo.reset()
    tokens, parents, probs, draft, _ = sample_inputs()[name]
    wrapper = getattr(ops, name)
    fn = torch.compile(lambda t, p, q, d: wrapper(t, p, q, d), fullgraph=True, backend=BACKEND)
    accepted, accept_len, bonus = fn(tokens, parents, probs, draft)
    assert accepted.shape == (2, 6) and accept_len.shape == (2,) and bonus.shape == (2,)
    assert torch.all((bonus >= 0) & (bonus < 16))


def test_compiled_per_step_bundle_matches_eager():
    """confidence -> SAGE level -> expansion -> buffers -> verification as one compiled graph."""

    def step(root_logits, child_logits, target_logits, past_len):
        batch = root_logits.shape[0]
        alpha, root_lp, root_ids = ops.topk_confidence(root_logits, 8)
        tokens = torch.zeros(batch, 9, dtype=torch.int64)
        parents = torch.full((batch, 9), -1, dtype=torch.int64)
        logprobs = torch.zeros(batch, 9)
        cum = torch.zeros(batch, 9)
        frontier = torch.zeros(batch, 1, dtype=torch.int64)
        widths, min_cum, _ = ops.sage_tree(alpha, torch.zeros(batch, 1), 1, 8, 3, 8, 2, 10)
        ops.expand_tree(tokens, parents, logprobs, cum, frontier, root_lp[:, None], root_ids[:, None], widths, min_cum,
                        1, 8)
        buffers = ops.tree_buffers(parents, past_len, torch.float32)
        accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, target_logits)
        return (alpha, tokens, parents, cum, buffers[1], buffers[6], accepted, accept_len, bonus)

    gen = torch.Generator().manual_seed(3)
    root_logits = torch.randn(2, 500, generator=gen) * 2
    target_logits = torch.randn(2, 9, 500, generator=gen)
    target_logits[:, 0, :].scatter_(1, root_logits.argmax(-1, keepdim=True), 50.0)
    args = (root_logits, None, target_logits, 11)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)
    for e, c in zip(step(*args), compiled(*args)):
        assert torch.equal(e, c)
