"""CUDA kernels against the CPU kernels (same inputs, same outputs), no host-device syncs, CUDA and CPU
generators, every kv_compact_ copy path, the split top-k, device-mismatch errors and CUDA-graph capture.
Skipped without a GPU; on a GPU machine whose build lacks the CUDA kernels every test fails with how to
build them (tests/cuda_helpers.py)."""
import math

import pytest
import torch
from cuda_helpers import CUDA, cuda_kernels_required, needs_gpu  # noqa: F401  (autouse fixture)
from ops_helpers import (
    LOGIT_DTYPES,
    assert_same_outputs,
    assert_two_infinity_golden,
    logits_with_argmax,
    matching_argmax,
    random_parents,
    random_tokens_for,
    two_infinity_logits,
)

from sage_ext import ops

pytestmark = needs_gpu


def on_cuda(values):
    return [v.to(CUDA) if isinstance(v, torch.Tensor) else v for v in values]


def parity(fn, *args, atol=0.0, rtol=0.0):
    """fn(*args) on CPU and on CUDA give the same outputs; returns the CUDA outputs."""
    cpu = fn(*args)
    gpu = fn(*on_cuda(args))
    cpu = cpu if isinstance(cpu, tuple) else (cpu,)
    gpu = gpu if isinstance(gpu, tuple) else (gpu,)
    for out in gpu:
        assert out.device.type == "cuda"
    assert_same_outputs(gpu, cpu, atol=atol, rtol=rtol)
    return gpu


# --------------------------------------------------------------------------------------------
# parity, op by op
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
# 256000 and 300000 columns: 32 splits (the most the finalize warp merges), the second with chunks above the
# minimum; 152064: 19 splits; 7: one
@pytest.mark.parametrize("rows, vocab, k", [(1, 32000, 10), (8, 152064, 64), (5, 7, 7), (64, 1000, 1), (3, 160000, 33),
                                            (1, 256000, 64), (4, 256000, 10), (2, 300000, 33)])
def test_topk_confidence(dtype, rows, vocab, k):
    gen = torch.Generator().manual_seed(rows * vocab + k)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[0, :5] = torch.tensor([math.nan, math.inf, -math.inf, 2.0, 2.0])[: min(5, vocab)]
    if rows > 2:
        logits[1] = -math.inf
        logits[2] = torch.randint(-2, 2, (vocab,), generator=gen).float()  # many ties
    if rows > 3:  # two +inf (fp16 overflow), far apart: log-probs -log 2 each (z - max first, then - log(sum))
        logits[3, 0] = logits[3, vocab - 1] = math.inf
    parity(ops.topk_confidence, logits.to(dtype), k, 0.7, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("vocab, k", [(7, 2), (7, 5), (152064, 64), (256000, 10)])
def test_topk_confidence_two_infinities_golden(dtype, vocab, k):
    # the exact values, not only parity: z - (max + log(sum)) would give 0 instead of -log 2
    logits = two_infinity_logits(3, vocab, dtype)
    assert_two_infinity_golden(*ops.topk_confidence(logits.to(CUDA), k, 0.7), vocab)
    fp16 = torch.tensor([[7.0e4, 3.0, -1.0, 1.0e5, 2.0]]).to(torch.float16)  # overflows to two +inf
    _, lp, _ = parity(ops.topk_confidence, fp16, 3, 1.0, atol=2e-5, rtol=1e-5)
    assert lp[0, :2].tolist() == [pytest.approx(-math.log(2), abs=1e-6)] * 2


def test_build_static_tree():
    parity(ops.build_static_tree, ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS))


