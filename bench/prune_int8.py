"""What INT8 costs after post-training pruning: the same mask repaired two ways, each quantized as a user would.

    python bench/prune_int8.py --data /tmp/cifar10 --model runs/dinov2-s14-cifar10/full/model.safetensors \
        [--macs 0.8] [--eval-limit 1000] [--out bench/results/prune_int8_reference.json]

The model as loaded, and the mask search's mask at ``--macs`` (Fisher importance on 256 calibration images,
rearranged, MLP widths rounded to 32: the chain's settings) repaired by least squares with ``scales`` and with
``weights`` (``prune.reconstruct_fit``) on the same 256 images. Each is exported to ONNX and quantized by plain
``nncf.quantize`` (``ModelType.TRANSFORMER``, which applies SmoothQuant, 256 calibration images), and scored on
OpenVINO in FP32 and INT8 on the same seeded ``--eval-limit`` test images. The INT8 drop is taken against each
model's own FP32 top-1, with its paired 95% interval, so a repair that makes INT8 harder shows apart from the
cut itself. Accuracy only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import require_cifar, write_result  # noqa: E402
from calibration.evaluate import evaluate_top1, paired_drop  # noqa: E402
from compress.api import export_model, load_data, load_model  # noqa: E402
from compress.prune.reconstruct import reconstruct  # noqa: E402
from compress.prune.structured import prune_searched, taylor_importance  # noqa: E402
from runtimes import get_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--macs", type=float, default=0.8)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prune_int8_reference.json")
    args = ap.parse_args()
    require_cifar(args.data, "test")
    import nncf
    import openvino as ov

    torch.set_num_threads(2)
    ckpt = load_model(args.model)
    data = load_data(args.data, ckpt.preprocess, calib_size=256, eval_limit=args.eval_limit)
    model = ckpt.model.eval()
    calib = [x for x, _ in data.calib.batches(32)]
    start = time.perf_counter()
    importance = taylor_importance(model, data.calib.batches(32), targets="predictions", fisher=True, gram=True)
    pruned, search = prune_searched(model, importance, args.macs, mlp_round_to=32, rearrange=True)
    print(f"mask at {search['macs_fraction']:.3f}x the MACs in {time.perf_counter() - start:.0f} s", flush=True)
    models = {"as loaded": model}
    for fit in ("scales", "weights"):
        models[f"pruned {args.macs:g}x, repaired by {fit}"] = repaired = copy.deepcopy(pruned)
        info = reconstruct(repaired, model, calib, weights=fit == "weights")
        print(f"repair by {fit}: stream error {info['stream_mse_before']:.3f} -> {info['stream_mse_after']:.3f}",
              flush=True)
    example = np.concatenate(calib)[:32]
    rows = []
    openvino = get_runtime("openvino")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(models.items()):
            onnx_path = Path(tmp) / f"m{i}.onnx"
            export_model(m, onnx_path, example)
            start = time.perf_counter()
            images = [x[None] for x in np.concatenate(calib)]
            quantized = nncf.quantize(ov.Core().read_model(onnx_path), nncf.Dataset(images), subset_size=len(images),
                                      model_type=nncf.ModelType.TRANSFORMER)
            xml = Path(tmp) / f"m{i}-int8.xml"
            ov.save_model(quantized, xml)
            seconds = time.perf_counter() - start
            fp32 = evaluate_top1(openvino.build(onnx_path, precision="fp32", threads=2).run, data.eval)
            int8 = evaluate_top1(openvino.build(xml, precision="int8", threads=2).run, data.eval)
            drop = [round(v, 2) for v in paired_drop(fp32, int8)]
            agree = float(np.mean(fp32.predictions == int8.predictions))
            rows.append({"model": name, "top1_fp32": fp32.top1, "top1_int8": int8.top1, "int8_drop": drop,
                         "agreement": agree, "quantize_s": round(seconds, 1)})
            print(f"{name}: FP32 {fp32.top1:.4f}, INT8 {int8.top1:.4f} (drop {drop[0]:+.2f} pt, 95% {drop[1]:+.2f}.."
                  f"{drop[2]:+.2f}), quantized in {seconds:.0f} s", flush=True)
    write_result({"benchmark": "prune_int8", "model": str(args.model), "macs": args.macs,
                  "eval_images": len(data.eval), "search": search, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
