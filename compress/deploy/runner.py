"""The runner inside a deployment bundle: verify, classify images, benchmark, build a TensorRT engine.

This file is copied into every bundle as ``runner.py``, beside ``preprocess.py``, ``env.py`` and the
``runtimes/`` package, so on the device it needs only numpy, Pillow and the bundle's runtime (ONNX Runtime,
OpenVINO or TensorRT), never torch. ``compress bench`` and ``compress build-engine`` call the same functions, so a
bundle is measured the same way whichever starts it. ::

    python runner.py verify [--expect sha256:DIGEST] [--public-key KEY.pub.pem]
    python runner.py classify cat.jpg dog.png [--top 3]
    python runner.py bench [--data IMAGE_FOLDER] [--batch 1 8] [--out DIR]
    python runner.py build-engine            # Jetson: TensorRT engine from the bundle's ONNX, on the device

What every command checks first (``verify``), before any of the bundle's code or models is used:
- ``manifest.json`` is well formed: every path in it is relative and stays inside the bundle, every model is one
  its runtime can run, Python files only where the bundle format puts them;
- every file it lists has its SHA-256, and the bundle holds no other file (nor any symbolic link), apart from what
  the runner itself writes under ``device/``, ``cache/`` and ``engines/`` (never code);
- with ``--expect``, the bundle's identity, the SHA-256 of its canonical manifest (``compress deploy`` prints it),
  is the one given; with ``--public-key``, ``manifest.sig`` is a valid Ed25519 signature of that manifest.
The bundle's Python modules are then imported from the verified bytes only, never from a cached ``.pyc`` and never
from this folder's other files. Benchmark records use the schema of the run's ``records.jsonl``, are appended
(never replacing earlier ones), so ``compress report RUN_DIR DEVICE_DIR`` puts device results beside the run's.
"""

from __future__ import annotations

import os
import sys

# `python runner.py` puts this folder first on sys.path, so a planted numpy.py (or json.py) would run before any
# check. Take it off before importing anything else: os and sys are already loaded by the interpreter, and the
# bundle's own modules are imported later, from verified bytes (_VerifiedModules).
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import base64  # noqa: E402
import datetime as dt  # noqa: E402
import hashlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

try:  # inside the vit-compress package; in a bundle these are the verified copies beside this file
    import calibration.preprocess as _preprocess_module
    import compress.env as _env_module

    IN_BUNDLE = False
except ImportError:
    IN_BUNDLE = True

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # base64 Ed25519 signature of the canonical manifest (compress deploy --sign)
FORMAT = "vit-compress.bundle/1"
RECORD_SCHEMA = "vit-compress.record/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# What each runtime can run from a file: a manifest offering anything else is refused, not tried.
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8", "fp16"), "openvino": ("fp32", "bf16", "int8", "fp16"),
                      "tensorrt": ("fp32", "fp16", "int8")}
# Folders the runner writes into on the device (records, OpenVINO's cache, TensorRT engines); never code.
GENERATED = ("device", "cache", "engines")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".pth", ".dylib", ".dll")
# The only Python files a bundle holds, and so the only modules it can import from its own folder.
PYTHON_FILES = re.compile(r"(runner|preprocess|env)\.py|runtimes/[a-z_][a-z0-9_]*\.py")
MAX_MANIFEST_BYTES = 16 << 20


class BundleError(Exception):
    """A bundle that cannot be used as it is; the message says what to do."""


def sha256(path: Path) -> str:
    """SHA-256 of a file in 1 MiB chunks. ``runtimes.base.sha256_file`` computes the same, but inside a bundle that
    module is one of the files being checked, so the runner hashes with the standard library alone."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- the bundle
def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest as one canonical byte string (sorted keys, no spaces, UTF-8): what its digest and signature
    cover, so re-indenting the file changes neither, and any change of content changes both."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The bundle's identity: ``sha256:`` and the SHA-256 of its canonical manifest."""
    return "sha256:" + hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:  # linear: a manifest may list many files, and a hostile one very many
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_manifest(bundle: Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of ``bundle``, checked by ``check_manifest``."""
    path = Path(bundle) / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{bundle} is not a deployment bundle (no {MANIFEST}); pass the --out of `compress deploy`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {path.stat().st_size >> 20} MB, far larger than a manifest; re-copy the bundle")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{path} is not valid JSON ({str(e)[:120]}); re-copy the bundle") from None
    check_manifest(manifest, path)
    return manifest


def _fail(where: Path, what: str) -> None:
    raise BundleError(f"{where}: {what}; the bundle is damaged or was edited: re-copy it (or unpack its tarball "
                      "again)")


def _safe_relative(name: Any) -> bool:
    """A path that stays inside the bundle: relative, forward slashes, no '.', '..' or empty parts."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and "\\" not in name and "\0" not in name
            and not name.startswith("/") and all(part not in ("", ".", "..") for part in name.split("/")))


