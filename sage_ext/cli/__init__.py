"""The `sage-ext` command line (also `python -m sage_ext`): the parser and `main`, which checks the arguments and
runs one command; every error is one line (exit status 2 for a bad input, 1 for a failure while running).

Modules: validation (checks before anything is loaded, UsageError), models (fixture paths, devices, loading
models, building inputs), runs (timed runs, the tau convention, the machine's name), demo, generate,
bench (benchmark harness and Hugging Face baselines), tuning (the SAGE sweep), plots (the PNG charts).
"""
from __future__ import annotations

import argparse
import sys

import torch

from .bench import DEFAULT_BENCH_DIR, BENCH_POLICIES, cmd_bench
from .demo import cmd_demo
from .generate import cmd_generate
from .models import FIXTURE_NAME, env_flag
from .validation import DEVICE_MAPS, UsageError, ranged, validate_args

__all__ = ["UsageError", "build_parser", "main"]

#: What `sage-ext --help` says above the commands.
DESCRIPTION = """`sage-ext` command line: demo, generate and bench.

    sage-ext demo                      # SAGE on the bundled fixture pair over a few held-out scenes, + PNG plot
    sage-ext generate --target T --draft D --image img.png --prompt "Describe the image."
    sage-ext bench                     # all policies + HF assisted generation, JSON + PNG chart

(also `python -m sage_ext ...`). Conventions printed by every command: tau = accepted DRAFT tokens per
step (the SAGE paper's accepted length); each step also emits one target token, so tokens per target
forward = tau + 1. Speedups are wall-clock against target-only greedy decoding by the same engine
(policy "ar") unless a line says otherwise.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``sage-ext generate: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_POSITIVE_INT = ranged(int, low=1, what=">= 1")
_NONNEGATIVE_INT = ranged(int, low=0, what=">= 0")


def _flags() -> argparse.ArgumentParser:
    """--debug / --quiet / --progress, accepted before or after the command (SUPPRESS: no default clobbers
    the other position's value)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full Python traceback of an error (or set SAGE_EXT_DEBUG=1)")
    flags.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                       help="print only the results (no progress bars, no info lines)")
    flags.add_argument("--progress", action="store_true", default=argparse.SUPPRESS,
                       help="show transformers' model-loading progress bars")
    return flags


def _add_common(parser: argparse.ArgumentParser, models_required: bool) -> None:
    fixture = f"'{FIXTURE_NAME}' = the bundled LLaVA pair, '{FIXTURE_NAME}-qwen2vl' the bundled Qwen2-VL pair"
    parser.add_argument("--target", required=models_required,
                        help=f"target model folder or hub id ({fixture}; default: {FIXTURE_NAME}, or --pair's)")
    parser.add_argument("--draft", required=models_required,
                        help=f"draft model folder or hub id of the target's family ({fixture}; default: the bundled "
                             f"draft when the target is a bundled one)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float32 on CPU, the checkpoint's dtype on GPU")
    parser.add_argument("--threads", type=_POSITIVE_INT, default=None, help="torch CPU threads (default: torch's)")


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy-args", default=None,
                        help="policy overrides key=value,... (names of the policy's parameters), e.g. n_max=32,lag=False")


def _add_pair(parser: argparse.ArgumentParser) -> None:
    from ..fixtures import DEFAULT_PAIR, PAIRS

    parser.add_argument("--pair", default=DEFAULT_PAIR, choices=sorted(PAIRS),
                        help="bundled pair whose held-out scenes are run (and whose models, unless --target/--draft "
                             "name others): " + "; ".join(f"{n}: {p.description}" for n, p in PAIRS.items()))


def _add_device_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                        help="place each model over the visible GPUs with accelerate (needs accelerate); target and "
                             "draft may end up on different devices")


def _add_draft_prune_ratio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-prune-ratio", type=ranged(float, low=0.0, high=1.0, what="in [0, 1]"), default=None,
                        help="share of image tokens hidden from the draft, in [0, 1] (SpecVLM pruning; paper: 0.8-0.9); "
                             "default: the bundled draft's measured ratio (llava 0, qwen2vl 0.5), else 0")


def _add_sampling_rule(parser: argparse.ArgumentParser) -> None:
    from ..engine.loop import DEFAULT_SAMPLING_RULE, SAMPLING_RULES

    parser.add_argument("--sampling-rule", default=DEFAULT_SAMPLING_RULE, choices=SAMPLING_RULES,
                        help=f"how sampled trees are verified (default {DEFAULT_SAMPLING_RULE}): specinfer (node by node "
                             "from the root), traversal (Traversal Verification: leaf to root) or gumbel (each "
                             "position's token fixed by its own noise: a seed gives the same tokens with every "
                             "policy); all lossless")


def _add_capture_draft(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capture-draft", action="store_true",
                        help="run the draft's tree forwards captured (torch.compile with static shapes; CUDA graphs "
                             "on a GPU): each new shape compiles once (seconds), then a small draft's calls are "
                             "much cheaper; the output is the same")