@pytest.mark.parametrize("level", [1, 2, 5, 9])
def test_sage_tree(level):
    gen = torch.Generator().manual_seed(level)
    alpha = torch.rand(8, generator=gen)
    frontier = torch.log(torch.rand(8, 64, generator=gen))
    frontier[:, ::7] = -math.inf
    parity(ops.sage_tree, alpha, frontier, level, 10, 3.0, 8.0, 2.0, 10.0, 0.1, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("batch, capacity, num_frontier, top_k", [(1, 65, 1, 10), (8, 129, 32, 10), (4, 1024, 64, 64)])
def test_expand_tree(batch, capacity, num_frontier, top_k):
    gen = torch.Generator().manual_seed(capacity)
    slot_start = capacity // 4
    tokens = torch.randint(0, 1000, (batch, capacity), generator=gen)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64)
    logprobs = torch.zeros(batch, capacity)
    cum = (-torch.rand(batch, capacity, generator=gen) * 4 * 2).round() / 2  # ties
    frontier = torch.randint(-1, slot_start, (batch, num_frontier), generator=gen)
    topk_lp = ((torch.log(torch.rand(batch, num_frontier, top_k, generator=gen)) * 2).round() / 2).sort(
        -1, descending=True).values
    topk_ids = torch.randint(0, 1000, (batch, num_frontier, top_k), generator=gen)
    widths = torch.randint(0, top_k + 1, (batch, num_frontier), generator=gen)
    min_cum = -torch.rand(batch, generator=gen) * 5
    state = [tokens, parents, logprobs, cum]
    cpu_state = [t.clone() for t in state]
    gpu_state = [t.to(CUDA) for t in state]
    rest = (frontier, topk_lp, topk_ids, widths, min_cum)
    num_slots = capacity - slot_start
    count_cpu = ops.expand_tree(*cpu_state, *rest, slot_start, num_slots)
    count_gpu = ops.expand_tree(*gpu_state, *on_cuda(rest), slot_start, num_slots)
    assert_same_outputs([count_gpu] + gpu_state, [count_cpu] + cpu_state)


@pytest.mark.parametrize("batch, num_nodes", [(1, 1), (1, 64), (8, 128), (2, 1024)])
def test_rerank_tree(batch, num_nodes):
    parents = random_parents(batch, num_nodes, seed=num_nodes)
    cum = (-torch.rand(batch, num_nodes, generator=torch.Generator().manual_seed(1)) * 8).round()  # ties
    for num_select in sorted({1, max(1, num_nodes // 3), num_nodes}):
        parity(ops.rerank_tree, parents, cum, num_select)


@pytest.mark.parametrize("mask_dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("batch, num_nodes, past_len", [(1, 1, 0), (1, 26, 100), (8, 128, 37), (2, 1024, 5)])
def test_tree_buffers(mask_dtype, batch, num_nodes, past_len):
    parity(ops.tree_buffers, random_parents(batch, num_nodes, seed=num_nodes), past_len, mask_dtype)


@pytest.mark.parametrize("vocab, dtype", [(None, None)] + [(v, d) for v in (32000, 152064) for d in LOGIT_DTYPES])
def test_verify_greedy(vocab, dtype):
    parents = random_parents(8, 64, seed=3)
    tokens = random_tokens_for(parents, vocab or 100, seed=3, small_alphabet=vocab is None)
    argmax = matching_argmax(tokens, parents, vocab or 100, seed=3, hit_prob=0.9)
    target = argmax if vocab is None else logits_with_argmax(argmax, vocab, dtype, seed=3, ties=True)
    parity(ops.verify_greedy, tokens, parents, target)


@pytest.mark.parametrize("with_draft", [False, True])
@pytest.mark.parametrize("vocab, dtype", [(8, torch.float32), (1000, torch.float16), (32000, torch.bfloat16),
                                          (152064, torch.float32)])
def test_verify_sampling_same_uniforms(with_draft, vocab, dtype):
    batch, num_nodes = 8, 32
    parents = random_parents(batch, num_nodes, seed=vocab)
    gen = torch.Generator().manual_seed(vocab)
    target = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen) * 3, -1)
    draft = torch.softmax(torch.log(target) + torch.randn(batch, num_nodes, vocab, generator=gen), -1)
    parent_rows = draft[torch.arange(batch)[:, None], parents.clamp(min=0)]  # each child ~ its parent's q
    tokens = torch.multinomial(parent_rows.flatten(0, 1), 1, generator=gen).view(batch, num_nodes)
    for seed in range(4):
        uniforms = torch.rand(batch, num_nodes, generator=torch.Generator().manual_seed(seed))
        parity(torch.ops.sage_ext.verify_sampling, tokens, parents, target.to(dtype),
               draft.to(dtype) if with_draft else None, uniforms)


@pytest.mark.parametrize("verify", ["verify_sampling", "verify_traversal"])
def test_a_residual_left_with_rounding_only_draws_alike(verify):
    """tests/test_ops_verify.py's rounding case on the GPU: both children of the only two positive tokens
    rejected by the largest uniform, the bonus drawn from the target row, as on the CPU (never token 0, of
    probability 0)."""
    from test_ops_verify import ROUNDING_ROW

    probs = torch.zeros(1, 3, 8)
    probs[0, 0, 3], probs[0, 0, 5] = ROUNDING_ROW
    probs[0, 1:, 1] = 1.0
    tokens, parents = torch.tensor([[7, 3, 5]]), torch.tensor([[-1, 0, 0]])
    uniforms = torch.tensor([[0.5, 0.9999, 1 - 2 ** -24]])
    _, _, bonus = parity(getattr(torch.ops.sage_ext, verify), tokens, parents, probs, None, uniforms)
    assert float(probs[0, 0, int(bonus[0])]) > 0


def test_verify_sampling_cuda_generator_repeats():
    parents = random_parents(4, 16, seed=0).to(CUDA)
    tokens = torch.randint(0, 50, (4, 16), device=CUDA)
    target = torch.softmax(torch.randn(4, 16, 50, device=CUDA), -1)
    runs = [ops.verify_sampling(tokens, parents, target, generator=torch.Generator(CUDA).manual_seed(9))
            for _ in range(2)]
    assert_same_outputs(runs[0], runs[1])


@pytest.mark.parametrize("with_draft", [False, True])
def test_verify_sampling_cpu_generator(with_draft):
    # a CPU generator with CUDA tensors: the same uniforms as on CPU tensors, so the same outcome; the generator
    # advances alike; and seeded runs repeat
    batch, num_nodes, vocab = 6, 24, 500
    parents = random_parents(batch, num_nodes, seed=21)
    gen = torch.Generator().manual_seed(21)
    target = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen) * 2, -1)
    draft = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen), -1) if with_draft else None
    tokens = torch.multinomial(target.flatten(0, 1), 1, generator=gen).view(batch, num_nodes)
    for seed in range(3):
        cpu_gen, cuda_side_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        cpu = ops.verify_sampling(tokens, parents, target, draft, generator=cpu_gen)
        gpu = ops.verify_sampling(*on_cuda((tokens, parents, target, draft)), generator=cuda_side_gen)
        assert all(t.device.type == "cuda" for t in gpu)
        assert_same_outputs(gpu, cpu)
        assert torch.equal(cpu_gen.get_state(), cuda_side_gen.get_state())


