"""The SAGE tuning sweep of `sage-ext bench` (its ``sage-tuned`` row): a coordinate search over SAGE's
parameters, each candidate timed against the best so far on tuning scenes disjoint from the benchmark's.
"""
from __future__ import annotations

import statistics

from .runs import run_engine

#: The grid `sage-ext bench` searches, key by key in this order, starting from the paper defaults.
BENCH_GRID = {"lag": [False], "first_round_paths": [None], "n_max": [8, 12, 16, 24, 32, 48],
              "d_max": [6, 10, 12], "w_max": [3, 4, 6], "theta_scale": [0.05, 0.2]}


def tune_sage(target, draft, tune_inputs, max_new_tokens, device, grid: dict,
              draft_prune_ratio: float = 0.0) -> tuple[dict, list[dict]]:
    """Pick SAGE parameters by wall-clock time on TUNING scenes (disjoint from the benchmark scenes): a
    coordinate search over `grid` starting from the paper defaults. Each candidate is timed against the
    current best in interleaved A-B-B-A rounds over the same scenes (greedy outputs are identical, so the
    token counts are too), and kept only if it is at least 3% faster: drift of a shared machine's load hits
    both sides alike instead of favouring whichever ran first."""
    from ..engine import policies
    from ..engine import SpeculativeGenerator

    def engine_for(params: dict):
        engine = SpeculativeGenerator(target, draft, policies.SagePolicy(**params), draft_prune_ratio=draft_prune_ratio)
        engine.generate(**tune_inputs[0], max_new_tokens=8)  # warm-up
        return engine

    def timed(engine) -> tuple[float, float]:
        seconds, taus = 0.0, []
        for inputs in tune_inputs:
            run = run_engine(engine, inputs, max_new_tokens, device, do_sample=False)
            seconds += run["seconds"]
            taus.append(run["stats"].mean_tau)
        return seconds, statistics.mean(taus)

    best: dict = {}
    best_engine = engine_for(best)
    trials = []
    for key, values in grid.items():
        for value in values:
            candidate = {**best, key: value}
            try:
                engine = engine_for(candidate)
            except ValueError as error:  # an invalid combination (e.g. a first-round tree larger than n_max)
                trials.append({"params": candidate, "error": str(error)})
                continue
            best_seconds = candidate_seconds = 0.0
            for order in ((best_engine, engine), (engine, best_engine)):
                for which in order:
                    seconds, tau = timed(which)
                    if which is engine:
                        candidate_seconds, candidate_tau = candidate_seconds + seconds, tau
                    else:
                        best_seconds, best_tau = best_seconds + seconds, tau
            ratio = best_seconds / candidate_seconds
            trials.append({"params": candidate, "against": dict(best), "speedup_over_best": ratio,
                           "mean_tau": candidate_tau, "best_mean_tau": best_tau})
            if ratio > 1.03:  # keep a change only if clearly faster
                best, best_engine = candidate, engine
    return best, trials
