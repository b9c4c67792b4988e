"""Token reduction plans on a trained model, timed side by side in the precision the chain ends in: INT8 on OpenVINO.

    python bench/token_latency.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        --plans none tome:12 pitome:12 resolution:168 [--rounds 7] [--profile] [--graph openvino] \\
        [--out bench/results/token_latency.json]

Each plan (``none``, ``tome:R``, ``pitome:R`` with ``R`` one value or one per layer, ``evit:KEEP[@LAYER,...]``,
``resolution:SIZE``) is set on the model, exported to ONNX (parity against PyTorch checked in ONNX Runtime and
OpenVINO on calibration images), quantized by ``nncf.quantize`` with the transformer recipe on 32 calibration images
(SmoothQuant off, as in ``cpu-training-free``), and timed at batch 1 on OpenVINO in interleaved rounds: each round
times every plan in turn, and a plan's ratio is the median over rounds of its p50 over the unreduced model's p50 in
the same round. With ``--profile``, also the time per class of op of each plan (OpenVINO's per-node counters).
Latency only: top-1 comes from ``bench/prune_posttraining.py --tokens``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    interleaved_rounds, load_trained, paired_ratio, require_cifar, token_plan, write_result,
)
from calibration.calibrate import from_split  # noqa: E402
from compress.api import load_data  # noqa: E402
from compress.model.macs import count_macs  # noqa: E402
from compress.model.runtime_graph import for_runtime  # noqa: E402
from compress.run.measure import openvino_parity  # noqa: E402
from compress.tokens import apply  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes import get_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--plans", nargs="+", default=["none", "tome:12", "pitome:12"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true",
                    help="also where each plan's INT8 time goes, by class of op (OpenVINO's per-node counters, "
                         "runtimes.profile.summarize), on a copy compiled apart after the rounds")
    ap.add_argument("--graph", choices=["standard", "openvino"], default="standard",
                    help="the exported graph's form (export.graph; compress.model.runtime_graph): openvino is what "
                         "the CPU recipes export")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "token_latency.json")
    args = ap.parse_args()
    require_cifar(args.data, "train")
    if args.plans[0] != "none":
        args.plans.insert(0, "none")  # the reference every ratio is taken against
    import openvino as ov

    from compress.quantize.openvino_nncf import transformer_int8

    ckpt, model, shape, threads = load_trained(args.model)
    data = load_data(args.data, ckpt.preprocess, calib_size=64, eval_limit=1)
    calib = from_split(data.calib, 32, shape)
    images = next(data.calib.batches(8))[0]  # (8, C, H, W) real images for the parity checks
    full = count_macs(model, (1, *shape))
    engines, rows = {}, {}
    work = Path(tempfile.mkdtemp(prefix="token-latency-"))
    for spec in args.plans:
        reduced = apply(copy.deepcopy(model), token_plan(spec, model))
        path = work / f"{spec.replace(':', '-')}.onnx"
        parity = export_onnx(for_runtime(reduced, args.graph), path, example=torch.from_numpy(images[:2]),
                             parity_inputs=images, atol=0.1, min_agreement=0.99)
        ov_diff = openvino_parity(path, reduced, images, atol=0.1, threads=threads)
        xml = path.with_suffix(".int8.xml")
        ov.save_model(transformer_int8(ov.Core().read_model(str(path)), calib, smooth_quant=False), str(xml),
                      compress_to_fp16=False)
        engines[spec] = get_runtime("openvino").build(xml, precision="int8", threads=threads)
        rows[spec] = {"plan": spec, "macs_fraction": round(count_macs(reduced, (1, *shape)) / full, 3),
                      "parity_onnxruntime_max_abs_diff": parity.parity.max_abs_diff,
                      "parity_openvino_max_abs_diff": ov_diff}
        print(f"{spec}: exported and quantized, {rows[spec]['macs_fraction']:.2f}x the MACs", flush=True)
    x = np.ascontiguousarray(images[:1])
    stats = interleaved_rounds(engines, x, [1], rounds=args.rounds, seconds=3.0, threads=threads)[1]
    medians = {name: [s.latency_ms_p50 for s in rounds] for name, rounds in stats.items()}
    for spec, row in rows.items():
        row["int8_p50_ms"] = round(float(np.median(medians[spec])), 2)
        row["ratio_vs_unreduced"] = round(paired_ratio(medians[spec], medians["none"]), 3)
        print(f"{spec:>16}: {row['macs_fraction']:.2f}x MACs, INT8 p50 {row['int8_p50_ms']:.1f} ms, "
              f"{row['ratio_vs_unreduced']:.3f}x the unreduced model's latency", flush=True)
    if args.profile:
        from runtimes.profile import summarize

        for spec, row in rows.items():
            profile = summarize(engines[spec].profile(x, runs=20), int8_expected=True)
            row["profile"] = {k: profile[k] for k in ("total_ms", "by_class", "nodes", "not_int8")}
            classes = ", ".join(f"{c} {ms:.2f}" for c, ms in sorted(profile["by_class"].items(), key=lambda kv: -kv[1]))
            print(f"{spec:>16}: {profile['nodes']} nodes, {profile['total_ms']:.1f} ms counted: {classes}", flush=True)
    write_result({"benchmark": "token_latency", "model": str(args.model), "threads": threads, "rounds": args.rounds,
                  "graph": args.graph,
                  "precision": "int8 (nncf.quantize, transformer recipe, SmoothQuant off, 32 images)",
                  "rows": list(rows.values())}, args.out)


if __name__ == "__main__":
    main()
