"""Video inputs: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, LLaVA-OneVision and -1.5, Gemma 4 prompts with a video (and a video beside an
image) give exactly ``target.generate``'s greedy output for every policy, and both KV caches equal a recomputation
after every step.

Qwen's M-RoPE places a video's tokens on a temporal axis (Qwen2-VL: one position per temporal patch; Qwen2.5-VL:
``tokens_per_second * second_per_grid_ts`` positions per temporal patch) and two spatial axes; the text after it
resumes from the image's start plus its spatial advance. When the temporal span exceeds the spatial advance by more
than the text after the video, the prompt's last position is below its largest one, and ``generate`` continues from the last position, not from
``sequence index + rope_deltas``: the case that was wrong. Both directions are tested, checked against the
position rows the model itself computes.

Qwen3-VL writes every frame as ``<t seconds> <vision_start> frame <vision_end>`` and gives each frame one temporal
position, starting where the text before it ends; the text after a frame resumes past the frame's spatial advance.
So its prompt's last position is always its largest, even for many frames of a small grid (the shape that puts
Qwen2-VL's last position below its largest): that layout cannot produce the other direction, and its cases say so.
"""
from __future__ import annotations

import pytest
import torch
from test_engine import POLICIES
from test_engine_kv import MAX_NEW, run_with_cache_checks
from tiny_models import correlated_draft, one_thread  # noqa: F401  (one_thread: autouse fixture)
from tiny_vlms import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    _prompt,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
from tiny_glm4v import tiny_glm4v_video
from tiny_gemma4 import tiny_gemma4_video
from tiny_llava_onevision1_5 import tiny_llava_onevision1_5_video
from tiny_vlms_more import tiny_qwen3_vl_video
from transformers import DynamicCache

from sage_ext.families import get_adapter

# initializer_range 0.12 (HF's default 0.02 makes the decoder nearly position-blind: wrong positions go unseen)
INIT_RANGE = 0.12


def _qwen_block(token: int, grid_thw, merge: int) -> list[int]:
    t, h, w = grid_thw
    return [VISION_START_ID] + [token] * (t * h * w // merge**2) + [VISION_END_ID]


def _patches(model, grid_thw, generator) -> torch.Tensor:
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    t, h, w = grid_thw
    return torch.randn(t * h * w, patch_dim, generator=generator)


def qwen_video(builder, video_grid, seconds: float | None = None, image_grid=None, seed: int = 0):
    """A Qwen2-VL / Qwen2.5-VL target and a prompt holding a video (``video_grid`` = (t, h, w) patches; Qwen2.5-VL:
    ``seconds`` per temporal patch), after an image when ``image_grid`` is given; processor layout."""
    model, _ = builder(seed=seed)
    for name, parameter in model.model.language_model.named_parameters():
        if parameter.dim() == 2 and "embed" not in name:  # decoder weights large enough to see positions
            with torch.no_grad():
                parameter.normal_(0.0, INIT_RANGE, generator=torch.Generator().manual_seed(seed + 7))
    merge = model.config.vision_config.spatial_merge_size
    generator = torch.Generator().manual_seed(seed + 1)
    media = _qwen_block(VIDEO_TOKEN_ID, video_grid, merge)
    inputs = {}
    if image_grid is not None:
        media = _qwen_block(IMAGE_TOKEN_ID, image_grid, merge) + [7, 8, 9] + media
        inputs["pixel_values"] = _patches(model, image_grid, generator)
        inputs["image_grid_thw"] = torch.tensor([list(image_grid)])
    input_ids = _prompt(4, media, 6, seed)
    inputs.update(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values_videos=_patches(model, video_grid, generator),
        video_grid_thw=torch.tensor([list(video_grid)]),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).long() + 2 * (input_ids == VIDEO_TOKEN_ID).long(),
    )
    if seconds is not None:
        inputs["second_per_grid_ts"] = torch.tensor([seconds])
    return model, inputs


