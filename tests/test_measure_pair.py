"""benchmarks/measure_pair.py on the bundled LLaVA pair at a small size: the alpha histogram counts every SAGE
step, pruning rows stay lossless, and the model-card section is replaced in place, not appended twice."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import measure_pair  # noqa: E402
from script_runs import run_main  # noqa: E402


def test_measure_pair_writes_a_consistent_report(tmp_path):
    code = run_main(measure_pair.main, ["--pair", "llava", "--scenes", "1", "--ratios", "0,0.5",
                                        "--max-new-tokens", "24", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads(next(tmp_path.glob("pair_llava_*.json")).read_text())
    alpha = report["alpha"]
    assert sum(h["steps"] for h in alpha["histogram"]) == alpha["steps"] == report["pruning"][0]["steps"]
    assert [r["ratio"] for r in report["pruning"]] == [0.0, 0.5]
    assert all(r["identical_to_ar"] for r in report["pruning"])
    assert report["visual_tokens_per_prompt"] == [16]


def test_card_section_is_replaced_in_place(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# card\n\nintro\n\n## Training\n\nstuff\n")
    measure_pair.write_card_section(card, measure_pair.CARD_HEADING + "\n\nfirst\n")
    measure_pair.write_card_section(card, measure_pair.CARD_HEADING + "\n\nsecond\n")
    text = card.read_text()
    assert text.count(measure_pair.CARD_HEADING) == 1 and "second" in text and "first" not in text
    assert text.startswith("# card\n\nintro\n\n## Training\n\nstuff\n")
