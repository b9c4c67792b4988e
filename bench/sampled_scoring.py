"""Scoring every runtime in full against scoring one in full and sampling the others, on one model.

    python bench/sampled_scoring.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        [--eval-limit 1000] [--sample 300] [--out runs/sampled-scoring]

Two ``compress run``s of the baseline stage alone (no compression), on every runtime and precision this machine
offers (PyTorch, ONNX Runtime, OpenVINO; FP32 and BF16), one after the other: ``measure.agreement_sample=0``
(every engine scores the whole evaluation split) and ``measure.agreement_sample=SAMPLE`` (the first engine scores
it in full, the others a sample). Prints and writes OUT/sampled_scoring.json: each run's wall time and baseline
stage time, and for every (runtime, precision) the sampled run's estimated top-1 beside the full run's, with the
estimate's interval: what the sampling saves and what it costs in accuracy of the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import require_cifar, write_result  # noqa: E402
from compress.api import run_recipe  # noqa: E402
from compress.records import read_records  # noqa: E402


def baseline_run(model: Path, data: Path, out: Path, eval_limit: int, sample: int) -> dict:
    start = time.perf_counter()
    run_recipe(model, data, out=out, overrides=[f"data.eval_limit={eval_limit}", "quantize.enabled=false",
                                                 "measure.batch_sizes=[1]", f"measure.agreement_sample={sample}"])
    wall = time.perf_counter() - start
    rows = {f"{r.runtime} {r.precision}": r for r in read_records(out / "records.jsonl")
            if r.stage == "baseline" and r.status == "ok"}
    return {"wall_seconds": round(wall, 1), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/sampled-scoring"))
    args = parser.parse_args()
    require_cifar(args.data, "test")
    print("1/2 every engine on the whole split", flush=True)
    full = baseline_run(args.model, args.data, args.out / "full", args.eval_limit, 0)
    print(f"2/2 one engine in full, the others on {args.sample} images", flush=True)
    sampled = baseline_run(args.model, args.data, args.out / "sampled", args.eval_limit, args.sample)
    engines = []
    for name, exact in full["rows"].items():
        estimate = sampled["rows"].get(name)
        if estimate is None:
            continue
        engines.append({"engine": name, "top1_full": exact.top1, "top1_sampled": estimate.top1,
                        "images_sampled": estimate.eval_samples, "drop_ci95_sampled": estimate.top1_drop_ci95,
                        "sampled_against": estimate.sampled_against})
    result = {"model": str(args.model), "eval_limit": args.eval_limit, "sample": args.sample,
              "wall_seconds": {"full": full["wall_seconds"], "sampled": sampled["wall_seconds"]}, "engines": engines}
    path = write_result(result, args.out / "sampled_scoring.json")
    print(f"run wall time: every engine in full {full['wall_seconds']:.0f} s, sampled {sampled['wall_seconds']:.0f} s")
    for e in engines:
        ci = e["drop_ci95_sampled"]
        print(f"  {e['engine']:<18} top-1 in full {e['top1_full'] * 100:.2f}%, sampled {e['top1_sampled'] * 100:.2f}% "
              f"on {e['images_sampled']} images" + (f" (drop interval {ci[0]:+.2f}..{ci[1]:+.2f} pt)" if ci else ""))
    print(path)


if __name__ == "__main__":
    main()
