"""`sage-ext bench`: every policy and the Hugging Face baselines (``generate`` greedy, and assisted generation with
the draft) on held-out fixture scenes, interleaved per scene, medians of repeats; the target's verify-cost curve; the
optional SAGE tuning sweep (tuning.py); the JSON + markdown + PNG report (chart: plots.plot_bench).
benchmarks/bench_e2e.py runs it with the settings of the committed results.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import models
from .plots import plot_bench
from .runs import CONVENTION, machine_name, run_engine, sync
from .tuning import BENCH_GRID, tune_sage
from .validation import UsageError
from ..engine.loop import DEFAULT_SAMPLING_RULE


BENCH_POLICIES = ("ar", "hf-greedy", "hf-assisted", "chain", "static", "dynamic", "sage", "sage-cost")

#: `sage-ext bench` writes here (in the current folder) unless --out names a folder.
DEFAULT_BENCH_DIR = "sage-ext-bench"

IMAGE_INPUT_KEYS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "image_features")


class ForwardCounter:
    """Counts forward calls of a module and whether any call carried image inputs (used to count HF
    assisted generation's target forwards and to check what its assistant is given)."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.saw_image = False
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs):
        self.count += 1
        self.saw_image = self.saw_image or any(kwargs.get(key) is not None for key in IMAGE_INPUT_KEYS)

    def close(self) -> None:
        self._handle.remove()


