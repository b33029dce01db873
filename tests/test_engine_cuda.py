"""The engine on CUDA, with the tiny models of tests/tiny_models.py and tests/tiny_vlms.py in float32:

- greedy identity: every family x every policy gives exactly ``target.generate(do_sample=False)`` on the GPU;
- KV caches: after every step both caches equal a recomputation (the check of tests/test_engine_kv.py);
- one host-device sync per step: every sync of a whole generation is counted (through torch's GPU trace, in a
  child process since that trace stays on for the process's life), and each step after the first has exactly
  one, the commit's readback; SAGE with ``static_shapes=False`` may add at most one per level;
- CPU and CUDA build the same trees step by step, from the same models;
- sampling with a CUDA and with a CPU ``torch.Generator``: seeded runs repeat, the tokens follow the target's
  distribution (chi-square, as tests/test_engine_sampling.py);
- batches: every row of a batch (different lengths and media) equals ``target.generate`` on that row alone;
- the repetition penalty and minimum lengths per tree node (greedy and top-k-1 sampling), with no extra sync;
- the captured draft (``capture_draft=True``: CUDA graphs): batch rows and caches as above;
- the CUDA-event timeline: statistics consistent (tests/test_engine_stats.py's checks), GPU time booked where
  it ran.

Skipped without a GPU; on a GPU machine whose build lacks the CUDA kernels every test fails with how to build
them (tests/cuda_helpers.py). Run as a script (``python tests/test_engine_cuda.py --count-syncs``) it is the
sync counter's child process and prints its counts as JSON.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

import pytest
import torch
from cuda_helpers import BUILD_HINT, CUDA, cuda_kernels_required, needs_gpu  # noqa: F401  (autouse fixture)
from test_engine import MAX_NEW, POLICIES, hf_greedy
from test_engine_kv import run_with_cache_checks
from test_engine_sampling import P_PASS, SETTINGS, chi_square_p, exact_marginals, hf_warper
from test_engine_stats import check_stats
from tiny_models import all_family_builders, correlated_draft, one_thread, tiny_llama  # noqa: F401  (autouse)

from sage_ext import ops
from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.policies import CostAwareSagePolicy, SagePolicy

pytestmark = needs_gpu

BUILDERS = all_family_builders()
#: the policies of the sync count: POLICIES (SAGE takes static shapes on CUDA by default) and SAGE with
#: data-dependent level sizes, which reads each level's size on the host
SYNC_POLICIES = {**POLICIES, "sage_dynamic_shapes": lambda: SagePolicy(static_shapes=False),
                 "sage_cost_dynamic_shapes": lambda: CostAwareSagePolicy(static_shapes=False),
                 "sage_processed": SagePolicy}
#: generate settings of a sync-count entry beside max_new_tokens: the target's scores processed per node
#: (engine/processing.py) must add no sync
SYNC_SETTINGS = {"sage_processed": {"repetition_penalty": 1.3, "min_new_tokens": 4}}
TREE_POLICIES = ["chain", "static", "dynamic", "sage", "sage_zero_lag"]
SAMPLING_RUNS = 1000


def to_cuda(inputs: dict) -> dict:
    return {key: value.to(CUDA) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def build(name: str) -> SimpleNamespace:
    """A family's target, its correlated draft and its inputs, on the CPU (``cpu_*``) and as copies on CUDA.
    Built on the CPU (the builders' seeded weights and noise are CPU draws), then copied."""
    target, inputs = BUILDERS[name]()
    draft = correlated_draft(target, noise=0.1)
    return SimpleNamespace(name=name, cpu_target=target, cpu_draft=draft, cpu_inputs=inputs,
                           target=copy.deepcopy(target).to(CUDA), draft=copy.deepcopy(draft).to(CUDA),
                           inputs=to_cuda(inputs))


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    models = build(request.param)
    models.reference = hf_greedy(models.target, models.inputs, max_new_tokens=MAX_NEW)
    assert models.reference.device.type == "cuda"
    return models


# --------------------------------------------------------------------------------------------
# greedy identity and KV caches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_equals_target_generate(family, policy):
    out = SpeculativeGenerator(family.target, family.draft, POLICIES[policy]()).generate(
        **family.inputs, max_new_tokens=MAX_NEW)
    assert out.sequences.device.type == "cuda"
    assert torch.equal(out.sequences, family.reference)
    assert out.stats.new_tokens == MAX_NEW
    if policy != "ar":
        assert max(step.tau for step in out.stats.steps) > 0, "the correlated draft should get tokens accepted"


def test_dynamic_shape_chains_on_cuda(family):
    """sage_cost with dynamic shapes on CUDA: its chain steps (the first rounds of trials run some) keep each level's
    cumulative log-prob and read its mass on the device (``static_level``'s device path), which the policy learns
    from and stops by; greedy output equal to target.generate's."""
    policy = CostAwareSagePolicy(static_shapes=False)
    out = SpeculativeGenerator(family.target, family.draft, policy).generate(**family.inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, family.reference)
    proposals = policy.learned.proposals
    assert proposals.chain_steps > 0 and proposals.chain_masses.steps > 0


@pytest.mark.parametrize("policy", list(POLICIES))
def test_caches_match_recomputation_after_every_step(family, policy):
    _, taus = run_with_cache_checks(family.target, family.draft, family.inputs, POLICIES[policy]())
    if policy != "ar":
        assert max(taus) > 0


@pytest.mark.parametrize("policy", ["ar", "chain", "dynamic", "sage"])
@pytest.mark.parametrize("name", ["llama", "llava", "qwen2_vl", "qwen2_5_vl-video", "idefics3", "gemma3"])
def test_batch_rows_equal_target_generate_alone(name, policy):
    """tests/test_engine_batch.py's check on CUDA: a batch of prompts of different lengths and media, each row's
    new tokens equal to ``target.generate`` on that row alone (on the GPU)."""
    from test_batch_split import CASES, assemble
    from test_engine_batch import MAX_NEW as BATCH_NEW

    model, rows, layout = CASES[name]()
    draft = correlated_draft(model, noise=0.1)
    target, draft = copy.deepcopy(model).to(CUDA), copy.deepcopy(draft).to(CUDA)
    rows = [to_cuda(row) for row in rows]
    batch = to_cuda(assemble([{key: value.cpu() for key, value in row.items()} for row in rows], **layout))
    out = SpeculativeGenerator(target, draft if policy != "ar" else None, POLICIES[policy]()).generate(
        **batch, max_new_tokens=BATCH_NEW, pad_token_id=1)
    width = batch["input_ids"].shape[1]
    for index, row in enumerate(rows):
        expected = hf_greedy(target, row, max_new_tokens=BATCH_NEW)[0, row["input_ids"].shape[1]:]
        assert torch.equal(out.sequences[index, width: width + len(expected)], expected), f"row {index}"


@pytest.mark.parametrize("policy", ["ar", "chain", "sage", "sage_cost"])
@pytest.mark.parametrize("name", ["llama", "qwen2_vl", "llava"])
def test_repetition_penalty_and_minimum_length_on_cuda(name, policy):
    """tests/test_generation_config.py's checks on the GPU: the target's scores processed per tree node (repetition
    penalty, min_new_tokens) give target.generate's output, greedy and with top-k-1 sampling."""
    models = build(name)
    settings = dict(max_new_tokens=MAX_NEW, repetition_penalty=1.3, min_new_tokens=MAX_NEW // 2)
    engine = SpeculativeGenerator(models.target, models.draft if policy != "ar" else None, POLICIES[policy]())
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 1}):
        with torch.no_grad():
            expected = models.target.generate(**models.inputs, **settings, **sampling)
        out = engine.generate(**models.inputs, **settings, **sampling,
                              generator=torch.Generator(CUDA).manual_seed(0) if sampling["do_sample"] else None)
        assert torch.equal(out.sequences, expected), sampling


