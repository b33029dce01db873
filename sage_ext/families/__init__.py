"""Family adapters: one class per HuggingFace model family, found from ``config.model_type``.

``get_adapter(model)`` returns the adapter instance for a model: the family's own adapter when one lists the
model's ``config.model_type``, else the generic ``CausalLMAdapter`` for any decoder-only causal LM that
``support.causal_lm_refusal`` accepts (standard attention cache, explicit positions, 4-D masks); anything else
raises ValueError saying why. Adapters live one per module here; ``base.py`` holds the base class.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

import torch

from .base import FamilyAdapter, PrefillResult, causal_mask_4d
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter, Mistral3Adapter
from .support import cache_refusal, causal_lm_refusal

# Modules of this package that hold no adapter of their own.
_NOT_ADAPTER_MODULES = {"base", "causal_lm", "llava", "model_access", "support", "token_types"}


@functools.lru_cache(maxsize=None)
def _adapter_classes() -> tuple[type[FamilyAdapter], ...]:
    classes: list[type[FamilyAdapter]] = [CausalLMAdapter, LlavaAdapter, Mistral3Adapter]
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
    """The adapter for ``model``: its family's (by ``model.config.model_type``), else the generic causal-LM adapter
    when the model qualifies (``support.causal_lm_refusal``); ValueError with the reason otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    registry = supported_model_types()
    adapter_class = registry.get(model_type)
    reason = None
    if model_type is None:
        reason = f"{type(model).__name__} has no config.model_type (not a transformers model)"
    elif adapter_class is None:
        reason = causal_lm_refusal(model)
        adapter_class = CausalLMAdapter
    else:
        reason = cache_refusal(model)
    if reason is not None:
        raise ValueError(
            f"sage_ext does not support {type(model).__name__} (model_type={model_type!r}): {reason}. "
            f"Supported: any decoder-only causal LM with an attention cache, and the families "
            f"{', '.join(sorted(registry))}."
        )
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-modeling head; pass the generation class "
            f"(e.g. ...ForCausalLM / ...ForConditionalGeneration)."
        )
    return adapter_class(model)


__all__ = ["FamilyAdapter", "PrefillResult", "causal_mask_4d", "get_adapter", "supported_model_types"]
