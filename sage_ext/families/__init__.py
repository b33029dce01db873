"""Family adapters: one class per HuggingFace model family, found from ``config.model_type``.

``get_adapter(model)`` returns the adapter instance for a model; an unsupported model raises ValueError
listing the supported families. Adapters live one per module here; ``base.py`` holds the base class.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

import torch

from .base import FamilyAdapter, PrefillResult, causal_mask_4d
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter

# Modules of this package that hold no adapter of their own.
_NOT_ADAPTER_MODULES = {"base", "causal_lm", "llava"}


@functools.lru_cache(maxsize=None)
def _adapter_classes() -> tuple[type[FamilyAdapter], ...]:
    classes: list[type[FamilyAdapter]] = [CausalLMAdapter, LlavaAdapter]
    # Every other module of this package is an adapter module (Qwen2-VL, LLaVA-OneVision, Idefics3, ...).
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in _NOT_ADAPTER_MODULES)
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, FamilyAdapter)
                and value.model_types
                and value not in classes
            ):
                classes.append(value)
    return tuple(classes)


def supported_model_types() -> dict[str, type[FamilyAdapter]]:
    """Map ``config.model_type`` → adapter class for every supported family."""
    return {model_type: cls for cls in _adapter_classes() for model_type in cls.model_types}


def get_adapter(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter for ``model`` (chosen by ``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    registry = supported_model_types()
    if model_type not in registry:
        raise ValueError(
            f"sage_ext does not support {type(model).__name__} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(sorted(registry))}."
        )
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-modeling head; pass the generation class "
            f"(e.g. ...ForCausalLM / ...ForConditionalGeneration)."
        )
    return registry[model_type](model)


__all__ = ["FamilyAdapter", "PrefillResult", "causal_mask_4d", "get_adapter", "supported_model_types"]
