"""Which tree is fastest as a draft forward gets dearer against a verify? A simulated-cost study on the real pair.

Acceptance is real: a bundled fixture pair (``--pair``: LLaVA, the default, or Qwen2-VL with its draft's prune
ratio), greedy, float32, held-out scenes. Time is simulated, so the answer
does not depend on this shared machine's noise: a step costs

    ratio * (draft forwards) + 1 + per_token * (verified tokens)

units (a target verify of one token costs 1 + per_token; engine overhead, about 2% of a step here, is left out).
Fixed-shape policies build the same trees whatever the costs, so they run once and every ratio is priced from
their step records. The cost-aware policy (``sage_cost``) learns from the engine's clock, so it runs once per
ratio with the Timeline's clock priced the same way (a ``draft_decode`` span costs ``ratio``, a
``target_verify`` span ``1 + per_token * tokens``), adapting as it would on a device whose draft is that dear;
its priced step times are checked against the formula. Reported: simulated tokens per unit of time relative to
``ar`` (one token per step of cost 1 + per_token), per policy and ratio, with every output checked identical to
``ar``'s. Real devices: the fixture pair's ratio (draft time per forward over verify time, from the e2e time
breakdowns) is about 0.2-0.3 on the 2-core CPU and about 0.4 on an H200, where the tiny models are launch-bound
(benchmarks/results/device_check_h200/e2e_nvidia-h200.md).

    python benchmarks/bench_cost_ratio.py            # ~1 min on 2 cores; results/cost_ratio_cpu.{json,md,png}
    python benchmarks/bench_cost_ratio.py --pair qwen2vl   # ~1 min; results/cost_ratio_qwen2vl_cpu.{json,md,png}
    python benchmarks/bench_cost_ratio.py --draft-is-target   # the target drafts for itself (a copy, the whole
                                                              # image): every chain token is accepted
    python benchmarks/bench_cost_ratio.py --replot   # only the chart, from the committed JSON
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_ext.cli.models import load_pair, scene_inputs  # noqa: E402
from sage_ext.cli.runs import cpu_model  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.engine.policies import (  # noqa: E402
    AutoregressivePolicy,
    ChainPolicy,
    CostAwareSagePolicy,
    DynamicTreePolicy,
    SagePolicy,
    StaticTreePolicy,
)
from sage_ext.fixtures import PAIRS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIXED_POLICIES = {"ar": AutoregressivePolicy, "chain": ChainPolicy, "static": StaticTreePolicy,
                  "dynamic": DynamicTreePolicy, "sage": SagePolicy}


def step_units(record, ratio: float, per_token: float) -> float:
    """A step's simulated cost (the module docstring's formula); the verify covers the slots and the root."""
    return ratio * record.draft_forwards + 1.0 + per_token * (record.tree_slots + 1)


def priced(engine: SpeculativeGenerator, ratio: float, per_token: float) -> None:
    """Price the engine's timeline clock: a draft_decode span costs ``ratio``, a target_verify span
    ``1 + per_token * tokens`` (tokens of the last verify forward), every other span nothing."""
    now, verified = [0.0], [0]
    forward_tree = engine.target.forward_tree

    def counting_forward_tree(tokens, *args, **kwargs):
        verified[0] = tokens.shape[1]
        return forward_tree(tokens, *args, **kwargs)

    def clock() -> float:
        ending = engine.timeline.current[0]
        if ending == "draft_decode":
            now[0] += ratio
        elif ending == "target_verify":
            now[0] += 1.0 + per_token * verified[0]
        return now[0]

    engine.target.forward_tree = counting_forward_tree
    engine.host_clock = clock


def run(engine: SpeculativeGenerator, prompts: list[dict], max_new_tokens: int) -> tuple[list, list]:
    """(outputs, step records) over all prompts."""
    outputs, records = [], []
    for inputs in prompts:
        out = engine.generate(**inputs, max_new_tokens=max_new_tokens)
        outputs.append(out.sequences[0].tolist())
        records += out.stats.steps
    return outputs, records


def rate(records, ratio: float, per_token: float) -> float:
    """Simulated tokens per unit time over the step records."""
    return sum(r.emitted for r in records) / sum(step_units(r, ratio, per_token) for r in records)


def result_stem(pair: str, draft_is_target: bool = False) -> str:
    """The results' file stem of a pair's study (the LLaVA pair's keeps its first name)."""
    own = "_self_draft" if draft_is_target else ""
    return f"cost_ratio{own}_cpu" if pair == "llava" else f"cost_ratio_{pair}{own}_cpu"


def plot_report(report: dict, path: Path) -> None:
    """The study as a chart: speed-up over ar against the draft/verify cost ratio (log axis), one line per policy,
    and under it which policy wins at each ratio."""
    from sage_ext.cli.plots import pyplot

    plt = pyplot()
    ratios = report["ratios"]
    table = report["speedup_vs_ar"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), height_ratios=[4, 1], sharex=True)
    for name, row in table.items():
        top.plot(ratios, [row[str(r)] for r in ratios], marker="o", label=name,
                 linewidth=2.5 if name == "sage_cost" else 1.2)
    top.set_xscale("log")
    top.set_ylabel("simulated speed-up over ar")
    top.axvspan(1 / 30, 1 / 4, color="0.9", zorder=0, label="1/30 .. 1/4 (e.g. 7B draft, 72B target ~1/10)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    names = list(table)
    winners = [max(names, key=lambda n: table[n][str(r)]) for r in ratios]
    bottom.scatter(ratios, [names.index(w) for w in winners], marker="s", s=80)
    bottom.set_yticks(range(len(names)), names, fontsize=7)
    bottom.set_ylabel("fastest")
    bottom.set_xlabel("draft forward cost / target verify cost")
    bottom.set_xticks(ratios, [f"{r:g}" for r in ratios])
    bottom.xaxis.set_minor_formatter(plt.NullFormatter())
    pair = report.get("pair", "llava")
    fig.suptitle(f"Which tree is fastest as the draft gets dearer ({pair} fixture pair, real acceptance, "
                 "simulated time)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.02,0.05,0.1,0.2,0.3,0.5,0.8",
                        help="draft forward cost / verify cost, comma-separated")
    parser.add_argument("--per-token", type=float, default=0.02, help="verify cost per verified token")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--scene-offset", type=int, default=300, help="first held-out scene (apart from tuning)")
    parser.add_argument("--pair", choices=sorted(PAIRS), default="llava", help="bundled fixture pair")
    parser.add_argument("--draft-is-target", action="store_true",
                        help="draft with a copy of the pair's target, which sees the whole image: a draft identical "
                             "to the target, whose every greedy token is accepted")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default 96 (LLaVA pair), 128 (Qwen2-VL pair: its answers run to ~200 tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--replot", action="store_true",
                        help="only draw the chart (<stem>.png) from the JSON already in --out-dir")
    args = parser.parse_args(argv)
    stem = result_stem(args.pair, args.draft_is_target)
    if args.replot:
        out_dir = Path(args.out_dir)
        plot_report(json.loads((out_dir / f"{stem}.json").read_text()), out_dir / f"{stem}.png")
        return 0
    if args.max_new_tokens is None:
        args.max_new_tokens = 96 if args.pair == "llava" else 128
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(args.threads)
    pair = PAIRS[args.pair]
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), torch.device("cpu"), torch.float32)
    prune = pair.draft_prune_ratio  # the pair's default: what the engine's draft sees of the image
    if args.draft_is_target:
        draft, prune = copy.deepcopy(target), 0.0
    prompts = scene_inputs(processor, pair, pair.heldout_scenes(args.scenes, start=args.scene_offset),
                           torch.device("cpu"), torch.float32)

    fixed_runs = {}
    for name, make in FIXED_POLICIES.items():
        fixed_runs[name] = run(SpeculativeGenerator(target, draft, make(), draft_prune_ratio=prune), prompts,
                               args.max_new_tokens)
        print(f"{name}: {len(fixed_runs[name][1])} steps", flush=True)
    reference = fixed_runs["ar"][0]

    table: dict[str, dict[str, float]] = {name: {} for name in [*FIXED_POLICIES, "sage_cost"]}
    identical = {name: outputs == reference for name, (outputs, _) in fixed_runs.items()}
    learned = {}
    for ratio in ratios:
        ar_rate = rate(fixed_runs["ar"][1], ratio, args.per_token)
        for name, (_, records) in fixed_runs.items():
            table[name][str(ratio)] = rate(records, ratio, args.per_token) / ar_rate
        policy = CostAwareSagePolicy()
        engine = SpeculativeGenerator(target, draft, policy, draft_prune_ratio=prune)
        priced(engine, ratio, args.per_token)
        outputs, records = run(engine, prompts, args.max_new_tokens)
        for record in records:  # the priced clock and the formula agree
            assert abs(record.time - step_units(record, ratio, args.per_token)) < 1e-6, (record, ratio)
        identical[f"sage_cost@{ratio}"] = outputs == reference
        table["sage_cost"][str(ratio)] = rate(records, ratio, args.per_token) / ar_rate
        proposals = policy.learned.proposals
        learned[str(ratio)] = {"final_d_max": policy.d_max, "mean_tau": sum(r.tau for r in records) / len(records),
                               "mean_draft_forwards": sum(r.draft_forwards for r in records) / len(records),
                               "chain_share": proposals.chain_steps / max(1, proposals.chain_steps + proposals.tree_steps),
                               "alone_share": proposals.alone_steps / len(records)}
        print(f"ratio {ratio}: " + ", ".join(f"{n} {t[str(ratio)]:.2f}x" for n, t in table.items()), flush=True)

    report = {"pair": args.pair, "draft_is_target": args.draft_is_target, "draft_prune_ratio": prune, "machine": cpu_model(), "threads": args.threads, "torch": torch.__version__, "scenes": args.scenes,
              "scene_offset": args.scene_offset, "max_new_tokens": args.max_new_tokens, "per_token": args.per_token,
              "ratios": ratios, "speedup_vs_ar": table, "identical_to_ar": identical, "sage_cost": learned,
              "command": "python benchmarks/bench_cost_ratio.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    best = {str(r): max(table, key=lambda n: table[n][str(r)]) for r in ratios}
    lines = [f"# Simulated draft/verify cost ratios: which tree is fastest ({args.pair} fixture pair, real acceptance)",
             "", f"`{report['command'].strip()}` — {report['machine']}, torch {report['torch']}; "
             f"{'the draft a copy of the target; ' if args.draft_is_target else ''}draft prune ratio "
             f"{prune}; {args.scenes} held-out "
             f"scenes from {args.scene_offset}, up to {args.max_new_tokens} new tokens, greedy. A step costs "
             f"ratio x draft forwards + 1 + {args.per_token} x verified tokens; speed-up = simulated tokens per unit "
             "time over ar's. Every output identical to ar: " + str(all(identical.values())) + ".", "",
             "| policy | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
             "| --- | " + " | ".join("---:" for _ in ratios) + " |"]
    for name, row in table.items():
        cells = [f"**{row[str(r)]:.2f}x**" if best[str(r)] == name else f"{row[str(r)]:.2f}x" for r in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "sage_cost per ratio (its depth cap at the end, mean accepted tokens and draft forwards per step, the "
              "share of its drafted steps that proposed the draft's greedy chain, the share of its steps of the target alone): "
              + "; ".join(f"{r}: d_max {v['final_d_max']}, tau {v['mean_tau']:.2f}, "
                          f"{v['mean_draft_forwards']:.1f} forwards, {v['chain_share']:.0%} chains, "
                          f"{v['alone_share']:.0%} alone"
                          for r, v in learned.items()) + "."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot_report(report, out_dir / f"{stem}.png")
    print("\n".join(lines))
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
