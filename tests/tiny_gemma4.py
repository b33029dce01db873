"""Tiny Gemma 4 (``Gemma4ForConditionalGeneration``) builders: images and a video through the real image processor.

The decoder has sliding and full layers, the full ones with a wider head (``per_layer_config``), per-layer input
embeddings, a window longer than every test sequence and (``small=False``) KV sharing: its last two layers read the
keys and values of the last earlier layer of their kind (``num_kv_shared_layers``); the vision tower pools 3x3 patches of 4 px into one soft
token, its patch embedding drawn large (std 0.5) so that the output follows the pixels. Images of different sizes give different soft-token counts (``Gemma4ImageProcessorPil`` with
``max_soft_tokens=70``); the prompt writes each image as ``<boi>`` + its soft tokens + ``<eoi>``, and a video as
the Gemma 4 processor does: per frame, a timestamp, ``<boi>`` + the frame's soft tokens + ``<eoi>`` (frames made
by the image processor: the video processor needs torchvision). ``mm_token_type_ids``: 1 on image, 2 on video,
3 on audio soft tokens. ``tiny_gemma4_audio``: an audio clip instead (an audio tower, eager attention). Same conventions as
tests/tiny_vlms.py otherwise.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Gemma4AudioConfig,
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
)

from tiny_vlms import EOS_TOKEN_ID, IMAGE_TOKEN_ID, TEXT_VOCAB, VIDEO_TOKEN_ID, finish, strengthen

BOI_TOKEN_ID = 252
EOI_TOKEN_ID = 253
AUDIO_TOKEN_ID = 247
BOA_TOKEN_ID = 248
EOA_TOKEN_ID = 249
PATCH = 4
POOLING = 3


def _config(small: bool) -> Gemma4Config:
    layers = 2 if small else 4
    layer_types = ["sliding_attention", "full_attention"] * (layers // 2)
    wide = {f"{i:02d}": {"head_dim": 32} for i, kind in enumerate(layer_types) if kind == "full_attention"}
    text = dict(vocab_size=256, hidden_size=32 if small else 64, intermediate_size=64 if small else 128,
                num_hidden_layers=layers, num_attention_heads=2 if small else 4, num_key_value_heads=1 if small else 2,
                head_dim=16, max_position_embeddings=2048, sliding_window=1024, layer_types=layer_types,
                per_layer_config=wide, vocab_size_per_layer_input=256, hidden_size_per_layer_input=16,
                initializer_range=0.12, eos_token_id=EOS_TOKEN_ID, bos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False, num_kv_shared_layers=0 if small else 2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=16, patch_size=PATCH, pooling_kernel_size=POOLING, position_embedding_size=256)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, boi_token_id=BOI_TOKEN_ID,
                        eoi_token_id=EOI_TOKEN_ID, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                        audio_token_id=AUDIO_TOKEN_ID, boa_token_id=BOA_TOKEN_ID, eoa_token_index=EOA_TOKEN_ID,
                        tie_word_embeddings=False)


def _model(seed: int, small: bool, audio: bool = False) -> torch.nn.Module:
    """The tiny model; with ``audio``, an audio tower too (eager attention: transformers' Gemma 4 audio tower has no
    sdpa)."""
    config = _config(small)
    if audio:
        config.audio_config = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                subsampling_conv_channels=[128, 8], attention_chunk_size=4,
                                                attention_context_left=5, output_proj_dims=32)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration._from_config(config, attn_implementation="eager" if audio else "sdpa")
    with torch.no_grad():  # patch embeddings large enough that the pooled soft tokens follow the pixels
        projection = model.model.vision_tower.patch_embedder.input_proj.weight
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return strengthen(finish(model, seed=1234 + seed), seed=4321 + seed)


def processed_frames(sizes: list[tuple[int, int]], seed: int) -> dict:
    """Random images of ``sizes`` (h, w) through Gemma 4's image processor: ``pixel_values``,
    ``image_position_ids`` (padding patches -1) and ``num_soft_tokens_per_image``."""
    processor = Gemma4ImageProcessorPil(patch_size=PATCH, max_soft_tokens=70, pooling_kernel_size=POOLING)
    state = np.random.RandomState(seed)
    images = [state.randint(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return processor(images, return_tensors="pt")


def _text(length: int, generator: torch.Generator) -> list[int]:
    return torch.randint(3, TEXT_VOCAB, (length,), generator=generator).tolist()


def _inputs(ids: list[int], **media) -> dict:
    input_ids = torch.tensor([ids])
    mm_token_type_ids = ((input_ids == IMAGE_TOKEN_ID).long() + 2 * (input_ids == VIDEO_TOKEN_ID).long()
                         + 3 * (input_ids == AUDIO_TOKEN_ID).long())
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=mm_token_type_ids,
                **media)


def tiny_gemma4(seed: int = 0, small: bool = False, question_len: int = 12,
                sizes: tuple[tuple[int, int], ...] = ((40, 60), (90, 30))):
    """Gemma 4 with one image per entry of ``sizes`` (h, w px; the default two give 32 and 24 soft tokens)."""
    model = _model(seed, small)
    generator = torch.Generator().manual_seed(seed)
    processed = processed_frames(list(sizes), seed)
    ids = _text(4, generator)
    for count in processed["num_soft_tokens_per_image"].tolist():
        ids += [BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * count + [EOI_TOKEN_ID] + _text(1, generator)
    ids += _text(question_len, generator)
    return model, _inputs(ids, pixel_values=processed["pixel_values"],
                          image_position_ids=processed["image_position_ids"])


def tiny_gemma4_video(seed: int = 0, small: bool = False, question_len: int = 12, frames: int = 3,
                      frame_size: tuple[int, int] = (48, 36), image: bool = True):
    """Gemma 4 with a ``frames``-frame video (each frame a timestamp, ``<boi>``, its soft tokens, ``<eoi>``), after an
    image when ``image``."""
    model = _model(seed, small)
    generator = torch.Generator().manual_seed(seed)
    video = processed_frames([frame_size] * frames, seed + 1)
    media = {"pixel_values_videos": video["pixel_values"], "video_position_ids": video["image_position_ids"],
             "num_frames_per_video": torch.tensor([frames])}
    ids = _text(4, generator)
    if image:
        picture = processed_frames([(30, 50)], seed)
        ids += [BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * int(picture["num_soft_tokens_per_image"][0]) + [EOI_TOKEN_ID]
        media.update(pixel_values=picture["pixel_values"], image_position_ids=picture["image_position_ids"])
    for frame, count in enumerate(video["num_soft_tokens_per_image"].tolist()):
        ids += _text(2, generator) + [BOI_TOKEN_ID] + [VIDEO_TOKEN_ID] * count + [EOI_TOKEN_ID]
    ids += _text(question_len, generator)
    return model, _inputs(ids, **media)


def tiny_gemma4_audio(seed: int = 0, small: bool = False, question_len: int = 12, seconds: float = 0.5):
    """Gemma 4 with an audio tower and a prompt holding one clip of ``seconds`` (random 16 kHz samples through
    ``Gemma4AudioFeatureExtractor``), written as the processor does: ``<boa>`` + one placeholder per soft token
    (the mask after the tower's two stride-2 convolutions) + ``<eoa>``, ``mm_token_type_ids`` 3 on them."""
    model = _model(seed, small, audio=True)
    wave = np.random.RandomState(seed).randn(int(16_000 * seconds)).astype(np.float32) * 0.1
    features = Gemma4AudioFeatureExtractor()([wave], return_tensors="pt")
    mask = features["input_features_mask"][0]
    for _ in range(2):  # Gemma4Processor.replace_audio_token's count
        mask = mask[::2][: (len(mask) - 1) // 2 + 1]
    generator = torch.Generator().manual_seed(seed)
    ids = (_text(4, generator) + [BOA_TOKEN_ID] + [AUDIO_TOKEN_ID] * int(mask.sum()) + [EOA_TOKEN_ID]
           + _text(question_len, generator))
    return model, _inputs(ids, input_features=features["input_features"],
                          input_features_mask=features["input_features_mask"])