def test_verify_sampling_cuda_generator_on_cpu_tensors():
    parents = random_parents(4, 16, seed=1)
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    target = torch.softmax(torch.randn(4, 16, 50, generator=torch.Generator().manual_seed(2)), -1)
    runs = [ops.verify_sampling(tokens, parents, target, generator=torch.Generator(CUDA).manual_seed(9))
            for _ in range(2)]
    assert all(t.device.type == "cpu" for t in runs[0])
    assert_same_outputs(runs[0], runs[1])
    uniforms = torch.rand(4, 16, generator=torch.Generator(CUDA).manual_seed(9), device=CUDA).cpu()
    assert_same_outputs(runs[0], torch.ops.sage_ext.verify_sampling(tokens, parents, target, None, uniforms))


@pytest.mark.parametrize("with_draft", [False, True])
@pytest.mark.parametrize("vocab, dtype", [(8, torch.float32), (1000, torch.float16), (32000, torch.bfloat16),
                                          (152064, torch.float32)])
@pytest.mark.parametrize("shape", ["random", "chain", "wide"])
def test_verify_traversal_same_uniforms(with_draft, vocab, dtype, shape):
    batch, num_nodes = 8, 32
    if shape == "random":
        parents = random_parents(batch, num_nodes, seed=vocab)
    elif shape == "chain":
        parents = torch.tensor([[-1] + list(range(num_nodes - 1))] * batch)
    else:
        parents = torch.tensor([[-1] + [0] * (num_nodes - 1)] * batch)
    gen = torch.Generator().manual_seed(vocab)
    target = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen) * 3, -1)
    draft = torch.softmax(torch.log(target) + torch.randn(batch, num_nodes, vocab, generator=gen), -1)
    parent_rows = draft[torch.arange(batch)[:, None], parents.clamp(min=0)]  # each child ~ its parent's q
    tokens = torch.multinomial(parent_rows.flatten(0, 1), 1, generator=gen).view(batch, num_nodes)
    for seed in range(4):
        uniforms = torch.rand(batch, num_nodes, generator=torch.Generator().manual_seed(seed))
        parity(torch.ops.sage_ext.verify_traversal, tokens, parents, target.to(dtype),
               draft.to(dtype) if with_draft else None, uniforms)


