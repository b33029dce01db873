"""Batches: every row of a batch decodes exactly as it would alone, with its own tree.

The batches are tests/test_batch_split.py's: for every family, two to four prompts of different lengths (different
image grids / sizes, a prompt with two images, video prompts, a text-only prompt) laid out as the family's processor
lays out a batch (left padding, media concatenated or batch-first). Checked, fp32, tiny random models:

* greedy: each row's new tokens equal ``target.generate`` on that row alone, for every family x policy, also when
  rows end at different steps (an EOS id taken from one row's own output) and with draft-side pruning; the output is
  ``[B, L + longest new]`` with the prompts as given and ``pad_token_id`` after each row's end;
* after every step, each row's target and draft cache equal a recomputation of that row alone (also with a cache
  split over devices, the per-device commit);
* sampling: each row's 2nd and 3rd tokens follow that row's exact target distribution (chi-square), and a biased
  verifier (the negative control) is caught in the batch;
* a finished row leaves the batch; a streamer with a batch is refused; stop strings end each row by itself;
* the batch's node budget: every row's tree is cut to its share of it (fixed trees, SAGE, EAGLE-2), still
  lossless; one prompt's default trees are not cut.
"""
from __future__ import annotations

import pytest
import torch
from test_batch_split import CASES, PAD, assemble
from test_engine import POLICIES, hf_greedy
from test_engine_kv import check_step_caches
from test_engine_sampling import ResidualNotUpdated, chi_square_p, exact_marginals, hf_warper
from tiny_models import correlated_draft, one_thread, tiny_llama, tiny_tokenizer  # noqa: F401  (one_thread: autouse)

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.loop import DEFAULT_BATCH_NODE_BUDGET
from sage_ext.engine.policies import POLICIES as POLICY_CLASSES
from sage_ext.engine.policies import SagePolicy, StaticTreePolicy

MAX_NEW = 12
BATCH_POLICIES = ["ar", "chain", "static", "dynamic", "sage", "sage_zero_lag_static_shapes", "sage_cost"]
FILL = 1  # the pad_token_id the tests pass


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, rows, layout = CASES[request.param]()
    batch = assemble(rows, **layout)
    references = [hf_greedy(model, row, max_new_tokens=MAX_NEW)[0, row["input_ids"].shape[1]:] for row in rows]
    return model, correlated_draft(model, noise=0.1), rows, batch, references


def check_rows(out, batch: dict, expected_new: list[torch.Tensor]) -> None:
    """``out.sequences`` is the batch's prompts as given, then each row's expected tokens, then FILL."""
    sequences, prompt = out.sequences, batch["input_ids"]
    longest = max(len(new) for new in expected_new)
    assert sequences.shape == (prompt.shape[0], prompt.shape[1] + longest)
    assert torch.equal(sequences[:, : prompt.shape[1]], prompt)
    for b, new in enumerate(expected_new):
        row = sequences[b, prompt.shape[1]:]
        assert torch.equal(row[: len(new)], new), f"row {b}"
        assert bool((row[len(new):] == FILL).all()), f"row {b} after its end"
        assert out.stats[b].new_tokens == len(new)


@pytest.mark.parametrize("policy", BATCH_POLICIES)
def test_every_row_decodes_as_it_would_alone(case, policy):
    model, draft, _, batch, references = case
    generator = SpeculativeGenerator(model, draft if policy != "ar" else None, POLICIES[policy]())
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, pad_token_id=FILL)
    check_rows(out, batch, references)
    if policy != "ar":
        assert sum(step.tau for stats in out.stats for step in stats.steps) > 0  # trees were accepted


