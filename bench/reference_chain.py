"""A recipe against plain NNCF INT8 on the reference ViT-S (models/dinov2-s14-cifar10), in one script.

    python bench/reference_chain.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        [--recipe cpu-training-free] [--eval-limit 1000] [--out runs/reference-chain]

1. The peer: ``compress run`` with the quantize stage alone and NNCF only; its plain ``nncf.quantize`` candidate
   (ModelType.TRANSFORMER with its SmoothQuant, as a user calls it: no accuracy control, whatever its drop),
   measured on OpenVINO at batch 1. Its model is exported as the user has it (``export.graph=standard``), not
   rewritten for OpenVINO as the recipe's run does: that rewrite is part of what the chain brings.
2. The recipe: ``compress run --recipe RECIPE`` on the same model, data and evaluation sample.
3. The chosen engine of each, timed again side by side in interleaved rounds (each round times both, in turn;
   the ratio is the median of per-round ratios), because two runs minutes apart on a shared machine cannot be
   compared by their own medians.

Prints and writes OUT/reference_chain.json: top-1 and drop (with its paired 95% interval) of each, the latency
ratio, the wall time of every stage of both runs and of each run as a whole, and the notes of a prune or tokens
stage (what it tried, with a prune stage's latency model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import interleaved_rounds, paired_ratio, require_cifar, write_result  # noqa: E402
from compress.api import run_recipe  # noqa: E402
from compress.records import read_records  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402


def timed_run(model: Path, data: Path, out: Path, recipe: str | None, overrides: list[str],
              candidate: str | None = None) -> dict:
    """Run, and take the run's choice, or the record of ``candidate`` on OpenVINO at batch 1."""
    start = time.perf_counter()
    run_recipe(model, data, out=out, recipe=recipe, overrides=overrides)
    wall = time.perf_counter() - start
    summary = json.loads((out / "stages" / "pipeline.json").read_text())
    records = read_records(out / "records.jsonl")
    if candidate is not None:
        record = next(r for r in records if r.candidate == candidate and r.runtime == "openvino" and r.batch_size == 1)
        chosen = {"candidate": record.candidate, "runtime": record.runtime, "precision": record.precision,
                  "top1": record.top1, "top1_drop": record.top1_drop, "artifact": record.artifact}
    else:
        chosen = summary["selected"]
        record = next(r for r in records if r.artifact == chosen.get("artifact")
                      and r.runtime == chosen.get("runtime") and r.batch_size == chosen.get("batch_size"))
    # what the reducing stages tried (their trials, a prune stage's latency model), as their markers note it
    notes = {}
    for stage in ("prune", "tokens"):
        marker = out / "stages" / f"{stage}.json"
        if marker.is_file():
            notes[stage] = json.loads(marker.read_text()).get("notes")
    return {"run": str(out), "wall_seconds": round(wall, 1), "stage_seconds": summary.get("stage_seconds"),
            "stage_notes": notes,
            "broke_at": summary.get("broke_at"), "chosen": chosen, "top1_drop_ci95": record.top1_drop_ci95,
            "eval_samples": record.eval_samples, "artifact": out / chosen["artifact"],
            "precision": chosen["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--recipe", default="cpu-training-free")
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/reference-chain"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-drop", type=float, help="the recipe run's budget (default: the recipe's own); the "
                        "peer is plain nncf.quantize as a user calls it, so its budget is lifted: its own drop is "
                        "recorded, with no accuracy-control retries")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for the recipe's run")
    args = parser.parse_args()
    require_cifar(args.data, "test")
    common = [f"data.eval_limit={args.eval_limit}", 'measure.runtimes=["openvino"]', "measure.batch_sizes=[1]"]
    budget = [] if args.max_drop is None else [f"pipeline.max_drop={args.max_drop}",
                                               f"quantize.max_drop={args.max_drop}"]
    print("1/3 plain NNCF INT8 (the peer)", flush=True)
    peer = timed_run(args.model, args.data, args.out / "nncf", None,
                     [*common, 'pipeline.stages=["quantize"]', 'quantize.quantizers=["nncf"]', "export.graph=standard",
                      "quantize.nncf_smooth_quant=true", "pipeline.max_drop=100", "quantize.max_drop=100"],
                     candidate="nncf-ov")
    print(f"2/3 recipe {args.recipe}", flush=True)
    ours = timed_run(args.model, args.data, args.out / "recipe", args.recipe, [*common, *budget, *args.set])
    print("3/3 the chosen engines and each single technique of both runs, interleaved", flush=True)
    threads = default_threads()
    openvino = get_runtime("openvino")
    singles = headline_rows(args.out / "nncf", args.out / "recipe")
    engines = {"nncf": openvino.build(peer["artifact"], precision=peer["precision"], threads=threads),
               "recipe": openvino.build(ours["artifact"], precision=ours["precision"], threads=threads)}
    chosen = {(str(peer["artifact"]), peer["precision"]), (str(ours["artifact"]), ours["precision"])}
    for name, row in singles.items():
        if (row["path"], row["precision"]) not in chosen:
            engines[name] = openvino.build(Path(row["path"]), precision=row["precision"], threads=threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    stats = interleaved_rounds(engines, x, [1], rounds=args.rounds, seconds=3.0, threads=threads)[1]
    medians = {name: [s.latency_ms_p50 for s in v] for name, v in stats.items()}
    ratio = paired_ratio(medians["recipe"], medians["nncf"])
    for name, row in singles.items():
        timed = name if name in medians else next(
            n for n, r in (("nncf", peer), ("recipe", ours)) if (str(r["artifact"]), r["precision"]) ==
            (row["path"], row["precision"]))
        row |= {"latency_ms_p50_interleaved": round(float(np.median(medians[timed])), 3),
                "ratio_vs_nncf": round(paired_ratio(medians[timed], medians["nncf"]), 3)}
    rows = {}
    for name, run in (("nncf", peer), ("recipe", ours)):
        c = run["chosen"]
        rows[name] = {k: run[k] for k in ("run", "wall_seconds", "stage_seconds", "broke_at", "top1_drop_ci95",
                                          "eval_samples", "stage_notes")} | {
            "candidate": c.get("candidate"), "precision": c.get("precision"), "top1": c.get("top1"),
            "top1_drop": c.get("top1_drop"), "latency_ms_p50_interleaved": round(float(np.median(medians[name])), 3)}
    result = {"recipe": args.recipe, "model": str(args.model), "eval_limit": args.eval_limit,
              "max_drop": args.max_drop, "rows": rows, "headline": singles,
              "ratio_vs_nncf": round(ratio, 3), "round_medians_ms": medians}
    path = write_result(result, args.out / "reference_chain.json")
    for name, row in rows.items():
        low, high = row["top1_drop_ci95"] or (None, None)
        # a chain that kept nothing chooses the model as loaded: the reference, with no interval
        interval = "the reference" if low is None else f"95% {low:+.2f}..{high:+.2f}"
        broke = f"; broke its budget at {row['broke_at']['stage']}" if row["broke_at"] else ""
        print(f"{name}: {row['candidate']} {row['precision']}, top-1 {row['top1'] * 100:.2f}% (drop "
              f"{row['top1_drop']:+.2f} pt, {interval}), p50 {row['latency_ms_p50_interleaved']} ms "
              f"interleaved; run {row['wall_seconds'] / 60:.1f} min: {row['stage_seconds']}{broke}")
    print("each technique alone and the chain, same model and images, OpenVINO batch 1, timed interleaved:")
    for name, row in singles.items():
        drop = "" if row["top1_drop"] is None else f" drop {row['top1_drop']:+.2f} pt"
        print(f"  {name:<34} top-1 {row['top1'] * 100:.2f}%{drop}{' (sampled)' if row['sampled'] else ''}, "
              f"p50 {row['latency_ms_p50_interleaved']} ms, {row['ratio_vs_nncf']:.3f}x plain NNCF INT8")
    print(f"recipe / nncf latency at batch 1 on OpenVINO: {ratio:.3f}x; {path}")


def headline_rows(peer_run: Path, recipe_run: Path) -> dict[str, dict]:
    """Each single technique both runs measured on OpenVINO at batch 1, by name: the model as loaded in FP32 and
    BF16 (where offered), plain NNCF INT8, the prune and token stages' models, and the recipe's INT8 of the last;
    with top-1 and the artifact to time."""
    wanted = {
        "FP32 (as loaded)": (peer_run, lambda r: r.stage == "baseline" and r.precision == "fp32"),
        "BF16 (as loaded)": (peer_run, lambda r: r.stage == "baseline" and r.precision == "bf16"),
        "plain NNCF INT8 (the peer)": (peer_run, lambda r: r.candidate == "nncf-ov"),
        "prune stage's model, FP32": (recipe_run, lambda r: r.stage == "prune" and r.candidate is None
                                      and r.precision == "fp32"),
        "token stage's model, FP32": (recipe_run, lambda r: r.stage == "tokens" and r.candidate is None
                                      and r.precision == "fp32"),
        "token stage's model, BF16": (recipe_run, lambda r: r.stage == "tokens" and r.candidate is None
                                      and r.precision == "bf16"),
        "the chain's NNCF INT8": (recipe_run, lambda r: r.stage == "quantize" and r.candidate == "nncf-ov"),
    }
    rows = {}
    for name, (run, match) in wanted.items():
        found = [r for r in read_records(run / "records.jsonl") if r.status == "ok" and r.runtime == "openvino"
                 and r.batch_size == 1 and r.artifact and match(r)]
        if found:
            r = found[-1]
            rows[name] = {"top1": r.top1, "top1_drop": r.top1_drop, "top1_drop_ci95": r.top1_drop_ci95,
                          "sampled": r.sampled_against is not None, "macs": r.macs, "precision": r.precision,
                          "path": str(run / r.artifact)}
    return rows


if __name__ == "__main__":
    main()