@pytest.mark.parametrize("policy", ["chain", "sage", "sage_cost"])
@pytest.mark.parametrize("name", ["llama", "qwen2_vl"])
def test_transformers_processors_and_warpers_on_cuda(name, policy):
    """tests/test_generation_config.py's processors (called per tree depth on the GPU's node ids) give
    target.generate's greedy output; with min_p and typical_p on top of top-k 1 sampling, too."""
    models = build(name)
    prompt_len = models.inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = models.target.generate(**models.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    seq = plain[0, prompt_len:].tolist()
    settings = dict(max_new_tokens=MAX_NEW, no_repeat_ngram_size=2, bad_words_ids=[[seq[1], seq[2]]],
                    sequence_bias={(seq[0],): -4.0}, suppress_tokens=[seq[3]])
    engine = SpeculativeGenerator(models.target, models.draft, POLICIES[policy]())
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 1, "min_p": 0.05, "typical_p": 0.9}):
        with torch.no_grad():
            expected = models.target.generate(**models.inputs, **settings, **sampling)
        out = engine.generate(**models.inputs, **settings, **sampling,
                              generator=torch.Generator(CUDA).manual_seed(0) if sampling["do_sample"] else None)
        assert torch.equal(out.sequences, expected), sampling
    assert not torch.equal(expected, plain)


