"""Per-op latency of the sage_ext extension against the plain-PyTorch reference (sage_ext.reference).

Every op of docs/OPS.md is timed at batch B in {1, 8}, tree size N in {16, 64, 128} and vocabulary
V in {32000, 152064} (only the sizes an op depends on), plus the per-step bundle of a SAGE round
(topk_confidence on [B, V], the level-by-level SAGE build of N nodes with sage_tree + expand_tree,
tree_buffers, verify_greedy on the target's logits) at B=1, N=64, V=152064.

On CPU the table reports both latencies and the speed-up (reference / extension). On CUDA the
extension is timed with CUDA events under torch.cuda.set_sync_debug_mode("error"), so any
host-device sync inside an op aborts the run; the reference (which reads data back on purpose)
is timed on CPU tensors for the ratio. A CUDA run times each op twice: one call as the engine
makes it (from the Python call to the end of its last kernel: the host's launch work included),
and the GPU time alone (20 calls captured in one CUDA graph and replayed, per call). The
"launch floor" row is one trivial torch kernel timed both ways: what the host costs any op.

Usage:
    python benchmarks/bench_ops.py                 # CPU, full grid (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --device cuda   # GPU
    python benchmarks/bench_ops.py --quick         # fewer sizes and repeats (smoke run)
    python benchmarks/bench_ops.py --device cuda --point --out-dir DIR   # B=1, N=64, V=152064 only
Writes benchmarks/results/ops_<device-name>.json and .md (or into --out-dir).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import sage_ext
from sage_ext import ops, reference
from sage_ext.cli.runs import cpu_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8)
TREE_SIZES = (16, 64, 128)
VOCABS = (32000, 152064)
TOP_K = 10
PAST_LEN = 1024
SAGE = dict(d_min=3, d_max=8, w_min=2, w_max=10)


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-" + cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def time_cpu(fn, min_seconds: float, max_reps: int) -> float:
    """Median wall time of fn() in microseconds, after one warm-up call."""
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def time_cuda(fn, min_seconds: float, max_reps: int) -> float:
    """Median CUDA-event time of fn() in microseconds; any host-device sync inside fn raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()  # warm-up
        events = []
        for _ in range(max(3, max_reps)):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            events.append((begin, end))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in events) * 1e3


