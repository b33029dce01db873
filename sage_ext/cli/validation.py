"""Checking the command line before anything is loaded: `UsageError` (a bad input the user can fix: one line,
exit status 2), the model, image, device and device-map checks, number ranges for argparse, `validate_args`
(every check of a parsed command line) and `parse_policy` (``--policy`` + ``--policy-args``).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import math
import re
from pathlib import Path

import torch

from .models import FIXTURE_NAME, fixture_pair_name, hub_offline, pick_device, resolve_model


class UsageError(ValueError):
    """A bad input the user can fix: printed as one line (``sage-ext: error: ...``), exit status 2."""


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


def bundled_pair(name: str | None, flag: str) -> str | None:
    """The bundled pair `name` refers to (``fixture``, ``fixture-qwen2vl``), None for other names; UsageError
    for ``fixture-<unknown>``."""
    try:
        return fixture_pair_name(name)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from error


def default_draft_prune_ratio(draft: str | None) -> float:
    """``--draft-prune-ratio`` when not given: the bundled draft's measured ratio (``FixturePair``), else 0."""
    from ..fixtures import PAIRS

    pair = bundled_pair(draft, "--draft")
    return PAIRS[pair].draft_prune_ratio if pair is not None else 0.0


def check_model(name: str, flag: str) -> str:
    """A model folder or hub id that can be loaded without waiting on the network, or UsageError with the
    reason. Returns the resolved path or id."""
    from ..fixtures import PAIRS

    pair = bundled_pair(name, flag)
    resolved = resolve_model(name, "draft" if flag == "--draft" else "target")
    path = Path(resolved).expanduser()
    if pair is not None and not (path / "config.json").is_file():
        raise UsageError(f"{flag} {name}: the bundled {pair} pair is not in this installation ({path} is missing); "
                         f"train it with {PAIRS[pair].training_script}")
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
                         f"use '{FIXTURE_NAME}' or '{FIXTURE_NAME}-qwen2vl' for a bundled pair")
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
        with Image.open(path) as image:  # verify() reads no pixel data: a truncated JPEG fails only when decoded
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"--image {name}: not an image file PIL can read ({type(error).__name__}: {error})") from error


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


def ranged(kind: type, low=None, high=None, low_open: bool = False, what: str | None = None):
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
            if bundled_pair(args.target, "--target") is not None:  # a bundled target: its own draft
                args.draft = args.target
            elif args.policy != "ar":
                raise UsageError(f"--draft is needed with --policy {args.policy} (a smaller model of the target's "
                                 f"family), or use --policy ar")
        if args.stats_json:
            check_output_file(args.stats_json, "--stats-json")
    if command in ("demo", "bench"):  # the models default to the bundled pair whose scenes are used
        if args.target is None:
            args.target = f"{FIXTURE_NAME}-{args.pair}"
            args.draft = args.draft or args.target
        elif args.draft is None:
            if bundled_pair(args.target, "--target") is None:
                raise UsageError(f"--draft is needed with --target {args.target} (a smaller model of the target's "
                                 f"family)")
            args.draft = args.target  # a bundled target: its own draft
    if hasattr(args, "draft_prune_ratio") and args.draft_prune_ratio is None:
        args.draft_prune_ratio = default_draft_prune_ratio(args.draft)
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
    if command == "demo":
        if Path(args.plot).suffix.lower() != ".png":
            raise UsageError(f"--plot {args.plot}: the plot is a PNG file; give a path ending in .png")
        check_output_file(args.plot, "--plot")
    if command == "bench" and args.name is not None and (not args.name.strip() or Path(args.name).name != args.name
                                                         or args.name in (".", "..")):
        raise UsageError(f"--name {args.name!r}: a file stem without a folder (the folder is --out)")


def check_output_file(path: str, flag: str) -> None:
    """An output file's path must be writable as a file before any work starts: its folder exists, it is no folder."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file path")
    if not resolved.parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {Path(path).parent} does not exist")


def parse_policy(name: str, args_text: str | None = None):
    """A policy object from a name plus ``key=value,...`` overrides (values are Python literals)."""
    from ..engine import policies

    if name not in policies.POLICIES:
        raise UsageError(f"unknown policy {name!r}; choose from {', '.join(policies.POLICIES)}")
    policy_class = policies.POLICIES[name]
    parameters = {key: parameter for key, parameter in inspect.signature(policy_class.__init__).parameters.items()
                  if key != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}
    kwargs = {}
    for item in _split_top_level(args_text or ""):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise UsageError(f"--policy-args: expected key=value, got {item!r}")
        if key not in parameters:
            raise UsageError(f"--policy-args: policy {name!r} has no parameter {key!r}; its parameters: "
                             + (", ".join(parameters) or "none"))
        kwargs[key] = _policy_value(key, value.strip(), parameters[key].default)
    try:
        return policy_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--policy-args: {error}") from error


def _split_top_level(text: str) -> list[str]:
    """``key=value`` items split at the commas outside brackets (a value may be a list: ``paths=[[0],[0,0]]``)."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _policy_value(key: str, text: str, default):
    """A ``--policy-args`` value: a Python literal (``true`` / ``false`` in any case as booleans), of the parameter's
    kind where its default tells it (a bool, an int, a float; None defaults take any literal)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        value = lowered == "true"
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UsageError(f"--policy-args: {key}={text!r} is not a value (a number, True / False, None, a list, "
                             f"or a quoted string)") from None
    expected = type(default) if isinstance(default, (bool, int, float)) else None
    if expected is bool and not isinstance(value, bool):
        raise UsageError(f"--policy-args: {key} must be True or False, got {text!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            raise UsageError(f"--policy-args: {key} must be an integer, got {text!r} (write {int(value)})")
        raise UsageError(f"--policy-args: {key} must be an integer, got {text!r}")
    if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UsageError(f"--policy-args: {key} must be a number, got {text!r}")
    return float(value) if expected is float else value
