"""benchmarks/bench_cost_ratio.py at a small size on the Qwen2-VL pair: every policy's output identical to ar at
every simulated ratio, sage_cost's priced step times checked against the formula inside the script, and the report
named and labelled by its pair."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cost_ratio  # noqa: E402
from script_runs import run_main  # noqa: E402


def test_cost_ratio_study_on_the_qwen2vl_pair(tmp_path):
    code = run_main(bench_cost_ratio.main, ["--pair", "qwen2vl", "--scenes", "1", "--ratios", "0.1,0.8",
                                            "--max-new-tokens", "24", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "cost_ratio_qwen2vl_cpu.json").read_text())
    assert report["pair"] == "qwen2vl" and report["draft_prune_ratio"] == 0.5
    assert all(report["identical_to_ar"].values()) and set(report["identical_to_ar"]) >= {"sage_cost@0.1",
                                                                                          "sage_cost@0.8"}
    assert set(report["speedup_vs_ar"]) == {"ar", "chain", "static", "dynamic", "sage", "sage_cost"}
    assert all(row["0.1"] > 0 and row["0.8"] > 0 for row in report["speedup_vs_ar"].values())
    assert (tmp_path / "cost_ratio_qwen2vl_cpu.png").stat().st_size > 0
    assert "qwen2vl fixture pair" in (tmp_path / "cost_ratio_qwen2vl_cpu.md").read_text()


def test_cost_ratio_study_with_the_target_drafting_for_itself(tmp_path):
    """--draft-is-target: the draft is a copy of the target seeing the whole image, so a greedy chain's every token is
    accepted and the chain gains even where a draft forward costs half a verify; outputs identical to ar."""
    code = run_main(bench_cost_ratio.main, ["--draft-is-target", "--scenes", "1", "--ratios", "0.5",
                                            "--max-new-tokens", "24", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "cost_ratio_self_draft_cpu.json").read_text())
    assert report["draft_is_target"] and report["draft_prune_ratio"] == 0.0
    assert all(report["identical_to_ar"].values())
    assert report["speedup_vs_ar"]["chain"]["0.5"] > 1.0  # 5 draft tokens accepted whenever the answer goes on
