"""Deployment bundles: the chosen model of a run, packed for a target device with a runner that needs no torch.

``compress deploy RUN_DIR --target cpu-x86 --out BUNDLE`` reads the run's records (it measures nothing), picks
the fastest candidate on the target's runtimes whose top-1 is within the budget (or the one the user names), and
writes ``BUNDLE/`` and ``BUNDLE.tar.gz``:

- the model: the ONNX file, and for OpenVINO the IR (``openvino/model.xml`` + ``.bin``) converted here;
- ``manifest.json``: input spec, preprocessing, class names, accuracy and latency measured in the run, the
  library versions they were measured with, the selection and why, and the SHA-256 of every file;
- ``runner.py`` (``compress/deploy/runner.py``) with ``preprocess.py``, ``env.py`` and the ``runtimes/``
  package, the same code the run measured with; ``requirements.txt`` naming only the runtime, numpy and Pillow.

A Jetson bundle carries the ONNX file only: TensorRT engines are tied to the GPU and TensorRT version, so the
engine is built on the device (``compress build-engine BUNDLE`` or ``python runner.py build-engine``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.deploy.runner import (FORMAT, MANIFEST, RUNTIME_PRECISIONS, SIGNATURE, BundleError, append_records,
                                    canonical_manifest, manifest_digest, sha256)
from compress.config import TARGETS as CONFIG_TARGETS
from compress.env import versions as installed_versions
from compress.errors import InputError
from compress.io import atomic_path, atomic_write_text, read_json
from compress.records import StageRecord, pareto_front, read_records


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtimes: tuple[str, ...]  # in order of preference when latencies tie
    requirements: tuple[str, ...]
    measured_here: bool  # whether this machine's records measure the target's runtime
    tested: str = ""  # where a bundle for this target has been run end to end, for its README
    # {(runtime, precision): why}: engines this target's bundles never hold, chosen or as alternatives
    refused: dict[tuple[str, str], str] = field(default_factory=dict)


TARGETS = {
    "cpu-x86": Target("cpu-x86", "x86-64 CPU (OpenVINO or ONNX Runtime)", ("openvino", "onnxruntime"),
                      ("numpy", "pillow"), True,
                      "x86-64 Debian 12, Python 3.11, in a fresh virtual environment (this project's tests)"),
    "cpu-arm": Target("cpu-arm", "64-bit Arm CPU, e.g. Graviton or Raspberry Pi 5 (ONNX Runtime, or OpenVINO in "
                      "FP32)", ("onnxruntime", "openvino"), ("numpy", "pillow"), True,
                      "aarch64 Debian 12, Python 3.11, under QEMU user emulation (bench/arm_emulated.py): verify "
                      "and classify; top-1 of ONNX Runtime INT8 within 2 of 1,797 images of x86's, of OpenVINO FP32 "
                      "the same as x86's on 500; not yet on Arm hardware",
                      refused={("openvino", "int8"): "OpenVINO 2026.4's Arm CPU plugin scored NNCF's INT8 model of "
                               "the demo at 11.8% top-1 against 99.4% on x86 (bench/arm_emulated.py)",
                               ("openvino", "bf16"): "OpenVINO's BF16 here is the x86 CPU's (AVX-512 BF16 or AMX) "
                               "and has not been run on aarch64"}),
    "jetson-orin": Target("jetson-orin", "NVIDIA Jetson Orin, JetPack 6 (TensorRT 10, engine built on the device)",
                          ("tensorrt",), ("numpy", "pillow"), False, "not yet run on a Jetson"),
}
assert tuple(TARGETS) == CONFIG_TARGETS, "compress.config.TARGETS names the targets the recipes may ask for"
# What each runtime needs from PyPI. TensorRT itself comes with JetPack (python3-libnvinfer); the engine is built and
# run through Polygraphy, and the GPU is queried through cuda-python (JetPack 6 has CUDA 12).
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                    "tensorrt": ("polygraphy", "cuda-python")}
PIN = {"cuda-python": "cuda-python<13"}  # where the package here is not the one the device needs
# What a TensorRT engine can be built from, best first: explicit INT8 (Q/DQ), an FP16 file, FP32.
TENSORRT_PREFERENCE = ("int8", "fp16", "fp32")


def chain_budget(config: dict[str, Any]) -> float:
    """The accuracy budget a run's final choice is made under: ``pipeline.max_drop`` when the run chained stages
    under one budget, else ``quantize.max_drop``. ``compress run`` and ``compress deploy`` both use this, with
    ``choose``, so a bundle holds what the run said it chose."""
    chain = (config.get("pipeline") or {}).get("max_drop")
    return float(chain if chain is not None else (config.get("quantize") or {}).get("max_drop", 1.0))


def choose(records: list[StageRecord], target: Target, *, max_drop: float, candidate: str | None = None,
           runtime: str | None = None, retimed: dict[str, float] | None = None) -> StageRecord:
    """The record to deploy: at the smallest batch size, on the target's runtimes, within ``max_drop`` points of
    the baseline; the fastest, or for TensorRT targets (not measured here) the best TensorRT-buildable file.

    ``retimed`` ({``timing_key``: median ms}) ranks the contenders too close to call by their single medians
    (``contenders``): the deploy stage of a run times them again, interleaved, and keeps the figures in its marker.
    """
    fits = _fits(records, target, max_drop=max_drop, candidate=candidate, runtime=runtime)
    if not target.measured_here:
        return min(fits, key=lambda r: (TENSORRT_PREFERENCE.index(r.precision), r.latency_ms_p50))
    close = _too_close(fits)
    if retimed and len(close) > 1 and all(timing_key(r) in retimed for r in close):
        return min(close, key=lambda r: (retimed[timing_key(r)], target.runtimes.index(r.runtime)))
    return min(fits, key=lambda r: (r.latency_ms_p50, target.runtimes.index(r.runtime)))


def _fits(records: list[StageRecord], target: Target, *, max_drop: float, candidate: str | None = None,
          runtime: str | None = None) -> list[StageRecord]:
    """The records ``choose`` picks from: at the smallest batch size, on the target's runtimes (or the ONNX files
    TensorRT builds from), within ``max_drop``; ``InputError`` saying why when there are none."""
    ok = [r for r in records if r.status == "ok" and r.top1_drop is not None and r.artifact]
    if not ok:
        raise InputError("the run has no measured records; run `compress run` to the end first")
    batch = min(r.batch_size for r in ok)
    pool = [r for r in ok if r.batch_size == batch]
    if candidate is not None:
        pool = [r for r in pool if candidate in (r.candidate, r.stage)]
        if not pool:
            names = sorted({r.candidate or r.stage for r in ok})
            raise InputError(f"no record of candidate {candidate!r} in the run; it has {names}")
    if target.measured_here:
        runtimes = (runtime,) if runtime else target.runtimes
        pool = [r for r in pool if r.runtime in runtimes]
        if not pool:
            raise InputError(f"the run has no measurements on {', '.join(runtimes)}, the runtime(s) of target "
                             f"{target.name}; rerun with `--runtime {runtimes[0]}` (and install it)")
        allowed = [r for r in pool if (r.runtime, r.precision) not in target.refused]
        if not allowed:
            r = pool[0]
            raise InputError(f"{target.name} bundles do not hold {r.runtime} {r.precision.upper()}: "
                             f"{target.refused[(r.runtime, r.precision)]}; choose another --candidate or --runtime")
        pool = allowed
    else:  # TensorRT runs the same ONNX files ONNX Runtime measured; its latency is measured on the device
        pool = [r for r in pool if r.runtime == "onnxruntime" and r.artifact.endswith(".onnx")
                and r.precision in TENSORRT_PREFERENCE]
        if not pool:
            raise InputError(f"the run has no ONNX Runtime measurements to judge the ONNX files {target.name} builds "
                             "engines from; rerun with `--runtime onnxruntime`")
    fits = [r for r in pool if r.top1_drop <= max_drop + 1e-9]
    if not fits:
        best = min(pool, key=lambda r: r.top1_drop)
        raise InputError(f"no candidate of the run is within the {max_drop:g} pt budget on {target.name}'s "
                         f"runtimes; the closest is {best.candidate or best.stage} on {best.runtime} "
                         f"({best.top1_drop:+.2f} pt): raise --max-drop or rerun with a milder recipe")
    return fits


def timing_key(record: StageRecord) -> str:
    """What names an engine across a run's files: its artifact, runtime and precision."""
    return f"{record.artifact}|{record.runtime}|{record.precision}"


