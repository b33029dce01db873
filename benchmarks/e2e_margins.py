"""Why does `sage_cost`'s margin over the 5-token chain move from run to run? The costs of each e2e run, side by side.

Reads the JSON of every `bench_e2e.py` run in the folders given (the five Xeon runs: LLaVA scenes 200 and 300,
temperature 0.7, Qwen2-VL, captured draft; ``--machine``: the runs' machine slug) and prints, per run, what its timeline says a step costs:

* `ar` tokens/s and the target's forward (`ar`'s verify seconds per step: one token);
* the draft's forward (the chain's draft seconds per draft forward) and its ratio to the target's;
* the verify forward of the chain (5 draft tokens) and of `sage_cost` (its mean tree), and what each extra verified
  node costs as a share of a one-token target forward (from the two: (sage_cost - chain) / (node difference));
* `sage_cost`'s tokens/s over the chain's, and over the fastest of chain, static and dynamic.

Both policies draft about one token per draft forward (a level brings at most one accepted token), so what
`sage_cost` saves is target forwards, paid for with verified nodes: the margin shrinks when a verified node gets
dearer against a whole forward. Writes markdown to stdout.

    python benchmarks/e2e_margins.py benchmarks/results benchmarks/results/rerun_2026-12-07
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = ("e2e_offset200_eager", "e2e_offset300_eager", "e2e_t0.7", "e2e_qwen2vl", "e2e_offset200_captured")
FIXED = ("chain", "static", "dynamic")


def run_costs(policies: dict) -> dict:
    """A run's per-step costs (milliseconds) and margins from its policies' JSON entries."""
    def per_step(policy: str, key: str) -> float:
        entry = policies[policy]
        return 1e3 * entry["time_breakdown_seconds"][key] / entry["steps"]

    chain, cost = policies["chain"], policies["sage-cost"]
    target_forward = per_step("ar", "target_verify")
    draft_forward = per_step("chain", "draft_decode") / chain["mean_draft_forwards"]
    chain_verify, cost_verify = per_step("chain", "target_verify"), per_step("sage-cost", "target_verify")
    extra_nodes = cost["mean_tree_size"] - chain["mean_tree_size"]
    best_fixed = max(policies[name]["tokens_per_second"] for name in FIXED)
    return {"ar_tokens_per_second": policies["ar"]["tokens_per_second"], "target_forward_ms": target_forward,
            "draft_forward_ms": draft_forward, "draft_over_target": draft_forward / target_forward,
            "chain_verify_ms": chain_verify, "cost_verify_ms": cost_verify, "cost_nodes": cost["mean_tree_size"],
            "node_share": (cost_verify - chain_verify) / extra_nodes / target_forward if extra_nodes > 0 else None,
            "over_chain": cost["tokens_per_second"] / chain["tokens_per_second"],
            "over_best_fixed": cost["tokens_per_second"] / best_fixed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--machine", default="xeon-2-cores", help="the runs' machine slug (their names end in it)")
    args = parser.parse_args(argv)
    print("| folder | run | ar tokens/s | target forward ms | draft forward ms | draft / target | chain verify ms "
          "| sage_cost verify ms (nodes) | an extra node / a target forward | sage_cost / chain | sage_cost / best fixed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for folder in args.folders:
        for run in RUNS:
            for path in sorted(folder.glob(f"{run}_{args.machine}.json")):
                c = run_costs(json.loads(path.read_text())["policies"])
                share = "-" if c["node_share"] is None else f"{100 * c['node_share']:.1f}%"
                print(f"| {folder} | {run} | {c['ar_tokens_per_second']:.0f} | {c['target_forward_ms']:.2f} "
                      f"| {c['draft_forward_ms']:.2f} | {c['draft_over_target']:.2f} | {c['chain_verify_ms']:.2f} "
                      f"| {c['cost_verify_ms']:.2f} ({c['cost_nodes']:.1f}) | {share} | {c['over_chain']:.3f}x "
                      f"| {c['over_best_fixed']:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
