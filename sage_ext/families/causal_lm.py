"""Adapter for plain decoder-only causal LMs (Llama, Qwen2, Mistral): 1-D RoPE, text only.

Everything is the base behaviour: rope position = sequence index, prompt forward = the model's own forward.
"""
from __future__ import annotations

from .base import FamilyAdapter


class CausalLMAdapter(FamilyAdapter):
    """``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` and their checkpoints."""

    model_types = ("llama", "qwen2", "mistral")
