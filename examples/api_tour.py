"""A tour of the Python API on scikit-learn's digits: train, prune, reduce tokens, export, measure, quantize, and
then the whole recipe in one call. It uses nothing but ``import compress`` and runs in about a minute on 2 cores.

    python examples/api_tour.py --out /tmp/tour
"""

from __future__ import annotations

import argparse
from pathlib import Path

import compress

DATA = "builtin:digits"  # 1,797 real handwritten 8x8 digits that ship with scikit-learn: nothing to download


def main(out: Path, *, quick: bool = False) -> None:
    # 1. A model: here trained on the spot; compress.load_model("model.safetensors") loads one you have.
    epochs = ["train.epochs=8"] if quick else []
    ckpt, summary = compress.train_model(DATA, out=out / "train", recipe="digits-demo", overrides=epochs)
    print(f"trained: top-1 {summary['eval_top1']:.4f} on {summary['eval_images']} held-out digits")

    # 2. The splits every step below uses: training, calibration and evaluation images.
    data = compress.load_data(DATA, ckpt.preprocess, calib_size=128)

    # 3. Prune a quarter of the heads and MLP units, ranked by Taylor importance on the calibration images.
    pruned = compress.prune_model(ckpt.model, heads=0.25, mlp=0.25, importance="taylor", data=data.calib)
    print(f"pruned: heads per layer {[b.attn.num_heads for b in pruned.blocks]}")

    # 4. Merge 2 tokens per layer (ToMe); the model still exports, with static shapes.
    merged = compress.reduce_tokens(pruned, method="tome", r=2)

    # 5. Export, checked against PyTorch in ONNX Runtime on real images before the file is written.
    exported = compress.export_model(merged, out / "model.onnx", data.example(32))
    print(f"exported: {exported.path.name}, max |logit diff| {exported.parity.max_abs_diff:.1e}")
    print("float:", compress.measure(exported.path, runtime="onnxruntime", eval_data=data.eval))

    # 6. INT8 within 2 points of the float model's top-1 (layers go back to float until it is).
    int8 = compress.quantize_onnx(exported.path, data.calib, data.eval, out_dir=out / "int8", max_drop=2.0)
    print(f"int8: {int8.name}, {len(int8.float_layers)} layer(s) kept in float")
    print("int8: ", compress.measure(int8.path, runtime="openvino", eval_data=data.eval))

    # 7. Or all of it as one recipe: every stage measured on every runtime, one budget, a deployment bundle.
    # (quick: the recipe's last two stages only, on one quantizer; the steps above did the others by hand)
    fast = ['pipeline.stages=["quantize", "deploy"]', 'quantize.quantizers=["onnxruntime-static"]',
            "measure.iterations=20", "measure.batch_sizes=[1]", "data.eval_limit=200"] if quick else []
    result = compress.run_recipe(out / "train" / "model.safetensors", DATA, out=out / "run", recipe="digits-demo",
                                 overrides=fast)
    print(f"recipe: {len(result.records)} records in {result.run_dir / 'records.jsonl'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/api-tour"), help="folder for everything it writes")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing runs (the tests use it)")
    args = parser.parse_args()
    main(args.out, quick=args.quick)
