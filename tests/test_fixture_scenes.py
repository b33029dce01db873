"""The procedural scene task: deterministic, and captions / answers / pixels agree with the scene."""
import random

import numpy as np
import pytest

from sage_ext.fixtures import scenes


def test_generation_is_deterministic_per_seed():
    a, b = scenes.generate_scene(123), scenes.generate_scene(123)
    assert a == b
    assert a.caption() == b.caption()
    assert a.qa_pairs() == b.qa_pairs()
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert scenes.generate_scene(124).caption() != a.caption()


def test_heldout_scenes_are_disjoint_from_training_seeds():
    held = scenes.heldout_scenes(50)
    assert all(s.seed >= scenes.HELDOUT_SEED_BASE for s in held)
    train_captions = {s.caption() for s in scenes.training_scenes(2000)}
    assert not train_captions & {s.caption() for s in held}
    with pytest.raises(ValueError):
        scenes.training_scenes(10, start=scenes.HELDOUT_SEED_BASE - 5)


@pytest.mark.parametrize("seed", [0, 7, 1_000_003])
def test_caption_states_every_object_and_parses_back(seed):
    scene = scenes.generate_scene(seed)
    assert scenes.MIN_OBJECTS <= len(scene.objects) <= scenes.MAX_OBJECTS
    assert [(o.row, o.col) for o in scene.objects] == sorted((o.row, o.col) for o in scene.objects)
    facts = scenes.parse_caption(scene.caption())
    assert facts["count"] == scenes.COUNT_WORDS[len(scene.objects)]
    assert (facts["texture"], facts["background"]) == (scene.texture, scene.background)
    assert facts["objects"] == {(o.row, o.col): (o.size, o.color, o.shape) for o in scene.objects}
    score = scenes.score_caption(scene, scene.caption())
    assert score["correct"] == score["total"] and score["exact"] and score["hallucinated"] == 0


def test_score_counts_wrong_attributes_and_hallucinations():
    scene = scenes.generate_scene(5)
    first = scene.objects[0]
    wrong_color = next(c for c in scenes.COLORS if c != first.color)
    text = scene.caption().replace(f"{first.size} {first.color} {first.shape}", f"{first.size} {wrong_color} {first.shape}", 1)
    empty = next((r, c) for r in range(1, 5) for c in range(1, 5) if scene.cell(r, c) is None)
    text += f" In row {empty[0]}, column {empty[1]} there is a small red circle."
    score = scenes.score_caption(scene, text)
    assert score["correct"] == score["total"] - 1
    assert score["hallucinated"] == 1 and not score["exact"]


def _cell_pixels(image, row, col):
    array = np.asarray(image).astype(int)
    c = scenes.CELL
    return array[(row - 1) * c: row * c, (col - 1) * c: col * c].reshape(-1, 3)


def test_pixels_show_the_described_objects():
    """Empty cells hold only background; an object's cell shows its colour in a mask that depends only on
    its (size, kind): the same words always give the same pixels, different words different pixels."""
    exact_masks, visible = {}, {}
    for seed in range(60):
        scene = scenes.generate_scene(seed)
        image = scene.render()
        assert image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
        background = np.array(scenes.BACKGROUNDS[scene.background])
        for row in range(1, scenes.GRID + 1):
            for col in range(1, scenes.GRID + 1):
                pixels = _cell_pixels(image, row, col)
                obj = scene.cell(row, col)
                if obj is None:  # only background (and its lighter stripes)
                    assert (np.abs(pixels - background).max(axis=1) <= 46).all()
                    continue
                color = np.array(scenes.COLORS[obj.color])
                key = (obj.size, obj.shape)
                exact = np.abs(pixels - color).max(axis=1) <= 2  # fully covered pixels
                if key in exact_masks:
                    assert np.array_equal(exact_masks[key], exact), key
                exact_masks[key] = exact
                # pixels at least half-way (anti-aliasing) from the background to the colour
                near = np.abs(pixels - color).sum(axis=1) < np.abs(pixels - background).sum(axis=1)
                visible[key] = min(visible.get(key, 256), int(near.sum()))
    assert len(exact_masks) == len(scenes.SIZES) * len(scenes.SHAPES)
    assert len({mask.tobytes() for mask in exact_masks.values()}) == len(exact_masks)
    for (size, shape), count in visible.items():
        assert count >= 24, (size, shape)
        if size == "small":
            assert visible[("large", shape)] > count


def test_answers_match_the_scene():
    for seed in range(30):
        scene = scenes.generate_scene(seed)
        for question, answer in scene.qa_pairs(random.Random(seed), num=8):
            if question.startswith("What is in row"):
                row, col = (int(x) for x in question.replace("?", "").replace(",", "").split()[-3::2])
                obj = scene.cell(row, col)
                assert answer == (f"{obj.phrase()}." if obj else "nothing.")
            elif question.startswith("How many"):
                assert answer == scenes.COUNT_WORDS[len(scene.objects)] + "."
            elif question.startswith("What does the background"):
                assert answer == f"{scene.texture} {scene.background}."
            elif question.startswith("Is there a"):
                color, shape = question[len("Is there a "):-1].split()
                present = any(o.color == color and o.shape == shape for o in scene.objects)
                assert answer.startswith("yes") == present
            else:
                assert question.startswith("What color is the shape in row")
                row, col = (int(x) for x in question.replace("?", "").replace(",", "").split()[-3::2])
                assert answer == scene.cell(row, col).color + "."


def test_prompt_format():
    assert scenes.caption_prompt() == "<image>\nDescribe the image in detail.\n"
    assert scenes.question_prompt("How many shapes are there?", "<im>") == "<im>\nQuestion: How many shapes are there? Answer:\n"
