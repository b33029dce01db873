"""Loading what a command runs on: the bundled fixture pairs (``--target fixture``, ``fixture-qwen2vl``), the
Hugging Face offline switch, devices and dtypes, models and their processor, and the processor inputs of a prompt
or of fixture scenes. Used by every command and by benchmarks/; nothing here reads the command line.
"""
from __future__ import annotations

import os
from typing import Any

import torch


#: ``--target fixture`` / ``--draft fixture`` name the bundled LLaVA pair, ``fixture-qwen2vl`` the Qwen2-VL
#: pair (sage_ext/fixtures/; ``fixture-<pair>`` for every pair of `sage_ext.fixtures.PAIRS`).
FIXTURE_NAME = "fixture"

_TRUE_VALUES = {"1", "on", "yes", "true"}


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1, on, yes or true (any case)."""
    return os.environ.get(name, "").strip().lower() in _TRUE_VALUES


def hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``,
    read now, or huggingface_hub's own offline constant)."""
    if any(env_flag(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def fixture_pair_name(name: str | None) -> str | None:
    """The bundled pair a model name refers to (``fixture`` -> llava, ``fixture-qwen2vl`` -> qwen2vl), or None."""
    from ..fixtures import DEFAULT_PAIR, PAIRS

    if name is None:
        return None
    key = name.strip().lower()
    if key == FIXTURE_NAME:
        return DEFAULT_PAIR
    if key.startswith(FIXTURE_NAME + "-"):
        pair = key[len(FIXTURE_NAME) + 1:]
        if pair not in PAIRS:
            raise ValueError(f"unknown bundled pair {name!r}: use " + ", ".join(
                [FIXTURE_NAME] + [f"{FIXTURE_NAME}-{p}" for p in PAIRS]))
        return pair
    return None


def resolve_model(name: str | None, role: str) -> str | None:
    """``fixture`` / ``fixture-<pair>`` -> that bundled pair's target or draft folder; anything else unchanged."""
    from ..fixtures import PAIRS

    pair = fixture_pair_name(name)
    if pair is None:
        return name
    return str(PAIRS[pair].draft_dir if role == "draft" else PAIRS[pair].target_dir)


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
    that takes tree masks: sdpa, or eager for a class without sdpa (Gemma 2). Offline (``HF_HUB_OFFLINE=1``) nothing
    is asked of the network. ``device_map`` (accelerate's ``auto``, ...): the model is placed by accelerate instead of
    moved to ``device``."""
    import transformers

    path_or_id = resolve_model(path_or_id, "target")
    placement = {"device_map": device_map} if device_map else {}
    unknown, reasons = [], []
    for auto_class in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        loader = getattr(transformers, auto_class, None)
        if loader is None:
            continue
        for attention in ("sdpa", "eager"):
            try:
                model = loader.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attention,
                                               local_files_only=hub_offline(), **placement)
                return (model if device_map else model.to(device)).eval()
            except ValueError as error:
                message = str(error)
                if "Unrecognized configuration class" in message:  # this auto class does not know the config
                    unknown.append(auto_class)
                    break
                if attention == "sdpa" and "scaled_dot_product_attention" in message:  # no sdpa: eager takes masks
                    continue
                reasons.append(f"{auto_class}: {message.splitlines()[0]}")
                break
    why = "; ".join(reasons) if reasons else f"no generation class knows its config ({', '.join(unknown)})"
    raise ValueError(f"could not load {path_or_id!r} as a generation model: {why}")


def load_pair(target: str, draft: str | None, device: torch.device, dtype,
              device_map: str | None = None) -> tuple[Any, Any, Any]:
    """(target model, draft model or None, processor of the target); ``device_map``: see ``load_model``."""
    from ..processors import load_processor

    target, draft = resolve_model(target, "target"), resolve_model(draft, "draft") if draft else None
    processor = load_processor(target, local_files_only=hub_offline())
    target_model = load_model(target, device, dtype, device_map)
    draft_model = load_model(draft, device, dtype, device_map) if draft else None
    return target_model, draft_model, processor


def tokenizer_of(processor):
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


def scene_inputs(processor, pair, scene_list, device, dtype) -> list[dict]:
    """Processor outputs of the benchmark prompt of bundled pair `pair` (a `sage_ext.fixtures.FixturePair`)
    for each of its scenes in `scene_list` (see `build_inputs`)."""
    prompt_text = pair.prompt_text(processor)
    return [build_inputs(processor, s.render(), prompt_text, device, dtype) for s in scene_list]
