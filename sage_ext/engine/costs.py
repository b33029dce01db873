"""What a speculation step costs and how deep the draft gets accepted, learned while the engine runs.

The engine measures every step anyway (its ``Timeline``); a cost-aware policy (``CostAwareSagePolicy``) is
handed each finished step as a ``StepCost`` one step late: on CUDA the previous step's events are complete once
this step's readback has synchronized, so reading them costs no extra host-device sync. From those it keeps:

- ``CostModel``: a step's draft seconds as a line in its draft forwards (the slope is what one more level
  costs), the target's verify as a plane in the batch's rows and its verified tokens (both weighted least
  squares) and the rest of a step (tree ops, bookkeeping); exponentially weighted, so a busier machine, a longer
  context or another batch size moves the estimates within a few dozen steps.
- ``DepthAcceptance``: the probability that depth d is accepted given depth d-1 was and the tree reached d,
  from each step's accepted length (Beta counts, decayed). A depth never reached borrows the estimate of the
  one above it, so deeper trees are neither ruled out nor assumed free.
- ``best_depth``: the depth cap with the most expected tokens per second, given how deep a tree gets under
  a cap (for SAGE: ``d_min + alpha (cap - d_min)`` at the draft's recent confidence).
- ``NodeAcceptance``: how often a node of cumulative draft probability p at depth d is accepted (``c_d p``,
  calibrated from each step's probability mass per depth and its accepted length), and ``node_threshold``: the
  least p for which a node's expected tokens are worth the verify time it adds.
- ``MassAcceptance``: how often a depth is accepted given the tree's probability mass there (bins, monotone), and
  ``level_stops``: within a step, whether one more draft level is worth its cost at the probability mass
  the tree holds at its current depth (SpecDec++'s stop rule); the workspace applies it as it builds each level
  (one prompt at a time: in a batch the shared draft forward runs while any row goes on).
- ``ProposalChoice``: whether a step proposes the policy's tree or a chain of the draft's greedy tokens (the two
  compared by trials, every few steps one or the other whatever the preference), and the chain's length and stop.

A batch step is one step of all its rows: its seconds are the batch's, the verify's tokens are every row's tree
padded to the largest (``rows`` x (slots + 1); each row also costs its own attention over its past, kept apart
as the verify's cost per row), and each row's accepted length counts for the acceptance; the
best depth is then the one with the most tokens per second for the batch (every row's cap is the same).

What a policy has learned (``CostLearning``) outlasts ``generate`` calls: it describes one pair of models on
one device. ``learning_for`` keeps one record per (target, draft, device) for the process, so every
``SpeculativeGenerator`` built with ``policy="sage_cost"`` for the same models (e.g. each ``sage_ext.generate``
call) starts from what the previous ones measured instead of from the priors; it is dropped with the models.
"""
from __future__ import annotations

import bisect
import math
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .. import _C


@dataclass
class RowOutcome:
    """What one row's tree of a step gave: accepted draft tokens, levels built and, when the policy measured it,
    the tree's draft probability mass per depth (``level_mass[d - 1]``: the sum of the cumulative draft
    probabilities of its depth-d nodes) and the proposal's ``shape`` and ``trial`` (``TreeProposal``'s)."""

    accepted: int
    tree_depth: int
    level_mass: tuple[float, ...] = ()
    shape: str = "tree"  # "tree": the policy's own; "chain": the draft's greedy chain; "fixed": a fixed-shape tree;
    # "alone": no draft (the target's own step)
    trial: bool = False  # the proposal's kind was a trial's (``ProposalChoice``), not the preferred one


@dataclass
class StepCost:
    """One finished step: measured seconds and the tree that was verified."""

    seconds: float  # the whole step
    draft_seconds: float  # its draft forwards
    verify_seconds: float  # the target's verify forward
    draft_forwards: int
    verified_slots: int  # draft slots the target verified per row (root excluded, padding included)
    tree_depth: int  # levels built (a batch: its deepest row's)
    outcomes: tuple[RowOutcome, ...]  # every row's (one for a single prompt)

    @property
    def rows(self) -> int:
        """Rows verified in the step (the batch size)."""
        return len(self.outcomes)


class _WeightedLine:
    """y = intercept + slope * x by exponentially weighted least squares (the running means of x, y, x^2, xy)."""

    def __init__(self):
        self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float, rate: float) -> None:
        self.x += rate * (x - self.x)
        self.y += rate * (y - self.y)
        self.xx += rate * (x * x - self.xx)
        self.xy += rate * (x * y - self.xy)

    def fit(self, prior_slope: float = 0.0, prior_variance: float = 0.0) -> tuple[float, float]:
        """(intercept, slope), slope never negative. ``prior_variance`` > 0 shrinks the slope towards
        ``prior_slope`` while x has varied less than that (ridge towards the prior); without it the slope is 0
        until x varies (then all of y is the intercept)."""
        variance = self.xx - self.x * self.x
        covariance = self.xy - self.x * self.y
        if variance + prior_variance > 1e-9:
            slope = (covariance + prior_variance * prior_slope) / (variance + prior_variance)
        else:
            slope = 0.0
        slope = max(0.0, slope)
        return max(0.0, self.y - slope * self.x), slope


