"""Pruning benchmark: heads x MLP-unit ratios on the CIFAR-10 ViT (top-1, MACs, latency) and on ViT-S/16.

    python bench/prune.py target --data /tmp/cifar10 [--epochs 4] [--bf16]  # 25% heads + 25% MLP, recovered
    python bench/prune.py grid --data /tmp/cifar10 [--epochs 0.5] [--bf16]  # 0/25/50% x 0/25/50%, without and with
    python bench/prune.py vit-s16 [--rounds 5]                         # latency of the same ratios, ViT-S/16

``target`` and ``grid`` start from the reference model (models/cifar10-vit), score importance with Taylor
(labels) on 256 images of the calibration split, prune, and evaluate top-1 on the 10,000 test images with ONNX
Runtime; recovery is distillation from the unpruned model on the training split (``recover`` defaults of
``compress run``), timed. Latency is ONNX Runtime FP32 at batch 1, measured in interleaved rounds against the
unpruned model (paired ratio = median over rounds of pruned / unpruned in the same round). ``vit-s16`` uses
random weights and L2 importance (accuracy is not claimed there, only latency and MACs).
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

from calibration.datasets import Subset, make_splits, open_source  # noqa: E402
from calibration.evaluate import evaluate_top1  # noqa: E402
from compress.model.checkpoint import load_own_checkpoint  # noqa: E402
from compress.config import RecoverConfig  # noqa: E402
from compress.model.macs import count_macs, count_params  # noqa: E402
from compress.prune.structured import l2_importance, prune_by_ratio, structure, taylor_importance  # noqa: E402
from compress.train.loop import train  # noqa: E402
from compress.model.vit import VisionTransformer  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from bench.common import VIT_S16, interleaved_rounds, paired_ratio, require_cifar, write_result  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402

RATIOS = (0.0, 0.25, 0.5)


def _engine(model: VisionTransformer, shape: tuple[int, ...], work: Path, name: str):
    x = torch.randn(2, *shape)
    path = work / f"{name}.onnx"
    export_onnx(model, path, example=x[:1], parity_inputs=x.numpy())
    return get_runtime("onnxruntime").build(path, precision="fp32", threads=default_threads())


def _paired_latency(models: dict[str, VisionTransformer], shape, rounds: int, seconds: float) -> dict[str, dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    engines = {name: _engine(m, shape, work, name.replace("/", "_")) for name, m in models.items()}
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    stats = interleaved_rounds(engines, x, [1], rounds=rounds, seconds=seconds, threads=default_threads(),
                               iterations=300)[1]
    medians = {name: [s.latency_ms_p50 for s in v] for name, v in stats.items()}
    return {name: {"latency_ms_p50": round(float(np.median(v)), 3),
                   "paired_speedup_vs_unpruned": round(1 / paired_ratio(v, medians["h0/m0"]), 3),
                   "round_medians_ms": [round(float(t), 3) for t in v]} for name, v in medians.items()}


def _cifar(args):
    ckpt = load_own_checkpoint(REPO / "models" / "cifar10-vit" / "model.safetensors")
    source = open_source(args.data)
    splits = make_splits(source, calib_size=512, seed=0)
    calib = Subset(source, splits.calib[:256], ckpt.preprocess)
    train_data = Subset(source, splits.train, ckpt.preprocess)
    eval_data = Subset(source, splits.eval, ckpt.preprocess)
    return ckpt, calib, train_data, eval_data


def _top1(model, eval_data) -> float:
    model.eval()
    with torch.inference_mode():
        return evaluate_top1(lambda x: model(torch.from_numpy(x)).numpy(), eval_data, batch_size=256).top1


def _recover(student, teacher, train_data, epochs: float, bf16: bool) -> float:
    r = RecoverConfig(bf16=bf16)
    start = time.perf_counter()
    train(student, train_data, epochs=epochs, batch_size=r.batch_size, lr=r.lr, min_lr=r.min_lr,
          weight_decay=r.weight_decay, warmup_epochs=r.warmup_epochs, label_smoothing=r.label_smoothing,
          crop_padding=r.crop_padding, flip=r.flip, bf16=r.bf16, seed=r.seed, teacher=teacher, kd_alpha=r.kd_alpha,
          kd_temperature=r.kd_temperature)
    return time.perf_counter() - start


def cifar_runs(args, grid: list[tuple[float, float]], epochs: float) -> dict:
    torch.set_num_threads(default_threads())
    ckpt, calib, train_data, eval_data = _cifar(args)
    teacher = ckpt.model.eval()
    importance = taylor_importance(teacher, calib.batches(64), targets="labels")
    shape = (3, 32, 32)
    base_top1 = _top1(teacher, eval_data)
    rows, models = [], {"h0/m0": teacher}
    for heads, mlp in grid:
        name = f"h{int(heads * 100)}/m{int(mlp * 100)}"
        pruned = prune_by_ratio(teacher, importance, heads=heads, mlp=mlp)
        row = {"heads_ratio": heads, "mlp_ratio": mlp, "structure": structure(pruned), "params": count_params(pruned),
               "macs": count_macs(pruned, (1, *shape)), "top1_pruned": _top1(pruned, eval_data)}
        if epochs > 0 and (heads or mlp):
            recovered = copy.deepcopy(pruned)
            row["recovery_seconds"] = round(_recover(recovered, teacher, train_data, epochs, args.bf16), 1)
            row["recovery_epochs"] = epochs
            row["recovery_bf16"] = args.bf16
            row["top1_recovered"] = _top1(recovered, eval_data)
        models[name] = pruned
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "structure"}), flush=True)
    latency = _paired_latency(models, shape, args.rounds, args.seconds)
    for row in rows:
        row |= latency[f"h{int(row['heads_ratio'] * 100)}/m{int(row['mlp_ratio'] * 100)}"]
    return {"baseline_top1": base_top1, "baseline_macs": count_macs(teacher, (1, *shape)),
            "importance": importance.method, "eval_images": len(eval_data), "rows": rows}


def vit_s16(args) -> dict:
    torch.set_num_threads(default_threads())
    torch.manual_seed(0)
    model = VisionTransformer(VIT_S16).eval()
    importance = l2_importance(model)
    models, rows = {}, []
    for heads in RATIOS:
        for mlp in RATIOS:
            name = f"h{int(heads * 100)}/m{int(mlp * 100)}"
            pruned = prune_by_ratio(model, importance, heads=heads, mlp=mlp)
            models[name] = pruned
            rows.append({"heads_ratio": heads, "mlp_ratio": mlp, "params": count_params(pruned),
                         "macs": count_macs(pruned, (1, 3, 224, 224))})
    latency = _paired_latency(models, (3, 224, 224), args.rounds, args.seconds)
    for row in rows:
        row |= latency[f"h{int(row['heads_ratio'] * 100)}/m{int(row['mlp_ratio'] * 100)}"]
    return {"model": "ViT-S/16 224x224, random weights, L2 importance", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["target", "grid", "vit-s16"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--epochs", type=float, default=None, help="recovery epochs (target: 4, grid: 0.5)")
    parser.add_argument("--bf16", action="store_true", help="recover with BF16 autocast (recover.bf16=true)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.part != "vit-s16":
        require_cifar(args.data)
    if args.part == "target":
        result = cifar_runs(args, [(0.25, 0.25)], 4.0 if args.epochs is None else args.epochs)
    elif args.part == "grid":
        result = cifar_runs(args, [(h, m) for h in RATIOS for m in RATIOS if h or m],
                            0.5 if args.epochs is None else args.epochs)
    else:
        result = vit_s16(args)
    out = write_result(result, args.out or Path(f"bench/results/prune_{args.part.replace('-', '_')}.json"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("env",)}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
