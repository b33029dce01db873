"""Tiny random-weight GLM-4V models (GLM-4.1V: ``glm4v``; GLM-4.5V, MoE decoder: ``glm4v_moe``; GLM-4.6V:
``glm46v``) with prompts laid out as ``Glm4vProcessor`` writes them.

Same conventions as tests/tiny_vlms.py. An image is ``<|begin_of_image|>`` + its placeholders + ``<|end_of_image|>``;
a video is ``<|begin_of_video|>``, then per frame (temporal patch) ``<|begin_of_image|>`` + the frame's
placeholders + ``<|end_of_image|>`` + its timestamp (text), then ``<|end_of_video|>``: the frames use the IMAGE
placeholder, and ``mm_token_type_ids`` is 1 on an image's and 2 on a video's. ``video_grid_thw`` keeps one row per
video (the model splits it per frame). The decoder applies M-RoPE to half of each head (``partial_rotary_factor``).
"""
from __future__ import annotations

import torch
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm46VConfig,
    Glm46VForConditionalGeneration,
)

from tiny_vlms import (
    IMAGE_TOKEN_ID,
    TEXT_VOCAB,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    finish,
    text_config_kwargs,
)

VIDEO_START_ID, VIDEO_END_ID = 248, 249
HEAD_DIM = 16
# decoder and vision weights drawn with std 0.12 (HF's 0.02 leaves the output nearly blind to pixels and positions:
# tests/test_families_more.py::test_every_tiny_vlm_reads_its_pixels)
INIT_RANGE = 0.12


def _config(kind: str, small: bool):
    text = text_config_kwargs(small, initializer_range=INIT_RANGE,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]})
    text["hidden_size"] = HEAD_DIM * text["num_attention_heads"]
    text["intermediate_size"] = 2 * text["hidden_size"]
    if kind == "glm4v_moe":
        text.update(moe_intermediate_size=text["hidden_size"], n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    if kind == "glm46v":
        text["model_type"] = "glm4v_text"
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, in_channels=3, out_hidden_size=text["hidden_size"], image_size=32)
    config_class = {"glm4v": Glm4vConfig, "glm4v_moe": Glm4vMoeConfig, "glm46v": Glm46VConfig}[kind]
    return config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID, initializer_range=INIT_RANGE,
                        video_token_id=VIDEO_TOKEN_ID, image_start_token_id=VISION_START_ID,
                        image_end_token_id=VISION_END_ID, video_start_token_id=VIDEO_START_ID,
                        video_end_token_id=VIDEO_END_ID, tie_word_embeddings=False)


def _model(kind: str, seed: int, small: bool):
    model_class = {"glm4v": Glm4vForConditionalGeneration, "glm4v_moe": Glm4vMoeForConditionalGeneration,
                   "glm46v": Glm46VForConditionalGeneration}[kind]
    torch.manual_seed(seed)
    return finish(model_class(_config(kind, small)))


def _patches(model, grid_thw, generator: torch.Generator) -> torch.Tensor:
    vision = model.config.vision_config
    t, h, w = grid_thw
    return torch.randn(t * h * w, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,
                       generator=generator)


def glm4v_inputs(model, seed: int = 0, image_grid=(1, 12, 16), video_grid=None, question_len: int = 12) -> dict:
    """A prompt with an image of ``image_grid`` (t, h, w) patches and, when given, a video of ``video_grid``."""
    merge = model.config.vision_config.spatial_merge_size ** 2
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, TEXT_VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    ids, types = text(4), [0] * 4
    pixels = torch.Generator().manual_seed(seed + 1)
    inputs = {}
    if image_grid is not None:
        t, h, w = image_grid
        block = [VISION_START_ID] + [IMAGE_TOKEN_ID] * (t * h * w // merge) + [VISION_END_ID]
        ids += block
        types += [1 if token == IMAGE_TOKEN_ID else 0 for token in block]
        inputs.update(pixel_values=_patches(model, image_grid, pixels), image_grid_thw=torch.tensor([list(image_grid)]))
    if video_grid is not None:
        frames, h, w = video_grid
        ids += text(2) + [VIDEO_START_ID]
        types += [0, 0, 0]
        for _ in range(frames):
            frame = [VISION_START_ID] + [IMAGE_TOKEN_ID] * (h * w // merge) + [VISION_END_ID] + text(2)
            ids += frame
            types += [2 if token == IMAGE_TOKEN_ID else 0 for token in frame]
        ids += [VIDEO_END_ID]
        types += [0]
        inputs.update(pixel_values_videos=_patches(model, video_grid, pixels),
                      video_grid_thw=torch.tensor([list(video_grid)]))
    ids += text(question_len)
    types += [0] * question_len
    input_ids = torch.tensor([ids])
    inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  mm_token_type_ids=torch.tensor([types]))
    return inputs


def tiny_glm4v(seed: int = 0, small: bool = False, question_len: int = 12):
    """GLM-4.1V: an image of 12x16 patches (48 placeholders), ~66-token prompt."""
    model = _model("glm4v", seed, small)
    return model, glm4v_inputs(model, seed, question_len=question_len)


def tiny_glm4v_moe(seed: int = 0, small: bool = False, question_len: int = 12):
    """GLM-4.5V: the GLM-4.1V prompt, a sparse (MoE) decoder after one dense layer."""
    model = _model("glm4v_moe", seed, small)
    return model, glm4v_inputs(model, seed, question_len=question_len)


def tiny_glm46v(seed: int = 0, small: bool = False, question_len: int = 12):
    """GLM-4.6V (``Glm46VForConditionalGeneration``, a GLM-4V text decoder)."""
    model = _model("glm46v", seed, small)
    return model, glm4v_inputs(model, seed, question_len=question_len)


def tiny_glm4v_video(seed: int = 0, small: bool = False, video_grid=(4, 4, 6), image_grid=None):
    """GLM-4.1V with an image (when ``image_grid`` is given) and a video of ``video_grid``: 4 frames of 2x3 merged
    tokens by default, each written with the image placeholder."""
    model = _model("glm4v", seed, small)
    return model, glm4v_inputs(model, seed, image_grid=image_grid, video_grid=video_grid, question_len=6)
