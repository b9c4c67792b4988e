"""The runner inside a deployment bundle: verify, classify images, benchmark, build a TensorRT engine.

This file is copied into every bundle as ``runner.py``, beside ``preprocess.py``, ``env.py`` and the
``runtimes/`` package, so on the device it needs only numpy, Pillow and the bundle's runtime (ONNX Runtime,
OpenVINO or TensorRT), never torch. ``compress bench`` and ``compress build-engine`` call the same functions, so a
bundle is measured the same way whichever starts it. ::

    python runner.py verify
    python runner.py classify cat.jpg dog.png [--top 3]
    python runner.py bench [--data IMAGE_FOLDER] [--batch 1 8] [--out DIR]
    python runner.py build-engine            # Jetson: TensorRT engine from the bundle's ONNX, on the device

Every command first checks the SHA-256 of every file ``manifest.json`` lists and refuses a bundle that differs.
Benchmark records use the schema of the run's ``records.jsonl``, so ``compress report RUN_DIR DEVICE_DIR``
puts device results beside the run's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside the vit-compress package
    from calibration.preprocess import Preprocess
    from compress.env import environment
except ImportError:  # inside a bundle: the copies beside this file, and its runtimes/ package, come first
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from env import environment  # type: ignore[no-redef]
    from preprocess import Preprocess  # type: ignore[no-redef]

from runtimes.base import sha256_file as sha256  # noqa: E402  (the bundle's own copy once sys.path is set)

MANIFEST = "manifest.json"
FORMAT = "vit-compress.bundle/1"
RECORD_SCHEMA = "vit-compress.record/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BundleError(Exception):
    """A bundle that cannot be used as it is; the message says what to do."""


# -------------------------------------------------------------------------------------------- the bundle
def load_manifest(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not a deployment bundle (no {MANIFEST}); pass the --out of `compress deploy`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-copy the bundle") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is format {manifest.get('format')!r}, not {FORMAT}; use the runner it came with")
    return manifest


def verify(bundle: Path) -> dict[str, Any]:
    """The manifest, once every file it lists exists with its recorded SHA-256; ``BundleError`` otherwise."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    for name, digest in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing; re-copy the bundle (or unpack its tarball again)")
        if sha256(path) != digest:
            raise BundleError(f"bundle file {name} does not match its SHA-256 in {MANIFEST} (changed or corrupted); "
                              "re-copy the bundle from its tarball")
    return manifest


def _model_entry(manifest: dict[str, Any], runtime: str | None) -> dict[str, Any]:
    runtime = runtime or manifest["selected"]["runtime"]
    for entry in manifest["models"]:
        if entry["runtime"] == runtime:
            return entry
    offered = [m["runtime"] for m in manifest["models"]]
    raise BundleError(f"this bundle has no model for runtime {runtime!r}; it offers {offered}")


def open_engine(bundle: Path, manifest: dict[str, Any], runtime: str | None = None, threads: int | None = None):
    """(engine, model entry) for ``runtime`` (default: the bundle's selected one)."""
    from runtimes import RuntimeUnavailableError, default_threads, get_runtime

    entry = _model_entry(manifest, runtime)
    threads = threads or default_threads()
    try:
        if entry["runtime"] == "tensorrt":
            from runtimes.tensorrt_gpu import load_engine

            return load_engine(_engine_path(bundle, entry)), entry
        options = {"cache_dir": Path(bundle) / "cache" / "openvino"} if entry["runtime"] == "openvino" else {}
        engine = get_runtime(entry["runtime"], **options).build(Path(bundle) / entry["path"],
                                                                precision=entry["precision"], threads=threads)
    except RuntimeUnavailableError as e:
        if entry["runtime"] == "tensorrt":  # its messages say how to get TensorRT and how to build the engine
            raise BundleError(str(e)) from e
        raise BundleError(f"{e} (this bundle runs on {entry['runtime']}; install it with: "
                          f"pip install -r {Path(bundle) / 'requirements.txt'})") from e
    return engine, entry


def _engine_path(bundle: Path, entry: dict[str, Any]) -> Path:
    return Path(bundle) / "engines" / f"{Path(entry['path']).stem}-{entry['precision']}.engine"


# ------------------------------------------------------------------------------------------- classifying
def _preprocess(manifest: dict[str, Any]) -> Preprocess:
    return Preprocess.from_dict(manifest["preprocess"])


