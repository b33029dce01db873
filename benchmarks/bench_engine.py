"""Engine benchmarks: the engine's own per-step overhead, and bf16/fp16 near-tie flips.

Three modes (``--mode overhead|flips|prune|all``):

* ``overhead``: per-step engine time outside model forwards (``GenerationStats.engine_overhead``: the
  ``tree_ops`` + ``other`` time categories) for every policy (ar, chain, static, dynamic, sage), for the
  current engine and, in the same run, for the engine of an earlier git revision (``--baseline-rev``, loaded
  from ``git show`` as a side module), on the same models and prompts. Runs of the two engines alternate
  (ABBA) and the medians over ``--rounds`` rounds are reported, so a changing machine load hits both alike;
  the greedy outputs of both engines are checked to be identical. Models: a tiny random Llama
  (hidden 64, 2 layers) with a correlated draft, a ~5M-parameter random Llama (hidden 256, 4 layers,
  vocabulary 4096) with a correlated draft, and the bundled trained LLaVA fixture pair (5.6M target, 0.4M
  draft) when present. Writes ``results/engine_overhead_<device>.{json,md}``.
* ``flips``: in bfloat16/float16 the tree forward (many query rows, an explicit additive mask) may round
  differently from one-token decoding and flip a near-tie of the greedy argmax. Runs greedy SAGE and static
  (and ``ar``, the same engine without a tree, as a control) against ``target.generate(do_sample=False)``
  with both models in the same dtype, over ``--prompts`` prompts x ``--max-new-tokens`` tokens, for tiny
  random models of two families (Llama, Qwen2-VL) and the fixture pair; float32 is the control that must
  show no difference. Reports the share of sequences that differ and the mean position (0-based, in new
  tokens) of the first difference. Writes ``results/engine_dtype_flips_<device>.{json,md}``.

* ``prune``: draft-side visual token pruning on the fixture pair: SAGE's tau and tokens/s at prune ratios
  0, 0.5 and 0.85, and that the output does not change. Writes ``results/engine_prune_<device>.{json,md}``.

Run from the repository root (CPU, one thread by default)::

    python benchmarks/bench_engine.py --mode overhead
    python benchmarks/bench_engine.py --mode flips
    python benchmarks/bench_engine.py --mode all --quick      # smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sage_ext  # noqa: E402
from random_models import (  # noqa: E402  (benchmarks/random_models.py: the benchmarks' own random models)
    correlated_draft,
    qwen2_vl_inputs,
    random_llama,
    text_prompt,
    tiny_llama,
    tiny_qwen2_vl,
)
from sage_ext.cli.models import load_pair, scene_inputs  # noqa: E402
from sage_ext.cli.runs import cpu_model  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402

POLICIES = ("ar", "chain", "static", "dynamic", "sage")
RESULTS = ROOT / "benchmarks" / "results"
#: The engine before its TreeWorkspace (stop 7's Python engine; "before" in results/engine_overhead_cpu.md).
#: 1aa750f is the first engine (before any overhead work).
DEFAULT_BASELINE_REV = "180cadb"


# ---------------------------------------------------------------------------------------------- machine
def cpu_details() -> dict:
    """Vendor, family/model/stepping and the vector extensions that matter for bf16/fp16 (Linux)."""
    details: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return details
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("vendor_id", "cpu family", "model", "stepping") and key not in details:
            details[key] = value
        if key == "flags" and "flags" not in details:
            wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "f16c")
            details["flags"] = [flag for flag in wanted if flag in value.split()]
    return details


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_details": cpu_details(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "fixture": fixture_fingerprint(),
    }


def fixture_line(machine: dict) -> str:
    found = machine.get("fixture")
    if not found:
        return ""
    return (f" Fixture weights: target sha256 {found['target']['sha256']}…, draft {found['draft']['sha256']}… "
            f"(written {found['target']['modified']} UTC).")


def cpu_line(machine: dict) -> str:
    details = machine.get("cpu_details", {})
    ident = ", ".join(f"{key} {details[key]}" for key in ("cpu family", "model", "stepping") if key in details)
    flags = " ".join(details.get("flags", []))
    return f"{machine['cpu']} ({ident}; {flags}; {machine['cpu_count']} cores)"


def device_tag() -> str:
    return "cpu"


# ---------------------------------------------------------------------------------------------- models
def llama_5m(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A random ~5.3M-parameter Llama (hidden 256, 4 layers, 4 heads, vocabulary 4096) with large-std
    embeddings / lm_head, and a 24-token prompt."""
    return random_llama(256, 4, 4096, seed=seed), text_prompt(24, seed)


