"""Does capturing the draft's forward with ``torch.compile`` make its per-level calls cheaper on this CPU?

SAGE spends most of a step in draft forwards, and a tiny draft's forward is mostly per-call framework overhead
(HF's Python modules), which is what graph capture removes. The draft's outputs do not affect losslessness (the
target verifies every token), so a compiled draft is safe; the question is only speed. Measured on the bundled
fixture pair (CPU, float32):

1. per call: the draft adapter's ``forward_tree`` (the engine's draft call: ``rows`` tree nodes on a 300-row
   cache), eager vs ``torch.compile(draft, dynamic=True)``, alternating (ABBA) over ``--rounds`` rounds, medians;
2. end to end: SAGE (paper defaults) tokens/s on ``--scenes`` held-out caption scenes x ``--max-new-tokens``,
   eager draft vs compiled draft, alternating, with the greedy outputs checked identical;
plus the one-time compile cost and how many graphs dynamo built (it stops compiling a frame after 8 and runs it
eager behind its guards from then on). Writes ``results/draft_compile_cpu.{json,md}``.

    python benchmarks/bench_draft_compile.py            # ~6 min on 2 cores (the first compile takes 1-2 min)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import DynamicCache  # noqa: E402

from sage_ext.cli.models import load_pair, scene_inputs  # noqa: E402
from sage_ext.cli.runs import cpu_model  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.fixtures import DRAFT_DIR, PAIRS, TARGET_DIR  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def with_compiled_draft(generator: SpeculativeGenerator, compiled: torch.nn.Module) -> SpeculativeGenerator:
    """The generator's draft adapter calling ``compiled`` (the compiled draft model) in ``forward_tree``."""
    adapter = generator.draft

    def forward_tree(self, tokens, seq_positions, mask_4d, cache):
        return compiled(input_ids=tokens, position_ids=self.rope_position_ids(seq_positions), attention_mask=mask_4d,
                        **{self.cache_kwarg: cache}, use_cache=True).logits

    adapter.forward_tree = types.MethodType(forward_tree, adapter)
    return generator


def per_call_us(adapter, forward, rows: int, past: int = 300, calls: int = 60) -> float:
    """Median time of one draft tree forward of ``rows`` nodes on a ``past``-row cache (the cache is cut back
    after each call, as the engine's commit does)."""
    cache = DynamicCache()
    with torch.inference_mode():
        adapter.model(input_ids=torch.randint(0, 200, (1, past)), **{adapter.cache_kwarg: cache}, use_cache=True)
        times = []
        for _ in range(calls):
            tokens = torch.randint(0, 200, (1, rows))
            positions = torch.arange(past, past + rows)[None]
            mask = torch.zeros(1, 1, rows, past + rows)
            start = time.perf_counter()
            forward(tokens, positions, mask, cache)
            times.append(time.perf_counter() - start)
            cache.crop(-rows)
    return 1e6 * statistics.median(times)


def sage_run(generator, prompts, max_new_tokens: int) -> tuple[float, list]:
    tokens, outputs, start = 0, [], time.perf_counter()
    for prompt in prompts:
        out = generator.generate(**prompt, max_new_tokens=max_new_tokens)
        tokens += out.stats.new_tokens
        outputs.append(out.sequences)
    return tokens / (time.perf_counter() - start), outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--scene-offset", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, draft, processor = load_pair(str(TARGET_DIR), str(DRAFT_DIR), torch.device("cpu"), torch.float32)
    pair = PAIRS["llava"]
    prompts = scene_inputs(processor, pair, pair.heldout_scenes(args.scenes, start=args.scene_offset),
                           torch.device("cpu"), None)
    eager = SpeculativeGenerator(target, draft, "sage")
    compiled_model = torch.compile(draft, dynamic=True)
    compiled = with_compiled_draft(SpeculativeGenerator(target, draft, "sage"), compiled_model)

    start = time.perf_counter()
    sage_run(compiled, prompts[:1], args.max_new_tokens)  # compiles (and recompiles once for dynamic shapes)
    sage_run(compiled, prompts[1:2], args.max_new_tokens)
    compile_seconds = time.perf_counter() - start

    rows_list = (1, 4, 16)
    calls = {"eager": {rows: [] for rows in rows_list}, "compiled": {rows: [] for rows in rows_list}}
    e2e = {"eager": [], "compiled": []}
    identical = True
    for round_index in range(args.rounds):
        order = ("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager")
        outputs = {}
        for name in order:
            generator = eager if name == "eager" else compiled
            for rows in rows_list:
                calls[name][rows].append(per_call_us(generator.draft, generator.draft.forward_tree, rows))
            tokens_per_second, outputs[name] = sage_run(generator, prompts, args.max_new_tokens)
            e2e[name].append(tokens_per_second)
        identical &= all(torch.equal(a, b) for a, b in zip(outputs["eager"], outputs["compiled"]))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {e2e[name][-1]:.1f} tok/s" for name in e2e), flush=True)

    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    report = {
        "dynamo_graphs": graphs,
        "machine": cpu_model(), "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds,
        "scenes": args.scenes, "scene_offset": args.scene_offset, "max_new_tokens": args.max_new_tokens,
        "compile_and_first_two_generations_seconds": compile_seconds,
        "per_call_us": {name: {rows: statistics.median(values) for rows, values in by_rows.items()}
                        for name, by_rows in calls.items()},
        "sage_tokens_per_second": {name: statistics.median(values) for name, values in e2e.items()},
        "samples": {"per_call_us": calls, "sage_tokens_per_second": e2e},
        "outputs_identical": identical,
        "command": "python benchmarks/bench_draft_compile.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    per_call, tps = report["per_call_us"], report["sage_tokens_per_second"]
    lines = [
        "# Draft forward under torch.compile (CPU)", "",
        f"{report['machine']}, {args.threads} threads, torch {torch.__version__}; fixture pair, float32; "
        f"{args.rounds} alternating rounds, medians. `{report['command']}`.", "",
        "| draft tree forward (300-row cache) | eager µs/call | compiled µs/call | compiled / eager |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {rows} node(s) | {per_call['eager'][rows]:.0f} | {per_call['compiled'][rows]:.0f} | "
          f"{per_call['compiled'][rows] / per_call['eager'][rows]:.2f} |" for rows in rows_list],
        "",
        f"SAGE end to end ({args.scenes} held-out scenes x {args.max_new_tokens} new tokens): eager draft "
        f"{tps['eager']:.1f} tokens/s, compiled draft {tps['compiled']:.1f} tokens/s "
        f"({tps['compiled'] / tps['eager']:.2f}x); greedy outputs identical: {identical}. One-time cost: "
        f"{compile_seconds:.0f} s for the compile and the first two generations (eager: about "
        f"{2 * args.max_new_tokens / tps['eager']:.0f} s). Dynamo built {graphs} graphs of the draft's forward (8 is "
        f"its limit per frame; past it the frame runs eager behind its guards, slower than plain eager).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "draft_compile_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "draft_compile_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