@pytest.mark.parametrize("with_draft", [False, True])
def test_verify_traversal_largest_tree_and_cpu_generator(with_draft):
    # N = 1024 (a block's worth of nodes), a CPU generator with CUDA tensors: the same uniforms, the same outcome
    batch, num_nodes, vocab = 3, ops.MAX_TREE_NODES, 64
    parents = random_parents(batch, num_nodes, seed=5)
    gen = torch.Generator().manual_seed(5)
    target = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen) * 2, -1)
    draft = torch.softmax(torch.log(target) + torch.randn(batch, num_nodes, vocab, generator=gen), -1)
    tokens = torch.multinomial(target.flatten(0, 1), 1, generator=gen).view(batch, num_nodes)
    draft = draft if with_draft else None
    for seed in range(3):
        cpu_gen, cuda_side_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        cpu = ops.verify_traversal(tokens, parents, target, draft, generator=cpu_gen)
        gpu = ops.verify_traversal(*on_cuda((tokens, parents, target, draft)), generator=cuda_side_gen)
        assert all(t.device.type == "cuda" for t in gpu)
        assert_same_outputs(gpu, cpu)


def test_verify_traversal_never_accepts_a_token_outside_the_vocabulary():
    # the CPU op raises; the CUDA op does not read data back and rejects such a child
    tokens = torch.tensor([[0, 9, 1]], device=CUDA)
    parents = torch.tensor([[-1, 0, 0]], device=CUDA)
    probs = torch.tensor([[[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]], device=CUDA)
    accepted, accept_len, bonus = torch.ops.sage_ext.verify_traversal(tokens, parents, probs, None,
                                                                      torch.zeros(1, 3, device=CUDA))
    assert accepted.tolist() == [[0, 2, -1]] and accept_len.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_compact(dtype):
    parents = random_parents(8, 64, seed=4)
    tokens = random_tokens_for(parents, 50, seed=4)
    accepted, _, _ = ops.verify_greedy(tokens, parents, matching_argmax(tokens, parents, 50, seed=4, hit_prob=0.95))
    gen = torch.Generator().manual_seed(5)
    caches = [torch.randn(8, 4, 300, 128, generator=gen).to(dtype) for _ in range(6)]
    caches.append(torch.randn(8, 300, 2, 64, generator=gen).to(dtype).transpose(1, 2))  # strided layout
    gpu = [c.to(CUDA) for c in caches]
    ops.kv_compact_(caches, accepted, 200)
    ops.kv_compact_(gpu, accepted.to(CUDA), 200)
    for c, g in zip(caches, gpu):
        assert torch.equal(c, g.cpu())


def copy_unit_bytes(cache: torch.Tensor) -> int:
    """The copy width kv_compact.cu picks for a cache (its copy_unit_bytes): the largest power of two <= 16
    dividing the row's bytes, the address and the B, H, L strides in bytes."""
    item = cache.element_size()
    sizes = [cache.size(3) * item, cache.data_ptr()] + [cache.stride(d) * item for d in range(3)]
    unit = 16
    while unit > 1 and any(size % unit for size in sizes):
        unit //= 2
    return unit


# (dtype, [B, H, L, D] of the base tensor, view of it, copy width): every width the kernel has
KV_LAYOUTS = {
    "fp32_d128_16B": (torch.float32, (4, 3, 90, 128), lambda t: t, 16),
    "bf16_transposed_16B": (torch.bfloat16, (4, 90, 3, 64), lambda t: t.transpose(1, 2), 16),
    "fp32_d6_8B": (torch.float32, (4, 3, 90, 6), lambda t: t, 8),
    "fp64_d1_8B": (torch.float64, (4, 3, 90, 1), lambda t: t, 8),
    "fp32_d3_4B": (torch.float32, (4, 3, 90, 3), lambda t: t, 4),
    "fp32_offset_view_4B": (torch.float32, (4, 3, 90, 9), lambda t: t[..., 1:], 4),
    "fp16_d3_2B": (torch.float16, (4, 3, 90, 3), lambda t: t, 2),
    "bf16_offset_view_2B": (torch.bfloat16, (4, 3, 90, 17), lambda t: t[..., 1:], 2),
    "fp8_d5_1B": (torch.float8_e4m3fn, (4, 3, 90, 5), lambda t: t, 1),
}


def kv_case(dtype, shape, view, seed):
    """The same cache view on the CPU and on CUDA (from one random base tensor)."""
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return view(base), view(base.to(CUDA))


def same_bytes(cpu: torch.Tensor, gpu: torch.Tensor) -> bool:
    return torch.equal(cpu.contiguous().view(torch.uint8), gpu.cpu().contiguous().view(torch.uint8))


def accepted_for(batch: int, nodes: int, seed: int) -> torch.Tensor:
    parents = random_parents(batch, nodes, seed=seed)
    tokens = random_tokens_for(parents, 50, seed=seed)
    return ops.verify_greedy(tokens, parents, matching_argmax(tokens, parents, 50, seed=seed, hit_prob=0.95))[0]


@pytest.mark.parametrize("layout", list(KV_LAYOUTS))
def test_kv_compact_every_copy_width(layout):
    dtype, shape, view, unit = KV_LAYOUTS[layout]
    accepted = accepted_for(4, 40, seed=11)
    assert (accepted >= 0).sum(1).max() > 3, "a deep accepted path: rows actually move"
    cpu, gpu = kv_case(dtype, shape, view, seed=12)
    assert copy_unit_bytes(gpu) == unit, "the case must take the copy path it is named after"
    before = cpu.clone()
    ops.kv_compact_([cpu], accepted, 45)
    ops.kv_compact_([gpu], accepted.to(CUDA), 45)
    assert not same_bytes(before, cpu.to(CUDA))
    assert same_bytes(cpu, gpu)


def test_kv_compact_several_launches_mixed_widths():
    # 600 caches: three launches of at most 256 (48 before CUDA 12.1); every copy width and empty caches mixed in
    accepted = accepted_for(4, 40, seed=13)
    cpu_caches, gpu_caches = [], []
    layouts = list(KV_LAYOUTS.values())
    for i in range(600):
        if i % 97 == 5:  # an empty cache is skipped
            cpu_caches.append(torch.empty(4, 0, 90, 8))
            gpu_caches.append(torch.empty(4, 0, 90, 8, device=CUDA))
            continue
        dtype, shape, view, _ = layouts[i % len(layouts)]
        cpu, gpu = kv_case(dtype, shape, view, seed=100 + i)
        cpu_caches.append(cpu)
        gpu_caches.append(gpu)
    ops.kv_compact_(cpu_caches, accepted, 45)
    ops.kv_compact_(gpu_caches, accepted.to(CUDA), 45)
    for i, (c, g) in enumerate(zip(cpu_caches, gpu_caches)):
        assert same_bytes(c, g), f"cache {i}"


@pytest.mark.parametrize("mask_dtype", [None, *LOGIT_DTYPES])
@pytest.mark.parametrize("lagged", [False, True])
@pytest.mark.parametrize("batch, capacity, frontier_start, num_frontier, slot_start, vocab", [
    (1, 65, 0, 1, 1, 32000), (3, 65, 2, 5, 9, 1000), (2, 1024, 100, 64, 300, 4000)])
def test_sage_level(mask_dtype, lagged, batch, capacity, frontier_start, num_frontier, slot_start, vocab):
    gen = torch.Generator().manual_seed(capacity + num_frontier)
    tokens = torch.zeros(batch, capacity, dtype=torch.int64)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64)
    logprobs = torch.log(torch.rand(batch, capacity, generator=gen))
    cum = -torch.rand(batch, capacity, generator=gen) * 3
    logprobs[:, 0] = cum[:, 0] = 0
    logits = torch.randn(batch, num_frontier, vocab, generator=gen) * 4
    alpha = torch.rand(batch, generator=gen) if lagged else None
    mask = None
    if mask_dtype is not None:
        mask = torch.where(torch.rand(batch, capacity + 1, capacity, generator=gen) < 0.5, 0.0,
                           torch.finfo(mask_dtype).min).to(mask_dtype)
    num_slots = min(capacity - slot_start, 64)
    cpu_state = [tokens, parents, logprobs, cum, mask]
    gpu_state = [t.to(CUDA) if t is not None else None for t in cpu_state]
    args = (logits, alpha, frontier_start, 2, slot_start, num_slots, 10, 0.8, 3.0, 8.0, 2.0, 10.0, 0.1)
    cpu = ops.sage_level_(*cpu_state, *args)
    gpu = ops.sage_level_(*gpu_state, *on_cuda(args))
    assert_same_outputs(gpu, cpu, atol=2e-5, rtol=1e-5)
    assert_same_outputs([t for t in gpu_state if t is not None], [t for t in cpu_state if t is not None],
                        atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("margin", [-1e-3, 1e-3])
def test_workspace_level_stop_decides_alike(margin):
    """TreeWorkspace.sage_level with level_stops (sage_cost's per-step stop, dynamic shapes): on CUDA the level's count
    and draft probability mass come back in one copy and the tree goes on exactly when it does on the CPU, at a
    threshold just under and just over the level's mass."""
    from sage_ext import _C

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 1, 152064, generator=gen) * 3
    logits[0, 0, :3] = torch.tensor([9.0, 8.6, 8.1])  # a few likely children

    def first_level(device, stops=None):
        sequence = torch.zeros(1, 64, dtype=torch.int64, device=device)
        sequence[0, :4] = torch.tensor([1, 2, 3, 4])
        ws = _C.TreeWorkspace(65, 64, 3, sequence, torch.float32, torch.float32, None)
        ws.start_generation(3)
        ws.start(4, 3)
        count, _, _, inputs = ws.sage_level(logits.to(device), None, 0, 1, 1, 1, 64, 10, 1.0, 3.0, 8.0, 2.0, 10.0,
                                            0.1, 0, 64, -1, -1, stops)
        return ws, count, inputs

    ws, count, _ = first_level("cpu")
    mass = float(ws.cum_logprobs[0, 1:1 + count].double().exp().sum())  # the level's real nodes
    stops = _C.LevelStops(masses=[0.0, 10.0], values=[0.0, 10.0], scales=[1.0], cost_fixed=mass + margin,
                          cost_per_node=0.0)
    (cpu, cpu_count, cpu_inputs), (gpu, gpu_count, gpu_inputs) = first_level("cpu", stops), first_level(CUDA, stops)
    assert cpu_count == gpu_count == count > 1
    assert (cpu_inputs is not None) == (gpu_inputs is not None) == (margin < 0)
    torch.testing.assert_close(gpu.cum_logprobs[0, :1 + count].cpu(), cpu.cum_logprobs[0, :1 + count],
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, capacity, frontier_start, num_frontier, slot_start, num_slots, k, vocab", [
    (1, 9, 0, 1, 1, 8, 8, 32000), (3, 73, 1, 8, 9, 64, 8, 1000), (2, 200, 10, 30, 50, 150, 10, 4000)])