@pytest.mark.parametrize("policy", ["static", "sage"])
def test_rows_that_end_at_different_steps(case, policy):
    """An EOS id from the first row's own output: that row ends early (and any other row that meets it), the
    others go on; each ends where ``generate`` on it alone with that EOS id ends."""
    model, draft, rows, batch, references = case
    eos = int(references[0][4])
    expected = [hf_greedy(model, row, max_new_tokens=MAX_NEW, eos_token_id=eos)[0, row["input_ids"].shape[1]:]
                for row in rows]
    assert len(expected[0]) <= 5 < MAX_NEW
    generator = SpeculativeGenerator(model, draft, POLICIES[policy]())
    steps: dict[int, list[int]] = {}  # step -> the rows it ran, and the cache's batch then
    generator.step_hook = lambda info: steps.setdefault(info.step, []).append(
        (info.row, generator.target_cache.batch))
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=FILL)
    check_rows(out, batch, expected)
    assert [stats.stop_reason for stats in out.stats] == [
        "eos" if len(new) < MAX_NEW or new[-1] == eos else "max_new_tokens" for new in expected]
    # a finished row leaves the batch: every step runs (and caches) exactly the rows still going
    for step, ran in steps.items():
        assert all(batch_size == len(ran) for _, batch_size in ran)
        assert len(ran) == sum(stats.target_forwards >= step for stats in out.stats)


@pytest.mark.parametrize("policy", ["ar", "sage"])
def test_a_row_that_ends_with_its_first_token(policy):
    """The EOS id is the first row's first new token: that row ends at the prefill and never enters a step."""
    model, rows, layout = CASES["qwen2_vl"]()
    references = [hf_greedy(model, row, max_new_tokens=MAX_NEW)[0, row["input_ids"].shape[1]:] for row in rows]
    eos = int(references[0][0])
    expected = [hf_greedy(model, row, max_new_tokens=MAX_NEW, eos_token_id=eos)[0, row["input_ids"].shape[1]:]
                for row in rows]
    assert len(expected[0]) == 1 and max(len(new) for new in expected) > 1
    batch = assemble(rows, **layout)
    draft = correlated_draft(model, noise=0.1) if policy != "ar" else None
    out = SpeculativeGenerator(model, draft, POLICIES[policy]()).generate(
        **batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=FILL)
    check_rows(out, batch, expected)
    assert out.stats[0].target_forwards == 0


def test_the_caches_grow_as_the_rows_get_longer():
    """The cache buffers start small and double: a long generation reallocates them (contents kept) and stays
    lossless."""
    model, rows, layout = CASES["llama"]()
    generator = SpeculativeGenerator(model, correlated_draft(model, noise=0.1), "sage")
    sizes = []
    generator.step_hook = lambda info: sizes.append(generator.target_cache.allocated)
    long_new = 200
    out = generator.generate(**assemble(rows, **layout), max_new_tokens=long_new, eos_token_id=-1,
                             pad_token_id=FILL)
    expected = [hf_greedy(model, row, max_new_tokens=long_new, eos_token_id=-1)[0, row["input_ids"].shape[1]:]
                for row in rows]
    check_rows(out, assemble(rows, **layout), expected)
    assert sizes[0] < sizes[-1] <= generator.target_cache.capacity


def test_stop_strings_end_each_row_by_itself():
    """A stop string taken from the middle of the first row's text: each row ends where ``generate`` on it alone
    with that stop string ends (the rows that never meet it run to max_new_tokens)."""
    model, rows, layout = CASES["llama"]()
    tokenizer = tiny_tokenizer()
    references = [hf_greedy(model, row, max_new_tokens=MAX_NEW)[0, row["input_ids"].shape[1]:] for row in rows]
    text = tokenizer.decode(references[0])
    index = next(i for i in range(3, len(text)) if text[i - 1: i + 1] not in text[:i])
    stop = text[index - 1: index + 1]
    expected = [hf_greedy(model, row, max_new_tokens=MAX_NEW, stop_strings=[stop], tokenizer=tokenizer)
                [0, row["input_ids"].shape[1]:] for row in rows]
    batch = assemble(rows, **layout)
    out = SpeculativeGenerator(model, correlated_draft(model, noise=0.1), "sage").generate(
        **batch, max_new_tokens=MAX_NEW, stop_strings=stop, tokenizer=tokenizer, pad_token_id=FILL)
    check_rows(out, batch, expected)
    assert out.stats[0].stop_reason == "stop_string" and out.stats[0].new_tokens == index + 1 < MAX_NEW


# ----------------------------------------------------------------------------------------------- node budget
BUDGET_POLICIES = ["chain", "static", "dynamic", "sage", "sage_zero_lag_static_shapes", "sage_cost"]


