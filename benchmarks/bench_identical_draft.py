"""A draft identical to the target: is the default policy ever behind a plain chain?

Every greedy token of a draft that is a copy of the target is accepted, so the best proposal is the longest chain
that pays; what a policy makes of such a draft shows whether it reads acceptance from what it measures or from the
draft's confidence. Random-weight models make it hard: with HF's initialization (std 0.02) their next-token
distributions are nearly flat, so the draft's confidence reads low although its every token is right (paper SAGE
then builds shallow, wide trees). Models (benchmarks/random_models.py, each drafting with a deep copy of itself):

* ``flat-llama``: the tiny Llama with HF's initialization (flat distributions);
* ``tiny-llama``: the same with a large-std lm_head (well separated argmaxes: a sure draft);
* ``tiny-qwen2-vl``: the tiny Qwen2-VL with an image (M-RoPE), large-std lm_head.

Per model and seed: ar, chain (5 tokens), sage, sage_cost and sage_cost_drafting (``alone=False``: it always
drafts) generate ``--new-tokens`` greedy tokens (EOS off)
after one warm-up generation each (sage_cost learns there), then ``--repeats`` timed generations, interleaved per
repeat (the order reversed every other repeat). Reported: tau (accepted draft tokens per step), draft forwards per
step, tokens per second and the speed relative to the chain: the median over repeats of each repeat's ratio (a
repeat runs the policies back to back, so a burst of load on a shared machine moves one repeat's ratio, not the
median); every output checked identical to ar's. tau does not depend on
the machine; tokens per second does (a copy of the target costs as much per forward as the target, so speculation
gains little in time here whatever the tree).

``--draft contrary``: the other extreme, each model drafting with a copy whose lm_head is negated (its greedy token is
the target's least likely: nothing is ever accepted). No drafting policy can gain there; the question is how
little the default policy loses against target-only decoding (``ar``), which the report then compares against.

    python benchmarks/bench_identical_draft.py     # ~2 min on 2 cores; results/identical_draft_cpu.{json,md}
    python benchmarks/bench_identical_draft.py --draft contrary   # results/contrary_draft_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from random_models import contrary_draft, qwen2_vl_inputs, text_prompt, tiny_llama, tiny_qwen2_vl  # noqa: E402

from sage_ext.cli.runs import cpu_model  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.engine.policies import CostAwareSagePolicy  # noqa: E402

POLICIES = ("ar", "chain", "sage", "sage_cost", "sage_cost_drafting")
#: the policies by name, and the default one that always drafts (what its steps of the target alone add)
POLICY_OF = {name: name for name in POLICIES} | {"sage_cost_drafting": lambda: CostAwareSagePolicy(alone=False)}


MODELS = {
    "flat-llama": lambda seed: (tiny_llama(seed, large_logits=False), text_prompt(12, seed)),
    "tiny-llama": lambda seed: (tiny_llama(seed), text_prompt(12, seed)),
    "tiny-qwen2-vl": lambda seed: ((model := tiny_qwen2_vl(seed)), qwen2_vl_inputs(model, (1, 8, 8), seed, 8)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(ROOT / "results"))
    parser.add_argument("--draft", choices=("identical", "contrary"), default="identical",
                        help="a copy of the target, or a copy whose greedy token is never the target's")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, identical = [], True
    for model_name, build in MODELS.items():
        for seed in range(args.seeds):
            target, inputs = build(seed)
            draft = copy.deepcopy(target).eval() if args.draft == "identical" else contrary_draft(target)
            engines = {name: SpeculativeGenerator(target, draft, policy() if callable(policy) else policy)
                       for name, policy in POLICY_OF.items()}
            for engine in engines.values():  # warm-up (sage_cost learns its costs and acceptance here)
                engine.generate(**inputs, max_new_tokens=args.new_tokens, eos_token_id=-1)
            totals = {name: {"seconds": 0.0, "tokens": 0, "tau": 0, "forwards": 0, "steps": 0, "rates": []}
                      for name in POLICIES}
            reference = None
            for repeat in range(args.repeats):
                for name in (POLICIES if repeat % 2 == 0 else POLICIES[::-1]):
                    start = time.perf_counter()
                    out = engines[name].generate(**inputs, max_new_tokens=args.new_tokens, eos_token_id=-1)
                    seconds = time.perf_counter() - start
                    if name == "ar" and reference is None:
                        reference = out.sequences
                    elif reference is not None and not torch.equal(out.sequences, reference):
                        identical = False
                    total = totals[name]
                    total["seconds"] += seconds
                    total["rates"].append(out.stats.new_tokens / seconds)
                    total["tokens"] += out.stats.new_tokens
                    total["tau"] += sum(step.tau for step in out.stats.steps)
                    total["forwards"] += sum(step.draft_forwards for step in out.stats.steps)
                    total["steps"] += len(out.stats.steps)
            row = {"model": model_name, "seed": seed}
            for name, total in totals.items():
                row[name] = {"tau": total["tau"] / total["steps"], "draft_forwards": total["forwards"] / total["steps"],
                             "tokens_per_s": total["tokens"] / total["seconds"],
                             **{f"over_{base}": statistics.median(rate / other for rate, other in
                                                                  zip(total["rates"], totals[base]["rates"]))
                                for base in ("chain", "ar")}}
            rows.append(row)
            print(f"{model_name} seed {seed}: " + ", ".join(
                f"{name} tau {row[name]['tau']:.2f} {row[name]['tokens_per_s']:.0f} tok/s" for name in POLICIES),
                flush=True)
    report = {"machine": cpu_model(), "threads": args.threads, "torch": torch.__version__, "seeds": args.seeds,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "draft": args.draft, "identical_to_ar": identical,
              "rows": rows,
              "command": "python benchmarks/bench_identical_draft.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.draft}_draft_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    # against the chain where the draft is always right (the best fixed proposal), against ar where it never is
    base = "chain" if args.draft == "identical" else "ar"
    others = [name for name in POLICIES if name != base]
    title = ("A draft identical to the target (random-weight models, each drafting with a copy of itself)"
             if args.draft == "identical" else
             "A draft that is never right (random-weight models, each drafting with a copy whose lm_head is negated)")
    lines = [f"# {title}", "",
             f"`{report['command'].strip()}` — {report['machine']}, {args.threads} threads, torch {report['torch']}; "
             f"{args.new_tokens} greedy tokens (EOS off), {args.repeats} interleaved repeats after a warm-up "
             f"generation. tau = accepted draft tokens per step; speed relative to {base}: the median over repeats "
             f"of the two tokens-per-second ratio. Every output identical to ar: {identical}.", "",
             "| model | seed | chain tau | sage tau | sage_cost tau | sage_cost draft forwards / step "
             f"| {base} tok/s | " + " | ".join(f"{name} / {base}" for name in others) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in others) + " |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['seed']} | {row['chain']['tau']:.2f} | {row['sage']['tau']:.2f} | "
                     f"{row['sage_cost']['tau']:.2f} | {row['sage_cost']['draft_forwards']:.2f} | "
                     f"{row[base]['tokens_per_s']:.0f} | "
                     + " | ".join(f"{row[name][f'over_{base}']:.2f}x" for name in others) + " |")
    ratios = [row["sage_cost"][f"over_{base}"] for row in rows]
    lines += ["", f"sage_cost / {base} over the rows: median {statistics.median(ratios):.2f}x, range "
                  f"{min(ratios):.2f}x-{max(ratios):.2f}x."]
    (out_dir / f"{args.draft}_draft_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
