"""Checks of a `SpeculativeGenerator.generate` call, before anything runs.

`check_generate_call` is called first thing by the engine's ``generate``. It turns what transformers' own
``generate`` accepts into what the engine runs (``input_ids`` as a list, ``max_length``), refuses the
``generate`` arguments the engine does not implement instead of ignoring them, and catches inputs that would
otherwise fail deep inside transformers (or, worse, run): image placeholder tokens without pixel values,
pixel values of the wrong shape or count. Every refusal is a ``ValueError`` (a wrong value) or a ``TypeError``
(a wrong kind of object) whose message names the argument and what was expected.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .engine.processing import PROCESSOR_SETTINGS, sampling_warpers
from .families.base import height_width, token_id_list
from .families.glm4v import Glm4vAdapter, shared_placeholder_videos
from .families.internvl import internvl_tile_tokens
from .families.llava import llava_image_tokens
from .families.llava_next import video_tokens_per_frame
from .families.llava_onevision1_5 import LlavaOnevision15Adapter
from .families.qwen2_vl import Qwen2VLAdapter
from .families.qwen3_vl import Qwen3VLAdapter

#: What ``generate`` produces when no length is set: not by the call, nor by the generation config.
DEFAULT_MAX_NEW_TOKENS = 64

#: The ``generate`` arguments the engine takes (its signature's, and the settings it reads from keywords: the other
#: sampling warpers and transformers' processors it applies), listed in refusals.
ENGINE_ARGUMENTS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
                    "top_p", "top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
                    *PROCESSOR_SETTINGS, "num_return_sequences", "max_time", "eos_token_id", "pad_token_id",
                    "stop_strings", "tokenizer", "streamer", "generator", "generation_config")

#: The generation settings the engine implements, each read like ``generate`` reads it: the call's argument, else
#: the generation config's (a given ``generation_config`` over the target's own), else transformers' default here.
SETTING_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                    "top_h": None, "min_p": None, "typical_p": None, "epsilon_cutoff": None,
                                    "eta_cutoff": None, "repetition_penalty": 1.0, "min_new_tokens": None,
                                    "min_length": 0, "eos_token_id": None, "pad_token_id": None, "stop_strings": None,
                                    "num_return_sequences": 1, "max_time": None,
                                    **{key: None for key in PROCESSOR_SETTINGS}}

#: Settings ``generate`` reads only when sampling (in greedy decoding it ignores them, and so does the engine).
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")

#: Settings that never change which tokens come out, whatever their value and wherever they are set: how caches,
#: compilation or transformers' own assisted decoding are set up, beam-search-only settings (``num_beams`` > 1 is
#: refused), renormalizing after the processors (the engine's softmax renormalizes).
TOKEN_NEUTRAL = ("bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
                 "max_cache_len", "compile_config", "disable_compile", "low_memory", "prefill_chunk_size",
                 "renormalize_logits", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
                 "assistant_confidence_threshold", "prompt_lookup_num_tokens", "max_matching_ngram_size",
                 "assistant_lookbehind", "target_lookbehind", "assistant_early_exit", "assistant_ensemble_weight",
                 "speculation_type", "use_mtp", "length_penalty", "early_stopping", "num_beam_groups",
                 "diversity_penalty")

#: What ``generate`` returns besides the tokens: skipped in a generation config; asked for by the call (``True``),
#: refused, since the engine returns the tokens and its own statistics only.
OUTPUT_REQUESTS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits",
                   "return_dict_in_generate")

#: transformers ``generate`` arguments that change nothing in a greedy/sampling decode when they have these values
#: (their defaults): accepted and dropped.
NO_OP_VALUES: dict[str, tuple] = {
    "num_beams": (1,),
    "return_dict_in_generate": (False,),
    "output_scores": (False,),
    "output_logits": (False,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,),
    "guidance_scale": (1.0,),
    "penalty_alpha": (0.0,),
    "token_healing": (False,),
    "synced_gpus": (False,),
}

#: Token ids with no effect on a prompt without padding (no padding, the prompt already starts).
IGNORABLE_IDS = ("pad_token_id", "bos_token_id", "decoder_start_token_id")

#: Arguments of transformers' ``generate`` itself (beside the GenerationConfig fields), with what to do instead.
GENERATE_ONLY = {
    "assistant_model": "the draft is SpeculativeGenerator's second argument",
    "assistant_tokenizer": "target and draft must share the tokenizer",
    "logits_processor": "only generate's own processing is applied, set by its arguments: the repetition penalty, "
                        "minimum lengths, sequence_bias, no_repeat_ngram_size, bad_words_ids, suppressed and forced "
                        "tokens, the exponential length penalty and the sampling warpers (lossless verification "
                        "needs the same processing on every tree node)",
    "stopping_criteria": "use eos_token_id or stop_strings",
    "prefix_allowed_tokens_fn": "constrained decoding is not implemented",
    "negative_prompt_ids": "classifier-free guidance is not implemented",
    "negative_prompt_attention_mask": "classifier-free guidance is not implemented",
    "custom_generate": "this already is a custom generation loop",
}


@dataclass(frozen=True)
class GenerationSettings:
    """What a ``generate`` call decodes with (``check_generate_call``): every value is the call's argument, else the
    generation config's, else transformers' default (``SETTING_DEFAULTS``; lengths: ``DEFAULT_MAX_NEW_TOKENS``)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    top_h: float | None
    min_p: float | None
    typical_p: float | None
    epsilon_cutoff: float | None
    eta_cutoff: float | None
    repetition_penalty: float
    min_new_tokens: int
    min_length: int
    eos_token_id: Any  # an int, a list or a tensor of ids, None: no EOS
    pad_token_id: int | None
    stop_strings: str | list[str] | None
    num_return_sequences: int  # samples per prompt (sampling only, as in generate)
    max_time: float | None  # seconds after which every row stops (generate's MaxTimeCriteria; None: no limit)
    processors: dict[str, Any]  # the PROCESSOR_SETTINGS set (transformers' processors apply them)


