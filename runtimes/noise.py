"""How far to trust a latency figure, and ranking engines whose figures are too close to call.

This machine is shared: a figure taken while something else ran can be twice the true one, and a choice made
from it flips between runs (a demo's tokens stage picked ToMe over EViT by 0.04 ms of noise). So every timing
gets a verdict, and a choice between engines whose medians are close is re-timed **interleaved**: each round
times every engine once, in turn, so that a slow spell hits all of them, and the ranking is by the median over
rounds (the same idea as timing paired A/B runs in alternation rather than in two blocks).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtimes.base import Engine, measure_latency

SPREAD = 0.25  # p90 more than 25% above p50: the timings scatter too much to rank by
TAIL = 1.5  # a mean more than 1.5x the median: outliers (another process ran in between)
REPEAT_DISAGREE = 1.3  # the same artifact timed twice in one run, medians more than 1.3x apart
CLOSE = 0.10  # engines within 10% of the fastest are re-timed before one is chosen


def spread_verdict(p50: float | None, p90: float | None, mean: float | None) -> str:
    """``"stable"``, or ``"noisy: <why>"`` from one measurement's own spread."""
    if not p50 or p90 is None or mean is None:
        return "stable"
    if (p90 - p50) / p50 > SPREAD:
        return f"noisy: p90 {(p90 - p50) / p50:.0%} above p50"
    if mean / p50 > TAIL:
        return f"noisy: mean {mean / p50:.1f}x p50 (outliers)"
    return "stable"


def repeat_verdict(p50s: list[float]) -> str | None:
    """``"noisy: ..."`` when the same artifact, timed several times, gave medians too far apart; else None."""
    if len(p50s) < 2 or min(p50s) <= 0 or max(p50s) / min(p50s) <= REPEAT_DISAGREE:
        return None
    return f"noisy: the same artifact timed {len(p50s)} times in this run, p50 {min(p50s):.3f} to {max(p50s):.3f} ms"


def is_noisy(verdict: str | None) -> bool:
    return bool(verdict) and verdict.startswith("noisy")


def settled_by_retiming(verdict: str | None) -> bool:
    """Whether ``verdict`` is ``retimed_verdict``'s stable one: the interleaved rounds agreed."""
    return bool(verdict) and verdict.startswith("stable: re-timed")


def too_close_to_call(items: list, p50, noisy=None) -> list:
    """The items to time again, interleaved, before one is chosen: every item whose own timing ``noisy(item)`` says
    is not to be trusted (its median may be far off either way), and those whose median ``p50(item)`` is within
    ``CLOSE`` of the fastest *stably* timed one (of the fastest of all when none is stable). A noisy median is no
    yardstick: a noisy item that looked fastest is timed again beside the fastest stable one, whatever other noisy
    items there are, so that no trustworthy median is left out of the comparison."""
    noisy = noisy or (lambda item: False)
    stable = [p50(item) for item in items if not noisy(item)]
    bar = min(stable) if stable else min(p50(item) for item in items)
    return [item for item in items if noisy(item) or p50(item) <= bar * (1 + CLOSE)]


def interleaved(engines: Mapping[str, Engine], x: np.ndarray, *, threads: int, rounds: int = 7,
                iterations: int = 10, warmup: int = 2, verdicts: dict[str, str] | None = None,
                per_round: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Each engine's median latency (ms) over ``rounds`` rounds, every round timing every engine once in turn
    (``iterations`` calls each, their median kept). ``verdicts``, when given, receives each engine's verdict on
    its rounds (``retimed_verdict``); ``per_round`` receives every round's median, per engine."""
    per_round = per_round if per_round is not None else {}
    per_round.update({name: [] for name in engines})
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]  # neither is always first after a pause
        for name in order:
            stats = measure_latency(engines[name], x, threads=threads, warmup=warmup if r == 0 else 1,
                                    iterations=iterations, max_seconds=5.0, min_iterations=3)
            per_round[name].append(stats.latency_ms_p50)
    if verdicts is not None:
        verdicts.update({name: retimed_verdict(v) for name, v in per_round.items()})
    return {name: float(np.median(v)) for name, v in per_round.items()}


def retimed_verdict(round_medians: list[float]) -> str:
    """The verdict on an engine timed again over interleaved rounds: stable when its round medians agree (p90 of
    the rounds within ``SPREAD`` of their median), else noisy still. Either way it names the re-timed median."""
    median = float(np.median(round_medians))
    p90 = float(np.percentile(round_medians, 90))
    head = f"re-timed interleaved over {len(round_medians)} rounds, p50 {median:.3f} ms"
    if median > 0 and (p90 - median) / median > SPREAD:
        return f"noisy: still after being {head}: rounds' p90 {(p90 - median) / median:.0%} above"
    return f"stable: {head}"
