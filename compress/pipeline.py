"""The run orchestrator: stages in order, each measured the same way on every runtime.

The order of stages is data (``stages.model_stages(config)``): a stage maps a model to a model, given a
``StageContext``; after it, the orchestrator saves the model, exports and validates its ONNX, and for every
runtime and precision evaluates top-1 on the held-out split and measures latency at each batch size, appending one
``StageRecord`` per (stage, runtime, precision, batch size) to ``RUN_DIR/records.jsonl`` (rewritten whole,
atomically, so the file is always a complete set of lines).

Resuming: a stage's outputs are named by a content hash of everything that produced them (the previous
stage's key, the stage's options, the export and measurement settings), and a stage is done when its marker
``stages/<name>.json`` carries that key. Records of a stage that never wrote its marker (an interrupted run)
are dropped before the stage runs again, so none is counted twice. Every file is written atomically.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.datasets import ImageSource, Splits, Subset, make_splits, open_source
from calibration.evaluate import EvalResult, evaluate_top1
from compress.checkpoint import (Checkpoint, check_dataset_fits, load_own_checkpoint, match_class_names,
                                 save_checkpoint)
from compress.config import RunConfig
from compress.env import environment
from compress.errors import InputError
from compress.io import (LOCK_NAME, atomic_write, atomic_write_json, atomic_write_text, exclusive, read_json,
                         sha256_json)
from compress.macs import count_macs, count_params
from compress.records import StageRecord, read_records
from compress.report import write_markdown_report
from compress.stages import (StageContext, check_feasible, model_stages, model_structure, openvino_parity,
                             stage_plan)
from compress.vit import VisionTransformer
from export.onnx_export import export_onnx
from runtimes import default_threads, get_runtime, measure_latency

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)
PRECISIONS = ("fp32", "bf16")


@dataclass
class RunResult:
    run_dir: Path
    records: list[StageRecord]
    resumed_stages: list[str]


def check_run_dir(run_dir: Path) -> None:
    """Refuse an ``--out`` that is a file, lies under a file, or holds anything but a run of this tool; reads only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file; choose a directory path for the run")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--out {run_dir}: {parent} is a file; choose a directory path for the run")
    if run_dir.is_symlink():
        raise InputError(f"--out {run_dir} is a symbolic link; pass the directory itself")
    if (run_dir / "run.json").exists():
        return
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise InputError(f"{run_dir} exists and is not a run directory of this tool; choose a new --out")