def test_expand_level(batch, capacity, frontier_start, num_frontier, slot_start, num_slots, k, vocab):
    gen = torch.Generator().manual_seed(capacity)
    state = [torch.zeros(batch, capacity, dtype=torch.int64), torch.full((batch, capacity), -1, dtype=torch.int64),
             torch.log(torch.rand(batch, capacity, generator=gen)), -torch.rand(batch, capacity, generator=gen) * 3]
    state[2][:, 0] = state[3][:, 0] = 0
    logits = torch.randn(batch, num_frontier, vocab, generator=gen) * 4
    gpu_state = on_cuda(state)
    args = (frontier_start, k, 0.8, slot_start, num_slots)
    cpu = ops.expand_level_(*state, logits, *args)
    gpu = ops.expand_level_(*gpu_state, logits.to(CUDA), *args)
    assert_same_outputs(gpu, cpu, atol=2e-5, rtol=1e-5)
    assert_same_outputs(gpu_state, state, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_gather_level(dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, logprobs = torch.zeros(2, 26, dtype=torch.int64), torch.zeros(2, 26)
    logits = (torch.randn(2, 4, 32000, generator=gen) * 3).to(dtype)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 14])
    gpu_state = on_cuda([tokens, logprobs])
    cpu = ops.gather_level_(tokens, logprobs, logits, index, 5, 4, 1.0)
    gpu = ops.gather_level_(*gpu_state, logits.to(CUDA), index.to(CUDA), 5, 4, 1.0)
    assert_same_outputs([gpu], [cpu], atol=2e-5, rtol=1e-5)
    assert_same_outputs(gpu_state, [tokens, logprobs], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, num_nodes, num_select", [(1, 457, 65), (3, 40, 40), (2, 30, 5)])
def test_rerank_select(batch, num_nodes, num_select):
    parents = random_parents(batch, num_nodes, seed=num_nodes)
    gen = torch.Generator().manual_seed(num_nodes)
    tokens = torch.randint(0, 1000, (batch, num_nodes), generator=gen)
    logprobs = torch.log(torch.rand(batch, num_nodes, generator=gen))
    cum = -torch.rand(batch, num_nodes, generator=gen) * 5
    node_row = torch.randint(-1, 60, (batch, num_nodes + 1), generator=gen)
    args = (tokens, parents, logprobs, cum, node_row, num_select)
    parity(ops.rerank_select, *args)


@pytest.mark.parametrize("mask_dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("with_node_row", [False, True])
def test_tree_mask_feed(mask_dtype, with_node_row):
    gen = torch.Generator().manual_seed(5)
    batch, capacity = 2, 65
    parents = random_parents(batch, capacity, seed=5)
    mask = torch.where(torch.rand(batch, capacity + 1, capacity, generator=gen) < 0.5, 0.0,
                       torch.finfo(mask_dtype).min).to(mask_dtype)
    mask[:, -1] = torch.finfo(mask_dtype).min
    node_row = torch.randint(-1, 20, (batch, capacity + 1), generator=gen) if with_node_row else None
    slot_start, first_row, count = (30, 20, 25) if with_node_row else (20, 20, 25)
    gpu_mask = mask.to(CUDA)
    ops.tree_mask_feed_(mask, parents, node_row, slot_start, first_row, count)
    ops.tree_mask_feed_(gpu_mask, parents.to(CUDA), None if node_row is None else node_row.to(CUDA), slot_start,
                        first_row, count)
    assert torch.equal(gpu_mask.cpu(), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_draft", [False, True])
def test_commit_tree(dtype, with_draft):
    batch, nodes = 4, 64
    parents = random_parents(batch, nodes, seed=6)
    tokens = random_tokens_for(parents, 50, seed=6)
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents,
                                                    matching_argmax(tokens, parents, 50, seed=6, hit_prob=0.95))
    gen = torch.Generator().manual_seed(7)
    target = [torch.randn(batch, 2, 100 + nodes, 16, generator=gen).to(dtype) for _ in range(4)]
    draft, draft_rows = [], None
    if with_draft:  # the draft processed the nodes of depth < 3, in slot order
        depth = ops.tree_buffers(parents, 0)[0]
        fed = (depth < 3) & ((parents >= 0) | (torch.arange(nodes) == 0))
        draft_rows = torch.where(fed, fed.long().cumsum(1) - 1, -1)
        draft = [torch.randn(batch, 1, 40 + nodes, 16, generator=gen).to(dtype) for _ in range(2)]
    sequence = torch.zeros(batch, 10 + nodes, dtype=torch.int64)
    alpha = torch.rand(batch, generator=gen)
    args = [tokens, parents, accepted, accept_len, bonus, sequence, 5, target, 100, draft, draft_rows, 40, alpha]
    gpu_args = [[t.to(CUDA) for t in a] if isinstance(a, list) else a.to(CUDA) if isinstance(a, torch.Tensor) else a
                for a in args]
    cpu_out = ops.commit_tree_(*args)
    gpu_out = ops.commit_tree_(*gpu_args)
    assert_same_outputs([gpu_out, gpu_args[5], *gpu_args[7], *gpu_args[9]], [cpu_out, sequence, *target, *draft])


def test_bad_parents_on_cuda_become_padding():
    # node 3 claims parent 5 (not topological): CPU raises, CUDA treats node 3 as padding
    parents = torch.tensor([[-1, 0, 1, 5, 1, 0]])
    with pytest.raises((RuntimeError, ValueError), match="parents"):
        ops.tree_buffers(parents, 4)
    fixed = parents.clone()
    fixed[0, 3] = -1
    assert_same_outputs(ops.tree_buffers(parents.to(CUDA), 4), ops.tree_buffers(fixed, 4))


def test_device_mismatch_names_the_argument():
    tokens = torch.zeros(1, 3, dtype=torch.int64, device=CUDA)
    parents = torch.tensor([[-1, 0, 0]])
    with pytest.raises((RuntimeError, ValueError), match="parents"):
        ops.verify_greedy(tokens, parents, tokens)
    with pytest.raises((RuntimeError, ValueError), match="frontier_logprobs"):
        ops.sage_tree(torch.zeros(1, device=CUDA), torch.zeros(1, 1), 1, 4, 3, 8, 2, 10)
    with pytest.raises((RuntimeError, ValueError), match="caches"):
        ops.kv_compact_([torch.zeros(1, 1, 4, 2)], torch.tensor([[0]], device=CUDA), 0)


# --------------------------------------------------------------------------------------------
# no host-device synchronization, CUDA graphs
# --------------------------------------------------------------------------------------------
def run_every_op(paths, batch=2, vocab=32000):
    """Call every op once on CUDA tensors. Everything created here is made on the device directly
    (a host-to-device copy such as torch.tensor(..., device="cuda") syncs, so `paths` comes ready)."""
    dev = CUDA
    logits = torch.randn(batch, vocab, device=dev)
    alpha, topk_lp, topk_ids = ops.topk_confidence(logits, 10)
    ops.build_static_tree(paths)
    widths, min_cum, _ = ops.sage_tree(alpha, torch.zeros(batch, 1, device=dev), 1, 10, 3, 8, 2, 10)
    capacity = 33
    tokens = torch.zeros(batch, capacity, dtype=torch.int64, device=dev)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(batch, capacity, device=dev)
    cum = torch.zeros(batch, capacity, device=dev)
    frontier = torch.zeros(batch, 1, dtype=torch.int64, device=dev)
    ops.expand_tree(tokens, parents, logprobs, cum, frontier, topk_lp[:, None], topk_ids[:, None], widths, min_cum,
                    1, 10)
    ops.rerank_tree(parents, cum, 8)
    ops.tree_buffers(parents, 50, torch.bfloat16)
    target = torch.randn(batch, capacity, vocab, device=dev)
    ops.verify_greedy(tokens, parents, target)
    accepted, _, _ = ops.verify_greedy(tokens, parents, target.argmax(-1))
    probs = torch.softmax(target, -1)
    ops.verify_sampling(tokens, parents, probs, generator=torch.Generator(dev).manual_seed(0))
    ops.verify_sampling(tokens, parents, probs, generator=torch.Generator().manual_seed(0))  # CPU generator
    ops.verify_sampling(tokens, parents, probs, probs.flip(-1))
    ops.verify_traversal(tokens, parents, probs, generator=torch.Generator(dev).manual_seed(0))
    ops.verify_traversal(tokens, parents, probs, probs.flip(-1), generator=torch.Generator().manual_seed(0))
    caches = [torch.randn(batch, 2, 100, 16, device=dev) for _ in range(4)]
    ops.kv_compact_(caches, accepted, 50)
    mask = torch.zeros(batch, capacity, capacity, device=dev)
    ops.sage_level_(tokens, parents, logprobs, cum, mask, torch.randn(batch, 3, vocab, device=dev), None, 1, 2, 4, 12,
                    10, 1.0, 3, 8, 2, 10)
    accept_len = torch.zeros(batch, dtype=torch.int64, device=dev)
    accepted = torch.full((batch, capacity), -1, dtype=torch.int64, device=dev)
    accepted[:, 0] = 0
    ops.commit_tree_(tokens, parents, accepted, accept_len, accept_len, torch.zeros(batch, 64, dtype=torch.int64,
                     device=dev), 3, caches, 50, caches[:1], torch.zeros(batch, capacity, dtype=torch.int64,
                     device=dev), 10, alpha)
    return caches


def test_no_op_synchronizes_the_host():
    paths = ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS, device=CUDA)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_every_op(paths)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_tree_step_captures_into_a_cuda_graph():
    batch, vocab, capacity = 2, 1000, 17
    logits = torch.randn(batch, vocab, device=CUDA)
    target = torch.randn(batch, capacity, vocab, device=CUDA)

    def step():
        alpha, topk_lp, topk_ids = ops.topk_confidence(logits, 16)
        widths, min_cum, _ = ops.sage_tree(alpha, torch.zeros(batch, 1, device=CUDA), 1, 16, 3, 8, 2, 10)
        tokens = torch.zeros(batch, capacity, dtype=torch.int64, device=CUDA)
        parents = torch.full((batch, capacity), -1, dtype=torch.int64, device=CUDA)
        logprobs = torch.zeros(batch, capacity, device=CUDA)
        cum = torch.zeros(batch, capacity, device=CUDA)
        ops.expand_tree(tokens, parents, logprobs, cum, torch.zeros(batch, 1, dtype=torch.int64, device=CUDA),
                        topk_lp[:, None], topk_ids[:, None], widths, min_cum, 1, 16)
        buffers = ops.tree_buffers(parents, 5)
        return (tokens, parents, buffers[6]) + ops.verify_greedy(tokens, parents, target)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        expected = step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    fresh = step()
    torch.cuda.synchronize()
    assert_same_outputs(captured, fresh)
    assert expected[0].shape == captured[0].shape