class _WeightedPlane:
    """y = intercept + slope_1 x_1 + slope_2 x_2 by exponentially weighted least squares (running means of x, y and
    their products). A regressor that has not varied (variance ~0, e.g. the batch size of one-prompt runs) gets
    slope 0 and its part stays in the intercept; a slope that would come out negative is dropped likewise."""

    def __init__(self):
        self.mean = [0.0, 0.0, 0.0]  # x_1, x_2, y
        self.products = [[0.0] * 3 for _ in range(3)]  # E[u v] for u, v in (x_1, x_2, y)

    def add(self, x1: float, x2: float, y: float, rate: float) -> None:
        values = (x1, x2, y)
        for i in range(3):
            self.mean[i] += rate * (values[i] - self.mean[i])
            for j in range(3):
                self.products[i][j] += rate * (values[i] * values[j] - self.products[i][j])

    def _covariance(self, i: int, j: int) -> float:
        return self.products[i][j] - self.mean[i] * self.mean[j]

    def fit(self) -> tuple[float, float, float]:
        """(intercept, slope_1, slope_2), slopes never negative."""
        used = [i for i in (0, 1) if self._covariance(i, i) > 1e-9 * max(1.0, self.mean[i] ** 2)]
        slopes = [0.0, 0.0]
        while used:
            if len(used) == 1:
                i = used[0]
                solution = {i: self._covariance(i, 2) / self._covariance(i, i)}
            else:
                a, b, d = self._covariance(0, 0), self._covariance(0, 1), self._covariance(1, 1)
                det = a * d - b * b
                if det <= 1e-12 * a * d:  # the two moved together: keep the one that explains more
                    used = [max(used, key=lambda k: self._covariance(k, 2) ** 2 / self._covariance(k, k))]
                    continue
                solution = {0: (d * self._covariance(0, 2) - b * self._covariance(1, 2)) / det,
                            1: (a * self._covariance(1, 2) - b * self._covariance(0, 2)) / det}
            negative = [i for i in used if solution[i] < 0.0]
            if not negative:
                for i in used:
                    slopes[i] = solution[i]
                break
            used = [i for i in used if i not in negative]
        intercept = self.mean[2] - slopes[0] * self.mean[0] - slopes[1] * self.mean[1]
        return max(0.0, intercept), slopes[0], slopes[1]


class CostModel:
    """Exponentially weighted step costs (``decay`` per observed step).

    Draft seconds are a line in the step's draft forwards: the first forward of a step (the tokens accepted last
    step plus the root) costs more than a level's, and only the slope, one more level, is what a deeper tree
    adds. The verify is a plane in the batch's rows and its verified tokens (tree slots + root, times the rows):
    the cost per token is what one more node adds, the cost per row what one more prompt in the batch does."""

    def __init__(self, decay: float = 0.9):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self._weight = 0.0
        self._fixed = 0.0  # seconds of a step outside draft forwards and the verify
        self._extra_forwards = 0.0  # draft forwards beyond the tree depth (the root forward, feeds)
        self._slots_per_level = 0.0
        self._draft = _WeightedLine()  # draft seconds against draft forwards
        self._verify = _WeightedPlane()  # verify seconds against the rows and the verified tokens
        self._verify_fit = (0.0, 0.0, 0.0)  # its (intercept, per row, per token), refitted once per observed step
        self._draft_fit = (0.0, 0.0)  # the draft line's (intercept, slope), likewise

    def observe(self, cost: StepCost) -> None:
        self.steps += 1
        self._weight = self.decay * self._weight + 1.0
        rate = 1.0 / self._weight  # the running weighted mean's step size
        self._fixed += rate * (max(0.0, cost.seconds - cost.draft_seconds - cost.verify_seconds) - self._fixed)
        if not any(outcome.shape == "chain" for outcome in cost.outcomes):
            # the shape of the policy's trees (what ``step_seconds`` assumes); a chain step says nothing about it
            self._extra_forwards += rate * (max(0, cost.draft_forwards - cost.tree_depth) - self._extra_forwards)
            if cost.tree_depth > 0:
                self._slots_per_level += rate * (cost.verified_slots / cost.tree_depth - self._slots_per_level)
        self._draft.add(float(cost.draft_forwards), cost.draft_seconds, rate)
        self._verify.add(float(cost.rows), float(cost.rows * (cost.verified_slots + 1)), cost.verify_seconds, rate)
        self._verify_fit = self._verify.fit()
        draft = self._draft
        proportional = draft.y / draft.x if draft.x > 0 else 0.0
        self._draft_fit = draft.fit(prior_slope=proportional, prior_variance=1.0)

    @property
    def estimated(self) -> bool:
        """Whether every cost has a first estimate (two observed steps): what the policy's decisions wait for."""
        return self.steps >= 2

    @property
    def fixed_seconds(self) -> float:
        return self._fixed

    def draft_line(self) -> tuple[float, float]:
        """(intercept, slope) of a step's draft seconds against its draft forwards. Until the forwards per step
        have varied by about one, the slope leans towards draft seconds / forwards (every forward alike):
        taking a level for free because the tree depth never changed would send the cap to its maximum. (Refitted
        once per observed step.)"""
        return self._draft_fit

    def verify_line(self) -> tuple[float, float]:
        """(intercept, slope) of one row's verify seconds against its verified tokens (slots + root). Slope 0
        until the tree sizes seen vary (a fixed tree cannot tell the two apart)."""
        intercept, per_row, per_token = self._verify_fit
        return intercept + per_row, per_token

    def verify_per_row(self) -> float:
        """What one more batch row adds to a verify besides its tokens (attention over its own past, its share
        of the forward's fixed work): kept apart so that batch size is not read as cost per token. 0 while the
        batch size has not varied."""
        return self._verify_fit[1]

    def step_seconds(self, depth: float, rows: int = 1) -> float:
        """Predicted seconds of a step whose trees are ``depth`` levels deep, for a batch of ``rows``."""
        return self.seconds_for(depth + self._extra_forwards, self._slots_per_level * depth, rows)

    def seconds_for(self, forwards: float, slots: float, rows: int = 1) -> float:
        """Predicted seconds of a step of ``forwards`` draft forwards whose trees have ``slots`` draft slots each,
        for a batch of ``rows``."""
        draft_intercept, per_forward = self.draft_line()
        verify_intercept, per_row, per_token = self._verify_fit
        return (self._fixed + draft_intercept + per_forward * forwards + verify_intercept + per_row * rows
                + per_token * rows * (slots + 1))

    def alone_seconds(self, rows: int = 1) -> float:
        """Predicted seconds of a step of the target alone (no draft forward; each row's root verified). On the high
        side: the fixed part is that of the drafted steps observed, their tree work included."""
        verify_intercept, per_row, per_token = self._verify_fit
        return self._fixed + verify_intercept + (per_row + per_token) * rows

    def describe(self) -> dict:
        draft_intercept, per_forward = self.draft_line()
        verify_intercept, per_row, per_token = self._verify_fit
        return {"steps": self.steps, "fixed_s": self._fixed, "draft_intercept_s": draft_intercept,
                "draft_per_forward_s": per_forward, "verify_intercept_s": verify_intercept,
                "verify_per_row_s": per_row, "verify_per_token_s": per_token, "extra_forwards": self._extra_forwards,
                "slots_per_level": self._slots_per_level}