def prepare_run_dir(run_dir: Path, inputs: dict[str, Any]) -> bool:
    """Accept ``run_dir`` (already checked and locked) for this run; return True when resuming a run of the same
    inputs. A run of other inputs that finished no stage left nothing of value, and is started afresh; one that
    finished a stage is refused, so nothing a user already has is lost."""
    key = sha256_json(inputs)
    manifest = run_dir / "run.json"
    if manifest.exists():
        try:
            recorded = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            recorded = None
        if not isinstance(recorded, dict):
            raise InputError(f"{manifest} is damaged; choose a new --out (or delete {run_dir} yourself)")
        if recorded.get("key") == key:
            return True
        if _done_stage_keys(run_dir) or read_records(run_dir / "records.jsonl"):
            raise InputError(
                f"{run_dir} already holds a run of another checkpoint or config; choose a new --out "
                "(or delete that directory yourself to replace it)"
            )
        log.info("%s held an attempt with other inputs that finished no stage; starting afresh", run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, {"key": key, "inputs": inputs, "created": _now()})
    except OSError as e:
        raise InputError(f"cannot write the run directory {run_dir}: {e.strerror}; choose a writable --out with free "
                         "space") from e
    return False


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process (SIGKILL, power loss) left behind."""
    stale = [p for p in run_dir.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def run_pipeline(
    ckpt: Checkpoint, checkpoint_id: str, config: RunConfig, run_dir: Path, *, progress: Progress | None = None
) -> RunResult:
    """Run every stage on ``ckpt`` and measure it; resume a run of the same inputs in ``run_dir``.

    Under ``torchrun`` rank 0 runs the pipeline and the other ranks only join its fine-tuning (``distributed``).
    """
    from compress import distributed

    if distributed.init() and not distributed.is_main():
        distributed.serve()
        return RunResult(run_dir, [], [])
    try:
        return _run(ckpt, checkpoint_id, config, run_dir, progress)
    finally:
        distributed.release()


def _run(ckpt: Checkpoint, checkpoint_id: str, config: RunConfig, run_dir: Path, progress: Progress | None
         ) -> RunResult:
    stages = model_stages(config)  # a recipe error stops here, before any file is written
    plan = stage_plan(config)
    check_feasible(ckpt.model, config)
    source = open_source(config.data.path)
    check_dataset_fits(ckpt, source)
    splits = make_splits(source, calib_size=config.data.calib_size, eval_fraction=config.data.eval_fraction,
                         seed=config.data.seed)
    eval_data = Subset(source, splits.eval[: config.data.eval_limit], ckpt.preprocess)
    calib_data = Subset(source, splits.calib, ckpt.preprocess)
    if len(eval_data) == 0:
        raise InputError(f"dataset {source.name} leaves no images for evaluation; add images or lower data.calib_size")
    q = config.quantize
    if "quantize" in plan and set(q.quantizers) - {"fp16", "bf16", "onnxruntime-dynamic"}:  # fail before any work
        _calibration_set(q, calib_data, ckpt.preprocess, announce=False)
    check_run_dir(run_dir)
    with exclusive(run_dir, what="`compress run`"):  # held to the end: one process per run directory
        return _run_locked(ckpt, checkpoint_id, config, run_dir, progress,
                           _Inputs(stages, plan, source, splits, eval_data, calib_data))


@dataclass(frozen=True)
class _Inputs:
    """What ``_run`` checked before touching the run directory, handed to the part that works in it."""

    stages: list
    plan: list[str]
    source: ImageSource
    splits: Splits
    eval_data: Subset
    calib_data: Subset


def _run_locked(ckpt: Checkpoint, checkpoint_id: str, config: RunConfig, run_dir: Path, progress: Progress | None,
                inputs: _Inputs) -> RunResult:
    stages, plan, source, splits = inputs.stages, inputs.plan, inputs.source, inputs.splits
    eval_data, calib_data = inputs.eval_data, inputs.calib_data
    if prepare_run_dir(run_dir, {"checkpoint": checkpoint_id, "dataset": source.name, "config": config.dump()}):
        for path in remove_stale_temporaries(run_dir):
            log.info("removed %s, left by an interrupted run", path.relative_to(run_dir))
    match_class_names(ckpt, source)  # labels are read per batch, so the splits drawn above still hold
    atomic_write_json(run_dir / "config.json", config.dump())
    probe = calib_data if len(calib_data) else eval_data
    parity_inputs = next(probe.batches(32))[0]  # (<=32, C, H, W) real images
    largest = max(config.measure.batch_sizes)
    first = next(eval_data.batches(largest))[0]
    latency_input = np.concatenate([first] * -(-largest // len(first)))[:largest]  # (B_max, C, H, W)

    records_path = run_dir / "records.jsonl"
    done_keys = _done_stage_keys(run_dir)
    kept = [r for r in read_records(records_path) if done_keys.get(r.stage) == r.stage_key]
    atomic_write_text(records_path, "".join(r.to_json() + "\n" for r in kept))

    model, prev_key, reference, resumed = ckpt.model, checkpoint_id, None, []
    onnx_path, stage_name = None, None
    train_data = Subset(source, splits.train, ckpt.preprocess)
    for stage in stages:
        key = sha256_json({"prev": prev_key, "stage": stage.name, "options": stage.options,
                           "export": config.export.model_dump(), "measure": config.measure.model_dump(),
                           "data": config.data.model_dump(), "dataset": source.name})[:16]
        artifacts = run_dir / "artifacts"
        ckpt_path, onnx_path = artifacts / f"{stage.name}-{key}.safetensors", artifacts / f"{stage.name}-{key}.onnx"
        preds_path = run_dir / "stages" / f"{stage.name}-{key}.reference.npy"
        if done_keys.get(stage.name) == key and ckpt_path.exists():
            log.info("stage %s: done in an earlier run, reusing %s", stage.name, ckpt_path.name)
            model = load_own_checkpoint(ckpt_path).model
            if preds_path.exists():
                reference = EvalResult(_reference_top1(kept, stage.name), np.load(preds_path), len(eval_data))
            resumed.append(stage.name)
            prev_key, stage_name = key, stage.name
            continue
        log.info("stage %s: running", stage.name)
        state_dir = run_dir / "stages" / f"{stage.name}-{key}"
        ctx = StageContext(config, train_data, calib_data, eval_data, ckpt.model, state_dir, progress,
                           budget_left=_budget_left(config, kept, stage_name))
        model = stage.transform(model, ctx)
        stage_ckpt = Checkpoint(model, ckpt.preprocess, ckpt.classes)
        save_checkpoint(stage_ckpt, ckpt_path)
        example = torch.from_numpy(parity_inputs[:2].copy())
        export = export_onnx(model, onnx_path, example=example, opset=config.export.opset,
                             simplify=config.export.simplify, atol=config.export.atol,
                             min_agreement=config.export.min_agreement, parity_inputs=parity_inputs)
        threads = config.measure.threads or default_threads()
        if model.token_reduction is not None and "openvino" in config.measure.runtimes:
            openvino_parity(onnx_path, model, parity_inputs, atol=config.export.atol, threads=threads)
        had_reference = reference is not None
        stage_records, reference = _measure_stage(
            stage.name, key, model, ckpt_path, onnx_path, eval_data, latency_input, reference, config, run_dir,
            source.name, progress,
        )
        if reference is not None and not had_reference:  # this stage set the reference: keep it for resuming
            buffer = io.BytesIO()
            np.save(buffer, reference.predictions)
            atomic_write(preds_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
        kept += _tried_records(ctx, stage.name, key, model, latency_input, source.name, run_dir, threads, reference)
        kept += stage_records  # rewritten whole and atomically: a kill never leaves a torn line
        atomic_write_text(records_path, "".join(r.to_json() + "\n" for r in kept))
        atomic_write_json(run_dir / "stages" / f"{stage.name}.json", {
            "key": key, "checkpoint": ckpt_path.name, "onnx": onnx_path.name, "finished": _now(),
            "export": {"opset": export.opset, "nodes_exported": export.nodes_exported,
                       "nodes_final": export.nodes_final, "parity_max_abs_diff": export.parity.max_abs_diff,
                       "parity_agreement": export.parity.agreement, "parity_samples": export.parity.num_samples},
            "notes": ctx.notes,
        })
        if state_dir.exists():  # resumable training state is only needed until the stage is marked done
            shutil.rmtree(state_dir)
        prev_key, stage_name = key, stage.name
    if "quantize" in plan:
        key = sha256_json({"prev": prev_key, "stage": "quantize", "options": config.quantize.model_dump(),
                           "budget": config.pipeline.max_drop, "measure": config.measure.model_dump(),
                           "data": config.data.model_dump(), "dataset": source.name})[:16]
        if done_keys.get("quantize") == key:
            log.info("stage quantize: done in an earlier run")
            resumed.append("quantize")
        else:
            left = _budget_left(config, kept, stage_name)
            if left is not None:  # the chain's budget: what the float stages left of it
                config = config.model_copy(update={"quantize": config.quantize.model_copy(
                    update={"max_drop": max(0.0, left)})})
            kept += quantize_stage(key, stage_name, model, onnx_path, kept, calib_data, eval_data, latency_input,
                                   reference, config, run_dir, source.name, progress)
            atomic_write_text(records_path, "".join(r.to_json() + "\n" for r in kept))
    finish_chain(run_dir, config, plan, kept)  # every run says what it chose, by the rule deploy applies
    write_markdown_report(run_dir, kept)
    return RunResult(run_dir, kept, resumed)


def quantize_stage(
    key: str, prev_stage: str, model: VisionTransformer, float_onnx: Path, records: list[StageRecord],
    calib_split: Subset, eval_data: Subset, latency_input: np.ndarray, reference: EvalResult | None,
    config: RunConfig, run_dir: Path, dataset: str, progress: Progress | None,
) -> list[StageRecord]:
    """Make every configured quantized candidate, fit each to the budget, measure each on every runtime.

    The budget is ``quantize.max_drop`` points of top-1 against the previous stage's float model on ONNX
    Runtime. The selected candidate is the fastest at the smallest batch size among those within budget; when
    none is, the stage says so and the float model stays the pipeline's output.
    """
    from compress.quantize.base import QuantizeContext, artifact_evaluator
    from compress.quantize.stage import build_candidates

    q = config.quantize
    threads = config.measure.threads or default_threads()
    workdir = run_dir / "artifacts" / f"quantize-{key}"
    workdir.mkdir(parents=True, exist_ok=True)
    calib = _calibration_set(q, calib_split, eval_data.preprocess)

    evaluate = artifact_evaluator(eval_data, threads=threads, batch_size=config.measure.eval_batch_size)

    def evaluate_torch(module) -> float:
        torch.set_num_threads(threads)
        with torch.no_grad():
            return evaluate_top1(lambda x: module(torch.from_numpy(x)).numpy(), eval_data,
                                 batch_size=config.measure.eval_batch_size).top1

    float_top1 = next((r.top1 for r in records if r.stage == prev_stage and r.runtime == "onnxruntime"
                       and r.precision == "fp32" and r.status == "ok"), None)
    if float_top1 is None:
        float_top1 = evaluate(float_onnx, "onnx", "fp32")
    ctx = QuantizeContext(
        model=model, float_onnx=float_onnx, calib=calib, evaluate=evaluate, reference_top1=float_top1,
        max_drop=q.max_drop, workdir=workdir, max_float_fraction=q.max_float_fraction, op_types=tuple(q.op_types),
        exclude=tuple(q.exclude), attention_matmul=q.attention_matmul, activations=q.activations,
        calibration_method=q.calibration_method,
        sensitivity_samples=q.sensitivity_samples, inc_max_trials=q.inc_max_trials,
        smoothquant_alpha=q.smoothquant_alpha, nncf_smooth_quant=q.nncf_smooth_quant, threads=threads, log=log.info,
    )
    log.info("stage quantize: %s on %d calibration images, budget %.2f pt against top-1 %.2f of %s",
             ", ".join(q.quantizers), calib.size, q.max_drop, float_top1 * 100, prev_stage)
    openvino_bf16 = "openvino" in config.measure.runtimes and "bf16" in get_runtime("openvino").precisions()
    candidates, missed = build_candidates(
        ctx, list(q.quantizers), evaluate_torch=evaluate_torch,
        eval_batches=lambda: eval_data.batches(config.measure.eval_batch_size), eval_count=len(eval_data),
        bf16_available=openvino_bf16, fp16_keep_float32=list(q.fp16_keep_float32),
    )
    for line in missed:
        log.warning("quantize: %s", line)

    common = _common_fields("quantize", key, model, latency_input, dataset, run_dir, threads)
    out: list[StageRecord] = []
    for candidate in candidates:
        fields = common | {"candidate": candidate.name, "quantizer": candidate.quantizer,
                           "precision": candidate.precision, "calibration": candidate.calibration,
                           "float_layers": list(candidate.float_layers),
                           "artifact": str(candidate.path.relative_to(run_dir)),
                           "size_mb": _artifact_mb(candidate.path), "timestamp": _now()}
        for name in config.measure.runtimes:
            runtime = get_runtime(name)
            base = fields | {"runtime": name, "env": _runtime_env(common["env"], runtime)}
            reason = _cannot_run(runtime, candidate.format, candidate.precision)
            engine = None
            if reason is None:
                try:
                    engine = runtime.build(candidate.path, precision=candidate.precision, threads=threads)
                except (TypeError, AttributeError, NameError):
                    raise  # our bug, not the runtime's verdict on the model
                except Exception as e:  # a runtime rejecting an op of this candidate: recorded, not fatal
                    reason = f"{name} could not load {candidate.name}: {str(e).strip().splitlines()[0][:200]}"
            if engine is None:
                out += [StageRecord(**base, batch_size=b, status="skipped", reason=reason)
                        for b in config.measure.batch_sizes]
                continue
            records, _ = _measure_engine(engine, f"quantize · {candidate.name} · {name}", base, eval_data,
                                         latency_input, reference, float_top1, config, threads, progress)
            out += records
    selected = _select(out, float_top1, q.max_drop, min(config.measure.batch_sizes))
    if selected is None:
        log.warning("quantize: no candidate meets the %.2f pt budget; the float model of stage %s is carried "
                    "forward", q.max_drop, prev_stage)
    atomic_write_json(run_dir / "stages" / "quantize.json", {
        "key": key, "finished": _now(), "reference_top1": float_top1, "max_drop": q.max_drop,
        "selected": selected, "missed": missed,
        "candidates": [{"name": c.name, "quantizer": c.quantizer, "precision": c.precision,
                        "artifact": str(c.path.relative_to(run_dir)), "top1_while_fitting": c.top1,
                        "calibration": c.calibration, "float_layers": list(c.float_layers),
                        "sensitivity": [[n, v] for n, v in (c.extra.get("sensitivity") or {}).items()]}
                       for c in candidates],
    })
    return out


def _stage_drop(records: list[StageRecord], stage: str | None) -> float | None:
    """Top-1 points ``stage``'s float model lost against the baseline, on ONNX Runtime when it was measured."""
    rows = [r for r in records if r.stage == stage and r.status == "ok" and r.candidate is None
            and r.top1_drop is not None and r.precision == "fp32"]
    if not rows:
        return None
    preferred = [r for r in rows if r.runtime == "onnxruntime"] or rows
    return preferred[0].top1_drop


