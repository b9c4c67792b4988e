"""The same model exported in two graph forms (``export.graph``: "standard" and "openvino"), timed side by side on
every runtime and precision a run uses, with the INT8 engines' top-1 on real test images.

    python bench/graph_form.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        [--plan tome:65,0,0,0,0,0,0,0,0,0,0,0] [--rounds 9] [--limit 2000] [--out bench/results/graph_form.json]

``--model`` may be any checkpoint of this project (a pruned stage artifact too); ``--plan`` sets a token reduction
on it (``bench.common.token_plan``; by default the checkpoint's own plan stays). Each form is exported through
``compress.model.runtime_graph.for_runtime`` and ``export_onnx`` (parity against PyTorch checked), quantized by
``nncf.quantize`` with the transformer recipe on 32 calibration images (SmoothQuant off, as ``cpu-training-free``),
then timed at batch 1: OpenVINO INT8, BF16 (where the CPU runs it natively) and FP32, ONNX Runtime FP32, each pair
in interleaved rounds; a ratio is the median over rounds of the "openvino" form's p50 over the standard form's in
the same round. The INT8 engines of both forms are
scored on the first ``--limit`` images of the test split, and their drops paired against the FP32 standard export.
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
    interleaved_rounds, load_trained, paired_ratio, require_cifar, scored, token_plan, write_result,
)
from calibration.calibrate import from_split  # noqa: E402
from calibration.evaluate import paired_drop  # noqa: E402
from compress.api import load_data  # noqa: E402
from compress.model.runtime_graph import for_runtime  # noqa: E402
from compress.tokens import apply  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes import get_runtime  # noqa: E402

FORMS = ("standard", "openvino")


def score(engine, data) -> np.ndarray:
    """Per-image correctness of ``engine`` on ``data``'s batches."""
    return np.concatenate([np.asarray(engine.run(x)).argmax(axis=1) == y for x, y in data.batches(50)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--plan", help="a token reduction set on the model first (bench.common.token_plan); default: the "
                    "checkpoint's own (a tokens stage artifact carries its plan)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--limit", type=int, default=2000, help="test images the INT8 engines are scored on (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "graph_form.json")
    args = ap.parse_args()
    require_cifar(args.data, "test")
    import openvino as ov

    from compress.quantize.openvino_nncf import transformer_int8

    ckpt, model, shape, threads = load_trained(args.model)
    if args.plan is not None:
        model = apply(copy.deepcopy(model), token_plan(args.plan, model))
    data = load_data(args.data, ckpt.preprocess, calib_size=64, eval_limit=max(args.limit, 1))
    calib = from_split(data.calib, 32, shape)
    images = next(data.calib.batches(8))[0]  # (8, C, H, W) real images for the parity checks
    work = Path(tempfile.mkdtemp(prefix="graph-form-"))
    files: dict[str, dict[str, Path]] = {}
    for form in FORMS:
        path = work / f"{form}.onnx"
        result = export_onnx(for_runtime(model, form), path, example=torch.from_numpy(images[:2]),
                             parity_inputs=images, atol=0.1, min_agreement=0.99)
        xml = path.with_suffix(".int8.xml")
        ov.save_model(transformer_int8(ov.Core().read_model(str(path)), calib, smooth_quant=False), str(xml),
                      compress_to_fp16=False)
        files[form] = {"onnx": path, "int8": xml}
        print(f"{form}: exported ({result.nodes_final} nodes, parity {result.parity.max_abs_diff:.1e}) and quantized",
              flush=True)
    x = np.ascontiguousarray(images[:1])
    pairs = [("openvino", "int8", "int8"), ("openvino", "fp32", "onnx"), ("onnxruntime", "fp32", "onnx")]
    if "bf16" in get_runtime("openvino").precisions():
        pairs.insert(1, ("openvino", "bf16", "onnx"))
    rows = []
    for runtime, precision, kind in pairs:
        engines = {form: get_runtime(runtime).build(files[form][kind], precision=precision, threads=threads)
                   for form in FORMS}
        stats = interleaved_rounds(engines, x, [1], rounds=args.rounds, seconds=2.0, threads=threads)[1]
        medians = {form: [s.latency_ms_p50 for s in rounds] for form, rounds in stats.items()}
        row = {"runtime": runtime, "precision": precision,
               "p50_ms": {form: round(float(np.median(medians[form])), 3) for form in FORMS},
               "ratio_openvino_form": round(paired_ratio(medians["openvino"], medians["standard"]), 3)}
        rows.append(row)
        print(f"{runtime} {precision}: standard {row['p50_ms']['standard']:.2f} ms, openvino form "
              f"{row['p50_ms']['openvino']:.2f} ms: {row['ratio_openvino_form']:.3f}x", flush=True)
    accuracy = {}
    if args.limit:
        ov_rt = get_runtime("openvino")
        ref = scored(score(ov_rt.build(files["standard"]["onnx"], precision="fp32", threads=threads), data.eval))
        accuracy["fp32 standard"] = {"top1": round(ref.top1, 5)}
        for form in FORMS:
            right = score(ov_rt.build(files[form]["int8"], precision="int8", threads=threads), data.eval)
            drop = paired_drop(ref, scored(right))
            accuracy[f"int8 {form}"] = {"top1": round(float(right.mean()), 5), "top1_drop": round(drop[0], 3),
                                        "top1_drop_ci95": [round(drop[1], 3), round(drop[2], 3)]}
            print(f"INT8 {form}: top-1 {right.mean() * 100:.2f}% on {len(right)} images, drop {drop[0]:+.2f} pt "
                  f"(95% {drop[1]:+.2f}..{drop[2]:+.2f}) against FP32", flush=True)
    plan = getattr(model, "token_reduction", None)
    write_result({"benchmark": "graph_form", "model": str(args.model), "plan": plan and list(plan.r or plan.keep),
                  "threads": threads,
                  "rounds": args.rounds, "images": args.limit,
                  "int8": "nncf.quantize, transformer recipe, SmoothQuant off, 32 calibration images",
                  "rows": rows, "accuracy": accuracy}, args.out)


if __name__ == "__main__":
    main()
