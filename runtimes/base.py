"""The runtime interface and the one latency protocol every runtime is measured with.

A runtime builds an ``Engine`` from an ONNX file (or, for PyTorch eager, from the module itself) at a given
precision and thread count; an engine maps a float32 (B, C, H, W) array to logits. ``measure_latency`` is the
same loop for all of them, in the manner of OpenVINO's ``benchmark_app`` and optimum-benchmark: warm-up, then
timed synchronous calls until an iteration count or a time budget runs out, reported as percentiles, mean,
standard deviation and throughput, with the process's peak resident memory sampled alongside.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtimes.files import sha256_file  # noqa: F401  (re-exported: runtimes.base.sha256_file)


class Engine(Protocol):
    def run(self, x: np.ndarray) -> np.ndarray: ...


class Runtime(Protocol):
    name: str
    input_kind: str  # "onnx" or "torch"
    formats: tuple[str, ...]  # artifact formats it loads: "torch", "onnx", "openvino"
    artifact_precisions: tuple[str, ...]  # precisions carried by the file (e.g. "int8" QDQ) it can run

    def precisions(self) -> list[str]:
        """The precisions this runtime can run on this machine."""

    def build(self, source: Path | Any, *, precision: str, threads: int) -> Engine: ...

    def versions(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    iterations: int
    threads: int
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    latency_ms_std: float
    latency_ms_min: float
    throughput_ips: float  # images per second over the timed iterations
    peak_rss_mb: float  # peak resident memory of this process while the engine ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class _Rss:
    rss: int


def _max_rss() -> _Rss:
    """The process's peak resident memory so far (``getrusage``; kilobytes on Linux)."""
    import resource

    return _Rss(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the highest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        try:
            import psutil

            self._rss = psutil.Process().memory_info
        except ImportError:  # a deployment bundle's runner needs no psutil: fall back to the lifetime peak
            self._rss = _max_rss
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = self._rss().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._rss().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def measure_latency(
    engine: Engine, x: np.ndarray, *, threads: int, warmup: int = 5, iterations: int = 50, max_seconds: float = 10.0,
    min_iterations: int = 5,
) -> LatencyStats:
    """Time ``engine.run(x)``: ``warmup`` untimed calls, then up to ``iterations`` timed ones or ``max_seconds``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with PeakMemory() as memory:
        for _ in range(warmup):
            engine.run(x)
        times: list[float] = []
        deadline = time.perf_counter() + max_seconds
        while len(times) < iterations and (len(times) < min_iterations or time.perf_counter() < deadline):
            start = time.perf_counter()
            engine.run(x)
            times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return LatencyStats(
        batch_size=len(x), iterations=len(ms), threads=threads,
        latency_ms_p50=float(np.percentile(ms, 50)), latency_ms_p90=float(np.percentile(ms, 90)),
        latency_ms_p99=float(np.percentile(ms, 99)), latency_ms_mean=float(ms.mean()),
        latency_ms_std=float(ms.std()), latency_ms_min=float(ms.min()),
        throughput_ips=float(len(x) * len(ms) / (ms.sum() / 1e3)), peak_rss_mb=memory.peak_mb,
    )
