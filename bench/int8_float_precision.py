"""INT8 models on OpenVINO with what stays in float held at f32, against OpenVINO's own default (bf16 on a CPU with
AMX or AVX-512 BF16): latency at batch 1 and top-1, side by side.

    python bench/int8_float_precision.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        --engine "plain NNCF INT8=RUN/nncf/artifacts/quantize-*/nncf-ov.xml" \\
        --engine "cpu-training-free=RUN/recipe/artifacts/quantize-*/nncf-ov.xml" [--images 2000] [--rounds 15]

An NNCF INT8 model quantizes the linear layers' inputs and weights; LayerNorm, softmax, GELU and the residual adds
stay in float, in whatever precision the plugin is told (``INFERENCE_PRECISION_HINT``). ``ov.compile_model`` with no
properties picks bf16 on such CPUs; this project held them at f32 until 2026-12-02. Each engine is run both ways on
the same first ``--images`` images of the evaluation split (paired top-1 difference, f32 the reference) and timed in
interleaved rounds (``runtimes.noise.interleaved``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import named_file, require_cifar, scored, test_images, write_result  # noqa: E402
from calibration.evaluate import paired_drop  # noqa: E402
from runtimes import default_threads  # noqa: E402
from runtimes.noise import interleaved  # noqa: E402
from runtimes.openvino_cpu import OpenVinoEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint whose preprocessing the engines take")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--engine", action="append", required=True, help="NAME=PATH of an INT8 OpenVINO IR or ONNX")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/int8_float_precision.json"))
    args = parser.parse_args()
    require_cifar(args.data, "test")
    import openvino as ov

    if ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") != ov.Type.bf16:
        sys.exit("OpenVINO's default float precision on this CPU is not bf16 (no AMX or AVX-512 BF16): there is "
                 "nothing to compare")
    default = "bf16"
    hints = {"f32": "f32", "default": default}
    paths = dict(named_file(text, "--engine") for text in args.engine)
    threads = default_threads()
    engines = {(name, how): OpenVinoEngine(path, "int8", threads, default_float=hint)
               for name, path in paths.items() for how, hint in hints.items()}

    data = test_images(args.data, args.model, args.images)
    preprocess = data.preprocess
    right = {key: [] for key in engines}
    for x, y in data.batches(args.batch):
        for key, engine in engines.items():
            right[key].append(engine.run(x).argmax(axis=1) == y)
    results = {key: scored(np.concatenate(r)) for key, r in right.items()}

    shape = (1, preprocess.in_chans, preprocess.crop_size, preprocess.crop_size)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    p50 = interleaved({f"{n} {h}": e for (n, h), e in engines.items()}, x, threads=threads, rounds=args.rounds,
                      iterations=30)
    first = next(iter(paths))
    rows = {}
    for name in paths:
        drop = paired_drop(results[(name, "f32")], results[(name, "default")])
        rows[name] = {"path": str(paths[name]),
                      "top1_f32": results[(name, "f32")].top1, "top1_default": results[(name, "default")].top1,
                      "default_vs_f32_drop": [round(v, 3) for v in drop],
                      "p50_ms_f32": round(p50[f"{name} f32"], 3), "p50_ms_default": round(p50[f"{name} default"], 3),
                      "default_over_f32": round(p50[f"{name} default"] / p50[f"{name} f32"], 3)}
        for how in hints:
            rows[name][f"vs_{first}_{how}"] = round(p50[f"{name} {how}"] / p50[f"{first} {how}"], 3)
        print(f"{name}: f32 {rows[name]['p50_ms_f32']} ms, {default} {rows[name]['p50_ms_default']} ms "
              f"({rows[name]['default_over_f32']}x); top-1 {rows[name]['top1_f32'] * 100:.2f}% -> "
              f"{rows[name]['top1_default'] * 100:.2f}% (drop {drop[0]:+.2f} pt, 95% {drop[1]:+.2f}..{drop[2]:+.2f}); "
              f"vs {first}: {rows[name]['vs_' + first + '_f32']}x with f32, {rows[name]['vs_' + first + '_default']}x "
              "by default")
    print(write_result({"model": str(args.model), "images": len(data), "rounds": args.rounds,
                        "openvino_default_float": default, "rows": rows}, args.out))


if __name__ == "__main__":
    main()
