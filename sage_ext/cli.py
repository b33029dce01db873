"""`sage-ext` command line: demo, generate and bench.

    sage-ext demo                      # SAGE on the bundled fixture pair over a few held-out scenes, + PNG plot
    sage-ext generate --target T --draft D --image img.png --prompt "Describe the image."
    sage-ext bench                     # all policies + HF assisted generation, JSON + PNG chart

(also `python -m sage_ext ...`). Conventions printed by every command: tau = accepted DRAFT tokens per
step (the SAGE paper's accepted length); each step also emits one target token, so tokens per target
forward = tau + 1. Speedups are wall-clock against target-only greedy decoding by the same engine
(policy "ar") unless a line says otherwise.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .families.base import cache_kwarg

CONVENTION = "tau = accepted draft tokens per step (paper convention); tokens per target forward = tau + 1"


# ---------------------------------------------------------------------------------------------
# checking the command line before anything is loaded
# ---------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad input the user can fix: printed as one line (``sage-ext: error: ...``), exit status 2."""


#: ``--target fixture`` / ``--draft fixture`` name the bundled pair (sage_ext/fixtures/).
FIXTURE_NAME = "fixture"

_TRUE_VALUES = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``,
    read now, or huggingface_hub's own offline constant)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def resolve_model(name: str | None, role: str) -> str | None:
    """``fixture`` -> the bundled target or draft folder; anything else unchanged."""
    if name is None or name.strip().lower() != FIXTURE_NAME:
        return name
    from .fixtures import DRAFT_DIR, TARGET_DIR

    return str(DRAFT_DIR if role == "draft" else TARGET_DIR)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hub's host answers a TCP connection within ``timeout`` seconds, else the reason."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {host}:{port} ({error.strerror or error})"
    return None


def check_model(name: str, flag: str) -> str:
    """A model folder or hub id that can be loaded without waiting on the network, or UsageError with the
    reason. Returns the resolved path or id."""
    resolved = resolve_model(name, "draft" if flag == "--draft" else "target")
    path = Path(resolved).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {name}: is a file; give a model folder (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {name}: folder has no config.json, so it is not a saved model")
        return str(path)
    looks_local = (path.is_absolute() or resolved.startswith((".", "~")) or "\\" in resolved
                   or resolved.count("/") > 1 or not _REPO_ID.match(resolved))
    if looks_local:
        raise UsageError(f"{flag} {name}: no such model folder (and not a hub id like org/name); "
                         f"use '{FIXTURE_NAME}' for the bundled pair")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(resolved, "config.json"), str)
    if hub_offline():
        if not cached:
            raise UsageError(f"{flag} {name}: not a local folder and not in the Hugging Face cache, and offline mode "
                             f"is on (HF_HUB_OFFLINE=1): download it first or give a local folder")
        return resolved
    if not cached:
        reason = _hub_reachable()
        if reason is not None:
            raise UsageError(f"{flag} {name}: not a local folder or cached, and the Hugging Face Hub is unreachable: "
                             f"{reason}; connect, or use a local folder / cached model with HF_HUB_OFFLINE=1")
    return resolved


def check_image(name: str) -> None:
    """An image file PIL can read, or UsageError saying what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(name).expanduser()
    if not path.exists():
        raise UsageError(f"--image {name}: no such file")
    if path.is_dir():
        raise UsageError(f"--image {name}: is a folder, not an image file")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"--image {name}: not an image file PIL can read ({type(error).__name__})") from error


def check_device(name: str) -> torch.device:
    """The device for ``--device`` (``auto``: cuda if available) if this torch and machine have it."""
    if name == "auto":
        return pick_device(name)
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {name}: {built} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


#: ``--device-map`` values: accelerate's placements of each model over the visible GPUs (then CPU memory).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(args) -> None:
    """``--device-map`` needs accelerate, and ``--device`` auto or cuda: the inputs go to the first GPU, where
    accelerate puts the embeddings (without a GPU everything stays on the CPU)."""
    device_map = getattr(args, "device_map", None)
    if device_map is None:
        return
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise UsageError(f"--device-map {device_map} needs the accelerate package (pip install accelerate)")
    if args.device not in ("auto", "cuda"):
        raise UsageError(f"--device-map {device_map} places the models over the visible GPUs itself; use --device "
                         f"auto (or cuda), not --device {args.device}")


def _ranged(kind: type, low=None, high=None, low_open: bool = False, what: str | None = None):
    """An argparse ``type`` for numbers in a range (the error names the range)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def validate_args(args) -> None:
    """Everything that can be checked before a model is loaded; UsageError on the first problem. Resolves
    ``args.target`` / ``args.draft`` (``fixture``, defaults) and sets ``args.device_obj``."""
    command = args.command
    if command == "generate":
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; give the text to answer, e.g. --prompt 'Describe the image.'")
        check_image(args.image)
        if args.target is None:
            args.target = FIXTURE_NAME
        if args.draft is None:
            if args.target.strip().lower() == FIXTURE_NAME:
                args.draft = FIXTURE_NAME
            elif args.policy != "ar":
                raise UsageError(f"--draft is needed with --policy {args.policy} (a smaller model of the target's "
                                 f"family), or use --policy ar")
        for path in (args.stats_json,):
            if path and not Path(path).expanduser().resolve().parent.is_dir():
                raise UsageError(f"--stats-json {path}: folder {Path(path).parent} does not exist")
    if getattr(args, "policy", None) is not None:
        parse_policy(args.policy, args.policy_args)
    elif getattr(args, "policy_args", None):
        raise UsageError("--policy-args needs --policy")
    check_device_map(args)
    args.device_obj = check_device(args.device)
    if args.target is not None:
        args.target = check_model(args.target, "--target")
    if args.draft is not None:
        args.draft = check_model(args.draft, "--draft")
    if command == "demo" and not Path(args.plot).expanduser().resolve().parent.is_dir():
        raise UsageError(f"--plot {args.plot}: folder {Path(args.plot).parent} does not exist")


