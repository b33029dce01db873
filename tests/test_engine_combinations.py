"""Seeded random combinations of what the other engine tests vary one at a time.

Each case draws, from its own seed (reproducible; the case's draw is in its test id): a family (every tiny family:
causal LMs and vision-language models, images and video), a draft (an identical copy, a correlated copy at three
noise levels, a contrary one), a policy (test_engine's, ``sage_cost`` also proposing trees only or with static
shapes), a priced clock or the real one (a cheap or a dear draft forward moves ``sage_cost``'s depth, its chain or
tree choice and its steps of the target alone), and ``max_new_tokens`` from 1. Each generator runs twice, so the
second call starts from what the first learned. Checked:

* greedy: token-identical to ``target.generate``;
* sampling with the ``gumbel`` rule: identical to the target alone (``ar``) with the same seed (the coupled noise
  belongs to the sequence index, not to the tree, so every policy samples the very tokens the target alone does);
* batches (test_batch_split's: every family, prompts of different lengths, images of different sizes, video), with
  and without a node budget: every row as ``target.generate`` gives it alone.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
from test_batch_split import CASES as BATCH_CASES
from test_batch_split import assemble
from test_engine import POLICIES as ENGINE_POLICIES
from test_engine import hf_greedy
from test_engine_batch import FILL, check_rows
from test_engine_costs import priced_clock
from tiny_models import (  # noqa: F401  (one_thread: autouse fixture)
    all_family_builders,
    contrary_draft,
    correlated_draft,
    one_thread,
    same_draft,
)
from tiny_vlms_more import CAUSAL_LM_BUILDERS, MORE_VLM_BUILDERS

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.policies import CostAwareSagePolicy

FAMILIES = {**all_family_builders(), **CAUSAL_LM_BUILDERS, **MORE_VLM_BUILDERS}
DRAFTS = ("same", "noise 0.05", "noise 0.2", "noise 0.5", "contrary")
# test_engine's policies and two more variants of the default; the draw weighs the default three times
POLICY_FACTORIES = {**ENGINE_POLICIES, "sage_cost trees": lambda: CostAwareSagePolicy(chains=False),
                    "sage_cost static": lambda: CostAwareSagePolicy(static_shapes=True)}
POLICIES = (*sorted(POLICY_FACTORIES), "sage_cost", "sage_cost")
PRICES = {"real clock": None,
          "cheap draft": {"draft_decode": 0.05, "target_verify": 1.0},
          "dear draft": {"draft_decode": 3.0, "target_verify": 1.0},
          "dear tree ops": {"draft_decode": 0.3, "target_verify": 1.0, "tree_ops": 0.2}}
MAX_NEW = (1, 2, 3, 5, 9, 17, 40)
CASES = 40


@functools.lru_cache(maxsize=None)
def built(family: str, seed: int):
    """The family's tiny target and its inputs (built once per module)."""
    return FAMILIES[family](seed=seed)


def make_draft(target, kind: str, seed: int):
    if kind == "same":
        return same_draft(target)
    if kind == "contrary":
        return contrary_draft(target)
    return correlated_draft(target, noise=float(kind.split()[1]), seed=seed + 7)


def generator_for(target, draft, policy: str, prices: str, **kwargs) -> SpeculativeGenerator:
    engine = SpeculativeGenerator(target, None if policy == "ar" else draft, POLICY_FACTORIES[policy](), **kwargs)
    if PRICES[prices] is not None:
        engine.host_clock = priced_clock(engine, PRICES[prices])
    return engine


def draw(kind: str, index: int, families) -> dict:
    rng = random.Random(f"{kind} {index}")
    return {"family": rng.choice(sorted(families)), "seed": rng.randrange(2), "draft": rng.choice(DRAFTS),
            "policy": rng.choice(POLICIES), "prices": rng.choice(sorted(PRICES)), "max_new": rng.choice(MAX_NEW),
            "rng": rng}


def case_id(kind: str, families):
    def name(index: int) -> str:
        case = draw(kind, index, families)
        return f"{index}-{case['family']}-{case['draft']}-{case['policy']}-{case['prices']}-{case['max_new']}"
    return name


@pytest.mark.parametrize("index", range(CASES), ids=case_id("greedy", FAMILIES))
def test_greedy_is_the_targets_whatever_the_combination(index):
    case = draw("greedy", index, FAMILIES)
    target, inputs = built(case["family"], case["seed"])
    reference = hf_greedy(target, inputs, max_new_tokens=case["max_new"])
    engine = generator_for(target, make_draft(target, case["draft"], case["seed"]), case["policy"], case["prices"])
    for call in range(2):
        out = engine.generate(**inputs, max_new_tokens=case["max_new"])
        assert torch.equal(out.sequences, reference), f"call {call}"


@pytest.mark.parametrize("index", range(CASES), ids=case_id("gumbel", FAMILIES))
def test_gumbel_sampling_is_the_target_alones_whatever_the_combination(index):
    case = draw("gumbel", index, FAMILIES)
    rng = case["rng"]
    sampling = {"do_sample": True, "temperature": rng.choice([0.5, 1.0, 1.5]), "top_k": rng.choice([0, 5]),
                "top_p": rng.choice([1.0, 0.9])}
    seed = rng.randrange(10**6)
    target, inputs = built(case["family"], case["seed"])
    alone = SpeculativeGenerator(target, None, "ar", sampling_rule="gumbel").generate(
        **inputs, max_new_tokens=case["max_new"], generator=torch.Generator().manual_seed(seed), **sampling)
    engine = generator_for(target, make_draft(target, case["draft"], case["seed"]), case["policy"], case["prices"],
                           sampling_rule="gumbel")
    for call in range(2):
        out = engine.generate(**inputs, max_new_tokens=case["max_new"], generator=torch.Generator().manual_seed(seed),
                              **sampling)
        assert torch.equal(out.sequences, alone.sequences), f"call {call}"


@functools.lru_cache(maxsize=None)
def built_batch(name: str):
    """test_batch_split's case ``name``: its target, its rows' inputs and the batch a processor makes of them."""
    model, rows, layout = BATCH_CASES[name]()
    return model, rows, assemble(rows, **layout)


@pytest.mark.parametrize("index", range(CASES // 2), ids=case_id("batch", BATCH_CASES))
def test_batch_rows_are_the_targets_whatever_the_combination(index):
    case = draw("batch", index, BATCH_CASES)
    target, rows, batch = built_batch(case["family"])
    references = [hf_greedy(target, row, max_new_tokens=case["max_new"])[0, row["input_ids"].shape[1]:] for row in rows]
    budget = case["rng"].choice([None, 8, 32])
    engine = generator_for(target, make_draft(target, case["draft"], case["seed"]), case["policy"], case["prices"],
                           **({} if budget is None else {"batch_node_budget": budget}))
    for _ in range(2):
        check_rows(engine.generate(**batch, max_new_tokens=case["max_new"], pad_token_id=FILL), batch, references)
