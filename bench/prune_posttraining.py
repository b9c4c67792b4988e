"""Post-training pruning without training: Taylor against Fisher importance, and least-squares repair, on the
CIFAR-10 ViT.

    python bench/prune_posttraining.py --data /tmp/cifar10 [--eval-limit 2000] [--out bench/results/...]

From the reference model (models/cifar10-vit): importance on the calibration split's first 512 images (targets:
the model's own predictions, so no labels), pruning at two settings with one width per layer (``scope="layer"``,
the ``cpu-latency`` recipe's shares and a milder one), then ``compress.prune.reconstruct`` on 256 calibration
images. Top-1 on the first ``--eval-limit`` images of the test split, each drop against the unpruned model with
its paired 95% interval (``calibration.evaluate.paired_drop``). Accuracy only: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import require_cifar, write_result  # noqa: E402
from calibration.evaluate import evaluate_top1, paired_drop  # noqa: E402
from compress.api import load_data, load_model  # noqa: E402
from compress.prune.reconstruct import reconstruct  # noqa: E402
from compress.prune.structured import prune_by_ratio, taylor_importance  # noqa: E402

SETTINGS = ((1 / 3, 2 / 3), (0.25, 0.5))  # (heads, MLP units) removed from every layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval-limit", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prune_posttraining.json")
    args = ap.parse_args()
    require_cifar(args.data, "test")
    torch.set_num_threads(2)
    ckpt = load_model(REPO / "models" / "cifar10-vit" / "model.safetensors")
    data = load_data(args.data, ckpt.preprocess, calib_size=512, eval_limit=args.eval_limit)
    model = ckpt.model.eval()

    def score(m):
        with torch.no_grad():
            return evaluate_top1(lambda x: m(torch.from_numpy(x)).numpy(), data.eval, batch_size=250)

    base = score(model)
    calib = [x for x, _ in data.calib.batches(64)][:4]  # 256 images
    rows = []
    for fisher in (False, True):
        start = time.perf_counter()
        importance = taylor_importance(model, data.calib.batches(32), targets="predictions", fisher=fisher)
        importance_s = time.perf_counter() - start
        for heads, mlp in SETTINGS:
            pruned = prune_by_ratio(model, importance, heads=heads, mlp=mlp, scope="layer")
            plain = score(pruned)
            start = time.perf_counter()
            info = reconstruct(pruned, model, calib)
            seconds = time.perf_counter() - start
            repaired = score(pruned)
            row = {"importance": importance.method, "heads_removed": round(heads, 3), "mlp_removed": round(mlp, 3),
                   "importance_s": round(importance_s, 1), "top1_pruned": plain.top1,
                   "drop_pruned": [round(v, 2) for v in paired_drop(base, plain)],
                   "top1_reconstructed": repaired.top1,
                   "drop_reconstructed": [round(v, 2) for v in paired_drop(base, repaired)],
                   "reconstruct_s": round(seconds, 1), **{k: round(v, 4) for k, v in info.items() if k != "images"}}
            rows.append(row)
            print(f"{row['importance']:>18} heads -{heads:.2f} MLP -{mlp:.2f}: pruned {plain.top1:.4f} "
                  f"(drop {row['drop_pruned'][0]:+.2f} pt, 95% {row['drop_pruned'][1]:+.2f}..{row['drop_pruned'][2]:+.2f})"
                  f", reconstructed {repaired.top1:.4f} (drop {row['drop_reconstructed'][0]:+.2f} pt, 95% "
                  f"{row['drop_reconstructed'][1]:+.2f}..{row['drop_reconstructed'][2]:+.2f}) in {seconds:.1f} s")
    write_result({"benchmark": "prune_posttraining", "eval_images": base.num_samples, "baseline_top1": base.top1,
                  "rows": rows}, args.out)


if __name__ == "__main__":
    main()
