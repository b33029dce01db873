"""``FamilyAdapter.split_batch``: a left-padded batch of processor outputs back into each row's own inputs.

For every family, two or three prompts from the tiny builders (different seeds, lengths, image grids / sizes; a row
with two prompts' images joined; a text-only row) are put into one batch exactly as the family's HF processor
lays it out (left padding with the pad token; images / videos concatenated in row order, or batch-first with
all-zero padding slots for Idefics3 / SmolVLM, anyres patches padded to the batch's largest count for
LLaVA-NeXT / -OneVision); the split must give back each row's inputs (same keys, equal tensors), and the model's
logits on every split row equal those on the row itself. Then: right padding, holes, empty rows, media counts that
do not add up and tensors that fit no row raise ValueError; a batch of one comes back as it is.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import one_thread, tiny_llama, tiny_llava, tiny_mistral, tiny_qwen2  # noqa: F401  (autouse)
from tiny_vlms import (
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    tiny_idefics3,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_smolvlm,
)
from tiny_vlms_more import (
    tiny_gemma2,
    tiny_gemma3,
    tiny_gemma3_text,
    tiny_gpt2,
    tiny_internvl,
    tiny_llava_next,
    tiny_llava_next_video,
    tiny_paligemma,
    tiny_phi3,
    tiny_qwen3_vl,
    tiny_qwen3_vl_moe,
    tiny_qwen3_vl_video,
)
from tiny_gemma4 import tiny_gemma4, tiny_gemma4_video
from tiny_glm4v import glm4v_inputs, tiny_glm4v, tiny_glm4v_moe, tiny_glm4v_video
from tiny_llava_onevision1_5 import onevision15_inputs, tiny_llava_onevision1_5
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from sage_ext.families import get_adapter

#: the per-token inputs (``[1, L]`` per row) that processors pad
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
IMAGE_TOKEN = 250  # tests/tiny_vlms.py's image placeholder
PAD = 3  # an ordinary token: the tiny configs declare no pad token (the processor pads with its tokenizer's)


def padded(value: torch.Tensor, dim: int, size: int, left: bool = False, fill=0) -> torch.Tensor:
    """``value`` padded along ``dim`` to ``size`` with ``fill`` (on the left when ``left``)."""
    shape = list(value.shape)
    shape[dim] = size - value.shape[dim]
    pad = torch.full(shape, fill, dtype=value.dtype)
    return torch.cat([pad, value] if left else [value, pad], dim)


def joined(*rows: dict, media_dim: int = 0) -> dict:
    """One prompt holding the rows' prompts one after another: per-token tensors joined along the sequence, media
    tensors along ``media_dim`` (0: concatenated items; 1: Idefics3's image slots), in order."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: torch.cat([row[key] for row in rows if key in row], 1 if key in TOKEN_KEYS else media_dim)
            for key in keys}


def text_row(length: int, seed: int, *zero_keys: str) -> dict:
    """A text-only prompt as the family's processor returns it (``zero_keys``: per-token ids all 0 without media)."""
    input_ids = torch.randint(4, 90, (1, length), generator=torch.Generator().manual_seed(seed))
    row = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return {**row, **{key: torch.zeros_like(input_ids) for key in zero_keys}}


def assemble(rows: list[dict], batch_first: tuple[str, ...] = (), patch_padded: tuple[str, ...] = ()) -> dict:
    """The batch the processor returns for these prompts: per-token tensors left-padded (``input_ids`` with the pad
    token, the rest with 0), media concatenated in row order; ``batch_first`` keys one entry per row, padded with
    all-zero slots (a row without images: all slots zero); ``patch_padded`` keys padded to the largest patch count;
    LLaVA-OneVision's ``batch_num_images`` one count per row."""
    length = max(row["input_ids"].shape[1] for row in rows)
    batch = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row.get(key) for row in rows]
        present = [value for value in values if value is not None]
        if key in TOKEN_KEYS:
            batch[key] = torch.cat([padded(value, 1, length, left=True, fill=PAD if key == "input_ids" else 0)
                                    for value in values])
        elif key in batch_first:
            slots = max(value.shape[1] for value in present)
            empty = present[0][:, :0]
            batch[key] = torch.cat([padded(empty if value is None else value, 1, slots) for value in values])
        elif key == "batch_num_images":  # LLaVA-OneVision: one count per row, 0 for a row without images
            batch[key] = torch.cat([torch.tensor([0]) if value is None else value for value in values])
        elif key in patch_padded:
            patches = max(value.shape[1] for value in present)
            batch[key] = torch.cat([padded(value, 1, patches) for value in present])
        else:
            batch[key] = torch.cat(present)
    return batch


