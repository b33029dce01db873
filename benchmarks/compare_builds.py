"""Before/after of a change that touches the native code: the same benchmarks run alternately by two Python
environments, each with its own sage_ext build (an in-process baseline, as ``bench_engine.py --baseline-rev``
loads, cannot have its own ``_C``).

Two benchmarks, each run by the two environments in ABBA order for ``--rounds`` rounds (so a changing machine
load hits both alike), medians reported:

* ``overhead``: ``bench_engine.py --mode overhead --rounds 1`` (per-step engine time outside model forwards, and
  its share of the step), every policy, its three model pairs;
* ``e2e``: ``sage-ext bench`` on the bundled fixture pair (tokens/s of every policy and their ratio to ``ar``,
  greedy outputs checked identical to ``ar`` by the bench itself) with ``--scenes`` held-out scenes, no tuning.

Each environment runs the benchmark scripts of its own source tree (``--before-root`` / ``--after-root``), so the
"before" build needs a checkout of its revision, e.g.::

    git worktree add /tmp/wt-before d4331bb
    python -m venv --system-site-packages /tmp/venv-before
    (cd /tmp/wt-before && /tmp/venv-before/bin/python -m pip install --no-build-isolation -e .)
    python benchmarks/compare_builds.py --before-python /tmp/venv-before/bin/python --before-root /tmp/wt-before \\
        --before-name d4331bb --rounds 3

Writes ``results/compare_builds_<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ["ar", "chain", "static", "dynamic", "sage"]


def which_sage_ext(python: str) -> str:
    """The folder the environment imports sage_ext from (checked, so a run never measures the wrong build)."""
    return subprocess.run([python, "-c", "import sage_ext, os; print(os.path.dirname(sage_ext.__file__))"],
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout.strip()


def run_overhead(python: str, root: Path, max_new_tokens: int) -> dict:
    """One bench_engine overhead run (no in-process baseline); {model: {policy: (us per step, share)}}."""
    suffix = f"_compare_{os.getpid()}"
    subprocess.run([python, str(root / "benchmarks" / "bench_engine.py"), "--mode", "overhead", "--rounds", "1",
                    "--baseline-rev", "no-baseline", "--max-new-tokens", str(max_new_tokens),
                    "--output-suffix", suffix], check=True, cwd=root, stdout=subprocess.DEVNULL)
    written = root / "benchmarks" / "results" / f"engine_overhead_cpu{suffix}.json"
    report = json.loads(written.read_text())
    for extension in (".json", ".md"):
        (root / "benchmarks" / "results" / f"engine_overhead_cpu{suffix}{extension}").unlink(missing_ok=True)
    return {model["name"]: {policy: (result["after"]["overhead_us"], result["after"]["fraction"])
                            for policy, result in model["policies"].items()}
            for model in report["models"]}


def run_e2e(python: str, root: Path, scratch: Path, scenes: int, max_new_tokens: int, threads: int) -> dict:
    """One `sage-ext bench` run on the fixture pair; {policy: (tokens/s, identical to ar)}."""
    out = scratch / f"e2e_{time.monotonic_ns()}"
    subprocess.run([python, "-m", "sage_ext", "bench", "--quiet", "--no-tune", "--scenes", str(scenes),
                    "--repeats", "1", "--max-new-tokens", str(max_new_tokens), "--threads", str(threads),
                    "--policies", *POLICIES, "--out", str(out), "--name", "run"], check=True, cwd=root,
                   stdout=subprocess.DEVNULL)
    report = json.loads((out / "run.json").read_text())
    return {policy: (result["tokens_per_second"], result.get("identical_to_ar", True))
            for policy, result in report["policies"].items() if policy in POLICIES}


def median_table(samples: list[dict]) -> dict:
    """Per-key medians over runs of nested {key: {key: (value, share)}} or {key: (value, flag)}."""
    first = samples[0]
    table = {}
    for key, value in first.items():
        if isinstance(value, dict):
            table[key] = median_table([sample[key] for sample in samples])
        else:
            table[key] = [statistics.median(sample[key][0] for sample in samples),
                          statistics.median(sample[key][1] for sample in samples)
                          if isinstance(value[1], float) else all(sample[key][1] for sample in samples)]
    return table


def markdown(report: dict) -> str:
    before, after = report["before"]["name"], report["after"]["name"]
    lines = [
        f"# Before / after: `{before}` -> `{after}`", "",
        f"Machine: {report['machine']}, {report['threads']} thread(s) for e2e, 1 for overhead; {report['rounds']} "
        f"rounds, the two builds alternating (ABBA), medians. Command: `{report['command']}`.", "",
        "## Engine overhead per step (`bench_engine.py --mode overhead`, 64 new tokens)", "",
        f"| model | policy | {before} µs/step | {before} % of step | {after} µs/step | {after} % of step |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for model, policies in report["overhead"]["after"].items():
        for policy, (us, share) in policies.items():
            b_us, b_share = report["overhead"]["before"][model][policy]
            lines.append(f"| {model} | {policy} | {b_us:.1f} | {100 * b_share:.1f} | {us:.1f} | {100 * share:.1f} |")
    lines += ["", f"## End to end (`sage-ext bench`, fixture pair, {report['scenes']} held-out scenes, "
              f"{report['max_new_tokens']} new tokens)", "",
              f"| policy | {before} tokens/s | {after} tokens/s | after / before | greedy output = ar (both) |",
              "| --- | ---: | ---: | ---: | --- |"]
    for policy, (tps, same) in report["e2e"]["after"].items():
        b_tps, b_same = report["e2e"]["before"][policy]
        lines.append(f"| {policy} | {b_tps:.1f} | {tps:.1f} | {tps / b_tps:.3f} | {same and b_same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-python", required=True)
    parser.add_argument("--before-root", type=Path, required=True)
    parser.add_argument("--before-name", default="before")
    parser.add_argument("--after-python", default=sys.executable)
    parser.add_argument("--after-root", type=Path, default=ROOT)
    parser.add_argument("--after-name", default=None, help="default: the after tree's git HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None, help="result file stem suffix (default: <before>_<after>)")
    args = parser.parse_args(argv)
    after_name = args.after_name or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.after_root,
                                                   capture_output=True, text=True, check=True).stdout.strip()
    envs = {"before": (args.before_python, args.before_root.resolve()),
            "after": (args.after_python, args.after_root.resolve())}
    for name, (python, root) in envs.items():
        found = Path(which_sage_ext(python)).resolve()
        if found != root / "sage_ext":
            raise SystemExit(f"{name}: {python} imports sage_ext from {found}, not from {root / 'sage_ext'}")
    sys.path.insert(0, str(ROOT))
    from sage_ext.cli.runs import cpu_model

    samples: dict = {"overhead": {"before": [], "after": []}, "e2e": {"before": [], "after": []}}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for round_index in range(args.rounds):
            order = ["before", "after"] if round_index % 2 == 0 else ["after", "before"]
            for name in order:
                python, root = envs[name]
                samples["overhead"][name].append(run_overhead(python, root, 64))
                samples["e2e"][name].append(run_e2e(python, root, scratch, args.scenes, args.max_new_tokens,
                                                    args.threads))
                print(f"round {round_index + 1}/{args.rounds} {name}: sage {samples['e2e'][name][-1]['sage'][0]:.1f} "
                      f"tok/s, overhead {samples['overhead'][name][-1]}", flush=True)
    report = {
        "machine": cpu_model(), "threads": args.threads, "rounds": args.rounds, "scenes": args.scenes,
        "max_new_tokens": args.max_new_tokens, "command": "python benchmarks/compare_builds.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "before": {"name": args.before_name}, "after": {"name": after_name},
        "overhead": {name: median_table(runs) for name, runs in samples["overhead"].items()},
        "e2e": {name: median_table(runs) for name, runs in samples["e2e"].items()},
        "samples": samples,
    }
    stem = f"compare_builds_{args.name or f'{args.before_name}_{after_name}'}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
