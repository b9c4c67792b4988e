"""Token reduction plans on a trained model, scored where the chain judges them: OpenVINO, BF16, the whole split.

    python bench/token_accuracy.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        --plans none tome:65,0,0,0,0,0,0,0,0,0,0,0 tome:0,65,0,0,0,0,0,0,0,0,0,0 [--limit 10000] \\
        [--precision bf16] [--graph openvino] [--out bench/results/token_accuracy.json]

Each plan (``none``, ``tome:R``, ``pitome:R`` with ``R`` one value or one per layer and ``/tokens`` to match on
the tokens rather than the keys, ``evit:KEEP[@LAYER,...]``, ``resolution:SIZE``) is set on the model, exported to
ONNX in ``--graph``'s form (parity against PyTorch checked in ONNX Runtime) and scored on OpenVINO in
``--precision`` on the first ``--limit`` images of the evaluation split (all 10,000 CIFAR-10 test images without
it), as ``measure.judge_precision=auto`` scores them in ``cpu-training-free``. Each drop is paired against the
first plan (``none`` unless given) on the same images, with its 95% interval (``calibration.evaluate.paired_drop``).
Per-image results go to the ``.npz`` beside ``--out``; ``--reuse`` takes an earlier one's, so a plan is scored once.
Accuracy only: ``bench/token_latency.py`` times plans.

On 1,000 images a merge's cost came out 1.4 pt lower than on all 10,000 (BENCHMARKS.md): score on the whole split
before choosing a placement.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    load_reused, load_trained, require_cifar, scored, test_images, token_plan, write_result,
)
from calibration.evaluate import paired_drop  # noqa: E402
from compress.api import export_model  # noqa: E402
from compress.model.macs import count_macs  # noqa: E402
from compress.tokens import apply  # noqa: E402
from runtimes import get_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--plans", nargs="+", required=True, help="the first is the reference of the paired drops")
    ap.add_argument("--limit", type=int, help="score only the first LIMIT images of the split")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--graph", choices=["standard", "openvino"], default="openvino")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "token_accuracy.json")
    ap.add_argument("--reuse", type=Path, help="an earlier run's .npz: plans found there are not scored again")
    args = ap.parse_args()
    require_cifar(args.data, "test")
    _, model, shape, threads = load_trained(args.model)
    data = test_images(args.data, args.model, args.limit or None)
    example = next(data.batches(8))[0]  # (8, C, H, W) real images: the export's parity inputs
    import openvino as ov

    # a stored result is reused only for the same weights, plan, precision, form, OpenVINO version and images
    source = hashlib.sha256(args.model.read_bytes())
    source.update(f"{args.precision} {args.graph} {ov.get_version()}".encode())
    source.update(np.ascontiguousarray(data.indices, dtype=np.int64).tobytes())
    stored = load_reused(args.reuse)
    full = count_macs(model, (1, *shape))
    correct, rows = {}, {}
    work = Path(tempfile.mkdtemp(prefix="token-accuracy-"))
    for spec in args.plans:
        reduced = apply(copy.deepcopy(model), token_plan(spec, model))
        key = hashlib.sha256(f"{source.hexdigest()} {spec}".encode()).hexdigest()[:16]
        rows[spec] = {"plan": spec, "macs_fraction": round(count_macs(reduced, (1, *shape)) / full, 3)}
        if key in stored and stored[key].shape == (len(data),):
            correct[spec] = stored[key]
            print(f"{spec}: per-image results reused from {args.reuse}", flush=True)
            continue
        path = work / f"{key}.onnx"
        export_model(reduced, path, example, graph=args.graph, atol=0.1)
        engine = get_runtime("openvino").build(path, precision=args.precision, threads=threads)
        start, right = time.perf_counter(), []
        for x, y in data.batches(args.batch):
            right.append(np.asarray(engine.run(x)).argmax(axis=1) == y)
        correct[spec] = np.concatenate(right)
        stored[key] = correct[spec]
        rows[spec]["scoring_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{spec}: scored {len(data)} images in {rows[spec]['scoring_seconds']:.0f} s", flush=True)
    reference = scored(correct[args.plans[0]])
    for spec, row in rows.items():
        result = scored(correct[spec])
        row["top1"] = round(result.top1, 5)
        if spec != args.plans[0]:
            drop, low, high = paired_drop(reference, result)
            row |= {"top1_drop": round(drop, 3), "top1_drop_ci95": [round(low, 3), round(high, 3)]}
        interval = f"drop {row['top1_drop']:+.2f} pt (95% {row['top1_drop_ci95'][0]:+.2f}.." \
                   f"{row['top1_drop_ci95'][1]:+.2f})" if "top1_drop" in row else "(reference)"
        print(f"{spec:>34}: {row['macs_fraction']:.2f}x MACs, top-1 {result.top1 * 100:.2f}% {interval}", flush=True)
    write_result({"benchmark": "token_accuracy", "model": str(args.model), "images": len(data),
                  "precision": args.precision, "graph": args.graph, "rows": list(rows.values())}, args.out)
    np.savez_compressed(args.out.with_suffix(".npz"), **stored)
    print(args.out, args.out.with_suffix(".npz"))


if __name__ == "__main__":
    main()