def _too_close(fits: list[StageRecord]) -> list[StageRecord]:
    from runtimes.noise import is_noisy, too_close_to_call

    return too_close_to_call(fits, lambda r: r.latency_ms_p50, lambda r: is_noisy(r.latency_verdict))


def contenders(records: list[StageRecord], target: Target, *, max_drop: float) -> list[StageRecord]:
    """The records ``choose`` picks among by single medians too close to call (``runtimes.noise.CLOSE``) or
    taken noisy: the ones to time again, interleaved, before a bundle is packed. Empty when one stands out, stably
    timed, or nothing fits."""
    if not target.measured_here:
        return []
    try:
        close = _too_close(_fits(records, target, max_drop=max_drop))
    except InputError:
        return []
    return close if len(close) > 1 else []


def _pool(records: list[StageRecord], target: Target) -> list[StageRecord]:
    """Measured rows at the smallest batch size on the target's runtimes (ONNX Runtime standing in for TensorRT)."""
    ok = [r for r in records if r.status == "ok" and r.top1 is not None and r.latency_ms_p50 is not None
          and r.artifact]  # settings a stage only tried (no artifact kept) are not candidates
    if not ok:
        return []
    batch = min(r.batch_size for r in ok)
    runtimes = target.runtimes if target.measured_here else ("onnxruntime",)
    return [r for r in ok if r.batch_size == batch and r.runtime in runtimes]