def load_images(paths: list[Path], preprocess: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess.resize_crop(image))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise BundleError(f"cannot read image {path}: {e}") from e
    return preprocess.normalize(np.stack(arrays))  # (B, C, H, W) float32


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classify(bundle: Path, images: list[Path], *, runtime: str | None = None, top: int = 3) -> list[dict[str, Any]]:
    manifest = verify(bundle)
    engine, _ = open_engine(bundle, manifest, runtime)
    probs = softmax(engine.run(load_images(images, _preprocess(manifest))))  # (B, K)
    classes = manifest["classes"]
    return [{"image": str(path), "top": [(classes[i], float(p[i])) for i in np.argsort(-p)[:top]]}
            for path, p in zip(images, probs)]


# ------------------------------------------------------------------------------------------ benchmarking
def image_folder(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image, label) of an ImageFolder (``root/<class name>/*``) whose classes are the model's."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"--data {root} is not a directory; pass an ImageFolder (one folder per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise BundleError(f"--data {root} has class folders {unknown[:3]} the model does not know; its classes are "
                          f"{classes[:10]}")
    items = [(f, classes.index(d.name)) for d in folders for f in sorted(d.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise BundleError(f"no images found under {root}; expected {root}/<class>/*.jpg")
    return items


def top1(engine, items: list[tuple[Path, int]], preprocess: Preprocess, batch_size: int = 64) -> float:
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        logits = engine.run(load_images([p for p, _ in chunk], preprocess))
        correct += int((logits.argmax(axis=1) == np.asarray([y for _, y in chunk])).sum())
    return correct / len(items)


def bench(bundle: Path, *, runtime: str | None = None, batch_sizes: list[int] | None = None, data: Path | None = None,
          out: Path | None = None, iterations: int = 200, seconds: float = 10.0, warmup: int = 10,
          threads: int | None = None, log=print) -> tuple[Path, list[dict[str, Any]]]:
    """Measure the bundle here: start-up time, top-1 on ``data`` (when given), latency at each batch size.

    Writes ``records.jsonl`` (the run's schema, stage ``deployed``) into ``out`` and returns its path and rows.
    """
    from runtimes import default_threads, measure_latency

    bundle = Path(bundle)
    manifest = verify(bundle)
    threads = threads or default_threads()
    start = time.perf_counter()
    engine, entry = open_engine(bundle, manifest, runtime, threads)
    preprocess = _preprocess(manifest)
    batch_sizes = batch_sizes or manifest["selected"].get("batch_sizes") or [1]
    shape = (preprocess.in_chans, preprocess.crop_size, preprocess.crop_size)
    items = image_folder(data, manifest["classes"]) if data is not None else None
    x = (load_images([p for p, _ in items[: max(batch_sizes)]], preprocess) if items
         else np.random.default_rng(0).standard_normal((max(batch_sizes), *shape)).astype(np.float32))
    x = np.concatenate([x] * -(-max(batch_sizes) // len(x)))[: max(batch_sizes)]
    engine.run(x[:1])
    startup_s = time.perf_counter() - start  # load, compile (or read OpenVINO's cache), first inference
    accuracy = {}
    if items is not None:
        log(f"top-1 on {len(items)} images of {data} ...")
        accuracy = {"top1": top1(engine, items, preprocess), "eval_samples": len(items)}
        reference = manifest["selected"].get("top1")
        if reference is not None:
            accuracy["top1_drop"] = round((reference - accuracy["top1"]) * 100, 4)
    env = environment() | {"threads": threads, "host": socket.gethostname(), "startup_s": round(startup_s, 3)}
    env["versions"] = dict(env["versions"]) | _runtime_version(entry["runtime"])
    rows = []
    for batch in batch_sizes:
        if hasattr(engine, "measure"):  # TensorRT: end to end with copies, plus GPU compute from CUDA events
            stats = _Stats(engine.measure(x[:batch], warmup=warmup, iterations=iterations, max_seconds=seconds))
        else:
            stats = measure_latency(engine, x[:batch], threads=threads, warmup=warmup, iterations=iterations,
                                    max_seconds=seconds)
        row = {"schema": RECORD_SCHEMA, "stage": "deployed", "candidate": manifest["selected"].get("candidate"),
               "runtime": entry["runtime"], "precision": entry["precision"], "batch_size": batch, "status": "ok",
               "artifact": entry["path"], "dataset": str(data) if data else None, "run_id": manifest["name"],
               "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "env": env,
               "size_mb": _size_mb(bundle, entry)}
        row |= accuracy | {k: v for k, v in stats.to_dict().items() if k != "latency_ms_min" and k != "batch_size"}
        rows.append(row)
        log(f"{entry['runtime']} {entry['precision']} batch {batch}: p50 {stats.latency_ms_p50:.3f} ms, "
            f"p90 {stats.latency_ms_p90:.3f} ms, {stats.throughput_ips:.0f} img/s")
    out = Path(out) if out is not None else bundle / "device" / f"{socket.gethostname()}-{entry['runtime']}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, path)
    return path, rows


class _Stats:
    """A latency dict (TensorRT's ``measure``) with the attribute access of ``LatencyStats``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


def _size_mb(bundle: Path, entry: dict[str, Any]) -> float:
    path = Path(bundle) / entry["path"]
    size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
    return round(size / 2**20, 3)


def _runtime_version(runtime: str) -> dict[str, str]:
    from runtimes import get_runtime

    try:
        return get_runtime(runtime).versions()
    except Exception:  # a runtime that does not import has no version to record
        return {}


# ------------------------------------------------------------------------------------------ TensorRT
def build_engine(bundle: Path, *, workspace_mb: int = 1024, max_batch: int = 32, dla_core: int | None = None,
                 log=print) -> Path:
    """Build the TensorRT engine of the bundle's ``tensorrt`` model here (engines do not move between GPUs or
    TensorRT versions); the timing cache beside it makes a rebuild quick."""
    from runtimes import RuntimeUnavailableError
    from runtimes.tensorrt_gpu import build_engine as trt_build

    bundle = Path(bundle)
    manifest = verify(bundle)
    entry = _model_entry(manifest, "tensorrt")
    engine = _engine_path(bundle, entry)
    engine.parent.mkdir(parents=True, exist_ok=True)
    try:
        trt_build(bundle / entry["path"], engine, precision=entry["precision"], max_batch=max_batch,
                  workspace_mb=workspace_mb, timing_cache=engine.parent / "timing.cache", dla_core=dla_core, log=log)
    except RuntimeUnavailableError as e:
        raise BundleError(str(e)) from e
    return engine


# ------------------------------------------------------------------------------------------------ the CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run, benchmark and check this deployment bundle.")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every file against the manifest's SHA-256")
    c = sub.add_parser("classify", help="classify image files")
    c.add_argument("images", type=Path, nargs="+")
    c.add_argument("--runtime")
    c.add_argument("--top", type=int, default=3)
    b = sub.add_parser("bench", help="measure latency (and top-1 with --data) here; writes records.jsonl")
    b.add_argument("--runtime")
    b.add_argument("--data", type=Path, help="an ImageFolder with the model's classes, for top-1")
    b.add_argument("--batch", type=int, nargs="+")
    b.add_argument("--iterations", type=int, default=200)
    b.add_argument("--seconds", type=float, default=10.0)
    b.add_argument("--threads", type=int)
    b.add_argument("--out", type=Path)
    e = sub.add_parser("build-engine", help="build the TensorRT engine on this device (Jetson)")
    e.add_argument("--workspace-mb", type=int, default=1024)
    e.add_argument("--max-batch", type=int, default=32)
    e.add_argument("--dla-core", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            manifest = verify(args.bundle)
            print(f"ok: {len(manifest['files'])} files match {MANIFEST}")
        elif args.command == "classify":
            for result in classify(args.bundle, args.images, runtime=args.runtime, top=args.top):
                print(result["image"] + ": " + ", ".join(f"{name} {p:.3f}" for name, p in result["top"]))
        elif args.command == "bench":
            path, _ = bench(args.bundle, runtime=args.runtime, batch_sizes=args.batch, data=args.data, out=args.out,
                            iterations=args.iterations, seconds=args.seconds, threads=args.threads)
            print(f"records: {path}")
        else:
            print(f"engine: {build_engine(args.bundle, workspace_mb=args.workspace_mb, max_batch=args.max_batch, dla_core=args.dla_core)}")
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
