"""The run orchestrator: runs a plan of stages, measuring every model the same way on every runtime.

The plan is data (``compress.run.plan.build_plan``): each ``Stage`` entry takes a PyTorch model, an ONNX file or
the records so far, and returns one ``StageResult`` (``compress.run.context``). After a model stage the
orchestrator saves the model, exports and validates its ONNX, and for every runtime and precision evaluates top-1
on the held-out split and measures latency at each batch size, appending one ``StageRecord`` per (stage, runtime,
precision, batch size) to ``RUN_DIR/records.jsonl`` (rewritten whole, atomically, so the file is always a
complete set of lines). Every stage's own records (settings it tried, quantized candidates) go there too.

Resuming: a stage's outputs are named by a content hash of everything that produced them (the previous
stage's key, the stage's options, the export and measurement settings), and a stage is done when its marker
``stages/<name>.json`` carries that key. Records of a stage that never wrote its marker (an interrupted run)
are dropped before the stage runs again, so none is counted twice. Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.datasets import Subset, make_splits, open_source, stratified_sample
from calibration.evaluate import EvalResult
from compress.config import RunConfig, export_graph
from compress.errors import InputError
from compress.io import (LOCK_NAME, atomic_write, atomic_write_json, atomic_write_text, exclusive, read_json,
                         sha256_json)
from compress.model.checkpoint import (Checkpoint, check_dataset_fits, load_own_checkpoint, match_class_names,
                                       save_checkpoint)
from compress.model.onnx_model import OnnxModel
from compress.records import StageRecord, read_records
from compress.report.markdown import write_markdown_report
from compress.run.context import Progress, RunContext, Stage, StageInput, StageResult, format_seconds, now
from compress.run.measure import (PRECISIONS, Recorder, judge_precision, mark_repeats, measure_float, openvino_parity,
                                  stage_float_rows)
from compress.run.plan import build_plan, check_feasible
from runtimes import default_threads

log = logging.getLogger(__name__)

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
        atomic_write_json(manifest, {"key": key, "inputs": inputs, "created": now()})
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
    ckpt: Checkpoint | OnnxModel, checkpoint_id: str, config: RunConfig, run_dir: Path, *,
    progress: Progress | None = None,
) -> RunResult:
    """Run every stage of ``config``'s plan on ``ckpt`` (a checkpoint, or an ONNX file's ``OnnxModel``) and measure
    it; resume a run of the same inputs in ``run_dir``.

    Under ``torchrun`` rank 0 runs the pipeline and the other ranks only join its fine-tuning
    (``compress.train.distributed``).
    """
    from compress.train import distributed
    from compress.train.loop import serve

    if distributed.init() and not distributed.is_main():
        serve()
        return RunResult(run_dir, [], [])
    try:
        return _run(ckpt, checkpoint_id, config, run_dir, progress)
    finally:
        distributed.release()


def _run(ckpt: Checkpoint | OnnxModel, checkpoint_id: str, config: RunConfig, run_dir: Path,
         progress: Progress | None) -> RunResult:
    """Check everything that can be checked without the run directory, then take it and run the plan."""
    from compress.quantize.stage import calibration_set

    source = open_source(config.data.path)
    check_dataset_fits(ckpt, source)
    splits = make_splits(source, calib_size=config.data.calib_size, eval_fraction=config.data.eval_fraction,
                         seed=config.data.seed)
    if isinstance(ckpt, OnnxModel):
        ckpt = _lift_if_needed(ckpt, config, Subset(source, splits.calib if len(splits.calib) else splits.eval,
                                                    ckpt.preprocess))
    onnx = ckpt if isinstance(ckpt, OnnxModel) else None
    plan = build_plan(config, onnx=onnx)
    if onnx is None:
        check_feasible(ckpt.model, config)
    eval_data = Subset(source, splits.eval[: config.data.eval_limit], ckpt.preprocess)
    calib_data = Subset(source, splits.calib, ckpt.preprocess)
    if len(eval_data) == 0:
        raise InputError(f"dataset {source.name} leaves no images for evaluation; add images or lower data.calib_size")
    q = config.quantize
    if any(s.name == "quantize" for s in plan) and set(q.quantizers) - {"fp16", "bf16", "onnxruntime-dynamic"}:
        calibration_set(q, calib_data, ckpt.preprocess, announce=False)  # fail before any work
    judge = judge_precision(config)  # an explicit bf16 the first runtime cannot run fails here, before any work
    check_run_dir(run_dir)
    probe = calib_data if len(calib_data) else eval_data
    largest = max(config.measure.batch_sizes)
    first = next(eval_data.batches(largest))[0]
    ctx = RunContext(
        config=config, run_dir=run_dir, dataset=source.name, train_data=Subset(source, stratified_sample(
            source, splits.train, config.data.train_limit, seed=config.data.seed), ckpt.preprocess),
        calib_data=calib_data, eval_data=eval_data, teacher=ckpt.model,
        parity_inputs=next(probe.batches(32))[0],  # (<=32, C, H, W) real images
        latency_input=np.concatenate([first] * -(-largest // len(first)))[:largest],  # (B_max, C, H, W)
        threads=config.measure.threads or default_threads(), progress=progress, judge=judge,
    )
    with exclusive(run_dir, what="`compress run`"):  # held to the end: one process per run directory
        if prepare_run_dir(run_dir, {"checkpoint": checkpoint_id, "dataset": source.name, "config": config.dump()}):
            for path in remove_stale_temporaries(run_dir):
                log.info("removed %s, left by an interrupted run", path.relative_to(run_dir))
        match_class_names(ckpt, source)  # labels are read per batch, so the splits drawn above still hold
        atomic_write_json(run_dir / "config.json", config.dump())
        return run_plan(plan, ckpt, checkpoint_id, ctx)


def _lift_if_needed(onnx: OnnxModel, config: RunConfig, images: Subset) -> Checkpoint | OnnxModel:
    """The ViT lifted out of ``onnx`` where a stage needs the PyTorch module (checked on 16 real images), else the
    file as it is. A graph that cannot be lifted stays a file: ``lift_error`` says why, and the plan then runs the
    ONNX-level stages only."""
    from compress.model.onnx_lift import LiftError
    from compress.model.onnx_model import lift_checkpoint
    from compress.run.plan import TORCH_STAGES

    needs = [s for s in config.stage_order() if s in TORCH_STAGES]
    if not needs or onnx.has_qdq:
        return onnx
    try:
        ckpt = lift_checkpoint(onnx.path, config, inputs=next(images.batches(16))[0])
    except LiftError as e:
        onnx.lift_error = str(e)
        return onnx
    log.info("%s: the ViT in it is lifted, so every stage runs on it (%s need the PyTorch module)", onnx.path.name,
             ", ".join(needs))
    return ckpt


@dataclass
class _State:
    """What the stages so far handed on (the loop's only mutable state)."""

    model: Any
    onnx: Path | None
    key: str
    stage: str | None
    reference: EvalResult | None
    records: list[StageRecord]


def run_plan(plan: list[Stage], ckpt: Checkpoint, checkpoint_id: str, ctx: RunContext) -> RunResult:
    """Run ``plan`` in ``ctx.run_dir`` (already prepared and locked), resuming the stages done before."""
    run_dir, config = ctx.run_dir, ctx.config
    records_path = run_dir / "records.jsonl"
    done_keys = _done_stage_keys(run_dir)
    kept = [r for r in read_records(records_path) if done_keys.get(r.stage) == r.stage_key]
    atomic_write_text(records_path, "".join(r.to_json() + "\n" for r in kept))
    state = _State(ckpt.model, ckpt.path if isinstance(ckpt, OnnxModel) else None, checkpoint_id, None, None, kept)
    resumed = []
    for stage in plan:
        key = sha256_json({"prev": state.key, "stage": stage.name, **stage.options,
                           "measure": config.measure.model_dump(), "data": config.data.model_dump(),
                           "dataset": ctx.dataset})[:16]
        if done_keys.get(stage.name) == key and _resume(stage, key, state, ctx):
            resumed.append(stage.name)
            continue
        log.info("stage %s: running", stage.name)
        state_dir = run_dir / "stages" / f"{stage.name}-{key}"
        inp = StageInput(
            key=key, previous=state.stage, model=state.model, onnx=state.onnx, records=tuple(state.records),
            reference=state.reference, budget_left=_budget_left(config, state.records, state.stage),
            state_dir=state_dir, new_record=Recorder.lazy(ctx, stage.name, key, state.model, state.reference),
        )
        started = time.perf_counter()
        result = stage.run(inp, ctx)
        if stage.measured and result.model is not None:
            marker = _finish_model_stage(stage, key, result, ckpt, state, ctx)
        elif stage.measured:
            marker = _finish_onnx_stage(stage, key, result, ckpt, state, ctx)
        else:
            state.records += result.records
            marker = result.notes | {"key": key, "finished": now()}  # the notes never overwrite the key
        marker["seconds"] = round(time.perf_counter() - started, 1)  # the stage's wall time, measuring included
        log.info("stage %s: done in %s", stage.name, format_seconds(marker["seconds"]))
        state.records = mark_repeats(state.records)  # an artifact timed twice with different results: noisy
        atomic_write_text(records_path, "".join(r.to_json() + "\n" for r in state.records))
        atomic_write_json(run_dir / "stages" / f"{stage.name}.json", marker)  # the stage is done once this exists
        if state_dir.exists():  # resumable training state is only needed until the stage is marked done
            shutil.rmtree(state_dir)
        state.key, state.stage = key, stage.name
    # every run says what it chose, judging the stages that ran (an ONNX file no ViT was lifted out of skips some)
    finish_chain(run_dir, config, [s.name for s in plan if s.name != "baseline"], state.records,
                 exported_as=None if isinstance(ckpt, OnnxModel) else export_graph(config))
    write_markdown_report(run_dir, state.records)
    return RunResult(run_dir, state.records, resumed)


def _paths(stage: str, key: str, run_dir: Path) -> tuple[Path, Path]:
    """A model stage's checkpoint and ONNX file."""
    artifacts = run_dir / "artifacts"
    return artifacts / f"{stage}-{key}.safetensors", artifacts / f"{stage}-{key}.onnx"


def _resume(stage: Stage, key: str, state: _State, ctx: RunContext) -> bool:
    """Take the outputs of ``stage`` done in an earlier run into ``state``; False when they are not all there."""
    if not stage.measured:
        log.info("stage %s: done in an earlier run", stage.name)
    else:
        ckpt_path, onnx_path = _paths(stage.name, key, ctx.run_dir)
        ckpt_path = ckpt_path if stage.takes == "torch" else None  # an ONNX stage has its file only
        if not onnx_path.is_file() or (ckpt_path is not None and not ckpt_path.is_file()):
            return False
        log.info("stage %s: done in an earlier run, reusing %s", stage.name, (ckpt_path or onnx_path).name)
        state.model = load_own_checkpoint(ckpt_path).model if ckpt_path is not None else None
        state.onnx = onnx_path
        preds_path = ctx.run_dir / "stages" / f"{stage.name}-{key}.reference.npy"
        if preds_path.exists():
            saved = np.load(preds_path)
            predictions, correct = (saved[0], saved[1].astype(bool)) if saved.ndim == 2 else (saved, None)
            state.reference = EvalResult(_reference_top1(state.records, stage.name), predictions,
                                         len(ctx.eval_data), correct)
    state.key, state.stage = key, stage.name
    return True


def _finish_model_stage(stage: Stage, key: str, result: StageResult, ckpt: Checkpoint, state: _State,
                        ctx: RunContext) -> dict[str, Any]:
    """Save, export, check and measure a model stage's output; hand it on in ``state``; return its marker."""
    config, run_dir = ctx.config, ctx.run_dir
    model = result.model
    if model is None:
        raise AssertionError(f"model stage {stage.name} returned no model")
    ckpt_path, onnx_path = _paths(stage.name, key, run_dir)
    save_checkpoint(Checkpoint(model, ckpt.preprocess, ckpt.classes), ckpt_path)
    export = ctx.export(model, onnx_path, ctx.parity_inputs)
    if model.token_reduction is not None and "openvino" in config.measure.runtimes:
        openvino_parity(onnx_path, model, ctx.parity_inputs, atol=config.export.atol_for(model), threads=ctx.threads)
    _measure_into(state, stage, key, result, model, ckpt_path, onnx_path, ctx)
    state.model, state.onnx = model, onnx_path
    return {"key": key, "checkpoint": ckpt_path.name, "onnx": onnx_path.name, "finished": now(),
            "export": {"opset": export.opset, "nodes_exported": export.nodes_exported,
                       "nodes_final": export.nodes_final, "parity_max_abs_diff": export.parity.max_abs_diff,
                       "parity_agreement": export.parity.agreement, "parity_samples": export.parity.num_samples},
            "notes": result.notes}


def _finish_onnx_stage(stage: Stage, key: str, result: StageResult, source: OnnxModel, state: _State,
                       ctx: RunContext) -> dict[str, Any]:
    """Measure the float ONNX file an ONNX stage returned (a run of an ONNX file: its baseline); return its marker.
    The marker carries the file's preprocessing and classes, which a checkpoint's metadata holds otherwise."""
    onnx_path = result.artifact
    if onnx_path is None:
        raise AssertionError(f"ONNX stage {stage.name} returned no file")
    precisions = ("int8",) if source.has_qdq else None
    _measure_into(state, stage, key, result, None, None, onnx_path, ctx, precisions=precisions)
    state.model, state.onnx = None, onnx_path
    return {"key": key, "onnx": onnx_path.name, "finished": now(), "metadata": source.metadata(),
            "notes": result.notes}


def _measure_into(state: _State, stage: Stage, key: str, result: StageResult, model, ckpt_path: Path | None,
                  onnx_path: Path, ctx: RunContext, precisions: tuple[str, ...] | None = None) -> None:
    """Measure a stage's float output on every runtime and add its records (the settings it tried first) to
    ``state``; the first measurement of the run becomes the reference, saved for resuming."""
    had_reference = state.reference is not None
    recorder = Recorder.for_stage(ctx, stage.name, key, model, state.reference)
    measured, state.reference = measure_float(stage.name, model, ckpt_path, onnx_path, recorder, ctx,
                                              precisions=precisions, scored=result.scored)
    if state.reference is not None and not had_reference:  # this stage set the reference: keep it for resuming
        buffer = io.BytesIO()
        ref = state.reference  # (2, N): predictions, and whether each was right (for paired drop intervals)
        np.save(buffer, np.stack([ref.predictions, ref.correct.astype(np.int64)]) if ref.correct is not None
                else ref.predictions)
        preds_path = ctx.run_dir / "stages" / f"{stage.name}-{key}.reference.npy"
        atomic_write(preds_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    state.records += result.records + measured  # the settings it tried, then what it chose


def _stage_drop(records: list[StageRecord], stage: str | None) -> float | None:
    """Top-1 points ``stage``'s float model lost against the baseline: as scored in full (not estimated from a
    sample) in the precision the run judges in, on ONNX Runtime when it was measured there in full."""
    rows = [r for r in stage_float_rows(records, stage) if r.top1_drop is not None]
    return rows[0].top1_drop if rows else None


def _budget_left(config: RunConfig, records: list[StageRecord], prev_stage: str | None) -> float | None:
    """What ``pipeline.max_drop`` leaves after the stages up to ``prev_stage``; None without a chain budget."""
    budget = config.pipeline.max_drop
    if budget is None:
        return None
    spent = _stage_drop(records, prev_stage) if prev_stage else 0.0
    return round(budget - max(0.0, spent or 0.0), 6)  # 1.0 - 0.7 is 0.30000000000000004 in binary


def finish_chain(run_dir: Path, config: RunConfig, plan: list[str], records: list[StageRecord], *,
                 exported_as: str | None = None) -> dict[str, Any]:
    """Judge the chain against its budget, choose for the target, keep the Pareto set, name the bundle.

    Writes ``stages/pipeline.json``: each stage's drop against the baseline and whether it stayed within the
    budget (prune is judged after its recovery), the first stage that broke the budget, the choice for
    ``pipeline.target`` (the fastest within budget on its runtimes), the accuracy-latency Pareto set, the
    bundle the deploy stage packed, and ``exported_as``: the graph form of the run's exports (None: it exported
    none, an ONNX file no ViT was lifted out of).
    """
    from compress.deploy.bundle import TARGETS, chain_budget, choose, pareto_set, retimed_in_run, timing_key

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
    retimed = retimed_in_run(run_dir, target, budget) if "deploy" in plan else None  # near-ties, timed again
    try:
        chosen = choose(records, target, max_drop=budget, retimed=retimed)
        selected = {"record": chosen.record_id, "stage": chosen.stage, "candidate": chosen.candidate or chosen.stage,
                    "runtime": chosen.runtime,
                    "precision": chosen.precision, "top1": chosen.top1, "top1_drop": chosen.top1_drop,
                    "latency_ms_p50": chosen.latency_ms_p50, "batch_size": chosen.batch_size,
                    "artifact": chosen.artifact, "top1_drop_ci95": chosen.top1_drop_ci95,
                    "eval_samples": chosen.eval_samples}
        if retimed and timing_key(chosen) in retimed:
            selected["latency_ms_p50_interleaved"] = retimed[timing_key(chosen)]
    except InputError as e:
        selected = {"none": str(e)}
    unsure = budget_unsure(selected, budget)
    front = pareto_set(records, target)
    seconds = {}
    for stage in ["baseline", *plan]:
        try:
            marker = read_json(run_dir / "stages" / f"{stage}.json")
        except (ValueError, OSError):
            marker = {}
        if isinstance(marker, dict) and isinstance(marker.get("seconds"), (int, float)):
            seconds[stage] = marker["seconds"]
    # the float precision the baseline was scored in full in: every drop is against the model as loaded run in it
    judged_in = next((r.precision for r in records if r.stage == "baseline" and r.status == "ok"
                      and r.precision in PRECISIONS and r.scored_in_full and r.top1_drop == 0), None)
    summary = {"budget_pt": budget, "target": target.name, "stages": plan, "per_stage": judged, "broke_at": broke,
               "selected": selected, "pareto": front, "stage_seconds": seconds, "judged_in": judged_in,
               "exported_as": exported_as}
    if unsure:
        summary["budget_unsure"] = unsure
        log.warning("%s", unsure)
    packed = read_json(run_dir / "stages" / "deploy.json") if "deploy" in plan else {}
    if packed.get("bundle"):  # the deploy stage packed the same choice, by the same rule
        summary["bundle"], summary["bundle_digest"] = packed["bundle"], packed.get("bundle_digest")
    if broke is not None:
        log.warning("the chain broke its %.2f pt budget at stage %s (%s)", budget, broke["stage"],
                    "no quantized candidate within what was left" if broke["drop_pt"] is None
                    else f"{broke['drop_pt']:+.2f} pt")
    atomic_write_json(run_dir / "stages" / "pipeline.json", summary)
    return summary


def budget_unsure(selected: dict[str, Any], budget: float) -> str | None:
    """A sentence when the chosen engine is within ``budget`` on its point estimate but the 95% interval of its drop
    reaches past it; None when the interval is within the budget too, or there is no choice or no interval.

    A chain keeps the deepest setting whose estimated drop fits, so the settings it keeps are those whose estimate
    came out low: on the reference ViT-S, three training-free runs judged on 1,000 images under-reported the drop on
    the whole 10,000-image split by 0.45, 0.53 and 1.20 pt (BENCHMARKS.md). The interval is what says how far the
    estimate can be trusted."""
    ci = selected.get("top1_drop_ci95")
    drop = selected.get("top1_drop")
    if "none" in selected or not ci or drop is None or ci[1] <= budget + 1e-9:
        return None
    images = f" on {selected['eval_samples']:,} images" if selected.get("eval_samples") else ""
    return (f"the chosen engine's drop {drop:+.2f} pt is within the {budget:g} pt budget{images}, but its 95% interval "
            f"reaches {ci[1]:+.2f} pt: the budget may not hold beyond these images; score on more "
            "(data.eval_limit, or a larger evaluation split) to be sure")


def _done_stage_keys(run_dir: Path) -> dict[str, str]:
    """The key each stage's marker carries; a marker that cannot be read counts as not done (the stage reruns)."""
    keys = {}
    for marker in (run_dir / "stages").glob("*.json"):
        try:
            key = json.loads(marker.read_text()).get("key")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            log.warning("stage marker %s is damaged; that stage runs again", marker.name)
            continue
        if isinstance(key, str):  # pipeline.json is the chain's summary, rewritten by every run, not a stage marker
            keys[marker.stem] = key
    return keys


def _reference_top1(records: list[StageRecord], stage: str) -> float:
    ok = [r for r in records if r.stage == stage and r.status == "ok" and r.top1 is not None]
    return ok[0].top1 if ok else 0.0
