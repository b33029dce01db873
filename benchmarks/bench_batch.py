"""Throughput against batch size: batched speculative decoding (every row its own tree) vs batched greedy decoding.

    python benchmarks/bench_batch.py                       # bundled LLaVA pair, CPU, 2 threads, B = 1, 2, 4, 8
    python benchmarks/bench_batch.py --batch-sizes 1,4 --rounds 1 --scenes 8   # a quicker look

For each batch size B the held-out scenes are captioned B at a time (one processor batch per group, left padding);
every method decodes the same groups: ``hf`` is ``target.generate`` on the batch (greedy, HF's own batching), the
rest are ``SpeculativeGenerator`` policies (``ar``: the engine without a draft). Methods are interleaved per group
and round (the machine is shared: one method's slow moment is not another's), and tokens/s is the rows' new tokens
(each row up to its EOS) over the wall time of the group's call. Every policy's rows are checked token-identical to
the engine's ``ar`` rows (each row decoded as it would be alone); ``hf`` batched rows are compared too and their
mismatches reported (HF pads prompts of different lengths, which may round a near-tie differently; with the
bundled pair's equal-length prompts there is no padding).

A method ``policy@N`` runs the policy with ``batch_node_budget=N`` (``policy@none``: no budget; a bare policy
name: the default budget), to see where a batch's node budget pays; ``policy[key=value,...]`` passes the policy
arguments (``sage_cost[width_from_cost=False]``):

    python benchmarks/bench_batch.py --methods hf,sage@none,sage@64,sage,sage@256 --scene-offset 300

Writes ``results/batch_<machine>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sage_ext import SpeculativeGenerator  # noqa: E402
from sage_ext.cli.bench import slug  # noqa: E402
from sage_ext.cli.models import load_pair  # noqa: E402
from sage_ext.cli.runs import machine_name  # noqa: E402
from sage_ext.cli.validation import parse_policy  # noqa: E402
from sage_ext.fixtures import PAIRS  # noqa: E402

METHODS = ["hf", "ar", "chain", "static", "dynamic", "sage", "sage_cost"]


def engine_for(method: str, target, draft) -> SpeculativeGenerator:
    """``policy``, ``policy@N`` (``batch_node_budget=N``, ``none`` for no budget) and ``policy[key=value,...]`` (the
    policy's arguments as ``--policy-args`` takes them, Python literals: ``sage_cost[width_from_cost=False]``)."""
    spec, _, budget = method.partition("@")
    name, _, arguments = spec.partition("[")
    kwargs = {} if not budget else {"batch_node_budget": None if budget == "none" else int(budget)}
    policy = parse_policy(name, arguments.rstrip("]")) if arguments else name
    return SpeculativeGenerator(target, draft if name != "ar" else None, policy, **kwargs)


def group_inputs(processor, pair, scenes: list, batch_size: int) -> list[dict]:
    """The scenes' benchmark prompts, ``batch_size`` per processor batch (left padding, as for ``generate``)."""
    prompt = pair.prompt_text(processor)
    groups = []
    for start in range(0, len(scenes) - batch_size + 1, batch_size):
        chunk = scenes[start: start + batch_size]
        groups.append(dict(processor(text=[prompt] * len(chunk), images=[scene.render() for scene in chunk],
                                     return_tensors="pt", padding=True, padding_side="left")))
    return groups


def new_rows(sequences: torch.Tensor, prompt_len: int, eos_ids: set[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS (what follows is padding)."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        rows.append(row[:end])
    return rows


def run(method: str, engines: dict, target, inputs: dict, max_new_tokens: int, eos_ids: set[int]):
    """(seconds, rows' new tokens) of one call."""
    start = time.perf_counter()
    if method == "hf":
        with torch.inference_mode():
            sequences = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        sequences = engines[method].generate(**inputs, max_new_tokens=max_new_tokens).sequences
    seconds = time.perf_counter() - start
    return seconds, new_rows(sequences, inputs["input_ids"].shape[1], eos_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="llava", choices=sorted(PAIRS))
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--scenes", type=int, default=16, help="held-out scenes captioned at every batch size")
    parser.add_argument("--scene-offset", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=None, help="output file stem (default batch_<machine>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    methods = args.methods.split(",")
    pair = PAIRS[args.pair]
    device = torch.device("cpu")
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), device, torch.float32)
    engines = {name: engine_for(name, target, draft) for name in methods if name != "hf"}
    eos_ids = set(engines.get("ar", next(iter(engines.values()))).target.eos_token_ids())
    scenes = pair.heldout_scenes(args.scenes, start=args.scene_offset)
    # warm-up: one call of every method on a small batch (first-call allocations, lazy inits)
    warm = group_inputs(processor, pair, scenes[:2], 2)[0]
    for method in methods:
        run(method, engines, target, warm, 8, eos_ids)

    results: dict[str, dict] = {}
    for batch_size in batch_sizes:
        groups = group_inputs(processor, pair, scenes, batch_size)
        seconds = {method: [] for method in methods}
        tokens = {method: 0 for method in methods}
        rows: dict[str, list] = {method: [] for method in methods}
        for round_index in range(args.rounds):
            for index, inputs in enumerate(groups):
                order = methods[index % len(methods):] + methods[: index % len(methods)]  # rotate who goes first
                for method in order:
                    took, new = run(method, engines, target, inputs, args.max_new_tokens, eos_ids)
                    seconds[method].append(took)
                    if round_index == 0:
                        tokens[method] += sum(len(row) for row in new)
                        rows[method] += new
        reference = rows.get("ar")
        entry = {}
        for method in methods:
            per_round = sum(seconds[method]) / args.rounds
            entry[method] = {
                "tokens_per_second": round(tokens[method] / per_round, 2),
                "seconds_per_round": round(per_round, 3),
                "new_tokens": tokens[method],
                "rows_differing_from_ar": None if reference is None else sum(
                    a != b for a, b in zip(rows[method], reference)),
            }
        base = entry.get("hf", {}).get("tokens_per_second")
        for method in methods:
            entry[method]["vs_hf"] = round(entry[method]["tokens_per_second"] / base, 3) if base else None
        results[str(batch_size)] = entry
        print(f"B={batch_size}: " + ", ".join(f"{m} {entry[m]['tokens_per_second']:.1f} tok/s" for m in methods),
              flush=True)
        for method in methods:
            if method != "hf" and entry[method]["rows_differing_from_ar"]:
                raise SystemExit(f"{method} at B={batch_size}: rows differ from ar (lossless greedy broken)")

    machine = machine_name(device)
    name = args.name or f"batch_{slug(machine)}"
    command = "python benchmarks/bench_batch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"machine": machine, "platform": platform.platform(), "torch": torch.__version__,
              "threads": args.threads, "pair": args.pair, "scenes": args.scenes, "scene_offset": args.scene_offset,
              "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "command": command.strip(),
              "results": results}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(report))
    plot(report, args.out_dir / f"{name}.png")
    print(f"wrote {args.out_dir / name}.{{json,md,png}}")
    return 0