class DepthAcceptance:
    """P(depth d accepted | depth d-1 accepted, the tree reached d), d = 1..max_depth, from accepted lengths."""

    def __init__(self, max_depth: int, decay: float = 0.95, prior: float = 0.7, prior_weight: float = 2.0):
        if max_depth < 1 or not 0.0 < decay <= 1.0 or not 0.0 < prior < 1.0 or prior_weight <= 0:
            raise ValueError("need max_depth >= 1, decay in (0, 1], prior in (0, 1), prior_weight > 0")
        self.max_depth, self.decay, self.prior, self.prior_weight = max_depth, decay, prior, prior_weight
        self._accepted = [0.0] * (max_depth + 1)  # index d: decayed count of steps that accepted depth d
        self._reached = [0.0] * (max_depth + 1)  # index d: decayed count of steps whose depth d was tried

    def observe(self, accepted: int, tree_depth: int) -> None:
        """A step that built ``tree_depth`` levels and accepted ``accepted`` draft tokens: depths 1..accepted
        were accepted, depth accepted + 1 (if built) was tried and rejected."""
        d = self.decay  # (index 0 is not a depth: it stays 0)
        self._accepted = [count * d for count in self._accepted]
        self._reached = [count * d for count in self._reached]
        for depth in range(1, min(accepted + 1, tree_depth, self.max_depth) + 1):
            self._reached[depth] += 1.0
            if depth <= accepted:
                self._accepted[depth] += 1.0

    def probabilities(self) -> list[float]:
        """[p_1, ..., p_max_depth]: each shrunk towards the one above it (p_0 = ``prior``)."""
        out, above = [], self.prior
        for depth in range(1, self.max_depth + 1):
            p = (self._accepted[depth] + self.prior_weight * above) / (self._reached[depth] + self.prior_weight)
            out.append(p)
            above = p
        return out


class NodeAcceptance:
    """P(a tree node is accepted | its cumulative draft probability p, its depth d) = min(1, c_d p), calibrated
    online from every step's outcome (greedy or sampling alike).

    At most one node per depth is accepted (the accepted path), so a step's accepted count at depth d is
    ``1[tau >= d]``, and the model expects ``c_d`` times the tree's probability mass at that depth. ``c_d`` is the
    decayed sum of the one over the decayed sum of the other, over the steps whose tree reached depth d, shrunk
    towards ``prior`` (1: the draft's confidence read as acceptance, EAGLE-2's observation) with ``prior_weight``
    steps' worth of mass. A draft that is right more often than it is sure gets c_d > 1, an overconfident one
    c_d < 1."""

    def __init__(self, max_depth: int, decay: float = 0.95, prior: float = 1.0, prior_weight: float = 1.0):
        if max_depth < 1 or not 0.0 < decay <= 1.0 or prior <= 0.0 or prior_weight <= 0:
            raise ValueError("need max_depth >= 1, decay in (0, 1], prior > 0, prior_weight > 0")
        self.max_depth, self.decay, self.prior, self.prior_weight = max_depth, decay, prior, prior_weight
        self._accepted = [0.0] * max_depth  # index d - 1: decayed count of steps that accepted depth d
        self._mass = [0.0] * max_depth  # index d - 1: decayed sum of the trees' mass at depth d
        self.steps = 0

    def observe(self, accepted: int, level_mass: tuple[float, ...] | list[float]) -> None:
        """A step whose tree had ``level_mass[d - 1]`` probability mass at depth d and accepted ``accepted``
        draft tokens."""
        if not level_mass:
            return
        self.steps += 1
        d = self.decay
        self._accepted = [count * d for count in self._accepted]
        self._mass = [mass * d for mass in self._mass]
        for index, mass in enumerate(level_mass[: self.max_depth]):
            if mass > 0.0:
                self._mass[index] += mass
                self._accepted[index] += 1.0 if accepted > index else 0.0

    def calibration(self) -> list[float]:
        """[c_1, ..., c_max_depth]."""
        w, prior = self.prior_weight, self.prior
        return [(a + w * prior) / (m + w) for a, m in zip(self._accepted, self._mass)]

    def probability(self, p: float, depth: int) -> float:
        """The chance that a depth-``depth`` node of cumulative draft probability ``p`` is accepted."""
        return min(1.0, self.calibration()[min(depth, self.max_depth) - 1] * p)


