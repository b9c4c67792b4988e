"""Does keeping the INT8-sensitive inputs of an NNCF INT8 model in float buy back its top-1? Rank, then revert.

    python bench/int8_keep_float.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        --float RUN/recipe/artifacts/tokens-*.onnx --int8 RUN/recipe/artifacts/quantize-*/nncf-ov.xml \\
        [--rank-images 128] [--images 2000] [--keep 0,3,6,10]

NNCF's accuracy control ranks quantizers by what reverting each one does to the metric on a subset, then reverts
the worst until the drop fits. This measures the idea cheaply: each FakeQuantize of the INT8 model is bypassed
alone, and the mean KL divergence of the model's outputs from the float model's, on ``--rank-images`` calibration
images, says how much that one quantizer costs. The ``--keep`` most costly are then bypassed together (those inputs
run in OpenVINO's default float, bf16 on an AMX CPU), and each such model is scored on the first ``--images`` images
of the evaluation split against the float model (paired drop) and timed at batch 1 in interleaved rounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import require_cifar, scored, write_result  # noqa: E402
from calibration.datasets import Subset, make_splits, open_source  # noqa: E402
from calibration.evaluate import paired_drop  # noqa: E402
from compress.model.checkpoint import load_own_checkpoint  # noqa: E402
from runtimes import default_threads  # noqa: E402
from runtimes.noise import interleaved  # noqa: E402


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint whose preprocessing the engines take")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--float", dest="float_path", type=Path, required=True, help="the float ONNX quantized")
    parser.add_argument("--int8", type=Path, required=True, help="its NNCF INT8 OpenVINO IR")
    parser.add_argument("--rank-images", type=int, default=128)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--keep", default="0,3,6,10", help="how many of the most costly quantizers to bypass")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", type=Path, default=Path("bench/results/int8_keep_float.json"))
    args = parser.parse_args()
    if args.rank_images < 32 or args.rank_images % 32:
        parser.error(f"--rank-images {args.rank_images}: the ranking runs batches of 32; give a multiple of 32")
    require_cifar(args.data, "test")
    for path in (args.float_path, args.int8):
        if not path.is_file():
            sys.exit(f"{path} does not exist: give the chain's float ONNX (--float) and its NNCF INT8 IR (--int8)")
    import openvino as ov

    threads = default_threads()
    core = ov.Core()
    keeps = [int(k) for k in args.keep.split(",")]
    preprocess = load_own_checkpoint(args.model).preprocess
    source = open_source(args.data)
    splits = make_splits(source)
    shape = [preprocess.in_chans, preprocess.crop_size, preprocess.crop_size]

    def compiled(model, batch: int, hint: str | None = None):
        model.reshape({model.inputs[0]: [batch, *shape]})
        config = {"INFERENCE_NUM_THREADS": threads} | ({"INFERENCE_PRECISION_HINT": hint} if hint else {})
        return core.compile_model(model, "CPU", config)

    def bypassed(names: set[str]):
        model = core.read_model(args.int8)
        for op in model.get_ordered_ops():
            if op.get_friendly_name() in names:
                op.output(0).replace(op.input_value(0))
        return model

    rank_x = np.concatenate([x for x, _ in Subset(source, splits.calib[: args.rank_images], preprocess).batches(64)])

    def outputs(model) -> np.ndarray:
        engine = compiled(model, 32)
        return np.concatenate([engine(rank_x[i:i + 32])[0] for i in range(0, len(rank_x), 32)])

    float_engine = compiled(core.read_model(args.float_path), 32, "f32")
    reference = log_softmax(np.concatenate([float_engine(rank_x[i:i + 32])[0] for i in range(0, len(rank_x), 32)]))

    def kl(z: np.ndarray) -> float:
        return float((np.exp(reference) * (reference - log_softmax(z))).sum(axis=1).mean())

    whole = kl(outputs(core.read_model(args.int8)))
    names = [op.get_friendly_name() for op in core.read_model(args.int8).get_ordered_ops()
             if op.get_type_name() == "FakeQuantize"]
    ranked = []
    for i, name in enumerate(names):
        ranked.append({"quantizer": name, "kl_saved": whole - kl(outputs(bypassed({name})))})
        print(f"ranked {i + 1}/{len(names)}", flush=True)
    ranked.sort(key=lambda r: -r["kl_saved"])

    models = {"float": (core.read_model(args.float_path), "f32")}
    models |= {f"int8, {k} kept float": (bypassed({r["quantizer"] for r in ranked[:k]}), None) for k in keeps}
    data = Subset(source, splits.eval[: args.images], preprocess)
    engines = {name: compiled(m, 50, hint) for name, (m, hint) in models.items()}
    right = {name: [] for name in engines}
    for x, y in data.batches(50):
        if len(y) < 50:
            break
        for name, engine in engines.items():
            right[name].append(engine(x)[0].argmax(axis=1) == y)
    results = {name: scored(np.concatenate(r)) for name, r in right.items()}

    class Timed:  # the runtimes' engine interface over a compiled model
        def __init__(self, model) -> None:
            self.request = compiled(model, 1).create_infer_request()

        def run(self, x: np.ndarray) -> np.ndarray:
            self.request.infer({0: x})
            return self.request.get_output_tensor(0).data

    timed = {name: Timed(m) for name, (m, hint) in models.items() if hint is None}
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    p50 = interleaved(timed, x, threads=threads, rounds=args.rounds, iterations=30)
    rows = {}
    for name, result in results.items():
        drop = paired_drop(results["float"], result) if name != "float" else None
        rows[name] = {"top1": result.top1, "drop_vs_float": [round(v, 3) for v in drop] if drop else None,
                      "p50_ms": round(p50[name], 3) if name in p50 else None}
        print(name, rows[name])
    print(write_result({"float": str(args.float_path), "int8": str(args.int8), "int8_kl": whole,
                        "images": len(results["float"].correct), "ranked": ranked[:20], "rows": rows}, args.out))


if __name__ == "__main__":
    main()
