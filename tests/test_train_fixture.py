"""benchmarks/train_fixture.py end to end at a few steps: it trains, evaluates and saves a pair that loads
offline and that the engine decodes losslessly (the committed fixture was made by the same code at full
length; `--size large` is the same path with bigger models, meant for a GPU)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import sage_ext  # noqa: E402
from sage_ext.fixtures import scenes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_fixture  # noqa: E402
from script_runs import run_main  # noqa: E402


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_few_training_steps_give_a_loadable_pair_the_engine_decodes_losslessly(tmp_path, size):
    assert run_main(train_fixture.main, ["--size", size, "--out-dir", str(tmp_path), "--device", "cpu",
                                         "--target-steps", "2", "--draft-steps", "2", "--eval-scenes", "2"]) == 0
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["size"] == size and summary["target"]["steps"] == 2
    assert 5 * summary["draft"]["params"] < summary["target"]["params"] < 10 * summary["draft"]["params"]
    for role in ("target", "draft"):
        card = (tmp_path / role / "README.md").read_text()
        assert f"| attribute_accuracy | {summary[role]['attribute_accuracy']} |" in card
        assert (tmp_path / role / "model.safetensors").exists() and (tmp_path / role / "tokenizer.json").exists()

    processor = AutoProcessor.from_pretrained(tmp_path / "target")
    target = AutoModelForImageTextToText.from_pretrained(tmp_path / "target").eval()
    draft = AutoModelForImageTextToText.from_pretrained(tmp_path / "draft").eval()
    assert target.dtype == torch.float32
    scene = scenes.heldout_scenes(1, start=77)[0]
    inputs = processor(text=scenes.caption_prompt(), images=scene.render(), return_tensors="pt")
    with torch.inference_mode():
        expected = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    out = sage_ext.generate(target, draft, "sage", **inputs, max_new_tokens=12)
    assert torch.equal(out.sequences, expected)
