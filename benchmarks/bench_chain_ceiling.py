"""How close does the default policy's per-step depth come to the best a chain could do? (LLaVA pair, greedy)

On a sure draft the step's proposal is a chain, and the question is only how long each step's chain should be.
For held-out scenes this script takes the target's greedy output, the draft's greedy prediction at every position
given the true prefix (one teacher-forced forward) and, after each wrong prediction, the draft's own continuation
(what a chain goes on proposing past the mismatch), with the draft's probability of each token. Step costs come
from the engine's own timeline: `step = a + d x draft forwards + v x verified nodes`, least squares over the steps
of `chain` and `sage_cost` generations of the same scenes. With those it replays, per scene:

* `chain L`: a chain of L tokens every step (L draft forwards, L verified nodes);
* `cum >= t`: a chain that stops where the draft's cumulative probability falls below t (the token that falls
  below is proposed: its forward already ran), at most 12 tokens;
* `p >= t`: the same on each token's own draft probability (the draft's confidence in that token alone, not in the
  whole chain so far): the stop a feature other than the cumulative mass would give;
* `oracle`: exactly the tokens the target will accept (no draft forward past the first wrong token);
* `sage_cost`: the default policy's own steps (their draft forwards and verified nodes), priced the same way.

Speed-ups are over `chain 5`, prefill excluded. The replay is exact for chains (a chain's acceptance follows from
the predictions; the draft stops below an EOS as the engine does); what it leaves out is only the time the costs'
fit does not explain. The draft must see the image as the target does (draft prune ratio 0: the LLaVA pair).

    python benchmarks/bench_chain_ceiling.py [--scenes 20] [--scene-offset 200]   # ~1 min on 2 cores
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
from sage_ext.cli.runs import machine_name  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.fixtures import PAIRS  # noqa: E402

MAX_CHAIN = 12  # the default policy's depth bound
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9)  # on the cumulative probability
TOKEN_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # on each token's own probability


def draft_trace(draft, inputs: dict, output: list[int], eos: set[int]) -> dict:
    """The draft's greedy prediction and its probability at every output position given the true prefix, and,
    after each wrong prediction, the probabilities of its own greedy continuation (up to MAX_CHAIN tokens)."""
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    prompt_len = inputs["input_ids"].shape[1]
    full = torch.cat([inputs["input_ids"], torch.tensor([output])], 1)
    probs = draft(**media, input_ids=full).logits[0, prompt_len - 1: prompt_len - 1 + len(output)].softmax(-1)
    top_p, top = probs.max(-1)
    branches = {}
    for m, (guess, truth) in enumerate(zip(top.tolist(), output)):
        if guess == truth or guess in eos:
            continue
        ids, branch = torch.cat([full[:, : prompt_len + m], torch.tensor([[guess]])], 1), []
        for _ in range(MAX_CHAIN):
            p, t = draft(**media, input_ids=ids).logits[0, -1].softmax(-1).max(-1)
            branch.append(p.item())
            if t.item() in eos:
                break
            ids = torch.cat([ids, t.view(1, 1)], 1)
        branches[m] = branch
    return {"output": output, "guess": top.tolist(), "p": top_p.tolist(), "branches": branches}


def chain_from(trace: dict, j: int, eos: set[int]) -> tuple[list[float], int]:
    """The probabilities of the draft's greedy chain proposed at output position j (at most MAX_CHAIN tokens, none
    below an EOS it proposes) and how many of its tokens the target accepts."""
    output, guess, p, branches = trace["output"], trace["guess"], trace["p"], trace["branches"]
    probs, accepted = [], 0
    for q in range(MAX_CHAIN):
        if j + q >= len(output):
            break
        probs.append(p[j + q])
        if guess[j + q] != output[j + q]:
            probs += branches.get(j + q, [])[: MAX_CHAIN - q - 1]
            break
        accepted += 1
        if output[j + q] in eos:
            break
    return probs, accepted


def replay(traces: list[dict], length_of, costs: tuple[float, float, float], eos: set[int]) -> tuple[float, int]:
    """(seconds, steps) of decoding every trace with chains of ``length_of(probs, accepted)`` tokens."""
    a, d, v = costs
    seconds, steps = 0.0, 0
    for trace in traces:
        j = 1  # the target's prefill gives the first token; the first step proposes from the second on
        while j < len(trace["output"]):
            probs, accepted = chain_from(trace, j, eos)
            length = length_of(probs, accepted)
            seconds += a + (d + v) * length
            steps += 1
            j += min(accepted, length) + 1
    return seconds, steps


def fixed(length: int):
    return lambda probs, accepted: min(length, len(probs))


def threshold_stop(threshold: float, cumulative: bool):
    """A chain that stops at the first token whose draft probability (``cumulative``: the chain's product so far;
    else the token's own) falls below ``threshold``; that token is proposed (its forward already ran)."""
    def length_of(probs, accepted):
        mass = 1.0
        for index, p in enumerate(probs):
            mass = mass * p if cumulative else p
            if mass < threshold:
                return index + 1
        return len(probs)
    return length_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--scene-offset", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = PAIRS["llava"]
    device = torch.device("cpu")
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), device, torch.float32)
    scenes = scene_inputs(processor, pair, pair.heldout_scenes(args.scenes, start=args.scene_offset), device,
                          torch.float32)
    eos_ids = target.generation_config.eos_token_id
    eos = set([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    engines = {name: SpeculativeGenerator(target, draft, name) for name in ("chain", "sage_cost")}
    outputs, steps = [], {name: [] for name in engines}
    with torch.inference_mode():
        for repeat in range(2):  # the first round warms up (and teaches sage_cost the pair's costs)
            for inputs in scenes:
                for name, engine in engines.items():
                    sequences, stats = engine.generate(**inputs, max_new_tokens=96)
                    if repeat:
                        steps[name].append(stats.steps)
                        if name == "chain":
                            outputs.append(sequences[0, inputs["input_ids"].shape[1]:].tolist())
        traces = [draft_trace(draft, inputs, output, eos) for inputs, output in zip(scenes, outputs)]
    rows = [(s.draft_forwards, s.tree_slots, s.time) for name in engines for run in steps[name] for s in run]
    design = torch.tensor([[1.0, f, n] for f, n, _ in rows], dtype=torch.float64)
    seconds = torch.tensor([[t] for *_, t in rows], dtype=torch.float64)
    costs = tuple(torch.linalg.lstsq(design, seconds).solution[:, 0].tolist())
    a, d, v = costs
    base, base_steps = replay(traces, fixed(5), costs, eos)
    results = {"chain 5": (base, base_steps)}
    for length in (8, 12):
        results[f"chain {length}"] = replay(traces, fixed(length), costs, eos)
    for threshold in THRESHOLDS:
        results[f"cum >= {threshold}"] = replay(traces, threshold_stop(threshold, cumulative=True), costs, eos)
    for threshold in TOKEN_THRESHOLDS:
        results[f"p >= {threshold}"] = replay(traces, threshold_stop(threshold, cumulative=False), costs, eos)
    results["oracle"] = replay(traces, lambda probs, accepted: accepted, costs, eos)
    policy_steps = [s for run in steps["sage_cost"] for s in run]
    results["sage_cost (its own steps)"] = (sum(a + d * s.draft_forwards + v * s.tree_slots for s in policy_steps),
                                            len(policy_steps))
    engine_chain_steps = sum(len(run) for run in steps["chain"])  # the replay of `chain 5` must match it
    machine = machine_name(device)
    lines = [f"# How long should a chain be? LLaVA pair, greedy ({machine})", "",
             f"`python benchmarks/bench_chain_ceiling.py --scenes {args.scenes} --scene-offset {args.scene_offset}`; "
             f"torch {torch.__version__}, {args.threads} threads; {args.scenes} held-out scenes from "
             f"{args.scene_offset}, up to 96 new tokens. Step costs fitted from the engine's timeline: "
             f"{a * 1e3:.2f} ms + {d * 1e3:.2f} ms per draft forward + {v * 1e3:.3f} ms per verified node. "
             "Replayed decoding times, prefill excluded, relative to a 5-token chain (the script's docstring); "
             f"the engine's own 5-token chain took {engine_chain_steps} steps.", "",
             "| proposal | steps | speed-up over chain 5 |", "| --- | ---: | ---: |"]
    for name, (total, count) in results.items():
        lines.append(f"| {name} | {count} | {base / total:.3f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"chain_ceiling_{slug(machine)}"
    (args.out_dir / f"{stem}.md").write_text(text)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({
        "machine": machine, "scenes": args.scenes, "scene_offset": args.scene_offset,
        "costs": {"step_s": a, "per_draft_forward_s": d, "per_verified_node_s": v},
        "engine_chain_steps": engine_chain_steps,
        "results": {name: {"seconds": total, "steps": count, "speedup_over_chain5": base / total}
                    for name, (total, count) in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
