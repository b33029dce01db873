"""`sage-ext demo`: a speculative policy against target-only decoding on held-out scenes of a bundled fixture
pair (--pair): one warm-up per engine, per-scene and overall lines, a note when the policy measured slower, and the
plot (drawn by plots.plot_demo).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import models
from .plots import plot_demo
from .runs import CONVENTION, machine_name, run_engine
from .validation import parse_policy


#: new tokens of each engine's warm-up generation in the demo (capped by --max-new-tokens)
DEMO_WARMUP_TOKENS = 32


def cmd_demo(args) -> int:
    from tqdm import tqdm

    from ..engine import SpeculativeGenerator
    from ..fixtures import PAIRS

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_obj
    quiet = getattr(args, "quiet", False)
    policy = parse_policy(args.policy, args.policy_args)
    pair = PAIRS[args.pair]
    target, draft, processor = models.load_pair(args.target, args.draft, device, models.pick_dtype(args.dtype, device))
    tokenizer = models.tokenizer_of(processor)
    engines = {"ar": SpeculativeGenerator(target, draft, policy="ar"),
               policy.name: SpeculativeGenerator(target, draft, policy, draft_prune_ratio=args.draft_prune_ratio)}
    demo_scenes = pair.heldout_scenes(args.scenes, start=args.scene_offset)
    inputs_of = models.scene_inputs(processor, pair, demo_scenes, device, target.dtype)

    # A warm-up generation per engine on a scene outside the demo's, so first-call costs (allocations, lazy
    # initialisation, cold caches) are not timed: several steps long, like a real run.
    warm = models.scene_inputs(processor, pair, pair.heldout_scenes(1, start=args.scene_offset + 10_000), device,
                               target.dtype)[0]
    for engine in engines.values():
        engine.generate(**warm, max_new_tokens=min(args.max_new_tokens, DEMO_WARMUP_TOKENS))

    print(f"sage-ext demo on {machine_name(device)}: target {args.target}, "
          f"policy {policy.name}; {CONVENTION}")
    results = []
    with tqdm(total=len(demo_scenes) * len(engines), desc="generating", unit="run", file=sys.stderr,
              disable=quiet) as bar:
        for scene, inputs in zip(demo_scenes, inputs_of):
            runs = {}
            for name, engine in engines.items():
                runs[name] = run_engine(engine, inputs, args.max_new_tokens, device, do_sample=False)
                bar.update(1)
            results.append((scene, runs))

    sage_name = policy.name
    total = {name: {"tokens": 0, "seconds": 0.0} for name in engines}
    for scene, runs in results:
        spec = runs[sage_name]
        text = tokenizer.decode(spec["ids"], skip_special_tokens=True)
        correct, total_facts = pair.score(scene, text)
        same = spec["ids"] == runs["ar"]["ids"]
        st = spec["stats"]
        speed = {n: len(r["ids"]) / r["seconds"] for n, r in runs.items()}
        print(f"\nscene {scene.seed}: {text}")
        print(f"  facts stated correctly: {correct}/{total_facts}; "
              f"identical to target-only greedy: {'yes' if same else 'NO'}")
        print(f"  {sage_name}: tau {st.mean_tau:.2f} ({st.tokens_per_target_forward:.2f} tokens/target forward, "
              f"{st.target_forwards} steps), {speed[sage_name]:.1f} tok/s; ar: {speed['ar']:.1f} tok/s; "
              f"speedup {runs['ar']['seconds'] / spec['seconds']:.2f}x")
        for name, run in runs.items():
            total[name]["tokens"] += len(run["ids"])
            total[name]["seconds"] += run["seconds"]
    steps = [s for _, runs in results for s in runs[sage_name]["stats"].steps]
    mean_tau = sum(s.tau for s in steps) / max(1, len(steps))
    speedup = total["ar"]["seconds"] / total[sage_name]["seconds"]
    print(f"\noverall: {sage_name} tau {mean_tau:.2f} over {len(steps)} steps; "
          f"{total[sage_name]['tokens'] / total[sage_name]['seconds']:.1f} tok/s vs "
          f"{total['ar']['tokens'] / total['ar']['seconds']:.1f} tok/s target-only (ar): speedup {speedup:.2f}x")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    note = slow_speedup_note(sage_name, speedup, mean_tau + 1, torch.get_num_threads(), os.cpu_count(), load)
    if note:
        print(note)
    plot_path = Path(args.plot)
    plot_demo(results, sage_name, plot_path)
    print(f"plot of tokens per target forward per step and tokens/s against target-only (ar): {plot_path}")
    return 0


def slow_speedup_note(policy_name: str, speedup: float, tokens_per_forward: float, threads: int,
                      cores: int | None, load: float | None = None) -> str | None:
    """The demo's explanation when the speculative policy measured slower than target-only (None otherwise).
    ``load``: the 1-minute load average (the demo passes ``os.getloadavg()[0]``), None where unknown."""
    if speedup >= 1:
        return None
    cores = cores or 1
    causes = []
    if load is not None and load > 0.75 * cores:
        causes.append(f"the machine is busy (load average {load:.1f} on {cores} cores): models this small are timed "
                      f"against whatever else runs")
    if threads > cores:
        causes.append(f"torch uses {threads} threads on {cores} cores, so the small forwards wait for each other: "
                      f"use --threads 1")
    elif threads > 1:
        causes.append(f"torch uses {threads} threads: for models this small the thread pool's hand-offs can cost more "
                      f"than they save, and a thread that shares its core with another process stalls every forward; "
                      f"try --threads 1")
    if not causes:
        causes.append("timing noise of other processes on the machine (the models are tiny, each forward is "
                      "milliseconds)")
    return (f"note: {policy_name} measured {speedup:.2f}x, slower than target-only, although it needed "
            f"{tokens_per_forward:.1f}x fewer target forwards per token. Likely cause: {'; '.join(causes)}. Run again "
            f"on an idle machine; the outputs are identical either way.")
