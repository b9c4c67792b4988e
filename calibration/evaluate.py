"""Top-1 evaluation over a streamed split, for any predictor that maps a float32 batch to logits.

The same loop serves PyTorch, ONNX Runtime and OpenVINO, so every runtime is scored on identical input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibration.datasets import Subset


@dataclass(frozen=True)
class EvalResult:
    top1: float  # fraction in [0, 1]
    predictions: np.ndarray  # (N,) int64, in split order
    num_samples: int

    def agreement(self, other: EvalResult) -> float:
        """Share of samples on which both predict the same class."""
        return float(np.mean(self.predictions == other.predictions)) if self.num_samples else 0.0


def evaluate_top1(
    predict: Callable[[np.ndarray], np.ndarray], data: Subset, *, batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Run ``predict`` over ``data`` in batches; memory is bounded by one batch and the predictions."""
    predictions, correct, seen = [], 0, 0
    for x, y in data.batches(batch_size):
        pred = np.asarray(predict(x)).argmax(axis=1)  # (B,)
        predictions.append(pred)
        correct += int((pred == y).sum())
        seen += len(y)
        if progress is not None:
            progress(seen, len(data))
    preds = np.concatenate(predictions) if predictions else np.zeros(0, np.int64)
    return EvalResult(top1=correct / seen if seen else 0.0, predictions=preds.astype(np.int64), num_samples=seen)