def check_manifest(manifest: Any, where: Path = Path(MANIFEST)) -> None:
    """Refuse a manifest that is not exactly what ``compress deploy`` writes, in one line naming the problem."""
    if not isinstance(manifest, dict):
        _fail(where, "it is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is format {manifest.get('format')!r}, not {FORMAT}; use the runner it came with")
    for key, kind in (("name", str), ("files", dict), ("models", list), ("selected", dict), ("classes", list),
                      ("preprocess", dict), ("input", dict)):
        if not isinstance(manifest.get(key), kind):
            _fail(where, f"{key!r} is missing or not a {'JSON object' if kind is dict else kind.__name__}")
    files = manifest["files"]
    for name, digest in files.items():
        if not _safe_relative(name) or name in (MANIFEST, SIGNATURE):
            _fail(where, f"file {name!r} is not a path inside the bundle")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            _fail(where, f"file {name!r} has no SHA-256")
        if name.endswith(CODE_SUFFIXES) and not PYTHON_FILES.fullmatch(name):
            _fail(where, f"file {name!r} is code where the bundle format has none")
    missing = [n for n in ("runner.py", "preprocess.py", "env.py", "runtimes/__init__.py") if n not in files]
    if missing:
        _fail(where, f"it does not list {missing[0]}")
    if not manifest["models"]:
        _fail(where, "it lists no model")
    for entry in manifest["models"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("runtime"), str) or \
                entry["runtime"] not in RUNTIME_PRECISIONS:
            _fail(where, f"model entry {str(entry)[:80]} names no known runtime ({', '.join(RUNTIME_PRECISIONS)})")
        runtime, path, precision = entry["runtime"], entry.get("path"), entry.get("precision")
        if not isinstance(precision, str) or precision not in RUNTIME_PRECISIONS[runtime]:
            _fail(where, f"it offers {runtime} at {precision!r}, which {runtime} cannot run (it runs "
                         f"{', '.join(RUNTIME_PRECISIONS[runtime])})")
        if not isinstance(path, str) or path not in files or not path.endswith((".onnx", ".xml")):
            _fail(where, f"the {runtime} model {path!r} is not one of its listed .onnx or .xml files")
        if path.endswith(".xml") and path[:-4] + ".bin" not in files:
            _fail(where, f"the OpenVINO model {path} has no listed {path[:-4]}.bin")
    if manifest["selected"].get("runtime") not in [m["runtime"] for m in manifest["models"]]:
        _fail(where, "its selected runtime has no model entry")
    batches = manifest["selected"].get("batch_sizes") or [1]
    if not isinstance(batches, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                for b in batches):
        _fail(where, f"its batch sizes {str(batches)[:60]} are not positive whole numbers")
    classes = manifest["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        _fail(where, "its class names are not a non-empty list of strings")
    output = manifest.get("output", {}).get("shape") if isinstance(manifest.get("output"), dict) else None
    if output is not None and (not isinstance(output, list) or output[-1:] != [len(classes)]):
        _fail(where, f"it names {len(classes)} classes but the model's output is {str(output)[:40]}")


def _check_tree(bundle: Path, files: dict[str, str]) -> None:
    """No symbolic link anywhere, and no file that the manifest does not list (outside the runner's own folders)."""
    for folder, dirs, names in os.walk(bundle, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(folder) / name
            relative = path.relative_to(bundle).as_posix()
            if path.is_symlink():
                raise BundleError(f"bundle entry {relative} is a symbolic link, which a bundle never holds (it could "
                                  "point outside it); re-copy the bundle without links")
            if name in dirs:
                continue
            generated = relative.split("/")[0] in GENERATED and not name.endswith(CODE_SUFFIXES)
            if relative not in files and relative not in (MANIFEST, SIGNATURE) and not generated:
                raise BundleError(f"bundle file {relative} is not listed in {MANIFEST}; a bundle runs only what it "
                                  "lists: remove the file, or re-copy the bundle")


def verify(bundle: Path, *, expect: str | None = None, public_key: Path | None = None) -> dict[str, Any]:
    """The manifest, once the bundle is exactly what ``compress deploy`` wrote; ``BundleError`` otherwise.

    ``expect`` is the bundle's identity (``manifest_digest``, as ``compress deploy`` printed it); ``public_key``
    an Ed25519 public key (PEM) whose private half signed the manifest (``compress deploy --sign``).
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a deployment bundle (not a directory); pass the --out of `compress "
                          "deploy`")
    bundle = bundle.resolve()
    manifest = load_manifest(bundle)
    if expect is not None:
        wanted = expect.strip().lower()
        wanted = wanted if wanted.startswith("sha256:") else "sha256:" + wanted
        if manifest_digest(manifest) != wanted:
            raise BundleError(f"bundle {bundle} is {manifest_digest(manifest)}, not the expected {wanted}: its "
                              "manifest was changed, or it is another bundle; do not run it")
    if public_key is not None:
        _check_signature(bundle, manifest, Path(public_key))
    _check_tree(bundle, manifest["files"])
    for name, digest in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing; re-copy the bundle (or unpack its tarball again)")
        if sha256(path) != digest:
            raise BundleError(f"bundle file {name} does not match its SHA-256 in {MANIFEST} (changed or corrupted); "
                              "re-copy the bundle from its tarball")
    if IN_BUNDLE:
        _VerifiedModules.install(bundle, manifest["files"])
    return manifest


def _check_signature(bundle: Path, manifest: dict[str, Any], public_key: Path) -> None:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise BundleError("checking a signature needs the cryptography package: pip install cryptography") from None
    try:
        key = load_pem_public_key(public_key.read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read public key {public_key} ({str(e)[:80]}); pass an Ed25519 public key in "
                          "PEM") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{public_key} is not an Ed25519 public key; pass the .pub.pem made with the signing key")
    signature_path = bundle / SIGNATURE
    if not signature_path.is_file() or signature_path.is_symlink():
        raise BundleError(f"bundle {bundle} is not signed (no {SIGNATURE}); deploy it with `compress deploy --sign`")
    try:
        key.verify(base64.b64decode(signature_path.read_bytes().strip(), validate=True), canonical_manifest(manifest))
    except (InvalidSignature, ValueError):
        raise BundleError(f"the signature of bundle {bundle} does not match its manifest under {public_key}: it "
                          "was changed after signing, or signed with another key; do not run it") from None


class _VerifiedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``preprocess``, ``env`` and ``runtimes[.*]`` of a verified bundle from their listed files, each
    checked against its SHA-256 again as it is read and compiled from those bytes (no ``.pyc`` is read or
    written); any other name is left to the interpreter's own finders, which no longer see the bundle folder."""

    def __init__(self, bundle: Path, files: dict[str, str]) -> None:
        self.bundle, self.files = bundle, dict(files)

    @classmethod
    def install(cls, bundle: Path, files: dict[str, str]) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls(bundle, files))

    def _file(self, fullname: str) -> str | None:
        parts = fullname.split(".")
        if fullname in ("preprocess", "env"):
            return f"{fullname}.py"
        if parts[0] == "runtimes" and len(parts) <= 2:
            return "runtimes/__init__.py" if len(parts) == 1 else f"runtimes/{parts[1]}.py"
        return None

    def find_spec(self, fullname, path=None, target=None):
        relative = self._file(fullname)
        if relative is None or relative not in self.files:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.bundle / relative),
                                               is_package=fullname == "runtimes")

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        relative = self._file(module.__name__)
        source = (self.bundle / relative).read_bytes()
        if hashlib.sha256(source).hexdigest() != self.files[relative]:
            raise BundleError(f"bundle file {relative} changed after it was verified; re-copy the bundle")
        module.__file__ = str(self.bundle / relative)
        exec(compile(source, module.__file__, "exec", dont_inherit=True), module.__dict__)  # noqa: S102


