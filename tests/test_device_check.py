"""scripts/device_check.sh without a GPU: its CPU dry run (DEVICE_CHECK_DEVICE=cpu) into a temporary folder.

Checked: summary.md and summary.json list every stage with a status; a stage given a tiny timeout
(DEVICE_CHECK_TIMEOUT_<stage>) is stopped and reported as such while the stages after it still run and pass;
stages left out with DEVICE_CHECK_STAGES are listed as not selected; each stage that ran left its log, and the
op benchmark and the end-to-end bench their results. The slow stages (pytest runs of whole test files) are
left out to keep this under a minute on two cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"
STAGES = ["env", "build", "tests_ops", "memcheck", "racecheck", "bench_ops", "tests_engine", "tests_devices",
          "memcheck_engine", "e2e", "tests_capture"]
SELECTED = ["env", "build", "memcheck", "racecheck", "bench_ops", "tests_engine", "e2e"]
OVERRUN = "tests_engine"  # collection alone takes several seconds: a 1 s limit stops it


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("timeout") is None or shutil.which("bash") is None:
        pytest.fail("scripts/device_check.sh needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("device_check")
    env = dict(os.environ, DEVICE_CHECK_DEVICE="cpu", DEVICE_CHECK_STAGES=",".join(SELECTED),
               **{f"DEVICE_CHECK_TIMEOUT_{OVERRUN}": "1"}, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    return run, out


def summary_rows(out: Path) -> dict[str, dict]:
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = dict(status=cells[1], seconds=cells[2], timeout=cells[3], detail=cells[4])
    return rows


def test_every_stage_listed_with_a_status(dry_run):
    run, out = dry_run
    rows = summary_rows(out)
    assert list(rows) == STAGES, run.stdout[-2000:]
    for name, row in rows.items():
        assert row["status"] and row["status"] != "not run yet", (name, row)
    as_json = json.loads((out / "summary.json").read_text())
    assert [stage["stage"] for stage in as_json["stages"]] == STAGES
    assert as_json["mode"] == "cpu"


def test_overrunning_stage_is_stopped_and_later_stages_run(dry_run):
    run, out = dry_run
    rows = summary_rows(out)
    assert rows[OVERRUN]["status"].startswith("TIMEOUT"), rows[OVERRUN]
    assert rows[OVERRUN]["timeout"] == "1"
    assert run.returncode == 1  # a stage overran: the script says so in its exit status
    later = SELECTED[SELECTED.index(OVERRUN) + 1:]
    assert later, "the overrunning stage must not be the last one selected"
    for name in later:
        assert rows[name]["status"] == "pass", (name, rows[name], (out / f"{name}.log").read_text()[-1500:])


def test_selected_stages_pass_and_leave_their_outputs(dry_run):
    _, out = dry_run
    rows = summary_rows(out)
    for name in SELECTED:
        assert (out / f"{name}.log").is_file(), name
        if name != OVERRUN:
            assert rows[name]["status"] in ("pass", "pass (dry run)"), (name, rows[name],
                                                                       (out / f"{name}.log").read_text()[-1500:])
    for name in set(STAGES) - set(SELECTED):
        assert rows[name]["status"] == "skipped (not selected)"
    # the dry sanitizer stages called the ops (42 calls: 21 per dtype), the op bench wrote its table
    assert re.search(r'"calls": 42\b', rows["memcheck"]["detail"]), rows["memcheck"]
    bench = json.loads(next((out / "bench_ops").glob("ops_*.json")).read_text())
    ops_timed = {row["op"] for row in bench["results"]}
    assert {"topk_confidence", "sage_level_", "commit_tree_", "per-step bundle"} <= ops_timed
    assert all(row["B"] in (1, None) and row["V"] in (152064, None) for row in bench["results"])
    e2e = json.loads(next((out / "e2e").glob("e2e_*.json")).read_text())
    assert e2e["checks"]["all_greedy_outputs_identical_to_ar"] is True
