"""The Python API's answers to mistakes (sage_ext/validation.py, called first thing by ``generate``): lists taken
where transformers takes them, ``max_length`` honoured, every other ``generate`` argument honoured, dropped as a
no-op or refused by name, bad numbers and mismatched image inputs caught with a message naming the mismatch.
The CLI's counterparts are in tests/test_cli_errors.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import correlated_draft, one_thread, tiny_llama, tiny_llava  # noqa: F401  (one_thread: autouse)
from tiny_vlms import tiny_idefics3, tiny_qwen2_vl
from tiny_glm4v import tiny_glm4v, tiny_glm4v_video
from tiny_llava_onevision1_5 import tiny_llava_onevision1_5_video
from tiny_vlms_more import (
    tiny_gemma3,
    tiny_internvl,
    tiny_llava_next_video,
    tiny_paligemma,
    tiny_qwen3_vl,
    tiny_qwen3_vl_video,
)

from sage_ext.engine import SpeculativeGenerator


@pytest.fixture(scope="module")
def llama():
    target, inputs = tiny_llama()
    return SpeculativeGenerator(target, correlated_draft(target), "chain"), target, inputs


def _reference(target, inputs, **kwargs):
    with torch.no_grad():
        return target.generate(**inputs, do_sample=False, **kwargs)


def test_input_ids_as_a_list_like_transformers(llama):
    generator, target, inputs = llama
    ids = inputs["input_ids"]
    as_list = generator.generate(input_ids=ids[0].tolist(), max_new_tokens=6).sequences
    as_nested = generator.generate(input_ids=ids.tolist(), max_new_tokens=6).sequences
    expected = _reference(target, inputs, max_new_tokens=6)
    assert torch.equal(as_list, expected) and torch.equal(as_nested, expected)


@pytest.mark.parametrize("value, error, fragment", [
    ("a photo of", TypeError, "tokenize it first"),
    ([], ValueError, "input_ids is empty"),
    ([1.5, 2.0], TypeError, "int token ids"),
    (torch.ones(1, 4), TypeError, "integer token ids"),
    (None, TypeError, "input_ids is required"),
])
def test_bad_input_ids(llama, value, error, fragment):
    generator, *_ = llama
    with pytest.raises(error, match=fragment):
        generator.generate(input_ids=value, max_new_tokens=4)


def test_attention_mask_as_float_or_bool_like_transformers(llama):
    """A float or bool 0/1 mask is read like the integer one (generate takes them); other values are refused."""
    generator, target, inputs = llama
    expected = _reference(target, inputs, max_new_tokens=6)
    for dtype in (torch.float32, torch.bool):
        mask = inputs["attention_mask"].to(dtype)
        assert torch.equal(generator.generate(**{**inputs, "attention_mask": mask}, max_new_tokens=6).sequences,
                           expected)
    with pytest.raises(ValueError, match="attention_mask must hold 1 for a token and 0 for padding"):
        generator.generate(**{**inputs, "attention_mask": inputs["attention_mask"] * 0.5}, max_new_tokens=6)


def test_max_length_is_honoured(llama):
    generator, target, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    out = generator.generate(**inputs, max_length=prompt_len + 5)
    assert torch.equal(out.sequences, _reference(target, inputs, max_new_tokens=5))
    assert out.sequences.shape[1] == prompt_len + 5


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_length=30, max_new_tokens=4), "not both"),
    (dict(max_length=3), "leaves no room"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
    (dict(do_sample=True, temperature=-1.0), "temperature must be >= 0"),
    (dict(do_sample=True, top_p=2.0), r"top_p must be in \[0.0, 1.0\]"),
    (dict(do_sample=True, top_k=-3), "top_k must be >= 0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
    (dict(num_beams=4), "num_beams=4.*not supported"),
    (dict(generation_config=object()), "generation_config must be a transformers GenerationConfig"),
    (dict(guidance_scale=2.0), "guidance_scale=2.0"),
    (dict(no_repeat_ngram_size=2.5), "ngram_size"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0"),
    (dict(assistant_model=object()), "'assistant_model'.*second argument"),
    (dict(logits_processor=[object()]), "'logits_processor'"),
])
def test_generate_arguments_are_honoured_or_refused(llama, kwargs, fragment):
    generator, _, inputs = llama
    with pytest.raises((ValueError, TypeError), match=fragment):
        generator.generate(**inputs, **kwargs)


def test_do_sample_must_be_a_bool(llama):
    generator, _, inputs = llama
    with pytest.raises(TypeError, match="do_sample must be True or False"):
        generator.generate(**inputs, do_sample="yes", max_new_tokens=3)


def test_no_op_generate_arguments_are_accepted(llama):
    generator, target, inputs = llama
    out = generator.generate(**inputs, max_new_tokens=6, num_beams=1, use_cache=True, repetition_penalty=1.0,
                             pad_token_id=0, min_new_tokens=0)
    assert torch.equal(out.sequences, _reference(target, inputs, max_new_tokens=6))


# ------------------------------------------------------------------------------------------------ image inputs
@pytest.fixture(scope="module")
def llava():
    target, inputs = tiny_llava()
    return SpeculativeGenerator(target, correlated_draft(target), "chain"), inputs


def test_image_tokens_without_pixel_values(llava):
    generator, inputs = llava
    with pytest.raises(ValueError, match="16 image placeholder tokens .* but no pixel_values were given"):
        generator.generate(input_ids=inputs["input_ids"], max_new_tokens=3)


def test_pixel_values_without_image_tokens(llava):
    generator, inputs = llava
    text_only = inputs["input_ids"][:, :4]
    with pytest.raises(ValueError, match="pixel_values were given but input_ids hold no image placeholder"):
        generator.generate(input_ids=text_only, pixel_values=inputs["pixel_values"], max_new_tokens=3)


@pytest.mark.parametrize("shape, fragment", [
    ((1, 3, 32, 32), r"pixel_values has shape \(1, 3, 32, 32\).*expects \[num_images, 3, 16, 16\]"),
    ((3, 16, 16), r"pixel_values has shape \(3, 16, 16\)"),
    ((2, 3, 16, 16), "16 image placeholder tokens .* 2 image\\(s\\) of 16 tokens each"),
])
def test_llava_pixel_values_of_the_wrong_shape(llava, shape, fragment):
    generator, inputs = llava
    with pytest.raises(ValueError, match=fragment):
        generator.generate(**{**inputs, "pixel_values": torch.randn(shape)}, max_new_tokens=3)


def test_integer_pixel_values(llava):
    generator, inputs = llava
    with pytest.raises(TypeError, match="pixel_values must be a floating-point tensor"):
        generator.generate(**{**inputs, "pixel_values": torch.ones(1, 3, 16, 16, dtype=torch.long)},
                           max_new_tokens=3)


def test_qwen2_vl_pixel_values_and_grid_mismatch():
    target, inputs = tiny_qwen2_vl(small=True)
    generator = SpeculativeGenerator(target, correlated_draft(target), "chain")
    with pytest.raises(ValueError, match=r"pixel_values has shape .* with image_grid_thw \[\[1, 12, 16\]\]"):
        generator.generate(**{**inputs, "pixel_values": inputs["pixel_values"][:-4]}, max_new_tokens=3)
    with pytest.raises(ValueError, match="without image_grid_thw"):
        generator.generate(**{k: v for k, v in inputs.items() if k != "image_grid_thw"}, max_new_tokens=3)
    with pytest.raises(ValueError, match="image_grid_thw .* gives 12"):
        generator.generate(**{**inputs, "pixel_values": inputs["pixel_values"][:48],
                              "image_grid_thw": torch.tensor([[1, 4, 12]])}, max_new_tokens=3)


@pytest.mark.parametrize("builder, kind", [(tiny_qwen3_vl, "image"), (tiny_qwen3_vl_video, "video"),
                                           (tiny_glm4v, "image"), (tiny_glm4v_video, "video"),
                                           (tiny_llava_onevision1_5_video, "image"),
                                           (tiny_llava_onevision1_5_video, "video")])
def test_qwen_vl_media_are_checked_for_images_and_videos(builder, kind):
    """Every Qwen-VL family's images and videos, GLM-4V's (a video's placeholders are image placeholders of token
    type 2) and LLaVA-OneVision-1.5's (no temporal patching), get the same checks (grid given, patch rows, placeholders) before transformers sees them."""
    target, inputs = builder(small=True)
    pixels, grid = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
    generator = SpeculativeGenerator(target, None, "ar")
    with pytest.raises(ValueError, match=f"{pixels} were given without {grid}"):
        generator.generate(**{k: v for k, v in inputs.items() if k != grid}, max_new_tokens=3)
    with pytest.raises(ValueError, match=f"{pixels} has shape .* with {grid}"):
        generator.generate(**{**inputs, pixels: inputs[pixels][:-4]}, max_new_tokens=3)
    t, h, w = inputs[grid][0].tolist()
    with pytest.raises(ValueError, match=f"{grid} .* gives {t * h * w // 2 // 4}"):
        generator.generate(**{**inputs, pixels: inputs[pixels][: t * h * w // 2], grid: torch.tensor([[t, h // 2, w]])},
                           max_new_tokens=3)


@pytest.mark.parametrize("change, fragment", [
    (lambda inputs: {"mm_token_type_ids": inputs["mm_token_type_ids"][:, :-1]},
     r"mm_token_type_ids must be an integer tensor shaped like input_ids \(1, \d+\) .* got \(1, \d+\)"),
    (lambda inputs: {"mm_token_type_ids": inputs["mm_token_type_ids"].tolist()}, "got list"),
    (lambda inputs: {"mm_token_type_ids": inputs["mm_token_type_ids"].float()}, "of torch.float32"),
    (lambda inputs: {"mm_token_type_ids": inputs["mm_token_type_ids"] * 3}, r"holds \[3\]: its values are 0"),
    (lambda inputs: {"image_grid_thw": inputs["image_grid_thw"].float()}, r"expects an integer tensor \[num_images, 3\]"),
])
@pytest.mark.parametrize("builder", [tiny_qwen2_vl, tiny_glm4v])
def test_token_types_and_grids_are_checked(builder, change, fragment):
    """mm_token_type_ids (an integer tensor like input_ids, of 0, 1 and 2) and the grids (integers) before transformers
    sees them (it raised IndexError, TypeError, KeyError or NotImplementedError)."""
    target, inputs = builder(small=True)
    with pytest.raises(ValueError, match=fragment):
        SpeculativeGenerator(target, None, "ar").generate(**{**inputs, **change(inputs)}, max_new_tokens=3)


def test_llava_next_video_media_are_checked():
    """LLaVA-NeXT-Video's videos ([videos, frames, C, size, size], as many placeholders as their pooled frames) and
    its images (with image_sizes) before transformers sees them."""
    target, inputs = tiny_llava_next_video(small=True)
    generator = SpeculativeGenerator(target, None, "ar")
    videos = inputs["pixel_values_videos"]
    for change, fragment in [
        ({"pixel_values_videos": videos[0]}, r"expects a float tensor \[num_videos, frames, 3, 16, 16\]"),
        ({"pixel_values_videos": videos[:, :, :1]}, r"has shape \(1, 3, 1, 16, 16\)"),
        ({"pixel_values_videos": torch.cat([videos, videos[:, :1]], 1)},
         r"hold 12 video placeholder tokens but pixel_values_videos hold 1 video\(s\) of 4 frames, 4 tokens each"),
        ({"pixel_values_videos": list(videos)}, "pixel_values_videos must be a tensor"),
        ({"image_sizes": None}, "pixel_values were given without image_sizes"),
    ]:
        with pytest.raises((ValueError, TypeError), match=fragment):
            generator.generate(**{key: value for key, value in {**inputs, **change}.items() if value is not None},
                               max_new_tokens=3)


@pytest.mark.parametrize("builder, change, fragment", [
    (tiny_gemma3, lambda inputs: {"pixel_values": inputs["pixel_values"][None]},
     r"pixel_values has shape \(1, 2, 3, 32, 32\); Gemma3ForConditionalGeneration expects \[num_images, 3, 32, 32\]"),
    (tiny_gemma3, lambda inputs: {"pixel_values": torch.randn(2, 3, 48, 48)}, "expects \\[num_images, 3, 32, 32\\]"),
    (tiny_gemma3, lambda inputs: {"pixel_values": inputs["pixel_values"][:1]},
     "hold 32 image placeholder tokens .* 1 image\\(s\\) of 16 tokens each"),
    (tiny_paligemma, lambda inputs: {"pixel_values": torch.cat([inputs["pixel_values"]] * 2)},
     "hold 16 image placeholder tokens .* 2 image\\(s\\) of 16 tokens each"),
    (tiny_internvl, lambda inputs: {"pixel_values": inputs["pixel_values"][:3]},
     "hold 64 image placeholder tokens .* 3 image\\(s\\) of 16 tokens each"),
    (tiny_internvl, lambda inputs: {"pixel_values": torch.randn(4, 3, 28, 28)}, "expects \\[num_images, 3, 32, 32\\]"),
    (tiny_idefics3, lambda inputs: {"pixel_values": inputs["pixel_values"][0]},
     "Idefics3ForConditionalGeneration expects \\[batch, images, 3, height, width\\]"),
    (tiny_idefics3, lambda inputs: {"pixel_attention_mask": inputs["pixel_attention_mask"][..., :16, :16]},
     "pixel_attention_mask has shape .* expects \\[batch, images, height, width\\]"),
])
def test_fixed_size_images_are_checked(builder, change, fragment):
    """Gemma 3, PaliGemma, InternVL and Idefics3/SmolVLM images (tiles) at the vision config's size, in the processor's layout, and as
    many as the placeholders fill: a clear error before transformers sees them."""
    target, inputs = builder()
    with pytest.raises(ValueError, match=fragment):
        SpeculativeGenerator(target, None, "ar").generate(**{**inputs, **change(inputs)}, max_new_tokens=3)


def test_sampling_settings_default_to_the_generation_config_like_generate(llama):
    """do_sample and temperature left out come from the target's generation config (then greedy at 1.0), as in
    generate; top_k and top_p did already. The warpers are HF's, with Python numbers (NumPy scalars converted)."""
    generator, target, inputs = llama
    config = target.generation_config
    config.do_sample, config.temperature, config.top_k = True, 0.3, 5
    try:
        seeded = {"generator": torch.Generator().manual_seed(4), "max_new_tokens": 8}
        from_config = generator.generate(**inputs, **seeded)
        assert [type(w).__name__ for w in generator._active_warpers] == ["TemperatureLogitsWarper", "TopKLogitsWarper"]
        assert generator._active_warpers[0].temperature == 0.3
        explicit = generator.generate(**inputs, do_sample=True, temperature=0.3, **{**seeded, "generator":
                                                                                     torch.Generator().manual_seed(4)})
        assert torch.equal(from_config.sequences, explicit.sequences)
        generator.generate(**inputs, do_sample=True, temperature=np.float32(0.5), top_k=np.int64(3), top_p=0.0,
                           **seeded)
        assert generator._active_warpers[0].temperature == 0.5 and generator._active_warpers[1].top_k == 3
    finally:
        config.do_sample, config.temperature, config.top_k = False, 1.0, 50
    assert torch.equal(generator.generate(**inputs, max_new_tokens=8).sequences,
                       _reference(target, inputs, max_new_tokens=8))


@pytest.mark.parametrize("value", [5, np.random.default_rng(0)])
def test_a_generator_that_is_not_a_torch_generator(llama, value):
    generator, _, inputs = llama
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        generator.generate(**inputs, do_sample=True, generator=value, max_new_tokens=3)


def test_a_prompt_token_only_the_target_has():
    """A target whose vocabulary has rows the draft lacks (padding, allowed by max_vocab_padding): a prompt holding
    such an id (a sampled one fed back) reaches the draft clamped, as the tree's tokens do; the output is the
    target's."""
    target, _ = tiny_llama(seed=0, vocab_size=96)
    draft, _ = tiny_llama(seed=1, vocab_size=64)
    for model in (target, draft):  # the special tokens inside both vocabularies, as the pair check asks
        model.generation_config.eos_token_id = model.config.eos_token_id = 60
    ids = torch.tensor([[3, 5, 90, 7]])
    out = SpeculativeGenerator(target, draft, "sage").generate(input_ids=ids, max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(out.sequences, _reference(target, {"input_ids": ids}, max_new_tokens=6, eos_token_id=-1))
