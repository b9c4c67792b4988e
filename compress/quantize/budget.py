"""The accuracy budget: return the most sensitive layers to float until a candidate's drop fits.

Given a ranking (most sensitive first) and a way to build the candidate with the first ``k`` layers in float,
find the smallest ``k`` whose top-1 drop is within ``max_drop``: try k = 1, 2, 4, ... until one fits, then
bisect between the last failure and the first success. That costs about 2 log2(k) evaluations instead of k,
and every evaluation is a real measurement on the evaluation split. When even every ranked layer in float
misses the budget, there is no fitting candidate and the caller says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BudgetResult(Generic[T]):
    artifact: T | None  # None: nothing fits
    top1: float
    float_layers: tuple[dict[str, str], ...]
    evaluations: int
    history: tuple[tuple[int, float], ...]  # (layers in float, top-1) per evaluation


def fit_budget(
    build: Callable[[list[str]], T], evaluate: Callable[[T], float], ranking: list[tuple[str, float]], *,
    reference_top1: float, max_drop: float, first_top1: float, score: str = "NSR",
    log: Callable[[str], None] = print,
) -> BudgetResult[T]:
    """Smallest prefix of ``ranking`` that, kept in float, brings the drop within ``max_drop`` points."""
    drop = lambda top1: (reference_top1 - top1) * 100  # noqa: E731
    history: list[tuple[int, float]] = [(0, first_top1)]
    tried: dict[int, tuple[T, float]] = {}

    def attempt(k: int) -> bool:
        artifact = build([name for name, _ in ranking[:k]])
        top1 = evaluate(artifact)
        tried[k] = (artifact, top1)
        history.append((k, top1))
        log(f"  {k} layer(s) in float: top-1 {top1 * 100:.2f} (drop {drop(top1):+.2f} pt, budget {max_drop})")
        return drop(top1) <= max_drop + 1e-9

    n = len(ranking)
    low, high, k = 0, None, 1
    while k <= n:
        if attempt(k):
            high = k
            break
        low = k
        k = n if k < n and k * 2 > n else k * 2
        if low == n:
            break
    if high is None:
        return BudgetResult(None, history[-1][1], (), len(history) - 1, tuple(history))
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid):
            high = mid
        else:
            low = mid
    artifact, top1 = tried[high]
    reasons = tuple(
        {"name": name, "reason": f"sensitivity rank {i + 1} of {n} ({score} {value:.2e}); returned to float to bring "
                                 f"the drop from {drop(first_top1):.2f} to {drop(top1):.2f} pt (budget {max_drop})"}
        for i, (name, value) in enumerate(ranking[:high])
    )
    return BudgetResult(artifact, top1, reasons, len(history) - 1, tuple(history))
