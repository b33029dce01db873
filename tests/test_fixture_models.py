"""The bundled trained fixture pair (sage_ext/fixtures/{target,draft}): loads offline through the Auto
classes, is a real LLaVA pair (target ~8x the draft, shared tokenizer/processor), and the target's greedy
captions of held-out scenes are right (real model, real check)."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from sage_ext.fixtures import DRAFT_DIR, FIXTURES_DIR, TARGET_DIR, scenes  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    processor = AutoProcessor.from_pretrained(TARGET_DIR)
    target = AutoModelForImageTextToText.from_pretrained(TARGET_DIR).eval()
    draft = AutoModelForImageTextToText.from_pretrained(DRAFT_DIR).eval()
    return target, draft, processor


def test_pair_loads_offline_as_llava_float32(pair):
    target, draft, processor = pair
    for model in (target, draft):
        assert type(model).__name__ == "LlavaForConditionalGeneration"
        assert model.dtype == torch.float32  # fp16 on disk, float32 compute by the config
        assert model.config.vision_config.model_type == "clip_vision_model"
        assert model.config.text_config.model_type == "llama"
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert 5e6 <= n_target <= 20e6
    assert n_target > 5 * n_draft
    assert target.config.text_config.vocab_size == draft.config.text_config.vocab_size == len(processor.tokenizer)
    assert type(processor.image_processor).__name__.endswith("Pil")  # works without torchvision
    on_disk = sum(f.stat().st_size for d in (TARGET_DIR, DRAFT_DIR) for f in d.iterdir())
    assert on_disk <= 30 * 2**20


def test_processor_expands_one_token_per_grid_cell(pair):
    _, _, processor = pair
    inputs = processor(text=scenes.caption_prompt(), images=scenes.heldout_scenes(1)[0].render(), return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == scenes.GRID * scenes.GRID
    assert inputs["pixel_values"].shape == (1, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert processor.tokenizer.decode(inputs["input_ids"][0]).endswith("Describe the image in detail.\n")


# Issue 4's quality bar: target greedy captions right on >= 90% of held-out attributes, draft 5-10x smaller.


def test_draft_is_5_to_10x_smaller(pair):
    target, draft, _ = pair
    ratio = sum(p.numel() for p in target.parameters()) / sum(p.numel() for p in draft.parameters())
    assert 5 <= ratio <= 10


def test_target_greedy_captions_of_heldout_scenes_are_right(pair):
    target, _, processor = pair
    correct = total = 0
    for scene in scenes.heldout_scenes(4, start=200):
        inputs = processor(text=scenes.caption_prompt(), images=scene.render(), return_tensors="pt")
        with torch.inference_mode():
            out = target.generate(**inputs, max_new_tokens=96, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        score = scenes.score_caption(scene, text)
        assert score["hallucinated"] == 0, text
        correct, total = correct + score["correct"], total + score["total"]
    assert correct / total >= 0.9


def test_target_meets_the_attribute_bar():
    summary = json.loads((FIXTURES_DIR / "training_summary.json").read_text())
    assert summary["target"]["attribute_accuracy"] >= 0.9


def test_model_cards_hold_the_measured_quality():
    summary = json.loads((FIXTURES_DIR / "training_summary.json").read_text())
    assert summary["draft"]["attribute_accuracy"] < summary["target"]["attribute_accuracy"]
    assert 0 < summary["draft"]["greedy_token_agreement_with_target"] < 1
    for role in ("target", "draft"):
        card = (FIXTURES_DIR / role / "README.md").read_text()
        assert f"| attribute_accuracy | {summary[role]['attribute_accuracy']} |" in card