def _budget_left(config: RunConfig, records: list[StageRecord], prev_stage: str | None) -> float | None:
    """What ``pipeline.max_drop`` leaves after the stages up to ``prev_stage``; None without a chain budget."""
    budget = config.pipeline.max_drop
    if budget is None:
        return None
    spent = _stage_drop(records, prev_stage) if prev_stage else 0.0
    return budget - max(0.0, spent or 0.0)


def finish_chain(run_dir: Path, config: RunConfig, plan: list[str], records: list[StageRecord]) -> dict[str, Any]:
    """Judge the chain against its budget, choose for the target, keep the Pareto set, and deploy if asked.

    Writes ``stages/pipeline.json``: each stage's drop against the baseline and whether it stayed within the
    budget (prune is judged after its recovery), the first stage that broke the budget, the choice for
    ``pipeline.target`` (the fastest within budget on its runtimes), the accuracy-latency Pareto set, and the
    bundle when ``deploy`` is a stage.
    """
    from compress.bundle_runner import load_manifest, manifest_digest
    from compress.deploy import TARGETS, chain_budget, choose, deploy, pareto_set

    budget = chain_budget(config.dump())
    target = TARGETS[config.pipeline.target]
    judged, broke = [], None
    for i, stage in enumerate(["baseline", *[s for s in plan if s not in ("quantize", "deploy")]]):
        drop = _stage_drop(records, stage)
        recovered_later = stage == "prune" and "recover" in plan[plan.index("prune"):]
        within = drop is not None and drop <= budget + 1e-9
        judged.append({"stage": stage, "drop_pt": drop, "within_budget": within, "judged": not recovered_later})
        if broke is None and not within and not recovered_later and drop is not None:
            broke = {"stage": stage, "drop_pt": drop}
    if "quantize" in plan:
        marker = read_json(run_dir / "stages" / "quantize.json")
        if broke is None and marker and marker.get("selected") is None:
            broke = {"stage": "quantize", "drop_pt": None}
    try:
        chosen = choose(records, target, max_drop=budget)
        selected = {"record": chosen.record_id, "stage": chosen.stage, "candidate": chosen.candidate or chosen.stage,
                    "runtime": chosen.runtime,
                    "precision": chosen.precision, "top1": chosen.top1, "top1_drop": chosen.top1_drop,
                    "latency_ms_p50": chosen.latency_ms_p50, "batch_size": chosen.batch_size,
                    "artifact": chosen.artifact}
    except InputError as e:
        selected = {"none": str(e)}
    front = pareto_set(records, target)
    summary = {"budget_pt": budget, "target": target.name, "stages": plan, "per_stage": judged, "broke_at": broke,
               "selected": selected, "pareto": front}
    if "deploy" in plan and "none" not in selected:
        bundle = run_dir / f"bundle-{target.name}"
        if not bundle.exists():
            deploy(run_dir, target.name, bundle, max_drop=budget, log=log.info)
        summary["bundle"] = bundle.name
        summary["bundle_digest"] = manifest_digest(load_manifest(bundle))
    if broke is not None:
        log.warning("the chain broke its %.2f pt budget at stage %s (%s)", budget, broke["stage"],
                    "no quantized candidate within what was left" if broke["drop_pt"] is None
                    else f"{broke['drop_pt']:+.2f} pt")
    atomic_write_json(run_dir / "stages" / "pipeline.json", summary)
    return summary


