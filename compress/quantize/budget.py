"""The accuracy budget: return the most sensitive layers to float until a candidate's drop fits.

Given a ranking (most sensitive first) and a way to build the candidate with the first ``k`` layers in float,
find the smallest ``k`` whose top-1 drop is within ``max_drop``: try k = 1, 2, 4, ... until one fits, then
bisect between the last failure and the first success. That costs about 2 log2(k) evaluations instead of k,
and every evaluation is a real measurement on the evaluation split. When even every ranked layer in float
misses the budget, there is no fitting candidate and the caller says so.

``fit_qdq`` applies that to any QDQ ONNX candidate (ONNX Runtime's, neural-compressor's), ranking its layers by
``sensitivity.layer_sensitivity`` and returning them to float by graph surgery (``QdqGraph.revert_to_float``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import onnx

from compress.io import atomic_write
from compress.quantize.base import Candidate, QuantizeContext, user_excluded
from compress.quantize.qdq import QdqGraph
from compress.quantize.sensitivity import layer_sensitivity

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


def fit_qdq(ctx: QuantizeContext, graph: QdqGraph, name: str, quantizer: str, calibration: dict | None,
             excluded: list[str]) -> tuple[Candidate | None, list[tuple[str, float]]]:
    """Measure a QDQ graph; over budget, return its most sensitive layers to float. Shared by every QDQ path.

    Returns the candidate (None when nothing fits) and the sensitivity ranking, most sensitive first.
    """
    path = ctx.workdir / f"{name}.onnx"

    def evaluate(proto: onnx.ModelProto) -> float:  # the file on disk is always the last graph evaluated
        atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))
        return ctx.evaluate(path, "onnx", "int8")

    first = evaluate(graph.proto)
    ctx.log(f"{name}: top-1 {first * 100:.2f} (drop {ctx.drop(first):+.2f} pt)")
    ranking = list(layer_sensitivity(graph, ctx.calib, samples=ctx.sensitivity_samples, threads=ctx.threads).items())
    float_layers = user_excluded(excluded)
    if ctx.within_budget(first):
        return Candidate(name, quantizer, "int8", path, "onnx", calibration, float_layers, first,
                         extra={"sensitivity": dict(ranking[:10])}), ranking
    ctx.log(f"{name}: over the {ctx.max_drop:.2f} pt budget; returning the most sensitive layers to float")
    result = fit_budget(
        lambda names: graph.revert_to_float(names), lambda g: evaluate(g.proto),
        ctx.fallback(ranking),
        reference_top1=ctx.reference_top1, max_drop=ctx.max_drop, first_top1=first, log=ctx.log,
    )
    if result.artifact is None:
        path.unlink(missing_ok=True)
        ctx.log(f"{name}: even {len(ctx.fallback(ranking))} layer(s) in float (quantize.max_float_fraction "
                f"{ctx.max_float_fraction}) miss the budget")
        return None, ranking
    atomic_write(path, result.artifact.save)  # bisection may have evaluated another graph last
    return Candidate(name, quantizer, "int8", path, "onnx", calibration, float_layers + result.float_layers,
                     result.top1, extra={"sensitivity": dict(ranking[:10]),
                                         "budget_evaluations": result.evaluations}), ranking
