"""benchmarks/e2e_margins.py on a synthetic e2e report whose costs are known: every column is what the numbers
given make it (the script only reads runs; timings are not asserted)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import e2e_margins  # noqa: E402


def entry(tokens_per_second, steps, draft_forwards, tree_size, draft_seconds, verify_seconds):
    return {"tokens_per_second": tokens_per_second, "steps": steps, "mean_draft_forwards": draft_forwards,
            "mean_tree_size": tree_size,
            "time_breakdown_seconds": {"draft_decode": draft_seconds, "target_verify": verify_seconds}}


def test_margins_of_a_known_run(tmp_path, capsys):
    policies = {"ar": entry(200.0, 100, 0.0, 0.0, 0.0, 0.4),  # a target forward: 4 ms
                "chain": entry(300.0, 20, 5.0, 5.0, 0.1, 0.1),  # a draft forward 1 ms, verify 5 ms
                "static": entry(250.0, 20, 5.0, 25.0, 0.1, 0.12),
                "dynamic": entry(310.0, 20, 6.0, 64.0, 0.12, 0.2),
                "sage-cost": entry(341.0, 10, 9.0, 10.0, 0.09, 0.06)}  # verify 6 ms for 5 more nodes
    (tmp_path / "e2e_t0.7_somebox.json").write_text(json.dumps({"policies": policies}))
    assert e2e_margins.main([str(tmp_path), "--machine", "somebox"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "e2e_t0.7" in line]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[2:] == ["200", "4.00", "1.00", "0.25", "5.00", "6.00 (10.0)", "5.0%", "1.137x", "1.100x"]
    assert e2e_margins.run_costs(policies)["node_share"] == pytest.approx(1.0 / 5 / 4.0)