def markdown(report: dict) -> str:
    results = report["results"]
    methods = list(next(iter(results.values())))
    lines = [f"# Batched decoding throughput, {report['pair']} pair ({report['machine']}, {report['threads']} threads)",
             "", f"`{report['command']}`", "",
             f"{report['scenes']} held-out scenes (from {report['scene_offset']}), {report['max_new_tokens']} new "
             f"tokens max, {report['rounds']} interleaved round(s); tokens/s = the rows' new tokens (to EOS) over the "
             f"wall time; every engine row identical to `ar` (each row as decoded alone). `hf` = "
             f"`target.generate` on the batch.", "",
             "| B | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for batch_size, entry in results.items():
        cells = [f"{entry[m]['tokens_per_second']:.1f} ({entry[m]['vs_hf']:.2f}x)" if entry[m]["vs_hf"] else
                 f"{entry[m]['tokens_per_second']:.1f}" for m in methods]
        lines.append(f"| {batch_size} | " + " | ".join(cells) + " |")
    lines += ["", "tokens/s (ratio to `hf` at the same batch size)."]
    if "hf" in methods:
        differing = {b: e["hf"]["rows_differing_from_ar"] for b, e in results.items() if e["hf"]["rows_differing_from_ar"]}
        lines.append(f"`hf` batched rows differing from the rows alone: {differing or 'none'}.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    sizes = [int(b) for b in results]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in next(iter(results.values())):
        ax.plot(sizes, [results[str(b)][method]["tokens_per_second"] for b in sizes], marker="o", label=method,
                linestyle="--" if method in ("hf", "ar") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("new tokens / s")
    ax.set_title(f"{report['pair']} pair, {report['machine']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