def _preprocess_class():
    if IN_BUNDLE:
        import preprocess  # type: ignore[import-not-found]  (served by _VerifiedModules)

        return preprocess.Preprocess
    return _preprocess_module.Preprocess


def _environment() -> dict[str, Any]:
    if IN_BUNDLE:
        import env  # type: ignore[import-not-found]  (served by _VerifiedModules)

        return env.environment()
    return _env_module.environment()


def _model_entry(manifest: dict[str, Any], runtime: str | None) -> dict[str, Any]:
    runtime = runtime or manifest["selected"]["runtime"]
    for entry in manifest["models"]:
        if entry["runtime"] == runtime:
            return entry
    offered = [m["runtime"] for m in manifest["models"]]
    raise BundleError(f"this bundle has no model for runtime {runtime!r}; it offers {offered}")


def open_engine(bundle: Path, manifest: dict[str, Any], runtime: str | None = None, threads: int | None = None):
    """(engine, model entry) for ``runtime`` (default: the bundle's selected one) of a verified bundle."""
    from runtimes import RuntimeNotInstalledError, RuntimeUnavailableError, default_threads, get_runtime

    entry = _model_entry(manifest, runtime)
    threads = threads or default_threads()
    try:
        if entry["runtime"] == "tensorrt":
            from runtimes.tensorrt_gpu import load_engine

            return load_engine(_engine_path(bundle, entry)), entry
        options = {"cache_dir": Path(bundle) / "cache" / "openvino"} if entry["runtime"] == "openvino" else {}
        engine = get_runtime(entry["runtime"], **options).build(Path(bundle) / entry["path"],
                                                                precision=entry["precision"], threads=threads)
    except RuntimeNotInstalledError as e:
        if entry["runtime"] == "tensorrt":  # its messages say how to get TensorRT and how to build the engine
            raise BundleError(str(e)) from e
        raise BundleError(f"{e} (this bundle runs on {entry['runtime']}; install it with: "
                          f"pip install -r {Path(bundle) / 'requirements.txt'})") from e
    except RuntimeUnavailableError as e:  # installed, but it cannot run this model here
        others = [m["runtime"] for m in manifest["models"] if m is not entry]
        hint = f"; try another of the bundle's runtimes with --runtime ({', '.join(others)})" if others else ""
        raise BundleError(f"{entry['runtime']} cannot run this bundle's {entry['precision']} model here: {e}{hint}"
                          ) from e
    return engine, entry


