"""Top-1 evaluation over a streamed split, for any predictor that maps a float32 batch to logits.

The same loop serves PyTorch, ONNX Runtime and OpenVINO, so every runtime is scored on identical input.

A top-1 drop is judged on a finite split, so it comes with its uncertainty: the **paired** 95% confidence interval
of the drop against a reference scored on the same images (the per-image differences of being right, which is
far tighter than two independent intervals: both models get most images right or wrong together). And a candidate
whose drop is already outside the budget with confidence need not be scored to the end: ``evaluate_top1`` stops
it at a few interim looks, with Pocock's boundary for four looks (z = 2.361 keeps the overall error of a
two-sided 5% test over four looks at 5%; Pocock 1977, "Group sequential methods in the design and analysis of
clinical trials").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibration.datasets import Subset

Z95 = 1.959964  # two-sided 95%
POCOCK_Z4 = 2.361  # Pocock's constant boundary, four looks, overall two-sided alpha 0.05
LOOKS = (0.125, 0.25, 0.5)  # the interim looks, as shares of the split (the fourth is the end)
MIN_LOOK = 500  # no interim look on fewer images: the normal approximation needs them


@dataclass(frozen=True)
class EvalResult:
    top1: float  # fraction in [0, 1]
    predictions: np.ndarray  # (N,) int64, in split order
    num_samples: int
    correct: np.ndarray | None = None  # (N,) bool, in split order: what a paired comparison needs
    total: int | None = None  # images in the split; more than num_samples when scoring stopped early

    @property
    def stopped_early(self) -> bool:
        return self.total is not None and self.num_samples < self.total

    def agreement(self, other: EvalResult) -> float:
        """Share of samples on which both predict the same class (over the images both scored)."""
        n = min(self.num_samples, other.num_samples)
        return float(np.mean(self.predictions[:n] == other.predictions[:n])) if n else 0.0


def paired_drop(reference: EvalResult, other: EvalResult, z: float = Z95) -> tuple[float, float, float] | None:
    """(drop, low, high) in top-1 points of ``other`` against ``reference`` on the images both scored: the mean of
    the per-image differences and its normal-approximation interval at ``z``. None without per-image results."""
    if reference.correct is None or other.correct is None:
        return None
    n = min(len(reference.correct), len(other.correct))
    if n < 2:
        return None
    d = reference.correct[:n].astype(np.float64) - other.correct[:n].astype(np.float64)  # +1: the other lost one
    mean = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(n)
    return mean * 100, (mean - half) * 100, (mean + half) * 100


def evaluate_top1(
    predict: Callable[[np.ndarray], np.ndarray], data: Subset, *, batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None, reference: EvalResult | None = None,
    stop_above: float | None = None,
) -> EvalResult:
    """Run ``predict`` over ``data`` in batches; memory is bounded by one batch and the predictions.

    With ``reference`` (scored on the same split) and ``stop_above`` (a top-1 drop in points), scoring stops at an
    interim look (``LOOKS``) once the drop's lower bound at Pocock's boundary is above ``stop_above``: the
    candidate is outside that budget with 95% confidence, and the rest of the split would not change that.
    """
    predictions, right, seen = [], [], 0
    total = len(data)
    looks = [max(MIN_LOOK, int(total * f)) for f in LOOKS] if reference is not None and stop_above is not None else []
    looks = [n for n in looks if n < total]
    for x, y in data.batches(batch_size):
        pred = np.asarray(predict(x)).argmax(axis=1)  # (B,)
        predictions.append(pred)
        right.append(pred == y)
        seen += len(y)
        if progress is not None:
            progress(seen, total)
        if looks and seen >= looks[0]:
            looks = [n for n in looks if n > seen]
            so_far = EvalResult(0.0, np.zeros(0), seen, np.concatenate(right))
            bounds = paired_drop(reference, so_far, z=POCOCK_Z4)
            if bounds is not None and bounds[1] > stop_above:
                break
    preds = np.concatenate(predictions).astype(np.int64) if predictions else np.zeros(0, np.int64)
    correct = np.concatenate(right) if right else np.zeros(0, bool)
    return EvalResult(top1=float(correct.mean()) if seen else 0.0, predictions=preds, num_samples=seen,
                      correct=correct, total=total)