def node_threshold(costs: "CostModel", seconds_per_token: float, calibration: float) -> float:
    """The least cumulative draft probability a tree node must have to pay for itself: its expected accepted
    tokens (``calibration x p``) times the seconds a token costs now must exceed what one more verified token
    costs (the verify line's slope). 0 while either is unknown."""
    _, per_token = costs.verify_line()
    if per_token <= 0.0 or seconds_per_token <= 0.0 or calibration <= 0.0:
        return 0.0
    return per_token / (calibration * seconds_per_token)


class MassAcceptance:
    """P(a tree's depth d is accepted | its draft probability mass m at depth d), by bins of m pooled over depths,
    learned from every step's outcome (greedy or sampling alike).

    A calibrated draft accepts depth d with chance about m (the chance that the target's token is among the nodes
    kept); a draft that is right more often than it is sure (a copy of the target whose distributions are wide,
    say) accepts nearly every level whatever its mass, and an overconfident one less. Each bin holds decayed
    counts of the steps whose mass at some depth fell in it and of those that accepted that depth, shrunk towards
    the bin's mid mass (``prior_weight`` steps' worth); the curve is made non-decreasing in m (more mass never
    accepts less) and read between bin centres linearly. ``optimistic``: every bin shrunk towards 1 instead, and
    the curve made non-decreasing from above (a mass is taken to be accepted until it, or a larger one, is shown
    not to be), for a proposal that must be tried deep before its depths can be judged (the greedy chain)."""

    EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0)

    def __init__(self, decay: float = 0.98, prior_weight: float = 2.0, optimistic: bool = False):
        if not 0.0 < decay <= 1.0 or prior_weight <= 0:
            raise ValueError("need decay in (0, 1] and prior_weight > 0")
        self.decay, self.prior_weight, self.optimistic = decay, prior_weight, optimistic
        edges = self.EDGES
        self.centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        self._accepted = [0.0] * len(self.centres)
        self._seen = [0.0] * len(self.centres)
        self.steps = 0

    def _bin(self, mass: float) -> int:
        # the first bin whose upper edge is above the mass; the last one beyond
        return bisect.bisect_right(self.EDGES, mass, 1, len(self.EDGES) - 1) - 1

    def observe(self, accepted: int, level_mass: tuple[float, ...] | list[float]) -> None:
        """A step whose tree had ``level_mass[d - 1]`` probability mass at depth d and accepted ``accepted``
        draft tokens."""
        if not level_mass:
            return
        self.steps += 1
        self._accepted = [a * self.decay for a in self._accepted]
        self._seen = [n * self.decay for n in self._seen]
        for index, mass in enumerate(level_mass):
            if mass > 0.0:
                b = self._bin(mass)
                self._seen[b] += 1.0
                self._accepted[b] += 1.0 if accepted > index else 0.0

    def curve(self) -> tuple[list[float], list[float]]:
        """(bin centres, acceptance at each), non-decreasing."""
        w = self.prior_weight
        if self.optimistic:  # every bin starts at 1; a mass never accepts more than a larger one has shown
            values, ceiling = [], 1.0
            for accepted, seen in zip(reversed(self._accepted), reversed(self._seen)):
                ceiling = min(ceiling, (accepted + w) / (seen + w))
                values.append(ceiling)
            return list(self.centres), values[::-1]
        values, floor = [], 0.0
        for centre, accepted, seen in zip(self.centres, self._accepted, self._seen):
            floor = max(floor, (accepted + w * centre) / (seen + w))
            values.append(floor)
        return list(self.centres), values


def level_stops(costs: "CostModel", acceptance: "DepthAcceptance", masses: "MassAcceptance",
                seconds_per_token: float) -> "_C.LevelStops":
    """When a tree that has built d levels (d = 1..max_depth) should run one more draft forward: the workspace's
    stop rule (``_C.LevelStops``, every level in one object). Depth d is accepted with the chance
    ``MassAcceptance`` gives the level's draft probability mass, depth d + 1 then with ``p_(d+1)``
    (``DepthAcceptance``); a token is worth ``seconds_per_token``; the forward costs one more draft level (the
    draft line's slope) and each of the level's nodes brings children to verify (the verify line's slope per
    token). SpecDec++'s stop rule with SAGE's proposal: decided per step at the tree's own confidence, where the
    depth cap decides on average."""
    _, per_forward = costs.draft_line()
    _, per_token = costs.verify_line()
    centres, accepted = masses.curve()
    probabilities = acceptance.probabilities()
    last = len(probabilities) - 1
    # level d's value at each mass centre: accepted x (what depth d + 1 brings), multiplied out natively
    scales = [probabilities[min(depth, last)] * seconds_per_token for depth in range(1, acceptance.max_depth + 1)]
    return _C.LevelStops(centres, accepted, scales, per_forward, per_token)