def _config_entries(config: Any) -> dict[str, Any]:
    """The settings a generation config sets (not None): its GenerationConfig fields only, as ``generate`` reads
    them (a checkpoint's config may carry other keys, e.g. a serving engine's ``presence_penalty``, which
    ``generate`` never applies)."""
    if config is None:
        return {}
    if not hasattr(config, "to_dict"):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}")
    fields = _generation_config_fields()
    return {key: value for key, value in config.to_dict().items() if value is not None and key in fields}


@functools.cache
def _generation_config_fields() -> frozenset[str]:
    """The fields of transformers' GenerationConfig (its settings; bookkeeping left out)."""
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}


def _as_token_tensor(value: Any, name: str) -> Tensor:
    """``value`` as an int64 tensor ``[1, L]``: a tensor as it is, a list / tuple / NumPy array of token ids
    (one prompt: ``[ids]`` or ``ids``) converted like ``torch.tensor``."""
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool and name == "input_ids":
            raise TypeError(f"{name} must hold integer token ids, got a tensor of dtype {value.dtype}")
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be token ids (a LongTensor [1, L] or a list of ints), got text {value!r}; "
                        f"tokenize it first (processor(text=..., return_tensors='pt'))")
    if isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} given as a {type(value).__name__} must be a list of int token ids (or a list "
                            f"of one such list), not {value!r:.80}") from error
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty; the prompt needs at least one token")
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"{name} given as a {type(value).__name__} must hold int token ids, got {tensor.dtype}")
        tensor = tensor.to(torch.int64)
        return tensor[None] if tensor.dim() == 1 else tensor
    raise TypeError(f"{name} must be a LongTensor [1, L] or a list of int token ids, got {type(value).__name__}")


def _model_input_names(model: Any) -> set[str] | None:
    """What ``model`` takes as inputs, by ``generate``'s own rule (``_validate_model_kwargs``): the parameters of its
    ``prepare_inputs_for_generation``, and of its ``forward`` when the former passes ``**kwargs`` on, and the
    model-agnostic ``TransformersKwargs``; None (any name) when there is no signature to read."""
    try:
        names = set(inspect.signature(model.prepare_inputs_for_generation).parameters)
        if "kwargs" in names or "model_kwargs" in names:
            names |= set(inspect.signature(model.forward).parameters)
    except (AttributeError, TypeError, ValueError):
        return None
    try:
        from transformers.utils import TransformersKwargs
        names |= set(TransformersKwargs.__optional_keys__)
    except ImportError:
        pass
    return names | {"mm_encoder_outputs"}


