"""Adapter for plain decoder-only causal LMs (Llama, Qwen2, Mistral): 1-D RoPE, text only.

Everything is the base behaviour: rope position = sequence index, prompt forward = the model's own forward. A
text-only model may draft for a vision-language target of its tokenizer (`FamilyAdapter.prefill_text`).
"""
from __future__ import annotations

from .base import FamilyAdapter


class CausalLMAdapter(FamilyAdapter):
    """``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` and their checkpoints."""

    model_types = ("llama", "qwen2", "mistral")
    reads_media = False
