"""Tiny random-weight LLaVA-OneVision-1.5 models (``llava_onevision1_5``: a RICE vision tower of 2-D rotary
patches, no temporal patching, a Qwen3 decoder with 1-D positions) with prompts laid out as its processor writes
them: ``<vision_start>`` + t*h*w / 4 placeholders + ``<vision_end>`` per image (``image_grid_thw``) or video
(``video_grid_thw``, ``pixel_values_videos``). Same conventions as tests/tiny_vlms.py.
"""
from __future__ import annotations

import torch
from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

from tiny_glm4v import INIT_RANGE
from tiny_vlms import IMAGE_TOKEN_ID, TEXT_VOCAB, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, finish, text_config_kwargs


def _model(seed: int, small: bool):
    text = {**text_config_kwargs(small, initializer_range=INIT_RANGE), "model_type": "qwen3", "head_dim": 16}
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, spatial_merge_size=2,
                  in_channels=3, out_hidden_size=text["hidden_size"])
    config = LlavaOnevision15Config(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                                    video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                                    vision_end_token_id=VISION_END_ID, tie_word_embeddings=False,
                                    initializer_range=INIT_RANGE)
    torch.manual_seed(seed)
    return finish(LlavaOnevision15ForConditionalGeneration(config))


def onevision15_inputs(model, seed: int = 0, image_grid=(1, 12, 16), video_grid=None, question_len: int = 12) -> dict:
    """A prompt with an image of ``image_grid`` (t, h, w) patches and, when given, a video of ``video_grid``."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size ** 2
    patch_dim = vision.in_channels * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, TEXT_VOCAB, (4,), generator=generator).tolist()
    inputs = {}
    for grid, token, pixel_key, grid_key in ((image_grid, IMAGE_TOKEN_ID, "pixel_values", "image_grid_thw"),
                                             (video_grid, VIDEO_TOKEN_ID, "pixel_values_videos", "video_grid_thw")):
        if grid is None:
            continue
        t, h, w = grid
        ids += [VISION_START_ID] + [token] * (t * h * w // merge) + [VISION_END_ID]
        inputs[pixel_key] = torch.randn(t * h * w, patch_dim, generator=pixels)
        inputs[grid_key] = torch.tensor([list(grid)])
    ids += torch.randint(1, TEXT_VOCAB, (question_len,), generator=generator).tolist()
    input_ids = torch.tensor([ids])
    return {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def tiny_llava_onevision1_5(seed: int = 0, small: bool = False, question_len: int = 12):
    """An image of 12x16 patches (48 placeholders), ~66-token prompt."""
    model = _model(seed, small)
    return model, onevision15_inputs(model, seed, question_len=question_len)


def tiny_llava_onevision1_5_video(seed: int = 0, small: bool = False, video_grid=(4, 4, 6), image_grid=(1, 8, 8)):
    """An image (when ``image_grid`` is given) and a video of ``video_grid`` patches."""
    model = _model(seed, small)
    return model, onevision15_inputs(model, seed, image_grid=image_grid, video_grid=video_grid, question_len=6)