@pytest.mark.parametrize(("name", "policy"), [("llava", "sage"), ("qwen2_vl", "chain")])
def test_captured_draft_on_cuda(name, policy):
    """``capture_draft=True`` on the GPU (CUDA graphs through torch.compile's "reduce-overhead" mode, the static
    draft cache's buffers marked static): a batch's rows and a prompt alone equal ``target.generate``, and both
    caches equal a recomputation after every step. Two cases only: each new shape compiles Triton kernels, which
    the device check's time budget pays for."""
    from test_batch_split import CASES, assemble
    from test_engine_batch import MAX_NEW as BATCH_NEW

    model, rows, layout = CASES[name]()
    draft = correlated_draft(model, noise=0.1)
    target, draft = copy.deepcopy(model).to(CUDA), copy.deepcopy(draft).to(CUDA)
    rows = [to_cuda(row) for row in rows]
    batch = to_cuda(assemble([{key: value.cpu() for key, value in row.items()} for row in rows], **layout))
    out = SpeculativeGenerator(target, draft, POLICIES[policy](), capture_draft=True).generate(
        **batch, max_new_tokens=BATCH_NEW, pad_token_id=1)
    width = batch["input_ids"].shape[1]
    for index, row in enumerate(rows):
        expected = hf_greedy(target, row, max_new_tokens=BATCH_NEW)[0, row["input_ids"].shape[1]:]
        assert torch.equal(out.sequences[index, width: width + len(expected)], expected), f"row {index}"
    run_with_cache_checks(target, draft, rows[0], POLICIES[policy](), capture_draft=True)


