"""Token reduction benchmark: latency against ToMe's r and EViT's keep rate, and top-1 on the CIFAR-10 ViT.

    python bench/tokens.py vit-s16 [--rounds 5] [--seconds 2]            # latency, ONNX Runtime and OpenVINO
    python bench/tokens.py cifar --data /tmp/cifar10 [--finetune-epochs 1] [--bf16]   # top-1 against r

``vit-s16``: ViT-S/16 at 224x224 (197 tokens) with random weights (accuracy is not claimed there), every
setting exported to ONNX (parity against PyTorch checked in ONNX Runtime and OpenVINO), FP32, batch 1 and 8,
timed in interleaved rounds; the speed-up is the median over rounds of unreduced / reduced in the same round.
``cifar``: the reference CIFAR-10 ViT (models/cifar10-vit, 65 tokens, 6 layers), top-1 on the 10,000 test
images in ONNX Runtime for each setting, training-free; with ``--finetune-epochs`` the setting nearest half
the MACs is also fine-tuned with merging on (distilled from the unreduced model, ``recover`` defaults).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import VIT_S16, interleaved_rounds, paired_ratio, require_cifar, write_result  # noqa: E402
from calibration.datasets import Subset, make_splits, open_source  # noqa: E402
from calibration.evaluate import evaluate_top1  # noqa: E402
from compress.model.checkpoint import load_own_checkpoint  # noqa: E402
from compress.config import RecoverConfig  # noqa: E402
from compress.model.macs import count_macs  # noqa: E402
from compress.run.measure import openvino_parity  # noqa: E402
from compress.tokens import TokenReduction, apply, evit, token_counts, tome  # noqa: E402
from compress.train.loop import train  # noqa: E402
from compress.model.vit import VisionTransformer  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402



def _settings(depth: int, constant: list[int], decreasing: list[int], keeps: list[float]) -> dict[str, TokenReduction | None]:
    plans: dict[str, TokenReduction | None] = {"unreduced": None}
    plans |= {f"tome r={r}": tome(r, depth) for r in constant}
    plans |= {f"tome r={r} decreasing": tome(r, depth, "decreasing") for r in decreasing}
    plans |= {f"evit keep={k}": evit(k, depth) for k in keeps}
    return plans


def _export(model: VisionTransformer, plan: TokenReduction | None, x: torch.Tensor, path: Path) -> dict:
    """Export with ``plan`` set; parity against PyTorch in ONNX Runtime (export_onnx) and OpenVINO."""
    apply(model, plan)
    parity = export_onnx(model, path, example=x[:2], parity_inputs=x.numpy()).parity
    ov = openvino_parity(path, model, x.numpy(), atol=1e-4, threads=default_threads())
    return {"parity_onnxruntime_max_abs_diff": parity.max_abs_diff, "parity_openvino_max_abs_diff": ov}


def vit_s16(args) -> dict:
    torch.set_num_threads(default_threads())
    torch.manual_seed(0)
    model = VisionTransformer(VIT_S16).eval()
    shape = (1, 3, 224, 224)
    full = count_macs(model, shape)
    plans = _settings(12, [4, 8, 12, 15], [8, 12], [0.9, 0.7, 0.5])
    work = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    x = torch.randn(8, 3, 224, 224)
    rows, engines = {}, {}
    for name, plan in plans.items():
        path = work / f"{len(rows)}.onnx"
        row = _export(model, plan, x, path)
        row |= {"macs_fraction": round(count_macs(model, shape) / full, 3),
                "tokens": token_counts(plan, VIT_S16) if plan is not None else None}
        for runtime in ("onnxruntime", "openvino"):
            engines[f"{name} | {runtime}"] = get_runtime(runtime).build(path, precision="fp32", threads=default_threads())
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    stats = interleaved_rounds(engines, x.numpy(), [1, 8], rounds=args.rounds, seconds=args.seconds,
                               threads=default_threads(), iterations=200)
    for batch, by_path in stats.items():
        for path, runs in by_path.items():
            name, runtime = path.split(" | ")
            medians = [s.latency_ms_p50 for s in runs]
            base = [s.latency_ms_p50 for s in by_path[f"unreduced | {runtime}"]]
            rows[name][f"{runtime}_b{batch}_ms"] = round(float(np.median(medians)), 3)
            rows[name][f"{runtime}_b{batch}_speedup"] = round(1 / paired_ratio(medians, base), 3)
    return {"model": "ViT-S/16 224x224 (197 tokens), random weights, FP32", "macs_unreduced": full,
            "rows": [{"setting": k} | v for k, v in rows.items()]}


def cifar(args) -> dict:
    torch.set_num_threads(default_threads())
    ckpt = load_own_checkpoint(REPO / "models" / "cifar10-vit" / "model.safetensors")
    source = open_source(args.data)
    splits = make_splits(source, calib_size=512, seed=0)
    eval_data = Subset(source, splits.eval, ckpt.preprocess)
    model, cfg = ckpt.model.eval(), ckpt.model.config
    shape = (1, 3, cfg.image_size, cfg.image_size)
    full = count_macs(model, shape)
    plans = _settings(cfg.depth, [1, 2, 4, 6, 8], [2, 4, 6], [0.9, 0.7, 0.5])
    probe = torch.from_numpy(next(Subset(source, splits.calib, ckpt.preprocess).batches(32))[0])
    work = Path(tempfile.mkdtemp(prefix="bench-tokens-cifar-"))
    rows = []
    for i, (name, plan) in enumerate(plans.items()):
        row = {"setting": name} | _export(model, plan, probe, work / f"{i}.onnx")
        engine = get_runtime("onnxruntime").build(work / f"{i}.onnx", precision="fp32", threads=default_threads())
        row |= {"macs_fraction": round(count_macs(model, shape) / full, 3),
                "tokens": token_counts(plan, cfg) if plan is not None else None,
                "top1": evaluate_top1(engine.run, eval_data, batch_size=256).top1}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": "models/cifar10-vit (32x32, patch 4, 65 tokens, 6 layers)", "eval_images": len(eval_data),
              "macs_unreduced": full, "rows": rows}
    if args.finetune_epochs:
        half = min((r for r in rows if r["setting"].startswith("tome")), key=lambda r: abs(r["macs_fraction"] - 0.5))
        student = copy.deepcopy(model)
        apply(student, plans[half["setting"]])
        apply(model, None)
        rc = RecoverConfig(bf16=args.bf16)
        start = time.perf_counter()
        train(student, Subset(source, splits.train, ckpt.preprocess), epochs=args.finetune_epochs,
              batch_size=rc.batch_size, lr=rc.lr, min_lr=rc.min_lr, weight_decay=rc.weight_decay,
              warmup_epochs=rc.warmup_epochs, label_smoothing=rc.label_smoothing, crop_padding=rc.crop_padding,
              flip=rc.flip, bf16=rc.bf16, seed=rc.seed, teacher=model, kd_alpha=rc.kd_alpha,
              kd_temperature=rc.kd_temperature)
        seconds = time.perf_counter() - start
        student.eval()
        export_onnx(student, work / "finetuned.onnx", example=probe[:2], parity_inputs=probe.numpy())
        engine = get_runtime("onnxruntime").build(work / "finetuned.onnx", precision="fp32", threads=default_threads())
        result["finetuned"] = {"setting": half["setting"], "epochs": args.finetune_epochs, "bf16": args.bf16,
                               "seconds": round(seconds, 1), "top1_before": half["top1"],
                               "top1_after": evaluate_top1(engine.run, eval_data, batch_size=256).top1}
        print(json.dumps(result["finetuned"]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["vit-s16", "cifar"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--finetune-epochs", type=float, default=0.0)
    parser.add_argument("--bf16", action="store_true", help="fine-tune with BF16 autocast")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.part == "cifar":
        require_cifar(args.data, "test")
    result = vit_s16(args) if args.part == "vit-s16" else cifar(args)
    out = write_result(result, args.out or Path(f"bench/results/tokens_{args.part.replace('-', '_')}.json"))
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