def llava_onevision_video(frames: int = 4, seed: int = 0):
    """LLaVA-OneVision with a ``frames``-frame video (pooled frame features + one newline embedding)."""
    model, _ = tiny_llava_onevision(seed=seed)
    pixel_values_videos = torch.randn(1, frames, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():  # the processor computes this count; asking the model is exact
        n_video_tokens = model.model.get_video_features(pixel_values_videos).pooler_output.shape[1]
    input_ids = _prompt(4, [VIDEO_TOKEN_ID] * n_video_tokens, 6, seed)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values_videos": pixel_values_videos}


# name -> (builder, whether the prompt's last position is below its largest: the video's temporal span exceeds
# its spatial advance)
CASES = {
    # Qwen2-VL: 16 temporal patches (16 positions) over a 2x2 merged grid (advance 2): the span exceeds the
    # advance by more than the 7 text tokens after the video
    "qwen2_vl-long-video": (lambda: qwen_video(tiny_qwen2_vl, (16, 4, 4)), True),
    # 2 temporal patches over a 4x4 merged grid: span short of the advance
    "qwen2_vl-short-video": (lambda: qwen_video(tiny_qwen2_vl, (2, 8, 8)), False),
    # Qwen2.5-VL: 3 s per temporal patch x 4 tokens/s = 12 positions per patch, far beyond a 2x2 grid
    "qwen2_5_vl-long-video": (lambda: qwen_video(tiny_qwen2_5_vl, (2, 4, 4), seconds=3.0), True),
    "qwen2_5_vl-short-video": (lambda: qwen_video(tiny_qwen2_5_vl, (2, 8, 8), seconds=0.25), False),
    "qwen2_5_vl-image-and-video": (lambda: qwen_video(tiny_qwen2_5_vl, (4, 4, 4), seconds=2.0,
                                                      image_grid=(1, 8, 12)), True),
    "llava_onevision-video": (llava_onevision_video, False),
    # Qwen3-VL (processor layout, per-frame timestamps): 8 frames of a 2x2 merged grid, and an image + a video of
    # 4 frames of 2x3; neither can put the last position below the largest (see the module docstring)
    "qwen3_vl-many-frames": (lambda: tiny_qwen3_vl_video(video_grid=(8, 4, 4)), False),
    "qwen3_vl-image-and-video": (lambda: tiny_qwen3_vl_video(video_grid=(4, 4, 6), image_grid=(1, 8, 12)), False),
    # GLM-4V: Qwen3-VL's per-frame layout (each frame at one temporal position, timestamps between), the frames
    # written with the image placeholder (mm_token_type_ids 2)
    "glm4v-video": (lambda: tiny_glm4v_video(video_grid=(4, 4, 6)), False),
    "glm4v-many-frames": (lambda: tiny_glm4v_video(video_grid=(8, 4, 4)), False),
    # LLaVA-OneVision-1.5: 1-D positions over the expanded sequence, an image beside the video
    "llava_onevision1_5-image-and-video": (lambda: tiny_llava_onevision1_5_video(), False),
    # Gemma 4: 1-D positions, each frame a timestamp then <boi> + its soft tokens + <eoi>, an image before the video
    "gemma4-image-and-video": (lambda: tiny_gemma4_video(), False),
}


@pytest.fixture(scope="module", params=list(CASES))
def video_case(request):
    build, last_below_max = CASES[request.param]
    target, inputs = build()
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    return request.param, target, inputs, last_below_max, reference


def test_the_case_is_what_it_claims(video_case):
    """The prompt's positions (as the model computes them for generate) have their last column below the largest
    exactly in the 'long' cases; the adapter's offset continues each row from the last column."""
    name, target, inputs, last_below_max, _ = video_case
    adapter = get_adapter(target)
    positions, _ = adapter.prefill_position_ids(adapter.prefill_inputs(inputs))
    adapter.prefill(inputs, DynamicCache())
    assert bool((positions[..., -1] < positions.amax(dim=-1)).any()) == last_below_max, name
    length = inputs["input_ids"].shape[1]
    after = adapter.rope_position_ids(torch.tensor([[length, length + 1]]))
    torch.testing.assert_close(after, positions[..., -1:] + torch.tensor([1, 2]))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_equals_generate_and_caches_match_recomputation(video_case, policy):
    name, target, inputs, _, reference = video_case
    out, taus = run_with_cache_checks(target, correlated_draft(target, noise=0.1), inputs, POLICIES[policy]())
    assert torch.equal(out.sequences, reference), name
    if policy != "ar":
        assert max(taus) > 0, "the correlated draft should get tokens accepted"


@pytest.mark.parametrize("policy", ["static", "sage"])
def test_pruned_draft_with_video_is_lossless(policy):
    target, inputs = qwen_video(tiny_qwen2_5_vl, (4, 4, 4), seconds=2.0, image_grid=(1, 8, 12))
    out, _ = run_with_cache_checks(target, correlated_draft(target, noise=0.1), inputs, POLICIES[policy](),
                                   draft_prune_ratio=0.75)
    with torch.no_grad():
        assert torch.equal(out.sequences, target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW))


@pytest.mark.parametrize("policy", ["static", "sage"])
def test_pruned_draft_with_qwen3_vl_video_is_lossless(policy):
    """Qwen3-VL: the kept video and image rows carry their DeepStack features into the draft's kept-rows forward."""
    target, inputs = tiny_qwen3_vl_video(video_grid=(4, 4, 6), image_grid=(1, 8, 12))
    out, _ = run_with_cache_checks(target, correlated_draft(target, noise=0.1), inputs, POLICIES[policy](),
                                   draft_prune_ratio=0.75)
    with torch.no_grad():
        assert torch.equal(out.sequences, target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW))
