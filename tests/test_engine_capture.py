"""Captured draft forwards (``SpeculativeGenerator(capture_draft=True)``, ``sage_ext.engine.capture``).

The draft's tree forwards run compiled (``torch.compile``, static shapes: a static draft cache, rows padded to a
power of two). Checked here, fp32, tiny random models, on the CPU (inductor):

* for every family of tests/test_batch_split.py (causal LMs, LLaVA, LLaVA-NeXT / -OneVision, Qwen2-VL / 2.5-VL /
  3-VL with M-RoPE, images and videos, Idefics3, SmolVLM, Gemma 2 / 3 with sliding windows, PaliGemma, Phi-3,
  GPT-2): a batch of prompts decodes each row exactly as ``target.generate`` on that row alone;
* both caches after every step equal a recomputation (the static draft cache's padding columns are never read);
* a second generation, also by another generator of the same models, reuses the captured shapes (no new
  compile), and their number stays small;
* bad arguments, a draft split over devices and misplanned writes are refused.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from test_batch_split import CASES, assemble
from test_engine import POLICIES, hf_greedy
from test_engine_batch import FILL, check_rows
from test_engine_kv import MAX_NEW as KV_MAX_NEW
from test_engine_kv import run_with_cache_checks
from tiny_models import all_family_builders, correlated_draft, one_thread  # noqa: F401  (one_thread: autouse)

import sage_ext
from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.caches import RowCache, static_width
from sage_ext.engine.capture import padded_rows

MAX_NEW = 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles its own variants: dynamo's per-function limit counts from zero (past it, new shapes
    would run eager and the test would not check the captured path)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(CASES))
def test_captured_draft_batch_equals_target_generate_alone(name):
    model, rows, layout = CASES[name]()
    batch = assemble(rows, **layout)
    expected = [hf_greedy(model, row, max_new_tokens=MAX_NEW)[0, row["input_ids"].shape[1]:] for row in rows]
    draft = correlated_draft(model, noise=0.1)
    generator = SpeculativeGenerator(model, draft, POLICIES["sage"](), capture_draft=True)
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, pad_token_id=FILL)
    check_rows(out, batch, expected)
    assert generator.draft_cache.static
    assert max(stats.mean_tau for stats in out.stats) > 0  # the captured draft's proposals were accepted
    assert generator._captured["cpu"]._shapes  # the draft's forwards went through the captured path


@pytest.mark.parametrize("policy", ["chain", "static", "dynamic", "sage_zero_lag_static_shapes", "sage_cost"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_captured_draft_caches_match_recomputation(family, policy):
    target, inputs = all_family_builders()[family]()
    draft = correlated_draft(target, noise=0.1)
    reference = hf_greedy(target, inputs, max_new_tokens=KV_MAX_NEW)
    out, taus = run_with_cache_checks(target, draft, inputs, POLICIES[policy](), capture_draft=True)
    assert torch.equal(out.sequences, reference)
    assert max(taus) > 0


def test_captured_shapes_are_few_and_reused():
    target, inputs = all_family_builders()["llava"]()
    draft = correlated_draft(target, noise=0.1)
    generator = SpeculativeGenerator(target, draft, "sage", capture_draft=True)
    first = generator.generate(**inputs, max_new_tokens=20)
    shapes = set(generator._captured["cpu"]._shapes)
    graphs = counters["stats"]["unique_graphs"]
    # one shape per padded row count (1, 2, 4, ... up to the tree's room): never one per cache length
    assert 1 <= len(shapes) <= padded_rows(generator.policy.capacity).bit_length()
    second = generator.generate(**inputs, max_new_tokens=20)
    assert generator._captured["cpu"]._shapes == shapes
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    assert torch.equal(first.sequences, second.sequences)
    # another generator of the same models (the one-call API makes one per call) reuses the compiled variants
    again, _ = sage_ext.generate(target, draft, "sage", **inputs, max_new_tokens=20, capture_draft=True)
    assert torch.equal(again, first.sequences)
    assert counters["stats"]["unique_graphs"] == graphs


def test_capture_draft_must_be_a_bool():
    target, _ = all_family_builders()["llama"]()
    with pytest.raises(ValueError, match="capture_draft must be True or False"):
        SpeculativeGenerator(target, correlated_draft(target, noise=0.1), "sage", capture_draft="yes")


def test_capture_draft_refuses_a_draft_split_over_devices():
    target, _ = all_family_builders()["llama"]()
    draft = correlated_draft(target, noise=0.1)
    draft.lm_head.to("meta")  # a second device, as a device_map would spread the draft
    with pytest.raises(ValueError, match="capture_draft needs the draft on one device"):
        SpeculativeGenerator(target, draft, "sage", capture_draft=True)


def test_static_cache_planning():
    assert padded_rows(1) == 1 and padded_rows(5) == 8 and padded_rows(64) == 64
    assert static_width(10) == 256 and static_width(300) == 512 and static_width(512) == 512
    cache = RowCache(2, capacity=300, static_room=16)
    assert cache.static and cache.allocated == 512
    cache.plan_static_writes([290, 100], 16, torch.device("cpu"))
    rows, columns = cache.static_index
    assert rows.tolist() == [[0], [1]] and columns[0].tolist() == list(range(290, 306))
    with pytest.raises(RuntimeError, match="exceeds the static width 512"):
        cache.plan_static_writes([500, 0], 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="1 offsets for 2 rows"):
        cache.plan_static_writes([0], 4, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="without static buffers"):
        RowCache(1, capacity=300).plan_static_writes([0], 4, torch.device("cpu"))