# ---------------------------------------------------------------------------------------------
# loading models, prompts and policies
# ---------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | str:
    if name == "auto":  # the models' own dtype on GPU; float32 on CPU (half precision is slow there)
        return "auto" if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(path_or_id: str, device: torch.device, dtype, device_map: str | None = None) -> torch.nn.Module:
    """A vision-language (or text) generation model, in eval mode, with an attention implementation
    that takes tree masks (sdpa). Offline (``HF_HUB_OFFLINE=1``) nothing is asked of the network.
    ``device_map`` (accelerate's ``auto``, ...): the model is placed by accelerate instead of moved to ``device``."""
    import transformers

    path_or_id = resolve_model(path_or_id, "target")
    errors = []
    for auto_class in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        loader = getattr(transformers, auto_class, None)
        if loader is None:
            continue
        try:
            placement = {"device_map": device_map} if device_map else {}
            model = loader.from_pretrained(path_or_id, dtype=dtype, attn_implementation="sdpa",
                                           local_files_only=hub_offline(), **placement)
            return (model if device_map else model.to(device)).eval()
        except ValueError as error:  # this auto class does not know the config: try the next one
            errors.append(f"{auto_class}: {error}")
    raise ValueError(f"could not load {path_or_id!r} as a generation model:\n" + "\n".join(errors))


def load_pair(target: str, draft: str | None, device: torch.device, dtype,
              device_map: str | None = None) -> tuple[Any, Any, Any]:
    """(target model, draft model or None, processor of the target); ``device_map``: see ``load_model``."""
    from transformers import AutoProcessor

    target, draft = resolve_model(target, "target"), resolve_model(draft, "draft") if draft else None
    processor = AutoProcessor.from_pretrained(target, local_files_only=hub_offline())
    target_model = load_model(target, device, dtype, device_map)
    draft_model = load_model(draft, device, dtype, device_map) if draft else None
    return target_model, draft_model, processor


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def format_prompt(processor, prompt: str) -> str:
    """The prompt text given to the processor.

    A prompt that already holds the processor's image token is used verbatim. Otherwise a processor with
    a chat template gets a one-turn user message (image, then the text) with the generation prompt; one
    without (like the bundled fixture pair) gets the fixture format ``<image>\\n{prompt}\\n``.
    """
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{image_token}\n{prompt}\n"


def build_inputs(processor, image, prompt_text: str, device: torch.device, dtype=None) -> dict:
    """Processor outputs on the model's device; floating inputs (pixel values) in the model dtype."""
    inputs = processor(text=prompt_text, images=image, return_tensors="pt")
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point() and isinstance(dtype, torch.dtype):
                value = value.to(dtype)
        out[key] = value
    return out


def parse_policy(name: str, args_text: str | None = None):
    """A policy object from a name plus ``key=value,...`` overrides (values are Python literals)."""
    from . import policies

    if name not in policies.POLICIES:
        raise UsageError(f"unknown policy {name!r}; choose from {', '.join(policies.POLICIES)}")
    policy_class = policies.POLICIES[name]
    accepted = [p for p in inspect.signature(policy_class.__init__).parameters if p != "self"]
    kwargs = {}
    for item in filter(None, (part.strip() for part in (args_text or "").split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise UsageError(f"--policy-args: expected key=value, got {item!r}")
        if key not in accepted:
            raise UsageError(f"--policy-args: policy {name!r} has no parameter {key!r}; its parameters: "
                             + (", ".join(accepted) or "none"))
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    try:
        return policy_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--policy-args: {error}") from error


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: torch.device) -> str:
    """CPU model and core count, plus the GPU name on CUDA."""
    name = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} ({name})"
    return name


def slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(filter(None, keep.split("-")))[:60]


# ---------------------------------------------------------------------------------------------
# timed runs
# ---------------------------------------------------------------------------------------------
def run_engine(engine, inputs: dict, max_new_tokens: int, device: torch.device, **kwargs) -> dict:
    """One engine generation: new token ids, stats and wall-clock seconds."""
    sync(device)
    start = time.perf_counter()
    sequences, stats = engine.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    prompt_len = inputs["input_ids"].shape[1]
    return {"ids": sequences[0, prompt_len:].tolist(), "stats": stats, "seconds": seconds}


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


def run_hf(target, draft, inputs: dict, max_new_tokens: int, device: torch.device) -> dict:
    """HF `generate` greedy, assisted by `draft` when given. tau: new tokens per target forward - 1
    (every target forward of assisted generation verifies a candidate block and adds one token)."""
    counter = ForwardCounter(target)
    draft_counter = ForwardCounter(draft) if draft is not None else None
    try:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
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


def strip_after_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from tqdm import tqdm

    from .engine import SpeculativeGenerator
    from .fixtures import DRAFT_DIR, TARGET_DIR, scenes

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_obj
    quiet = getattr(args, "quiet", False)
    policy = parse_policy(args.policy, args.policy_args)
    target, draft, processor = load_pair(args.target or str(TARGET_DIR), args.draft or str(DRAFT_DIR), device,
                                         pick_dtype(args.dtype, device))
    tokenizer = _tokenizer_of(processor)
    engines = {"ar": SpeculativeGenerator(target, draft, policy="ar"), policy.name: SpeculativeGenerator(target, draft, policy)}
    prompt_text = scenes.caption_prompt(getattr(processor, "image_token", "<image>"))
    demo_scenes = scenes.heldout_scenes(args.scenes, start=args.scene_offset)
    inputs_of = [build_inputs(processor, s.render(), prompt_text, device, target.dtype) for s in demo_scenes]

    # A warm-up generation per engine on a scene outside the demo's, so first-call costs (allocations, lazy
    # initialisation, cold caches) are not timed: several steps long, like a real run.
    warm = build_inputs(processor, scenes.heldout_scenes(1, start=args.scene_offset + 10_000)[0].render(),
                        prompt_text, device, target.dtype)
    for engine in engines.values():
        engine.generate(**warm, max_new_tokens=min(args.max_new_tokens, DEMO_WARMUP_TOKENS))

    print(f"sage-ext demo on {machine_name(device)}: target {args.target or 'bundled fixture'}, "
          f"policy {policy.name}; {CONVENTION}")
    results = []
    with tqdm(total=len(demo_scenes) * len(engines), desc="generating", unit="run", file=sys.stderr,
              disable=quiet) as bar:
        for scene, inputs in zip(demo_scenes, inputs_of):
            runs = {}
            for name, engine in engines.items():
                runs[name] = run_engine(engine, inputs, args.max_new_tokens, device)
                bar.update(1)
            results.append((scene, runs))

    sage_name = policy.name
    total = {name: {"tokens": 0, "seconds": 0.0} for name in engines}
    for scene, runs in results:
        spec = runs[sage_name]
        text = tokenizer.decode(spec["ids"], skip_special_tokens=True)
        score = scenes.score_caption(scene, text)
        same = spec["ids"] == runs["ar"]["ids"]
        st = spec["stats"]
        speed = {n: len(r["ids"]) / r["seconds"] for n, r in runs.items()}
        print(f"\nscene {scene.seed}: {text}")
        print(f"  caption attributes correct: {score['correct']}/{score['total']}; "
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


#: new tokens of each engine's warm-up generation in the demo (capped by --max-new-tokens)
DEMO_WARMUP_TOKENS = 32


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


def demo_plot_data(results, policy_name: str) -> dict:
    """What the demo plot shows, per scene: tokens per target forward at every step of ``policy_name`` (tau + 1;
    target-only decoding makes 1) with the tree size, and the tokens/s of the policy and of target-only ("ar")."""
    scenes_data = []
    for scene, runs in results:
        steps = runs[policy_name]["stats"].steps
        scenes_data.append({
            "scene": scene.seed,
            "tokens_per_step": [s.tau + 1 for s in steps],
            "tree_size": [s.tree_size for s in steps],
            "tokens_per_second": {name: len(run["ids"]) / run["seconds"] for name, run in runs.items()},
            "identical_to_ar": runs[policy_name]["ids"] == runs["ar"]["ids"],
        })
    return {"policy": policy_name, "scenes": scenes_data}


def plot_demo(results, policy_name: str, path: Path) -> dict:
    """Two panels: tokens per target forward at each step (bars; target-only: 1) with the draft tree's size, and
    tokens/s per scene, the policy against target-only. Returns the plotted numbers (``demo_plot_data``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = demo_plot_data(results, policy_name)
    fig, (ax_steps, ax_speed) = plt.subplots(2, 1, figsize=(10, 6.5), gridspec_kw={"height_ratios": [3, 2]})
    ax_tree = ax_steps.twinx()
    offset = 0
    for index, scene in enumerate(data["scenes"]):
        per_step = scene["tokens_per_step"]
        xs = list(range(offset, offset + len(per_step)))
        ax_steps.bar(xs, per_step, color="tab:green", width=0.85,
                     label=f"{policy_name}: tokens per target forward (tau + 1)" if index == 0 else None)
        ax_tree.plot(xs, scene["tree_size"], color="tab:gray", lw=1.0, marker=".", ms=3,
                     label="draft tree size (nodes)" if index == 0 else None)
        if index:
            ax_steps.axvline(offset - 0.5, color="k", lw=0.6, alpha=0.4)
        offset += len(per_step)
    ax_steps.axhline(1.0, color="tab:red", lw=1.2, ls="--", label="target-only: 1 token per forward")
    tallest = max((max(scene["tokens_per_step"], default=1) for scene in data["scenes"]), default=1)
    ax_steps.set_ylim(0, tallest * 1.45)  # room for the legend above the bars
    biggest = max((max(scene["tree_size"], default=1) for scene in data["scenes"]), default=1)
    ax_tree.set_ylim(0, biggest * 1.45)
    ax_steps.set_ylabel("tokens per target forward")
    ax_steps.set_xlabel("speculation step (scenes separated by vertical lines)")
    ax_tree.set_ylabel("draft tree nodes", color="tab:gray")
    lines = ax_steps.get_legend_handles_labels()
    tree_lines = ax_tree.get_legend_handles_labels()
    ax_steps.legend(lines[0] + tree_lines[0], lines[1] + tree_lines[1], loc="upper center", ncol=3, fontsize=8)

    labels = [str(scene["scene"]) for scene in data["scenes"]]
    xs = list(range(len(labels)))
    width = 0.4
    for shift, name, color in ((-width / 2, "ar", "tab:red"), (width / 2, policy_name, "tab:green")):
        values = [scene["tokens_per_second"][name] for scene in data["scenes"]]
        bars = ax_speed.bar([x + shift for x in xs], values, width=width, color=color,
                            label="target-only (ar)" if name == "ar" else policy_name)
        ax_speed.bar_label(bars, fmt="%.0f", fontsize=8)
    top = max((max(scene["tokens_per_second"].values()) for scene in data["scenes"]), default=1)
    ax_speed.set_ylim(0, top * 1.3)
    speedups = [scene["tokens_per_second"][policy_name] / scene["tokens_per_second"]["ar"] for scene in data["scenes"]]
    ax_speed.set_xticks(xs, [f"scene {label}: {speedup:.2f}x" for label, speedup in zip(labels, speedups)])
    ax_speed.set_ylabel("tokens / s")
    ax_speed.legend(loc="upper left", fontsize=8)
    same = all(scene["identical_to_ar"] for scene in data["scenes"])
    fig.suptitle(f"sage-ext demo: {policy_name} on the fixture pair ({len(results)} held-out scenes; outputs "
                 f"{'identical to' if same else 'DIFFERENT from'} target-only greedy)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from PIL import Image
    from transformers import TextStreamer

    from .engine import SpeculativeGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_obj
    policy = parse_policy(args.policy, args.policy_args)
    with Image.open(args.image) as opened:
        image = opened.convert("RGB")
    target, draft, processor = load_pair(args.target, args.draft, device, pick_dtype(args.dtype, device),
                                         args.device_map)
    tokenizer = _tokenizer_of(processor)
    inputs = build_inputs(processor, image, format_prompt(processor, args.prompt), device, target.dtype)
    engine = SpeculativeGenerator(target, draft, policy, draft_prune_ratio=args.draft_prune_ratio)
    stream = not (args.no_stream or args.json)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sample = args.temperature > 0
    generator = None
    if sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(args.seed)
    run = run_engine(engine, inputs, args.max_new_tokens, device, do_sample=sample,
                     temperature=args.temperature if sample else 1.0, top_k=args.top_k, top_p=args.top_p,
                     streamer=streamer, generator=generator)
    text = tokenizer.decode(run["ids"], skip_special_tokens=True)
    stats = run["stats"]
    if args.json:
        print(json.dumps({"text": text, "new_token_ids": run["ids"], "policy": policy.describe(),
                          "seconds": run["seconds"], "tokens_per_second": len(run["ids"]) / run["seconds"],
                          "stats": stats.to_dict()}, indent=1))
    elif args.no_stream:
        print(text)
    if not getattr(args, "quiet", False):
        print(f"[{policy.name}] {len(run['ids'])} tokens in {run['seconds']:.2f}s ({len(run['ids']) / run['seconds']:.1f} tok/s); "
              f"tau {stats.mean_tau:.2f}, {stats.tokens_per_target_forward:.2f} tokens per target forward over "
              f"{stats.target_forwards} steps ({CONVENTION})", file=sys.stderr)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats.to_dict(), indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
PAPER_DEFAULT_POLICIES = ("ar", "hf-greedy", "hf-assisted", "chain", "static", "dynamic", "sage")
#: `sage-ext bench` writes here (in the current folder) unless --out names a folder.
DEFAULT_BENCH_DIR = "sage-ext-bench"


def measure_verify_curve(target, inputs: dict, sizes: list[int], device: torch.device, repeats: int = 5) -> list[dict]:
    """Seconds of one target forward over n new tokens on top of the cached prompt, for each n
    (the cost of verifying an n-node tree; a causal block costs the same as a tree mask here)."""
    from transformers import DynamicCache

    curve = []
    with torch.inference_mode():
        cache = DynamicCache()
        cache_arg = cache_kwarg(target)
        target(**inputs, **{cache_arg: cache}, use_cache=True)
        prompt_len = cache.get_seq_length()
        for n in sizes:
            tokens = torch.full((1, n), int(inputs["input_ids"][0, -1]), device=device)
            mask = torch.ones(1, prompt_len + n, dtype=torch.long, device=device)
            times = []
            for _ in range(repeats + 1):
                sync(device)
                start = time.perf_counter()
                target(input_ids=tokens, attention_mask=mask, **{cache_arg: cache}, use_cache=True)
                sync(device)
                times.append(time.perf_counter() - start)
                cache.crop(prompt_len - cache.get_seq_length())
            curve.append({"tokens": n, "seconds": statistics.median(times[1:])})
    return curve


def bench_policy_objects(tuned: dict | None):
    """name -> (policy object or marker string, description) in run order."""
    from . import policies

    entries = {
        "ar": (policies.AutoregressivePolicy(), "target-only greedy by the engine (the baseline)"),
        "hf-greedy": ("hf-greedy", "transformers target.generate greedy, no draft (HF's own decoding loop)"),
        "hf-assisted": ("hf-assisted", "transformers target.generate(assistant_model=draft), default settings"),
        "chain": (policies.ChainPolicy(), "draft chain of 5 tokens"),
        "static": (policies.StaticTreePolicy(), "SpecVLM 25-node static tree (SD-Tree)"),
        "dynamic": (policies.DynamicTreePolicy(), "EAGLE-2 dynamic tree (depth 6, top-8, 64 nodes)"),
        "sage": (policies.SagePolicy(), "SAGE, paper defaults"),
    }
    if tuned:
        entries["sage-tuned"] = (policies.SagePolicy(**tuned), f"SAGE tuned for this device: {tuned}")
    return entries


def scene_inputs(processor, scene_list, device, dtype) -> list[dict]:
    """Caption-prompt processor outputs for fixture scenes (see `build_inputs`)."""
    from .fixtures import scenes

    prompt_text = scenes.caption_prompt(getattr(processor, "image_token", "<image>"))
    return [build_inputs(processor, s.render(), prompt_text, device, dtype) for s in scene_list]


def _run_policy(name, policy, engines, target, draft, inputs, max_new_tokens, device) -> dict:
    if policy == "hf-assisted":
        return run_hf(target, draft, inputs, max_new_tokens, device)
    if policy == "hf-greedy":
        return run_hf(target, None, inputs, max_new_tokens, device)
    return run_engine(engines[name], inputs, max_new_tokens, device)


def tune_sage(target, draft, tune_inputs, max_new_tokens, device, grid: dict) -> tuple[dict, list[dict]]:
    """Pick SAGE parameters by wall-clock time on TUNING scenes (disjoint from the benchmark scenes): a
    coordinate search over `grid` starting from the paper defaults. Each candidate is timed against the
    current best in interleaved A-B-B-A rounds over the same scenes (greedy outputs are identical, so the
    token counts are too), and kept only if it is at least 3% faster: drift of a shared machine's load hits
    both sides alike instead of favouring whichever ran first."""
    from . import policies
    from .engine import SpeculativeGenerator

    def engine_for(params: dict):
        engine = SpeculativeGenerator(target, draft, policies.SagePolicy(**params))
        engine.generate(**tune_inputs[0], max_new_tokens=8)  # warm-up
        return engine

    def timed(engine) -> tuple[float, float]:
        seconds, taus = 0.0, []
        for inputs in tune_inputs:
            run = run_engine(engine, inputs, max_new_tokens, device)
            seconds += run["seconds"]
            taus.append(run["stats"].mean_tau)
        return seconds, statistics.mean(taus)

    best: dict = {}
    best_engine = engine_for(best)
    trials = []
    for key, values in grid.items():
        for value in values:
            candidate = {**best, key: value}
            try:
                engine = engine_for(candidate)
            except ValueError as error:  # an invalid combination (e.g. a first-round tree larger than n_max)
                trials.append({"params": candidate, "error": str(error)})
                continue
            best_seconds = candidate_seconds = 0.0
            for order in ((best_engine, engine), (engine, best_engine)):
                for which in order:
                    seconds, tau = timed(which)
                    if which is engine:
                        candidate_seconds, candidate_tau = candidate_seconds + seconds, tau
                    else:
                        best_seconds, best_tau = best_seconds + seconds, tau
            ratio = best_seconds / candidate_seconds
            trials.append({"params": candidate, "against": dict(best), "speedup_over_best": ratio,
                           "mean_tau": candidate_tau, "best_mean_tau": best_tau})
            if ratio > 1.03:  # keep a change only if clearly faster
                best, best_engine = candidate, engine
    return best, trials


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from .engine import SpeculativeGenerator
    from .families import get_adapter
    from .fixtures import DRAFT_DIR, TARGET_DIR, scenes

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_obj
    dtype = pick_dtype(args.dtype, device)
    quiet = getattr(args, "quiet", False)
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else Path.cwd() / DEFAULT_BENCH_DIR
    out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {args.out_dir}: is a file, not a folder")
    target_path, draft_path = args.target or str(TARGET_DIR), args.draft or str(DRAFT_DIR)
    target, draft, processor = load_pair(target_path, draft_path, device, dtype, args.device_map)
    tokenizer = _tokenizer_of(processor)
    machine = machine_name(device)
    bench_inputs = scene_inputs(processor, scenes.heldout_scenes(args.scenes, start=args.scene_offset), device, target.dtype)
    tune_inputs = scene_inputs(processor, scenes.heldout_scenes(args.tune_scenes, start=args.scene_offset + 5000),
                               device, target.dtype)
    if not quiet:
        print(f"sage-ext bench on {machine}; {args.scenes} scenes x {args.repeats} repeats; {CONVENTION}; "
              f"results go to {out_dir}", flush=True)

    curve = measure_verify_curve(target, bench_inputs[0], [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128], device)
    print("target verify cost vs tree size: " + ", ".join(f"{c['tokens']}: {c['seconds'] * 1e3:.1f}ms" for c in curve))

    tuned, tuning_trials = None, []
    if args.tune:
        grid = {"lag": [False], "first_round_paths": [None], "n_max": [8, 12, 16, 24, 32, 48],
                "d_max": [6, 10, 12], "w_max": [3, 4, 6], "theta_scale": [0.05, 0.2]}
        tuned, tuning_trials = tune_sage(target, draft, tune_inputs, args.max_new_tokens, device, grid)
        print(f"tuned SAGE parameters (A-B-B-A timed against the best so far on {args.tune_scenes} tuning scenes): {tuned or 'paper defaults'}")
    entries = bench_policy_objects(tuned if args.tune else None)
    if args.policies:
        entries = {k: v for k, v in entries.items() if k in args.policies or k == "ar"}
    engines = {name: SpeculativeGenerator(target, draft, policy) for name, (policy, _) in entries.items()
               if not isinstance(policy, str)}

    for name, (policy, _) in entries.items():  # warm-up, excluded from the numbers
        _run_policy(name, policy, engines, target, draft, tune_inputs[0], 8, device)

    runs: dict[str, list[list[dict]]] = {name: [] for name in entries}  # [repeat][scene]
    eos = set(get_adapter(target).eos_token_ids())
    with tqdm(total=args.repeats * len(entries) * len(bench_inputs), desc="bench", unit="run", file=sys.stderr,
              disable=quiet) as bar:
        for _ in range(args.repeats):
            for name, (policy, _) in entries.items():  # policies interleaved per repeat: drift hits all alike
                per_scene = []
                for inputs in bench_inputs:
                    per_scene.append(_run_policy(name, policy, engines, target, draft, inputs, args.max_new_tokens, device))
                    bar.update(1)
                runs[name].append(per_scene)

    reference = [strip_after_eos(r["ids"], eos) for r in runs["ar"][0]]
    summary = {}
    for name, (policy, description) in entries.items():
        repeat_seconds = [sum(r["seconds"] for r in rep) for rep in runs[name]]
        median_seconds = statistics.median(repeat_seconds)
        first = runs[name][0]
        tokens = sum(len(r["ids"]) for r in first)
        identical = all(strip_after_eos(r["ids"], eos) == ref for rep in runs[name] for r, ref in zip(rep, reference))
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

    checks = {"all_greedy_outputs_identical_to_ar": all(r["identical_to_ar"] for r in summary.values())}
    for name in ("sage", "sage-tuned"):
        if name in summary and "static" in summary:
            static_tau = summary["static"]["mean_tau"]
            checks[f"{name}_tau_over_static"] = summary[name]["mean_tau"] / static_tau if static_tau > 0 else None
        if name in summary and "hf-assisted" in summary:
            checks[f"{name}_speedup_over_hf_assisted"] = summary["hf-assisted"]["median_seconds"] / summary[name]["median_seconds"]
    sample_text = tokenizer.decode(reference[0], skip_special_tokens=True)
    report = {
        "machine": machine, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "target": target_path, "draft": draft_path,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "scenes": args.scenes, "scene_offset": args.scene_offset, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "convention": CONVENTION,
        "command": "sage-ext " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line,
        "verify_cost_curve": curve, "tuned_sage_params": tuned, "tuning_trials": tuning_trials,
        "policies": summary, "checks": checks, "sample_output": sample_text,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"e2e_{slug(machine)}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(bench_markdown(report))
    plot_bench(report, png_path)

    print(f"\n{'policy':<12} {'tau':>6} {'tok/fwd':>8} {'tok/s':>8} {'speedup':>8}  identical")
    for name, row in summary.items():
        print(f"{name:<12} {row['mean_tau']:>6.2f} {row['tokens_per_target_forward']:>8.2f} "
              f"{row['tokens_per_second']:>8.1f} {row['speedup_vs_ar']:>7.2f}x  {row['identical_to_ar']}")
    print("checks: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in checks.items()}))
    print(f"wrote {json_path} and {png_path}")
    return 0 if checks["all_greedy_outputs_identical_to_ar"] else 1


def bench_markdown(report: dict) -> str:
    """The report as a markdown table (written beside the JSON and the chart)."""
    from .stats import TIME_KEYS

    lines = [
        f"# sage-ext bench: {report['machine']}",
        "",
        f"`{report['command']}` — torch {report['torch']}, transformers {report['transformers']}, "
        f"{report['threads']} thread(s); target {report['target_params'] / 1e6:.2f}M, draft "
        f"{report['draft_params'] / 1e6:.2f}M parameters; {report['scenes']} held-out scenes x "
        f"{report['repeats']} repeats (median), up to {report['max_new_tokens']} new tokens, greedy.",
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
            f"| {cell('engine_overhead_per_step_ms', '{:.3f}')} | {row['identical_to_ar']} |")
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


def plot_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["policies"]
    names = list(summary)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    bars = ax.bar(names, [summary[n]["speedup_vs_ar"] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title("wall-clock speedup vs target-only (ar)")
    ax = axes[0, 1]
    bars = ax.bar(names, [summary[n]["mean_tau"] for n in names], color="tab:green")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_title("tau (accepted draft tokens per step)")
    ax = axes[1, 0]
    for n in names:
        rates = summary[n].get("acceptance_by_depth")
        if rates and n != "ar":
            ax.plot(range(1, len(rates) + 1), rates, marker="o", ms=3, label=n)
    ax.set_xlabel("depth d")
    ax.set_ylabel("P(accepted >= d | tree reached d)")
    ax.set_title("acceptance by depth")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    engine_names = [n for n in names if "time_breakdown_fraction" in summary[n]]
    bottom = [0.0] * len(engine_names)
    keys = list(summary[engine_names[0]]["time_breakdown_fraction"]) if engine_names else []
    for key in keys:
        values = [summary[n]["time_breakdown_fraction"][key] for n in engine_names]
        ax.bar(engine_names, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("engine time breakdown (share of generation time)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes.flat:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"sage-ext bench: {report['machine']}\n{report['scenes']} scenes x {report['repeats']} repeats, "
                 f"medians; target {report['target_params'] / 1e6:.1f}M, draft {report['draft_params'] / 1e6:.2f}M params",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``sage-ext generate: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_POSITIVE_INT = _ranged(int, low=1, what=">= 1")
_NONNEGATIVE_INT = _ranged(int, low=0, what=">= 0")


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
    fixture = f"'{FIXTURE_NAME}' = the bundled pair"
    parser.add_argument("--target", required=models_required,
                        help=f"target model folder or hub id ({fixture}; default: {FIXTURE_NAME})")
    parser.add_argument("--draft", required=models_required,
                        help=f"draft model folder or hub id of the target's family ({fixture}; default: the bundled "
                             f"draft when the target is the bundled one)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float32 on CPU, the checkpoint's dtype on GPU")
    parser.add_argument("--threads", type=_POSITIVE_INT, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--policy-args", default=None,
                        help="policy overrides key=value,... (names of the policy's parameters), e.g. n_max=32,lag=False")


def _add_device_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                        help="place each model over the visible GPUs with accelerate (needs accelerate); target and "
                             "draft may end up on different devices")


def _version_text() -> str:
    from . import __version__

    import transformers

    return f"sage-ext {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    from .policies import POLICIES

    policy_names = sorted(POLICIES)
    flags = _flags()
    parser = _Parser(prog="sage-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     parents=[flags])
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="SAGE on the bundled fixture pair over held-out scenes, with a plot",
                          parents=[flags])
    _add_common(demo, models_required=False)
    demo.add_argument("--policy", default="sage", choices=policy_names,
                      help="tree policy timed against target-only decoding (default sage): ar (target only), chain "
                           "(draft's greedy chain), static (SpecVLM 25-node tree), dynamic (EAGLE-2), sage")
    demo.add_argument("--scenes", type=_POSITIVE_INT, default=3)
    demo.add_argument("--scene-offset", type=_NONNEGATIVE_INT, default=0, help="first held-out scene index")
    demo.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=96)
    demo.add_argument("--plot", default="sage_demo.png",
                      help="PNG path of the plot: tokens per target forward per step, tokens/s against target-only")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="speculative generation for one image + prompt, streamed", parents=[flags])
    _add_common(gen, models_required=False)
    _add_device_map(gen)
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", required=True,
                     help="text; without the image token it is wrapped by the chat template (or <image>\\nTEXT\\n)")
    gen.add_argument("--policy", default="sage", choices=policy_names)
    gen.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=128)
    gen.add_argument("--temperature", type=_ranged(float, low=0.0, what=">= 0"), default=0.0,
                     help="0 = greedy (default); > 0 samples losslessly")
    gen.add_argument("--top-k", type=_NONNEGATIVE_INT, default=None, help="sampling top-k (0 = off)")
    gen.add_argument("--top-p", type=_ranged(float, low=0.0, high=1.0, low_open=True, what="in (0, 1]"),
                     default=None, help="sampling top-p, in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (torch.Generator)")
    gen.add_argument("--draft-prune-ratio", type=_ranged(float, low=0.0, high=1.0, what="in [0, 1]"), default=0.0,
                     help="share of image tokens hidden from the draft, in [0, 1] (SpecVLM pruning; paper: 0.8-0.9)")
    gen.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, new token ids, stats) instead of the text")
    gen.add_argument("--stats-json", default=None, help="write the generation stats here")
    gen.set_defaults(func=cmd_generate)

    bench_choices = [*PAPER_DEFAULT_POLICIES, "sage-tuned"]
    bench = sub.add_parser("bench", help="all policies + HF assisted generation on held-out scenes", parents=[flags])
    _add_common(bench, models_required=False)
    _add_device_map(bench)
    bench.add_argument("--scenes", type=_POSITIVE_INT, default=8)
    bench.add_argument("--scene-offset", type=_NONNEGATIVE_INT, default=0)
    bench.add_argument("--tune-scenes", type=_POSITIVE_INT, default=6, help="scenes (disjoint) used to tune SAGE")
    bench.add_argument("--repeats", type=_POSITIVE_INT, default=3)
    bench.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=96)
    bench.add_argument("--policies", nargs="*", default=None, choices=bench_choices, metavar="POLICY",
                       help=f"subset of {', '.join(bench_choices)} (ar always runs)")
    bench.add_argument("--no-tune", dest="tune", action="store_false", help="skip the SAGE tuning sweep")
    bench.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                       help=f"folder for the JSON, markdown and PNG results (default: ./{DEFAULT_BENCH_DIR} in the "
                            f"current folder); created if needed")
    bench.add_argument("--name", default=None, help="output file stem (default e2e_<machine>)")
    bench.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)
    return parser


def _debug_requested(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("SAGE_EXT_DEBUG", "").strip().lower() in _TRUE_VALUES


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


if __name__ == "__main__":
    sys.exit(main())
