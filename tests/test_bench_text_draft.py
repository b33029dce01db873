"""benchmarks/bench_text_draft.py at a small size: both pairs, every output identical to target-only decoding, the
text draft built from the bundled draft's language model with its weights unchanged (its proposals accepted:
tau > 0), the report written (timings are not asserted)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_text_draft  # noqa: E402
from script_runs import run_main  # noqa: E402


def test_text_draft_report(tmp_path):
    code = run_main(bench_text_draft.main, ["--scenes", "1", "--rounds", "1", "--max-new-tokens", "24",
                                            "--policies", "chain", "sage", "--threads", "1", "--out", str(tmp_path),
                                            "--name", "report"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [result["pair"] for result in report["pairs"]] == ["llava", "qwen2vl"]
    for result in report["pairs"]:
        assert all(result["identical_to_ar"].values()), result["identical_to_ar"]
        assert result["text_draft_parameters"] < result["draft_parameters"]  # the vision tower left out
        for policy in ("chain", "sage"):
            assert result["summary"][f"{policy}/text draft"]["tau"] > 0
    assert "| sage |" in (tmp_path / "report.md").read_text()


def test_the_language_model_is_the_drafts_own():
    """The text draft predicts what the vision-language draft's decoder does for a text-only prompt."""
    from sage_ext.cli.models import load_model
    from sage_ext.fixtures import PAIRS

    for pair in PAIRS.values():
        vlm = load_model(str(pair.draft_dir), torch.device("cpu"), torch.float32)
        text = bench_text_draft.language_model_of(vlm)
        ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
        with torch.no_grad():
            torch.testing.assert_close(text(input_ids=ids).logits, vlm(input_ids=ids).logits)