# ------------------------------------------------------------------------------------------- family cases
def causal_case(builder):
    def case():
        model, first = builder(seed=0, prompt_len=12)
        return model, [first, builder(seed=1, prompt_len=5)[1], builder(seed=2, prompt_len=9)[1]], {}
    return case


def joined_case(builder, *zero_keys: str, media_dim: int = 0, batch_first: tuple[str, ...] = (), **kwargs):
    """Rows: the builder's prompt; two more of other seeds / lengths (and ``kwargs`` variants) joined into one
    prompt with both's images; a text-only prompt."""
    def case():
        model, first = builder(seed=0)
        second = builder(seed=1, question_len=5, **{key: value[0] for key, value in kwargs.items()})[1]
        third = builder(seed=2, question_len=3, **{key: value[1] for key, value in kwargs.items()})[1]
        rows = [first, joined(second, third, media_dim=media_dim), text_row(9, 3, *zero_keys)]
        return model, rows, {"batch_first": batch_first}
    return case


def llava_case():
    model, first = tiny_llava(seed=0)
    rows = [first, joined(tiny_llava(seed=1, prompt_len=5)[1], tiny_llava(seed=2, prompt_len=9)[1]), text_row(7, 3)]
    return model, rows, {}


def qwen_video_row(model, grid_thw, seed: int, seconds: float | None = None) -> dict:
    """A Qwen2-VL / Qwen2.5-VL prompt holding one video of ``grid_thw`` patches (processor layout)."""
    vision = model.config.vision_config
    t, h, w = grid_thw
    placeholders = [VISION_START_ID] + [VIDEO_TOKEN_ID] * (t * h * w // vision.spatial_merge_size**2)
    input_ids = torch.tensor([[5, 6] + placeholders + [VISION_END_ID, 7, 8, 9]])
    generator = torch.Generator().manual_seed(seed)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    row = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           "pixel_values_videos": torch.randn(t * h * w, patch_dim, generator=generator),
           "video_grid_thw": torch.tensor([list(grid_thw)]),
           "mm_token_type_ids": 2 * (input_ids == VIDEO_TOKEN_ID).long()}
    if seconds is not None:
        row["second_per_grid_ts"] = torch.tensor([seconds])
    return row


def qwen_video_case(builder, seconds: float | None):
    """Rows: an image; an image and a video (and one more image) in one prompt; a video; text only."""
    def case():
        model, first = builder(seed=0, grid_thw=(1, 8, 12))
        image = builder(seed=1, grid_thw=(1, 4, 8), question_len=4)[1]
        rows = [first, joined(image, qwen_video_row(model, (2, 4, 4), 5, seconds), builder(seed=2, question_len=3)[1]),
                qwen_video_row(model, (4, 4, 6), 6, seconds), text_row(9, 3, "mm_token_type_ids")]
        return model, rows, {}
    return case


def qwen3_video_case():
    model, first = tiny_qwen3_vl_video(seed=0)
    second = tiny_qwen3_vl_video(seed=1, video_grid=(2, 4, 4), image_grid=(1, 4, 8), question_len=3)[1]
    return model, [first, second, text_row(8, 3, "mm_token_type_ids")], {}


def glm4v_video_case():
    """GLM-4V (a video's frames written with the image placeholder, told apart by mm_token_type_ids 2): rows of a
    video, an image, two videos, text. (An image and a video in one prompt fail inside transformers' GLM-4V, which
    counts every image placeholder against the images' features.)"""
    model, first = tiny_glm4v_video(seed=0)
    image = glm4v_inputs(model, seed=1, image_grid=(1, 4, 8), question_len=4)
    videos = joined(glm4v_inputs(model, seed=2, image_grid=None, video_grid=(2, 4, 4), question_len=2),
                    glm4v_inputs(model, seed=3, image_grid=None, video_grid=(4, 4, 6), question_len=3))
    return model, [first, image, videos, text_row(9, 3, "mm_token_type_ids")], {}


def gemma4_video_case():
    """Gemma 4: rows of an image and a 3-frame video, a 2-frame video, two images, text (frames and images of the
    rows concatenated; ``num_frames_per_video`` one count per video)."""
    model, first = tiny_gemma4_video(seed=0)
    video = tiny_gemma4_video(seed=1, frames=2, frame_size=(30, 60), image=False, question_len=3)[1]
    images = tiny_gemma4(seed=2, sizes=((60, 60), (20, 40)), question_len=4)[1]
    return model, [first, video, images, text_row(9, 3, "mm_token_type_ids")], {}


