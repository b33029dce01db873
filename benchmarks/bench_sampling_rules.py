"""Which sampling verification rule accepts more? SpecInfer's (``ops.verify_sampling``), Traversal Verification
(``ops.verify_traversal``) and the Gumbel-coupled rule (``sage_ext/engine/coupled.py``: each position's token fixed by
its own noise) on the bundled pairs, every tree policy, temperatures 0.7 and 1.0.

All rules are lossless (tests/test_engine_sampling.py checks each against the target's exact distribution), so
the only question is how many draft tokens each accepts per step (tau) and what that does to the speed. For each
pair, temperature and held-out scene the rules take turns policy by policy, with the same seed per (scene,
repeat), so machine drift hits both alike; target-only sampling by the engine runs once per scene and repeat for
the speedup. Reported per pair, temperature, policy and rule: mean tau over all steps and tokens per second
(new tokens over the wall time of all its runs), relative to target-only.

    python benchmarks/bench_sampling_rules.py    # ~10 min on 2 cores; results/sampling_rules_<machine>.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_ext.cli.bench import slug  # noqa: E402
from sage_ext.cli.models import load_pair, scene_inputs  # noqa: E402
from sage_ext.cli.runs import machine_name, run_engine  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.engine.loop import SAMPLING_RULES  # noqa: E402
from sage_ext.fixtures import PAIRS  # noqa: E402

POLICIES = ("chain", "static", "dynamic", "sage", "sage_cost")
# held-out scenes and new tokens per pair: the e2e benchmark's settings, fewer scenes
SETTINGS = {"llava": {"scenes": 16, "max_new_tokens": 96}, "qwen2vl": {"scenes": 8, "max_new_tokens": 256}}


def timed(engine, inputs, max_new_tokens: int, temperature: float, seed: int) -> tuple[float, int, list[int]]:
    """(seconds, new tokens, tau of every step) of one sampled generation (`run_engine`)."""
    run = run_engine(engine, inputs, max_new_tokens, torch.device("cpu"), do_sample=True, temperature=temperature,
                     top_k=0, generator=torch.Generator().manual_seed(seed))
    return run["seconds"], run["stats"].new_tokens, [s.tau for s in run["stats"].steps]


def measure(pair_name: str, temperatures: list[float], repeats: int, scene_offset: int,
            scenes: int | None = None) -> list[dict]:
    pair, settings = PAIRS[pair_name], {**SETTINGS[pair_name], **({"scenes": scenes} if scenes else {})}
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), torch.device("cpu"), torch.float32)
    prompts = scene_inputs(processor, pair, pair.heldout_scenes(settings["scenes"], start=scene_offset),
                           torch.device("cpu"), torch.float32)
    engines = {(policy, rule): SpeculativeGenerator(target, draft, policy, draft_prune_ratio=pair.draft_prune_ratio,
                                                    sampling_rule=rule)
               for policy in POLICIES for rule in SAMPLING_RULES}
    baseline = SpeculativeGenerator(target, draft, "ar")
    for engine in [baseline, *engines.values()]:  # warm-up (and the cost-aware policy's first estimates)
        timed(engine, prompts[0], 16, 1.0, seed=0)
    rows = []
    for temperature in temperatures:
        totals = {key: [0.0, 0, []] for key in [("ar", None), *engines]}
        for repeat in range(repeats):
            for i, inputs in enumerate(prompts):
                seed = 1000 * repeat + i + 1
                runs = [(("ar", None), baseline)]
                for policy in POLICIES:  # the rules back to back, alternating their order
                    order = SAMPLING_RULES if (i + repeat) % 2 == 0 else SAMPLING_RULES[::-1]
                    runs += [((policy, rule), engines[policy, rule]) for rule in order]
                for key, engine in runs:
                    seconds, tokens, taus = timed(engine, inputs, settings["max_new_tokens"], temperature, seed)
                    total = totals[key]
                    total[0] += seconds
                    total[1] += tokens
                    total[2] += taus
            print(f"{pair_name} T={temperature}: repeat {repeat + 1}/{repeats} done", flush=True)
        ar_speed = totals["ar", None][1] / totals["ar", None][0]
        for (policy, rule), (seconds, tokens, taus) in totals.items():
            if policy == "ar":
                continue
            speed = tokens / seconds
            rows.append({"pair": pair_name, "temperature": temperature, "policy": policy, "rule": rule,
                         "mean_tau": round(sum(taus) / len(taus), 3), "steps": len(taus),
                         "tokens_per_second": round(speed, 1), "speedup_vs_ar": round(speed / ar_speed, 3)})
    return rows


def markdown(report: dict) -> str:
    rules = list(dict.fromkeys(r["rule"] for r in report["rows"]))
    others = [rule for rule in rules if rule != "specinfer"]
    lines = [f"# Sampling verification rules: {', '.join(rules)} ({report['machine']})", "",
             f"`{report['command']}`; torch {report['torch']}, {report['threads']} threads, float32, pure temperature "
             f"sampling (no top-k / top-p), {report['repeats']} repeat(s); each pair's default draft prune ratio. "
             "tau = accepted draft tokens per step; speedup = tokens/s over target-only sampling by the engine, "
             "same scenes and seeds.", ""]
    for pair_name in dict.fromkeys(r["pair"] for r in report["rows"]):
        settings = SETTINGS[pair_name]
        lines += [f"## {pair_name} ({report['scenes'][pair_name]} held-out scenes from {report['scene_offset']}, up to "
                  f"{settings['max_new_tokens']} new tokens)", "",
                  "| T | policy | " + " | ".join(f"tau {rule}" for rule in rules) + " | "
                  + " | ".join(f"{rule} / specinfer" for rule in others) + " | "
                  + " | ".join(f"speedup {rule}" for rule in rules) + " |",
                  "| ---: | --- |" + " ---: |" * (2 * len(rules) + len(others))]
        rows = [r for r in report["rows"] if r["pair"] == pair_name]
        for temperature in dict.fromkeys(r["temperature"] for r in rows):
            for policy in POLICIES:
                by_rule = {r["rule"]: r for r in rows if r["temperature"] == temperature and r["policy"] == policy}
                spec = by_rule["specinfer"]["mean_tau"]
                cells = [f"{by_rule[rule]['mean_tau']:.2f}" for rule in rules]
                cells += [f"{by_rule[rule]['mean_tau'] / spec:.3f}" if spec else "nan" for rule in others]
                cells += [f"{by_rule[rule]['speedup_vs_ar']:.2f}x" for rule in rules]
                lines.append(f"| {temperature:g} | {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="llava,qwen2vl")
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scene-offset", type=int, default=300, help="first held-out scene (apart from the e2e's)")
    parser.add_argument("--scenes", type=int, default=None, help="held-out scenes per pair (default: SETTINGS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rows = []
    for pair_name in args.pairs.split(","):
        rows += measure(pair_name, temperatures, args.repeats, args.scene_offset, args.scenes)
    machine = machine_name(torch.device("cpu"))
    report = {"machine": machine, "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
              "scene_offset": args.scene_offset, "scenes": {p: args.scenes or SETTINGS[p]["scenes"] for p in args.pairs.split(",")},
              "command": "python benchmarks/bench_sampling_rules.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sampling_rules_{slug(machine)}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