def _engine_path(bundle: Path, entry: dict[str, Any]) -> Path:
    return Path(bundle) / "engines" / f"{Path(entry['path']).stem}-{entry['precision']}.engine"


# ------------------------------------------------------------------------------------------- classifying
def _preprocess(manifest: dict[str, Any]):
    try:
        return _preprocess_class().from_dict(manifest["preprocess"])
    except (ValueError, TypeError) as e:
        raise BundleError(f"{MANIFEST}: its preprocessing cannot be right ({e}); re-copy the bundle") from None


def load_images(paths: list[Path], preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess.resize_crop(image))
        except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise BundleError(f"cannot read image {path}: {e}") from e
    return preprocess.normalize(np.stack(arrays))  # (B, C, H, W) float32


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classify(bundle: Path, images: list[Path], *, runtime: str | None = None, top: int = 3,
             expect: str | None = None, public_key: Path | None = None) -> list[dict[str, Any]]:
    if not isinstance(top, int) or top < 1:
        raise BundleError(f"--top {top} must be a positive whole number")
    manifest = verify(bundle, expect=expect, public_key=public_key)
    engine, _ = open_engine(bundle, manifest, runtime)
    probs = softmax(engine.run(load_images(images, _preprocess(manifest))))  # (B, K)
    classes = manifest["classes"]
    return [{"image": str(path), "top": [(classes[i], float(p[i])) for i in np.argsort(-p)[:top]]}
            for path, p in zip(images, probs)]


# ------------------------------------------------------------------------------------------ benchmarking
SPLIT_FOLDERS = ("train", "test", "val")


