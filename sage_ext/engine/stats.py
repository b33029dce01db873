"""Generation statistics of the speculative engine: per-step records and their aggregates.

Conventions (the SAGE paper's):
  * ``tau`` is the number of accepted DRAFT tokens in a step; every step also emits one token from the
    target itself (the bonus), so a step yields ``tau + 1`` tokens per target forward.
  * the first new token comes from the target's prefill, not from a step; ``new_tokens`` counts it.
  * times are seconds. ``time`` splits the whole generation into the paper's categories: ``draft_prefill``,
    ``draft_decode`` (every draft forward of the tree rounds), ``target_prefill``, ``target_verify``,
    ``tree_ops`` (confidence, tree construction, masks, verification, KV compaction: the sage_ext ops
    and the small tensor glue around them) and ``other`` (everything else: Python bookkeeping, stop
    checks, streaming, the one host sync per step). On CUDA they come from CUDA events on the
    engine's device, on CPU from host clocks (CPU work is synchronous).
  * ``engine_overhead`` is the engine's own time per step outside model forwards
    (``(tree_ops + other) / steps``, seconds); ``engine_overhead_fraction`` is that share of the step time.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TIME_KEYS = ("draft_prefill", "draft_decode", "target_prefill", "target_verify", "tree_ops", "other")


@dataclass
class StepRecord:
    """One speculation step (one target verification forward).

    tau: accepted draft tokens (tokens per target forward = tau + 1).
    emitted: tokens this step added to the output (tau + 1, fewer when EOS / a stop string /
        max_new_tokens cut the block).
    tree_size: real draft nodes in the verified tree (root excluded).
    tree_slots: draft-node slots the target verified (padding included; equals tree_size without padding).
    tree_depth: depth bound of the tree (levels the policy built).
    draft_forwards: draft forward passes this step.
    alpha: the confidence that shaped this tree (None for fixed-shape policies and SAGE's first round).
    (A last step with one token left to max_new_tokens is the root alone, built by no policy: no draft forward,
    tree_size 0 and None in the policy's fields, alpha to d_max.)
    alpha_measured: the draft's confidence measured at this step's root.
    depth_target / width_target: SAGE's D(alpha) and W(alpha) for this tree; d_max: SAGE's current D_max.
    time: seconds of the whole step (filled when the generation ends).
    """

    tau: int
    emitted: int
    tree_size: int
    tree_slots: int
    tree_depth: int
    draft_forwards: int
    alpha: float | None = None
    alpha_measured: float | None = None
    depth_target: float | None = None
    width_target: float | None = None
    d_max: int | None = None
    time: float = 0.0


@dataclass
class GenerationStats:
    """Statistics of one ``SpeculativeGenerator.generate`` call (see the module docstring for units)."""

    policy: str
    prompt_len: int = 0
    new_tokens: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    time: dict[str, float] = field(default_factory=lambda: {key: 0.0 for key in TIME_KEYS})
    wall_time: float = 0.0
    stop_reason: str = ""

    # -------------------------------------------------------------- aggregates
    @property
    def target_forwards(self) -> int:
        """Target verification forwards (one per step; the prefill is not counted)."""
        return len(self.steps)

    @property
    def mean_tau(self) -> float:
        """Mean accepted DRAFT tokens per step (paper's tau)."""
        return sum(s.tau for s in self.steps) / len(self.steps) if self.steps else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """Mean tokens per verification forward = mean_tau + 1 (before EOS/limit truncation)."""
        return self.mean_tau + 1.0 if self.steps else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        """Entry d-1: among steps whose tree reached depth d, the share that accepted at least d tokens."""
        max_depth = max((s.tree_depth for s in self.steps), default=0)
        rates = []
        for depth in range(1, max_depth + 1):
            eligible = [s for s in self.steps if s.tree_depth >= depth]
            rates.append(sum(s.tau >= depth for s in eligible) / len(eligible) if eligible else 0.0)
        return rates

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def step_time(self) -> float:
        """Total seconds of all steps (prefill excluded)."""
        return sum(s.time for s in self.steps)

    @property
    def engine_overhead(self) -> float:
        """Engine time outside model forwards per step, seconds ((tree_ops + other) / steps)."""
        if not self.steps:
            return 0.0
        return (self.time["tree_ops"] + self.time["other"]) / len(self.steps)

    @property
    def engine_overhead_fraction(self) -> float:
        """Share of the step time spent outside model forwards."""
        total = self.step_time
        return (self.time["tree_ops"] + self.time["other"]) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: the fields, the aggregates and every step record."""
        return {
            "policy": self.policy,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "mean_tau": self.mean_tau,
            "tokens_per_target_forward": self.tokens_per_target_forward,
            "acceptance_by_depth": self.acceptance_by_depth,
            "time": dict(self.time),
            "wall_time": self.wall_time,
            "tokens_per_second": self.tokens_per_second,
            "engine_overhead": self.engine_overhead,
            "engine_overhead_fraction": self.engine_overhead_fraction,
            "stop_reason": self.stop_reason,
            "steps": [asdict(s) for s in self.steps],
        }


class _Region:
    """``with timeline.region(name):`` — a plain class (cheaper than a generator context manager). On exit the
    category that ran before it runs again (inside a step: ``other`` unless the engine switched)."""

    __slots__ = ("timeline", "name", "previous")

    def __init__(self, timeline: "Timeline", name: str):
        self.timeline, self.name = timeline, name

    def __enter__(self) -> None:
        self.previous = self.timeline.current[0]
        self.timeline.switch(self.name)

    def __exit__(self, *exc: Any) -> None:
        self.timeline.switch(self.previous)


class Timeline:
    """The time categories of one generation, measured without synchronizing mid-generation.

    The engine calls ``switch(name)`` at every boundary between categories (``None``: untimed); each call
    takes one mark — a host clock reading, or on CUDA one event recorded on the current stream — and the
    category ``name`` lasts until the next mark. Marks are turned into seconds once, in ``finish`` (after
    the generation's final sync on CUDA). Steps are delimited by ``step_begin`` / ``step_end``; inside a step,
    ``None`` (no category: e.g. the host bookkeeping after the step's sync, or after a region) is ``other``.
    """

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list[tuple[Any, str | None]] = []  # (mark, category running from it)
        self._steps: list[tuple[int, int]] = []  # (first mark, end mark) of every step
        self._step_first = 0
        self.current: list[str | None] = [None]  # the running category (a cell the switch closure writes)
        self._in_step = [False]
        append, current, in_step = self._marks.append, self.current, self._in_step
        if self.cuda:
            def switch(name: str | None) -> None:
                if name is None and in_step[0]:
                    name = "other"
                event = torch.cuda.Event(enable_timing=True)
                event.record(torch.cuda.current_stream(device))
                append((event, name))
                current[0] = name
        else:
            def switch(name: str | None) -> None:
                if name is None and in_step[0]:
                    name = "other"
                append((clock(), name))
                current[0] = name
        #: ``switch(name)``: close the running category and start ``name`` (a bound closure: cheapest call)
        self.switch = switch

    def region(self, name: str) -> _Region:
        return _Region(self, name)

    def step_begin(self, name: str = "other") -> None:
        """Start a step in category ``name``."""
        self._step_first = len(self._marks)
        self._in_step[0] = True
        self.switch(name)

    def step_end(self) -> None:
        self._steps.append((self._step_first, len(self._marks)))
        self._in_step[0] = False
        self.switch(None)

    def step_costs(self, index: int) -> tuple[float, float, float]:
        """(whole step, draft_decode, target_verify) seconds of finished step ``index`` (0-based). On CUDA only
        for a step whose events are complete (one before the step whose readback synchronized): reading them
        then waits for nothing."""
        first, last = self._steps[index]
        totals = self._category_seconds(first, last)
        seconds = self._seconds(self._marks[first][0], self._marks[last][0])
        return seconds, totals["draft_decode"], totals["target_verify"]

    def _category_seconds(self, first: int, last: int) -> dict[str, float]:
        """Seconds per category between marks ``first`` and ``last``."""
        totals = {key: 0.0 for key in TIME_KEYS}
        marks = self._marks
        for position in range(first, last):
            name = marks[position][1]
            if name is not None:
                totals[name] += self._seconds(marks[position][0], marks[position + 1][0])
        return totals

    def _seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start

    def finish(self, stats: GenerationStats) -> None:
        """Fill ``stats.time`` and every step's ``time`` (call after the generation's final device sync)."""
        self.switch(None)
        marks = self._marks
        totals = self._category_seconds(0, len(marks) - 1)
        for record, (first, last) in zip(stats.steps, self._steps):
            record.time = self._seconds(marks[first][0], marks[last][0])
        stats.time = totals