def fixture_pair(dtype: torch.dtype = torch.float32):
    """The bundled trained LLaVA pair and its processor (loaded like `sage-ext` does), or None when the fixture
    folders are missing."""
    from sage_ext.fixtures import DRAFT_DIR, TARGET_DIR

    if not (TARGET_DIR / "config.json").exists() or not (DRAFT_DIR / "config.json").exists():
        return None
    return load_pair(str(TARGET_DIR), str(DRAFT_DIR), torch.device("cpu"), dtype)


def fixture_fingerprint() -> dict | None:
    """Which fixture weights a run used (the pair is retrained now and then): sha256 prefixes and file times."""
    import hashlib

    from sage_ext.fixtures import DRAFT_DIR, TARGET_DIR

    found = {}
    for name, folder in (("target", TARGET_DIR), ("draft", DRAFT_DIR)):
        weights = folder / "model.safetensors"
        if not weights.exists():
            return None
        found[name] = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16],
                       "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(weights.stat().st_mtime))}
    return found


def fixture_prompts(processor, count: int, start: int = 0) -> list[dict]:
    """Caption prompts of held-out scenes, as `sage-ext bench` builds them."""
    from sage_ext.fixtures import PAIRS

    pair = PAIRS["llava"]
    return scene_inputs(processor, pair, pair.heldout_scenes(count, start=start), torch.device("cpu"), None)


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    """Floating inputs (pixel values) in the model dtype, everything else as is."""
    return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in inputs.items()}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def overhead_models(quick: bool) -> list[dict]:
    """(name, target, draft, prompts) for the overhead benchmark."""
    models = []
    target = tiny_llama()
    models.append({"name": "tiny-llama", "target": target, "draft": correlated_draft(target, noise=0.1),
                   "prompts": [text_prompt(12, seed) for seed in range(3)],
                   "about": "benchmarks/random_models.tiny_llama (hidden 64, 2 layers, vocab 96) + correlated draft "
                            "(noise 0.1)"})
    target, _ = llama_5m()
    models.append({"name": "llama-5M", "target": target, "draft": correlated_draft(target, noise=0.1),
                   "prompts": [text_prompt(24, seed) for seed in range(3)],
                   "about": "random Llama hidden 256, 4 layers, vocab 4096 + correlated draft (noise 0.1, same size)"})
    pair = fixture_pair()
    if pair is not None:
        target, draft, processor = pair
        models.append({"name": "fixture-llava", "target": target, "draft": draft,
                       "prompts": fixture_prompts(processor, 2 if quick else 3),
                       "about": "sage_ext/fixtures trained LLaVA pair (caption prompts of held-out scenes)"})
    for entry in models:
        entry["target_params"] = parameter_count(entry["target"])
        entry["draft_params"] = parameter_count(entry["draft"])
    return models


