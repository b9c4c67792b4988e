"""NNCF INT8 settings side by side on a trained model: top-1 on OpenVINO and latency at batch 1, in one run.

    python bench/int8_variants.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        [--eval-limit 1000] [--calib 256] [--rounds 7] [--out bench/results/int8_variants.json]

The model is exported to ONNX once and quantized by ``nncf.quantize`` (ModelType.TRANSFORMER) several ways:
``performance`` (symmetric activations, SmoothQuant off: what ``cpu-training-free`` runs), ``mixed`` (asymmetric
activations, NNCF's own default for transformers), and each with SmoothQuant on (NNCF's default). Each engine is
scored on the seeded ``--eval-limit`` test images on OpenVINO, its drop paired against the FP32 model's on the same
images (``calibration.evaluate.paired_drop``), and timed at batch 1 in interleaved rounds against the first
variant (each round times every engine in turn; a ratio is the median over rounds of the per-round ratio).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import interleaved_rounds, load_trained, paired_ratio, require_cifar, write_result  # noqa: E402
from calibration.calibrate import from_split  # noqa: E402
from calibration.evaluate import evaluate_top1, paired_drop  # noqa: E402
from compress.api import load_data  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes import get_runtime  # noqa: E402

VARIANTS = {  # name: (preset, SmoothQuant)
    "performance": ("PERFORMANCE", False),
    "mixed": ("MIXED", False),
    "performance+sq": ("PERFORMANCE", True),
    "mixed+sq": ("MIXED", True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=256, help="calibration images nncf.quantize sees")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_variants.json")
    args = ap.parse_args()
    require_cifar(args.data, "test")
    import openvino as ov

    from compress.quantize.openvino_nncf import transformer_int8

    ckpt, model, shape, threads = load_trained(args.model)
    data = load_data(args.data, ckpt.preprocess, calib_size=args.calib + 64, eval_limit=args.eval_limit)
    calib = from_split(data.calib, args.calib, shape)
    images = next(data.calib.batches(4))[0]
    work = Path(tempfile.mkdtemp(prefix="int8-variants-"))
    path = work / "model.onnx"
    export_onnx(model, path, example=torch.from_numpy(images[:2]), parity_inputs=images, atol=0.1, min_agreement=0.99)
    openvino = get_runtime("openvino")

    def score(engine):
        return evaluate_top1(engine.run, data.eval, batch_size=16)

    start = time.perf_counter()
    fp32 = openvino.build(path, precision="fp32", threads=threads)
    base = score(fp32)
    print(f"FP32 on OpenVINO: top-1 {base.top1:.4f} on {base.num_samples} images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    engines, rows = {}, {}
    for name in args.variants:
        preset, smooth = VARIANTS[name]
        start = time.perf_counter()
        quantized = transformer_int8(ov.Core().read_model(str(path)), calib, smooth_quant=smooth, preset=preset)
        xml = work / f"{name}.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        quantize_s = time.perf_counter() - start
        engines[name] = openvino.build(xml, precision="int8", threads=threads)
        result = score(engines[name])
        drop = paired_drop(base, result)
        rows[name] = {"preset": preset.lower(), "smooth_quant": smooth, "top1": result.top1,
                      "drop": [round(v, 2) for v in drop], "quantize_s": round(quantize_s, 1)}
        print(f"{name}: top-1 {result.top1:.4f} (drop {drop[0]:+.2f} pt, 95% {drop[1]:+.2f}..{drop[2]:+.2f}), "
              f"quantized in {quantize_s:.0f} s", flush=True)
    x = np.ascontiguousarray(images[:1])
    stats = interleaved_rounds(engines, x, [1], rounds=args.rounds, seconds=3.0, threads=threads)[1]
    medians = {name: [s.latency_ms_p50 for s in rounds] for name, rounds in stats.items()}
    first = args.variants[0]
    for name, row in rows.items():
        row["int8_p50_ms"] = round(float(np.median(medians[name])), 2)
        row[f"ratio_vs_{first}"] = round(paired_ratio(medians[name], medians[first]), 3)
        print(f"{name:>16}: p50 {row['int8_p50_ms']:.1f} ms, {row[f'ratio_vs_{first}']:.3f}x {first}", flush=True)
    write_result({"benchmark": "int8_variants", "model": str(args.model), "threads": threads, "rounds": args.rounds,
                  "eval_images": base.num_samples, "fp32_top1_openvino": base.top1, "calib_images": calib.size,
                  "rows": rows}, args.out)


if __name__ == "__main__":
    main()
