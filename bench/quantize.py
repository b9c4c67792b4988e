"""Quantization benchmark: INT8 latency on ViT-S/16 and top-1 of every candidate on the CIFAR-10 ViT.

    python bench/quantize.py latency --data /tmp/cifar10 [--rounds 5] [--out bench/results/quantize_vit_s16.json]
    python bench/quantize.py accuracy --data /tmp/cifar10 [--out bench/results/quantize_cifar10.json]

``latency``: ViT-S/16 at 224x224 (random weights: latency does not depend on them), calibrated on 128 real
CIFAR-10 images upscaled to 224. Every INT8 path of ours is timed beside ONNX Runtime FP32, OpenVINO BF16 and
plain ``nncf.quantize`` on OpenVINO, in interleaved rounds (each round times every path once, in turn, so the
machine's noise falls on all alike); the figure per path is the median of the round medians, and ratios are
paired per round against ONNX Runtime FP32, then the median taken. No accuracy is claimed for this model.

``accuracy``: the reference CIFAR-10 ViT (models/cifar10-vit) through ``compress run``'s quantization stage,
top-1 of every candidate on every runtime over the 10,000 test images, with a short latency check.

Both need the CIFAR-10 JPEG folders (``mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10-jpeg.tar.gz
-C /tmp/cifar10``); they stop with that instruction when the folder is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.calibrate import from_split  # noqa: E402
from calibration.datasets import Subset, make_splits, open_source  # noqa: E402
from calibration.preprocess import Preprocess  # noqa: E402
from compress.quantize.base import QuantizeContext, artifact_evaluator  # noqa: E402
from compress.model.vit import VisionTransformer  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from bench.common import VIT_S16, interleaved_rounds, paired_ratio, require_cifar, write_result  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402



def latency(args: argparse.Namespace) -> dict:
    from compress.quantize.neural_compressor_pt2e import quantize_pt2e
    from compress.quantize.onnxruntime_ptq import quantize_dynamic_int8, quantize_static_qdq
    from compress.quantize.openvino_nncf import quantize_openvino

    threads = default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = VisionTransformer(VIT_S16).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    source = open_source(args.data)
    splits = make_splits(source, calib_size=512, seed=0)
    pre = Preprocess(crop_size=224, resize_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    calib = from_split(Subset(source, splits.calib, pre), args.calib_size, (3, 224, 224), batch_size=16)
    eval_data = Subset(source, splits.eval[:8], pre)  # the quantizers' API scores candidates; 8 images suffice here
    x = next(eval_data.batches(8))[0]
    float_onnx = work / "vit_s16.onnx"
    export_onnx(model, float_onnx, example=torch.from_numpy(x[:1]), parity_inputs=x[:2])

    evaluate = artifact_evaluator(eval_data, threads=threads)

    def ctx(**kw) -> QuantizeContext:
        defaults = dict(model=model, float_onnx=float_onnx, calib=calib, evaluate=evaluate, reference_top1=0.0,
                        max_drop=100.0, workdir=work, threads=threads, sensitivity_samples=8, inc_max_trials=0,
                        log=lambda m: print(m, flush=True))
        return QuantizeContext(**(defaults | kw))

    static, _ = quantize_static_qdq(ctx())
    static_u8, _ = quantize_static_qdq(ctx(activations="uint8", workdir=_sub(work, "u8")))
    static_attn, _ = quantize_static_qdq(ctx(attention_matmul=True, workdir=_sub(work, "attn")))
    dynamic = quantize_dynamic_int8(ctx())
    nncf_ov = quantize_openvino(ctx())
    inc = quantize_pt2e(ctx(), lambda m: 0.0)
    ort, ov = get_runtime("onnxruntime"), get_runtime("openvino")
    paths = {
        "onnxruntime fp32": (ort, float_onnx, "fp32"),
        "openvino bf16": (ov, float_onnx, "bf16"),
        "openvino int8 plain nncf.quantize (peer)": (ov, nncf_ov.path, "int8"),
        "onnxruntime int8 ort-static (s8s8, TensorRT-ready)": (ort, static.path, "int8"),
        "onnxruntime int8 ort-static uint8 (u8s8)": (ort, static_u8.path, "int8"),
        "onnxruntime int8 ort-static + attention matmuls": (ort, static_attn.path, "int8"),
        "onnxruntime int8 ort-dynamic": (ort, dynamic.path, "int8"),
        "onnxruntime int8 inc-pt2e": (ort, inc.path, "int8"),
        "openvino int8 ort-static QDQ": (ov, static.path, "int8"),
        "openvino int8 ort-static + attention matmuls QDQ": (ov, static_attn.path, "int8"),
        "openvino int8 inc-pt2e QDQ": (ov, inc.path, "int8"),
    }
    engines = {name: rt.build(src, precision=p, threads=threads) for name, (rt, src, p) in paths.items()}
    data = np.random.default_rng(0).standard_normal((max(args.batch_sizes), 3, 224, 224)).astype(np.float32)
    stats = interleaved_rounds(engines, data, args.batch_sizes, rounds=args.rounds, seconds=args.seconds,
                               threads=threads)
    rows = []
    for batch in args.batch_sizes:
        medians = {n: [s.latency_ms_p50 for s in v] for n, v in stats[batch].items()}
        for name in engines:
            values = medians[name]
            rows.append({"batch_size": batch, "path": name, "latency_ms_p50": round(float(np.median(values)), 2),
                         "paired_ratio_vs_ort_fp32": round(paired_ratio(values, medians["onnxruntime fp32"]), 3),
                         "round_medians_ms": [round(float(v), 2) for v in values]})
    return {"benchmark": "ViT-S/16 224x224 INT8 paths, random weights, calibrated on CIFAR-10 upscaled",
            "calib_size": args.calib_size, "rounds": args.rounds, "threads": threads, "rows": rows}


def _sub(path: Path, name: str) -> Path:
    (path / name).mkdir(exist_ok=True)
    return path / name


def accuracy(args: argparse.Namespace) -> dict:
    from compress.model.checkpoint import load_own_checkpoint
    from compress.config import load_config
    from compress.run.pipeline import run_pipeline

    ckpt_path = REPO / "models" / "cifar10-vit" / "model.safetensors"
    config = load_config(REPO / "models" / "cifar10-vit" / "recipe.toml",
                         [f'data.path="{args.data}"', "measure.batch_sizes=[1]", "measure.iterations=50",
                          "measure.max_seconds=2.0"])
    run_dir = Path(tempfile.mkdtemp(prefix="bench-quantize-cifar-")) / "run"
    result = run_pipeline(load_own_checkpoint(ckpt_path), "models/cifar10-vit", config, run_dir)
    rows = [{"stage": r.stage, "candidate": r.candidate, "runtime": r.runtime, "precision": r.precision,
             "top1": r.top1, "top1_drop_pt": r.top1_drop, "agreement": r.agreement,
             "latency_ms_p50_b1": r.latency_ms_p50, "float_layers": len(r.float_layers or []),
             "calibration": r.calibration} for r in result.records if r.status == "ok"]
    return {"benchmark": "CIFAR-10 ViT (models/cifar10-vit), top-1 of every quantized candidate",
            "eval_images": rows[0]["top1"] and result.records[0].eval_samples, "run_dir": str(run_dir),
            "selected": json.loads((run_dir / "stages" / "quantize.json").read_text())["selected"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["latency", "accuracy"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per path, batch and round")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    require_cifar(args.data)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = latency(args) if args.part == "latency" else accuracy(args)
    out = write_result(result, args.out or
                       Path(f"bench/results/quantize_{'vit_s16' if args.part == 'latency' else 'cifar10'}.json"))
    if args.part == "latency":
        print("\n| batch | path | p50 ms | paired vs ORT FP32 |\n|---|---|---|---|")
        for row in result["rows"]:
            print(f"| {row['batch_size']} | {row['path']} | {row['latency_ms_p50']:.2f} | "
                  f"{row['paired_ratio_vs_ort_fp32']:.2f}x |")
    else:
        print("\n| candidate | runtime | precision | top-1 | drop (pt) | agree | float layers | p50 ms b1 |\n"
              "|---|---|---|---|---|---|---|---|")
        for row in result["rows"]:
            print(f"| {row['candidate'] or row['stage']} | {row['runtime']} | {row['precision']} | "
                  f"{row['top1'] * 100:.2f} | {row['top1_drop_pt']:+.2f} | {row['agreement']:.4f} | "
                  f"{row['float_layers']} | {row['latency_ms_p50_b1']:.2f} |")
        print(f"\nselected: {result['selected']}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
