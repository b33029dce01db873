"""The photo-scene task of the Qwen2-VL fixture pair: deterministic scenes, free phrasing, and scoring that reads
any allowed phrasing back and catches every kind of wrong fact."""
import random

import pytest

from sage_ext.fixtures import photo_scenes as ps


def test_scenes_are_pure_functions_of_their_seed_and_heldout_is_disjoint():
    a, b = ps.generate_scene(17), ps.generate_scene(17)
    assert a == b
    assert a.render().tobytes() == b.render().tobytes()
    assert ps.heldout_scenes(3)[0].seed == ps.HELDOUT_SEED_BASE
    with pytest.raises(ValueError):
        ps.training_scenes(2, start=ps.HELDOUT_SEED_BASE - 1)


def test_scenes_cover_every_size_background_and_object_count():
    scenes = ps.training_scenes(300)
    assert {(s.width, s.height) for s in scenes} == set(ps.IMAGE_SIZES)
    assert {s.background for s in scenes} == set(ps.BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == set(range(ps.MIN_OBJECTS, ps.MAX_OBJECTS + 1))
    for scene in scenes[:40]:
        assert scene.render().size == (scene.width, scene.height)
        assert len({(o.color, o.kind) for o in scene.objects}) == len(scene.objects)  # names are unambiguous
        assert len({o.region for o in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            assert ps.region_of(obj.x, obj.y) == obj.region


def test_objects_sit_on_the_token_grid_and_the_mask_matches_the_render():
    """A small object inside one CELL x CELL cell, a large one inside the 2x2 cells around a cell corner; the
    mask marks exactly the pixels the render gives the object's colour (outlines aside)."""
    import numpy as np

    for seed in range(60):
        scene = ps.generate_scene(seed)
        mask, image = np.asarray(scene.object_mask()), np.asarray(scene.render())
        assert mask.shape == (scene.height, scene.width)
        for i, obj in enumerate(scene.objects):
            cx, cy = obj.x * scene.width, obj.y * scene.height
            ys, xs = np.nonzero(mask == i + 1)
            if obj.size == "small":
                assert cx % ps.CELL == cy % ps.CELL == ps.CELL / 2
                left, top, span = cx - ps.CELL / 2, cy - ps.CELL / 2, ps.CELL
            else:
                assert cx % ps.CELL == cy % ps.CELL == 0
                left, top, span = cx - ps.CELL, cy - ps.CELL, 2 * ps.CELL
            assert len(xs) > 0 and left <= xs.min() and xs.max() < left + span
            assert top <= ys.min() and ys.max() < top + span
            assert (image[ys, xs] == ps.COLORS[obj.color]).all()


def test_the_colour_order_is_the_most_likely_listing_and_others_occur():
    scene = next(s for s in ps.training_scenes(50) if len(s.objects) >= 4)
    by_colour = [(o.color, o.kind) for o in
                 sorted(scene.objects, key=lambda o: (list(ps.COLORS).index(o.color), ps.KINDS.index(o.kind)))]
    orders = []
    for seed in range(400):
        caption = scene.caption(random.Random(seed))
        facts = [(m.group(2), ps._KIND_OF[m.group(3)]) for m in ps._MENTION.finditer(caption)]
        orders.append(tuple(facts[: len(scene.objects)]))
    counts = {order: orders.count(order) for order in set(orders)}
    assert max(counts, key=counts.get) == tuple(by_colour)
    assert 0.45 < counts[tuple(by_colour)] / len(orders) < 0.65
    assert len(counts) > 10  # the order stays free


def test_every_phrasing_is_scored_fully_correct():
    for seed in range(250):
        scene, rng = ps.generate_scene(seed), random.Random(seed)
        for text in (scene.caption(rng), scene.detailed_description(rng)):
            score = ps.score_description(scene, text)
            assert score["correct"] == score["total"], (text, score)
            assert score["invented"] == 0 and score["wrong"] == 0, text
        for question, answer in scene.qa_pairs(rng, num=4):
            assert ps.answer_is_correct(scene, question, answer), (question, answer)


def test_wording_varies_while_the_facts_stay():
    scene = ps.generate_scene(5)
    captions = {scene.caption(random.Random(i)) for i in range(50)}
    details = {scene.detailed_description(random.Random(i)) for i in range(50)}
    assert len(captions) >= 30 and len(details) >= 45
    first_objects = {ps.parse_description(c.split(":")[-1]).get("objects") and
                     next(iter(ps.parse_description(c)["objects"])) for c in captions}
    assert len(first_objects) >= 2  # which object comes first is free
    assert min(len(d.split()) for d in details) >= 60


def test_scoring_catches_invented_objects_and_wrong_facts():
    scene = ps.Scene(0, 256, 256, "grass", [
        ps.SceneObject("circle", "red", "large", "top left", 0.15, 0.15),
        ps.SceneObject("star", "blue", "small", "bottom right", 0.85, 0.85),
    ])
    right = ("The image shows two shapes on a lawn: a big red disc and a tiny blue star. "
             "The red circle is in the top left corner.")
    assert ps.score_description(scene, right) == {"correct": 7, "total": 7, "wrong": 0, "invented": 0}
    cases = {
        "a large red circle, a small blue star and a white ring on grass.": {"invented": 1},
        "three shapes on green grass: a red circle and a blue star.": {"wrong": 1},
        "a small red circle and a blue star on a lawn.": {"wrong": 1},
        "a red circle and a blue star on sand.": {"wrong": 1},
        "a red circle and a blue star on a lawn. The blue star is at the top.": {"wrong": 1},
    }
    for text, expected in cases.items():
        score = ps.score_description(scene, text)
        for key, value in expected.items():
            assert score[key] == value, (text, score)
        assert score["correct"] < score["total"] or score["invented"], (text, score)
    missing = ps.score_description(scene, "a red circle on a lawn.")
    assert missing["correct"] == missing["total"] - 1  # the blue star is not mentioned


def test_answers_are_checked_in_every_allowed_phrasing():
    scene = ps.generate_scene(11)
    obj = scene.objects[0]
    question = f"Where is the {obj.color} {obj.kind}?"
    for phrase in ps.REGION_PHRASES[obj.region]:
        assert ps.answer_is_correct(scene, question, phrase[0].upper() + phrase[1:] + ".")
    other = next(r for r in ps.REGIONS if r != obj.region)
    assert not ps.answer_is_correct(scene, question, ps.REGION_PHRASES[other][0] + ".")
    assert ps.answer_is_correct(scene, "How many shapes are there?", ps.COUNT_WORDS[len(scene.objects)].capitalize())
    assert not ps.answer_is_correct(scene, "How many shapes are there?", "Seven.")
