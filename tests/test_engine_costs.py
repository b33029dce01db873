"""The live cost and acceptance models (sage_ext.engine.costs) and the policy that uses them (``sage_cost``).

The models on synthetic steps with known costs; the policy inside the engine with a priced clock (the
Timeline's clock advanced by a fixed price for each category that ends), so the test decides what a draft
forward and a verify cost and checks that the depth cap moves the way those prices say, with the output
identical to the target alone throughout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import hf_greedy
from test_engine_kv import run_with_cache_checks
from tiny_models import correlated_draft, one_thread, same_draft, tiny_llama, tokens_left  # noqa: F401  (autouse)

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.costs import (
    CostModel,
    DepthAcceptance,
    NodeAcceptance,
    RowOutcome,
    StepCost,
    best_depth,
    expected_tokens,
    MassAcceptance,
    ProposalChoice,
    level_stops,
    node_threshold,
)
from sage_ext import _C
from sage_ext.engine.policies import CostAwareSagePolicy, SagePolicy, make_policy


def synthetic_step(slots: int, depth: int, accepted: int, forward=0.002, first=0.004, verify0=0.005, verify1=1e-4,
                   fixed=0.003):
    """A step with known costs: the first draft forward costs ``first``, every other one ``forward``."""
    forwards = depth + 1
    draft, verify = first + (forwards - 1) * forward, verify0 + verify1 * (slots + 1)
    return StepCost(seconds=draft + verify + fixed, draft_seconds=draft, verify_seconds=verify,
                    draft_forwards=forwards, verified_slots=slots, tree_depth=depth,
                    outcomes=(RowOutcome(accepted, depth),))


def test_cost_model_recovers_known_costs():
    model = CostModel()
    for step in range(40):
        depth = 2 + 4 * (step % 4)  # depths 2..14: the forwards vary by far more than the draft line's prior
        model.observe(synthetic_step(slots=3 * depth, depth=depth, accepted=2))
    draft_intercept, per_forward = model.draft_line()
    verify_intercept, per_token = model.verify_line()
    assert per_forward == pytest.approx(0.002, rel=0.02)  # what one more level adds
    assert draft_intercept == pytest.approx(0.004 - 0.002, rel=0.1)  # the first forward's premium
    assert model.fixed_seconds == pytest.approx(0.003)
    assert verify_intercept == pytest.approx(0.005, rel=1e-6)
    assert per_token == pytest.approx(1e-4, rel=1e-6)
    # a 6-deep tree: 7 forwards, 3 slots per level, the fixed part
    assert model.step_seconds(6) == pytest.approx(synthetic_step(slots=18, depth=6, accepted=0).seconds, rel=0.01)
    # the target alone: no draft, the root verified, the fixed part
    assert model.alone_seconds() == pytest.approx(0.003 + 0.005 + 1e-4, rel=1e-6)


def test_fixed_tree_size_and_depth():
    """The verify's cost all in its intercept; the draft's spread evenly over its forwards (a level is never
    free just because the depth did not vary)."""
    model = CostModel()
    for _ in range(10):
        model.observe(synthetic_step(slots=24, depth=5, accepted=3))
    draft_seconds = 0.004 + 5 * 0.002
    assert model.verify_line() == pytest.approx((0.005 + 1e-4 * 25, 0.0))
    assert model.draft_line() == pytest.approx((0.0, draft_seconds / 6))
    assert model.step_seconds(5) == pytest.approx(synthetic_step(slots=24, depth=5, accepted=3).seconds)
    assert model.step_seconds(6) - model.step_seconds(5) == pytest.approx(draft_seconds / 6)  # verify: no slope seen


def test_cost_model_follows_a_change():
    model = CostModel(decay=0.8)
    for step in range(30):
        model.observe(synthetic_step(slots=10, depth=2 + 4 * (step % 4), accepted=1, forward=0.001))
    for step in range(30):
        model.observe(synthetic_step(slots=10, depth=2 + 4 * (step % 4), accepted=1, forward=0.004))
    assert model.draft_line()[1] == pytest.approx(0.004, rel=0.03)


def test_depth_acceptance_counts_accepted_lengths():
    acceptance = DepthAcceptance(max_depth=6, decay=1.0, prior=0.5, prior_weight=1e-6)
    # trees 4 deep: accepted 4, 2, 0 and 1 draft tokens
    for accepted in (4, 2, 0, 1):
        acceptance.observe(accepted, tree_depth=4)
    p = acceptance.probabilities()
    assert p[0] == pytest.approx(3 / 4)  # depth 1 tried 4 times, accepted 3
    assert p[1] == pytest.approx(2 / 3)  # tried by the 3 that accepted depth 1
    assert p[2] == pytest.approx(1 / 2)
    assert p[3] == pytest.approx(1.0)
    assert p[4] == pytest.approx(p[3]) and p[5] == pytest.approx(p[3])  # never reached: the depth above


def test_unreached_depths_start_from_the_prior():
    p = DepthAcceptance(max_depth=3, prior=0.6).probabilities()
    assert p == pytest.approx([0.6, 0.6, 0.6])


def test_expected_tokens():
    p = [0.5] * 6
    assert expected_tokens(p, 0) == 1.0
    assert expected_tokens(p, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(p, 2.5) == pytest.approx(1 + 0.5 + 0.25 + 0.0625)
    assert expected_tokens(p, 10) == pytest.approx(2 - 0.5 ** 6)


@pytest.mark.parametrize("forward, accepted, expect", [
    (0.050, 2, "shallow"),  # draft forwards dear, little accepted
    (1e-5, 8, "deep"),  # draft forwards nearly free, every depth accepted
])
def test_best_depth_weighs_cost_against_acceptance(forward, accepted, expect):
    costs, acceptance = CostModel(), DepthAcceptance(max_depth=12)
    for step in range(20):
        depth = 6 + step % 3
        step = synthetic_step(slots=4 * depth, depth=depth, accepted=min(accepted, depth), forward=forward)
        costs.observe(step)
        acceptance.observe(step.outcomes[0].accepted, step.tree_depth)
    depth = best_depth(costs, acceptance, 4, 12)
    assert depth == (4 if expect == "shallow" else 12)


def test_best_depth_maximizes_the_rate_it_predicts():
    costs, acceptance = CostModel(), DepthAcceptance(max_depth=12)
    accepted = [6, 6, 5, 6, 4, 6, 3, 6]  # acceptance falls off past depth 3
    for step in range(30):
        depth = 6 + step % 2
        cost = synthetic_step(slots=3 * depth, depth=depth, accepted=accepted[step % len(accepted)], forward=0.002)
        costs.observe(cost)
        acceptance.observe(cost.outcomes[0].accepted, cost.tree_depth)
    p = acceptance.probabilities()
    rates = {cap: expected_tokens(p, cap) / costs.step_seconds(cap) for cap in range(4, 13)}
    assert best_depth(costs, acceptance, 4, 12) == max(rates, key=rates.get)
    assert 4 < max(rates, key=rates.get) < 12, rates  # an inner optimum for these numbers


def test_a_batch_steps_verify_is_priced_by_all_its_rows_tokens():
    """Batch steps of 1 to 8 rows: the verify costs per token of every row's (padded) tree and per row (kept apart,
    so the batch size is not read as a cost per token), and a wider batch
    makes each level dearer against the rest of a step, so the best depth cap can only get shallower (here from
    the deepest for one row, every draft token being right, to the shallowest for 64)."""
    costs, acceptance = CostModel(), DepthAcceptance(max_depth=12)
    per_token, per_row = 4e-4, 1e-4  # a row also attends over its own past: not a cost per token
    for step in range(40):
        rows, depth = (1, 2, 4, 8)[step % 4], 4 + step % 5
        slots = 3 * depth
        single = synthetic_step(slots=slots, depth=depth, accepted=depth, verify1=0.0)  # every draft token right
        verify = single.verify_seconds + per_row * (rows - 1) + per_token * rows * (slots + 1)
        outcomes = tuple(RowOutcome(depth, depth) for _ in range(rows))
        costs.observe(StepCost(single.seconds - single.verify_seconds + verify, single.draft_seconds, verify,
                               single.draft_forwards, slots, depth, outcomes=outcomes))
        acceptance.observe(depth, depth)
    assert costs.verify_line()[1] == pytest.approx(per_token, rel=1e-6)
    assert costs.verify_per_row() == pytest.approx(per_row, rel=1e-6)
    assert costs.step_seconds(5, rows=8) - costs.step_seconds(5) == pytest.approx(
        per_row * 7 + per_token * 7 * (15 + 1), rel=1e-6)
    caps = [best_depth(costs, acceptance, 4, 12, rows=rows) for rows in (1, 2, 4, 8, 64)]
    assert caps == sorted(caps, reverse=True) and caps[0] == 12 and caps[-1] == 4, caps


def test_the_cost_aware_policy_learns_from_every_row_of_a_batch_step():
    policy = CostAwareSagePolicy()
    step = synthetic_step(slots=12, depth=4, accepted=4)
    policy.observe_cost(StepCost(step.seconds, step.draft_seconds, step.verify_seconds, step.draft_forwards, 12, 4,
                                 outcomes=(RowOutcome(4, 4), RowOutcome(0, 4), RowOutcome(1, 3))))
    assert policy.costs.steps == 1
    rows_alone = DepthAcceptance(policy.d_max_cap)
    for accepted, tree_depth in ((4, 4), (0, 4), (1, 3)):
        rows_alone.observe(accepted, tree_depth)
    assert policy.acceptance.probabilities() == rows_alone.probabilities()


def test_a_batch_size_that_moves_with_the_tokens_is_not_double_counted():
    """Trees of one size in batches of 1 to 8 rows: rows and tokens move together, so the verify is explained by
    one of them, never by both at once (no negative or doubled slope)."""
    costs = CostModel()
    for step in range(40):
        rows = (1, 2, 4, 8)[step % 4]
        costs.observe(StepCost(0.02, 0.005, 0.005 + 3e-4 * rows * 10, 5, 9, 4,
                               outcomes=tuple(RowOutcome(2, 4) for _ in range(rows))))
    intercept, per_row, per_token = costs._verify.fit()
    assert min(per_row, per_token) == 0.0 and costs.step_seconds(4, 8) - costs.step_seconds(4, 1) == pytest.approx(
        3e-4 * 7 * 10, rel=1e-6)


def test_node_acceptance_calibrates_to_the_true_rate():
    """Steps whose trees hold mass 0.8 at depth 1 and 0.4 at depth 2 and whose nodes are accepted half as often as
    their probability says (P(tau >= 1) = 0.4, P(tau >= 2) = 0.2): the calibration goes to 0.5 at both depths; a
    depth never built keeps the prior 1."""
    import random

    draws = random.Random(0)
    nodes = NodeAcceptance(max_depth=4, decay=1.0)
    assert nodes.calibration() == [1.0] * 4
    for _ in range(4000):
        u = draws.random()
        nodes.observe(2 if u < 0.2 else 1 if u < 0.4 else 0, (0.8, 0.4))
    c = nodes.calibration()
    assert c[0] == pytest.approx(0.5, abs=0.03) and c[1] == pytest.approx(0.5, abs=0.03) and c[2:] == [1.0, 1.0]
    assert nodes.probability(0.6, 2) == pytest.approx(c[1] * 0.6)
    assert nodes.probability(1.0, 9) == 1.0  # past max_depth: the last depth's calibration, capped at 1
    nodes.observe(3, ())  # nothing measured: nothing learned
    assert nodes.calibration() == c and nodes.steps == 4000


def test_node_threshold_prices_a_node_against_a_token():
    costs = CostModel()
    assert node_threshold(costs, seconds_per_token=0.01, calibration=1.0) == 0.0  # nothing measured
    for step in range(20):
        costs.observe(synthetic_step(slots=4 + 8 * (step % 3), depth=4, accepted=2, verify1=2e-4))
    assert node_threshold(costs, 0.01, 1.0) == pytest.approx(2e-4 / 0.01, rel=1e-6)
    assert node_threshold(costs, 0.01, 0.5) == pytest.approx(2 * 2e-4 / 0.01, rel=1e-6)  # an overconfident draft
    flat = CostModel()
    for _ in range(5):
        flat.observe(synthetic_step(slots=8, depth=4, accepted=2, verify1=2e-4))  # one tree size: no slope yet
    assert node_threshold(flat, 0.01, 1.0) == 0.0


# --------------------------------------------------------------------------------------------
# the policy in the engine
# --------------------------------------------------------------------------------------------
def tree_mass_per_depth(parents: torch.Tensor, logprobs: torch.Tensor) -> list[float]:
    """Host recomputation: every real node's cumulative draft probability, summed per depth."""
    parents, logprobs = parents[0].tolist(), logprobs[0].tolist()
    cumulative, depth, mass = [0.0] * len(parents), [0] * len(parents), {}
    for node in range(1, len(parents)):
        parent = parents[node]
        if parent < 0:
            continue  # padding
        cumulative[node] = cumulative[parent] + logprobs[node]
        depth[node] = depth[parent] + 1
        mass[depth[node]] = mass.get(depth[node], 0.0) + float(torch.tensor(cumulative[node]).exp())
    return [mass[d] for d in sorted(mass)]


