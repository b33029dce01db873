"""GLM-4V's own rules (sage_ext/families/glm4v.py): a video's frames are written with the image placeholder and told
apart by mm_token_type_ids 2. Without mm_token_type_ids, generate gives the prompt 1-D positions and puts the media
given into every placeholder, and so does the engine, alone and in a batch of one kind of media; a literal
``<|video|>`` token is text (a batch holding one splits as its rows); an image and a video in one prompt, which
transformers' GLM-4V cannot take, and a batch of both without token types are refused with the reason."""
from __future__ import annotations

import pytest
import torch
from test_batch_split import assemble, text_row
from test_engine_kv import MAX_NEW
from tiny_glm4v import glm4v_inputs, tiny_glm4v, tiny_glm4v_video
from tiny_models import correlated_draft, one_thread  # noqa: F401  (one_thread: autouse fixture)
from tiny_vlms import VIDEO_TOKEN_ID

from sage_ext.engine import SpeculativeGenerator


@pytest.fixture(scope="module")
def glm():
    target, _ = tiny_glm4v()
    return target, correlated_draft(target)


def reference(target, inputs, max_new_tokens=MAX_NEW):
    with torch.no_grad():
        return target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)


def assert_rows_as_alone(target, generator, rows):
    batch = assemble(rows)
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, pad_token_id=2)
    length = batch["input_ids"].shape[1]
    for index, row in enumerate(rows):
        expected = reference(target, row)[0, row["input_ids"].shape[1]:]
        assert torch.equal(out.sequences[index, length:length + expected.shape[0]], expected), index


@pytest.mark.parametrize("media", ["image", "video"])
@pytest.mark.parametrize("policy", ["chain", "sage"])
def test_without_token_types_as_generate(glm, media, policy):
    target, draft = glm
    inputs = glm4v_inputs(target, seed=1, image_grid=(1, 8, 12) if media == "image" else None,
                          video_grid=(3, 4, 6) if media == "video" else None)
    bare = {key: value for key, value in inputs.items() if key != "mm_token_type_ids"}
    expected = reference(target, bare)
    assert not torch.equal(expected, reference(target, inputs))  # the positions differ without them
    out = SpeculativeGenerator(target, draft, policy).generate(**bare, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)


def test_a_batch_without_token_types_of_one_kind_of_media(glm):
    target, draft = glm
    rows = [glm4v_inputs(target, seed=seed, image_grid=None, video_grid=grid) for seed, grid in
            ((1, (2, 4, 4)), (2, (3, 4, 6)))]
    rows = [{key: value for key, value in row.items() if key != "mm_token_type_ids"} for row in rows]
    assert_rows_as_alone(target, SpeculativeGenerator(target, draft, "sage"), rows + [text_row(7, 3)])


def test_a_literal_video_token_is_text(glm):
    """``<|video|>`` (config.video_token_id) in a prompt is an ordinary token to GLM-4V, alone and in a batch with a
    video row (it was counted as a video placeholder there and the batch refused)."""
    target, draft = glm
    text = text_row(9, 3, "mm_token_type_ids")
    text["input_ids"][0, 4] = VIDEO_TOKEN_ID
    video = glm4v_inputs(target, seed=2, image_grid=None, video_grid=(3, 4, 6), question_len=3)
    assert_rows_as_alone(target, SpeculativeGenerator(target, draft, "sage"), [video, text])


def test_image_and_video_in_one_prompt_is_refused(glm):
    target, draft = glm
    both = glm4v_inputs(target, seed=1, image_grid=(1, 4, 8), video_grid=(2, 4, 4))
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        reference(target, both, 3)  # what generate does
    with pytest.raises(ValueError, match="cannot take an image and a video in one prompt"):
        SpeculativeGenerator(target, draft, "sage").generate(**both, max_new_tokens=3)


def test_a_batch_of_images_and_videos_needs_token_types(glm):
    target, draft = glm
    rows = [glm4v_inputs(target, seed=1, image_grid=(1, 4, 8)),
            glm4v_inputs(target, seed=2, image_grid=None, video_grid=(2, 4, 4))]
    generator = SpeculativeGenerator(target, draft, "sage")
    assert_rows_as_alone(target, generator, rows)  # with them: each row as alone
    batch = assemble(rows)
    batch.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="batch of images and videos needs mm_token_type_ids"):
        generator.generate(**batch, max_new_tokens=3)
    batch = assemble(rows)
    batch["mm_token_type_ids"] = batch["mm_token_type_ids"][:, 1:]
    with pytest.raises(ValueError, match="mm_token_type_ids has shape"):
        generator.generate(**batch, max_new_tokens=3)


def test_video_placeholders_typed_as_text_are_named(glm):
    """A video's placeholders typed 0 read as an image's: the refusal says how GLM-4V tells them apart."""
    target, draft = glm
    video = glm4v_inputs(target, seed=2, image_grid=None, video_grid=(2, 4, 4))
    video["mm_token_type_ids"] = torch.zeros_like(video["mm_token_type_ids"])
    with pytest.raises(ValueError, match="a video's are those of mm_token_type_ids 2"):
        SpeculativeGenerator(target, draft, "sage").generate(**video, max_new_tokens=3)


def test_the_video_builder_is_a_video(glm):
    """tiny_glm4v_video's prompt: its placeholders are all a video's (type 2)."""
    _, inputs = tiny_glm4v_video()
    placeholders = inputs["input_ids"] == 250
    assert placeholders.any() and bool((inputs["mm_token_type_ids"][placeholders] == 2).all())
