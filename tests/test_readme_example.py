"""The README's own-decoding-loop example (examples/own_loop.py) is lossless against HF greedy."""
import sys
from pathlib import Path

import torch

from tiny_models import contrary_draft, one_thread, same_draft, tiny_llama  # noqa: F401  (one_thread: autouse)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from own_loop import speculative_greedy  # noqa: E402


def test_own_loop_matches_target_generate():
    target, inputs = tiny_llama(seed=0)
    prompt = inputs["input_ids"]
    expected = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    for draft in (same_draft(target), contrary_draft(target), tiny_llama(seed=1, small=True)[0]):
        assert torch.equal(speculative_greedy(target, draft, prompt, max_new_tokens=20), expected)
