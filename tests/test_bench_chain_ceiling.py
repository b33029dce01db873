"""benchmarks/bench_chain_ceiling.py on one bundled scene: the replay is checked against the engine (the 5-token
chain replayed from the draft's predictions takes exactly the steps the engine's chain took), and the oracle,
which drafts exactly the tokens the target accepts, needs the fewest steps (timings are not asserted)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_chain_ceiling  # noqa: E402
from script_runs import run_main  # noqa: E402


def test_chain_ceiling_report(tmp_path):
    code = run_main(bench_chain_ceiling.main, ["--scenes", "2", "--scene-offset", "200", "--threads", "1",
                                               "--out-dir", str(tmp_path)])
    assert code == 0
    [report_file] = tmp_path.glob("chain_ceiling_*.json")
    report = json.loads(report_file.read_text())
    results = report["results"]
    assert results["chain 5"]["steps"] == report["engine_chain_steps"] > 0
    assert results["chain 5"]["speedup_over_chain5"] == 1.0
    assert results["oracle"]["steps"] <= min(row["steps"] for row in results.values())
    assert all(row["seconds"] > 0 for row in results.values())
    assert "| oracle |" in report_file.with_suffix(".md").read_text()
    # the rules on each token's own probability are replayed too
    assert {f"p >= {t}" for t in bench_chain_ceiling.TOKEN_THRESHOLDS} <= set(results)
