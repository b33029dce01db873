"""Can a model without a family adapter of its own run under tree speculative decoding? Decided from its config
and class, never from a list of names.

A decoder-only language model needs no family-specific code (``CausalLMAdapter`` serves it) when
  * every decoder layer is an attention layer, full or sliding-window (``config.layer_types``), whose keys and
    values sit in a per-token cache the engine can crop and compact: no recurrent / state-space / linear-attention
    state (``_is_stateful`` models, hybrid ``layer_types``), which cannot be rolled back to an accepted path;
  * no cross-attention layers (their keys/values, e.g. an image's in Mllama, share the cache at another length);
  * its forward takes explicit ``position_ids`` (tree nodes sit at their depth, not at the cache length), and its
    positions come from them alone: no ALiBi biases (``config.alibi``, Falcon-RW), which the model computes from
    the running count of a 2-D attention mask;
  * its forward takes an ``attention_mask`` that may be a prepared additive 4-D mask (the tree mask): the model's
    module builds its masks with ``transformers.masking_utils``, which passes a 4-D mask through as given;
  * it is not an encoder-decoder, and not a multimodal model (those need an adapter that knows their inputs).
A sliding window shorter than the sequence is applied by the tree forwards, or refused per prompt where the model
cannot be given it (``FamilyAdapter.window_refusal``, at ``SpeculativeGenerator.generate``); so is
a rope scaling whose frequencies depend on the forward's longest position when a generation would reach or cross
its threshold (``rope_refusal``; any model, family adapter or not).
"""
from __future__ import annotations

import inspect
import sys

import torch

#: Layer kinds of ``config.layer_types`` that keep a plain per-token key/value cache.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_kinds(config) -> set[str]:
    kinds = getattr(config, "layer_types", None)
    return set(kinds) if isinstance(kinds, (list, tuple)) else set()


def cache_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model``'s decoder cache cannot serve tree decoding (recurrent/hybrid state, cross-attention), or None."""
    name = type(model).__name__
    text_config = model.config.get_text_config(decoder=True)
    other = sorted(_layer_kinds(text_config) - set(ATTENTION_LAYER_TYPES))
    if other:
        return (
            f"{name} has decoder layers of kind {', '.join(repr(k) for k in other)} (config.layer_types): a "
            f"recurrent / linear-attention / hybrid layer keeps a running state instead of per-token keys and "
            f"values, which cannot be rolled back to the accepted branch of a token tree"
        )
    if getattr(model, "_is_stateful", False):
        return (
            f"{name} keeps a recurrent state (a stateful model: state-space / linear-attention layers) instead of "
            f"per-token keys and values, which cannot be rolled back to the accepted branch of a token tree"
        )
    if getattr(text_config, "cross_attention_layers", None):
        return (
            f"{name} has cross-attention layers (config cross_attention_layers): their keys/values (the image's) "
            f"share the decoder cache at a length other than the sequence's, and the engine crops and compacts "
            f"every cache layer to the accepted tokens"
        )
    return None


def causal_lm_refusal(model: torch.nn.Module) -> str | None:
    """Why the generic causal-LM adapter cannot serve ``model``, or None when it can."""
    name = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; tree speculative decoding here runs decoder-only models"
    reason = cache_refusal(model)
    if reason is not None:
        return reason
    if config.get_text_config(decoder=True) is not config:
        return (
            f"{name} is a multimodal model (its config holds sub-model configs) of a family sage_ext has no adapter "
            f"for; its inputs and positions need family-specific handling"
        )
    parameters = inspect.signature(type(model).forward).parameters
    if "position_ids" not in parameters:
        return (
            f"{name}'s forward takes no position_ids (it places new tokens at the cache length), so tree nodes "
            f"cannot be given their depth's position"
        )
    if getattr(config, "alibi", False):
        return (
            f"{name} uses ALiBi position biases (config.alibi=True), which it computes from a 2-D attention mask's "
            f"running count of tokens instead of position_ids, so tree nodes cannot be given their depth's position"
        )
    module = sys.modules.get(type(model).__module__)
    if "attention_mask" not in parameters or not hasattr(module, "create_causal_mask"):
        return (
            f"{name} does not take a prepared additive 4-D attention mask (its module does not build masks with "
            f"transformers.masking_utils), which tree verification needs"
        )
    return None