def time_cuda_graph(fn, generators=(), calls: int = 20, replays: int = 10) -> float | None:
    """GPU time of one fn() in microseconds, the host out of the way: ``calls`` calls captured in one CUDA graph
    (``generators``: the CUDA generators fn draws from, registered with the graph) and replayed, the median replay
    over ``calls``. None, with the reason printed, when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (lazy initialisation, the allocator's first blocks)
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            register = getattr(graph, "register_generator_state", None)  # torch 2.4 and later
            if register is None:
                raise RuntimeError("this torch cannot capture a user-supplied generator")
            register(generator)
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        samples = []
        for _ in range(replays):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        return statistics.median(samples) * 1e3 / calls
    except RuntimeError as error:  # an op (or this torch) that cannot be captured: the table says "-"
        print(f"  (not timed in a CUDA graph: {str(error).splitlines()[0]})", flush=True)
        return None


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def random_tree(batch: int, num_nodes: int, seed: int) -> torch.Tensor:
    """Bushy random trees without padding (each node under a random earlier node, biased to recent ones)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row = [-1]
        for i in range(1, num_nodes):
            row.append(rng.randrange(max(0, i - 8), i) if rng.random() < 0.6 else rng.randrange(i))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def walkable_target(tokens: torch.Tensor, parents: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """A target argmax [B, N] that follows a child at 80% of the nodes, so verification walks deep."""
    rng = random.Random(seed)
    argmax = torch.randint(0, vocab, tokens.shape, generator=torch.Generator().manual_seed(seed))
    for b in range(tokens.shape[0]):
        children = [[] for _ in range(tokens.shape[1])]
        for i, p in enumerate(parents[b].tolist()):
            if p >= 0:
                children[p].append(i)
        for u, kids in enumerate(children):
            if kids and rng.random() < 0.8:
                argmax[b, u] = tokens[b, rng.choice(kids)]
    return argmax


def tree_inputs(batch, num_nodes, vocab, seed=0):
    parents = random_tree(batch, num_nodes, seed)
    tokens = torch.randint(0, vocab, parents.shape, generator=torch.Generator().manual_seed(seed + 1))
    return tokens, parents, walkable_target(tokens, parents, vocab, seed + 2)


def target_logits(argmax: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    logits = torch.randn(*argmax.shape, vocab, generator=torch.Generator().manual_seed(seed))
    return logits.scatter_(-1, argmax[..., None], 20.0)


def expand_inputs(batch, num_nodes, seed=0):
    """One deep SAGE level: F = N/4 frontier nodes, each proposing its top-10, into N/2 slots."""
    gen = torch.Generator().manual_seed(seed)
    capacity = num_nodes
    slot_start = num_nodes // 2
    num_frontier = max(1, num_nodes // 4)
    state = (torch.randint(0, 1000, (batch, capacity), generator=gen), random_tree(batch, capacity, seed),
             torch.log(torch.rand(batch, capacity, generator=gen)), -torch.rand(batch, capacity, generator=gen) * 3)
    frontier = torch.randint(0, slot_start, (batch, num_frontier), generator=gen)
    topk_lp = torch.log_softmax(torch.randn(batch, num_frontier, 100, generator=gen) * 2, -1).topk(TOP_K).values
    topk_ids = torch.randint(0, 32000, (batch, num_frontier, TOP_K), generator=gen)
    widths = torch.randint(1, TOP_K + 1, (batch, num_frontier), generator=gen)
    min_cum = torch.full((batch,), -6.0)
    return (*state, frontier, topk_lp, topk_ids, widths, min_cum, slot_start, capacity - slot_start)


def sage_level_inputs(batch, num_nodes, vocab, seed=0):
    """A level-2 SAGE step: F = N/4 frontier nodes in slots [1, F + 1) under the root, their draft logits
    [B, F, V], into the slots after them, with the draft's tree mask."""
    gen = torch.Generator().manual_seed(seed)
    capacity = num_nodes + 1
    num_frontier = max(1, num_nodes // 4)
    tokens = torch.zeros(batch, capacity, dtype=torch.int64)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64)
    parents[:, 1:num_frontier + 1] = 0
    logprobs = torch.zeros(batch, capacity)
    logprobs[:, 1:num_frontier + 1] = torch.log(torch.rand(batch, num_frontier, generator=gen))
    cum = logprobs.clone()
    mask = torch.full((batch, capacity + 1, capacity), torch.finfo(torch.float32).min)
    mask[:, : num_frontier + 1, 0] = 0
    mask[:, torch.arange(num_frontier + 1), torch.arange(num_frontier + 1)] = 0
    logits = torch.randn(batch, num_frontier, vocab, generator=gen) * 3
    slot_start = num_frontier + 1
    return (tokens, parents, logprobs, cum, mask, logits, torch.rand(batch, generator=gen), 1, 2, slot_start,
            capacity - slot_start, TOP_K, 1.0, *SAGE.values())


def commit_inputs(batch, num_nodes, seed=0):
    """A verified tree, the target's KV caches (8 x [B, 4, 1024 + N, 128] bf16) and the draft's (4 x
    [B, 2, 512 + N, 64] bf16, holding the nodes of depth < 3)."""
    tokens, parents, argmax = tree_inputs(batch, num_nodes, 32000, seed)
    accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, argmax)
    depth = ops.tree_buffers(parents, 0)[0]
    fed = (depth < 3) & ((parents >= 0) | (torch.arange(num_nodes) == 0))
    draft_rows = torch.where(fed, fed.long().cumsum(1) - 1, -1)
    gen = torch.Generator().manual_seed(seed)
    target = [torch.randn(batch, 4, PAST_LEN + num_nodes, 128, generator=gen).to(torch.bfloat16) for _ in range(8)]
    draft = [torch.randn(batch, 2, 512 + num_nodes, 64, generator=gen).to(torch.bfloat16) for _ in range(4)]
    sequence = torch.zeros(batch, PAST_LEN + 2 * num_nodes, dtype=torch.int64)
    return (tokens, parents, accepted, accept_len, bonus, sequence, PAST_LEN, target, PAST_LEN, draft, draft_rows,
            512, torch.rand(batch, generator=gen))


# --------------------------------------------------------------------------------------------
# the per-step bundle
# --------------------------------------------------------------------------------------------
def sage_round(impl, root_logits, proposals, target, budget):
    """One SAGE round with `impl` (ops or reference): confidence of the root, the level-by-level
    build of `budget` draft nodes (proposals[level] = the draft's top-k of every node, as the
    draft forward of that level would give), the tree buffers and greedy verification."""
    batch = root_logits.shape[0]
    device = root_logits.device
    capacity = budget + 1
    alpha, root_lp, root_ids = impl.topk_confidence(root_logits, TOP_K)
    tokens = torch.zeros(batch, capacity, dtype=torch.int64, device=device)
    parents = torch.full((batch, capacity), -1, dtype=torch.int64, device=device)
    logprobs = torch.zeros(batch, capacity, device=device)
    cum = torch.zeros(batch, capacity, device=device)
    frontier = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    frontier_lp = torch.zeros(batch, 1, device=device)
    topk_lp, topk_ids = root_lp[:, None], root_ids[:, None]
    slot, level = 1, 1
    while slot < capacity and level <= SAGE["d_max"]:
        widths, min_cum, _ = impl.sage_tree(alpha, frontier_lp, level, TOP_K, **SAGE)
        num_slots = min(capacity - slot, frontier.shape[1] * TOP_K)
        impl.expand_tree(tokens, parents, logprobs, cum, frontier, topk_lp, topk_ids, widths, min_cum, slot, num_slots)
        frontier = torch.arange(slot, slot + num_slots, device=device).expand(batch, -1)
        frontier_lp = logprobs[:, slot:slot + num_slots]
        topk_lp, topk_ids = proposals[0][:, slot:slot + num_slots], proposals[1][:, slot:slot + num_slots]
        slot += num_slots
        level += 1
    buffers = impl.tree_buffers(parents, PAST_LEN)
    return buffers, impl.verify_greedy(tokens, parents, target)


def bundle_inputs(batch, budget, vocab, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    root_logits = torch.randn(batch, vocab, generator=gen) * 2
    # the draft's top-k after every slot: a peaked distribution so several levels pass the threshold
    topk_lp = torch.log_softmax(torch.randn(batch, budget + 1, 64, generator=gen) * 3, -1).topk(TOP_K).values
    topk_ids = torch.randint(0, vocab, (batch, budget + 1, TOP_K), generator=gen)
    target = torch.randn(batch, budget + 1, vocab, generator=gen)
    return [t.to(device) for t in (root_logits, topk_lp, topk_ids, target)]


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------
#: ``--point``: the one configuration of a decoding step (and of the per-step bundle)
POINT = dict(B=1, N=64, V=152064)


def cases(quick: bool, point: bool = False):
    """(op, sizes, make_args) for every timed configuration; make_args() -> argument tuple."""
    batches = BATCHES
    tree_sizes = (16, 64) if quick else TREE_SIZES
    vocabs = (32000,) if quick else VOCABS
    if point:
        batches, tree_sizes, vocabs = (POINT["B"],), (POINT["N"],), (POINT["V"],)
    static_paths = ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS)
    out = []
    for b in batches:
        for v in vocabs:
            out.append(("topk_confidence", dict(B=b, V=v),
                        lambda b=b, v=v: (torch.randn(b, v, generator=torch.Generator().manual_seed(0)), TOP_K)))
    out.append(("build_static_tree", dict(N=26), lambda: (static_paths,)))
    for b in batches:
        for n in tree_sizes:
            out.append(("sage_tree", dict(B=b, N=n), lambda b=b, n=n: (
                torch.rand(b), torch.log(torch.rand(b, n, generator=torch.Generator().manual_seed(0))), 3, TOP_K,
                *SAGE.values())))
            out.append(("expand_tree", dict(B=b, N=n), lambda b=b, n=n: expand_inputs(b, n)))
            out.append(("rerank_tree", dict(B=b, N=n), lambda b=b, n=n: (
                random_tree(b, n, 0), -torch.rand(b, n, generator=torch.Generator().manual_seed(0)) * 6, n // 2)))
            out.append(("tree_buffers", dict(B=b, N=n), lambda b=b, n=n: (random_tree(b, n, 0), PAST_LEN)))
            out.append(("verify_greedy[argmax]", dict(B=b, N=n), lambda b=b, n=n: tree_inputs(b, n, 32000)))
            for v in vocabs:
                out.append(("verify_greedy[logits]", dict(B=b, N=n, V=v), lambda b=b, n=n, v=v: (
                    lambda t, p, a: (t, p, target_logits(a, v, 3)))(*tree_inputs(b, n, v))))
                out.append(("verify_sampling[q=1]", dict(B=b, N=n, V=v), lambda b=b, n=n, v=v: (
                    lambda t, p, a: (t, p, torch.softmax(target_logits(a, v, 3), -1)))(*tree_inputs(b, n, v))))
                out.append(("verify_sampling[q]", dict(B=b, N=n, V=v), lambda b=b, n=n, v=v: (
                    lambda t, p, a: (t, p, *(lambda probs: (probs, probs.roll(1, -1)))(
                        torch.softmax(target_logits(a, v, 3), -1))))(*tree_inputs(b, n, v))))
            for v in vocabs:
                out.append(("sage_level_", dict(B=b, N=n, V=v), lambda b=b, n=n, v=v: sage_level_inputs(b, n, v)))
            out.append(("commit_tree_", dict(B=b, N=n), lambda b=b, n=n: commit_inputs(b, n)))
            out.append(("kv_compact_", dict(B=b, N=n), lambda b=b, n=n: (
                [torch.randn(b, 4, PAST_LEN + n, 128, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
                 for i in range(8)],
                ops.verify_greedy(*tree_inputs(b, n, 32000))[0], PAST_LEN)))
    return out


def op_callable(impl, name, device):
    """(the op of ``impl`` as a callable, the generators it draws from): a sampling op's generator is made once,
    outside the timed calls."""
    base = name.split("[")[0]
    fn = getattr(impl, base)
    if base == "verify_sampling":
        generator = torch.Generator(device).manual_seed(0)
        return (lambda *a: fn(*a, generator=generator)), (generator,)
    return fn, ()


def launch_floor_args():
    """The "launch floor" row's input: one trivial kernel (an add over 64 numbers) into a preallocated output."""
    return (torch.zeros(64), torch.empty(64))


def launch_floor(values, out):
    return torch.add(values, 1, out=out)


def to_device(args, device):
    return tuple([t.to(device) for t in a] if isinstance(a, list) else a.to(device) if isinstance(a, torch.Tensor)
                 else a for a in args)


def timed_row(op, sizes, ext_call, ref_call, device, min_seconds, ref_reps, generators=(), max_reps=200):
    """One table row: ``ext_call`` on ``device`` (and, on CUDA, in a CUDA graph), ``ref_call`` on the CPU."""
    timer = time_cuda if device.type == "cuda" else time_cpu
    ext_us = timer(ext_call, min_seconds, max_reps)
    graph_us = time_cuda_graph(ext_call, generators) if device.type == "cuda" else None
    ref_us = time_cpu(ref_call, min_seconds / 2, ref_reps)
    row = dict(op=op, **{k: sizes.get(k) for k in ("B", "N", "V")}, ext_us=ext_us, graph_us=graph_us, ref_us=ref_us,
               speedup=ref_us / ext_us)
    print_row(row)
    return row


def run(device: torch.device, quick: bool, point: bool = False):
    min_seconds = 0.05 if quick else 0.2
    ref_reps = 3 if quick else 10
    floor_args = launch_floor_args()
    floor_ext = to_device(floor_args, device)
    rows = [timed_row("launch floor", {}, lambda: launch_floor(*floor_ext), lambda: launch_floor(*floor_args), device,
                      min_seconds, ref_reps)]
    for name, sizes, make_args in cases(quick, point):
        args = make_args()
        ext_args = to_device(args, device)
        ext_fn, generators = op_callable(ops, name, device)
        ref_fn, _ = op_callable(reference, name, torch.device("cpu"))
        rows.append(timed_row(name, sizes, lambda: ext_fn(*ext_args), lambda: ref_fn(*args), device, min_seconds,
                              ref_reps, generators))
        del args, ext_args

    batch, budget, vocab = 1, 64, 152064
    ref_inputs = bundle_inputs(batch, budget, vocab, torch.device("cpu"))
    ext_inputs = [t.to(device) for t in ref_inputs]
    rows.append(timed_row("per-step bundle", dict(B=batch, N=budget, V=vocab),
                          lambda: sage_round(ops, ext_inputs[0], ext_inputs[1:3], ext_inputs[3], budget),
                          lambda: sage_round(reference, ref_inputs[0], ref_inputs[1:3], ref_inputs[3], budget),
                          device, min_seconds, 10, max_reps=100))
    (_, ext_verify), (_, ref_verify) = (sage_round(ops, ext_inputs[0], ext_inputs[1:3], ext_inputs[3], budget),
                                        sage_round(reference, ref_inputs[0], ref_inputs[1:3], ref_inputs[3], budget))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ext_verify, ref_verify)), "bundle results differ"
    return rows


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
HEADER = (f"{'op':<24}{'B':>3}{'N':>5}{'V':>8}{'extension us':>15}{'in graph us':>13}{'reference us':>15}"
          f"{'speed-up':>10}")


def fmt(value):
    return "-" if value is None else str(value)


def print_row(row):
    graph = "-" if row["graph_us"] is None else f"{row['graph_us']:.1f}"
    print(f"{row['op']:<24}{fmt(row['B']):>3}{fmt(row['N']):>5}{fmt(row['V']):>8}{row['ext_us']:>15.1f}{graph:>13}"
          f"{row['ref_us']:>15.1f}{row['speedup']:>9.1f}x", flush=True)


def machine_info(device: torch.device) -> dict:
    info = dict(device=str(device), device_name=device_name(device), cpu=cpu_model(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                sage_ext=getattr(sage_ext, "__version__", "dev"), extension_cuda=ops.cuda_available(),
                load_average_at_start=[round(x, 2) for x in os.getloadavg()])
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_results(rows, info, quick, out_dir=RESULTS_DIR):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"ops_{info['device_name']}"
    payload = dict(machine=info, quick=quick, unit="microseconds (median)",
                   note="speedup = reference / extension; reference = sage_ext.reference on CPU tensors",
                   results=rows)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# sage_ext op latency on {info.get('gpu', info['cpu'])}",
        "",
        f"torch {info['torch']}, {info['torch_threads']} torch threads, {info['cpu_count']} CPUs "
        f"({info['cpu']}, load average {info['load_average_at_start'][0]} at start); extension on "
        f"`{info['device']}`, reference (sage_ext.reference) on CPU. "
        "Median microseconds; speed-up = reference / extension." + (" Quick run." if quick else ""),
    ]
    cuda = info["device"].startswith("cuda")
    if cuda:
        lines += ["", "extension: one call as the engine makes it, from the Python call to the end of its last kernel "
                  "(CUDA events; the host's launch work included); in a CUDA graph: the GPU time of one call (20 calls "
                  "captured in one graph, replayed); launch floor: one trivial torch kernel (an add of 64 numbers)."]
    lines += ["", "| op | B | N | V | extension (us) |" + (" in a CUDA graph (us) |" if cuda else "")
              + " reference (us) | speed-up |",
              "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else "") + " ---: | ---: |"]
    for r in rows:
        graph = "" if not cuda else " - |" if r["graph_us"] is None else f" {r['graph_us']:.1f} |"
        lines.append(f"| {r['op']} | {fmt(r['B'])} | {fmt(r['N'])} | {fmt(r['V'])} | {r['ext_us']:.1f} |{graph} "
                     f"{r['ref_us']:.1f} | {r['speedup']:.1f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads for both sides (default: torch's default); 1 gives steadier "
                             "numbers on a loaded machine")
    parser.add_argument("--point", action="store_true",
                        help="only B=1, N=64, V=152064 (one decoding step's sizes) and the per-step bundle")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR),
                        help="folder for ops_<device-name>.json and .md (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and ops.cuda_available()):
        sys.exit("--device cuda needs a GPU and sage_ext built with CUDA kernels")
    info = machine_info(device)
    print(f"{info.get('gpu', info['cpu'])} | torch {info['torch']} | {info['torch_threads']} threads")
    print(HEADER)
    rows = run(device, args.quick, args.point)
    stem = write_results(rows, info, args.quick, args.out_dir)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