def _as_mask_tensor(value: Any) -> Tensor:
    """An ``attention_mask`` as an integer tensor: 1 for a token, 0 for padding (a float or bool mask of 0/1, as
    ``generate`` takes them, is converted)."""
    if isinstance(value, Tensor) and (value.is_floating_point() or value.dtype == torch.bool):
        if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
            raise ValueError("attention_mask must hold 1 for a token and 0 for padding, got other values")
        return value.to(torch.int64)
    if isinstance(value, Tensor) and value.is_complex():
        raise TypeError(f"attention_mask must hold 1 for a token and 0 for padding, got a tensor of dtype {value.dtype}")
    return _as_token_tensor(value, "attention_mask")


def _check_number(name: str, value: Any, *, low: float, low_open: bool, high: float | None = None,
                  integer: bool = False) -> None:
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        lo = "(" if low_open else "["
        where = f"in {lo}{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise ValueError(f"{name} must be {where}, got {value}")


def _changes_no_token(key: str, value: Any, do_sample: bool) -> bool:
    """Whether setting ``key`` to ``value`` leaves generate's tokens as they are, wherever it is set: a neutral
    setting, an id with no effect on an unpadded prompt, a no-op value, or a sampling setting in greedy decoding."""
    return (key in TOKEN_NEUTRAL or key in IGNORABLE_IDS or _is_no_op(key, value)
            or (key in SAMPLING_ONLY and not do_sample))


def _is_no_op(key: str, value: Any) -> bool:
    """Whether ``value`` is the value of ``key`` that changes nothing (booleans match booleans only)."""
    if isinstance(value, (list, tuple, dict)):  # an empty list of tokens to suppress or ban, no bias
        return len(value) == 0 and isinstance(NO_OP_VALUES.get(key, (None,))[0], (list, dict))
    if not isinstance(value, (bool, int, float)):
        return False
    for ok in NO_OP_VALUES.get(key, ()):
        if isinstance(ok, bool) or isinstance(value, bool):
            if value is ok:
                return True
        elif value == ok:
            return True
    return False