DEFAULT_CALIB_SIZE = 256


def _calibration_set(q, calib_split: Subset, preprocess, *, announce: bool = True):
    """The calibration set the config asks for; raises ``CalibrationError`` when it cannot be had."""
    from calibration.calibrate import from_array, from_split

    shape = (preprocess.in_chans, preprocess.crop_size, preprocess.crop_size)
    if q.calibration_data:
        return from_array(Path(q.calibration_data), q.calib_size or DEFAULT_CALIB_SIZE, shape)
    size = q.calib_size
    if size is None:
        size = min(DEFAULT_CALIB_SIZE, len(calib_split)) or DEFAULT_CALIB_SIZE  # an empty split errors below
        if size < DEFAULT_CALIB_SIZE and announce:
            log.warning("quantize: calibrating on the %d images of the calibration split (fewer than the usual %d; "
                        "raise data.calib_size or add images for steadier INT8 scales)", size, DEFAULT_CALIB_SIZE)
    return from_split(calib_split, size, shape)


def _cannot_run(runtime, fmt: str, precision: str) -> str | None:
    if fmt not in runtime.formats:
        return f"{runtime.name} does not load {fmt} models"
    if precision == "bf16":
        offered = runtime.precisions()
        return None if "bf16" in offered else f"{runtime.name} offers {offered} here, not bf16"
    if precision not in runtime.artifact_precisions:
        return f"{runtime.name} does not run {precision} models"
    return None


