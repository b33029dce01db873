"""SAGE statistics of a bundled fixture pair: how its draft's confidence spreads, how deep acceptance goes, and
what draft-side visual pruning does, measured on held-out scenes.

    python benchmarks/measure_pair.py --pair qwen2vl            # -> results/pair_qwen2vl_<machine>.{json,md}
    python benchmarks/measure_pair.py --pair qwen2vl --card     # also writes the section into the draft's model card

SAGE with paper defaults, greedy, float32, the pair's benchmark prompt (`FixturePair.prompt_text`). For each
draft prune ratio (0 / 0.5 / 0.8 / 0.9 by default; the ratios take turns per scene so machine drift hits all
alike): tau, tokens/s, and whether the output equals target-only greedy decoding. At ratio 0: the histogram of
the draft's root confidence alpha over SAGE steps, the share of steps with alpha below 0.8, and the acceptance
by depth (P(accepted >= d | tree reached d)).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sage_ext.cli.bench import slug  # noqa: E402
from sage_ext.cli.models import load_pair, scene_inputs  # noqa: E402
from sage_ext.cli.runs import machine_name  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.fixtures import PAIRS  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
ALPHA_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0001)
CARD_HEADING = "## SAGE statistics on held-out scenes"


def acceptance_by_depth(steps) -> list[float]:
    depth_max = max((s.tree_depth for s in steps), default=0)
    out = []
    for d in range(1, depth_max + 1):
        eligible = [s for s in steps if s.tree_depth >= d]
        out.append(round(sum(s.tau >= d for s in eligible) / len(eligible), 4) if eligible else 0.0)
    return out


def histogram(values: list[float]) -> list[dict]:
    rows = []
    for low, high in zip(ALPHA_BINS, ALPHA_BINS[1:]):
        count = sum(low <= v < high for v in values)
        rows.append({"from": low, "to": min(high, 1.0), "steps": count, "share": round(count / max(1, len(values)), 4)})
    return rows


def measure(pair_name: str, scenes: int, scene_offset: int, ratios: list[float], max_new_tokens: int) -> dict:
    pair = PAIRS[pair_name]
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), torch.device("cpu"), torch.float32)
    prompts = scene_inputs(processor, pair, pair.heldout_scenes(scenes, start=scene_offset), torch.device("cpu"),
                           torch.float32)
    visual_tokens = [int((p["input_ids"] == target.config.image_token_id).sum()) for p in prompts] \
        if hasattr(target.config, "image_token_id") else []
    tokens_by_size = {}
    for width, height in getattr(pair.scenes, "IMAGE_SIZES", ()):  # visual tokens at every image size of the task
        scene = pair.scenes.generate_scene(0, size=(width, height))
        ids = processor(text=pair.prompt_text(processor), images=scene.render(), return_tensors="pt")["input_ids"]
        tokens_by_size[f"{width}x{height}"] = int((ids == target.config.image_token_id).sum())
    ar = SpeculativeGenerator(target, draft, "ar")
    engines = {r: SpeculativeGenerator(target, draft, "sage", draft_prune_ratio=r) for r in ratios}
    for engine in [ar, *engines.values()]:  # warm-up, not timed
        engine.generate(**prompts[0], max_new_tokens=8)
    per_ratio = {r: {"seconds": 0.0, "tokens": 0, "steps": [], "identical": True} for r in ratios}
    ar_seconds = ar_tokens = 0
    for i, inputs in enumerate(prompts):
        start = time.perf_counter()
        reference = ar.generate(**inputs, max_new_tokens=max_new_tokens)
        ar_seconds += time.perf_counter() - start
        ar_tokens += reference.stats.new_tokens
        order = ratios[i % len(ratios):] + ratios[: i % len(ratios)]
        for r in order:
            start = time.perf_counter()
            out = engines[r].generate(**inputs, max_new_tokens=max_new_tokens)
            row = per_ratio[r]
            row["seconds"] += time.perf_counter() - start
            row["tokens"] += out.stats.new_tokens
            row["steps"] += out.stats.steps
            row["identical"] &= torch.equal(out.sequences, reference.sequences)
        print(f"scene {i + 1}/{len(prompts)} done", flush=True)
    rows = []
    for r in ratios:
        row = per_ratio[r]
        taus = [s.tau for s in row["steps"]]
        rows.append({"ratio": r, "mean_tau": round(statistics.mean(taus), 3), "steps": len(taus),
                     "tokens_per_second": round(row["tokens"] / row["seconds"], 2),
                     "speedup_vs_ar": round((ar_seconds / ar_tokens) / (row["seconds"] / row["tokens"]), 3),
                     "identical_to_ar": row["identical"],
                     "acceptance_by_depth": acceptance_by_depth(row["steps"])})
    alphas = [s.alpha_measured for s in per_ratio[ratios[0]]["steps"] if s.alpha_measured is not None]
    return {
        "pair": pair_name, "machine": machine_name(torch.device("cpu")), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "scenes": scenes, "scene_offset": scene_offset, "max_new_tokens": max_new_tokens,
        "visual_tokens_per_prompt": visual_tokens, "visual_tokens_by_image_size": tokens_by_size,
        "ar_tokens_per_second": round(ar_tokens / ar_seconds, 2),
        "command": "python benchmarks/measure_pair.py " + " ".join(sys.argv[1:]),
        "alpha": {"ratio": ratios[0], "steps": len(alphas), "median": round(statistics.median(alphas), 4),
                  "share_below_0_8": round(sum(a < 0.8 for a in alphas) / len(alphas), 4),
                  "histogram": histogram(alphas)},
        "pruning": rows,
    }


def markdown(report: dict) -> str:
    alpha = report["alpha"]
    tokens = report["visual_tokens_per_prompt"]
    lines = [
        CARD_HEADING, "",
        f"`{report['command']}` on {report['machine']} ({report['threads']} threads, torch {report['torch']}): SAGE "
        f"(paper defaults), greedy, float32, {report['scenes']} held-out scenes (from {report['scene_offset']}) x up to "
        f"{report['max_new_tokens']} new tokens"
        + (f"; {min(tokens)}{'' if min(tokens) == max(tokens) else f'-{max(tokens)}'} visual tokens per prompt"
           if tokens else "") + ".", "",
    ]
    if report["visual_tokens_by_image_size"]:
        sizes = report["visual_tokens_by_image_size"]
        lines += ["Visual tokens per image size (width x height, the first is the default): "
                  + ", ".join(f"{size}: {n}" for size, n in sizes.items()) + ".", ""]
    lines += [
        f"Root confidence alpha of the draft over {alpha['steps']} SAGE steps (prune ratio {alpha['ratio']}): median "
        f"{alpha['median']:.3f}; {100 * alpha['share_below_0_8']:.1f}% of steps below 0.8.", "",
        "| alpha | steps | share |", "| --- | ---: | ---: |",
    ]
    lines += [f"| [{h['from']:.2f}, {h['to']:.2f}{']' if h['to'] >= 1 else ')'} | {h['steps']} | {100 * h['share']:.1f}% |"
              for h in alpha["histogram"]]
    lines += ["", f"Draft-side visual pruning (target-only decoding: {report['ar_tokens_per_second']:.1f} tokens/s):", "",
              "| prune ratio | tau | tokens/s | speedup vs target-only | identical to target-only | acceptance by depth |",
              "| ---: | ---: | ---: | ---: | --- | --- |"]
    lines += [f"| {r['ratio']:.2f} | {r['mean_tau']:.2f} | {r['tokens_per_second']:.1f} | {r['speedup_vs_ar']:.2f}x "
              f"| {r['identical_to_ar']} | {', '.join(f'{v:.2f}' for v in r['acceptance_by_depth'][:8])} |"
              for r in report["pruning"]]
    return "\n".join(lines) + "\n"


def write_card_section(card: Path, section: str) -> None:
    """Replace (or append) the statistics section of a model card."""
    text = card.read_text()
    if CARD_HEADING in text:
        head, _, rest = text.partition(CARD_HEADING)
        following = rest.find("\n## ")
        text = head + section + (rest[following + 1:] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="qwen2vl")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--scene-offset", type=int, default=200, help="first held-out scene (200+: not in training evals)")
    parser.add_argument("--ratios", default="0,0.5,0.8,0.9")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card", action="store_true", help="write the section into the draft's README.md")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = measure(args.pair, args.scenes, args.scene_offset, [float(r) for r in args.ratios.split(",")],
                     args.max_new_tokens)
    text = markdown(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"pair_{args.pair}_{slug(report['machine'])}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(text)
    if args.card:
        write_card_section(PAIRS[args.pair].draft_dir / "README.md", text)
    print(text)
    return 0 if all(r["identical_to_ar"] for r in report["pruning"]) else 1


if __name__ == "__main__":
    sys.exit(main())