def pareto_set(records: list[StageRecord], target: Target) -> list[dict[str, Any]]:
    """The rows no other row beats on both top-1 and latency, fastest first (the accuracy-latency trade-off)."""
    pool = sorted(_pool(records, target), key=lambda r: (r.latency_ms_p50, -r.top1))
    on = pareto_front([(r.latency_ms_p50, r.top1) for r in pool])
    return [{"stage": r.stage, "candidate": r.candidate or r.stage, "runtime": r.runtime, "precision": r.precision,
             "top1": r.top1, "top1_drop": r.top1_drop, "latency_ms_p50": r.latency_ms_p50, "batch_size": r.batch_size}
            for r, keep in zip(pool, on) if keep]


def retimed_in_run(run_dir: Path, target: Target, budget: float) -> dict[str, float] | None:
    """The interleaved medians the run's deploy stage took for ``target`` under ``budget`` (``deploy_stage``), so
    that ``compress deploy`` later packs what the run chose; None when it took none."""
    try:
        marker = read_json(Path(run_dir) / "stages" / "deploy.json")
    except (ValueError, OSError):  # a damaged marker: rank by the records alone
        return None
    timing = marker.get("retimed") if isinstance(marker, dict) else None
    if not isinstance(timing, dict) or timing.get("target") != target.name or timing.get("budget_pt") != budget:
        return None
    medians = timing.get("p50_ms")
    if not isinstance(medians, dict) or not all(isinstance(v, (int, float)) for v in medians.values()):
        return None
    return {str(k): float(v) for k, v in medians.items()}