class _ProposalRate:
    """Decayed means of one kind of proposal's steps: tokens (accepted + the bonus), draft forwards, verified slots;
    with ``keep``, the last ``keep`` steps themselves too, for how sure the mean is (``rate_error``)."""

    def __init__(self, decay: float, keep: int = 0):
        self.decay, self.steps = decay, 0
        self.weight = self.tokens = self.forwards = self.slots = 0.0
        self._recent: deque[tuple[int, int, int]] = deque(maxlen=keep)

    def observe(self, accepted: int, forwards: int, slots: int) -> None:
        self.steps += 1
        self.weight = self.decay * self.weight + 1.0
        rate = 1.0 / self.weight
        self.tokens += rate * (accepted + 1 - self.tokens)
        self.forwards += rate * (forwards - self.forwards)
        self.slots += rate * (slots - self.slots)
        if self._recent.maxlen:
            self._recent.append((accepted + 1, forwards, slots))

    def per_second(self, costs: "CostModel") -> float:
        """Tokens per second, the means priced by the cost model (0 before the first step)."""
        seconds = costs.seconds_for(self.forwards, self.slots) if self.steps else 0.0
        return self.tokens / seconds if seconds > 0 else 0.0

    def rate_error(self, costs: "CostModel") -> float:
        """The standard error of the steps' mean rate: the decayed spread of the kept steps' own tokens per second
        (each priced by the cost model, weighted as the means weigh them) over the square root of their effective
        number less one; infinite below two steps."""
        weight = weight_squared = total = total_squared = 0.0
        step_weight = 1.0
        for tokens, forwards, slots in reversed(self._recent):
            seconds = costs.seconds_for(forwards, slots)
            rate = tokens / seconds if seconds > 0 else 0.0
            weight += step_weight
            weight_squared += step_weight * step_weight
            total += step_weight * rate
            total_squared += step_weight * rate * rate
            step_weight *= self.decay
        effective = weight * weight / weight_squared if weight_squared else 0.0
        if effective < 1.5:
            return math.inf
        mean = total / weight
        return math.sqrt(max(0.0, total_squared / weight - mean * mean) / (effective - 1.0))


class _AloneRate:
    """Decayed mean seconds of the target's steps alone (one token each)."""

    def __init__(self, decay: float):
        self.decay, self.steps = decay, 0
        self.weight = self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        self.steps += 1
        self.weight = self.decay * self.weight + 1.0
        self.seconds += (seconds - self.seconds) / self.weight

    def per_second(self) -> float:
        """Tokens per second (0 before the first step)."""
        return 1.0 / self.seconds if self.steps and self.seconds > 0 else 0.0


