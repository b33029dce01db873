"""benchmarks/train_qwen2vl_fixture.py at a few steps: the training data supervises exactly the assistant turns,
and the saved pair (Qwen2-VL, differently padded vocabularies) loads offline with its processor and is decoded
losslessly by every policy from real processor outputs (hundreds of visual tokens, non-square grids), with the
draft pruned or not."""
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForImageTextToText  # noqa: E402

from sage_ext.cli.models import scene_inputs  # noqa: E402
from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.fixtures import PAIRS, photo_scenes  # noqa: E402
from sage_ext.processors import load_processor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_qwen2vl_fixture as train  # noqa: E402
from script_runs import run_main  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2vl")
    assert run_main(train.main, ["--out-dir", str(out), "--target-steps", "2", "--draft-steps", "2",
                                 "--grounding-steps", "2", "--eval-scenes", "1", "--probe-every", "2"]) == 0
    return out


def test_grounding_labels_name_every_object_on_its_tokens():
    """Whole images: a small object's labels sit on exactly one visual token, a large one's on a 2x2 block,
    each with its colour, and one object row (kind, size) per object; on every token the ground its rows show
    (two grounds: the upper one above the horizon)."""
    scenes = [photo_scenes.generate_scene(seed) for seed in range(12)]
    grids = [[1, s.height // train.PATCH, s.width // train.PATCH] for s in scenes]
    tokens, objects = train.grounding_targets([(s, None) for s in scenes], grids)
    assert tokens.shape == (sum(s.width * s.height // 256 for s in scenes), 3)
    expected_objects, start = [], 0
    for scene in scenes:
        rows = tokens[start: start + scene.width * scene.height // 256]
        start += len(rows)
        cols = scene.width // 16
        token_rows = torch.arange(len(rows)) // cols
        upper = token_rows * 16 < scene.horizon
        grounds = [photo_scenes.BACKGROUNDS.index(g) for g in scene.grounds]
        assert (rows[upper, 1] == grounds[0]).all() and (rows[~upper, 1] == grounds[-1]).all()
        for obj in scene.objects:
            row = len(expected_objects)
            expected_objects.append([photo_scenes.KINDS.index(obj.kind), photo_scenes.SIZES.index(obj.size)])
            where = (rows[:, 2] == row).nonzero().flatten().tolist()
            cx, cy = int(obj.x * scene.width) // 16, int(obj.y * scene.height) // 16
            if obj.size == "small":
                assert where == [cy * cols + cx]
            else:  # centred on a cell corner: the 2x2 cells around it
                assert where == [(cy - 1) * cols + cx - 1, (cy - 1) * cols + cx, cy * cols + cx - 1, cy * cols + cx]
            assert (rows[where, 0] == list(photo_scenes.COLORS).index(obj.color) + 1).all()
        assert int((rows[:, 0] > 0).sum()) == int((rows[:, 2] >= 0).sum())
    assert objects.tolist() == expected_objects


def test_grounding_crops_stay_on_the_token_grid_and_drop_cut_objects():
    images, views = train.grounding_crops(random.Random(3), 40)
    assert len(images) == len(views) == 40
    for image, (scene, box) in zip(images, views):
        assert image.size == (box[2] - box[0], box[3] - box[1]) == (train.GROUNDING_CROP, train.GROUNDING_CROP)
        assert box[0] % photo_scenes.CELL == box[1] % photo_scenes.CELL == 0
    side = train.GROUNDING_CROP // train.PATCH
    tokens, objects = train.grounding_targets(views, [[1, side, side]] * len(views))
    # objects whose shape the crop cuts keep their colour on their tokens but have no kind / size row
    cut = (tokens[:, 0] > 0) & (tokens[:, 2] < 0)
    assert len(objects) > 0 and int(cut.sum()) > 0
    features = torch.randn(len(tokens), 16, requires_grad=True)
    loss, logits = train.grounding_loss(train.grounding_heads(16), features, tokens, objects)
    loss.backward()
    assert torch.isfinite(loss) and features.grad.abs().sum() > 0
    assert [part.shape for part in logits] == [(len(tokens), n) for n in train.GROUNDING_HEADS.values()]
    assert len(train.grounding_accuracy(logits, tokens, objects)) == 4


def test_labels_cover_exactly_the_assistant_turns(trained):
    processor = load_processor(str(trained / "qwen2vl_target"))
    batcher = train.Batcher(processor)
    scene = photo_scenes.generate_scene(4)
    turns = train.conversation(scene, random.Random(0))
    batch = batcher([train.chat_text(processor, turns)], [scene.render()])
    labels = batch["labels"][0]
    supervised = processor.tokenizer.decode(labels[labels != -100])
    expected = "".join(answer + "<|im_end|>" for _, answer in turns)
    assert supervised == expected
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_id).sum()) >= 256


def test_detailed_descriptions_are_long_in_the_fixture_tokenizer(trained):
    """The task's "describe in detail" answers are at least 150 tokens of the pair's own tokenizer, whatever the
    scene and phrasing (the smallest scenes are the shortest)."""
    tokenizer = load_processor(str(trained / "qwen2vl_target")).tokenizer
    lengths = [len(tokenizer(scene.detailed_description(random.Random(i))).input_ids)
               for i, scene in enumerate(photo_scenes.training_scenes(200) + photo_scenes.heldout_scenes(100))]
    assert min(lengths) >= 150, sorted(lengths)[:5]


def test_saved_pair_loads_with_differently_padded_vocabularies(trained):
    summary = json.loads((trained / "qwen2vl_training_summary.json").read_text())
    processor = load_processor(str(trained / "qwen2vl_target"))
    vocab = {}
    for role in ("target", "draft"):
        folder = trained / f"qwen2vl_{role}"
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and model.dtype == torch.float32
        vocab[role] = model.config.text_config.vocab_size
        assert vocab[role] == summary[role]["vocab"]
        card = (folder / "README.md").read_text()
        assert f"| caption_fact_accuracy | {summary[role]['caption_fact_accuracy']} |" in card
        assert f"| where_accuracy | {summary[role]['where_accuracy']} |" in card
    assert len(processor.tokenizer) <= vocab["target"] < vocab["draft"] and vocab["draft"] % 128 == 0
    assert 5 <= summary["target"]["params"] / summary["draft"]["params"] <= 10


def test_the_progress_probe_prints_binding_facts_and_places(trained, capsys):
    processor = load_processor(str(trained / "qwen2vl_target"))
    model = AutoModelForImageTextToText.from_pretrained(trained / "qwen2vl_target").train()
    scene = photo_scenes.heldout_scenes(1)
    train.progress_probe(model, processor, scene)(250)
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[:4] == ["PROBE", "step", "250", "kind_binding"] and line[5:7] == ["caption", "facts"]
    assert line[8] == "where" and all(0.0 <= float(line[i]) <= 1.0 for i in (4, 7, 9))
    assert model.training  # the probe hands the model back in training mode
    assert train.where_accuracy(model.eval(), processor, scene) == pytest.approx(
        sum(photo_scenes.answer_is_correct(scene[0], f"Where is the {o.color} {o.kind}?", processor.tokenizer.decode(
            train.greedy_answer(model, processor, scene[0], f"Where is the {o.color} {o.kind}?", 12),
            skip_special_tokens=True)) for o in scene[0].objects) / len(scene[0].objects), abs=1e-4)


def test_large_size_keeps_the_draft_5_to_10x_smaller():
    tokenizer = train.build_tokenizer()
    sizes = {role: train.count_params(train.build_model(spec, tokenizer, 768))
             for role, spec in train.SIZES["large"].items()}
    assert 10e6 <= sizes["target"] <= 30e6 and 5 <= sizes["target"] / sizes["draft"] <= 10


def test_large_size_trains_on_the_given_device_and_saves_a_pair_the_engine_decodes(tmp_path):
    """``--size large`` (the pair for a GPU machine) runs the same path end to end: a step of each training stage on
    ``--device`` (here the CPU, at a batch of 2 chats), evaluation, and a saved pair that loads with its processor
    and that sage_cost decodes as the target does."""
    assert run_main(train.main, ["--size", "large", "--device", "cpu", "--batch", "2", "--out-dir", str(tmp_path),
                                 "--target-steps", "1", "--draft-steps", "1", "--grounding-steps", "1",
                                 "--eval-scenes", "1"]) == 0
    summary = json.loads((tmp_path / "qwen2vl_training_summary.json").read_text())
    assert summary["size"] == "large" and summary["device"] == "cpu"
    assert summary["target"]["batch"] == summary["draft"]["batch"] == 2
    assert 10e6 <= summary["target"]["params"] <= 30e6
    processor = load_processor(str(tmp_path / "qwen2vl_target"))
    target = AutoModelForImageTextToText.from_pretrained(tmp_path / "qwen2vl_target").eval()
    draft = AutoModelForImageTextToText.from_pretrained(tmp_path / "qwen2vl_draft").eval()
    scene = photo_scenes.heldout_scenes(1)[0]
    inputs = scene_inputs(processor, PAIRS["qwen2vl"], [scene], torch.device("cpu"), torch.float32)[0]
    with torch.inference_mode():
        expected = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    out = SpeculativeGenerator(target, draft, "sage_cost").generate(**inputs, max_new_tokens=12)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("prune", [0.0, 0.8])
def test_every_policy_decodes_the_saved_pair_losslessly(trained, prune):
    processor = load_processor(str(trained / "qwen2vl_target"))
    target = AutoModelForImageTextToText.from_pretrained(trained / "qwen2vl_target").eval()
    draft = AutoModelForImageTextToText.from_pretrained(trained / "qwen2vl_draft").eval()
    pair = PAIRS["qwen2vl"]
    scene = photo_scenes.generate_scene(photo_scenes.HELDOUT_SEED_BASE + 7, size=(352, 224))  # non-square grid
    inputs = scene_inputs(processor, pair, [scene], torch.device("cpu"), torch.float32)[0]
    assert inputs["image_grid_thw"][0].tolist() == [1, 224 // 8, 352 // 8]
    with torch.inference_mode():
        expected = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    for policy in ("ar", "chain", "static", "dynamic", "sage", "sage_cost"):
        out = SpeculativeGenerator(target, draft, policy, draft_prune_ratio=prune).generate(**inputs, max_new_tokens=20)
        assert torch.equal(out.sequences, expected), policy


def test_visual_dropout_hides_the_image_in_training_only(trained):
    processor = load_processor(str(trained / "qwen2vl_target"))
    batcher = train.Batcher(processor)
    model = AutoModelForImageTextToText.from_pretrained(trained / "qwen2vl_draft")
    hook = train.add_visual_dropout(model, 1.0, seed=0)
    text = train.chat_text(processor, [(photo_scenes.CAPTION_INSTRUCTION, "A red circle.")])
    scenes = [photo_scenes.generate_scene(seed, size=(256, 256)) for seed in (1, 2)]

    def logits(scene):
        inputs = {k: v for k, v in batcher([text], [scene.render()]).items() if k != "labels"}
        with torch.no_grad():
            return model(**inputs).logits

    model.train()
    assert torch.equal(logits(scenes[0]), logits(scenes[1]))  # every image feature dropped
    model.eval()
    assert not torch.allclose(logits(scenes[0]), logits(scenes[1]))
    hook.remove()


def test_sparse_visual_inputs_keep_objects_text_and_positions(trained):
    """Keeping every visual token reproduces the whole forward exactly; keeping 10% of the background keeps every
    object token and every text token, each at its own M-RoPE position, and every supervised label."""
    processor = load_processor(str(trained / "qwen2vl_target"))
    batcher = train.Batcher(processor)
    model = AutoModelForImageTextToText.from_pretrained(trained / "qwen2vl_target").eval()
    scenes = [photo_scenes.generate_scene(seed) for seed in (3, 8)]
    rng = random.Random(0)
    batch = batcher([train.chat_text(processor, train.conversation(s, rng)) for s in scenes], [s.render() for s in scenes])
    labels = batch.pop("labels")
    objects = train.grounding_targets([(s, None) for s in scenes], batch["image_grid_thw"].tolist())[0][:, 0] > 0
    positions = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                           attention_mask=batch["attention_mask"])[0]
    image = batch["input_ids"] == model.config.image_token_id

    def loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    with torch.no_grad():
        whole = loss(model(**batch).logits, labels)
        inputs, order, valid = train.sparse_visual_inputs(model, batch, objects, 1.0, torch.Generator().manual_seed(0))
        torch.testing.assert_close(loss(model(**inputs).logits, labels.gather(1, order).masked_fill(~valid, -100)), whole)
        inputs, order, valid = train.sparse_visual_inputs(model, batch, objects, 0.1, torch.Generator().manual_seed(0))
    for row in range(len(scenes)):
        kept = order[row][valid[row]]
        assert kept.tolist() == sorted(kept.tolist())
        text = (~image[row] & batch["attention_mask"][row].bool()).nonzero().flatten()
        assert set(text.tolist()) <= set(kept.tolist())
        kept_image = image[row, kept].sum()
        assert objects.sum() > 0 and kept_image < image[row].sum() // 3
        assert torch.equal(inputs["position_ids"][:, row, : len(kept)], positions[:, row, kept])
    image_kept = torch.zeros_like(objects)
    flat = image.flatten().nonzero().flatten()
    kept_flat = (order + torch.arange(len(scenes))[:, None] * image.shape[1])[valid]
    image_kept[torch.isin(flat, kept_flat)] = True
    assert bool(image_kept[objects].all())  # every object token stays
    assert int((labels.gather(1, order).masked_fill(~valid, -100) != -100).sum()) == int((labels != -100).sum())


def test_token_regions_are_the_ninths_of_each_image_in_qwen2vl_order():
    """Per merged token, row-major per image: a 6x6-token image is ninths of 2x2 tokens; a 6-row, 9-column one
    has 2x3-token ninths; images follow each other."""
    regions = train.token_regions([[1, 12, 12], [1, 12, 18]])
    square, wide = regions[:36].view(6, 6), regions[36:].view(6, 9)
    assert len(regions) == 36 + 54
    expected = torch.arange(9).view(3, 3)
    assert torch.equal(square, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(wide, expected.repeat_interleave(2, 0).repeat_interleave(3, 1))


def test_position_loss_reads_each_visual_token_at_its_place_whole_or_gathered():
    """A head that reads the right region off hidden states built to hold it has (near) zero loss, on whole
    sequences and on gathered (sparse) ones; the same head on hidden states of other tokens does not."""
    image_id = 5
    input_ids = torch.tensor([[1, image_id, image_id, image_id, image_id, 2, 3],
                              [1, image_id, image_id, image_id, image_id, 2, 0]])
    regions = torch.tensor([0, 4, 8, 2, 1, 3, 5, 7])  # 4 visual tokens per row, in order
    hidden = torch.zeros(2, 7, 9)
    hidden[input_ids == image_id] = torch.nn.functional.one_hot(regions, 9).float()
    head = torch.nn.Linear(9, 9, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(9) * 50)
    assert float(train.position_loss(head, hidden, input_ids, image_id, regions)) < 1e-6
    order = torch.tensor([[0, 2, 4, 5], [0, 1, 3, 6]])  # the kept positions of each row, as sparse inputs gather
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    gathered = hidden.gather(1, order[..., None].expand(-1, -1, 9))
    assert float(train.position_loss(head, gathered, input_ids, image_id, regions, order, valid)) < 1e-6
    assert float(train.position_loss(head, hidden.roll(1, dims=1), input_ids, image_id, regions)) > 10


def test_training_with_the_position_loss_runs_sparse_and_whole_steps(trained):
    """``position_weight`` > 0: chat steps, sparse then whole, train the language model with the position head's
    loss on the side (the loss stays finite and the weights move)."""
    processor = load_processor(str(trained / "qwen2vl_target"))
    model = AutoModelForImageTextToText.from_pretrained(trained / "qwen2vl_target")
    before = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    spec = {"steps": 2, "batch": 2, "lr": 1e-3, "sparse_fraction": 0.5, "keep_background": 0.1,
            "position_weight": 0.5}
    info = train.train(model, train.Batcher(processor), spec, data_seed=0, name="target")
    assert info["steps"] == 2 and 0.0 < info["final_loss"] < float("inf")
    assert not torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight, before)


def test_the_target_card_says_whether_the_quality_bar_is_met():
    metrics = {"caption_fact_accuracy": 0.96, "detail_fact_accuracy": 0.95,
               "caption_invented_objects_per_scene": 0, "detail_invented_objects_per_scene": 0}
    assert "meets the quality bar" in " ".join(train.quality_bar(metrics))
    for key, value in (("detail_fact_accuracy", 0.7), ("caption_invented_objects_per_scene", 0.08)):
        verdict = " ".join(train.quality_bar({**metrics, key: value}))
        assert "is below the quality bar" in verdict and "meets" not in verdict
