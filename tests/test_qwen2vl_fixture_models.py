"""The bundled Qwen2-VL fixture pair (sage_ext/fixtures/qwen2vl_{target,draft}): loads offline through the Auto
classes as the HF Qwen2-VL class with padded vocabularies of different sizes, its processor round-trips the
photo scenes (non-square grids, at least 256 visual tokens), and on held-out scenes every policy's greedy output
equals ``target.generate`` in float32, with the draft's visual tokens pruned and not."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForImageTextToText  # noqa: E402

from sage_ext.engine import SpeculativeGenerator  # noqa: E402
from sage_ext.engine.policies import POLICIES  # noqa: E402
from sage_ext.fixtures import FIXTURES_DIR, PAIRS, QWEN2VL_DRAFT_DIR, QWEN2VL_TARGET_DIR  # noqa: E402
from sage_ext.fixtures import photo_scenes as ps  # noqa: E402
from sage_ext.processors import load_processor  # noqa: E402

PAIR = PAIRS["qwen2vl"]
MAX_NEW = 48


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    processor = load_processor(str(QWEN2VL_TARGET_DIR), local_files_only=True)
    target = AutoModelForImageTextToText.from_pretrained(QWEN2VL_TARGET_DIR).eval()
    draft = AutoModelForImageTextToText.from_pretrained(QWEN2VL_DRAFT_DIR).eval()
    return target, draft, processor


def test_pair_loads_offline_as_qwen2vl_float32_with_padded_vocabularies(pair):
    target, draft, processor = pair
    for model in (target, draft):
        assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
        assert model.dtype == torch.float32  # fp16 on disk, float32 compute by the config
    tokens = len(processor.tokenizer)
    target_vocab, draft_vocab = target.config.text_config.vocab_size, draft.config.text_config.vocab_size
    assert tokens < target_vocab < draft_vocab and draft_vocab % 128 == 0  # the padded-vocab path runs
    assert target.get_output_embeddings().weight.shape[0] == target_vocab
    ratio = sum(p.numel() for p in target.parameters()) / sum(p.numel() for p in draft.parameters())
    assert 5 <= ratio <= 10
    on_disk = sum(f.stat().st_size for d in (QWEN2VL_TARGET_DIR, QWEN2VL_DRAFT_DIR) for f in d.iterdir())
    assert on_disk <= 40 * 2**20


def test_processor_round_trips_every_image_size(pair):
    _, _, processor = pair
    prompt = PAIR.prompt_text(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grids = set()
    for width, height in ps.IMAGE_SIZES:
        scene = ps.generate_scene(ps.HELDOUT_SEED_BASE + 7, size=(width, height))
        inputs = processor(text=prompt, images=scene.render(), return_tensors="pt")
        t, h, w = inputs["image_grid_thw"][0].tolist()
        merge = processor.image_processor.merge_size
        visual_tokens = int((inputs["input_ids"] == image_id).sum())
        assert visual_tokens == t * h * w // merge**2 >= 256
        assert (h * processor.image_processor.patch_size, w * processor.image_processor.patch_size) == (height, width)
        grids.add((h, w))
        text = processor.tokenizer.decode(inputs["input_ids"][0])
        assert text.replace("<|image_pad|>" * visual_tokens, "<|image_pad|>") == prompt
    assert any(h != w for h, w in grids)


@pytest.fixture(scope="module")
def heldout(pair):
    """(inputs, target-only greedy output) of two held-out scenes."""
    target, _, processor = pair
    rows = []
    for scene in PAIR.heldout_scenes(2, start=40):
        inputs = processor(text=PAIR.prompt_text(processor), images=scene.render(), return_tensors="pt")
        with torch.no_grad():
            rows.append((inputs, target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)))
    return rows


@pytest.mark.parametrize("prune", [0.0, 0.8])
@pytest.mark.parametrize("policy", [name for name in POLICIES if name != "ar"])
def test_every_policy_decodes_heldout_scenes_as_the_target_does(pair, heldout, policy, prune):
    target, draft, _ = pair
    generator = SpeculativeGenerator(target, draft, policy, draft_prune_ratio=prune)
    for inputs, reference in heldout:
        out = generator.generate(**inputs, max_new_tokens=MAX_NEW)
        assert torch.equal(out.sequences, reference), policy
        assert out.stats.mean_tau > 0  # the trained draft is right some of the time


def test_model_cards_hold_the_measured_quality():
    summary = json.loads((FIXTURES_DIR / "qwen2vl_training_summary.json").read_text())
    for role, folder in (("target", QWEN2VL_TARGET_DIR), ("draft", QWEN2VL_DRAFT_DIR)):
        card = (folder / "README.md").read_text()
        for metric in ("caption_fact_accuracy", "detail_fact_accuracy"):
            assert f"| {metric} | {summary[role][metric]} |" in card
    assert summary["draft"]["detail_fact_accuracy"] < summary["target"]["detail_fact_accuracy"]
    assert 0 < summary["draft"]["greedy_token_agreement_with_target"] < 1
