"""Compression without training: pruning (Taylor or Fisher importance, least-squares repair) and token reduction,
each measured alone on a trained model.

    python bench/prune_posttraining.py --data /tmp/cifar10 [--eval-limit 2000] [--out bench/results/...]
    python bench/prune_posttraining.py --data /tmp/cifar10 --model runs/dinov2-s14-cifar10/full/model.safetensors \
        --importance fisher --settings 0.1667:0.25 0:0.25 --tokens evit:0.7@6 tome:8 --eval-limit 500
    python bench/prune_posttraining.py --data /tmp/cifar10 --model runs/dinov2-s14-cifar10/full/model.safetensors \
        --importance fisher --settings --macs 0.9 0.8 [--rearrange] --eval-limit 1000

From ``--model`` (default: models/cifar10-vit): importance on the calibration split's first 512 images (targets: the
model's own predictions, so no labels), pruning at each ``--settings`` HEADS:MLP share with one width per layer
(``scope="layer"``), and at each ``--macs`` fraction by Kwon et al.'s mask search (``prune_searched``: heads and
units chosen together across layers; with ``--rearrange``, also that mask rearranged within each layer by the Fisher
between masks, ``rearrange_mask``, the two side by side), each then repaired by ``compress.prune.reconstruct`` on
256 calibration images (``--repair``: by scales, by whole weights, or each); then each ``--tokens`` plan (EViT
``evit:KEEP@LAYER``, ToMe ``tome:R``, PiToMe ``pitome:R``; ``R`` is one value or one per layer, ``tome:0,0,96,...``)
on the unpruned model, with no fine-tuning. Top-1 on a seeded random sample of ``--eval-limit`` test images, each
drop against the unpruned model with its paired 95% interval (``calibration.evaluate.paired_drop``), and the MACs
kept. Accuracy only: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import require_cifar, token_plan, write_result  # noqa: E402
from calibration.evaluate import evaluate_top1, paired_drop  # noqa: E402
from compress.api import load_data, load_model  # noqa: E402
from compress.prune.reconstruct import reconstruct  # noqa: E402
from compress.model.macs import count_macs  # noqa: E402
from compress.prune.structured import prune_by_ratio, prune_searched, taylor_importance  # noqa: E402
from compress.tokens import apply  # noqa: E402

SETTINGS = ["0.3333:0.6667", "0.25:0.5"]  # (heads, MLP units) removed from every layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cifar10-vit" / "model.safetensors")
    ap.add_argument("--eval-limit", type=int, default=2000)
    ap.add_argument("--importance", nargs="+", choices=["taylor", "fisher"], default=["taylor", "fisher"])
    ap.add_argument("--settings", nargs="*", default=SETTINGS, help="HEADS:MLP shares removed from every layer")
    ap.add_argument("--macs", nargs="*", type=float, default=[],
                    help="MAC fractions to prune to by the mask search (prune.search), after the --settings")
    ap.add_argument("--repair", nargs="+", choices=["scales", "weights"], default=["scales"],
                    help="least-squares repairs tried on each pruned model, side by side: per-head and per-unit "
                         "scales (Kwon et al.'s mask tuning) or whole attn.proj and mlp.fc2 weights "
                         "(prune.reconstruct_fit)")
    ap.add_argument("--rearrange", action="store_true",
                    help="with --macs and fisher importance: each searched mask also rearranged (prune.rearrange)")
    ap.add_argument("--tokens", nargs="*", default=[],
                    help="token plans tried alone: evit:KEEP@LAYER, tome:R, pitome:R (R or one per layer: R,R,...)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prune_posttraining.json")
    args = ap.parse_args()
    require_cifar(args.data, "test")
    torch.set_num_threads(2)
    ckpt = load_model(args.model)
    data = load_data(args.data, ckpt.preprocess, calib_size=512, eval_limit=args.eval_limit)
    model = ckpt.model.eval()
    shape = (1, model.config.in_chans, model.config.image_size, model.config.image_size)
    full_macs = count_macs(model, shape)

    def score(m):
        with torch.no_grad():
            return evaluate_top1(lambda x: m(torch.from_numpy(x)).numpy(), data.eval, batch_size=50)

    start = time.perf_counter()
    base = score(model)
    print(f"unpruned: top-1 {base.top1:.4f} on {base.num_samples} images in {time.perf_counter() - start:.0f} s",
          flush=True)
    calib = [x for x, _ in data.calib.batches(64)][:4]  # 256 images
    rows = []
    for spec in args.tokens:
        reduced = apply(copy.deepcopy(model), token_plan(spec, model))
        result = score(reduced)
        row = {"tokens": spec, "top1": result.top1, "drop": [round(v, 2) for v in paired_drop(base, result)],
               "macs_fraction": round(count_macs(reduced, shape) / full_macs, 3)}
        rows.append(row)
        print(f"{spec}: top-1 {result.top1:.4f} (drop {row['drop'][0]:+.2f} pt, 95% {row['drop'][1]:+.2f}.."
              f"{row['drop'][2]:+.2f}), {row['macs_fraction']:.2f}x the MACs", flush=True)
    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings]
    jobs = [("layer", setting) for setting in settings] + [
        (how, fraction) for fraction in args.macs for how in ("search", "rearranged")[:1 + args.rearrange]]
    for fisher in [m == "fisher" for m in args.importance] if jobs else []:
        start = time.perf_counter()
        gram = args.rearrange and fisher
        importance = taylor_importance(model, data.calib.batches(32), targets="predictions", fisher=fisher,
                                       gram=gram)
        importance_s = time.perf_counter() - start
        print(f"{importance.method} importance on {len(data.calib)} images in {importance_s:.0f} s", flush=True)
        for how, setting in jobs:
            moved = None
            if how == "layer":
                heads, mlp = setting
                pruned = prune_by_ratio(model, importance, heads=heads, mlp=mlp, scope="layer")
            else:
                if how == "rearranged" and not gram:
                    continue  # Taylor importance has no Fisher blocks to rearrange by
                pruned, notes = prune_searched(model, importance, setting, rearrange=how == "rearranged")
                moved = notes.get("rearrange")
                heads = 1 - sum(b.attn.num_heads for b in pruned.blocks) / sum(b.attn.num_heads for b in model.blocks)
                mlp = 1 - sum(b.mlp.fc1.out_features for b in pruned.blocks) / sum(
                    b.mlp.fc1.out_features for b in model.blocks)
            macs = round(count_macs(pruned, shape) / full_macs, 3)
            plain = score(pruned)
            for fit in args.repair:
                repaired = copy.deepcopy(pruned)
                start = time.perf_counter()
                info = reconstruct(repaired, model, calib, weights=fit == "weights")
                seconds = time.perf_counter() - start
                result = score(repaired)
                row = {"importance": importance.method,
                       "selection": {"layer": "every layer", "search": "mask search",
                                     "rearranged": "mask search, rearranged"}[how],
                       "heads_removed": round(heads, 3), "mlp_removed": round(mlp, 3),
                       "structure": {"heads": [b.attn.num_heads for b in pruned.blocks],
                                     "mlp": [b.mlp.fc1.out_features for b in pruned.blocks]},
                       "importance_s": round(importance_s, 1), "top1_pruned": plain.top1,
                       "drop_pruned": [round(v, 2) for v in paired_drop(base, plain)], "repair": fit,
                       "top1_reconstructed": result.top1,
                       "drop_reconstructed": [round(v, 2) for v in paired_drop(base, result)],
                       "reconstruct_s": round(seconds, 1), "macs_fraction": macs,
                       **{k: round(v, 4) for k, v in info.items() if k not in ("images", "fit")}}
                if moved is not None:
                    row["rearrange"] = moved
                rows.append(row)
                drop, fixed = row["drop_pruned"], row["drop_reconstructed"]
                print(f"{row['importance']:>18} {row['selection']}: heads -{heads:.2f} MLP -{mlp:.2f}: "
                      f"pruned {plain.top1:.4f} (drop {drop[0]:+.2f} pt, 95% {drop[1]:+.2f}..{drop[2]:+.2f}), "
                      f"repaired ({fit}) {result.top1:.4f} (drop {fixed[0]:+.2f} pt, 95% {fixed[1]:+.2f}.."
                      f"{fixed[2]:+.2f}) in {seconds:.1f} s, {macs:.2f}x the MACs"
                      + (f"; {moved['swaps']} exchanged, the Fisher loss estimate {moved['fisher_loss_before']:.4g}"
                         f" -> {moved['fisher_loss_after']:.4g}" if moved else ""), flush=True)
    write_result({"benchmark": "prune_posttraining", "model": str(args.model), "eval_images": base.num_samples,
                  "baseline_top1": base.top1, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