def _select(records: list[StageRecord], float_top1: float, max_drop: float, batch: int) -> dict[str, Any] | None:
    """The fastest (candidate, runtime) at ``batch`` whose top-1 on that runtime is within the budget."""
    fits = [r for r in records if r.status == "ok" and r.batch_size == batch and r.top1 is not None
            and (float_top1 - r.top1) * 100 <= max_drop + 1e-9]
    if not fits:
        return None
    best = min(fits, key=lambda r: r.latency_ms_p50)
    return {"candidate": best.candidate, "runtime": best.runtime, "precision": best.precision, "top1": best.top1,
            "latency_ms_p50": best.latency_ms_p50, "batch_size": batch, "artifact": best.artifact}


def _artifact_mb(path: Path) -> float:
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").exists():
        size += path.with_suffix(".bin").stat().st_size
    return size / 2**20


def _measure_stage(
    stage: str, key: str, model: VisionTransformer, ckpt_path: Path, onnx_path: Path, eval_data: Subset,
    latency_input: np.ndarray, reference: EvalResult | None, config: RunConfig, run_dir: Path, dataset: str,
    progress: Progress | None,
) -> tuple[list[StageRecord], EvalResult | None]:
    threads = config.measure.threads or default_threads()
    common = _common_fields(stage, key, model, latency_input, dataset, run_dir, threads)
    records = []
    for name in config.measure.runtimes:
        runtime = get_runtime(name)
        artifact = ckpt_path if runtime.input_kind == "torch" else onnx_path
        for precision in PRECISIONS:
            base = common | {"runtime": name, "precision": precision, "artifact": str(artifact.relative_to(run_dir)),
                             "size_mb": _artifact_mb(artifact), "timestamp": _now(),
                             "env": _runtime_env(common["env"], runtime)}
            if precision not in runtime.precisions():
                reason = f"the {name} runtime offers {runtime.precisions()} here, not {precision}"
                records += [StageRecord(**base, batch_size=b, status="skipped", reason=reason)
                            for b in config.measure.batch_sizes]
                continue
            engine = runtime.build(model if runtime.input_kind == "torch" else onnx_path,
                                   precision=precision, threads=threads)
            stage_records, result = _measure_engine(engine, f"{stage} · {name} {precision}", base, eval_data,
                                                    latency_input, reference, None, config, threads, progress)
            if reference is None:
                reference = result  # the first runtime of the baseline stage (torch fp32 by default)
                stage_records = [replace(r, top1_drop=0.0, agreement=1.0) for r in stage_records]
            records += stage_records
    return records, reference


