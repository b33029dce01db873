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


def test_scenes_cover_every_size_landscape_and_object_count():
    scenes = ps.training_scenes(300)
    assert {(s.width, s.height) for s in scenes} == set(ps.IMAGE_SIZES)
    assert {s.grounds for s in scenes} == {(b,) for b in ps.BACKGROUNDS} | set(ps.LANDSCAPES)
    for scene in scenes:
        assert scene.horizon % ps.CELL == 0 and (scene.horizon == scene.height) == (len(scene.grounds) == 1)
    assert {len(s.objects) for s in scenes} == set(range(ps.MIN_OBJECTS, ps.MAX_OBJECTS + 1))
    for scene in scenes[:40]:
        assert scene.render().size == (scene.width, scene.height)
        assert len({(o.color, o.kind) for o in scene.objects}) == len(scene.objects)  # names are unambiguous
        assert len({o.region for o in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            assert ps.region_of(obj.x, obj.y) == obj.region
            assert obj.ground == scene.ground_at(obj.y * scene.height)
        if len(scene.grounds) == 2:  # the upper ground shows above the horizon, the lower one below
            image = scene.render()
            assert image.getpixel((0, scene.horizon - 1)) != image.getpixel((0, scene.horizon))


def test_objects_sit_on_the_token_grid_and_the_mask_matches_the_render():
    """A small object inside one CELL x CELL cell, a large one inside the 2x2 cells around a cell corner; the
    mask marks exactly the pixels the render gives the object's colour (outlines aside); an object never
    straddles the horizon, and the ground mask under it is its ground."""
    import numpy as np

    for seed in range(60):
        scene = ps.generate_scene(seed)
        mask, image = np.asarray(scene.object_mask()), np.asarray(scene.render())
        grounds = np.asarray(scene.ground_mask())
        assert mask.shape == grounds.shape == (scene.height, scene.width)
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
            cell_block = grounds[int(top): int(top + span), int(left): int(left + span)]
            assert (cell_block == ps.BACKGROUNDS.index(obj.ground)).all()


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
    first_objects = {next(iter(ps.parse_description(c)["objects"])) for c in captions}
    assert len(first_objects) >= 2  # which object comes first is free
    assert min(len(d.split()) for d in details) >= 60


def test_scoring_catches_invented_objects_and_wrong_facts():
    scene = ps.Scene(0, 256, 256, ("sky", "grass"), 96, [
        ps.SceneObject("circle", "red", "large", "top left", "sky", 0.125, 0.125),
        ps.SceneObject("star", "blue", "small", "bottom right", "grass", 0.84375, 0.84375),
    ])
    right = ("The image shows two shapes on a clear sky above a lawn: a big red disc and a tiny blue star. "
             "The red circle is up in the sky.")
    assert ps.score_description(scene, right) == {"correct": 7, "total": 7, "wrong": 0, "invented": 0}
    cases = {
        "a large red circle, a small blue star and a white ring on the sky above grass.": {"invented": 1},
        "three shapes on the sky above green grass: a red circle and a blue star.": {"wrong": 1},
        "a small red circle and a blue star on the sky above a lawn.": {"wrong": 1},
        "a red circle and a blue star on the sky above sand.": {"wrong": 1},
        # a place is not a background: "on the grass" names where the star is, the background stays the sky alone
        "a red circle and a blue star on a blue sky. The blue star is on the grass.": {"wrong": 0},
        "a red circle and a blue star on the sky above a lawn. The blue star is in the sky.": {"wrong": 1},
    }
    for text, expected in cases.items():
        score = ps.score_description(scene, text)
        for key, value in expected.items():
            assert score[key] == value, (text, score)
        assert score["correct"] < score["total"] or score["invented"], (text, score)
    missing = ps.score_description(scene, "a red circle on a clear sky above a lawn.")
    assert missing["correct"] == missing["total"] - 1  # the blue star is not mentioned


def test_answers_are_checked_in_every_allowed_phrasing():
    scene = ps.generate_scene(11)
    obj = scene.objects[0]
    question = f"Where is the {obj.color} {obj.kind}?"
    for phrase in ps.GROUND_PHRASES[obj.ground]:
        assert ps.answer_is_correct(scene, question, phrase[0].upper() + phrase[1:] + ".")
    other = next(g for g in ps.BACKGROUNDS if g != obj.ground)
    assert not ps.answer_is_correct(scene, question, ps.GROUND_PHRASES[other][0] + ".")
    setting = " above ".join(ps.BACKGROUND_PHRASES[g][-1] for g in scene.grounds)
    assert ps.answer_is_correct(scene, "What is the background?", setting.capitalize() + ".")
    assert not ps.answer_is_correct(scene, "What is the background?", "The sky above the sky.")
    assert ps.answer_is_correct(scene, "How many shapes are there?", ps.COUNT_WORDS[len(scene.objects)].capitalize())
    assert not ps.answer_is_correct(scene, "How many shapes are there?", "Seven.")


def test_composition_remarks_vary_in_choice_but_keep_their_order():
    scene = ps.generate_scene(9)
    chosen = set()
    for seed in range(60):
        text = scene.detailed_description(random.Random(seed))
        made = [remark for remark in ps.COMPOSITION_REMARKS if remark in text]
        assert len(made) == 5
        positions = [text.index(remark) for remark in made]
        assert positions == sorted(positions)  # COMPOSITION_REMARKS order, whichever five
        chosen.add(tuple(made))
    assert len(chosen) >= 20
