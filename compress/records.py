"""The measurement record: one JSON line per (stage, runtime, precision, batch size) in ``records.jsonl``.

Units are in the field names; accuracy is a fraction in [0, 1], ``top1_drop`` is in points (percent) against
the baseline stage's first runtime (PyTorch FP32 by default), with ``top1_drop_ci95`` its paired 95% interval on
the same images; ``agreement`` is the share of evaluation images on which the prediction equals the baseline's.
A candidate whose drop is over the run's budget with confidence is scored on part of the split only
(``eval_samples`` says how much; ``calibration.evaluate``). A model is scored in full on one runtime and
precision; the others score a sample and say so in ``sampled_against`` (``compress.run.measure``: which one they
were compared with, on how many images, their agreement, and where they disagree). A runtime that cannot run a
precision is recorded with ``status="skipped"`` and the reason, rather than left out. The report reads these
records and never measures anything itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from compress.errors import InputError

SCHEMA = "vit-compress.record/1"


@dataclass(frozen=True)
class StageRecord:
    stage: str
    runtime: str
    precision: str
    batch_size: int
    status: str = "ok"  # "ok" or "skipped"
    reason: str | None = None
    top1: float | None = None
    top1_drop: float | None = None
    top1_drop_ci95: list[float] | None = None  # [low, high] points: the paired 95% interval of the drop
    agreement: float | None = None
    eval_samples: int | None = None
    eval_total: int | None = None  # the evaluation split's size: more than eval_samples where scoring stopped early
    # set where top-1 comes from a sample: {"runtime", "precision", "images", "agreement", "top1_diff_ci95",
    # "disagree": split positions of the first images predicted differently}
    sampled_against: dict[str, Any] | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_mean: float | None = None
    latency_ms_std: float | None = None
    throughput_ips: float | None = None
    latency_verdict: str | None = None  # "stable", or "noisy: <why>" (runtimes.noise): how far to trust the timing
    gpu_compute_ms_p50: float | None = None  # TensorRT: CUDA-event time of the network alone, without copies
    gpu_compute_ms_p90: float | None = None
    gpu_compute_ms_p99: float | None = None
    iterations: int | None = None
    threads: int | None = None
    peak_rss_mb: float | None = None
    params: int | None = None
    macs: int | None = None  # per image
    size_mb: float | None = None
    artifact: str | None = None  # path relative to the run directory
    stage_key: str | None = None  # content hash of the stage's inputs and options
    dataset: str | None = None
    run_id: str | None = None
    timestamp: str | None = None
    structure: dict[str, list[int]] | None = None  # {"heads": per layer, "mlp": hidden units per layer}
    candidate: str | None = None  # quantization stage: which candidate this row measures
    quantizer: str | None = None  # the library call that made the candidate
    calibration: dict[str, Any] | None = None  # {"method", "size", "source"}; None when none was used
    float_layers: list[dict[str, str]] | None = None  # [{"name", "reason"}] layers kept out of INT8
    # where the time goes (runtimes.profile.summarize): total, per op class, per layer with the executed precision
    profile: dict[str, Any] | None = None
    env: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def record_id(self) -> str:
        """A short content hash of the record: how a bundle or a summary names the row it came from."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        """A record from one parsed JSON line; a field of the wrong type is a ``ValueError`` naming it.

        Unknown keys are ignored (a newer writer may add fields); known ones must have their declared type, so a
        damaged or hand-edited file fails here, on its line, and never later inside a plot or a choice.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a record is a JSON object, not {type(d).__name__}")
        for name in ("stage", "runtime", "precision", "batch_size"):
            if name not in d:
                raise ValueError(f"field {name!r} is missing")
        values = {k: v for k, v in d.items() if k in _FIELD_TYPES}
        for name, value in values.items():
            _check_type(name, value, _FIELD_TYPES[name])
        ci = values.get("top1_drop_ci95")
        if ci is not None and (len(ci) != 2 or not all(isinstance(v, _NUMBER) and not isinstance(v, bool)
                                                      for v in ci)):
            raise ValueError("field 'top1_drop_ci95' must be [low, high], two numbers")
        return cls(**values)

    @property
    def scored_in_full(self) -> bool:
        """Top-1 from every image of the evaluation split on this record's own engine: not estimated from a sample
        checked against another engine, nor from scoring that stopped early."""
        return (self.top1 is not None and self.sampled_against is None
                and (self.eval_total is None or self.eval_samples == self.eval_total))


# What each field's JSON value may be: checked by ``from_dict``. ``None`` is allowed wherever the default is None.
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "runtime": (str,), "precision": (str,), "batch_size": (int,), "status": (str,),
    "reason": (str, type(None)), "env": (dict,), "schema": (str,), "structure": (dict, type(None)),
    "profile": (dict, type(None)), "sampled_against": (dict, type(None)),
    "calibration": (dict, type(None)), "float_layers": (list, type(None)), "top1_drop_ci95": (list, type(None)),
    **{name: (int, type(None)) for name in ("eval_samples", "eval_total", "iterations", "threads", "params", "macs")},
    **{name: (str, type(None)) for name in ("artifact", "stage_key", "dataset", "run_id", "timestamp", "candidate",
                                            "latency_verdict",
                                            "quantizer")},
}
for _f in fields(StageRecord):
    _FIELD_TYPES.setdefault(_f.name, (*_NUMBER, type(None)))  # the measured numbers: top1, latency_ms_p50, ...


def _check_type(name: str, value: Any, allowed: tuple[type, ...]) -> None:
    if isinstance(value, bool) and bool not in allowed:  # JSON true is not a batch size
        raise ValueError(f"field {name!r} is {value!r}, not a number")
    if not isinstance(value, allowed):
        kinds = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"field {name!r} is {type(value).__name__} {str(value)[:40]!r}, expected {kinds}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"field {name!r} is {value}, not a finite number")
    if name == "batch_size" and value < 1:
        raise ValueError(f"field 'batch_size' is {value}; a batch holds at least one image")


class RecordsError(InputError):
    """A records file that cannot be read: names the file, the line, and what is wrong with it."""


def read_records(path: Path) -> list[StageRecord]:
    """Every record in ``path`` (none when it does not exist); a damaged line is a ``RecordsError`` naming it."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecordsError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecordsError(f"{path}, line {line}: not UTF-8 text; the file is damaged: restore it, or rerun the "
                           "command that wrote it") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # numbered as an editor does: by newlines only
        if not line.strip():
            continue
        try:
            records.append(StageRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise RecordsError(f"{path}, line {number}: not a record ({str(e)[:120]}); the file is damaged: restore "
                               "it or remove that line, or rerun the command that wrote it") from None
    return records


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: True where no other point is at least as fast and at least as accurate,
    and strictly better in one of the two. Identical points are all kept (none strictly beats the other)."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dominates(q, p) for q in points) for p in points]
