"""End-to-end benchmark of the speculative engine: `sage-ext bench` with the settings of the committed
results (benchmarks/results/e2e_<machine>.json / .png).

    python benchmarks/bench_e2e.py                 # bundled LLaVA pair, CPU, 2 threads
    python benchmarks/bench_e2e.py --pair qwen2vl  # bundled Qwen2-VL pair (its settings: QWEN2VL below)
    python benchmarks/bench_e2e.py --pair qwen2vl --temperature 0.7   # sampling: tau and speed
    python benchmarks/bench_e2e.py --device cuda   # any extra argument is passed to `sage-ext bench`

The logic lives in `sage_ext.cli.bench` (cmd_bench) so the installed `sage-ext bench` command runs the same
code; see benchmarks/README.md ("End-to-end benchmark") for what is measured and how to read it.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sage_ext.cli import main  # noqa: E402

DEFAULTS = ["bench", "--scenes", "20", "--repeats", "5", "--tune-scenes", "8", "--max-new-tokens", "96",
            "--out-dir", str(REPO_ROOT / "benchmarks" / "results")]

# The Qwen2-VL pair answers with ~200-token detailed descriptions over ~300 visual tokens: fewer, longer runs.
QWEN2VL = ["--scenes", "10", "--repeats", "3", "--tune-scenes", "4", "--max-new-tokens", "256"]

if __name__ == "__main__":
    extra = sys.argv[1:]
    if "qwen2vl" in extra:
        extra = [*QWEN2VL, *extra]
    if "--threads" not in extra and "--device" not in extra:
        extra = ["--threads", "2", *extra]
    command = "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:])
    sys.exit(main([*DEFAULTS, *extra, "--command-line", command.strip()]))