def _common_fields(stage: str, key: str, model: VisionTransformer, latency_input: np.ndarray, dataset: str,
                   run_dir: Path, threads: int) -> dict[str, Any]:
    """The record fields every runtime's rows of one stage share."""
    return {"stage": stage, "stage_key": key, "params": count_params(model), "structure": model_structure(model),
            "macs": count_macs(model, (1, *latency_input.shape[1:])), "dataset": dataset, "run_id": run_dir.name,
            "env": environment() | {"threads": threads}}


def _tried_records(ctx: StageContext, stage: str, key: str, model: VisionTransformer, latency_input: np.ndarray,
                   dataset: str, run_dir: Path, threads: int, reference: EvalResult | None) -> list[StageRecord]:
    """Records of the settings a stage tried before choosing one (``ctx.records``), in the common schema.

    A stage judges its settings against its own input; in the records, as in every other row, ``top1_drop`` is
    against the baseline's first runtime.
    """
    if not ctx.records:
        return []
    common = _common_fields(stage, key, model, latency_input, dataset, run_dir, threads) | {"timestamp": _now()}
    known = set(StageRecord.__dataclass_fields__)
    rows = []
    for row in ctx.records:
        fields = {k: v for k, v in (common | row).items() if k in known}
        if reference is not None and fields.get("top1") is not None:
            fields["top1_drop"] = round((reference.top1 - fields["top1"]) * 100, 4)
        rows.append(StageRecord(**fields | {"env": _runtime_env(common["env"], get_runtime(row["runtime"]))}))
    return rows