class ProposalChoice:
    """Which proposal a step makes: the policy's tree, or a chain of the draft's greedy tokens, whichever gives more
    tokens per second; and how the chain is shaped.

    The two are compared by trials: rounds of trials, the first two at the first steps, then one every
    ``trial_every`` steps, each a trial of every kind whatever the preference, close together (each drafting kind's
    trial after a step of its own kind: where the last step drafted with the other, a warm-up step of it first, the
    last step's kind first; the target alone, where tried, between the two), so that the kinds meet the same passage
    of the answer and their rates differ by the kind, not by where each ran (rounds of one kind at a time, in turn,
    the trials of the two 8-64 steps apart: which kind ran most steps of the Qwen2-VL pair's held-out scenes
    changed from one simulated cost ratio to the next, 7-91% chains, and the policy with chains ran 1-3% behind its
    trees alone where those were close); each kind's rate is the decayed mean of its trials' tokens (accepted + the
    bonus), draft forwards and verified slots, priced by the cost model; the other steps run the tree unless the
    chain's rate is above it by more than ``chain_evidence`` standard errors of the difference (the spread of each
    kind's trials' own rates, ``_ProposalRate.rate_error``; at least two trials of each). A trial of the kind that loses costs what it loses, so while
    rounds keep confirming the preference the gap between them doubles (up to ``max_trial_gap`` steps), and it is
    ``trial_every`` again when the preference changes. Only trials count because their kind does not depend on how
    the last steps went: rates taken from every step credit whichever kind happened to run in the easy passages
    (measured on the Qwen2-VL pair: trees run between chains, chosen by all steps' rates, accepted 4.6 tokens a step
    against 5.5 for trees alone on the same scenes, and the chain took over where it loses). A chain wins where the draft's greedy token is right more often
    than its probabilities say (a copy of the target whose distributions are wide: SAGE reads the low confidence as
    low acceptance, builds shallow trees and its threshold drops the greedy path), or where long chains of a sure
    draft cost less than a tree's width brings.

    With ``max_alone_run``, a third kind joins the trials: the target **alone** (no draft forward, the root is the
    tree: an ordinary decode step), priced by the measured seconds of such steps (their cost does not depend on the
    passage, so every one counts). It is weighed against what drafting gave over its recent steps, all of them
    (``drafted``, decayed 0.95 a step: while drafting runs, its steps are every step, chosen by no passage; while
    the target alone runs, drafting's steps are its trials and catch-ups, chosen by the schedule), not against a
    few trials: weighed against the trials, one that met a hard passage sent a Qwen2-VL caption into 18 steps of the
    target alone (that scene ran at 264 tokens/s, the others at 330-440). Where the target alone's rate is ``alone_margin`` times drafting's, the steps that are not trials
    run it: a draft that is never right, or one that costs as much as the target,
    then costs about what plain decoding does instead of up to twice (a contrary draft as large as the target:
    0.45x of target-only decoding before). The draft falls behind meanwhile: the tokens committed are fed with the
    next drafted step's root, so at most ``max_alone_run`` such steps run in a row (what the workspace's first-forward
    buffer holds) before a step drafts again with the preferred drafting kind. It joins a round of trials only once
    drafting has been seen (``alone_after`` steps) and where the cost model's guess at its rate
    (``CostModel.alone_seconds``, on the low side) is within ``alone_margin`` of drafting's: where drafting gives
    several tokens for a step's cost, a trial of the target alone can only lose (the simulated
    cost-ratio studies lost up to 3% to them, 1-5% of their steps, on the Qwen2-VL pair falling behind paper SAGE).

    The chain is shaped like a tree: its length is the one with the most expected tokens per second from how deep
    chains are accepted (``chain_depths``, a ``DepthAcceptance`` of chain steps only; with the level stop, at least
    how deep a sure chain pays, ``LevelStops.sure_depth``), and with dynamic shapes it
    stops at the level where one more is worth less than it costs (``chain_go_on``: ``level_stops`` from the
    chain's own acceptance by depth and by mass, ``chain_masses``); both are estimated when a chain step asks
    (``_shape_chain``, from the costs of the last ``decide``). Both start optimistic (depths accepted with 0.95,
    every mass accepted until shown otherwise): a short chain could never show how deep it goes. In a batch only
    trees run (its draft forwards run while any row's tree goes on, so one row's chain would save none).
    """

    #: by how many standard errors of the difference (``_ProposalRate.rate_error``) the chain's trials' rate must be
    #: above the tree's for the chain to run: a handful of trials decides, and a step's tokens vary 1-13 from one
    #: passage to the next, so a fixed margin either let a lucky round hand a whole run to the losing kind (the
    #: Qwen2-VL pair: five chain trials gave 1.34x the trees' rate, the chain steps that followed 0.93x) or kept
    #: the chain from where it wins by less than the margin (the targets drafting for themselves)
    chain_evidence = 1.0
    #: trials kept for ``rate_error`` (their weights decay 0.9 a trial: the 32nd weighs 3%)
    trials_kept = 32
    #: how much faster the target alone must be than drafting for steps without a draft to run (a step of it
    #: teaches nothing about the draft; drafting's trials while it runs are few)
    alone_margin = 1.2
    #: drafted steps seen before the target alone may run
    alone_after = 4
    #: ``next_length``'s answer for a step of the target alone
    ALONE = -1

    def __init__(self, max_length: int, decay: float = 0.9, trial_every: int = 16, max_trial_gap: int = 128,
                 max_alone_run: int = 0):
        if max_length < 1 or not 0.0 < decay < 1.0 or not 2 <= trial_every <= max_trial_gap or max_alone_run < 0:
            raise ValueError("need max_length >= 1, decay in (0, 1), 2 <= trial_every <= max_trial_gap and "
                             "max_alone_run >= 0")
        self.max_length, self.trial_every, self.max_trial_gap = max_length, trial_every, max_trial_gap
        self.max_alone_run = max_alone_run  # 0: never the target alone
        self.alone = _AloneRate(decay)
        self.drafted = _ProposalRate(0.95)  # every drafted step, trial or not (tree or chain)
        self.prefers_alone = False
        self.alone_worth_a_trial = False  # the target alone joins the next round of trials
        self._alone_run = 0  # steps of the target alone in a row (the draft's backlog)
        self._round: list[str] = []  # the kinds of the round under way still to try
        self._last_kind: str | None = None  # the kind of the generation's last step proposed
        self._round_preference: tuple[bool, bool] | None = None  # (prefers_chain, prefers_alone) as the last began
        self.trial_gap = trial_every  # steps from a round to the next (doubles while rounds confirm the preference)
        self._next_trial = 0  # the step of the next round
        self._rounds_begun = 0
        self.tree, self.chain = (_ProposalRate(decay, keep=self.trials_kept),  # over trials only
                                 _ProposalRate(decay, keep=self.trials_kept))
        # optimistic too: a chain is taken to be accepted deep until it is shown not to be (a short one would never
        # show how deep it could go)
        self.chain_depths = DepthAcceptance(max_length, prior=0.95)
        self.chain_masses = MassAcceptance(optimistic=True)
        self._chain_go_on: _C.LevelStops | None = None  # the chain's stop per level (None: not estimated)
        self._chain_length = max_length  # the chain's best length as last estimated
        self._shape_costs: CostModel | None = None  # the costs the chain's shape is due to be estimated from
        self.prefers_chain = False
        self.batched = False  # the last step observed was a batch's
        self.chain_steps = self.tree_steps = 0  # steps observed of each kind, trials or not
        self._steps = 0  # steps proposed (batched ones aside)

    def observe_tree(self, accepted: int, forwards: int, slots: int, trial: bool = False) -> None:
        """A tree step: ``accepted`` draft tokens, ``forwards`` draft forwards, ``slots`` verified draft slots;
        ``trial``: it was a trial."""
        self.tree_steps += 1
        self.drafted.observe(accepted, forwards, slots)
        if trial:
            self.tree.observe(accepted, forwards, slots)

    def observe_chain(self, accepted: int, levels: int, level_mass: tuple[float, ...] | list[float] = (),
                      trial: bool = False) -> None:
        """A chain step that built ``levels`` tokens (one forward each) and accepted ``accepted``; ``level_mass``: its
        tokens' cumulative draft probabilities, when measured; ``trial``: it was a trial."""
        self.chain_steps += 1
        self.drafted.observe(accepted, levels, levels)
        if trial:
            self.chain.observe(accepted, levels, levels)
        self.chain_depths.observe(accepted, levels)
        self.chain_masses.observe(accepted, level_mass)

    def observe_alone(self, seconds: float) -> None:
        """A step of the target alone that took ``seconds`` (trial or not: every one prices it)."""
        self.alone.observe(seconds)

    def decide(self, costs: "CostModel", rows: int = 1) -> None:
        """After a step of ``rows`` rows is observed: which kind the steps that are not trials run (the chain's length
        and stop are estimated from ``costs`` too, when a chain step asks: ``chain_length``)."""
        self.batched = rows > 1
        self._shape_costs = costs  # the chain's length and stop: estimated when a chain step asks for them
        tree_rate, chain_rate = self.tree.per_second(costs), self.chain.per_second(costs)
        # (an error is infinite below two trials of its kind: no chain before both have two; the errors, a loop over
        # the kept trials, are computed only where the chain is ahead at all)
        prefers_chain = not self.batched and chain_rate > tree_rate and chain_rate - tree_rate > (
            self.chain_evidence * math.hypot(self.tree.rate_error(costs), self.chain.rate_error(costs)))
        drafting_rate = self.drafted.per_second(costs)
        judged = (not self.batched and self.max_alone_run > 0 and self.drafted.steps >= self.alone_after
                  and drafting_rate > 0)  # enough of drafting seen to weigh the target alone against it
        prefers_alone = judged and self.alone.steps > 0 and self.alone.per_second() > self.alone_margin * drafting_rate
        # a trial of the target alone costs what a drafted step would have given beyond its one token: take one only
        # where the cost model's guess at its rate (on the low side) is within the margin of drafting's (a guess of
        # 0 seconds, as a priced clock can give, is always worth one)
        self.alone_worth_a_trial = prefers_alone or (judged and costs.estimated
                                                     and drafting_rate * costs.alone_seconds() < self.alone_margin)
        self.prefers_chain, self.prefers_alone = prefers_chain, prefers_alone

    @property
    def chain_length(self) -> int:
        """The chain's best length (``chain_depths``' most expected tokens per second; with the level stop at least
        as long as a sure chain pays)."""
        self._shape_chain()
        return self._chain_length

    @property
    def chain_go_on(self) -> "_C.LevelStops | None":
        """The chain's stop per level (``chain_stops``; None before it is estimated, and in a batch)."""
        self._shape_chain()
        return self._chain_go_on

    def _shape_chain(self) -> None:
        """Estimate the chain's length and stop from the costs of the last ``decide``, once per ``decide`` and only
        where a chain step (or a reader) asks: most steps run the tree, and estimating both takes longer than
        everything else ``decide`` does. What they are estimated from changes only with the observations, before
        ``decide``: asked at the step, they come out as they would have there."""
        costs, self._shape_costs = self._shape_costs, None
        if costs is None:
            return
        if costs.steps:  # a chain of L tokens: L draft forwards, L verified slots
            self._chain_length = best_depth(costs, self.chain_depths, 1, self.max_length,
                                            seconds_of=lambda length: costs.seconds_for(length, length))
        self._chain_go_on = None if self.batched else self.chain_stops(costs)
        if self._chain_go_on is not None:  # its own stop decides each step: a sure chain may go as far as it pays
            self._chain_length = max(self._chain_length, self._chain_go_on.sure_depth(self.max_length))

    def chain_stops(self, costs: "CostModel") -> "_C.LevelStops | None":
        """The chain's stop per level (``level_stops`` from its own acceptance by depth and by mass), a token worth
        the seconds it takes at the better kind's rate; None before either kind has one."""
        rate = max(self.tree.per_second(costs), self.chain.per_second(costs))
        return level_stops(costs, self.chain_depths, self.chain_masses, 1.0 / rate) if rate > 0 else None

    def next_length(self, limit: int) -> tuple[int, bool]:
        """The next step's proposal: (chain length, 0 for the tree, ``ALONE`` for the target alone; whether the step
        is a trial), the length at most ``limit``. In a batch: the tree, no trial."""
        if self.batched:
            return 0, False
        # a round of trials begins; the first two back to back (a standard error needs two trials of each kind)
        if not self._round and (self._steps >= self._next_trial or self._rounds_begun < 2):
            self._rounds_begun += 1
            preference = (self.prefers_chain, self.prefers_alone)
            if self._round_preference is not None:  # (None: the last round began before both kinds were tried)
                confirmed = preference == self._round_preference
                self.trial_gap = min(2 * self.trial_gap, self.max_trial_gap) if confirmed else self.trial_every
            self._round_preference = preference if self.tree.steps and self.chain.steps else None
            self._next_trial = self._steps + self.trial_gap
            # the kind the last step ran first (its trial needs no warm-up); the target alone, where it is tried,
            # between the two drafting kinds: after it the second needs no warm-up either
            first, second = ("chain", "tree") if self._last_kind == "chain" else ("tree", "chain")
            self._round = [first, "alone", second] if self.alone_worth_a_trial else [first, second]
        trial = False
        if self._round:
            kind = self._round[0]
            # a drafting kind's trial follows a step of its own kind (where the last step drafted with the other, a
            # warm-up step of it runs first, an ordinary one): a step starts where the last one left the answer, and
            # a chain rejected early leaves a harder start than a tree that got past the uncertain token (Qwen2-VL
            # pair: chain trials right after tree trials mostly accepted 12 of 12 tokens, the chain steps between
            # them 0-4). A step of the target alone, or the prompt, leaves neither kind's aftermath; and the target
            # alone's rate is its seconds, the same anywhere.
            trial = kind == "alone" or self._last_kind in (kind, "alone", None)
            if trial:
                self._round.pop(0)
        elif self.prefers_alone and self._alone_run < self.max_alone_run:
            kind = "alone"
        else:  # (after max_alone_run steps alone, the draft catches up with the preferred drafting kind)
            kind = "chain" if self.prefers_chain else "tree"
        self._alone_run = self._alone_run + 1 if kind == "alone" else 0
        self._last_kind = kind
        self._steps += 1
        if kind == "alone":
            return self.ALONE, trial
        return (max(1, min(self.chain_length, limit)) if kind == "chain" else 0), trial

    def defer_trial(self) -> None:
        """The trial ``next_length`` just gave (a drafting kind's) will not be one: the tokens left to the generation
        would cut it short. Its kind (the last step's) goes back to the front of the round, so the trial runs at the
        next step that can take it whole (where the generation ends, the next one's first): a round is not spent on
        a step that cannot count, which short generations would otherwise make common."""
        self._round.insert(0, self._last_kind)

    @property
    def alone_steps(self) -> int:
        """Steps of the target alone observed, trials or not (every one is priced)."""
        return self.alone.steps

    def new_generation(self) -> None:
        """A generation starts: its draft has processed the whole prompt (no steps alone behind), and no step has
        run yet."""
        self._alone_run = 0
        self._last_kind = None

    def describe(self) -> dict:
        return {"chain_length": self.chain_length if self.prefers_chain else 0,
                "chain_acceptance_by_depth": [round(p, 3) for p in self.chain_depths.probabilities()],
                "chain_steps": self.chain_steps, "tree_steps": self.tree_steps, "alone_steps": self.alone_steps,
                "prefers_alone": self.prefers_alone}


