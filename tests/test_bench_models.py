"""benchmarks/random_models.py builds the same models and inputs as the tests' tiny builders it mirrors, so engine
benchmark results stay comparable although the benchmarks no longer import from tests/."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import random_models  # noqa: E402
import tiny_models  # noqa: E402
import tiny_vlms  # noqa: E402


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.config.to_dict() == b.config.to_dict()
    ours, theirs = a.state_dict(), b.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def assert_same_inputs(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tiny_llama_prompts_and_draft_match_the_tests():
    target = random_models.tiny_llama()
    expected, _ = tiny_models.tiny_llama()
    assert_same_weights(target, expected)
    assert_same_weights(random_models.correlated_draft(target), tiny_models.correlated_draft(expected))
    for length, seed in ((12, 0), (12, 101), (24, 2)):
        assert_same_inputs(random_models.text_prompt(length, seed), tiny_models.text_prompt(length, seed))


def test_tiny_qwen2_vl_and_its_inputs_match_the_tests():
    target = random_models.tiny_qwen2_vl()
    expected, _ = tiny_vlms.tiny_qwen2_vl()
    assert_same_weights(target, expected)
    for seed in (0, 100):
        assert_same_inputs(random_models.qwen2_vl_inputs(target, (1, 12, 16), seed, 12),
                           tiny_vlms._qwen_inputs(expected, (1, 12, 16), seed, 12))