# ------------------------------------------------------------------------------------------- rope scaling
def _rope_parameter_sets(text_config) -> list[dict]:
    """The decoder's rope parameter dicts: one, or one per layer type (``{"full_attention": {...}, ...}``)."""
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    if "rope_type" in params or "type" in params:
        return [params]
    return [value for value in params.values() if isinstance(value, dict)]


def position_dependent_ropes(text_config) -> list[tuple[str, int]]:
    """``(rope_type, threshold)`` for each rope of the decoder whose frequencies depend on the largest position in
    a forward, with the sequence length (largest position + 1) above which they change. The rule is transformers'
    own (``modeling_rope_utils.dynamic_rope_update``): types containing "dynamic" (NTK scaling recomputed whenever
    a forward reaches past the longest sequence seen, above ``max_position_embeddings``) and "longrope" (long
    factors for a forward whose sequence exceeds ``original_max_position_embeddings``). Every other type
    (default, linear, yarn, llama3, proportional, ...) fixes its frequencies when the model is built."""
    found = []
    for params in _rope_parameter_sets(text_config):
        rope_type = str(params.get("rope_type", params.get("type", "default")))
        if "dynamic" in rope_type:
            found.append((rope_type, int(text_config.max_position_embeddings)))
        elif rope_type == "longrope":
            original = params.get("original_max_position_embeddings", text_config.max_position_embeddings)
            found.append((rope_type, int(original)))
    return found


def batch_rope_refusal(name: str, text_config, spans: list[tuple[int, int]]) -> str | None:
    """Why a batch of rows would not decode as each row alone under a position-dependent rope, or None.

    A batched forward takes its frequencies from the longest row in it, so every row must be in the same regime
    for the whole generation: every row's positions within the threshold, or ("longrope") every row's prompt
    already beyond it. ``spans``: per row, (largest prompt position, bound of the largest position reached)."""
    for rope_type, threshold in position_dependent_ropes(text_config):
        within = all(final + 1 <= threshold for _, final in spans)
        beyond = "dynamic" not in rope_type and all(prompt + 1 > threshold for prompt, _ in spans)
        if not (within or beyond):
            return (
                f"{name} uses rope_type={rope_type!r}, whose frequencies follow the longest sequence in a forward "
                f"(above {threshold} positions), and a batch's forwards take the longest row's: a row that stays "
                f"below {threshold} beside one that reaches past it would not decode as it does alone. Decode these "
                f"prompts in separate calls, or keep every row within {threshold} positions"
            )
    return None


def rope_refusal(name: str, text_config, prompt_max_position: int, bound_max_position: int,
                 tree_depth: int = 0) -> str | None:
    """Why tree forwards of a model with a position-dependent rope would not reproduce ``generate``, or None.

    ``generate`` forwards one token at a time, so its frequencies follow each token's own position; a tree forward
    applies the frequencies of its deepest node to every node in it. The two agree exactly when no forward after
    the prompt moves the frequencies: "dynamic" never grows past its threshold (the prompt and every tree stay
    within it), "longrope" never crosses its threshold after the prompt (everything below it, or the prompt
    already above it). ``bound_max_position``: an upper bound of the largest position any target forward reaches,
    the last emitted token's plus ``tree_depth`` (the deepest tree a step may verify after it).
    """
    for rope_type, threshold in position_dependent_ropes(text_config):
        prompt_len, final_len = prompt_max_position + 1, bound_max_position + 1
        if "dynamic" in rope_type:
            safe = final_len <= threshold
        else:
            safe = final_len <= threshold or prompt_len > threshold
        if not safe:
            return (
                f"{name} uses rope_type={rope_type!r}, whose frequencies change with the longest sequence in a "
                f"forward (above {threshold} positions); a token tree's forward reaching past that would rotate "
                f"its nodes differently from generate's one-token steps, so the output would not be the target's. "
                f"This generation may reach {final_len} positions (prompt up to {prompt_len}, plus max_new_tokens "
                f"and a tree up to {tree_depth} deep, past the last token); lower max_new_tokens by "
                f"{final_len - threshold} to keep it within {threshold}, or use policy 'ar'"
            )
    return None