def _runtime_env(env: dict[str, Any], runtime) -> dict[str, Any]:
    return env | {"versions": env["versions"] | runtime.versions()}


def _measure_engine(
    engine, label: str, base: dict[str, Any], eval_data: Subset, latency_input: np.ndarray,
    reference: EvalResult | None, reference_top1: float | None, config: RunConfig, threads: int,
    progress: Progress | None,
) -> tuple[list[StageRecord], EvalResult]:
    """Top-1 on the evaluation split, then latency at every batch size: one record per batch size.

    ``top1_drop`` and ``agreement`` are against ``reference`` (the baseline's first runtime) when there is
    one, else the drop is against ``reference_top1`` and agreement is unknown.
    """
    result = evaluate_top1(engine.run, eval_data, batch_size=config.measure.eval_batch_size,
                           progress=(lambda d, t: progress(label, d, t)) if progress else None)
    against = reference.top1 if reference is not None else reference_top1
    against = result.top1 if against is None else against
    accuracy = {"top1": result.top1, "eval_samples": result.num_samples,
                "top1_drop": round((against - result.top1) * 100, 4),
                "agreement": result.agreement(reference) if reference is not None else None}
    records = []
    for batch in config.measure.batch_sizes:
        stats = measure_latency(engine, latency_input[:batch], threads=threads, warmup=config.measure.warmup,
                                iterations=config.measure.iterations, max_seconds=config.measure.max_seconds)
        records.append(StageRecord(**base, **accuracy, **{k: v for k, v in stats.to_dict().items()
                                                          if k in StageRecord.__dataclass_fields__}))
    log.info("%s: top-1 %.4f, p50 %.2f ms at batch %d", label, result.top1, records[0].latency_ms_p50,
             config.measure.batch_sizes[0])
    return records, result


def _done_stage_keys(run_dir: Path) -> dict[str, str]:
    keys = {}
    for marker in (run_dir / "stages").glob("*.json"):
        key = json.loads(marker.read_text()).get("key")
        if key is not None:  # pipeline.json is the chain's summary, rewritten by every run, not a stage marker
            keys[marker.stem] = key
    return keys


def _reference_top1(records: list[StageRecord], stage: str) -> float:
    ok = [r for r in records if r.stage == stage and r.status == "ok" and r.top1 is not None]
    return ok[0].top1 if ok else 0.0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