@pytest.mark.parametrize("static_shapes", [False, True])
def test_the_trees_mass_per_depth_rides_with_the_readback(static_shapes):
    """sage_cost's trees carry their probability mass per depth to the host with the step's commit readback (also
    in a batch); it equals a recomputation from the verified tree, and the node calibration learns from it. The
    paper's SAGE measures nothing and reads nothing."""
    from test_batch_split import CASES, assemble

    model, rows, layout = CASES["llama"]()
    policy = CostAwareSagePolicy(static_shapes=static_shapes, width_from_cost=True)
    engine = SpeculativeGenerator(model, correlated_draft(model, noise=0.3), policy)
    seen = []

    def check(info):
        if info.level_mass:
            seen.append(info.step)
            expected = tree_mass_per_depth(info.tree_parents, info.tree_logprobs)
            assert list(info.level_mass[: len(expected)]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
            assert all(mass == 0.0 for mass in info.level_mass[len(expected):])  # levels of padding only

    engine.step_hook = check
    batch = assemble(rows, **layout)
    out = engine.generate(**batch, max_new_tokens=24, pad_token_id=0)
    references = [hf_greedy(model, row, max_new_tokens=24)[0, row["input_ids"].shape[1]:] for row in rows]
    for b, new in enumerate(references):
        assert torch.equal(out.sequences[b, batch["input_ids"].shape[1]:][: len(new)], new)
    assert len(seen) > 3  # every step after SAGE's first (static) round
    assert policy.learned.nodes.steps > 0 and policy.learned.nodes.calibration() != [1.0] * policy.d_max_cap
    plain = SpeculativeGenerator(model, correlated_draft(model, noise=0.3), SagePolicy())
    plain.step_hook = lambda info: seen.append(info.level_mass)
    seen.clear()
    plain.generate(**batch, max_new_tokens=8, pad_token_id=0)
    assert seen and not any(seen)


@pytest.mark.parametrize("floor", [0.0, 0.01, 0.2])
def test_a_node_floor_under_sages_threshold_at_every_level(floor):
    """level_theta gives each level the scale whose threshold theta l / D is max(theta_scale l / D, floor)."""
    policy = CostAwareSagePolicy()
    depth = 6.0
    for level in range(1, 9):
        threshold = policy.level_theta(level, depth, floor) * level / depth
        assert threshold == pytest.approx(max(policy.theta_scale * level / depth, floor))


def verify_priced_clock(engine: SpeculativeGenerator, per_verified_token: float):
    """A clock where a draft forward costs 1 ms and a verify 5 ms plus ``per_verified_token`` per token it holds
    (the target cache's planned rows x batch at the time the verify ends)."""
    now = [0.0]

    def clock() -> float:
        category = engine.timeline.current[0]
        if category == "target_verify":
            cache = engine.target_cache
            now[0] += 5e-3 + per_verified_token * cache.planned_count * cache.batch
        elif category == "draft_decode":
            now[0] += 1e-3
        now[0] += 1e-6
        return now[0]
    return clock


def test_a_dear_verify_narrows_sage_costs_trees():
    """Priced verify tokens: with width_from_cost a node floor rises under the paper's threshold and the trees get
    smaller than SAGE's threshold would make them under the same prices; free verify tokens leave the paper's
    threshold; greedy output identical either way."""
    target, inputs = tiny_llama(seed=5)
    draft = correlated_draft(target, noise=0.3)
    reference = hf_greedy(target, inputs, max_new_tokens=48)
    slots = {}
    for width_from_cost, price in ((True, 2e-3), (False, 2e-3), (True, 0.0)):
        policy = CostAwareSagePolicy(width_from_cost=width_from_cost, chains=False)  # trees only: their widths
        engine = SpeculativeGenerator(target, draft, policy)
        engine.host_clock = verify_priced_clock(engine, price)
        out = engine.generate(**inputs, max_new_tokens=48)
        assert torch.equal(out.sequences, reference)
        late = out.stats.steps[5:]
        slots[(width_from_cost, price)] = sum(step.tree_slots for step in late) / len(late)
        if width_from_cost and price:
            assert policy.node_floor() > 0.0, policy.describe()
        else:  # (free verify tokens: a slope of rounding noise at most)
            assert policy.node_floor() < 1e-9
    assert slots[(True, 2e-3)] < slots[(False, 2e-3)], slots
def drafted_steps_observed(stats) -> int:
    """The steps a cost-aware policy's cost model has seen after a generation: every step but the last (one step
    late), those of the target alone aside (they price the target alone, not drafting)."""
    return sum(step.draft_forwards > 0 for step in stats.steps[:-1])


def priced_clock(engine: SpeculativeGenerator, prices: dict[str, float]):
    """A Timeline clock that advances by ``prices[category]`` each time a category ends (so a draft forward,
    one ``draft_decode`` span, costs its price), plus a microsecond."""
    now = [0.0]

    def clock() -> float:
        now[0] += prices.get(engine.timeline.current[0], 0.0) + 1e-6
        return now[0]
    return clock


@pytest.mark.parametrize("prices, direction", [
    ({"draft_decode": 10.0, "target_verify": 1.0}, "down"),
    ({"draft_decode": 1e-4, "target_verify": 1.0}, "up"),
])
def test_the_depth_cap_follows_the_prices(prices, direction):
    target, inputs = tiny_llama(seed=3)
    reference = hf_greedy(target, inputs, max_new_tokens=64, eos_token_id=-1)  # no EOS: every step runs
    # (drafting always: at the dear price the target alone would win, test_the_target_alone_where_drafting_does_not_pay)
    policy = CostAwareSagePolicy(alone=False)
    engine = SpeculativeGenerator(target, same_draft(target), policy)
    engine.host_clock = priced_clock(engine, prices)
    caps = []
    engine.step_hook = lambda info: caps.append(policy.d_max)
    out = engine.generate(**inputs, max_new_tokens=64, eos_token_id=-1)
    assert torch.equal(out.sequences, reference)
    assert policy.costs.steps == len(out.stats.steps) - 1  # every step but the last, one step late
    start = policy.d_max_init
    if direction == "down":
        assert caps[-1] == policy.d_min + 1 < start, caps
        assert all(b <= a for a, b in zip(caps, caps[1:])), caps
    else:
        assert caps[-1] > start, caps
    # the next generation starts from where this one's costs pointed
    policy.reset()
    assert policy.d_max == policy.depth_goal


def test_cost_aware_policy_takes_sages_arguments_on_the_command_line():
    from sage_ext.cli.validation import UsageError, parse_policy

    policy = parse_policy("sage_cost", "d_max=10,n_max=32")
    assert isinstance(policy, CostAwareSagePolicy) and policy.d_max == 10 and policy.n_max == 32
    with pytest.raises(UsageError, match="no parameter 'depth'; its parameters: d_min, d_max"):
        parse_policy("sage_cost", "depth=3")


def test_cost_aware_policy_by_name_and_description():
    policy = make_policy("sage_cost")
    assert isinstance(policy, CostAwareSagePolicy)
    described = policy.describe()
    assert described["name"] == "sage_cost" and described["costs"]["steps"] == 0
    assert len(described["acceptance_by_depth"]) == policy.d_max_cap


def test_seeded_sampling_repeats_under_the_same_prices():
    """The tree shape depends on measured time, so sampled tokens repeat per seed when the times do (a priced
    clock): the policy adds no randomness of its own."""
    target, inputs = tiny_llama(seed=1)
    draft = correlated_draft(target, noise=0.2)

    def sample(seed):
        engine = SpeculativeGenerator(target, draft, CostAwareSagePolicy())
        engine.host_clock = priced_clock(engine, {"draft_decode": 1.0, "target_verify": 2.0})
        out = engine.generate(**inputs, max_new_tokens=20, do_sample=True, eos_token_id=-1,
                              generator=torch.Generator().manual_seed(seed))
        assert engine.policy.costs.steps == drafted_steps_observed(out.stats)
        return out.sequences

    first = sample(5)
    assert torch.equal(sample(5), first)
    assert any(not torch.equal(sample(seed), first) for seed in range(6, 10)), "other seeds, other tokens"


def test_sage_cost_learns_from_batch_steps():
    """In a batch the cost-aware policy sees the batch's steps (one late, as with one prompt) and its depth cap
    follows the prices for every row; each row still decodes as it would alone."""
    from test_batch_split import CASES, assemble

    model, rows, layout = CASES["llama"]()
    batch = assemble(rows, **layout)
    references = [hf_greedy(model, row, max_new_tokens=40)[0, row["input_ids"].shape[1]:] for row in rows]
    policy = CostAwareSagePolicy()
    engine = SpeculativeGenerator(model, same_draft(model), policy)
    engine.host_clock = priced_clock(engine, {"draft_decode": 10.0, "target_verify": 1.0})
    steps, stop_set = set(), {}

    def hook(info):
        steps.add(info.step)
        stop_set.setdefault(info.step, policy.learned.go_on is not None)

    engine.step_hook = hook
    # 80 tokens: with the prices' dear draft the cap comes down one level a step, and the rows (the target's own
    # copy drafting: 3-12 tokens a step) must outlast its way down to be checked there
    out = engine.generate(**batch, max_new_tokens=80, eos_token_id=-1, pad_token_id=0)
    for b, new in enumerate(references):
        assert torch.equal(out.sequences[b, batch["input_ids"].shape[1]:][: len(new)], new)
    assert policy.costs.steps == len(steps) - 1 > 2
    assert policy.depth_goal == policy.d_min + 1 < policy.d_max_init  # dear draft forwards: shallow, every row
    assert all(step.d_max == policy.d_min + 1 for stats in out.stats for step in stats.steps[-2:])
    # no level stop while several rows share the draft forwards (one row's stop saves none): steps 3 and 4, the first
    # whose hook comes after two observed steps, every row still going (at most 6 + 13 + 8 + 7 of its 80 tokens); one
    # prompt alone gets it from the same step on
    assert not stop_set[3] and not stop_set[4]
    alone = {}
    engine.step_hook = lambda info: alone.setdefault(info.step, policy.learned.go_on is not None)
    engine.generate(**rows[0], max_new_tokens=80, eos_token_id=-1)  # (long chains: 12 tokens a step)
    assert alone[3] and alone[4]


def test_generators_of_the_same_models_share_what_sage_cost_learned():
    """By name, ``sage_cost`` continues the process's record for the pair and device (e.g. one
    ``sage_ext.generate`` call after another); another draft, or a policy object, has its own."""
    import gc

    from sage_ext.engine import costs

    target, inputs = tiny_llama(seed=4)
    draft = same_draft(target)
    first = SpeculativeGenerator(target, draft, "sage_cost")
    first.host_clock = priced_clock(first, {"draft_decode": 10.0, "target_verify": 1.0})
    out = first.generate(**inputs, max_new_tokens=48)
    learned = first.policy.learned
    assert learned.costs.steps == drafted_steps_observed(out.stats) > 2 and learned.depth_goal < first.policy.d_max_init
    observed = learned.costs.steps + learned.proposals.alone_steps  # (drafted steps and the target's alone)
    second = SpeculativeGenerator(target, draft, "sage_cost")
    assert second.policy.learned is learned and second.policy.d_max == learned.depth_goal
    assert torch.equal(second.generate(**inputs, max_new_tokens=48).sequences, out.sequences)
    # the second generation added to the same record
    assert learned.costs.steps + learned.proposals.alone_steps > observed
    other = SpeculativeGenerator(target, same_draft(target), "sage_cost")
    assert other.policy.learned is not learned and other.policy.learned.costs.steps == 0
    own = SpeculativeGenerator(target, draft, CostAwareSagePolicy())
    assert own.policy.learned is not learned and own.policy.learned.costs.steps == 0
    # the record goes with its models
    records = len(costs._LEARNED)
    del first, second, other, own, target, draft
    gc.collect()
    assert len(costs._LEARNED) == records - 1


def test_level_stops_price_one_more_level():
    """Past depth d the next level is worth P(d accepted | the level's mass) x p_(d+1) tokens, each token worth the
    current seconds per token (a piecewise-linear value in the mass, through MassAcceptance's curve); it costs one
    draft forward (the draft line's slope) plus each node's verified children (the verify line's slope). Levels past
    the last take its rule."""
    costs = CostModel()
    for depth, accepted in ((2, 1), (4, 3), (6, 2), (3, 3), (5, 4)):
        costs.observe(synthetic_step(slots=3 * depth, depth=depth, accepted=accepted))
    acceptance, masses = DepthAcceptance(6), MassAcceptance()
    for accepted, depth in ((3, 5), (1, 4), (5, 6)):
        acceptance.observe(accepted, depth)
        masses.observe(accepted, [0.9, 0.7, 0.5, 0.4, 0.3, 0.2][:depth])
    stops = level_stops(costs, acceptance, masses, seconds_per_token=0.01)
    probabilities = acceptance.probabilities()
    centres, curve = masses.curve()
    _, per_forward = costs.draft_line()
    _, per_token = costs.verify_line()
    assert per_forward > 0 and per_token > 0
    assert stops.levels == 6 and stops.masses == centres and stops.values == curve
    assert (stops.cost_fixed, stops.cost_per_node) == (per_forward, per_token)
    for depth in range(1, 9):
        next_value = probabilities[min(depth, 5)] * 0.01
        values = [a * next_value for a in curve]
        for mass in (0.0, 0.3, 0.72, 1.0):  # the native value is the curve read linearly between the centres
            assert stops.value(depth, mass) == pytest.approx(float(np.interp(mass, centres, values)))
            assert stops.pays(depth, mass, 2) == (stops.value(depth, mass) >= per_forward + 2 * per_token)


def test_mass_acceptance_learns_how_often_a_mass_is_accepted():
    """A calibrated draft (depth accepted with chance = its mass) keeps the curve near the bin centres; a draft that
    is always right whatever its mass (a copy of the target with wide distributions) lifts the whole curve towards
    1; the curve never decreases with the mass."""
    generator = torch.Generator().manual_seed(0)
    calibrated, always = MassAcceptance(decay=1.0), MassAcceptance(decay=1.0)
    for _ in range(4000):
        mass = float(torch.rand((), generator=generator))
        calibrated.observe(1 if float(torch.rand((), generator=generator)) < mass else 0, [mass])
        always.observe(1, [mass * 0.3])
    centres, curve = calibrated.curve()
    assert curve == pytest.approx(centres, abs=0.06)
    _, lifted = always.curve()
    assert all(value > 0.9 for value in lifted)
    assert all(b >= a for a, b in zip(curve, curve[1:])) and all(b >= a for a, b in zip(lifted, lifted[1:]))


def test_level_stops_refuse_a_malformed_curve():
    with pytest.raises(ValueError, match="masses must increase"):
        _C.LevelStops([0.5, 0.5], [0.0, 1.0], [1.0], 0.0, 0.0)
    with pytest.raises(ValueError, match="one length"):
        _C.LevelStops([0.0, 1.0], [0.0], [1.0], 0.0, 0.0)
    with pytest.raises(ValueError, match="at least one level"):
        _C.LevelStops([0.0, 1.0], [0.0, 1.0], [], 0.0, 0.0)
    with pytest.raises(ValueError, match="count from 1"):
        _C.LevelStops([0.0, 1.0], [0.0, 1.0], [1.0], 0.0, 0.0).value(0, 0.5)


class _NeverGoesOn(CostAwareSagePolicy):
    """sage_cost whose level stop never pays: every adaptive tree ends after its first level (and that proposes no
    greedy chain instead)."""

    def __init__(self, **kwargs):
        super().__init__(chains=False, **kwargs)

    def current_stops(self):
        return _C.LevelStops([0.0, 1.0], [0.0, 0.0], [1.0], 1.0, 0.0)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_the_level_stop_ends_trees_in_the_engine(static_shapes):
    """The policy's ``current_stops`` reach the workspace at every level: a stop that never pays leaves one level
    per tree (one draft forward a step) with dynamic shapes, greedy output identical; static shapes read nothing
    mid-step, so the stop does not apply there."""
    target, inputs = tiny_llama(seed=2)
    reference = hf_greedy(target, inputs, max_new_tokens=32)
    engine = SpeculativeGenerator(target, same_draft(target), _NeverGoesOn(static_shapes=static_shapes))
    out = engine.generate(**inputs, max_new_tokens=32)
    assert torch.equal(out.sequences, reference)
    # after SAGE's first (static) round, the steps with room for two levels before max_new_tokens
    adaptive = [step for step, left in zip(out.stats.steps, tokens_left(out.stats, 32)) if left > 2][1:]
    assert adaptive
    if static_shapes:
        assert all(step.draft_forwards > 1 for step in adaptive)
    else:
        assert all(step.draft_forwards == 1 and step.tree_depth == 1 for step in adaptive), \
            [(step.draft_forwards, step.tree_depth) for step in adaptive]


class _ChainsThatStop(CostAwareSagePolicy):
    """sage_cost proposing its greedy chain of 6 every step, whose chain stop pays at the levels below ``stop_at``
    only."""

    def __init__(self, stop_at: int, **kwargs):
        super().__init__(**kwargs)
        self.stops = _C.LevelStops(masses=[0.0, 1.0], values=[1.0, 1.0],
                                   scales=[2.0 if level < stop_at else 0.5 for level in range(1, 7)],
                                   cost_fixed=1.0, cost_per_node=0.0)

    def propose(self, ctx):
        return (yield from self.build_chain(ctx, 6))

    def chain_stops(self):
        return self.stops


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("stop_at", [1, 3])
def test_the_chain_stop_ends_chains_in_the_engine(stop_at, static_shapes):
    """Chain steps run on the longest chain's fixed layout; with dynamic shapes the chain's stop ends each at the
    first level whose next does not pay, the tree verified a prefix of the layout (its mask, positions and the draft
    rows it holds), greedy output identical to the target's; each level's mass is measured as it is built. Static
    shapes read nothing mid-step: every chain runs to its length (or the tokens left)."""
    target, inputs = tiny_llama(seed=2)
    draft = correlated_draft(target, noise=0.1)
    reference = hf_greedy(target, inputs, max_new_tokens=40)
    policy = _ChainsThatStop(stop_at, static_shapes=static_shapes)
    out = SpeculativeGenerator(target, draft, policy).generate(**inputs, max_new_tokens=40)
    assert torch.equal(out.sequences, reference)
    roomy = [step for step, left in zip(out.stats.steps, tokens_left(out.stats, 40)) if left > 6]
    assert roomy and max(step.tau for step in out.stats.steps) > 0
    levels = 6 if static_shapes else stop_at
    assert all(step.tree_depth == levels and step.draft_forwards == levels for step in roomy), \
        [(step.tree_depth, step.draft_forwards) for step in roomy]
    # the chain's acceptance by mass learns from the masses read (dynamic shapes; static ones measure none)
    assert (policy.learned.proposals.chain_masses.steps > 0) != static_shapes
    # both caches hold what recomputation gives after every step (the draft's: the rows of the prefix it processed)
    _, taus = run_with_cache_checks(target, draft, inputs, _ChainsThatStop(stop_at, static_shapes=static_shapes))
    assert max(taus) > 0


def test_dear_draft_levels_stop_trees_below_the_cap():
    """Priced draft forwards: sage_cost's per-step stop ends trees earlier than its depth cap alone would (the same
    prices, the stop switched off), greedy output identical either way."""
    target, inputs = tiny_llama(seed=5)
    draft = correlated_draft(target, noise=0.3)
    reference = hf_greedy(target, inputs, max_new_tokens=48)
    forwards = {}
    for stop in (True, False):
        policy = CostAwareSagePolicy(chains=False)  # trees only: their depth
        if not stop:
            policy.current_stops = lambda: None
        engine = SpeculativeGenerator(target, draft, policy)
        engine.host_clock = priced_clock(engine, {"draft_decode": 3.0, "target_verify": 1.0})
        out = engine.generate(**inputs, max_new_tokens=48)
        assert torch.equal(out.sequences, reference)
        late = out.stats.steps[5:]
        forwards[stop] = sum(step.draft_forwards for step in late) / len(late)
        if stop:
            assert policy.learned.go_on is not None
    assert forwards[True] < forwards[False], forwards


def test_sure_depth_is_where_a_sure_level_stops_paying():
    """At mass 1 with one node a level pays at scale 1 (value 2 against a cost of 1.5), not at scale 0.5."""
    def stops(scales):
        return _C.LevelStops([0.0, 1.0], [0.0, 2.0], scales, 1.0, 0.5)

    assert stops([1.0, 1.0, 0.5, 1.0]).sure_depth(12) == 3
    assert stops([1.0]).sure_depth(12) == 12  # deeper levels take the last level's rule
    assert stops([0.5, 1.0]).sure_depth(12) == 1


def test_with_the_level_stop_the_cap_lets_a_sure_step_go_as_deep_as_it_pays():
    """The depth cap best on average (``best_depth``) would cut short the steps whose draft stays sure; with the
    per-step stop each step ends where its own mass stops paying, so the cap only has to let a sure step (one node a
    level, all the mass on it) go as deep as that pays. A dear verify against cheap draft levels: the average
    optimum is shallow, a sure level always pays, the cap goes to ``d_max_cap`` and the stop keeps the trees
    shallow; greedy output identical."""
    target, inputs = tiny_llama(seed=5)
    draft = correlated_draft(target, noise=0.3)
    reference = hf_greedy(target, inputs, max_new_tokens=64, eos_token_id=-1)
    policy = CostAwareSagePolicy(chains=False)
    engine = SpeculativeGenerator(target, draft, policy)
    engine.host_clock = priced_clock(engine, {"draft_decode": 1.0, "target_verify": 8.0})
    out = engine.generate(**inputs, max_new_tokens=64, eos_token_id=-1)
    assert torch.equal(out.sequences, reference)
    learned, d_min = policy.learned, policy.d_min
    average_best = best_depth(learned.costs, learned.acceptance, d_min + 1, policy.d_max_cap,
                              depth_of=lambda cap: d_min + learned.mean_alpha * (cap - d_min))
    assert learned.go_on.sure_depth(policy.d_max_cap) == policy.d_max_cap
    assert average_best < learned.depth_goal == policy.d_max_cap
    late = out.stats.steps[-8:]
    assert max(step.d_max for step in late) == policy.d_max_cap
    assert sum(step.tree_depth for step in late) / len(late) < average_best  # each step's own stop


def test_a_later_generation_starts_from_the_learned_confidence():
    """SAGE opens every generation with its static first round (no root confidence measured yet); once sage_cost
    knows the pair's costs, a generation starts from the recent root confidence instead (its first step an
    adaptive tree, a trial of chain or tree with chains); greedy output identical."""
    target, inputs = tiny_llama(seed=4)
    draft = same_draft(target)
    reference = hf_greedy(target, inputs, max_new_tokens=32)
    for policy in (SagePolicy(), CostAwareSagePolicy(chains=False)):
        engine = SpeculativeGenerator(target, draft, policy)
        engine.host_clock = priced_clock(engine, {"draft_decode": 1.0, "target_verify": 2.0})
        static_round = policy.first_round.capacity - 1  # its draft nodes
        first = engine.generate(**inputs, max_new_tokens=32)
        assert first.stats.steps[0].alpha is None and first.stats.steps[0].tree_slots == static_round
        learned_alpha = getattr(getattr(policy, "learned", None), "mean_alpha", None)
        second = engine.generate(**inputs, max_new_tokens=32)
        assert torch.equal(first.sequences, reference) and torch.equal(second.sequences, reference)
        opening = second.stats.steps[0]
        if isinstance(policy, CostAwareSagePolicy):
            assert learned_alpha is not None and opening.alpha == learned_alpha  # an adaptive tree's record
        else:
            assert opening.alpha is None and opening.tree_slots == static_round


def measured_costs() -> CostModel:
    """A cost model that has seen steps of known costs (synthetic_step's: a draft level 2 ms, a verified token 0.1 ms
    over a 5 ms verify, 3 ms fixed)."""
    costs = CostModel()
    for step in range(40):
        depth = 2 + step % 6
        costs.observe(synthetic_step(slots=3 * depth, depth=depth, accepted=2))
    return costs


def test_the_kind_whose_trials_gave_more_tokens_per_second_runs():
    """Trials come in rounds, a step of each kind close together (the same passage for both), the first two rounds at
    the first steps and then one every ``trial_every`` steps; each kind's trial follows a step of its own kind (a
    warm-up step first where the last step was of another), the kind of the last step first. The other steps run
    the chain only where its trials gave more tokens per second than the tree's by more than a standard error of
    the difference (both priced alike: their mean tokens, forwards and slots through the cost model; two trials of
    each at least); steps that are not trials do not move the rates. While rounds confirm the preference the gap
    between them doubles (up to ``max_trial_gap``); a change of preference brings it back."""
    costs = measured_costs()
    choice = ProposalChoice(max_length=12, trial_every=4, max_trial_gap=16)
    # the first round: the tree's trial (the prompt before it), a chain step, the chain's trial at its optimistic
    # length
    assert [choice.next_length(limit=64) for _ in range(3)] == [(0, True), (12, False), (12, True)]
    choice.observe_tree(accepted=1, forwards=3, slots=8, trial=True)
    choice.observe_chain(accepted=8, levels=8, trial=True)
    choice.decide(costs)
    assert choice.tree.per_second(costs) == pytest.approx(2 / costs.seconds_for(3, 8))
    assert choice.chain.per_second(costs) == pytest.approx(9 / costs.seconds_for(8, 8))
    assert not choice.prefers_chain  # one trial of each: nothing yet says how sure the rates are
    length = choice.chain_length
    # so the second round runs at once: the chain's trial first (the last step was a chain), then the tree's
    assert [choice.next_length(limit=64) for _ in range(3)] == [(length, True), (0, False), (0, True)]
    assert choice.trial_gap == 4  # (the first round began before any trial: it confirms nothing)
    choice.observe_tree(accepted=2, forwards=3, slots=8, trial=True)
    choice.observe_chain(accepted=8, levels=8, trial=True)
    choice.decide(costs)
    tree_rates = [tokens / costs.seconds_for(3, 8) for tokens in (2, 3)]
    spread = abs(tree_rates[1] - tree_rates[0]) / 2  # (two trials: their standard error, the weights aside)
    assert choice.tree.rate_error(costs) == pytest.approx(spread, rel=0.06) and choice.chain.rate_error(costs) == 0
    assert choice.prefers_chain and choice.chain_length == length
    choice.observe_tree(accepted=9, forwards=3, slots=8)  # not a trial: the rates stay
    choice.decide(costs)
    assert choice.prefers_chain and choice.tree.steps == 2 and choice.tree_steps == 3
    # step 6 the chain; the round at step 7, four after the second began, finds the preference changed: the gap
    # stays trial_every
    round_from_chain = [(length, True), (0, False), (0, True)]
    assert [choice.next_length(limit=64) for _ in range(4)] == [(length, False)] + round_from_chain
    assert choice.trial_gap == 4
    rounds = [(11, 1, 8), (19, 5, 16)]  # (the step a round begins, chain steps before it, the gap it sets)
    for begins, before, gap in rounds:
        choice.observe_tree(accepted=1, forwards=3, slots=8, trial=True)  # the last round's: the chain still wins
        choice.observe_chain(accepted=8, levels=8, trial=True)
        choice.decide(costs)
        assert choice.prefers_chain
        assert [choice.next_length(limit=64) for _ in range(before + 3)] == [(length, False)] * before + round_from_chain
        assert choice._steps == begins + 3 and choice.trial_gap == gap
    # the gap goes no further (max_trial_gap): the next round at step 35
    assert [choice.next_length(limit=64) for _ in range(16)] == [(length, False)] * 13 + round_from_chain
    assert choice.trial_gap == 16
    for _ in range(6):  # trees win from now on
        choice.observe_tree(accepted=6, forwards=5, slots=15, trial=True)
        choice.observe_chain(accepted=0, levels=3, trial=True)
    choice.decide(costs)
    assert not choice.prefers_chain
    short = choice.chain_length
    # the round at step 51 (the tree's trial first) finds the preference changed: the gap is trial_every again
    assert [choice.next_length(limit=64) for _ in range(16)] == [(0, False)] * 13 + [(0, True), (short, False),
                                                                                    (short, True)]
    assert choice.trial_gap == 4
    choice.decide(costs, rows=2)  # a batch: trees only, no trial
    assert [choice.next_length(limit=64) for _ in range(10)] == [(0, False)] * 10


def test_a_new_generation_needs_no_warm_up_before_a_trial():
    """A generation's first step starts from the prompt, in neither kind's aftermath: a round of trials due there
    begins with the tree's trial at once, where after a chain step it would begin with the chain's."""
    choice = ProposalChoice(max_length=6, trial_every=2, max_trial_gap=2)
    assert [choice.next_length(limit=64) for _ in range(6)] == [
        (0, True), (6, False), (6, True), (6, True), (0, False), (0, True)]
    choice.new_generation()
    assert [choice.next_length(limit=64) for _ in range(3)] == [(0, True), (6, False), (6, True)]  # (due at step 6)


def test_a_chain_ahead_by_less_than_its_trials_spread_does_not_run():
    """Trials that vary from one passage to the next: a chain whose trials' mean is ahead of the tree's by less than
    a standard error of the difference does not run; the same means with trials that agree do."""
    costs = measured_costs()
    noisy, steady = ProposalChoice(max_length=12), ProposalChoice(max_length=12)
    for accepted in (0, 8, 1, 9):  # mean 4.5 accepted: about 1.6x the tree's tokens, but one trial in two fails
        noisy.observe_tree(accepted=2, forwards=4, slots=12, trial=True)
        noisy.observe_chain(accepted=accepted, levels=8, trial=True)
        steady.observe_tree(accepted=2, forwards=4, slots=12, trial=True)
        steady.observe_chain(accepted=4, levels=8, trial=True)
    noisy.decide(costs)
    steady.decide(costs)
    assert noisy.chain.per_second(costs) > 1.1 * noisy.tree.per_second(costs)
    assert not noisy.prefers_chain
    assert steady.prefers_chain and steady.chain.per_second(costs) < noisy.chain.per_second(costs)


def test_the_chains_length_and_stop_follow_its_acceptance():
    """The chain's length is the one with the most expected tokens per second from how deep chains are accepted
    (optimistic until shown: a short chain could not show how deep it goes), at most the limit it is given; its
    per-level stop does not pay at a mass its levels have never been accepted at."""
    costs = measured_costs()
    choice = ProposalChoice(max_length=12)
    choice.decide(costs)
    fresh_length = choice.chain_length
    assert fresh_length >= 6
    for _ in range(30):  # the second token of a chain rejected every time
        choice.observe_chain(accepted=1, levels=fresh_length, level_mass=[0.6] + [0.3] * (fresh_length - 1))
    choice.decide(costs)
    assert choice.chain_depths.probabilities()[1] < 0.2 and choice.chain_length <= 2
    [choice.next_length(limit=64) for _ in range(2)]  # the tree's trial, the chain's warm-up
    assert choice.next_length(limit=1) == (1, True)  # the chain's trial, cut to the limit
    assert choice.chain_stops(costs) is None  # no rate yet: what a token is worth is unknown
    choice.observe_tree(accepted=2, forwards=4, slots=12, trial=True)
    assert not choice.chain_stops(costs).pays(2, 0.3, 1)  # past level 2 at mass 0.3, never accepted there
    _, values = choice.chain_masses.curve()
    assert values[-1] == 1.0 and values[4] < 0.1


def test_the_chains_shape_is_estimated_when_asked_as_it_would_have_been_at_decide():
    """The chain's length and stop are estimated only when asked (a chain step), from the costs of the last
    ``decide``: asked steps later, they are what they would have been right after it; the observations of a new step
    are taken with its ``decide``."""
    costs = measured_costs()
    eager, lazy = ProposalChoice(max_length=12), ProposalChoice(max_length=12)
    outcomes = [(3, 4, [0.9, 0.8, 0.5, 0.3]), (12, 12, [0.99] * 12), (1, 6, [0.9, 0.4, 0.3, 0.2, 0.1, 0.1])] * 4
    for step, (accepted, levels, mass) in enumerate(outcomes):
        for choice in (eager, lazy):
            choice.observe_chain(accepted=accepted, levels=levels, level_mass=mass, trial=True)
            choice.observe_tree(accepted=2 + step % 3, forwards=4, slots=12, trial=True)
            choice.decide(costs)
        stops = eager.chain_go_on
        shape = (eager.chain_length, stops.masses, stops.values, stops.scales, stops.cost_fixed)
        if step % 4 == 3:  # the lazy choice asked only now and then: the same answer as the eager one
            stops = lazy.chain_go_on
            assert (lazy.chain_length, stops.masses, stops.values, stops.scales, stops.cost_fixed) == shape
    assert lazy.chain_go_on is not None and 1 <= lazy.chain_length <= 12


def test_optimistic_mass_acceptance_starts_at_one():
    """The chain's acceptance by mass: 1 until shown otherwise, never more at a mass than a larger one shows."""
    masses = MassAcceptance(optimistic=True)
    assert masses.curve()[1] == [1.0] * len(masses.centres)
    for _ in range(50):
        masses.observe(0, [0.6])  # a level of mass 0.6 never accepted
    _, values = masses.curve()
    assert values[6] < 0.1 and all(v <= values[6] for v in values[:6]) and values[-1] == 1.0


def test_a_draft_identical_to_the_target_gets_long_chains():
    """A copy of a random-weight target as the draft: its greedy token is always right while its distributions
    are wide, so SAGE's confidence reads low and its trees stay shallow. sage_cost tries the greedy chain, learns
    that every node of it is accepted and proposes it at the longest length that pays: more tokens a step than a
    5-token chain, where without chains it gets fewer (a second generation, after the first's trials); greedy output
    identical to the target's throughout."""
    target, inputs = tiny_llama(seed=3)
    reference = hf_greedy(target, inputs, max_new_tokens=80, eos_token_id=-1)  # no EOS: every step runs
    taus = {}
    for chains in (True, False):
        policy = CostAwareSagePolicy(chains=chains)
        engine = SpeculativeGenerator(target, same_draft(target), policy)
        engine.host_clock = priced_clock(engine, {"draft_decode": 0.25, "target_verify": 1.0})
        for _ in range(2):
            out = engine.generate(**inputs, max_new_tokens=80, eos_token_id=-1)
            assert torch.equal(out.sequences, reference)
        late = out.stats.steps[:-1]  # (the last step is cut by max_new_tokens)
        taus[chains] = sum(step.tau for step in late) / len(late)
        if chains:
            proposals = policy.learned.proposals
            assert proposals.chain_steps > 0 and min(proposals.chain_depths.probabilities()) > 0.9
            assert policy.describe()["chain_length"] == policy.d_max_cap
        else:
            assert policy.learned.proposals.chain_steps == 0
    assert taus[True] > 5.0 > taus[False], taus


def test_a_trial_cut_short_by_max_new_tokens_is_no_trial():
    """A trial step whose proposal the tokens left to max_new_tokens cut short (a tree below its d_max, a chain below
    its length) counts as an ordinary step: its kind's rate would be priced by a step it could not take. Short
    generations make such steps common; every other trial stays one, and a trial cut short is not lost: the next
    step proposes its kind's trial again."""
    target, inputs = tiny_llama(seed=3)
    policy = CostAwareSagePolicy()
    engine = SpeculativeGenerator(target, correlated_draft(target, noise=0.3), policy)
    proposals = policy.learned.proposals
    drawn, next_length, build = [], proposals.next_length, policy.build

    def recorded_next_length(limit):
        drawn.append(next_length(limit))
        return drawn[-1]

    def recorded_build(ctx):
        count = len(drawn)
        proposal = yield from build(ctx)
        if len(drawn) > count:  # a step that chose between tree and chain (not SAGE's first round)
            length, trial = drawn[-1]
            seen.append((trial, proposal.trial, ctx.depth_limit, length or policy.d_max, length))
        return proposal

    proposals.next_length, policy.build, seen = recorded_next_length, recorded_build, []
    for max_new_tokens in (6, 9, 5, 12, 7, 10, 4, 8) * 3:
        out = engine.generate(**inputs, max_new_tokens=max_new_tokens)
        assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=max_new_tokens))
    assert all(kept == (trial and limit >= wanted) for trial, kept, limit, wanted, _ in seen), seen
    assert any(trial and not kept for trial, kept, _, _, _ in seen) and any(kept for _, kept, _, _, _ in seen)
    for (trial, kept, _, _, length), (next_trial, _, _, _, next_length) in zip(seen, seen[1:]):
        if trial and not kept:  # (the same kind, a trial again)
            assert next_trial and (next_length > 0) == (length > 0), seen