@pytest.mark.parametrize("budget", [5, 9])
@pytest.mark.parametrize("policy", BUDGET_POLICIES)
def test_the_node_budget_cuts_every_rows_tree(case, policy, budget):
    """Every step, each running row's tree has at most its share of the budget (budget // running rows, at least
    2 nodes with the root), and every row still decodes as it would alone."""
    model, draft, _, batch, references = case
    generator = SpeculativeGenerator(model, draft, POLICIES[policy](), batch_node_budget=budget)
    sizes: dict[int, list[int]] = {}  # step -> tree size of every row it ran
    generator.step_hook = lambda info: sizes.setdefault(info.step, []).append(info.tree_tokens.shape[1])
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, pad_token_id=FILL)
    check_rows(out, batch, references)
    for step, trees in sizes.items():
        share = max(2, budget // len(trees))
        assert max(trees) <= share, f"step {step}: trees {trees} over the share {share}"
    assert max(max(trees) for trees in sizes.values()) > 1  # trees were built, not skipped


@pytest.mark.parametrize("nodes", [2, 5, 13, 25, 26])
def test_a_fixed_tree_cut_keeps_its_shallowest_best_paths(nodes):
    tree = StaticTreePolicy()
    cut = tree.trimmed(nodes)
    kept = min(nodes, tree.capacity) - 1
    assert cut.capacity == kept + 1
    assert cut.paths == sorted(tree.paths, key=lambda path: (len(path), path))[:kept]
    assert all(path[:-1] in cut.paths or len(path) == 1 for path in cut.paths)  # every parent kept
    assert tree.trimmed(nodes) is cut  # made once per limit


@pytest.mark.parametrize("policy", sorted(POLICY_CLASSES))
def test_one_prompt_keeps_its_default_tree_under_the_default_budget(policy):
    """The default budget leaves a batch of one as it was: the same trees, steps and tokens as without a budget
    (policy objects, not names: sage_cost by name would go on learning from the first run in the second; and a
    priced clock, the same for both runs: sage_cost's trees follow the times it measures)."""
    from test_engine_costs import priced_clock

    model, rows, _ = CASES["llama"]()
    draft = correlated_draft(model, noise=0.1) if policy != "ar" else None
    runs = []
    for budget in (DEFAULT_BATCH_NODE_BUDGET, None):
        engine = SpeculativeGenerator(model, draft, POLICY_CLASSES[policy](), batch_node_budget=budget)
        engine.host_clock = priced_clock(engine, {"draft_decode": 1.0, "target_verify": 3.0})
        runs.append(engine.generate(**rows[0], max_new_tokens=MAX_NEW))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert [(step.tree_slots, step.tau) for step in runs[0].stats.steps] == [
        (step.tree_slots, step.tau) for step in runs[1].stats.steps]


@pytest.mark.parametrize("budget", [0, 1, 2.5, True, "64"])
def test_a_node_budget_below_two_or_not_an_int_raises(budget):
    model, _, _ = CASES["llama"]()
    with pytest.raises(ValueError, match="batch_node_budget"):
        SpeculativeGenerator(model, correlated_draft(model, noise=0.1), "sage", batch_node_budget=budget)


# ----------------------------------------------------------------------------------- caches, pruning, devices
KV_CASES = ["llama", "llava", "qwen2_vl", "qwen2_5_vl-video", "gemma3", "idefics3"]


@pytest.mark.parametrize("elsewhere_from", [(None, None), (1, 0)], ids=["one_device", "split_commit"])
@pytest.mark.parametrize("policy", ["static", "dynamic", "sage"])
@pytest.mark.parametrize("name", KV_CASES)
def test_each_rows_caches_match_its_recomputation(name, policy, elsewhere_from):
    model, rows, layout = CASES[name]()
    draft = correlated_draft(model, noise=0.1)
    generator = SpeculativeGenerator(model, draft, POLICIES[policy]())
    generator.elsewhere_from = elsewhere_from
    checked = []

    def check(info):
        checked.append(info.row)
        check_step_caches(info, model, draft, rows[info.row])

    generator.step_hook = check
    out = generator.generate(**assemble(rows, **layout), max_new_tokens=MAX_NEW, pad_token_id=FILL)
    assert sorted(set(checked)) == list(range(len(rows)))
    assert len(checked) == sum(stats.target_forwards for stats in out.stats)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava", "idefics3"])
def test_draft_pruning_in_a_batch(name):
    model, rows, layout = CASES[name]()
    draft = correlated_draft(model, noise=0.1)
    references = [hf_greedy(model, row, max_new_tokens=MAX_NEW)[0, row["input_ids"].shape[1]:] for row in rows]
    batch = assemble(rows, **layout)
    out = SpeculativeGenerator(model, draft, "sage", draft_prune_ratio=0.5).generate(
        **batch, max_new_tokens=MAX_NEW, pad_token_id=FILL)
    check_rows(out, batch, references)


def test_pad_token_id_defaults_to_the_generation_config_then_eos():
    model, rows, layout = CASES["llama"]()
    batch = assemble(rows, **layout)
    eos = int(hf_greedy(model, rows[1], max_new_tokens=MAX_NEW)[0, rows[1]["input_ids"].shape[1] + 2])
    generator = SpeculativeGenerator(model, correlated_draft(model, noise=0.1), "static")
    model.generation_config.pad_token_id = None
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=eos)
    short = batch["input_ids"].shape[1] + out.stats[1].new_tokens
    assert out.stats[1].stop_reason == "eos" and bool((out.sequences[1, short:] == eos).all())
    model.generation_config.pad_token_id = 7
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert bool((out.sequences[1, short:] == 7).all())
    model.generation_config.pad_token_id = None


