"""How steady the prune stage's latency model is: the four copies built once, then fitted again and again.

    python bench/latency_model_noise.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        [--fits 5] [--rounds 7 21] [--precision int8] [--out bench/results/latency_model_noise.json]

``prune.target_latency`` fits a latency model on the target (``compress.prune.latency``): the model and three
evenly pruned copies, exported, quantized for timing by ``nncf.quantize`` on 32 calibration images (``--precision
int8``), timed side by side in interleaved rounds (``runtimes.noise.interleaved``), and least squares gives the
fixed time and the time of one head and one MLP unit. This script builds the four engines once and repeats only
the timing and the fit, ``--fits`` times for each number of ``--rounds``, alternating: what moves between fits is
the machine, not the engines. Each timing is fitted twice: on each engine's median over the rounds, and on its
median ratio to the whole model timed in the same round (``paired_medians``), which cancels the
machine's drift between rounds. Reported per fit: the four times, the fitted costs, and a head's cost per MAC next
to a unit's, the number the mask search turns on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import require_cifar, write_result  # noqa: E402
from calibration.calibrate import from_split  # noqa: E402
from compress.api import export_model, load_data, load_model  # noqa: E402
from compress.prune.latency import fit_latency_model, timing_engines, uniform_copies  # noqa: E402
from runtimes.noise import interleaved  # noqa: E402


def paired_medians(per_round: Mapping[str, list[float]], reference: str) -> dict[str, float]:
    """Each engine's latency (ms) as the median over rounds of its ratio to ``reference`` timed in the same round,
    times ``reference``'s median: the machine's drift between rounds, which moves every engine of a round alike,
    cancels in the ratio, where separate medians keep it."""
    base = np.asarray(per_round[reference], dtype=float)
    scale = float(np.median(base))
    return {name: scale * float(np.median(np.asarray(v, dtype=float) / base)) for name, v in per_round.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--fits", type=int, default=5)
    ap.add_argument("--rounds", type=int, nargs="+", default=[7, 21])
    ap.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency_model_noise.json")
    args = ap.parse_args()
    require_cifar(args.data, "train")
    ckpt = load_model(args.model)
    data = load_data(args.data, ckpt.preprocess, calib_size=64, eval_limit=8)
    model = ckpt.model.eval()
    x = np.ascontiguousarray(next(data.calib.batches(8))[0], dtype=np.float32)
    calib = from_split(data.calib, 32, tuple(x.shape[1:])) if args.precision == "int8" else None
    copies = uniform_copies(model, mlp_round_to=32)
    fits: list[dict] = []
    with timing_engines(copies, lambda m, path: export_model(m, path, x[:2], parity_inputs=x), args.precision,
                        runtime="openvino", threads=args.threads, calib=calib,
                        progress=lambda done, total: print(f"built {done} of {total} engines", flush=True)
                        ) as engines:
        for k in range(args.fits):
            for rounds in args.rounds:
                raw: dict[str, list[float]] = {}
                medians = interleaved(engines, x[:1], threads=args.threads, rounds=rounds, per_round=raw)
                for how, timed in (("medians", medians), ("paired", paired_medians(raw, "whole"))):
                    notes = fit_latency_model(model, lambda models: {n: timed[n] for n in models},
                                              mlp_round_to=32).notes
                    fits.append({"fit": k + 1, "rounds": rounds, "how": how,
                                 "latency_ms": {n: round(v, 3) for n, v in timed.items()},
                                 **{key: notes.get(key) for key in ("fixed_ms", "head_ms", "unit_ms",
                                                                    "head_vs_unit_per_mac", "max_residual_ms",
                                                                    "fallback")}})
                    print(f"fit {k + 1}, {rounds} rounds, {how}: " + ", ".join(f"{n} {v:.2f}" for n, v in timed.items())
                          + f" ms; a head {notes.get('head_vs_unit_per_mac')}x its MACs' share next to a unit",
                          flush=True)
    summary = {}
    for rounds in args.rounds:
        for how in ("medians", "paired"):
            ratios = [f["head_vs_unit_per_mac"] for f in fits if f["rounds"] == rounds and f["how"] == how]
            fitted = [r for r in ratios if r is not None]  # None: a slope at or below zero, costs fell back to MACs
            summary[f"{rounds} rounds, {how}"] = {"fits": len(ratios), "fell_back": len(ratios) - len(fitted),
                                                  "head_vs_unit_per_mac": sorted(fitted)}
            print(f"{rounds} rounds, {how}: a head {sorted(fitted)}x its MACs' share next to a unit; "
                  f"{len(ratios) - len(fitted)} of {len(ratios)} fits fell back to MACs")
    write_result({"benchmark": "latency_model_noise", "model": str(args.model), "precision": args.precision,
                  "threads": args.threads, "fits": fits, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