def test_the_target_alone_runs_where_it_beats_drafting():
    """With ``max_alone_run`` a round of trials takes the target alone between tree and chain (once drafting has been
    seen, ``alone_after`` steps, and could lose to it); the steps that are not trials run the target alone once its
    measured rate is ``alone_margin`` times what drafting gave over its recent steps, all of them (``drafted``; never
    in a batch), at most ``max_alone_run`` in a row (then the preferred drafting kind: the draft catches up), and a new
    generation starts a new run."""
    costs = measured_costs()
    choice = ProposalChoice(max_length=12, trial_every=8, max_trial_gap=16, max_alone_run=3)
    alone = ProposalChoice.ALONE
    # no drafting seen yet: the tree's trial, the chain's after a warm-up step
    assert [choice.next_length(limit=64) for _ in range(3)] == [(0, True), (12, False), (12, True)]
    choice.observe_tree(accepted=0, forwards=3, slots=8, trial=True)
    choice.observe_chain(accepted=0, levels=3, trial=True)
    choice.decide(costs)
    # (the decayed means of both steps' tokens, forwards and slots, priced: the second weighs 1 / (1 + 0.95))
    assert choice.drafted.per_second(costs) == pytest.approx(1 / costs.seconds_for(3, 8 + (3 - 8) / 1.95))
    assert not choice.alone_worth_a_trial  # two drafted steps: too few to judge drafting by
    choice.observe_tree(accepted=0, forwards=3, slots=8)
    choice.observe_chain(accepted=0, levels=3)  # (ordinary steps count too)
    choice.decide(costs)
    drafted_rate, length = choice.drafted.per_second(costs), choice.chain_length
    # a token a step of 3 draft forwards and a verify: the target alone's guessed rate is above drafting's
    assert choice.drafted.steps == 4 and 1 / costs.alone_seconds() > drafted_rate
    assert choice.alone_worth_a_trial and not choice.prefers_alone  # (not measured yet)
    # steps 3-5 the second round (the first two run back to back): the chain first (the last step's kind), the target
    # alone, the tree's trial after it with no warm-up step (the target alone leaves neither kind's aftermath)
    assert [choice.next_length(limit=64) for _ in range(3)] == [(length, True), (alone, True), (0, True)]
    choice.observe_alone(seconds=1.0 / (1.5 * drafted_rate))  # 1.5x drafting
    choice.decide(costs)
    assert choice.prefers_alone
    # steps 6-8 alone, step 9 drafts (the run is at max_alone_run), 10 alone, step 11 the next round (the tree's
    # trial at once after the target alone, the target alone, the chain's trial)
    assert [choice.next_length(limit=64) for _ in range(8)] == [(alone, False)] * 3 + [(0, False), (alone, False)] + [
        (0, True), (alone, True), (length, True)]
    assert choice.next_length(limit=64) == (alone, False)
    choice.new_generation()  # a fresh draft: a new run of three
    assert [choice.next_length(limit=64) for _ in range(3)] == [(alone, False)] * 3
    choice.observe_alone(seconds=1.0 / (0.6 * drafted_rate))  # the decayed mean: below the margin, drafting again
    choice.decide(costs)
    assert not choice.prefers_alone and choice.alone.steps == 2 and choice.alone_steps == 2
    choice.observe_alone(seconds=1.0 / (3 * drafted_rate))
    choice.decide(costs, rows=2)  # a batch: trees only
    assert not choice.prefers_alone and choice.next_length(limit=64) == (0, False)
    never = ProposalChoice(max_length=12)  # max_alone_run 0: tree and chain only, as before
    assert [never.next_length(limit=64)[0] for _ in range(5)] == [0, 12, 12, 12, 0]