def test_a_streamer_takes_one_sequence():
    model, rows, layout = CASES["llama"]()

    class Streamer:
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="streamer takes one sequence"):
        SpeculativeGenerator(model, None, "ar").generate(**assemble(rows, **layout), streamer=Streamer())


# ----------------------------------------------------------------------------------- sampling
VOCAB = 24
RUNS = 2000


@pytest.fixture(scope="module")
def sampling_setup():
    target, _ = tiny_llama(seed=0, vocab_size=VOCAB)
    draft = correlated_draft(target, noise=0.3)
    prompts = [torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
               for length in (6, 3)]
    rows = [{"input_ids": prompt, "attention_mask": torch.ones_like(prompt)} for prompt in prompts]
    batch = {"input_ids": torch.cat([prompts[0], torch.cat([torch.full((1, 3), PAD), prompts[1]], 1)]),
             "attention_mask": torch.tensor([[1] * 6, [0] * 3 + [1] * 3])}
    return target, draft, rows, batch


def sample_rows(engine, batch, runs: int, **kwargs) -> list[tuple[list[int], list[int]]]:
    """Each row's 2nd and 3rd new tokens over ``runs`` seeded batch generations."""
    rng = torch.Generator().manual_seed(4321)
    width = batch["input_ids"].shape[1]
    samples = [([], []) for _ in range(batch["input_ids"].shape[0])]
    for _ in range(runs):
        out = engine.generate(**batch, max_new_tokens=3, do_sample=True, eos_token_id=-1, pad_token_id=0,
                              generator=rng, **kwargs)
        for b, (second, third) in enumerate(samples):
            second.append(int(out.sequences[b, width + 1]))
            third.append(int(out.sequences[b, width + 2]))
    return samples


def row_pvalues(engine, rows, batch, **kwargs) -> list[float]:
    warp = hf_warper(engine.target.model, **kwargs)
    pvalues = []
    for row, (second, third) in zip(rows, sample_rows(engine, batch, RUNS, **kwargs)):
        p2, p3 = exact_marginals(engine.target.model, row, warp)
        pvalues += [chi_square_p(second, p2), chi_square_p(third, p3)]
    return pvalues


def test_each_row_samples_its_own_target_distribution(sampling_setup):
    target, draft, rows, batch = sampling_setup
    pvalues = row_pvalues(SpeculativeGenerator(target, draft, SagePolicy()), rows, batch, temperature=2.0, top_k=0)
    assert min(pvalues) > 1e-3, pvalues


def test_negative_control_biased_verifier_is_detected_in_a_batch(sampling_setup):
    target, draft, rows, batch = sampling_setup
    pvalues = row_pvalues(ResidualNotUpdated(target, draft, StaticTreePolicy()), rows, batch, temperature=2.0,
                          top_k=0)
    assert min(pvalues) < 1e-6, pvalues
