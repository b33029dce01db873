"""How the engine reaches into a HuggingFace model without patching it.

- ``cache_kwarg``: the name of the forward's KV-cache argument (``cache`` from transformers 5.24, else
  ``past_key_values``), read from the model class's signature.
- ``text_decoder``: the module holding the language model's transformer ``layers``.
- ``multimodal_embeddings`` / ``forward_kept``: the model's own forward run up to its text decoder (a pre-hook
  stops it there) to get the ``inputs_embeds`` it builds (vision features scattered in, plus Qwen3-VL's DeepStack
  inputs), then the decoder on a subset of the prompt's rows with their original positions: the draft's prefill
  under visual token pruning (``sage_ext.pruning``), the adapters' ``prefill(keep=...)``.
Used by the family adapters and by ``sage_ext.pruning``; imports neither.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model``'s forward: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is deprecated), ``past_key_values`` before. Read from the class's signature (accelerate
    hooks wrap the instance's ``forward``, not the class's)."""
    return _cache_kwarg_of(type(model))


_DECODER_PATHS = ("model.language_model", "model.text_model", "language_model", "text_model", "model")


def text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model's text decoder: the module holding the transformer ``layers`` of the language model
    (``model.model.language_model`` for Qwen2-VL / LLaVA families, ``model.model.text_model`` for
    Idefics3, ``model.model`` for plain causal LMs)."""
    for path in _DECODER_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the text decoder layers of {type(model).__name__}")


class _EmbeddingsReady(Exception):
    """Raised by the text-decoder pre-hook to stop the forward once inputs_embeds exist."""


#: Decoder inputs that hold one row per visual token (Qwen3-VL's DeepStack: vision-tower features added to the
#: visual rows' hidden states after the first decoder layers); a kept-rows forward must get the kept rows' share.
DEEPSTACK_INPUTS = ("visual_pos_masks", "deepstack_visual_embeds")
#: Per-token inputs ``[B, L, ...]`` a model's forward computes for its decoder from the token ids and also takes as
#: arguments of its own (Gemma 4's per-layer input embeddings): a kept-rows forward, which passes embeddings
#: instead of ids, gives them for the kept columns.
PER_TOKEN_DECODER_INPUTS = ("per_layer_inputs",)


def _decoder_inputs(model: torch.nn.Module, inputs: dict, **forward_kwargs) -> dict[str, Any]:
    """What the model's forward hands its text decoder for ``inputs``: ``inputs_embeds`` and, when the family
    passes them, the DeepStack inputs (``DEEPSTACK_INPUTS``). The forward stops at the decoder (a pre-hook)."""
    decoder = text_decoder(model)
    captured: dict[str, Any] = {}

    def grab(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else args[0]
        captured.update({name: kwargs[name] for name in (*DEEPSTACK_INPUTS, *PER_TOKEN_DECODER_INPUTS)
                         if kwargs.get(name) is not None})
        raise _EmbeddingsReady

    handle = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, **forward_kwargs, use_cache=False)
    except _EmbeddingsReady:
        pass
    finally:
        handle.remove()
    if "inputs_embeds" not in captured:
        raise RuntimeError(f"{type(model).__name__} forward never reached its text decoder")
    return captured


@torch.no_grad()
def multimodal_embeddings(model: torch.nn.Module, inputs: dict, **forward_kwargs) -> torch.Tensor:
    """``inputs_embeds [B, L, hidden]`` exactly as the model builds them (token embeddings with the
    vision features scattered in), obtained by running the model's own forward up to its text
    decoder and stopping there (a pre-hook on the decoder), so no family's vision path is re-implemented
    here. ``forward_kwargs`` are added to the call (e.g. explicit ``position_ids`` so that Qwen2-VL
    does not compute and cache its own)."""
    return _decoder_inputs(model, inputs, **forward_kwargs)["inputs_embeds"]


def _kept_deepstack(captured: dict[str, Any], kept: torch.Tensor) -> dict[str, Any]:
    """The DeepStack inputs of the kept columns ``kept`` (indices into L): the visual mask restricted to them, and
    each layer's features for the kept visual tokens only. The features hold one row per True of
    ``visual_pos_masks`` in row-major order, so a visual token's row is its rank among the visual tokens."""
    if "deepstack_visual_embeds" not in captured:
        return {}
    visual = captured["visual_pos_masks"]
    if visual.shape[0] != 1:
        raise ValueError("pruned prefill with DeepStack features runs batch size 1")
    kept_visual = visual[0, kept.to(visual.device)]  # [n_kept] bool: which kept columns are visual
    rows = visual[0].long().cumsum(0)[kept.to(visual.device)][kept_visual] - 1  # feature row of each
    return {
        "visual_pos_masks": kept_visual[None],
        "deepstack_visual_embeds": [layer[rows.to(layer.device)] for layer in captured["deepstack_visual_embeds"]],
    }


@torch.no_grad()
def forward_kept(model: torch.nn.Module, inputs: dict, cache, keep: torch.Tensor, position_ids: torch.Tensor,
                 token_inputs: tuple[str, ...] = ()):
    """Run ``model`` on the kept prompt positions only, with their original positions.

    ``position_ids``: the full prompt's positions (``[B, L]``, or ``[4, B, L]`` for M-RoPE: a text row and three rope rows); the kept
    columns are selected. ``keep``: bool ``[1, L]``. ``token_inputs``: names of further ``[B, L]`` inputs
    that go with the kept columns (e.g. ``token_type_ids``, which shape Gemma 3's and PaliGemma's prompt
    mask). Returns the model output (``logits`` of the last kept position only); ``cache`` then holds
    ``keep.sum()`` entries. Cost: the embeddings and the vision encoder run once as in a plain prefill
    (that pass stops before the text decoder), then the decoder runs on ``keep.sum()`` tokens instead of L.
    """
    if keep.dim() != 2 or keep.shape != inputs["input_ids"].shape:
        raise ValueError(f"keep must be bool [B, L] like input_ids; got {tuple(keep.shape)}")
    # explicit positions also stop Qwen2-VL from computing (and caching) its own rope_deltas here
    captured = _decoder_inputs(model, inputs, position_ids=position_ids)
    embeds = captured["inputs_embeds"]
    kept = keep[0].bool().nonzero().squeeze(1).to(embeds.device)
    attention_mask = inputs.get("attention_mask")
    per_token = {name: inputs[name][:, kept.to(inputs[name].device)] for name in token_inputs
                 if inputs.get(name) is not None}
    per_token.update({name: captured[name][:, kept.to(captured[name].device)] for name in PER_TOKEN_DECODER_INPUTS
                      if name in captured})
    deepstack = _kept_deepstack(captured, kept)

    def add_deepstack(module, args, kwargs):
        # the kept-rows call passes no pixels, so the model hands its decoder no DeepStack inputs: give it the
        # kept visual rows' (the model's forward has no argument of its own for them)
        return args, {**kwargs, **deepstack}

    handle = text_decoder(model).register_forward_pre_hook(add_deepstack, with_kwargs=True) if deepstack else None
    try:
        return model(
            **per_token,
            inputs_embeds=embeds[:, kept],
            position_ids=position_ids[..., kept.to(position_ids.device)],
            attention_mask=None if attention_mask is None else attention_mask[:, kept.to(attention_mask.device)],
            **{cache_kwarg(model): cache},
            use_cache=True,
            logits_to_keep=1,
        )
    finally:
        if handle is not None:
            handle.remove()