def llava_next_video_case():
    """LLaVA-NeXT-Video: rows of an image and a video, a video of as many frames, text (a batch's videos share the
    frame count: pixel_values_videos is one tensor)."""
    model, first = tiny_llava_next_video(seed=0)
    video = tiny_llava_next_video(seed=1, image=False, question_len=3)[1]
    return model, [first, video, text_row(9, 3)], {}


def onevision15_video_case():
    """LLaVA-OneVision-1.5: rows of an image, an image and a video, a video, text."""
    model, first = tiny_llava_onevision1_5(seed=0)
    both = onevision15_inputs(model, seed=1, image_grid=(1, 4, 8), video_grid=(2, 4, 4), question_len=3)
    video = onevision15_inputs(model, seed=2, image_grid=None, video_grid=(4, 4, 6), question_len=2)
    return model, [first, both, video, text_row(9, 3)], {}


def anyres_row(model, sizes: list[list[int]], seed: int, batch_num_images: bool = False) -> dict:
    """A LLaVA-NeXT / -OneVision prompt with images of ``sizes`` (h, w) as the processor returns it alone: each
    image anyres-patched (OneVision with ``batch_num_images``: only an image alone in its prompt), pixel_values
    padded to the prompt's largest patch count, the placeholder counts asked of the model."""
    config = model.config
    patched = not batch_num_images or len(sizes) == 1
    counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
              if patched else 1 for size in sizes]
    crop = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.stack([padded(torch.randn(count, 3, crop, crop, generator=generator), 0, max(counts))
                                for count in counts])
    image_sizes = torch.tensor(sizes)
    extra = {"batch_num_images": torch.tensor([len(sizes)])} if batch_num_images else {}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, image_sizes, **extra).pooler_output
    ids = [5, 6]
    for feature in features:
        ids += [IMAGE_TOKEN] * feature.shape[0] + [7]
    input_ids = torch.tensor([ids + torch.randint(4, 90, (seed % 5 + 2,), generator=generator).tolist()])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            "image_sizes": image_sizes, **extra}