def run_hf(target, draft, inputs: dict, max_new_tokens: int, device: torch.device, temperature: float = 0.0) -> dict:
    """HF `generate`, greedy (or sampling at `temperature` > 0), assisted by `draft` when given (`hf_assistant`).
    tau: new tokens per target forward - 1 (every target forward of assisted generation verifies a candidate block
    and adds one token)."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    counter = ForwardCounter(target)
    draft_counter = ForwardCounter(draft) if draft is not None else None
    try:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(**inputs, max_new_tokens=max_new_tokens, **sampling,
                                  assistant_model=draft, num_beams=1)
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        counter.close()
        if draft_counter is not None:
            draft_counter.close()
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    run = {"ids": ids, "stats": None, "seconds": seconds, "target_forwards": counter.count}
    if draft_counter is not None:
        run.update(draft_forwards=draft_counter.count, draft_saw_image=draft_counter.saw_image)
    return run


def vocab_sizes_differ(target, draft) -> bool:
    return target.config.get_text_config().vocab_size != draft.config.get_text_config().vocab_size


def hf_assistant(target, draft):
    """The draft HF's assisted generation gets: `draft` itself, or, when its vocabulary is padded to another size
    than the target's (real Qwen pairs: 151936 vs 152064), a copy resized to the target's: HF refuses different
    sizes unless run as universal assisted decoding, which re-tokenizes text between the models and failed mid-
    generation on the bundled Qwen2-VL pair (transformers 5.x: an empty draft prefill). The rows cut or added are
    padding, no token of the tokenizer the two share; the engine itself takes the padded draft as it is."""
    import copy

    if not vocab_sizes_differ(target, draft):
        return draft
    resized = copy.deepcopy(draft)
    resized.resize_token_embeddings(target.config.get_text_config().vocab_size, mean_resizing=False)
    return resized


def strip_after_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids


def slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(filter(None, keep.split("-")))[:60]


def measure_verify_curve(target, inputs: dict, sizes: list[int], device: torch.device, repeats: int = 5) -> list[dict]:
    """Seconds of one target forward over n new tokens on top of the cached prompt, for each n (the cost of
    verifying an n-node tree), through the family adapter's prefill and tree forward as the engine calls them (so
    M-RoPE families get their positions); a causal block as the tree costs the same as any tree mask."""
    from transformers import DynamicCache

    from ..families import get_adapter
    from ..families.base import causal_mask_4d

    adapter = get_adapter(target)
    curve = []
    with torch.inference_mode():
        cache = DynamicCache()
        adapter.prefill(inputs, cache)
        prompt_len = cache.get_seq_length()
        for n in sizes:
            tokens = torch.full((1, n), int(inputs["input_ids"][0, -1]), device=adapter.input_device)
            positions = torch.arange(prompt_len, prompt_len + n, device=adapter.input_device)[None]
            mask = causal_mask_4d(n, prompt_len, adapter.dtype, adapter.input_device)
            times = []
            for _ in range(repeats + 1):
                sync(device)
                start = time.perf_counter()
                adapter.forward_tree(tokens, positions, mask, cache)
                sync(device)
                times.append(time.perf_counter() - start)
                cache.crop(prompt_len - cache.get_seq_length())
            curve.append({"tokens": n, "seconds": statistics.median(times[1:])})
    return curve


def bench_policy_objects(tuned: dict | None):
    """name -> (policy object or marker string, description) in run order."""
    from ..engine import policies

    entries = {
        "ar": (policies.AutoregressivePolicy(), "target-only greedy by the engine (the baseline)"),
        "hf-greedy": ("hf-greedy", "transformers target.generate greedy, no draft (HF's own decoding loop)"),
        "hf-assisted": ("hf-assisted", "transformers target.generate(assistant_model=draft), default settings"),
        "chain": (policies.ChainPolicy(), "draft chain of 5 tokens"),
        "static": (policies.StaticTreePolicy(), "SpecVLM 25-node static tree (SD-Tree)"),
        "dynamic": (policies.DynamicTreePolicy(), "EAGLE-2 dynamic tree (depth 6, top-8, 64 nodes)"),
        "sage": (policies.SagePolicy(), "SAGE, paper defaults"),
        "sage-cost": (policies.CostAwareSagePolicy(), "SAGE whose depth cap maximizes the tokens per second it "
                      "measures as it runs, or the draft's greedy chain where that gave more (learned across the "
                      "bench's calls, warm-up included)"),
        "sage-cost-trees": (policies.CostAwareSagePolicy(chains=False), "sage-cost proposing trees only (chains=False: "
                            "what the chain choice adds; run only when named)"),
    }
    if tuned:
        entries["sage-tuned"] = (policies.SagePolicy(**tuned), f"SAGE tuned for this device: {tuned}")
    return entries


def _run_policy(name, policy, engines, target, hf_draft, inputs, max_new_tokens, device, temperature: float = 0.0,
                seed: int = 0) -> dict:
    """One generation of bench entry `name`; with `temperature` > 0 it samples (the engine from a generator seeded
    with `seed` on the engine's device, HF from torch's global generator)."""
    if temperature > 0:
        torch.manual_seed(seed)  # HF samples from the global generator
    if policy == "hf-assisted":
        return run_hf(target, hf_draft, inputs, max_new_tokens, device, temperature)
    if policy == "hf-greedy":
        return run_hf(target, None, inputs, max_new_tokens, device, temperature)
    if temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
        return run_engine(engines[name], inputs, max_new_tokens, device, do_sample=True, temperature=temperature,
                          top_k=0, generator=generator)  # top_k 0 like run_hf: pure temperature sampling
    return run_engine(engines[name], inputs, max_new_tokens, device, do_sample=False)  # greedy by definition


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from ..engine import SpeculativeGenerator
    from ..families import get_adapter
    from ..fixtures import DEFAULT_PAIR, PAIRS

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_obj
    dtype = models.pick_dtype(args.dtype, device)
    quiet = getattr(args, "quiet", False)
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else Path.cwd() / DEFAULT_BENCH_DIR
    out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {args.out_dir}: is a file, not a folder")
    pair = PAIRS[args.pair]
    target_path, draft_path = args.target, args.draft
    target, draft, processor = models.load_pair(target_path, draft_path, device, dtype, args.device_map)
    tokenizer = models.tokenizer_of(processor)
    machine = machine_name(device)
    bench_inputs = models.scene_inputs(processor, pair, pair.heldout_scenes(args.scenes, start=args.scene_offset),
                                       device, target.dtype)
    tune_inputs = models.scene_inputs(processor, pair, pair.heldout_scenes(args.tune_scenes, start=args.scene_offset + 5000),
                                      device, target.dtype)
    if not quiet:
        print(f"sage-ext bench on {machine}; {args.scenes} scenes x {args.repeats} repeats; {CONVENTION}; "
              f"results go to {out_dir}", flush=True)

    curve = measure_verify_curve(target, bench_inputs[0], [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128], device)
    print("target verify cost vs tree size: " + ", ".join(f"{c['tokens']}: {c['seconds'] * 1e3:.1f}ms" for c in curve))

    tuned, tuning_trials = None, []
    if args.tune:
        tuned, tuning_trials = tune_sage(target, draft, tune_inputs, args.max_new_tokens, device, BENCH_GRID,
                                         args.draft_prune_ratio)
        print(f"tuned SAGE parameters (A-B-B-A timed against the best so far on {args.tune_scenes} tuning scenes): {tuned or 'paper defaults'}")
    entries = bench_policy_objects(tuned if args.tune else None)
    if args.policies:
        entries = {k: v for k, v in entries.items() if k in args.policies or k == "ar"}
    else:
        del entries["sage-cost-trees"]  # an ablation: run only when named
    hf_draft = hf_assistant(target, draft) if "hf-assisted" in entries else draft
    if hf_draft is not draft:
        entries["hf-assisted"] = ("hf-assisted", entries["hf-assisted"][1] + "; the draft's padded vocabulary resized "
                                  "to the target's size, which HF requires (`hf_assistant`)")
    engines = {name: SpeculativeGenerator(target, draft, policy, draft_prune_ratio=args.draft_prune_ratio,
                                          capture_draft=args.capture_draft, sampling_rule=args.sampling_rule)
               for name, (policy, _) in entries.items() if not isinstance(policy, str)}

    temperature = args.temperature
    # warm-up, excluded from the numbers (a captured draft compiles its shapes here: a whole generation)
    warm_tokens = args.max_new_tokens if args.capture_draft else 8
    for name, (policy, _) in entries.items():
        _run_policy(name, policy, engines, target, hf_draft, tune_inputs[0], warm_tokens, device, temperature)

    runs: dict[str, list[list[dict]]] = {name: [] for name in entries}  # [repeat][scene]
    eos = set(get_adapter(target).eos_token_ids())
    with tqdm(total=args.repeats * len(entries) * len(bench_inputs), desc="bench", unit="run", file=sys.stderr,
              disable=quiet) as bar:
        names = list(entries)
        for repeat in range(args.repeats):
            for name in names:
                runs[name].append([])
            for i, inputs in enumerate(bench_inputs):
                # every policy runs scene i before any runs scene i + 1, so the load drift of a shared machine (its
                # speed moved a policy's speed-up nearly 2x between repeats when it ran all scenes back to back) hits all
                # alike; the order turns by one per scene, so none always runs right after the same other
                shift = (repeat * len(bench_inputs) + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    runs[name][-1].append(_run_policy(name, entries[name][0], engines, target, hf_draft, inputs,
                                                      args.max_new_tokens, device, temperature,
                                                      seed=1000 * repeat + i))
                    bar.update(1)

    reference = [strip_after_eos(r["ids"], eos) for r in runs["ar"][0]]
    summary = {}
    for name, (policy, description) in entries.items():
        repeat_seconds = [sum(r["seconds"] for r in rep) for rep in runs[name]]
        median_seconds = statistics.median(repeat_seconds)
        first = runs[name][0]
        tokens = sum(len(r["ids"]) for r in first)
        # Under sampling outputs differ by construction (losslessness there is tested statistically, not here).
        identical = None if temperature > 0 else all(
            strip_after_eos(r["ids"], eos) == ref for rep in runs[name] for r, ref in zip(rep, reference))
        row = {"description": description, "identical_to_ar": identical, "new_tokens": tokens,
               "median_seconds": median_seconds, "repeat_seconds": repeat_seconds,
               "tokens_per_second": tokens / median_seconds}
        if isinstance(policy, str):  # HF generate
            forwards = sum(r["target_forwards"] for r in first)
            row.update({"target_forwards": forwards, "tokens_per_target_forward": tokens / forwards,
                        "mean_tau": tokens / forwards - 1, "tau_note": "HF: new tokens / target forwards - 1 "
                        "(the first forward is the prompt forward that also verifies the first block)"})
            if "draft_forwards" in first[0]:
                row["draft_forwards"] = sum(r["draft_forwards"] for r in first)
                # transformers 5.x hands the target's pre-encoded image to the assistant only in some
                # cases; record whether the draft was ever given image inputs at all.
                row["draft_saw_image"] = any(r["draft_saw_image"] for r in first)
        else:
            steps = [s for r in first for s in r["stats"].steps]
            taus = [s.tau for s in steps]
            depth_max = max((s.tree_depth for s in steps), default=0)
            by_depth = []
            for d in range(1, depth_max + 1):
                eligible = [s for s in steps if s.tree_depth >= d]
                by_depth.append(sum(s.tau >= d for s in eligible) / len(eligible) if eligible else 0.0)
            times = {key: 0.0 for key in first[0]["stats"].time}
            median_repeat = runs[name][repeat_seconds.index(sorted(repeat_seconds)[len(repeat_seconds) // 2])]
            for r in median_repeat:
                for key, value in r["stats"].time.items():
                    times[key] += value
            row.update({
                "policy": policy.describe(), "steps": len(steps), "mean_tau": statistics.mean(taus) if taus else 0.0,
                "tokens_per_target_forward": (statistics.mean(taus) + 1) if taus else 0.0,
                "mean_tree_size": statistics.mean(s.tree_size for s in steps) if steps else 0.0,
                "mean_draft_forwards": statistics.mean(s.draft_forwards for s in steps) if steps else 0.0,
                "acceptance_by_depth": by_depth, "time_breakdown_seconds": times,
                "time_breakdown_fraction": {k: v / max(1e-12, sum(times.values())) for k, v in times.items()},
                "engine_overhead_per_step_ms": 1e3 * (times.get("tree_ops", 0) + times.get("other", 0)) / max(1, len(steps) / 1),
            })
            if name.startswith("sage"):
                row["tau_per_step"] = taus
                row["alpha_per_step"] = [s.alpha_measured for s in steps]
        summary[name] = row
    ar_seconds = summary["ar"]["median_seconds"]
    for row in summary.values():
        row["speedup_vs_ar"] = ar_seconds / row["median_seconds"]

    checks = {} if temperature > 0 else {
        "all_greedy_outputs_identical_to_ar": all(r["identical_to_ar"] for r in summary.values())}
    for name in ("sage", "sage-tuned"):
        if name in summary and "static" in summary:
            static_tau = summary["static"]["mean_tau"]
            checks[f"{name}_tau_over_static"] = summary[name]["mean_tau"] / static_tau if static_tau > 0 else None
        if name in summary and "hf-assisted" in summary:
            checks[f"{name}_speedup_over_hf_assisted"] = summary["hf-assisted"]["median_seconds"] / summary[name]["median_seconds"]
    sample_text = tokenizer.decode(reference[0], skip_special_tokens=True)
    report = {
        "machine": machine, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "pair": args.pair, "target": target_path,
        "draft": draft_path,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "scenes": args.scenes, "scene_offset": args.scene_offset, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "temperature": temperature, "convention": CONVENTION,
        "capture_draft": args.capture_draft, "draft_prune_ratio": args.draft_prune_ratio,
        "sampling_rule": args.sampling_rule if temperature > 0 else None,
        "command": "sage-ext " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line,
        "verify_cost_curve": curve, "tuned_sage_params": tuned, "tuning_trials": tuning_trials,
        "policies": summary, "checks": checks, "sample_output": sample_text,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("e2e_" + ("" if args.pair == DEFAULT_PAIR else f"{args.pair}_")
                         + ("" if temperature == 0 else f"t{temperature:g}_")
                         + (f"{args.sampling_rule}_" if temperature > 0 and args.sampling_rule != DEFAULT_SAMPLING_RULE
                            else "")
                         + slug(machine))
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(bench_markdown(report))
    plot_bench(report, png_path)

    print(f"\n{'policy':<12} {'tau':>6} {'tok/fwd':>8} {'tok/s':>8} {'speedup':>8}  identical")
    for name, row in summary.items():
        print(f"{name:<12} {row['mean_tau']:>6.2f} {row['tokens_per_target_forward']:>8.2f} "
              f"{row['tokens_per_second']:>8.1f} {row['speedup_vs_ar']:>7.2f}x  "
              f"{'n/a (sampling)' if row['identical_to_ar'] is None else row['identical_to_ar']}")
    print("checks: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in checks.items()}))
    print(f"wrote {json_path} and {png_path}")
    return 0 if checks.get("all_greedy_outputs_identical_to_ar", True) else 1


def bench_markdown(report: dict) -> str:
    """The report as a markdown table (written beside the JSON and the chart)."""
    from ..engine.stats import TIME_KEYS

    lines = [
        f"# sage-ext bench: {report['machine']}",
        "",
        f"`{report['command']}` — pair {report.get('pair', 'llava')}; torch {report['torch']}, "
        f"transformers {report['transformers']}, "
        f"{report['threads']} thread(s); target {report['target_params'] / 1e6:.2f}M, draft "
        f"{report['draft_params'] / 1e6:.2f}M parameters; {report['scenes']} held-out scenes x "
        f"{report['repeats']} repeats (median), up to {report['max_new_tokens']} new tokens, "
        + (f"sampling at temperature {report['temperature']}, no top-k / top-p, trees verified by the "
           f"{report.get('sampling_rule') or 'specinfer'} rule (outputs differ by design: no identity column)."
           if report.get("temperature") else "greedy.")
        + (f" The engine's draft sees {1 - report['draft_prune_ratio']:.0%} of the image tokens (draft prune ratio "
           f"{report['draft_prune_ratio']:g}; HF assisted generation's draft sees all)."
           if report.get("draft_prune_ratio") else "")
        + (" The draft's tree forwards run captured (`--capture-draft`: torch.compile, static shapes; compiled in "
           "the warm-up)." if report.get("capture_draft") else ""),
        f"{report['convention']}.",
        "",
        "| policy | tau | tokens / target forward | tokens/s | speedup vs ar | mean tree nodes | draft forwards / step "
        "| engine overhead ms / step | identical to ar |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in report["policies"].items():
        def cell(key, fmt="{:.2f}"):
            return fmt.format(row[key]) if row.get(key) is not None else "-"
        lines.append(
            f"| {name} | {cell('mean_tau')} | {cell('tokens_per_target_forward')} | {cell('tokens_per_second', '{:.1f}')} "
            f"| {cell('speedup_vs_ar')}x | {cell('mean_tree_size', '{:.1f}')} | {cell('mean_draft_forwards', '{:.1f}')} "
            f"| {cell('engine_overhead_per_step_ms', '{:.3f}')} "
            f"| {'n/a (sampling)' if row['identical_to_ar'] is None else row['identical_to_ar']} |")
    lines += ["", "Policies: " + "; ".join(f"**{n}**: {r['description']}" for n, r in report["policies"].items()) + ".",
              "", "Checks: " + ", ".join(f"{k} = {round(v, 3) if isinstance(v, float) else v}"
                                         for k, v in report["checks"].items()) + ".", ""]
    hf = report["policies"].get("hf-assisted")
    if hf and hf.get("draft_saw_image") is False:
        lines += ["hf-assisted: no draft forward received image inputs (neither pixel values nor pre-encoded image "
                  f"features) in transformers {report['transformers']} assisted generation, so its draft drafts blind.", ""]
    lines += ["Time breakdown (share of generation time):", "",
              "| policy | " + " | ".join(TIME_KEYS) + " |", "| --- |" + " ---: |" * len(TIME_KEYS)]
    for name, row in report["policies"].items():
        fractions = row.get("time_breakdown_fraction")
        if fractions:
            lines.append(f"| {name} | " + " | ".join(f"{100 * fractions.get(k, 0):.1f}%" for k in TIME_KEYS) + " |")
    lines += ["", "Acceptance by depth (P(accepted >= d | tree reached d)):", ""]
    for name, row in report["policies"].items():
        if row.get("acceptance_by_depth"):
            lines.append(f"- {name}: " + ", ".join(f"{v:.2f}" for v in row["acceptance_by_depth"]))
    tuned = report.get("tuned_sage_params")
    lines += ["", f"Tuned for this device (sage-tuned): {tuned if tuned else 'nothing (paper defaults kept)'}; "
              "every tuning trial is in the JSON (`tuning_trials`).", ""]
    return "\n".join(lines)
