"""The one timing protocol every benchmark script shares: interleaved rounds over all paths.

Each round times every (batch size, path) once, in turn, so noise from other work on the shared machine falls
on all paths alike; callers take the median over rounds and pair each path with a reference in the same round.
"""

from __future__ import annotations

import numpy as np

from runtimes import LatencyStats, measure_latency


def interleaved_rounds(
    engines: dict, data: np.ndarray, batch_sizes: list[int], *, rounds: int, seconds: float, threads: int,
    iterations: int = 200,
) -> dict[int, dict[str, list[LatencyStats]]]:
    """{batch: {path: [stats per round]}} for inputs ``data[:batch]``."""
    stats: dict[int, dict[str, list[LatencyStats]]] = {b: {n: [] for n in engines} for b in batch_sizes}
    for r in range(rounds):
        for batch in batch_sizes:
            for name, engine in engines.items():
                stats[batch][name].append(measure_latency(engine, data[:batch], threads=threads,
                                                          warmup=2 if r == 0 else 1, iterations=iterations,
                                                          max_seconds=seconds))
        print(f"round {r + 1}/{rounds} done", flush=True)
    return stats


def paired_ratio(values: list[float], reference: list[float]) -> float:
    """Median over rounds of value / reference in the same round."""
    return float(np.median(np.asarray(values) / np.asarray(reference)))