def onevision_video_row(model, frames: int, seed: int) -> dict:
    pixel_values_videos = torch.randn(1, frames, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        count = model.model.get_video_features(pixel_values_videos).pooler_output.shape[1]
    input_ids = torch.tensor([[5, 6] + [VIDEO_TOKEN_ID] * count + [7, 8, 9]])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values_videos": pixel_values_videos}


def anyres_model(builder):
    """The builder's model with three anyres grids (2x2, 1x2, 2x1 crops), so images differ in patch counts too."""
    model, first = builder(seed=0)
    model.config.image_grid_pinpoints = [[32, 32], [16, 32], [32, 16]]
    return model, first


def llava_next_case():
    model, first = anyres_model(tiny_llava_next)
    rows = [first, anyres_row(model, [[16, 32], [32, 16]], 1), text_row(6, 2)]
    return model, rows, {"patch_padded": ("pixel_values",)}


def llava_onevision_case():
    """Without ``batch_num_images`` (every image patched): a 2x2-grid image, two images of other grids, a video,
    text."""
    model, first = anyres_model(tiny_llava_onevision)
    rows = [first, anyres_row(model, [[16, 32], [32, 16]], 1), onevision_video_row(model, 2, 2), text_row(6, 3)]
    return model, rows, {"patch_padded": ("pixel_values",)}


def llava_onevision_processor_case():
    """The processor's ``batch_num_images`` [1, 2, 0, 0]: an image alone (patched, 3 crops), two images (one crop
    each), a video, text."""
    model, _ = anyres_model(tiny_llava_onevision)
    rows = [anyres_row(model, [[16, 32]], 1, batch_num_images=True),
            anyres_row(model, [[32, 32], [20, 30]], 2, batch_num_images=True),
            onevision_video_row(model, 3, 3), text_row(6, 4)]
    return model, rows, {"patch_padded": ("pixel_values",)}


IDEFICS_SLOTS = ("pixel_values", "pixel_attention_mask")  # batch-first, padded with all-zero image slots
CASES = {
    **{builder.__name__[5:]: causal_case(builder)
       for builder in (tiny_llama, tiny_qwen2, tiny_mistral, tiny_gpt2, tiny_phi3, tiny_gemma2, tiny_gemma3_text)},
    "llava": llava_case,
    "llava_next": llava_next_case,
    "llava_onevision": llava_onevision_case,
    "llava_onevision-batch_num_images": llava_onevision_processor_case,
    "qwen2_vl": joined_case(tiny_qwen2_vl, "mm_token_type_ids", grid_thw=[(1, 8, 8), (1, 4, 12)]),
    "qwen2_vl-video": qwen_video_case(tiny_qwen2_vl, None),
    "qwen2_5_vl": joined_case(tiny_qwen2_5_vl, "mm_token_type_ids", grid_thw=[(1, 8, 8), (1, 4, 12)]),
    "qwen2_5_vl-video": qwen_video_case(tiny_qwen2_5_vl, 0.5),
    "qwen3_vl": joined_case(tiny_qwen3_vl, "mm_token_type_ids", grid_thw=[(1, 8, 8), (1, 4, 12)]),
    "qwen3_vl_moe": joined_case(tiny_qwen3_vl_moe, "mm_token_type_ids", grid_thw=[(1, 8, 8), (1, 4, 12)]),
    "qwen3_vl-video": qwen3_video_case,
    "idefics3": joined_case(tiny_idefics3, media_dim=1, batch_first=IDEFICS_SLOTS),
    "smolvlm": joined_case(tiny_smolvlm, media_dim=1, batch_first=IDEFICS_SLOTS),
    "gemma3": joined_case(tiny_gemma3, "token_type_ids"),
    "paligemma": joined_case(tiny_paligemma, "token_type_ids"),
    "internvl": joined_case(tiny_internvl, tiles=[(2,), (1, 2)]),
    "glm4v": joined_case(tiny_glm4v, "mm_token_type_ids"),
    "glm4v_moe": joined_case(tiny_glm4v_moe, "mm_token_type_ids"),
    "glm4v-video": glm4v_video_case,
    "llava_next_video": llava_next_video_case,
    "llava_onevision1_5": joined_case(tiny_llava_onevision1_5),
    "llava_onevision1_5-video": onevision15_video_case,
    "gemma4": joined_case(tiny_gemma4, "mm_token_type_ids", sizes=[((30, 70),), ((60, 60), (20, 40))]),
    "gemma4-video": gemma4_video_case,
}


def assert_same_inputs(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), where
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{where}: {key}"


@pytest.mark.parametrize("name", list(CASES))
def test_split_gives_each_row_its_own_inputs(name):
    model, rows, layout = CASES[name]()
    batch = assemble(rows, **layout)
    assert batch["attention_mask"].eq(0).any(), "the rows should differ in length"
    split = get_adapter(model).split_batch(batch)
    assert len(split) == len(rows)
    with torch.no_grad():
        for index, (got, want) in enumerate(zip(split, rows)):
            assert_same_inputs(got, want, f"{name} row {index}")
            torch.testing.assert_close(model(**got).logits[:, -1], model(**want).logits[:, -1])


def test_seconds_per_grid_given_as_a_list_go_to_their_videos_rows():
    """The Qwen2.5-VL processor gives ``second_per_grid_ts`` as a list: each row takes its own videos' values, as
    from a tensor (the whole list at every row put row 0's pace on row 1's video: wrong temporal positions)."""
    model, rows, layout = qwen_video_case(tiny_qwen2_5_vl, 0.5)()
    rows[2]["second_per_grid_ts"] = torch.tensor([5.0])  # the third row's video at another pace
    batch = assemble(rows, **layout)
    batch["second_per_grid_ts"] = batch["second_per_grid_ts"].tolist()
    split = get_adapter(model).split_batch(batch)
    assert [row.get("second_per_grid_ts") for row in split] == [None, [0.5], [5.0], None]
    with torch.no_grad():
        for got, want in zip(split, rows):
            torch.testing.assert_close(model(**got).logits[:, -1], model(**want).logits[:, -1])


def test_rows_of_equal_length_without_attention_mask():
    model, first = tiny_llama(seed=0, prompt_len=8)
    second = tiny_llama(seed=1, prompt_len=8)[1]
    batch = {"input_ids": torch.cat([first["input_ids"], second["input_ids"]]), "use_cache": True}
    split = get_adapter(model).split_batch(batch)
    assert [list(row) for row in split] == [["input_ids", "use_cache"]] * 2
    assert all(torch.equal(row["input_ids"], want["input_ids"]) for row, want in zip(split, [first, second]))
    assert split[0]["use_cache"] is True and split[1]["use_cache"] is True  # non-tensors pass through


# ------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def llama():
    return get_adapter(tiny_llama(seed=0)[0])


@pytest.mark.parametrize("mask", [
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],  # right padding
    [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]],  # a hole
    [[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]],  # a hole
])
def test_right_padding_and_holes_raise(llama, mask):
    batch = {"input_ids": torch.randint(4, 90, (2, 5)), "attention_mask": torch.tensor(mask)}
    with pytest.raises(ValueError, match="must be left-padded.*padding_side='left'"):
        llama.split_batch(batch)