# ---------------------------------------------------------------------------------------------- baseline
def load_baseline_engine(rev: str):
    """The ``sage_ext.engine`` module of git revision ``rev`` (with that revision's policies), loaded as the side
    modules ``sage_ext._baseline_engine`` / ``sage_ext._baseline_policies`` on top of today's ops, families and
    stats. Returns (module, full commit hash) or (None, reason)."""
    try:
        commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        sources = {
            path: subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout
            for path in ("sage_ext/policies.py", "sage_ext/engine.py")
        }
    except (OSError, subprocess.CalledProcessError) as error:
        return None, f"baseline {rev!r} unavailable: {error}"
    # revisions before the engine package import these as sage_ext.stats / sage_ext.caches (today's modules)
    import importlib

    for old_name, today in (("sage_ext.stats", "sage_ext.engine.stats"), ("sage_ext.caches", "sage_ext.engine.caches")):
        sys.modules.setdefault(old_name, importlib.import_module(today))
    modules = {}
    for path, name in (("sage_ext/policies.py", "sage_ext._baseline_policies"),
                       ("sage_ext/engine.py", "sage_ext._baseline_engine")):
        source = sources[path].replace("from .policies import", "from ._baseline_policies import")
        module = types.ModuleType(name)
        module.__package__ = "sage_ext"
        module.__file__ = f"{commit[:10]}:{path}"
        sys.modules[name] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 (our own git history)
        modules[name] = module
    return modules["sage_ext._baseline_engine"], commit


# ---------------------------------------------------------------------------------------------- overhead
def run_once(generator, prompts: list[dict], max_new_tokens: int) -> dict:
    """Generate every prompt once; per-step engine overhead over all of them."""
    overhead = step_time = forward_time = 0.0
    steps = tokens = 0
    sequences = []
    for inputs in prompts:
        out = generator.generate(**inputs, max_new_tokens=max_new_tokens)
        stats = out.stats
        overhead += stats.time["tree_ops"] + stats.time["other"]
        forward_time += stats.time["draft_decode"] + stats.time["target_verify"]
        step_time += stats.step_time
        steps += len(stats.steps)
        tokens += stats.new_tokens
        sequences.append(out.sequences)
    return {"overhead_us": 1e6 * overhead / steps, "fraction": overhead / step_time,
            "forward_us": 1e6 * forward_time / steps, "step_us": 1e6 * step_time / steps,
            "steps": steps, "tokens": tokens, "sequences": sequences}


def bench_overhead(args) -> dict:
    torch.set_num_threads(args.threads)
    baseline, commit = load_baseline_engine(args.baseline_rev)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    report = {"machine": machine_info(), "clock": args.clock, "max_new_tokens": args.max_new_tokens,
              "rounds": args.rounds, "baseline": commit if baseline is not None else None,
              "baseline_note": None if baseline is not None else commit, "models": []}
    models = overhead_models(args.quick)
    for entry in models:
        model_report = {key: entry[key] for key in ("name", "about", "target_params", "draft_params")}
        model_report["policies"] = {}
        for policy in args.policies:
            engines = {"after": SpeculativeGenerator(entry["target"], entry["draft"], policy)}
            if baseline is not None:
                engines["before"] = baseline.SpeculativeGenerator(entry["target"], entry["draft"], policy)
            for generator in engines.values():
                generator.host_clock = clock
                run_once(generator, entry["prompts"][:1], args.max_new_tokens)  # warm-up
            runs = {name: [] for name in engines}
            order = list(engines)
            for round_index in range(args.rounds):
                for name in order if round_index % 2 == 0 else order[::-1]:  # ABBA
                    runs[name].append(run_once(engines[name], entry["prompts"], args.max_new_tokens))
            result = {}
            for name, samples in runs.items():
                result[name] = {
                    "overhead_us": statistics.median(s["overhead_us"] for s in samples),
                    "fraction": statistics.median(s["fraction"] for s in samples),
                    "forward_us": statistics.median(s["forward_us"] for s in samples),
                    "step_us": statistics.median(s["step_us"] for s in samples),
                    "overhead_us_runs": [round(s["overhead_us"], 2) for s in samples],
                    "steps": samples[0]["steps"], "tokens": samples[0]["tokens"],
                }
            if "before" in runs:
                same = all(torch.equal(a, b) for a, b in zip(runs["before"][0]["sequences"],
                                                              runs["after"][0]["sequences"]))
                result["identical_outputs"] = same and runs["before"][0]["steps"] == runs["after"][0]["steps"]
            model_report["policies"][policy] = result
            line = " ".join(f"{name} {r['overhead_us']:7.1f} us ({100 * r['fraction']:4.1f}%)"
                            for name, r in result.items() if isinstance(r, dict))
            print(f"{entry['name']:14s} {policy:8s} {line}", flush=True)
        report["models"].append(model_report)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    return report


