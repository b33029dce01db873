"""Does capturing the draft's tree forwards (``SpeculativeGenerator(capture_draft=True)``) make decoding faster?

SAGE spends most of a step in draft forwards, one per tree level, and a tiny draft's forward is mostly per-call
framework overhead (HF's Python modules), which graph capture removes. The engine's captured draft
(``sage_ext.engine.capture``: ``torch.compile`` with static shapes: a static draft cache and row counts padded to
powers of two) is measured against the eager draft on the bundled fixture pair (CPU, float32), per policy:
end-to-end tokens/s over ``--scenes`` held-out scenes, eager and captured taking turns (ABBA) over ``--rounds``
rounds (medians), the greedy outputs checked identical to each other; the draft's seconds per forward (the
engine's ``draft_decode`` time over its draft forwards); the one-time compile (a warm-up generation per policy,
every captured shape); and how many graphs dynamo built. Writes ``results/draft_compile_cpu.{json,md}``.

    python benchmarks/bench_draft_compile.py            # ~5 min on 2 cores (compiles take ~1 min of it)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_ext.cli.models import load_pair, scene_inputs  # noqa: E402
from sage_ext.cli.runs import cpu_model  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.fixtures import PAIRS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ("chain", "static", "dynamic", "sage", "sage_cost")


def run(generator: SpeculativeGenerator, prompts: list[dict], max_new_tokens: int) -> dict:
    """One pass over the prompts: tokens/s, the draft's seconds per forward, the outputs."""
    tokens, draft_seconds, draft_forwards, outputs = 0, 0.0, 0, []
    start = time.perf_counter()
    for prompt in prompts:
        out = generator.generate(**prompt, max_new_tokens=max_new_tokens)
        tokens += out.stats.new_tokens
        draft_seconds += out.stats.time["draft_decode"]
        draft_forwards += sum(step.draft_forwards for step in out.stats.steps)
        outputs.append(out.sequences)
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens / seconds, "draft_us_per_forward": 1e6 * draft_seconds / draft_forwards,
            "outputs": outputs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--scene-offset", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = PAIRS["llava"]
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), torch.device("cpu"),
                                         torch.float32)
    prompts = scene_inputs(processor, pair, pair.heldout_scenes(args.scenes, start=args.scene_offset),
                           torch.device("cpu"), None)
    warm_prompt = scene_inputs(processor, pair, pair.heldout_scenes(1, start=args.scene_offset + 5000),
                               torch.device("cpu"), None)
    generators = {(policy, mode): SpeculativeGenerator(target, draft, policy, capture_draft=mode == "captured")
                  for policy in args.policies for mode in ("eager", "captured")}
    warm_seconds = {}
    for (policy, mode), generator in generators.items():  # warm-up: the captured ones compile every shape here
        start = time.perf_counter()
        run(generator, warm_prompt, args.max_new_tokens)
        warm_seconds[f"{policy}/{mode}"] = time.perf_counter() - start

    samples = {policy: {"eager": [], "captured": []} for policy in args.policies}
    identical = {policy: True for policy in args.policies}
    for round_index in range(args.rounds):
        order = ("eager", "captured") if round_index % 2 == 0 else ("captured", "eager")
        for policy in args.policies:
            outputs = {}
            for mode in order:
                result = run(generators[(policy, mode)], prompts, args.max_new_tokens)
                outputs[mode] = result.pop("outputs")
                samples[policy][mode].append(result)
            identical[policy] &= all(torch.equal(a, b) for a, b in zip(outputs["eager"], outputs["captured"]))
        print(f"round {round_index + 1}: " + ", ".join(
            f"{policy} {samples[policy]['captured'][-1]['tokens_per_second'] / samples[policy]['eager'][-1]['tokens_per_second']:.2f}x"
            for policy in args.policies), flush=True)

    from torch._dynamo.utils import counters

    def median(policy: str, mode: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[policy][mode])

    summary = {policy: {mode: {key: median(policy, mode, key) for key in ("tokens_per_second", "draft_us_per_forward")}
                        for mode in ("eager", "captured")} for policy in args.policies}
    report = {
        "machine": cpu_model(), "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds,
        "scenes": args.scenes, "scene_offset": args.scene_offset, "max_new_tokens": args.max_new_tokens,
        "dynamo_graphs": int(counters["stats"]["unique_graphs"]), "warm_up_seconds": warm_seconds,
        "summary": summary, "samples": samples, "outputs_identical": identical,
        "command": "python benchmarks/bench_draft_compile.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    lines = [
        "# Captured draft forwards (`capture_draft=True`) against the eager draft (CPU)", "",
        f"{report['machine']}, {args.threads} threads, torch {torch.__version__}; fixture LLaVA pair, float32, "
        f"{args.scenes} held-out scenes from {args.scene_offset} x {args.max_new_tokens} new tokens, greedy; "
        f"{args.rounds} alternating rounds (ABBA), medians. `{report['command'].strip()}`.", "",
        "| policy | eager tokens/s | captured tokens/s | captured / eager | draft µs / forward, eager | "
        "draft µs / forward, captured | outputs identical | warm-up s, eager / captured |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for policy, modes in summary.items():
        eager, captured = modes["eager"], modes["captured"]
        lines.append(
            f"| {policy} | {eager['tokens_per_second']:.1f} | {captured['tokens_per_second']:.1f} | "
            f"{captured['tokens_per_second'] / eager['tokens_per_second']:.2f}x | {eager['draft_us_per_forward']:.0f} | "
            f"{captured['draft_us_per_forward']:.0f} | {identical[policy]} | "
            f"{warm_seconds[f'{policy}/eager']:.1f} / {warm_seconds[f'{policy}/captured']:.1f} |")
    lines += ["", f"Dynamo built {report['dynamo_graphs']} graphs in all (one per policy's padded row count; "
              "the warm-up's captured time includes their compiles, which inductor caches on disk for later "
              "processes)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "draft_compile_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "draft_compile_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
