"""Top-1 drops with their paired confidence interval, and scoring that stops once a drop is out of budget."""

import numpy as np

from calibration.datasets import Subset, digits_source
from calibration.evaluate import EvalResult, evaluate_top1, paired_drop
from calibration.preprocess import Preprocess

DIGITS = Preprocess(crop_size=8, in_chans=1, mean=(0.5,), std=(0.5,))


def _result(correct: np.ndarray) -> EvalResult:
    return EvalResult(float(correct.mean()), np.zeros(len(correct), np.int64), len(correct), correct, len(correct))


def test_the_paired_interval_is_that_of_the_per_image_differences():
    rng = np.random.default_rng(0)
    reference = rng.random(2000) < 0.8
    other = reference.copy()
    flips = rng.choice(2000, 60, replace=False)  # 40 lost, 20 gained
    other[flips[:40]] &= False
    other[flips[40:]] |= True
    drop, low, high = paired_drop(_result(reference), _result(other))
    assert np.isclose(drop, (reference.mean() - other.mean()) * 100)
    d = reference.astype(float) - other.astype(float)
    half = 1.959964 * d.std(ddof=1) / np.sqrt(2000) * 100
    assert np.isclose(low, drop - half) and np.isclose(high, drop + half)
    # unpaired, the difference of two ~80% top-1 scores on 2000 images has a 95% interval +-2.5 pt wide; the
    # paired one counts only the 60 images where the two differ
    assert high - low < 2.0


def _labelled(n: int):
    source = digits_source()
    return Subset(source, np.arange(n), DIGITS), source.labels[:n]


def _predictor(labels: np.ndarray, wrong_every: int):
    """Right on every image but each ``wrong_every``-th (0: always right), batch by batch in split order."""
    state = {"at": 0}

    def predict(x):
        at, n = state["at"], len(x)
        pred = labels[at : at + n].copy()
        if wrong_every:
            idx = np.arange(at, at + n)
            pred[idx % wrong_every == 0] = (pred[idx % wrong_every == 0] + 1) % 10
        state["at"] = at + n
        logits = np.zeros((n, 10), np.float32)
        logits[np.arange(n), pred] = 1
        return logits

    return predict


def test_scoring_stops_once_the_drop_is_over_budget_with_confidence():
    data, labels = _labelled(1700)
    reference = evaluate_top1(_predictor(labels, 0), data, batch_size=100)
    assert not reference.stopped_early and reference.num_samples == 1700
    bad = evaluate_top1(_predictor(labels, 4), data, batch_size=100, reference=reference, stop_above=1.0)
    assert bad.stopped_early and bad.num_samples == 500 and bad.total == 1700  # the first look: 25 pt down
    near = evaluate_top1(_predictor(labels, 80), data, batch_size=100, reference=reference, stop_above=1.0)
    assert not near.stopped_early  # 1.25 pt down: not outside a 1 pt budget with confidence, so scored to the end
    assert np.isclose(paired_drop(reference, near)[0], (reference.top1 - near.top1) * 100)
