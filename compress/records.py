"""The measurement record: one JSON line per (stage, runtime, precision, batch size) in ``records.jsonl``.

Units are in the field names; accuracy is a fraction in [0, 1], ``top1_drop`` is in points (percent) against
the baseline stage's PyTorch FP32 accuracy, and ``agreement`` is the share of evaluation images on which the
prediction equals the baseline's. A runtime that cannot run a precision is recorded with ``status="skipped"``
and the reason, rather than left out. The report reads these records and never measures anything itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

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
    agreement: float | None = None
    eval_samples: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_mean: float | None = None
    latency_ms_std: float | None = None
    throughput_ips: float | None = None
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
    env: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_records(path: Path) -> list[StageRecord]:
    if not path.exists():
        return []
    return [StageRecord.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: True where no other point is at least as fast and at least as accurate,
    and strictly better in one of the two. Identical points are all kept (none strictly beats the other)."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dominates(q, p) for q in points) for p in points]