def image_folder(root: Path, classes: list[str], log=print) -> list[tuple[Path, int]]:
    """(image, label) of an ImageFolder (``root/<class name>/*``) whose classes are the model's; a dataset laid out
    as ``root/train`` beside ``root/test`` (or ``root/val``), as ``compress run`` reads it, gives its test split."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"--data {root} is not a directory; pass an ImageFolder (one folder per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = {f.name for f in folders}
    split = next((root / s for s in ("test", "val") if s in names), None)
    if split is not None and names <= set(SPLIT_FOLDERS) and not names & set(classes):
        log(f"--data {root}: using its {split.name}/ split")
        root, folders = split, sorted(p for p in split.iterdir() if p.is_dir())
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise BundleError(f"--data {root} has class folders {unknown[:3]} the model does not know; its classes are "
                          f"{classes[:10]}")
    items = [(f, classes.index(d.name)) for d in folders for f in sorted(d.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise BundleError(f"no images found under {root}; expected {root}/<class>/*.jpg")
    return items


def top1(engine, items: list[tuple[Path, int]], preprocess, batch_size: int = 64) -> float:
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        logits = engine.run(load_images([p for p, _ in chunk], preprocess))
        correct += int((logits.argmax(axis=1) == np.asarray([y for _, y in chunk])).sum())
    return correct / len(items)


def _check_bench_options(batch_sizes: list[int] | None, iterations: int, seconds: float, warmup: int,
                         threads: int | None) -> None:
    """One line for a value that cannot be measured with, before anything is loaded or written."""
    for batch in batch_sizes or []:
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 4096:
            raise BundleError(f"--batch {batch}: a batch size is a whole number from 1 to 4096")
    if not isinstance(iterations, int) or iterations < 1:
        raise BundleError(f"--iterations {iterations} must be at least 1")
    if not 0 < seconds < float("inf"):  # NaN fails both comparisons
        raise BundleError(f"--seconds {seconds} must be a positive number of seconds (e.g. 10)")
    if not isinstance(warmup, int) or warmup < 0:
        raise BundleError(f"warm-up {warmup} must be 0 or more iterations")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BundleError(f"--threads {threads} must be at least 1")


def records_folder(bundle: Path, out: Path | None, runtime: str) -> Path:
    """Where ``bench`` appends its records: ``out``, or ``BUNDLE/device/HOST-RUNTIME`` (never through a link)."""
    if out is not None:
        out = Path(out)
        if (out / "run.json").exists():
            raise BundleError(f"--out {out} is a run directory of `compress run`; device records go to a folder of "
                              "their own (pass both to `compress report`): choose another --out")
        if (out / MANIFEST).exists():
            raise BundleError(f"--out {out} is a deployment bundle; leave --out unset to write into its device/ "
                              "folder, or choose another")
        return out
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "device"
    folder = Path(bundle) / "device" / f"{host}-{runtime}"
    for path in (folder.parent, folder, folder / "records.jsonl"):
        if path.is_symlink():
            raise BundleError(f"{path} is a symbolic link; a bundle never holds one (it could redirect the records "
                              "outside the bundle): remove it")
    return folder


def append_records(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Append ``rows`` as JSON lines to ``path`` in one write: earlier lines are never replaced, and a link in place
    of the file is refused rather than followed."""
    path = Path(path)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # an earlier writer was cut off mid-line: start ours on a line of its own
            os.write(fd, text)
        finally:
            os.close(fd)
    except OSError as e:
        raise BundleError(f"cannot write the records to {path} ({e.strerror}); choose a writable --out") from None
    return path


def bench(bundle: Path, *, runtime: str | None = None, batch_sizes: list[int] | None = None, data: Path | None = None,
          out: Path | None = None, iterations: int = 200, seconds: float = 10.0, warmup: int = 10,
          threads: int | None = None, expect: str | None = None, public_key: Path | None = None,
          log=print) -> tuple[Path, list[dict[str, Any]]]:
    """Measure the bundle here: start-up time, top-1 on ``data`` (when given), latency at each batch size.

    Appends records (the run's schema, stage ``deployed``) to ``out/records.jsonl`` (default
    ``BUNDLE/device/HOST-RUNTIME``) and returns its path and the new rows.
    """
    _check_bench_options(batch_sizes, iterations, seconds, warmup, threads)
    bundle = Path(bundle)
    manifest = verify(bundle, expect=expect, public_key=public_key)
    from runtimes import default_threads, measure_latency

    entry = _model_entry(manifest, runtime)
    folder = records_folder(bundle, out, entry["runtime"])  # refused before minutes of measuring, not after
    preprocess = _preprocess(manifest)
    items = image_folder(data, manifest["classes"], log) if data is not None else None
    threads = threads or default_threads()
    start = time.perf_counter()
    engine, entry = open_engine(bundle, manifest, runtime, threads)
    batch_sizes = sorted(set(batch_sizes or manifest["selected"].get("batch_sizes") or [1]))
    shape = (preprocess.in_chans, preprocess.crop_size, preprocess.crop_size)
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
        if isinstance(reference, (int, float)):
            accuracy["top1_drop"] = round((reference - accuracy["top1"]) * 100, 4)
    env = _environment() | {"threads": threads, "host": socket.gethostname(), "startup_s": round(startup_s, 3),
                            "bundle": manifest_digest(manifest)}
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
    return append_records(folder / "records.jsonl", rows), rows


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
    from runtimes import RuntimeUnavailableError, get_runtime

    try:
        return get_runtime(runtime).versions()
    except (RuntimeUnavailableError, ImportError):  # a runtime that does not import has no version to record
        return {}


