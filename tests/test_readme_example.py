"""The README's examples run as printed and are lossless against HF greedy.

- examples/own_loop.py (the ops inside your own decoding loop, text-only) on tiny Llamas;
- examples/generate_image.py (the high-level API: image + prompt, `sage_ext.generate`, `sage_ext.stream`) on the
  bundled fixture pair, run as a script;
- the README's block that continues the high-level example (a reused SpeculativeGenerator with transformers'
  TextStreamer, and transformers' `generate(custom_generate=...)`) runs in the example's namespace;
- the README's code blocks are the examples' text, so the two cannot drift apart.
"""
import re
import runpy
import sys
from pathlib import Path

import torch

from tiny_models import contrary_draft, one_thread, same_draft, tiny_llama  # noqa: F401  (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from own_loop import speculative_greedy  # noqa: E402


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_own_loop_matches_target_generate():
    target, inputs = tiny_llama(seed=0)
    prompt = inputs["input_ids"]
    expected = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    for draft in (same_draft(target), contrary_draft(target), tiny_llama(seed=1, small=True)[0]):
        assert torch.equal(speculative_greedy(target, draft, prompt, max_new_tokens=20), expected)


def test_readme_code_blocks_are_the_example_files():
    blocks = python_blocks((ROOT / "README.md").read_text())
    high_level = (EXAMPLES / "generate_image.py").read_text()
    assert high_level in blocks, "README.md must show examples/generate_image.py verbatim"
    own_loop = (EXAMPLES / "own_loop.py").read_text()
    code = own_loop[own_loop.index('"""', 3) + 3:].lstrip("\n")  # the file without its docstring
    assert code in blocks, "README.md must show examples/own_loop.py (after its docstring) verbatim"
    assert blocks.index(high_level) < blocks.index(code), "the high-level example comes first"


def test_generate_image_example_prints_the_target_greedy_caption(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / "generate_image.py")])
    names = runpy.run_path(str(EXAMPLES / "generate_image.py"), run_name="__main__")
    target, inputs, processor = names["target"], names["inputs"], names["processor"]
    with torch.inference_mode():
        expected = target.generate(**inputs, max_new_tokens=96, do_sample=False)
    assert torch.equal(names["sequences"], expected)
    caption = processor.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert caption.startswith("The image shows")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == caption  # sage_ext.generate's text
    assert lines[-1] == caption  # the streamed pieces, concatenated
    assert "target forwards" in lines[1] and names["stats"].target_forwards < names["stats"].new_tokens

    # the README block after the example continues it: TextStreamer, custom_generate
    blocks = python_blocks((ROOT / "README.md").read_text())
    continuation = blocks[blocks.index((EXAMPLES / "generate_image.py").read_text()) + 1]
    assert "custom_generate_path()" in continuation
    exec(compile(continuation, "README.md (continuation)", "exec"), names)
    assert torch.equal(names["out"], expected) and torch.equal(names["sequences"], expected)
    assert capsys.readouterr().out.strip() == caption  # TextStreamer's output
