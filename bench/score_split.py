"""Score engines on a whole evaluation split in one pass, with each one's paired top-1 drop against the first.

    python bench/score_split.py --model runs/dinov2-s14-cifar10/full/model.safetensors --data /tmp/cifar10 \\
        --engine "FP32=RUN/nncf/artifacts/baseline-*.onnx:fp32" --engine "plain NNCF INT8=RUN/nncf/...xml:int8" \\
        [--out bench/results/score_split.json] [--reuse bench/results/score_split.npz]

A chain run judges its candidates on ``data.eval_limit`` images (1,000 on the reference, for minutes); this
re-scores the engines it chose on every image of the split (CIFAR-10's 10,000), so the drop a table reports has
the interval of the whole split. Each batch is decoded once and run through every engine (OpenVINO, the
precision given), so all see identical input. The first engine is the reference of the paired drops
(``calibration.evaluate.paired_drop``).

Every engine's per-image results go beside the JSON (``--out`` with ``.npz``), keyed by the engine's file (its
SHA-256), precision and OpenVINO version and by the images scored. ``--reuse`` takes such a file and scores again
only the engines it does not hold: the FP32 reference alone takes 14 minutes on the 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_reused, scored, test_images, write_result  # noqa: E402
from calibration.evaluate import paired_drop  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402


def parse_engine(text: str) -> tuple[str, Path, str]:
    """``NAME=PATH:PRECISION`` -> (name, path, precision); exits with the expected form when it is not that."""
    name, sep, rest = text.partition("=")
    path, sep2, precision = rest.rpartition(":")
    if not (sep and sep2 and name and path and precision):
        sys.exit(f"--engine {text!r}: expected NAME=PATH:PRECISION, e.g. 'int8=run/model.xml:int8'")
    if not Path(path).is_file():
        sys.exit(f"--engine {name}: {path} does not exist")
    return name, Path(path), precision


def engine_key(path: Path, precision: str, images: np.ndarray) -> str:
    """What a stored result of an engine must match to be reused: its files' bytes, the precision and OpenVINO
    version it ran in (INT8 leaves the rest of the graph in OpenVINO's default float), and the images, in order."""
    import openvino as ov

    digest = hashlib.sha256()
    for part in (path, path.with_suffix(".bin")) if path.suffix == ".xml" else (path,):
        digest.update(part.read_bytes())
    digest.update(f"{precision} {ov.get_version()}".encode())
    digest.update(np.ascontiguousarray(images, dtype=np.int64).tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint whose preprocessing the engines take")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--engine", action="append", required=True, help="NAME=PATH:PRECISION; the first is the "
                        "reference of the paired drops")
    parser.add_argument("--limit", type=int, help="score only the first LIMIT images of the split")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/score_split.json"))
    parser.add_argument("--reuse", type=Path, help="an earlier run's .npz: its engines are not scored again")
    args = parser.parse_args()
    engines = [parse_engine(e) for e in args.engine]
    data = test_images(args.data, args.model, args.limit or None)
    split = data.indices
    threads = default_threads()
    keys = {name: engine_key(path, precision, split) for name, path, precision in engines}
    stored = load_reused(args.reuse)
    reused = {name: stored[keys[name]] for name in keys  # an entry of another length is not this split's: scored anew
              if keys[name] in stored and stored[keys[name]].shape == (len(split),)}
    for name in reused:
        print(f"{name}: per-image results reused from {args.reuse}")
    built = {name: get_runtime("openvino").build(path, precision=precision, threads=threads)
             for name, path, precision in engines if name not in reused}
    right: dict[str, list[np.ndarray]] = {name: [] for name in built}
    seconds = dict.fromkeys(built, 0.0)
    seen, start = 0, time.perf_counter()
    for x, y in data.batches(args.batch) if built else ():
        for name, engine in built.items():
            t = time.perf_counter()
            right[name].append(np.asarray(engine.run(x)).argmax(axis=1) == y)
            seconds[name] += time.perf_counter() - t
        seen += len(y)
        if seen % 1000 < args.batch:
            print(f"{seen}/{len(data)} images, {time.perf_counter() - start:.0f} s", flush=True)
    correct = {name: np.concatenate(r) for name, r in right.items()} | reused
    seen = len(split)
    results = {name: scored(c) for name, c in correct.items()}
    reference = results[engines[0][0]]
    rows = {}
    for name, path, precision in engines:
        drop = paired_drop(reference, results[name]) if name != engines[0][0] else None
        rows[name] = {"path": str(path), "precision": precision, "top1": round(results[name].top1, 5),
                      "top1_drop": round(drop[0], 3) if drop else None,
                      "top1_drop_ci95": [round(drop[1], 3), round(drop[2], 3)] if drop else None,
                      "scoring_seconds": round(seconds[name], 1) if name in seconds else "reused"}
        interval = f", drop {drop[0]:+.2f} pt (95% {drop[1]:+.2f}..{drop[2]:+.2f})" if drop else " (reference)"
        print(f"{name}: top-1 {results[name].top1 * 100:.2f}% on {seen} images{interval}")
    path = write_result({"model": str(args.model), "images": seen, "rows": rows}, args.out)
    np.savez_compressed(args.out.with_suffix(".npz"), **(stored | {keys[name]: c for name, c in correct.items()}))
    print(path, args.out.with_suffix(".npz"))


if __name__ == "__main__":
    main()