def overhead_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Engine overhead per step (CPU)",
        "",
        f"CPU: {cpu_line(machine)}, torch {machine['torch']}, "
        f"{machine['torch_threads']} thread(s), clock `{report['clock']}`, load average "
        f"{machine['load_average_start'][0]:.1f} at start / {machine['load_average_end'][0]:.1f} at end.",
        f"Engine overhead = `tree_ops + other` time per step (everything outside the model forwards), median of "
        f"{report['rounds']} alternating rounds, each over the model's prompts x {report['max_new_tokens']} new "
        f"tokens, greedy. before = engine of commit `{(report['baseline'] or 'n/a')[:10]}`, after = this tree.",
        "",
        "| model | policy | before µs/step | before % of step | after µs/step | after % of step "
        "| forwards µs/step | same output |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for model in report["models"]:
        for policy, result in model["policies"].items():
            before, after = result.get("before"), result["after"]
            before_cells = (f"{before['overhead_us']:.1f} | {100 * before['fraction']:.1f}" if before else "- | -")
            lines.append(f"| {model['name']} | {policy} | {before_cells} | {after['overhead_us']:.1f} | "
                         f"{100 * after['fraction']:.1f} | {after['forward_us']:.0f} | "
                         f"{result.get('identical_outputs', '-')} |")
    lines += ["", "Models:" + fixture_line(machine)]
    for model in report["models"]:
        lines.append(f"- {model['name']}: {model['about']}; target {model['target_params'] / 1e6:.2f}M, "
                     f"draft {model['draft_params'] / 1e6:.2f}M parameters.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- flips
def flip_model_sets(count: int):
    """(name, target fp32, draft fp32, prompts) for the precision benchmark: the tiny random models (large-std
    lm_head: separated argmaxes), the trained fixture pair (realistic), and HF-default-init Llamas (nearly
    uniform logits: the stress case)."""
    text_prompts = [text_prompt(12, 100 + i) for i in range(count)]
    target = tiny_llama()
    yield "tiny-llama", target, correlated_draft(target, noise=0.1), text_prompts
    target = tiny_qwen2_vl()
    yield ("tiny-qwen2-vl", target, correlated_draft(target, noise=0.1),
           [qwen2_vl_inputs(target, (1, 12, 16), 100 + i, 12) for i in range(count)])
    pair = fixture_pair()
    if pair is not None:
        target, draft, processor = pair
        yield "fixture-llava", target, draft, fixture_prompts(processor, count)
    target = random_llama(64, 2, 96, large_logits=False)
    yield "tiny-llama-default-init", target, correlated_draft(target, noise=0.1), text_prompts
    target = random_llama(256, 4, 4096, large_logits=False)
    yield "llama-5M-default-init", target, correlated_draft(target, noise=0.1), text_prompts


FLIP_MODELS = {
    "tiny-llama": "benchmarks/random_models.tiny_llama (hidden 64, 2 layers, vocab 96, large-std lm_head: separated "
                  "argmaxes), random 12-token prompts",
    "tiny-qwen2-vl": "benchmarks/random_models.tiny_qwen2_vl (M-RoPE, 48 image tokens, large-std lm_head), random "
                     "prompts and pixels",
    "fixture-llava": "the trained sage_ext/fixtures LLaVA pair (5.6M / 0.4M), caption prompts of held-out scenes",
    "tiny-llama-default-init": "Llama hidden 64, 2 layers, vocab 96 with HF's default init (nearly uniform "
                               "logits: near-ties at most tokens, the stress case)",
    "llama-5M-default-init": "Llama hidden 256, 4 layers, vocab 4096 (5.3M) with HF's default init (stress case)",
}


def first_difference(reference: torch.Tensor, other: torch.Tensor, prompt_len: int) -> int | None:
    """0-based index (in new tokens) of the first difference, None when the sequences are equal."""
    a, b = reference[0, prompt_len:].tolist(), other[0, prompt_len:].tolist()
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def bench_flips(args) -> dict:
    torch.set_num_threads(args.threads)
    report = {"machine": machine_info(), "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "dtypes": args.dtypes, "policies": ["sage", "static", "ar"], "results": []}
    for name, target32, draft32, prompts in flip_model_sets(args.prompts):
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            target = copy.deepcopy(target32).to(dtype)
            draft = copy.deepcopy(draft32).to(dtype)
            started = time.perf_counter()
            references = []
            with torch.no_grad():
                for inputs in prompts:
                    references.append(target.generate(**cast_inputs(inputs, dtype), do_sample=False,
                                                      max_new_tokens=args.max_new_tokens))
            for policy in report["policies"]:
                generator = SpeculativeGenerator(target, draft, policy)
                firsts, new_tokens = [], 0
                for inputs, reference in zip(prompts, references):
                    out = generator.generate(**cast_inputs(inputs, dtype), max_new_tokens=args.max_new_tokens)
                    prompt_len = inputs["input_ids"].shape[1]
                    firsts.append(first_difference(reference, out.sequences, prompt_len))
                    new_tokens += reference.shape[1] - prompt_len
                differing = [f for f in firsts if f is not None]
                result = {
                    "model": name, "dtype": dtype_name, "policy": policy, "sequences": len(prompts),
                    "differing": len(differing), "fraction_differing": len(differing) / len(prompts),
                    "mean_first_difference": statistics.mean(differing) if differing else None,
                    "first_differences": firsts, "reference_new_tokens": new_tokens,
                }
                report["results"].append(result)
                print(f"{name:14s} {dtype_name:9s} {policy:7s} differ {len(differing):3d}/{len(prompts)}"
                      f"  mean first diff {result['mean_first_difference']}", flush=True)
            report.setdefault("seconds", {})[f"{name}/{dtype_name}"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    return report


def fp16_note(report: dict) -> str:
    flags = report["machine"].get("cpu_details", {}).get("flags", [])
    native = [flag for flag in ("avx512_fp16", "amx_fp16") if flag in flags]
    seconds = report.get("seconds", {})
    timing = ", ".join(f"{key} {value:.0f} s" for key, value in seconds.items()
                      if key.rsplit("/", 1)[-1] in ("bfloat16", "float16"))
    support = (f"this CPU has native fp16 arithmetic ({', '.join(native)})" if native else
               "this CPU has no native fp16 arithmetic (no avx512_fp16 / amx_fp16): fp16 matmuls take slower "
               "converted paths, still quick enough at these sizes")
    return f"float16: {support}. Wall time per model and dtype (reference + 3 policies): {timing}."


def flips_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Greedy output vs `target.generate` in reduced precision (CPU)",
        "",
        f"CPU: {cpu_line(machine)}, torch {machine['torch']}, {machine['torch_threads']} thread(s). "
        f"{report['prompts']} prompts x up to {report['max_new_tokens']} new tokens per model; target and draft "
        f"both in the dtype; reference = `target.generate(do_sample=False)` in the same dtype. "
        f"`ar` runs the same engine without a tree (one token per target forward, explicit additive mask): "
        f"a control for differences that come from the mask path rather than the tree. First difference = "
        f"0-based index among the new tokens, averaged over the sequences that differ.",
        "",
        fp16_note(report),
        "",
        "| model | dtype | policy | sequences differing | share | mean first difference |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        mean = "-" if r["mean_first_difference"] is None else f"{r['mean_first_difference']:.1f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['policy']} | {r['differing']}/{r['sequences']} | "
                     f"{100 * r['fraction_differing']:.0f}% | {mean} |")
    lines += ["", "Models (draft: the target's weights plus 10% noise, except the fixture's own draft):"
              + fixture_line(machine)]
    lines += [f"- {name}: {about}" for name, about in FLIP_MODELS.items()
              if any(r["model"] == name for r in report["results"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- pruning
PRUNE_RATIOS = (0.0, 0.5, 0.85)


def bench_prune(args) -> dict:
    """Draft-side visual pruning on the fixture pair: SAGE's tau and speed at several prune ratios (the
    output is the same at every ratio; only the draft's view of the image changes)."""
    torch.set_num_threads(args.threads)
    pair = fixture_pair()
    if pair is None:
        raise SystemExit("the fixture pair is missing")
    target, draft, processor = pair
    prompts = fixture_prompts(processor, 3 if args.quick else 8)
    rows, reference = [], None
    for ratio in PRUNE_RATIOS:
        generator = SpeculativeGenerator(target, draft, "sage", draft_prune_ratio=ratio)
        generator.generate(**prompts[0], max_new_tokens=8)  # warm-up
        taus, seconds, tokens, outputs = [], 0.0, 0, []
        for inputs in prompts:
            start = time.perf_counter()
            out = generator.generate(**inputs, max_new_tokens=args.max_new_tokens)
            seconds += time.perf_counter() - start
            taus.append(out.stats.mean_tau)
            tokens += out.stats.new_tokens
            outputs.append(out.sequences)
        reference = reference or outputs
        rows.append({"ratio": ratio, "mean_tau": statistics.mean(taus), "tokens_per_second": tokens / seconds,
                     "same_output_as_ratio_0": all(torch.equal(a, b) for a, b in zip(outputs, reference))})
        print(f"prune ratio {ratio:.2f}: tau {rows[-1]['mean_tau']:.2f}, {rows[-1]['tokens_per_second']:.0f} tok/s")
    return {"machine": machine_info(), "fixture": fixture_fingerprint(), "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "rows": rows}


def prune_markdown(report: dict) -> str:
    lines = ["# Draft-side visual pruning on the fixture pair (CPU)", "",
             f"{cpu_line(report['machine'])}. SAGE (paper defaults), greedy, {report['prompts']} held-out caption "
             f"prompts x {report['max_new_tokens']} new tokens; the draft sees 16 image tokens unpruned. "
             f"`python benchmarks/bench_engine.py --mode prune --max-new-tokens {report['max_new_tokens']}`.", "",
             "| prune ratio | tau | tokens/s | same output as ratio 0 |", "| ---: | ---: | ---: | --- |"]
    lines += [f"| {r['ratio']:.2f} | {r['mean_tau']:.2f} | {r['tokens_per_second']:.0f} | {r['same_output_as_ratio_0']} |"
              for r in report["rows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def write(report: dict, stem: str, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(f"wrote {RESULTS / stem}.json and .md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("overhead", "flips", "prune", "all"), default="overhead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="overhead: alternating rounds per engine")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV, help="git revision of the 'before' engine")
    parser.add_argument("--clock", choices=("perf", "thread"), default="perf",
                        help="host clock of the time statistics (thread: CPU time of this thread)")
    parser.add_argument("--prompts", type=int, default=30, help="flips: prompts per model")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds and prompts, no result files")
    parser.add_argument("--output-suffix", default="", help="appended to the result file names")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.prompts, args.max_new_tokens = 2, 3, 24
    print(f"sage_ext {Path(sage_ext.__file__).parent}, CPU {cpu_model()}, {args.threads} thread(s)")
    if args.mode in ("overhead", "all"):
        report = bench_overhead(args)
        if not args.quick:
            write(report, f"engine_overhead_{device_tag()}{args.output_suffix}", overhead_markdown(report))
    if args.mode in ("flips", "all"):
        report = bench_flips(args)
        if not args.quick:
            write(report, f"engine_dtype_flips_{device_tag()}{args.output_suffix}", flips_markdown(report))
    if args.mode in ("prune", "all"):
        report = bench_prune(args)
        if not args.quick:
            write(report, f"engine_prune_{device_tag()}{args.output_suffix}", prune_markdown(report))


if __name__ == "__main__":
    main()