def cumulative_tokens(probabilities: list[float]) -> list[float]:
    """``totals[d]``: tokens a step emits on average with a tree d deep, d = 0..len(probabilities)."""
    totals, reach = [1.0], 1.0
    for p in probabilities:
        reach *= p
        totals.append(totals[-1] + reach)
    return totals


def expected_tokens(probabilities: list[float], depth: float, totals: list[float] | None = None) -> float:
    """Tokens a step emits on average with a tree ``depth`` deep: the bonus token plus each depth's chance
    of being reached and accepted (a fractional depth interpolates between its neighbours). ``totals``: the
    probabilities' ``cumulative_tokens``, when already at hand."""
    if totals is None:
        totals = cumulative_tokens(probabilities[:int(depth) + 1])
    whole = min(int(depth), len(totals) - 1)
    if whole + 1 < len(totals):
        return totals[whole] + (depth - whole) * (totals[whole + 1] - totals[whole])
    return totals[whole]


def best_depth(costs: CostModel, acceptance: DepthAcceptance, low: int, high: int,
               depth_of: Callable[[int], float] = float, rows: int = 1,
               seconds_of: Callable[[float], float] | None = None) -> int:
    """The depth cap in [low, high] with the most expected tokens per second for a batch of ``rows`` (the lowest
    of ties). ``depth_of(cap)``: the depth a tree reaches on average under that cap (SAGE: d_min + alpha (cap -
    d_min)); ``seconds_of(depth)``: a step's seconds at that depth (default ``costs.step_seconds``, the policy's
    trees)."""
    probabilities = acceptance.probabilities()
    totals = cumulative_tokens(probabilities)
    best, best_rate = low, -1.0
    for cap in range(low, high + 1):
        depth = depth_of(cap)
        seconds = costs.step_seconds(depth, rows) if seconds_of is None else seconds_of(depth)
        rate = expected_tokens(probabilities, depth, totals) / seconds if seconds > 0 else 0.0
        if rate > best_rate + 1e-12:
            best, best_rate = cap, rate
    return best


