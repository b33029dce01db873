"""Every python code block of docs/ENGINE.md is a complete program: each runs as written, in a fresh namespace.

The blocks load the bundled fixture pair themselves and assert their own claims (greedy output equal to
`target.generate`, streamed text equal to the decoded output); this test also checks what they print.
"""
import re
from pathlib import Path

import pytest

from tiny_models import one_thread  # noqa: F401  (autouse: one intra-op thread)

ENGINE_MD = Path(__file__).resolve().parents[1] / "docs" / "ENGINE.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", ENGINE_MD.read_text(), flags=re.S | re.M)


def test_engine_md_has_its_snippets():
    assert len(BLOCKS) >= 3
    assert any("custom_generate_path()" in block for block in BLOCKS)
    assert any(".stream(" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_engine_md_block_runs(index, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__main__"}
    exec(compile(BLOCKS[index], f"{ENGINE_MD}:python block {index + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "tau " in out or " pieces: " in out
    if "processor" in namespace and "sequences" in namespace:  # a block that decodes: it printed the caption
        assert "The image shows" in out