def test_a_target_alone_priced_at_nothing_is_worth_a_trial():
    """A cost model that has seen no verify and no fixed cost guesses a step of the target alone at 0 seconds (a
    priced clock can do that): a trial is worth it, and nothing divides by zero."""
    costs = CostModel()
    for step in range(4):
        costs.observe(synthetic_step(slots=4, depth=2 + step % 2, accepted=1, verify0=0.0, verify1=0.0, fixed=0.0))
    choice = ProposalChoice(max_length=4, max_alone_run=3)
    for _ in range(choice.alone_after):
        choice.observe_tree(accepted=1, forwards=3, slots=4)
    choice.decide(costs)
    assert costs.alone_seconds() == 0.0 and choice.drafted.per_second(costs) > 0
    assert choice.alone_worth_a_trial and not choice.prefers_alone


def test_no_trial_of_the_target_alone_where_drafting_gives_far_more():
    """Where drafting gives several tokens for a step's cost, the cost model's guess at the target alone's rate is far
    below drafting's: the rounds of trials leave it out, so no step is spent on a kind that cannot win."""
    costs = measured_costs()
    choice = ProposalChoice(max_length=12, trial_every=4, max_trial_gap=4, max_alone_run=3)
    trials = []
    for _ in range(23):
        length, trial = choice.next_length(limit=64)
        assert length != ProposalChoice.ALONE
        if length == 0:
            choice.observe_tree(accepted=8, forwards=9, slots=24, trial=trial)
        else:
            choice.observe_chain(accepted=min(8, length), levels=length, trial=trial)
        choice.decide(costs)
        if trial:
            trials.append("chain" if length else "tree")
    assert choice.alone_worth_a_trial is False and choice.alone.steps == 0
    assert 1 / costs.alone_seconds() < choice.drafted.per_second(costs) / choice.alone_margin
    # the first two rounds back to back (steps 0-5), then one every 4 steps (from step 7): six in 23 steps, each a
    # trial of the tree and one of the chain (the last step's kind first), none of the target alone
    assert len(trials) == 12 and all(set(trials[i:i + 2]) == {"tree", "chain"} for i in range(0, 12, 2)), trials