@dataclass
class CostLearning:
    """What a cost-aware policy has learned about one pair of models on one device."""

    costs: CostModel
    acceptance: DepthAcceptance
    depth_goal: int  # the depth cap with the most expected tokens per second, as last estimated
    mean_alpha: float  # recent root confidence (exponentially weighted)
    nodes: NodeAcceptance | None = None  # per-node acceptance against draft probability and depth
    node_floor: float | None = None  # the least node probability costs call for (None: not estimated yet)
    go_on: _C.LevelStops | None = None  # when a tree goes on past each level (None: not estimated yet)
    masses: MassAcceptance | None = None  # acceptance of a depth against the tree's mass there (the level stop's)
    proposals: ProposalChoice | None = None  # the tree or the draft's greedy chain, each step


# target model -> draft model -> device -> CostLearning; weak keys: a record goes when its models do
_LEARNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def learning_for(target, draft, device: str, fresh: Callable[[], CostLearning]) -> CostLearning:
    """The process's record for ``target`` and ``draft`` (the models) on ``device``, made by ``fresh()`` the
    first time."""
    per_draft = _LEARNED.setdefault(target, weakref.WeakKeyDictionary())
    per_device = per_draft.setdefault(draft, {})
    if device not in per_device:
        per_device[device] = fresh()
    return per_device[device]