def _version_text() -> str:
    from .. import __version__

    import transformers

    return f"sage-ext {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    from ..engine.policies import DEFAULT_POLICY, POLICIES

    policy_names = sorted(POLICIES)
    flags = _flags()
    parser = _Parser(prog="sage-ext", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                     parents=[flags])
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="SAGE on the bundled fixture pair over held-out scenes, with a plot",
                          parents=[flags])
    _add_common(demo, models_required=False)
    _add_policy_args(demo)
    demo.add_argument("--policy", default=DEFAULT_POLICY, choices=policy_names,
                      help=f"tree policy timed against target-only decoding (default {DEFAULT_POLICY}): ar (target "
                           "only), chain (draft's greedy chain), static (SpecVLM 25-node tree), dynamic (EAGLE-2), "
                           "sage (the paper's rules), sage_cost (SAGE with the depth cap that maximizes the measured "
                           "tokens/s)")
    _add_pair(demo)
    _add_draft_prune_ratio(demo)
    demo.add_argument("--scenes", type=_POSITIVE_INT, default=3)
    demo.add_argument("--scene-offset", type=_NONNEGATIVE_INT, default=0, help="first held-out scene index")
    demo.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=96)
    demo.add_argument("--plot", default="sage_demo.png",
                      help="PNG path of the plot: tokens per target forward per step, tokens/s against target-only")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="speculative generation for one image + prompt, streamed", parents=[flags])
    _add_common(gen, models_required=False)
    _add_policy_args(gen)
    _add_device_map(gen)
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", required=True,
                     help="text; without the image token it is wrapped by the chat template (or <image>\\nTEXT\\n)")
    gen.add_argument("--policy", default=DEFAULT_POLICY, choices=policy_names,
                     help=f"tree policy (default {DEFAULT_POLICY})")
    gen.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=None,
                     help="default: the target's generation config's length (as transformers' generate), else 64")
    gen.add_argument("--temperature", type=ranged(float, low=0.0, what=">= 0"), default=0.0,
                     help="0 = greedy (default); > 0 samples losslessly")
    gen.add_argument("--top-k", type=_NONNEGATIVE_INT, default=None, help="sampling top-k (0 = off)")
    gen.add_argument("--top-p", type=ranged(float, low=0.0, high=1.0, what="in [0, 1]"),
                     default=None, help="sampling top-p, in [0, 1] (0 keeps the most likely token only)")
    gen.add_argument("--repetition-penalty", type=ranged(float, low=0.0, low_open=True, what="> 0"), default=None,
                     help="transformers' repetition penalty (> 0; 1 = off); default: the target's generation config's")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (torch.Generator)")
    _add_sampling_rule(gen)
    _add_draft_prune_ratio(gen)
    _add_capture_draft(gen)
    gen.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, new token ids, stats) instead of the text")
    gen.add_argument("--stats-json", default=None, help="write the generation stats here")
    gen.set_defaults(func=cmd_generate)

    bench_choices = [*BENCH_POLICIES, "sage-tuned", "sage-cost-trees"]
    bench = sub.add_parser("bench", help="all policies + HF assisted generation on held-out scenes", parents=[flags])
    _add_common(bench, models_required=False)
    _add_device_map(bench)
    _add_pair(bench)
    _add_draft_prune_ratio(bench)
    bench.add_argument("--scenes", type=_POSITIVE_INT, default=8)
    bench.add_argument("--scene-offset", type=_NONNEGATIVE_INT, default=0)
    bench.add_argument("--tune-scenes", type=_POSITIVE_INT, default=6, help="scenes (disjoint) used to tune SAGE")
    bench.add_argument("--repeats", type=_POSITIVE_INT, default=3)
    bench.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=96)
    bench.add_argument("--temperature", type=ranged(float, low=0.0, what=">= 0"), default=0.0,
                       help="0 = greedy (default; outputs checked identical to ar); > 0 samples (tau and speed only)")
    _add_sampling_rule(bench)
    bench.add_argument("--policies", nargs="*", default=None, choices=bench_choices, metavar="POLICY",
                       help=f"subset of {', '.join(bench_choices)} (ar always runs)")
    bench.add_argument("--no-tune", dest="tune", action="store_false", help="skip the SAGE tuning sweep")
    _add_capture_draft(bench)
    bench.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                       help=f"folder for the JSON, markdown and PNG results (default: ./{DEFAULT_BENCH_DIR} in the "
                            f"current folder); created if needed")
    bench.add_argument("--name", default=None, help="output file stem (default e2e_<machine>)")
    bench.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)
    return parser


def _debug_requested(args) -> bool:
    return bool(getattr(args, "debug", False)) or env_flag("SAGE_EXT_DEBUG")


def _configure_output(args) -> None:
    """Model-loading progress bars off unless --progress; transformers' info/warnings off with --quiet."""
    from transformers.utils import logging as hf_logging

    if getattr(args, "progress", False):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    if getattr(args, "quiet", False):
        hf_logging.set_verbosity_error()


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(error, ValueError) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error is one line on stderr and a non-zero exit (2: a bad input, 1: a failure
    while running), the traceback only with --debug or SAGE_EXT_DEBUG=1."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a one-line argparse error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    debug = _debug_requested(args)
    prog = f"sage-ext {args.command}"
    try:
        _configure_output(args)
        validate_args(args)
        return int(args.func(args) or 0)
    except UsageError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's last resort: one line, traceback with --debug
        if debug:
            raise
        print(f"{prog}: error: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 1
