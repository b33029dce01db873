"""What a text-only draft gives a vision-language target, against a draft that sees the image.

A vision-language target may draft with a text-only causal LM of its tokenizer (docs/MODELS.md, "Text-only
drafts"): it reads the prompt's text alone. Here, on each bundled pair, the bundled vision-language draft is
measured against the same draft without its eyes: its language model and head as a causal LM
(`LlamaForCausalLM` / `Qwen2ForCausalLM`, the weights unchanged), which drafts from the prompt's text. Per policy:
tau and tokens/s over held-out scenes, both drafts and target-only decoding (ar) taking turns within each round
(the order reversed every other round), medians over rounds; every greedy output checked identical to ar's.
Writes ``results/text_draft_<machine>.{json,md}``.

    python benchmarks/bench_text_draft.py --name text_draft_xeon-2-cores     # ~4 min on 2 cores
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
from sage_ext.families.model_access import text_decoder  # noqa: E402
from sage_ext.fixtures import PAIRS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ("chain", "static", "sage", "sage_cost")
# the causal-LM model type of a vision-language decoder config that has no causal-LM class of its own
CAUSAL_LM_TYPES = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2"}


def language_model_of(vlm: torch.nn.Module) -> torch.nn.Module:
    """``vlm``'s language model and head as a text-only causal LM (same weights, same generation config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text_config = vlm.config.get_text_config(decoder=True)
    causal_type = CAUSAL_LM_TYPES.get(text_config.model_type)
    if causal_type is not None:  # the same decoder with 1-D rope (the M-RoPE sections dropped)
        fields = {key: value for key, value in text_config.to_dict().items()
                  if key not in ("model_type", "rope_scaling", "rope_parameters", "architectures")}
        text_config = AutoConfig.for_model(causal_type, **fields)
    model = AutoModelForCausalLM.from_config(text_config, attn_implementation="sdpa", dtype=vlm.dtype)
    model.model.load_state_dict(text_decoder(vlm).state_dict())
    model.get_output_embeddings().load_state_dict(vlm.get_output_embeddings().state_dict())
    model.generation_config = vlm.generation_config
    return model.eval()


def run(generator: SpeculativeGenerator, prompts: list[dict], max_new_tokens: int) -> dict:
    """One pass over the prompts: tokens/s, tau, the outputs."""
    tokens, accepted, steps, outputs = 0, 0, 0, []
    start = time.perf_counter()
    for prompt in prompts:
        out = generator.generate(**prompt, max_new_tokens=max_new_tokens)
        tokens += out.stats.new_tokens
        accepted += sum(step.tau for step in out.stats.steps)
        steps += len(out.stats.steps)
        outputs.append(out.sequences)
    return {"tokens_per_second": tokens / (time.perf_counter() - start), "tau": accepted / steps, "outputs": outputs}


def measure_pair(name: str, args) -> dict:
    pair = PAIRS[name]
    target, draft, processor = load_pair(str(pair.target_dir), str(pair.draft_dir), torch.device("cpu"), torch.float32)
    text_draft = language_model_of(draft)
    prompts = scene_inputs(processor, pair, pair.heldout_scenes(args.scenes, start=args.scene_offset),
                           torch.device("cpu"), None)
    runners = {"ar": SpeculativeGenerator(target, None, "ar")}
    for policy in args.policies:
        runners[f"{policy}/vision draft"] = SpeculativeGenerator(target, draft, policy,
                                                                 draft_prune_ratio=pair.draft_prune_ratio)
        runners[f"{policy}/text draft"] = SpeculativeGenerator(target, text_draft, policy)
    for runner in runners.values():  # warm-up (sage_cost's learning included, as a process that decodes a while)
        run(runner, prompts[:1], args.max_new_tokens)
    samples: dict[str, list[dict]] = {key: [] for key in runners}
    identical = {key: True for key in runners}
    reference = None
    for round_index in range(args.rounds):
        order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
        for key in order:
            result = run(runners[key], prompts, args.max_new_tokens)
            outputs = result.pop("outputs")
            if key == "ar" and reference is None:
                reference = outputs
            samples[key].append(result)
            if reference is not None:
                identical[key] &= all(torch.equal(a, b) for a, b in zip(outputs, reference))
        print(f"[{name}] round {round_index + 1}/{args.rounds}", flush=True)
    summary = {key: {field: statistics.median(s[field] for s in runs) for field in ("tokens_per_second", "tau")}
               for key, runs in samples.items()}
    return {"pair": name, "draft_prune_ratio": pair.draft_prune_ratio, "summary": summary, "samples": samples,
            "identical_to_ar": identical,
            "draft_parameters": sum(p.numel() for p in draft.parameters()),
            "text_draft_parameters": sum(p.numel() for p in text_draft.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--scene-offset", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--name", default="text_draft_cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = [measure_pair(name, args) for name in args.pairs]
    report = {"machine": cpu_model(), "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds,
              "scenes": args.scenes, "scene_offset": args.scene_offset, "max_new_tokens": args.max_new_tokens,
              "pairs": pairs,
              "command": "python benchmarks/bench_text_draft.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    lines = ["# A text-only draft against the vision-language draft it comes from (CPU)", "",
             f"{report['machine']}, {args.threads} threads, torch {torch.__version__}; float32, {args.scenes} held-out "
             f"scenes from {args.scene_offset} x {args.max_new_tokens} new tokens, greedy; {args.rounds} rounds "
             f"(order reversed every other round), medians. `{report['command'].strip()}`.", "",
             "The text draft is the bundled draft's language model and head alone (same weights): it reads the "
             "prompt's text, never the image. Speed-ups are over target-only decoding (ar) in the same rounds.", ""]
    for result in pairs:
        summary, ar = result["summary"], result["summary"]["ar"]["tokens_per_second"]
        lines += [f"## {result['pair']} pair (vision draft: prune ratio {result['draft_prune_ratio']})", "",
                  "| policy | tau, vision draft | tau, text draft | speed-up, vision draft | speed-up, text draft | "
                  "outputs identical to ar |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for policy in args.policies:
            vision, text = summary[f"{policy}/vision draft"], summary[f"{policy}/text draft"]
            same = result["identical_to_ar"][f"{policy}/vision draft"] and result["identical_to_ar"][f"{policy}/text draft"]
            lines.append(f"| {policy} | {vision['tau']:.2f} | {text['tau']:.2f} | "
                         f"{vision['tokens_per_second'] / ar:.2f}x | {text['tokens_per_second'] / ar:.2f}x | {same} |")
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