@pytest.mark.parametrize("draft_price, alone_expected", [(10.0, True), (1e-3, False)])
def test_the_target_alone_where_drafting_does_not_pay(draft_price, alone_expected):
    """Priced draft forwards: where one costs ten verifies, sage_cost's steps run the target alone (no draft forward)
    but for its trials and the draft's catch-up every max_alone_run steps; where drafting is nearly free, none do (not
    even a trial: it could not win). Greedy output identical either way, over generations that share what was
    learned."""
    target, inputs = tiny_llama(seed=3)
    reference = hf_greedy(target, inputs, max_new_tokens=64, eos_token_id=-1)
    policy = CostAwareSagePolicy()
    engine = SpeculativeGenerator(target, correlated_draft(target, noise=0.3), policy)
    engine.host_clock = priced_clock(engine, {"draft_decode": draft_price, "target_verify": 1.0})
    for _ in range(3):
        out = engine.generate(**inputs, max_new_tokens=64, eos_token_id=-1)
        assert torch.equal(out.sequences, reference)
    steps = out.stats.steps[:-1]  # (the last: one token left, the root alone whatever the policy)
    alone = sum(step.draft_forwards == 0 for step in steps)
    assert policy.learned.proposals.prefers_alone == alone_expected
    if alone_expected:
        assert alone > 0.7 * len(steps), [step.draft_forwards for step in steps]
    else:
        assert alone == 0 and policy.learned.proposals.alone.steps == 0, [step.draft_forwards for step in steps]