def real_nodes(tokens: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, N] tree without its padding slots (parent -1 after the root), parents renumbered to the kept slots."""
    real = parents[0] >= 0
    real[0] = True
    new_index = real.long().cumsum(0) - 1
    kept = parents[0, real]
    renumbered = torch.where(kept >= 0, new_index[kept.clamp(min=0)], kept)
    return tokens[0, real][None], renumbered[None]


def test_real_nodes_drops_padding_and_renumbers():
    tokens = torch.tensor([[5, 6, 0, 7, 0, 8]])
    parents = torch.tensor([[-1, 0, -1, 0, -1, 3]])
    kept_tokens, kept_parents = real_nodes(tokens, parents)
    assert kept_tokens.tolist() == [[5, 6, 7, 8]]
    assert kept_parents.tolist() == [[-1, 0, 0, 2]]


@pytest.mark.parametrize("policy", TREE_POLICIES)
def test_cpu_and_cuda_build_the_same_trees(family, policy):
    """The same models on both devices propose the same tree at every step (ties in the ops resolved by the rule
    of docs/OPS.md on both, which tests/test_ops_cuda.py checks op by op on tied inputs)."""
    def trees(target, draft, inputs):
        seen = []
        engine = SpeculativeGenerator(target, draft, POLICIES[policy]())
        engine.step_hook = lambda info: seen.append(
            (info.tree_tokens.cpu().clone(), info.tree_parents.cpu().clone(), info.tau))  # buffers change later
        out = engine.generate(**inputs, max_new_tokens=MAX_NEW)
        return out.sequences.cpu(), seen

    cpu_sequence, cpu_trees = trees(family.cpu_target, family.cpu_draft, family.cpu_inputs)
    cuda_sequence, cuda_trees = trees(family.target, family.draft, family.inputs)
    assert torch.equal(cuda_sequence, cpu_sequence)
    assert len(cuda_trees) == len(cpu_trees)
    for step, (cuda_tree, cpu_tree) in enumerate(zip(cuda_trees, cpu_trees), 1):
        # SAGE takes static shapes on CUDA (every level at its full width, unused slots padding) and compact
        # levels on the CPU: the same tree in other slots, so compare the real nodes in slot order
        (cuda_tokens, cuda_parents), (cpu_tokens, cpu_parents) = real_nodes(*cuda_tree[:2]), real_nodes(*cpu_tree[:2])
        cuda_tau, cpu_tau = cuda_tree[2], cpu_tree[2]
        assert torch.equal(cuda_parents, cpu_parents), f"step {step}: tree shapes differ"
        assert torch.equal(cuda_tokens, cpu_tokens), f"step {step}: tree tokens differ"
        assert cuda_tau == cpu_tau, f"step {step}"


# --------------------------------------------------------------------------------------------
# one sync per step
# --------------------------------------------------------------------------------------------
def count_syncs(families: list[str], policies: list[str]) -> dict:
    """Every host-device sync (stream, device or event synchronization: a blocking copy, ``.item()``, a
    ``torch.cuda.synchronize``) of whole generations, per step. Switches torch's GPU trace on for good: run it in
    a process of its own. Returns {"family/policy": {"per_step": syncs of steps 2.., "before_first_hook": ...,
    "draft_forwards": per step, "extra": Python stacks of the syncs of steps that had more than one}}."""
    import torch.cuda._gpu_trace as gpu_trace

    syncs: list[str] = []
    counting = [False]

    def on_sync(*_args) -> None:
        if counting[0]:
            syncs.append("".join(traceback.format_stack(limit=12)[:-1]))

    torch._C._activate_gpu_trace()
    gpu_trace.register_callback_for_stream_synchronization(on_sync)
    gpu_trace.register_callback_for_device_synchronization(on_sync)
    gpu_trace.register_callback_for_event_synchronization(on_sync)
    results = {}
    for name in families:
        models = build(name)
        for policy in policies:
            engine = SpeculativeGenerator(models.target, models.draft, SYNC_POLICIES[policy]())
            marks: list[int] = []
            engine.step_hook = lambda info: marks.append(len(syncs))
            syncs.clear()
            counting[0] = True
            out = engine.generate(**models.inputs, max_new_tokens=MAX_NEW, **SYNC_SETTINGS.get(policy, {}))
            counting[0] = False
            per_step = [end - start for start, end in zip(marks, marks[1:])]
            extra = [syncs[start:end] for start, end in zip(marks, marks[1:]) if end - start > 1]
            results[f"{name}/{policy}"] = dict(
                per_step=per_step, before_first_hook=marks[0] if marks else None, total=len(syncs),
                draft_forwards=[step.draft_forwards for step in out.stats.steps], extra=extra[:2])
    return results


@pytest.fixture(scope="module")
def sync_counts():
    if not ops.cuda_available():  # before the child fails at its first op (module fixtures run before autouse ones)
        pytest.fail(BUILD_HINT, pytrace=False)
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--count-syncs"], cwd=here,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"the sync-count process failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy", list(SYNC_POLICIES))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_one_sync_per_step(sync_counts, name, policy):
    counts = sync_counts[f"{name}/{policy}"]
    per_step = counts["per_step"]
    assert len(per_step) >= 3, counts
    where = "\n---\n".join(stack for step in counts["extra"] for stack in step)
    if policy.endswith("dynamic_shapes"):  # each level's size (a chain's: its mass) is read: at most one sync a level
        levels = counts["draft_forwards"][1:]
        assert all(n <= 1 + forwards for n, forwards in zip(per_step, levels)), f"{per_step} {levels}\n{where}"
    else:
        assert per_step == [1] * len(per_step), f"syncs per step {per_step}; where the extra ones were:\n{where}"


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampling_setup():
    """tests/test_engine_sampling.py's setup (24-token Llama, a draft accepting about a token a step), built there
    on the CPU and copied to CUDA here."""
    from test_engine_sampling import VOCAB

    target, _ = tiny_llama(seed=0, vocab_size=VOCAB)
    draft = correlated_draft(target, noise=0.3)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    return SimpleNamespace(cpu_target=target, cpu_inputs=inputs, target=copy.deepcopy(target).to(CUDA),
                           draft=copy.deepcopy(draft).to(CUDA), inputs=to_cuda(inputs))


@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
@pytest.mark.parametrize("policy", ["chain", "static", "dynamic", "sage"])
def test_seeded_sampling_repeats(sampling_setup, generator_device, policy):
    make_policy, kwargs, _ = SETTINGS[policy]  # (policy, settings, sampling rule)
    engine = SpeculativeGenerator(sampling_setup.target, sampling_setup.draft, make_policy())

    def sample(seed):
        generator = torch.Generator(generator_device).manual_seed(seed)
        out = engine.generate(**sampling_setup.inputs, max_new_tokens=12, do_sample=True, eos_token_id=-1,
                              generator=generator, **kwargs)
        assert out.sequences.device.type == "cuda"
        return out.sequences

    first = sample(7)
    assert torch.equal(sample(7), first)
    assert any(not torch.equal(sample(seed), first) for seed in range(8, 14)), "other seeds, other tokens"


@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_gumbel_sampled_tokens_do_not_depend_on_the_trees_on_cuda(sampling_setup, generator_device):
    """tests/test_engine_sampling.py's check of sampling_rule "gumbel" on the GPU: one seed, one output for every
    policy, from a CUDA generator or a CPU one."""
    outputs = []
    for policy in ("ar", "chain", "sage", "sage_cost"):
        engine = SpeculativeGenerator(sampling_setup.target, sampling_setup.draft if policy != "ar" else None,
                                      POLICIES[policy](), sampling_rule="gumbel")
        out = engine.generate(**sampling_setup.inputs, max_new_tokens=12, do_sample=True, eos_token_id=-1,
                              temperature=1.5, top_k=0, generator=torch.Generator(generator_device).manual_seed(7))
        assert out.sequences.device.type == "cuda"
        outputs.append(out.sequences)
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_sampled_tokens_follow_the_target_distribution(sampling_setup, generator_device):
    """The chi-square test of tests/test_engine_sampling.py (exact marginals of the 2nd and 3rd new token from the
    CPU copy of the target), on fewer runs."""
    make_policy, kwargs, _ = SETTINGS["sage"]
    engine = SpeculativeGenerator(sampling_setup.target, sampling_setup.draft, make_policy())
    cpu_target = sampling_setup.cpu_target
    p2, p3 = exact_marginals(cpu_target, sampling_setup.cpu_inputs, hf_warper(cpu_target, **kwargs))
    generator = torch.Generator(generator_device).manual_seed(1234)
    prompt_len = sampling_setup.inputs["input_ids"].shape[1]
    second, third, taus = [], [], []
    for _ in range(SAMPLING_RUNS):
        out = engine.generate(**sampling_setup.inputs, max_new_tokens=3, do_sample=True, eos_token_id=-1,
                              generator=generator, **kwargs)
        row = out.sequences[0, prompt_len:].tolist()
        second.append(row[1])
        third.append(row[2])
        taus += [step.tau for step in out.stats.steps]
    assert sum(taus) / len(taus) > 0.3, "the draft should get tokens accepted"
    assert chi_square_p(second, p2) > P_PASS
    assert chi_square_p(third, p3) > P_PASS


# --------------------------------------------------------------------------------------------
# CUDA-event timings
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    return build("llava")


@pytest.mark.parametrize("policy", ["ar", "chain", "static", "dynamic", "sage"])
def test_stats_with_cuda_event_timings(llava, policy):
    out = SpeculativeGenerator(llava.target, llava.draft, policy).generate(**llava.inputs, max_new_tokens=MAX_NEW)
    check_stats(out.stats, policy, llava.inputs["input_ids"].shape[1], MAX_NEW)
    assert all(step.time > 0 for step in out.stats.steps)
    assert sum(out.stats.time.values()) <= out.stats.wall_time * 1.01


def test_timeline_books_gpu_time_where_it_ran():
    """Events, not the host clock: a region that only queues GPU work (which returns at once on the host) is
    booked the GPU's time of that work."""
    from sage_ext.engine.stats import GenerationStats, StepRecord, Timeline

    cycles = 50_000_000
    torch.cuda._sleep(4 * cycles)  # warm-up (clocks up)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    sleep_seconds = start.elapsed_time(end) / 1000
    assert sleep_seconds > 1e-3

    timeline = Timeline(CUDA)
    timeline.step_begin("tree_ops")
    with timeline.region("target_verify"):
        host_start = time.perf_counter()
        torch.cuda._sleep(cycles)  # queued: returns at once
        host_seconds = time.perf_counter() - host_start
    timeline.step_end()
    torch.cuda.synchronize()
    stats = GenerationStats(policy="test", steps=[StepRecord(0, 1, 0, 0, 0, 0)])
    timeline.finish(stats)
    assert stats.time["target_verify"] > 0.5 * sleep_seconds  # the same GPU work (the clock may differ a little)
    assert stats.time["target_verify"] > 10 * host_seconds
    assert stats.time["target_verify"] > 5 * stats.time["tree_ops"]
    assert stats.steps[0].time >= stats.time["target_verify"]


if __name__ == "__main__" and sys.argv[1:] == ["--count-syncs"]:
    with torch.no_grad():
        counts = count_syncs(list(BUILDERS), list(SYNC_POLICIES))
    print(json.dumps(counts))
