"""Peak memory of ONNX Runtime static calibration on the pruned ViT-B/16 chain: one run per batch of 32 images
against runs of ``CALIB_BATCH`` images folded one by one (what ``quantize_static_qdq`` does).

    python bench/calibration_memory.py --data /tmp/cifar10 [--images 128] [--entropy-images 64]

The model is what the quantize stage of ``bench/memory.py`` sees: ViT-B/16 (random weights, 10 classes), pruned
and token-reduced as the ``cpu-latency`` recipe says (when BENCHMARKS.md's figures were taken: a third of the
heads and two thirds of the MLP units in every layer, EViT keeping half the tokens at layer 8). Each
setting runs ``onnxruntime.quantization.quantize_static`` through the product's own call
(``compress.quantize.onnxruntime_ptq.run_quantize_static``: QDQ, INT8 symmetric, per-channel weights) in its own
process on the same CIFAR-10 images upscaled to 224, and the figure is that process's peak resident memory
(``ru_maxrss``). Every MatMul gets Q/DQ here, attention's too, where the product's default quantizes only the
weighted ones; calibration, where the memory goes, measures every tensor of those op types either way.

The scales are compared too: MinMax must give the same scales either way; Entropy's histograms, folded run by
run, bin differently. So that the difference is judged by accuracy, not by scales of random weights, the trained
CIFAR-10 ViT (``--model``) is also quantized both ways with each method and evaluated on the whole test split.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import require_cifar, write_result  # noqa: E402
from compress.quantize.onnxruntime_ptq import CALIB_BATCH, run_quantize_static  # noqa: E402

INPUT = "pixel_values"
OP_TYPES = ("MatMul", "Gemm")  # every MatMul, attention's too: calibration covers every tensor of these types


def build(work: Path, data: Path, images: int) -> tuple[Path, Path]:
    """The chain's float ONNX and ``images`` calibration images (.npy), both under ``work``."""
    import torch

    from bench.memory import VIT_B16
    from calibration.datasets import Subset, make_splits, open_source
    from calibration.preprocess import Preprocess
    from compress.prune.structured import l2_importance, prune_by_ratio
    from compress.recipes import CPU_LATENCY
    from compress.tokens import apply, evit, layers_at
    from compress.model.vit import VisionTransformer
    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    source = open_source(data)
    splits = make_splits(source, calib_size=512, seed=0)
    pre = Preprocess(crop_size=224, resize_size=224, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    x = next(Subset(source, splits.calib, pre).batches(images))[0]
    np.save(work / "calib.npy", x)
    base = VisionTransformer(VIT_B16).eval()
    prune, tokens = CPU_LATENCY["prune"], CPU_LATENCY["tokens"]  # the cpu-latency recipe's settings
    chain = prune_by_ratio(base, l2_importance(base), heads=prune["heads"], mlp=prune["mlp"], scope=prune["scope"])
    apply(chain, evit(tokens["keep_rate"], VIT_B16.depth, layers_at(tokens["depths"], VIT_B16.depth)))
    onnx_path = work / "chain.onnx"
    # random weights leave token ranks nearly tied; a tie broken the other way moves the logits (bench/pipeline.py)
    export_onnx(chain, onnx_path, example=torch.from_numpy(x[:2]), parity_inputs=x[:4], atol=1e-2)
    return onnx_path, work / "calib.npy"


def child(onnx_path: Path, calib_path: Path, out: Path, method: str, images: int, batch: int, strided: bool) -> None:
    """One calibration in this process; prints its peak RSS and time as JSON."""
    from calibration.calibrate import from_array

    calib = from_array(calib_path, images, (3, 224, 224), batch_size=32)
    start = time.perf_counter()
    run_quantize_static(onnx_path, out, calib, INPUT, method, OP_TYPES, images_per_run=batch, strided=strided)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


def accuracy(model_path: Path, data: Path, work: Path) -> list[dict]:
    """Top-1 on the test split of the trained CIFAR-10 ViT, INT8 by each method, one pass against folded runs."""
    import torch

    from calibration.calibrate import from_split
    from calibration.datasets import Subset, make_splits, open_source
    from compress.model.checkpoint import load_own_checkpoint
    from compress.quantize.base import artifact_evaluator
    from export.onnx_export import export_onnx

    ckpt = load_own_checkpoint(model_path)
    source = open_source(data)
    splits = make_splits(source, calib_size=512, seed=0)
    test = Subset(source, splits.eval, ckpt.preprocess)
    x = next(test.batches(8))[0]
    float_onnx = work / "cifar10-vit.onnx"
    export_onnx(ckpt.model.eval(), float_onnx, example=torch.from_numpy(x[:2]), parity_inputs=x)
    calib = from_split(Subset(source, splits.calib, ckpt.preprocess), 256, x.shape[1:])
    evaluate = artifact_evaluator(test, threads=2)
    rows = [{"method": "float", "top1": evaluate(float_onnx, "onnx", "fp32")}]
    for method in ("minmax", "entropy", "percentile"):
        for batch, strided in ((32, False), (CALIB_BATCH, True)):
            out = work / f"cifar10-{method}-{batch}.onnx"
            run_quantize_static(float_onnx, out, calib, INPUT, method, OP_TYPES, images_per_run=batch,
                                strided=strided)
            rows.append({"method": method, "images": calib.size, "images_per_run": batch, "strided": strided,
                         "top1": evaluate(out, "onnx", "int8")})
            print(f"CIFAR-10 ViT, {method}, runs of {batch}: top-1 {rows[-1]['top1'] * 100:.2f}%", flush=True)
    return rows


def activation_scales(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[0]: inits[n.input[1]] for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--images", type=int, default=128, help="calibration images for MinMax")
    parser.add_argument("--entropy-images", type=int, default=64,
                        help="calibration images for Entropy (its one-pass form holds every tensor of every image)")
    parser.add_argument("--model", type=Path, default=REPO / "models/cifar10-vit/model.safetensors",
                        help="the trained CIFAR-10 ViT whose accuracy judges the two forms (none: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration_memory_vit_b16.json"))
    parser.add_argument("--child", nargs=7, metavar=("ONNX", "NPY", "OUT", "METHOD", "IMAGES", "BATCH", "STRIDED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        onnx_path, calib, out, method, images, batch, strided = args.child
        child(Path(onnx_path), Path(calib), Path(out), method, int(images), int(batch), strided == "1")
        return
    require_cifar(args.data)
    if str(args.model) != "none" and not args.model.is_file():
        sys.exit(f"no trained model at {args.model}; pass --model PATH, or --model none to skip the accuracy part")
    work = Path(tempfile.mkdtemp(prefix="bench-calibration-memory-"))
    onnx_path, calib = build(work, args.data, max(args.images, args.entropy_images))
    cases = [("minmax", args.images, 32, False), ("minmax", args.images, CALIB_BATCH, True),
             ("entropy", args.entropy_images, 32, False), ("entropy", args.entropy_images, CALIB_BATCH, True)]
    rows = []
    for method, images, batch, strided in cases:
        out = work / f"{method}-{batch}-{int(strided)}.onnx"
        print(f"{method}: {images} images in runs of {batch}{', strided' if strided else ''} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", str(onnx_path), str(calib), str(out), method,
                               str(images), str(batch), "1" if strided else "0"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{method} calibration failed:\n{done.stderr[-3000:]}")
        rows.append({"method": method, "images": images, "images_per_run": batch, "strided": strided,
                     "product_setting": batch == CALIB_BATCH and strided, "scales": out}
                    | json.loads(done.stdout.strip().splitlines()[-1]))
    for method in ("minmax", "entropy"):
        one, folded = (activation_scales(r.pop("scales")) for r in rows if r["method"] == method)
        diffs = [float(np.max(np.abs(folded[k] - v) / np.abs(v))) for k, v in one.items()]
        row = next(r for r in rows if r["method"] == method and r["strided"])
        row["max_relative_scale_difference"] = max(diffs)
        row["median_relative_scale_difference"] = float(np.median(diffs))
    result = {"benchmark": "peak RSS of ONNX Runtime static calibration, pruned ViT-B/16 + EViT, 224x224",
              "calib_batch": CALIB_BATCH, "rows": rows}
    if str(args.model) != "none":
        result["cifar10_vit_top1"] = accuracy(args.model, args.data, work)
    write_result(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
