"""sage_ext speculative decoding behind transformers' ``generate(custom_generate=...)``.

transformers copies this file into its modules cache and calls ``generate(model=target, **arguments)`` with
every argument of the user's ``target.generate(...)`` call (``inputs``, ``generation_config``,
``assistant_model``, ``streamer``, ``logits_processor``, ... and the keyword arguments). Only absolute imports:
the copy is imported outside the sage_ext package.

    import sage_ext
    out = target.generate(**inputs, custom_generate=sage_ext.custom_generate_path(), trust_remote_code=True,
                          assistant_model=draft, max_new_tokens=64)          # policy="sage_cost" by default

Mapping: ``model`` = the target, ``assistant_model`` = the draft (None only with ``policy="ar"``),
``policy`` (a name or a policy object), ``draft_prune_ratio``, ``batch_node_budget``, ``capture_draft`` and
``sampling_rule`` go to ``SpeculativeGenerator``; the generation settings are those ``target.generate`` would
use: the call's keyword arguments over ``generation_config`` over the model's own (the engine reads them so), 20
new tokens when no length is set anywhere (transformers' default). What the engine does not implement (beam
search, logits processors, output_scores, ...) is refused with a ValueError, not ignored.
Returns the sequences (LongTensor ``[B, prompt + new]``), or with ``return_dict_in_generate=True`` a
``SpeculativeGenerateOutput`` (a ``GenerateDecoderOnlyOutput`` with the run's ``stats`` added).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.loop import DEFAULT_BATCH_NODE_BUDGET, DEFAULT_SAMPLING_RULE
from sage_ext.engine.policies import DEFAULT_POLICY

#: transformers' number of new tokens when neither max_new_tokens nor max_length is set.
HF_DEFAULT_MAX_NEW_TOKENS = 20

#: generate() arguments that mean nothing when None (anything else is passed on and refused by the engine).
_NONE_MEANS_UNSET = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                     "negative_prompt_attention_mask", "synced_gpus", "assistant_tokenizer")

@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` (``sequences``; scores, logits, attentions stay None) plus the sage_ext
    ``GenerationStats`` of the run (``stats``: tau, steps, timings)."""

    stats: Any = None


def _setting(name: str, kwargs: dict, *configs) -> Any:
    """``name`` as transformers reads it: the call's keyword argument, else the first config that sets it."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in configs:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def generate(model, inputs=None, generation_config=None, assistant_model=None, streamer=None, *,
             policy=DEFAULT_POLICY, draft_prune_ratio: float = 0.0, batch_node_budget: int | None = DEFAULT_BATCH_NODE_BUDGET,
             capture_draft: bool = False, sampling_rule: str = DEFAULT_SAMPLING_RULE, **kwargs: Any):
    """``model.generate(...)`` decoded by sage_ext with ``assistant_model`` as the draft; see the module doc."""
    for key in _NONE_MEANS_UNSET:
        if kwargs.get(key) is None or (key == "synced_gpus" and kwargs[key] is False):
            kwargs.pop(key, None)
    for key in ("past_key_values", "cache"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{key}: sage_ext builds its own caches for target and draft; leave it out")
        kwargs.pop(key, None)
    if inputs is not None:
        if kwargs.get("input_ids") is not None:
            raise ValueError("pass the prompt once: as `inputs` or as `input_ids`, not both")
        kwargs["input_ids"] = inputs
    if assistant_model is None and policy != "ar":
        raise ValueError("sage_ext's custom_generate needs the draft model: pass assistant_model=<draft> "
                         "(or policy='ar' for target-only decoding)")
    # the engine reads the settings as generate does (the call's over generation_config over the model's own); only
    # the length default and the return type are transformers' here
    configs = (generation_config, getattr(model, "generation_config", None))
    if _setting("max_new_tokens", kwargs, *configs) is None and _setting("max_length", kwargs, *configs) is None:
        # transformers' default: 20 new tokens, the whole sequence capped at the model's max_position_embeddings
        prompt_len = torch.as_tensor(kwargs.get("input_ids", [[]])).shape[-1]
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and prompt_len + HF_DEFAULT_MAX_NEW_TOKENS > limit:
            kwargs["max_length"] = limit
        else:
            kwargs["max_new_tokens"] = HF_DEFAULT_MAX_NEW_TOKENS
    return_dict = bool(_setting("return_dict_in_generate", kwargs, *configs))
    kwargs.pop("return_dict_in_generate", None)
    engine = SpeculativeGenerator(model, assistant_model, policy, draft_prune_ratio=draft_prune_ratio,
                                  batch_node_budget=batch_node_budget, capture_draft=capture_draft,
                                  sampling_rule=sampling_rule)
    sequences, stats = engine.generate(streamer=streamer, generation_config=generation_config, **kwargs)
    if return_dict:
        return SpeculativeGenerateOutput(sequences=sequences, stats=stats)
    return sequences
