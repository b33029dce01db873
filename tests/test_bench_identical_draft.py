"""benchmarks/bench_identical_draft.py at a small size: every policy's output identical to ar, and on a draft
identical to the target whose distributions are flat (HF's initialization) the default policy (drafting always)
accepts more tokens per step than the 5-token chain (tau is the machine-independent half of the report; the timing
is not asserted)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_identical_draft  # noqa: E402
from script_runs import run_main  # noqa: E402


def test_identical_draft_report(tmp_path):
    code = run_main(bench_identical_draft.main, ["--seeds", "1", "--new-tokens", "61", "--repeats", "1",
                                                 "--threads", "1", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "identical_draft_cpu.json").read_text())
    assert report["identical_to_ar"]
    assert [row["model"] for row in report["rows"]] == list(bench_identical_draft.MODELS)
    for row in report["rows"]:
        assert row["chain"]["tau"] == 5.0  # every chain token accepted (EOS off, 61 = 1 + 10 x 6 tokens: no step cut
        # short by max_new_tokens
        # more than the 5 a chain can give (the policy that always drafts: sage_cost's own mean counts its steps of
        # the target alone, 0 each, which it runs where its measured times say drafting does not pay)
        assert row["sage_cost_drafting"]["tau"] > row["chain"]["tau"], row
        assert all(row[name]["tokens_per_s"] > 0 and row[name]["over_chain"] > 0
                   for name in bench_identical_draft.POLICIES)
        assert row["chain"]["over_chain"] == 1.0
    assert "identical to ar: True" in (tmp_path / "identical_draft_cpu.md").read_text()


def test_contrary_draft_report(tmp_path):
    """``--draft contrary``: nothing is ever accepted, every output still identical to ar, and the report compares
    the policies with ar (the one to lose least against)."""
    code = run_main(bench_identical_draft.main, ["--draft", "contrary", "--seeds", "1", "--new-tokens", "24",
                                                 "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "contrary_draft_cpu.json").read_text())
    assert report["identical_to_ar"] and report["draft"] == "contrary"
    for row in report["rows"]:
        assert all(row[name]["tau"] == 0.0 for name in ("chain", "sage", "sage_cost")), row
        assert row["ar"]["over_ar"] == 1.0 and row["sage_cost"]["over_ar"] > 0
    assert "| sage_cost / ar |" in (tmp_path / "contrary_draft_cpu.md").read_text()