def deploy(run_dir: Path, target_name: str, out: Path, *, candidate: str | None = None, runtime: str | None = None,
           max_drop: float | None = None, sign: Path | None = None, log=print,
           retimed: dict[str, float] | None = None) -> Path:
    """Write the bundle ``out`` (and ``out.tar.gz``) for ``target_name`` from the run in ``run_dir``.

    Contenders too close to call are ranked by ``retimed``, or by the medians the run's deploy stage took
    (``retimed_in_run``). The bundle's identity (``manifest_digest``) is logged and appended to
    ``RUN_DIR/bundles.jsonl``; with ``sign`` (an Ed25519 private key in PEM), ``manifest.sig`` signs the manifest.
    """
    if target_name not in TARGETS:
        raise InputError(f"unknown target {target_name!r}; choose from {list(TARGETS)}")
    target = TARGETS[target_name]
    if runtime is not None and runtime not in target.runtimes:
        raise InputError(f"runtime {runtime!r} is not one of target {target.name}'s: {list(target.runtimes)}")
    if max_drop is not None and max_drop < 0:
        raise InputError(f"--max-drop {max_drop:g} is negative; give the top-1 points you accept losing (e.g. 1.0)")
    records_path = Path(run_dir) / "records.jsonl"
    if not records_path.is_file():
        raise InputError(f"{run_dir} is not a run directory (no records.jsonl); pass the --out of `compress run`")
    tarball = out.with_name(out.name + ".tar.gz")
    for path in (out, tarball):
        if path.exists():
            raise InputError(f"{path} already exists; choose a new --out (nothing was changed)")
    config = read_json(Path(run_dir) / "config.json")
    budget = max_drop if max_drop is not None else chain_budget(config)
    records = read_records(records_path)
    if retimed is None:
        retimed = retimed_in_run(Path(run_dir), target, budget)
    chosen = choose(records, target, max_drop=budget, candidate=candidate, runtime=runtime, retimed=retimed)
    private_key = _signing_key(sign) if sign is not None else None
    log(f"deploying {chosen.candidate or chosen.stage} ({chosen.runtime} {chosen.precision}): top-1 "
        f"{chosen.top1 * 100:.2f}% ({chosen.top1_drop:+.2f} pt), p50 {chosen.latency_ms_p50:.3f} ms at batch "
        f"{chosen.batch_size} here" + (f" ({retimed[timing_key(chosen)]:.3f} ms timed again, interleaved)"
                                       if retimed and timing_key(chosen) in retimed else ""))
    metadata = _stage_metadata(Path(run_dir), chosen)
    if not metadata:
        raise InputError(f"the checkpoint of stage {chosen.stage} is missing from {run_dir}/artifacts; the run is "
                         "incomplete: rerun the same `compress run` command to finish it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is for copying to devices
    try:
        models = _write_models(Path(run_dir) / chosen.artifact, chosen, target, staging)
        _write_runner(staging, target, models)
        manifest = _manifest(out.name, target, chosen, records, models, metadata, budget, staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if private_key is not None:
            signature = private_key.sign(canonical_manifest(manifest))
            (staging / SIGNATURE).write_bytes(base64.b64encode(signature) + b"\n")
        os.replace(staging, out)  # the bundle appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_tarball(out, tarball)
    digest = manifest_digest(manifest)
    append_records(Path(run_dir) / "bundles.jsonl", [{
        "bundle": str(out.resolve()), "digest": digest, "target": target.name, "signed": private_key is not None,
        "record": manifest["selected"]["record"], "created": manifest["created"]}])
    log(f"bundle: {out}\ntarball: {tarball}\nidentity: {digest} (check it on the device: python runner.py verify "
        f"--expect {digest})")
    return out


def _signing_key(path: Path):
    """The Ed25519 private key (PEM, unencrypted) in ``path``; ``InputError`` for anything else."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise InputError("signing needs the cryptography package: pip install cryptography") from None
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"cannot read signing key {path} ({str(e)[:80]}); make one with: openssl genpkey "
                         "-algorithm ed25519 -out key.pem") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} is not an Ed25519 private key; make one with: openssl genpkey -algorithm ed25519 "
                         "-out key.pem")
    return key



def _stage_metadata(run_dir: Path, record: StageRecord) -> dict[str, str] | None:
    """The model metadata (preprocessing, classes, architecture) of the stage a record belongs to (for quantized
    candidates, the float stage they came from): its checkpoint's, or for a run of an ONNX file its marker's."""
    from compress.model.checkpoint import read_metadata

    markers = []
    for path in (run_dir / "stages").glob("*.json"):
        try:
            marker = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(marker, dict) and ("checkpoint" in marker or "metadata" in marker):
            markers.append((path.stem, marker))
    if record.stage == "quantize":  # quantize follows the last float stage of the chain
        order = ("baseline", "prune", "recover", "tokens")
        chain = sorted((m for m in markers if m[0] in order), key=lambda m: order.index(m[0]))
        found = chain[-1][1] if chain else None
    else:
        found = next((m for name, m in markers if name == record.stage), None)
    if found is None:
        return None
    if isinstance(found.get("checkpoint"), str) and Path(found["checkpoint"]).name == found["checkpoint"]:
        return read_metadata(run_dir / "artifacts" / found["checkpoint"])
    meta = found.get("metadata")
    ok = isinstance(meta, dict) and all(isinstance(meta.get(k), str) for k in ("model", "preprocess", "classes"))
    return meta if ok else None


def _write_models(artifact: Path, record: StageRecord, target: Target, root: Path) -> list[dict[str, Any]]:
    """Copy (and for OpenVINO convert) the chosen artifact; one entry per runtime the bundle can use, each at a
    precision that runtime runs (the runtime the record measured first, marked ``measured``)."""
    if not artifact.is_file():
        raise InputError(f"artifact {artifact} of the chosen record is missing; rerun the same `compress run`")
    models = []
    if artifact.suffix == ".onnx":
        shutil.copy2(artifact, root / "model.onnx")
        runtimes = ("tensorrt", "onnxruntime") if not target.measured_here else ("onnxruntime", "openvino")
        for name in runtimes:
            # A BF16 record is the float ONNX under OpenVINO's BF16 hint: other runtimes run that file in FP32.
            precision = record.precision if record.precision in RUNTIME_PRECISIONS[name] else "fp32"
            if (name, precision) in target.refused:
                continue  # e.g. a Q/DQ file, which OpenVINO would run in INT8 on an Arm CPU
            models.append({"runtime": name, "path": "model.onnx", "precision": precision,
                           "measured": name == record.runtime and precision == record.precision})
    if record.runtime == "openvino":
        (root / "openvino").mkdir()
        if artifact.suffix == ".xml":
            shutil.copy2(artifact, root / "openvino" / "model.xml")
            shutil.copy2(artifact.with_suffix(".bin"), root / "openvino" / "model.bin")
        else:
            import openvino as ov

            ov.save_model(ov.convert_model(str(artifact)), str(root / "openvino" / "model.xml"), compress_to_fp16=False)
        models = [m for m in models if m["runtime"] != "openvino"]
        models.insert(0, {"runtime": "openvino", "path": "openvino/model.xml", "precision": record.precision,
                          "measured": True})
    if target.measured_here:  # the measured one first: the bundle's selected runtime (TensorRT stays first)
        models.sort(key=lambda m: not m["measured"])
    return models


def _write_runner(root: Path, target: Target, models: list[dict[str, Any]]) -> None:
    import calibration.preprocess
    import compress.deploy.runner
    import compress.env
    import runtimes

    shutil.copy2(compress.deploy.runner.__file__, root / "runner.py")
    shutil.copy2(calibration.preprocess.__file__, root / "preprocess.py")
    shutil.copy2(compress.env.__file__, root / "env.py")
    package = Path(runtimes.__file__).parent
    (root / "runtimes").mkdir()
    for source in sorted(package.glob("*.py")):
        if source.name != "torch_eager.py":  # the bundle runs without torch
            shutil.copy2(source, root / "runtimes" / source.name)
    needed = sorted({p for m in models for p in RUNTIME_PACKAGES.get(m["runtime"], ())})
    versions = installed_versions(["numpy", "pillow", *needed])
    lines = [PIN.get(name) or (f"{name}>={versions[name]}" if versions.get(name) else name)
             for name in ("numpy", "pillow", *needed)]
    (root / "requirements.txt").write_text("\n".join(lines) + "\n")
    (root / "README.md").write_text(_readme(root.name, target, models))


def _readme(name: str, target: Target, models: list[dict[str, Any]]) -> str:
    lines = [f"# Deployment bundle for {target.description}", "",
             "Needs Python 3.10+, numpy, Pillow and the runtime; never torch.", "", "```bash"]
    if target.name == "jetson-orin":
        lines += ["# TensorRT comes with JetPack 6 (python3-libnvinfer); build the engine here, once per device:",
                  "python -m venv --system-site-packages .venv && . .venv/bin/activate && pip install -r "
                  "requirements.txt", "python runner.py build-engine"]
    else:
        lines += ["python -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt"]
    lines += ["python runner.py verify                       # every file against manifest.json's SHA-256",
              "python runner.py classify image.jpg           # top classes",
              "python runner.py bench --data IMAGE_FOLDER    # latency here, and top-1 on an ImageFolder",
              "```", "", "Models: " + ", ".join(f"{m['runtime']} ({m['precision']}, {m['path']})" for m in models),
              "", "`manifest.json` holds the input spec, preprocessing, classes, and the accuracy and latency measured "
              "when the bundle was made."]
    if target.tested:
        lines += ["", f"Tested platforms: {target.tested}."]
    return "\n".join(lines) + "\n"


def _manifest(name: str, target: Target, chosen: StageRecord, records: list[StageRecord], models: list[dict],
              metadata: dict[str, str], budget: float, root: Path) -> dict[str, Any]:
    same = [r for r in records if r.status == "ok" and r.stage == chosen.stage and r.candidate == chosen.candidate
            and r.runtime == chosen.runtime and r.precision == chosen.precision]
    preprocess = json.loads(metadata["preprocess"])
    files = {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return {
        "format": FORMAT, "name": name, "target": target.name, "target_description": target.description,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"name": "pixel_values", "dtype": "float32", "layout": "NCHW",
                  "shape": ["batch", preprocess["in_chans"], preprocess["crop_size"], preprocess["crop_size"]]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", len(json.loads(metadata["classes"]))]},
        "preprocess": preprocess, "classes": json.loads(metadata["classes"]),
        "model": json.loads(metadata["model"]) | ({"tokens": json.loads(metadata["tokens"])} if "tokens" in metadata
                                                  else {}),
        "selected": {"record": {"id": chosen.record_id, "stage_key": chosen.stage_key, "run_id": chosen.run_id,
                                "timestamp": chosen.timestamp},
                     "stage": chosen.stage, "candidate": chosen.candidate or chosen.stage, "runtime": models[0]["runtime"],
                     "measured_runtime": chosen.runtime, "precision": chosen.precision, "top1": chosen.top1,
                     "top1_drop": chosen.top1_drop, "budget_pt": budget, "dataset": chosen.dataset,
                     "eval_samples": chosen.eval_samples, "eval_total": chosen.eval_total,
                     # set when this runtime's top-1 is a sample's estimate against another's full score
                     "sampled_against": chosen.sampled_against, "batch_sizes": sorted({r.batch_size for r in same}),
                     "why": ("fastest within budget on the target's runtimes" if target.measured_here else
                             "best TensorRT-buildable file within budget (INT8 Q/DQ > FP16 > FP32); latency is "
                             "measured on the device")},
        "latency_measured": [{"batch_size": r.batch_size, "latency_ms_p50": r.latency_ms_p50,
                              "latency_ms_p90": r.latency_ms_p90, "latency_ms_p99": r.latency_ms_p99,
                              "throughput_ips": r.throughput_ips, "threads": r.threads} for r in same],
        "measured_on": {k: v for k, v in chosen.env.items() if k != "versions"},
        "versions": chosen.env.get("versions", {}),
        "models": models, "files": files,
    }


def _write_tarball(bundle: Path, tarball: Path) -> None:
    with atomic_path(tarball) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name)
    atomic_write_text(tarball.with_name(tarball.name + ".sha256"), f"{sha256(tarball)}  {tarball.name}\n")


__all__ = ["TARGETS", "BundleError", "choose", "deploy"]