# ------------------------------------------------------------------------------------------ TensorRT
def build_engine(bundle: Path, *, workspace_mb: int = 1024, max_batch: int = 32, dla_core: int | None = None,
                 expect: str | None = None, public_key: Path | None = None, log=print) -> Path:
    """Build the TensorRT engine of the bundle's ``tensorrt`` model here (engines do not move between GPUs or
    TensorRT versions); the timing cache beside it makes a rebuild quick."""
    for name, value, low in (("--workspace-mb", workspace_mb, 1), ("--max-batch", max_batch, 1),
                             ("--dla-core", 0 if dla_core is None else dla_core, 0)):
        if not isinstance(value, int) or value < low:
            raise BundleError(f"{name} {value} must be a whole number of at least {low}")
    bundle = Path(bundle)
    manifest = verify(bundle, expect=expect, public_key=public_key)
    from runtimes import RuntimeUnavailableError
    from runtimes.tensorrt_gpu import build_engine as trt_build

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
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--expect", metavar="sha256:DIGEST",
                       help="refuse the bundle unless its identity is this digest (compress deploy prints it)")
    trust.add_argument("--public-key", type=Path, metavar="KEY.pub.pem",
                       help="refuse the bundle unless manifest.sig is this Ed25519 key's signature of the manifest")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", parents=[trust], help="check the manifest and every file against it")
    c = sub.add_parser("classify", parents=[trust], help="classify image files")
    c.add_argument("images", type=Path, nargs="+")
    c.add_argument("--runtime")
    c.add_argument("--top", type=int, default=3)
    b = sub.add_parser("bench", parents=[trust], help="measure latency (and top-1 with --data) here; appends records")
    b.add_argument("--runtime")
    b.add_argument("--data", type=Path, help="an ImageFolder with the model's classes, for top-1")
    b.add_argument("--batch", type=int, nargs="+")
    b.add_argument("--iterations", type=int, default=200)
    b.add_argument("--seconds", type=float, default=10.0)
    b.add_argument("--threads", type=int)
    b.add_argument("--out", type=Path)
    e = sub.add_parser("build-engine", parents=[trust], help="build the TensorRT engine on this device (Jetson)")
    e.add_argument("--workspace-mb", type=int, default=1024)
    e.add_argument("--max-batch", type=int, default=32)
    e.add_argument("--dla-core", type=int)
    args = parser.parse_args(argv)
    trusted = {"expect": args.expect, "public_key": args.public_key}
    try:
        if args.command == "verify":
            manifest = verify(args.bundle, **trusted)
            print(f"ok: {len(manifest['files'])} files match {MANIFEST}; bundle {manifest_digest(manifest)}"
                  + (" (as expected)" if args.expect else "") + (", signature valid" if args.public_key else ""))
        elif args.command == "classify":
            for result in classify(args.bundle, args.images, runtime=args.runtime, top=args.top, **trusted):
                print(result["image"] + ": " + ", ".join(f"{name} {p:.3f}" for name, p in result["top"]))
        elif args.command == "bench":
            path, _ = bench(args.bundle, runtime=args.runtime, batch_sizes=args.batch, data=args.data, out=args.out,
                            iterations=args.iterations, seconds=args.seconds, threads=args.threads, **trusted)
            print(f"records: {path}")
        else:
            path = build_engine(args.bundle, workspace_mb=args.workspace_mb, max_batch=args.max_batch,
                                dla_core=args.dla_core, **trusted)
            print(f"engine: {path}")
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the device's file system: full, read-only, or a path that is not there
        print(f"error: {e.filename or 'a file'}: {e.strerror}; free space or choose a writable folder",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