def test_a_row_without_tokens_raises(llama):
    batch = {"input_ids": torch.randint(4, 90, (2, 5)), "attention_mask": torch.tensor([[0] * 5, [1] * 5])}
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] .* no token"):
        llama.split_batch(batch)


def test_a_tensor_that_fits_no_row_raises(llama):
    batch = assemble([text_row(5, 0), text_row(7, 1)])
    with pytest.raises(ValueError, match="'pixel_values'"):
        llama.split_batch({**batch, "pixel_values": torch.randn(2, 3, 16, 16)})
    model, first = tiny_qwen2_vl(seed=0)
    batch = assemble([first, text_row(7, 1, "mm_token_type_ids")])
    batch.pop("image_grid_thw")  # pixel_values alone cannot be given to rows
    with pytest.raises(ValueError, match="'pixel_values'"):
        get_adapter(model).split_batch(batch)


def test_media_counts_that_do_not_add_up_raise():
    model, first = tiny_llava(seed=0)
    second = tiny_llava(seed=1, prompt_len=5)[1]
    adapter = get_adapter(model)
    batch = assemble([first, second])
    for pixel_values in (batch["pixel_values"][:1], torch.cat([batch["pixel_values"]] * 2)):  # one too few / many
        with pytest.raises(ValueError, match="image counts do not add up"):
            adapter.split_batch({**batch, "pixel_values": pixel_values})

    model, first = tiny_qwen2_vl(seed=0)
    batch = assemble([first, tiny_qwen2_vl(seed=1, grid_thw=(1, 4, 8))[1]])
    with pytest.raises(ValueError, match="pixel_values has .* image counts do not add up"):  # patches vs grids
        get_adapter(model).split_batch({**batch, "pixel_values": batch["pixel_values"][:-4]})
    grids = torch.tensor([[1, 8, 16], [1, 8, 12]])  # the same 224 patches, split 32 + 24 tokens, not 48 + 8
    with pytest.raises(ValueError, match="row 0 holds 48 image placeholders .* do not add up"):
        get_adapter(model).split_batch({**batch, "image_grid_thw": grids})

    model, first = tiny_idefics3(seed=0)
    batch = assemble([first, tiny_idefics3(seed=1)[1]], batch_first=IDEFICS_SLOTS)
    pixel_values = batch["pixel_values"].clone()
    pixel_values[1, 1] = 0  # row 1's second image slot holds no image, its placeholders ask for one
    with pytest.raises(ValueError, match="row 1 holds 32 image placeholders .* do not add up"):
        get_adapter(model).split_batch({**batch, "pixel_values": pixel_values})

    model, _ = anyres_model(tiny_llava_onevision)
    rows = [anyres_row(model, [[16, 32]], 1, batch_num_images=True),
            anyres_row(model, [[32, 32], [20, 30]], 2, batch_num_images=True)]
    batch = assemble(rows, patch_padded=("pixel_values",))
    with pytest.raises(ValueError, match="batch_num_images .* image counts do not add up"):
        get_adapter(model).split_batch({**batch, "batch_num_images": torch.tensor([1, 1])})


# ------------------------------------------------------------------------------------------- batch of one
@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2_vl, tiny_idefics3, tiny_llava_next])
def test_a_batch_of_one_is_unchanged(builder):
    model, inputs = builder(seed=0)
    adapter = get_adapter(model)
    [row] = adapter.split_batch(inputs)
    assert list(row) == list(inputs) and all(row[key] is inputs[key] for key in inputs)
    # left-padded on its own (as in a batch padded to a longer prompt): the padding goes, the rest is as given
    length = inputs["input_ids"].shape[1] + 3
    padded_alone = {key: padded(value, 1, length, left=True, fill=PAD if key == "input_ids" else 0)
                    if key in TOKEN_KEYS else value for key, value in inputs.items()}
    [row] = adapter.split_batch(padded_alone)
    assert_same_inputs(row, inputs, builder.__name__)
