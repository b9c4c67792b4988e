"""What judging in BF16 costs and buys: scoring time per image in FP32 and BF16 on OpenVINO, and how often the two
agree, for float ONNX files of one model.

    python bench/judge_precision.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        --onnx "as loaded=RUN/recipe/artifacts/baseline-*.onnx" --onnx "ToMe=RUN/recipe/artifacts/tokens-*.onnx" \\
        [--images 300] [--out bench/results/judge_precision.json]

A chain scores every float model and every setting a stage tries on the evaluation split
(``measure.judge_precision``). On a CPU with AMX, BF16 runs the reference ViT-S several times faster than FP32, so
a run can judge on the whole split in the time FP32 takes for a fraction of it; the price is that the two
precisions answer differently on some images, which this measures too (the first ``--images`` of the split, each
batch run through both engines in turn).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import named_file, require_cifar, test_images, write_result  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint whose preprocessing the files take")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--onnx", action="append", required=True, help="NAME=PATH of a float ONNX file")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/judge_precision.json"))
    args = parser.parse_args()
    require_cifar(args.data, "test")
    files = [named_file(item, "--onnx") for item in args.onnx]
    openvino = get_runtime("openvino")
    if "bf16" not in openvino.precisions():
        sys.exit(f"OpenVINO offers {openvino.precisions()} on this CPU, not bf16: nothing to compare")
    data = test_images(args.data, args.model, args.images)
    batches = list(data.batches(args.batch))
    threads = default_threads()
    rows = {}
    for name, path in files:
        engines = {p: openvino.build(path, precision=p, threads=threads) for p in ("fp32", "bf16")}
        for engine in engines.values():
            engine.run(batches[0][0])  # compiled and warm before the clock starts
        predictions = {p: [] for p in engines}
        seconds = dict.fromkeys(engines, 0.0)
        for x, _ in batches:
            for p, engine in engines.items():
                start = time.perf_counter()
                predictions[p].append(np.asarray(engine.run(x)).argmax(axis=1))
                seconds[p] += time.perf_counter() - start
        labels = data.labels
        fp32, bf16 = (np.concatenate(predictions[p]) for p in ("fp32", "bf16"))
        rows[name] = {"path": str(path),
                      "ms_per_image": {p: round(s / len(labels) * 1000, 2) for p, s in seconds.items()},
                      "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 2),
                      "agreement": round(float(np.mean(fp32 == bf16)), 4),
                      "top1": {"fp32": round(float(np.mean(fp32 == labels)), 4),
                               "bf16": round(float(np.mean(bf16 == labels)), 4)}}
        r = rows[name]
        print(f"{name}: FP32 {r['ms_per_image']['fp32']} ms an image, BF16 {r['ms_per_image']['bf16']} "
              f"({r['bf16_speedup']}x); they agree on {r['agreement'] * 100:.1f}% of {len(labels)} images", flush=True)
    print(write_result({"model": str(args.model), "images": len(data), "batch": args.batch, "threads": threads,
                        "rows": rows}, args.out))


if __name__ == "__main__":
    main()