def _config_value(config, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _shape(value: Any) -> tuple | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


#: What a processor's media outputs depend on: the placeholder token ids (model config: either name), the vision
#: geometry (``vision_config``: pixels per image and patch, patches merged per token) and the features kept per image
_MEDIA_TOKENS = {"image_token_id": ("image_token_id", "image_token_index"),
                 "video_token_id": ("video_token_id", "video_token_index")}
_VISION_GEOMETRY = ("image_size", "patch_size", "temporal_patch_size", "spatial_merge_size", "num_channels",
                    "in_channels")
_FEATURE_LAYOUT = ("vision_feature_select_strategy", "image_grid_pinpoints", "mm_tokens_per_image", "scale_factor",
                   "downsample_ratio")


def media_layout(config) -> dict[str, Any]:
    """The settings of ``config`` that decide which processor outputs its model reads (those it has): a draft is
    given the target's processor outputs, so the two must agree on them (``SpeculativeGenerator``'s pair check)."""
    layout = {name: _config_value(config, *aliases) for name, aliases in _MEDIA_TOKENS.items()}
    layout |= {name: getattr(config, name, None) for name in _FEATURE_LAYOUT}
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        layout |= {f"vision_config.{name}": getattr(vision, name, None) for name in _VISION_GEOMETRY}
    return {name: value for name, value in layout.items() if value is not None}


#: The families whose videos are written with the IMAGE placeholder, a video's told apart by ``mm_token_type_ids``
#: 2 (GLM-4V)
SHARED_PLACEHOLDER_TYPES = Glm4vAdapter.model_types
#: The families whose media are patch rows with a t/h/w grid (one check for images and videos): Qwen2-VL's adapter
#: and those built on it
QWEN_VL_TYPES = tuple(model_type for adapter in (Qwen2VLAdapter, Qwen3VLAdapter, Glm4vAdapter, LlavaOnevision15Adapter)
                      for model_type in adapter.model_types)


def _media_placeholders(config, input_ids: Tensor, inputs: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``kind -> (placeholder token id, how many input_ids hold)`` for the image and video placeholders ``config``
    names; GLM-4V's videos by ``shared_placeholder_videos``."""
    image_id = _config_value(config, "image_token_id", "image_token_index")
    video_id = _config_value(config, "video_token_id", "video_token_index")
    if getattr(config, "model_type", "") in SHARED_PLACEHOLDER_TYPES and image_id is not None:
        placeholders = input_ids == int(image_id)
        video = shared_placeholder_videos(input_ids, int(image_id), inputs.get("mm_token_type_ids"), inputs)
        return {"image": (int(image_id), int((placeholders & ~video).sum())), "video": (int(image_id), int(video.sum()))}
    return {kind: (int(token_id), int((input_ids == int(token_id)).sum()))
            for kind, token_id in (("image", image_id), ("video", video_id)) if token_id is not None}


def _is_integer_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor of integers (token ids, token types, grids), as processors return them."""
    return isinstance(value, Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool


def _check_token_types(input_ids: Tensor, inputs: dict[str, Any], audio: bool) -> None:
    """``mm_token_type_ids`` (Qwen-VL, GLM-4V, Gemma 4), when given: an integer tensor shaped like ``input_ids`` of 0
    (text), 1 (an image's placeholder), 2 (a video's) and, for a model with an audio tower (``audio``), 3 (an audio
    clip's), as processors return it (``ProcessorMixin.create_mm_token_type_ids``)."""
    types = inputs.get("mm_token_type_ids")
    if types is None:
        return
    if not _is_integer_tensor(types) or tuple(types.shape) != tuple(input_ids.shape):
        raise ValueError(f"mm_token_type_ids must be an integer tensor shaped like input_ids {tuple(input_ids.shape)} "
                         f"(the processor's), got {_shape(types)}"
                         f"{'' if not isinstance(types, Tensor) else f' of {types.dtype}'}")
    wrong = sorted(set(types[(types < 0) | (types > (3 if audio else 2))].tolist()))
    if wrong:
        kinds = "0 (text), 1 (image), 2 (video) and 3 (audio)" if audio else "0 (text), 1 (image) and 2 (video)"
        raise ValueError(f"mm_token_type_ids holds {wrong[:5]}: its values are {kinds}")


def _check_visual_inputs(model: torch.nn.Module, input_ids: Tensor, inputs: dict[str, Any]) -> None:
    """Image / video placeholder tokens against the pixel values given with them."""
    config = model.config
    model_name = type(model).__name__
    image_id = _config_value(config, "image_token_id", "image_token_index")
    model_type = getattr(config, "model_type", "")
    _check_token_types(input_ids, inputs, audio=getattr(config, "audio_config", None) is not None)
    for key in ("pixel_values", "pixel_values_videos"):
        if inputs.get(key) is not None and not isinstance(inputs[key], Tensor):
            raise TypeError(f"{key} must be a tensor (the processor's return_tensors='pt'), got "
                            f"{type(inputs[key]).__name__}")
    if (model_type in SHARED_PLACEHOLDER_TYPES and inputs.get("pixel_values") is not None
            and inputs.get("pixel_values_videos") is not None):
        raise ValueError(f"{model_name} in transformers cannot take an image and a video in one prompt (it counts a "
                         f"video's placeholders among the image's): give them in separate prompts (a batch may mix "
                         f"rows of images and rows of videos)")
    placeholders = _media_placeholders(config, input_ids, inputs)
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if kind not in placeholders:
            continue
        token_id, count = placeholders[kind]
        given = inputs.get(key) is not None
        precomputed = any(inputs.get(k) is not None for k in ("inputs_embeds", "image_features", f"{kind}_embeds"))
        if count and not given and not precomputed:
            shared = (f" ({model_name} writes a video's frames with the image placeholder too: a video's are those of "
                      f"mm_token_type_ids 2)" if model_type in SHARED_PLACEHOLDER_TYPES else "")
            raise ValueError(
                f"input_ids hold {count} {kind} placeholder tokens (id {int(token_id)}) but no {key} were given{shared}: "
                f"pass the processor's whole output (processor(text=..., {kind}s=..., return_tensors='pt')), not only "
                f"its input_ids"
            )
        if given and not count:
            raise ValueError(
                f"{key} were given but input_ids hold no {kind} placeholder token (id {int(token_id)}) for "
                f"{model_name} to put them at: build the prompt with the processor (its {kind} token), or leave "
                f"{key} out"
            )
    vision = getattr(config, "vision_config", None)
    if model_type == "llava_next_video" and vision is not None and inputs.get("pixel_values_videos") is not None:
        _check_pooled_videos(model_name, config, inputs["pixel_values_videos"], placeholders["video"][1])
    if model_type in QWEN_VL_TYPES and vision is not None:
        for kind, (token_id, count) in placeholders.items():
            _check_qwen_vl_media(model_name, vision, inputs, kind, token_id, count)
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
    if vision is None or image_id is None:
        return
    if model_type in ("llava_next", "llava_next_video") and inputs.get("image_sizes") is None:
        raise ValueError(f"pixel_values were given without image_sizes; {model_name} needs both (the processor "
                         f"returns them together)")
    if model_type in ("llava", "mistral3"):
        if model_type == "mistral3" and inputs.get("image_sizes") is None:
            raise ValueError(f"pixel_values were given without image_sizes; {model_name} needs both (the processor "
                             f"returns them together)")
        _check_llava_pixels(model, vision, input_ids, inputs, pixel_values, int(image_id))
    elif model_type in ("gemma3", "paligemma"):
        per_image = (config.mm_tokens_per_image if model_type == "gemma3" else
                     getattr(getattr(config, "text_config", None), "num_image_tokens", None))
        _check_square_images(model_name, vision, pixel_values)
        if per_image is not None:
            _check_placeholders(input_ids, int(image_id), [int(per_image)] * pixel_values.shape[0])
    elif model_type == "internvl":  # tiles of the vision config's size, a fixed count of placeholders each
        _check_square_images(model_name, vision, pixel_values)
        _check_placeholders(input_ids, int(image_id), [internvl_tile_tokens(config)] * pixel_values.shape[0])
    elif model_type in ("idefics3", "smolvlm"):  # padded slots of any size up to the tile's: the layout is checked
        channels = int(getattr(vision, "num_channels", 3))
        if pixel_values.dim() != 5 or pixel_values.shape[2] != channels:
            raise ValueError(f"pixel_values has shape {_shape(pixel_values)}; {model_name} expects [batch, images, "
                             f"{channels}, height, width]: make them with the model's processor")
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(pixel_values.shape[:2]) +
                                 tuple(pixel_values.shape[3:])):
            raise ValueError(f"pixel_attention_mask has shape {_shape(mask)}; with pixel_values of shape "
                             f"{_shape(pixel_values)} {model_name} expects [batch, images, height, width] "
                             f"{tuple(pixel_values.shape[:2]) + tuple(pixel_values.shape[3:])}")


def _check_pooled_videos(model_name, config, videos: Tensor, placeholders: int) -> None:
    """LLaVA-NeXT-Video's ``pixel_values_videos [num_videos, frames, C, size, size]`` (the tower's crops) against
    its video placeholders (``video_tokens_per_frame`` per frame)."""
    vision = config.vision_config
    channels = int(getattr(vision, "num_channels", 3))
    height, width = height_width(vision.image_size)
    if not videos.is_floating_point() or videos.dim() != 5 or tuple(videos.shape[2:]) != (channels, height, width):
        raise ValueError(f"pixel_values_videos has shape {_shape(videos)} ({videos.dtype}); {model_name} expects a "
                         f"float tensor [num_videos, frames, {channels}, {height}, {width}]: make them with the model's "
                         f"processor")
    count, frames = videos.shape[:2]
    per_frame = video_tokens_per_frame(config)
    if placeholders != count * frames * per_frame:
        raise ValueError(f"input_ids hold {placeholders} video placeholder tokens but pixel_values_videos hold {count} "
                         f"video(s) of {frames} frames, {per_frame} tokens each ({count * frames * per_frame}): use the "
                         f"processor for the text and the videos together (a batch's videos share one frame count)")


def _check_square_images(model_name, vision, pixel_values: Tensor) -> None:
    """``pixel_values [num_images, C, size, size]`` at the vision config's image size and channels, as the processor
    resizes them."""
    channels = int(getattr(vision, "num_channels", 3))
    size = vision.image_size
    height, width = height_width(size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[-3:]) != (channels, height, width):
        raise ValueError(
            f"pixel_values has shape {_shape(pixel_values)}; {model_name} expects [num_images, {channels}, {height}, "
            f"{width}] (vision_config: num_channels {channels}, image_size {size}): make them with the model's "
            f"processor"
        )


def _check_placeholders(input_ids: Tensor, image_id: int, counts: list[int]) -> None:
    """The image placeholders of ``input_ids`` against the features of the images given (``counts``, one per image)."""
    tokens = int((input_ids == image_id).sum())
    if tokens != sum(counts):
        each = f"{counts[0]} tokens each" if len(set(counts)) == 1 else f"{counts} tokens"
        raise ValueError(
            f"input_ids hold {tokens} image placeholder tokens (id {image_id}) but pixel_values hold {len(counts)} "
            f"image(s) of {each} ({sum(counts)}): use the processor for the text and the images together"
        )


def _check_llava_pixels(model, vision, input_ids, inputs, pixel_values, image_id) -> None:
    model_name = type(model).__name__
    image_sizes = inputs.get("image_sizes")
    if image_sizes is None:
        _check_square_images(model_name, vision, pixel_values)
    else:  # a tower that takes any size (Pixtral): image i is pixel_values[i, :, :h, :w]
        channels = int(getattr(vision, "num_channels", 3))
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(f"pixel_values has shape {_shape(pixel_values)}; {model_name} expects [num_images, "
                             f"{channels}, height, width]: make them with the model's processor")
        if not isinstance(image_sizes, Tensor) or tuple(image_sizes.shape) != (pixel_values.shape[0], 2):
            raise ValueError(f"image_sizes has shape {_shape(image_sizes)}; with pixel_values of "
                             f"{pixel_values.shape[0]} image(s) {model_name} expects [{pixel_values.shape[0]}, 2] "
                             f"(height, width of each)")
    counts = llava_image_tokens(model, pixel_values, image_sizes)
    if counts is not None:
        _check_placeholders(input_ids, image_id, counts)


def _check_qwen_vl_media(model_name, vision, inputs, kind, token_id, tokens) -> None:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4V / LLaVA-OneVision-1.5 images or videos (``kind``): patch rows against ``{kind}_grid_thw``,
    and the grid against the ``tokens`` ``{kind}`` placeholders (t*h*w / spatial_merge_size^2 each)."""
    pixel_key = "pixel_values" if kind == "image" else "pixel_values_videos"
    grid_key = f"{kind}_grid_thw"
    pixels, grid = inputs.get(pixel_key), inputs.get(grid_key)
    if pixels is None:
        return
    if grid is None:
        raise ValueError(f"{pixel_key} were given without {grid_key}; {model_name} needs both (the processor "
                         f"returns them together)")
    if not _is_integer_tensor(grid) or grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{grid_key} has shape {_shape(grid)}"
                         f"{'' if not isinstance(grid, Tensor) else f' ({grid.dtype})'}; {model_name} expects an integer "
                         f"tensor [num_{kind}s, 3] (t, h, w)")
    patch = int(vision.patch_size)
    temporal = int(getattr(vision, "temporal_patch_size", 1))  # LLaVA-OneVision-1.5's tower has no temporal patch
    channels = int(getattr(vision, "in_channels", getattr(vision, "num_channels", 3)))
    width = channels * temporal * patch * patch
    patches = int(grid.prod(-1).sum())
    if pixels.dim() != 2 or tuple(pixels.shape) != (patches, width):
        raise ValueError(
            f"{pixel_key} has shape {_shape(pixels)}; with {grid_key} {grid.tolist()} {model_name} expects "
            f"[{patches}, {width}] (sum of t*h*w patches, channels*temporal_patch*patch^2)"
        )
    merge = int(getattr(vision, "spatial_merge_size", 2))
    if tokens != patches // (merge * merge):
        raise ValueError(
            f"input_ids hold {tokens} {kind} placeholder tokens (id {token_id}) but {grid_key} {grid.tolist()} "
            f"gives {patches // (merge * merge)}: use the processor for the text and the {kind}s together"
        )


def check_generate_call(target: Any, input_ids: Any, arguments: dict[str, Any], *, inputs: dict[str, Any],
                        generator: Any = None) -> tuple[Tensor, GenerationSettings, dict[str, Any]]:
    """Check and normalize a ``generate`` call of the engine whose target is ``target`` (a family adapter or the
    model). ``arguments``: the engine's own generate arguments (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``,
    ``generation_config``; None: not given); ``inputs``: every other keyword argument.

    Returns ``(input_ids [B, L] tensor, settings, model inputs)``: lists converted, the settings read as ``generate``
    reads them (the call's arguments over ``generation_config`` over the target's own ``generation_config``;
    ``max_length`` turned into ``max_new_tokens``), no-op ``generate`` arguments dropped. What ``generate`` would
    apply and the engine does not implement is refused, not ignored, wherever it is set: a call's argument, or an
    entry of either generation config. Raises ValueError / TypeError."""
    model = getattr(target, "model", target)
    inputs = dict(inputs)
    arguments = {key: value for key, value in arguments.items() if value is not None}
    if input_ids is None:
        raise TypeError("input_ids is required (the processor's or tokenizer's output)")
    input_ids = _as_token_tensor(input_ids, "input_ids")
    if "attention_mask" in inputs and inputs["attention_mask"] is not None:
        inputs["attention_mask"] = _as_mask_tensor(inputs["attention_mask"])
    if input_ids.dim() == 2 and input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty; the prompt needs at least one token")
    prompt_len = input_ids.shape[-1]
    # the generation config: a given one's entries over the target's own (transformers fills what a given config
    # leaves unset from model.generation_config)
    config = {**_config_entries(getattr(model, "generation_config", None)),
              **_config_entries(arguments.pop("generation_config", None))}
    do_sample = arguments.get("do_sample", config.get("do_sample", SETTING_DEFAULTS["do_sample"]))
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")

    # the call's other transformers generate arguments: honoured, dropped as no-ops, or refused
    config_fields = _generation_config_fields()
    max_length = inputs.pop("max_length", None)
    given: set[str] = set()  # generation settings the call sets (they override the config's)
    refused, unknown = [], []
    for key in list(inputs):
        if key in GENERATE_ONLY:
            if inputs[key] is None:
                inputs.pop(key)
                continue
            raise ValueError(f"generate argument {key!r} is not supported by sage_ext: {GENERATE_ONLY[key]}")
        if key not in config_fields and key not in NO_OP_VALUES:
            if inputs[key] is not None:
                unknown.append(key)  # unless a model input (pixel values, grids, ...): sorted out below
            continue
        value = inputs.pop(key)
        if value is None:
            continue
        given.add(key)
        if key in SETTING_DEFAULTS:  # honoured, like the engine's own arguments (min_new_tokens, ...)
            arguments[key] = value
            continue
        if _changes_no_token(key, value, do_sample):
            continue
        refused.append(f"{key}={value!r}")
    names = _model_input_names(model) if unknown else None
    unknown = [key for key in unknown if names is not None and key not in names]
    if unknown:  # generate's own check: a misspelled argument is an error, not an input nothing reads
        raise ValueError(
            f"argument(s) {', '.join(repr(key) for key in unknown)} are neither generate arguments nor inputs "
            f"{type(model).__name__} takes (misspelled?); generate arguments sage_ext's engine takes: "
            f"{', '.join(ENGINE_ARGUMENTS)}"
        )
    if refused:
        raise ValueError(
            f"generate argument(s) {', '.join(refused)} not supported by sage_ext's engine (refused rather than ignored); "
            f"it takes: {', '.join(ENGINE_ARGUMENTS)}, and the model inputs"
        )
    # the generation config's entries the engine does not implement: generate would apply them, so ignoring them
    # would give another output than target.generate
    from_config = []
    for key, value in config.items():
        if (key in SETTING_DEFAULTS or key in ("max_new_tokens", "max_length") or key in given
                or key in OUTPUT_REQUESTS or _changes_no_token(key, value, do_sample)):
            continue
        from_config.append((key, value))
    if from_config:
        settings = ", ".join(f"{key}={value!r}" for key, value in from_config)
        ways = ", ".join(f"pass {key}={NO_OP_VALUES[key][0]!r}" if key in NO_OP_VALUES
                         else f"set model.generation_config.{key} = None" for key, _ in from_config)
        raise ValueError(
            f"the generation config sets {settings}, which target.generate applies and sage_ext's engine does not "
            f"implement (refused rather than ignored: the output would differ from target.generate's); to decode "
            f"without it, {ways} (and do the same for target.generate to compare), or remove it from the "
            f"checkpoint's generation_config.json"
        )

    # lengths: max_new_tokens (the call's, else the config's) over max_length (the call's, else the config's), as
    # generate ranks them
    max_new_tokens = arguments.get("max_new_tokens")
    if max_length is not None and max_new_tokens is not None:
        raise ValueError(f"pass max_new_tokens ({max_new_tokens}) or max_length ({max_length}), not both")
    source = "max_length"
    if max_new_tokens is None:
        max_new_tokens = config.get("max_new_tokens")
        if max_new_tokens is not None:
            max_length = None
        elif max_length is None:
            max_length, source = config.get("max_length"), "the generation config's max_length"
    if max_length is not None:
        _check_number("max_length", max_length, low=1, low_open=False, integer=True)
        if max_length <= prompt_len:
            raise ValueError(f"{source} ({max_length}) leaves no room for new tokens after the {prompt_len}-token "
                             f"prompt; use max_new_tokens")
        max_new_tokens = max_length - prompt_len
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    _check_number("max_new_tokens", max_new_tokens, low=1, low_open=False, integer=True)

    value = {key: arguments.get(key, config.get(key, default)) for key, default in SETTING_DEFAULTS.items()}
    _check_number("temperature", value["temperature"], low=0.0, low_open=False)
    _check_number("top_k", value["top_k"], low=0, low_open=False, integer=True)
    _check_number("top_p", value["top_p"], low=0.0, low_open=False, high=1.0)
    _check_number("repetition_penalty", value["repetition_penalty"], low=0.0, low_open=True)
    _check_number("min_length", value["min_length"], low=0, low_open=False, integer=True)
    if value["min_new_tokens"] is not None:  # it takes precedence over min_length, as in generate
        _check_number("min_new_tokens", value["min_new_tokens"], low=0, low_open=False, integer=True)
        value["min_length"] = 0
    _check_number("num_return_sequences", value["num_return_sequences"], low=1, low_open=False, integer=True)
    if value["max_time"] is not None:
        _check_number("max_time", value["max_time"], low=0.0, low_open=False)
    if value["num_return_sequences"] > 1 and not do_sample:  # generate's rule (GenerationConfig.validate)
        raise ValueError(f"num_return_sequences={value['num_return_sequences']} needs do_sample=True: greedy decoding "
                         f"gives one sequence per prompt (transformers refuses it too; beam search is not implemented)")
    if do_sample and not value["temperature"] > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {value['temperature']}")
    for key in ("top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):  # their range: the warpers' check
        if value[key] is not None:
            if isinstance(value[key], bool) or not isinstance(value[key], numbers.Real):
                raise TypeError(f"{key} must be a number, got {value[key]!r}")
            value[key] = float(value[key])
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (seeded, on the target's device), got "
                        f"{type(generator).__name__}")
    settings = GenerationSettings(
        max_new_tokens=int(max_new_tokens), do_sample=do_sample,
        # generate's warpers take Python numbers (a NumPy or 0-d tensor value is checked as a number already)
        temperature=float(value["temperature"]), top_k=int(value["top_k"]), top_p=float(value["top_p"]),
        top_h=value["top_h"], min_p=value["min_p"], typical_p=value["typical_p"],
        epsilon_cutoff=value["epsilon_cutoff"], eta_cutoff=value["eta_cutoff"],
        repetition_penalty=float(value["repetition_penalty"]), min_new_tokens=int(value["min_new_tokens"] or 0),
        min_length=int(value["min_length"]), eos_token_id=value["eos_token_id"],
        pad_token_id=value["pad_token_id"], stop_strings=value["stop_strings"],
        num_return_sequences=int(value["num_return_sequences"]),
        max_time=None if value["max_time"] is None else float(value["max_time"]),
        processors={key: value[key] for key in PROCESSOR_SETTINGS if value[key] is not None})

    # transformers' own checks of the warpers' values (ValueError), before any work; the processors' are checked as
    # the engine builds them, before its first forward (they need the EOS ids)
    _check_forced_not_suppressed(settings.processors)
    if do_sample:
        sampling_warpers(settings)
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:  # a batch's rows are checked one by one once split
        _check_visual_inputs(model, input_ids, inputs)
    return input_ids, settings, inputs


def _check_forced_not_suppressed(processors: dict[str, Any]) -> None:
    """``GenerationConfig.validate``'s rule: every forced BOS / EOS token also suppressed would leave no token to
    force (every score -inf at that step)."""
    suppressed = processors.get("suppress_tokens")
    if suppressed is None:
        return
    suppressed = set(token_id_list(suppressed))
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        forced = set(token_id_list(processors.get(key)))
        if forced and forced <= suppressed:
            raise ValueError(f"every token of {key} ({sorted(forced)}) is also in suppress_tokens: "
                             f"the step that forces it would have no token left (transformers refuses this too); "
                             f"remove the overlap from one of the two (to keep EOS away early, use min_new_tokens)")


def check_row_inputs(target: Any, input_ids: Tensor, inputs: dict[str, Any]) -> None:
    """The image-input checks of ``check_generate_call`` for one row of a split batch (its own ``[1, L]`` prompt and
    media). Raises ValueError."""
    _check_visual_inputs(getattr(target, "model", target), input_ids, inputs)
