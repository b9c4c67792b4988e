"""The quantize stage: run the configured quantizers, fit each candidate to the accuracy budget, measure it.

``build_candidates`` runs the quantizers on the previous stage's float ONNX file; ``quantize_stage`` is the run's
plan entry, which measures every candidate on every runtime that can load it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from compress.quantize.base import Candidate, QuantizeContext
from compress.quantize.fp16 import convert_fp16
from compress.run.context import RunContext, StageInput, StageResult

log = logging.getLogger(__name__)


def build_candidates(
    ctx: QuantizeContext, quantizers: list[str], *, evaluate_torch: Callable[[object], float],
    eval_batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], eval_count: int, bf16_available: bool,
    fp16_keep_float32: list[str] | None = None,
) -> tuple[list[Candidate], list[str]]:
    """(candidates within or outside the budget, one line per quantizer that yielded none and why)."""
    candidates: list[Candidate] = []
    missed: list[str] = []
    ranking = None

    def add(name: str, candidate: Candidate | None) -> None:
        if candidate is None:
            missed.append(f"{name}: no candidate within the {ctx.max_drop:.2f} pt budget, even with layers in float")
        else:
            candidates.append(candidate)

    for name in quantizers:
        if name == "onnxruntime-static":
            from compress.quantize.onnxruntime_ptq import quantize_static_qdq

            candidate, ranking = quantize_static_qdq(ctx)
            add(name, candidate)
        elif name == "onnxruntime-dynamic":
            from compress.quantize.onnxruntime_ptq import quantize_dynamic_int8

            add(name, quantize_dynamic_int8(ctx, ranking))
        elif name == "nncf":
            from compress.quantize.openvino_nncf import quantize_openvino

            if ctx.nncf_accuracy_control:
                add(name, quantize_openvino(ctx, eval_batches, eval_count))
            elif not ctx.within_budget((candidate := quantize_openvino(ctx)).top1):
                missed.append(f"{name}: nncf.quantize's top-1 {candidate.top1 * 100:.2f}% is a drop of "
                              f"{ctx.drop(candidate.top1):.2f} pt, over the {ctx.max_drop:.2f} pt budget, and its "
                              "accuracy control is off (quantize.nncf_accuracy_control=false)")
            else:
                candidates.append(candidate)
        elif name == "neural-compressor":
            if ctx.model is None:
                missed.append("neural-compressor: it quantizes the PyTorch module, and this run has an ONNX file "
                              "only; the ONNX quantizers ran instead")
                continue
            from compress.quantize.neural_compressor_pt2e import quantize_pt2e

            add(name, quantize_pt2e(ctx, evaluate_torch))
        elif name == "fp16":
            add(name, convert_fp16(ctx, fp16_keep_float32))
        elif name == "bf16":
            if not bf16_available:
                missed.append("bf16: OpenVINO offers no BF16 on this CPU (it needs AVX-512 BF16 or AMX)")
                continue
            top1 = ctx.evaluate(ctx.float_onnx, "onnx", "bf16")
            ctx.log(f"bf16: top-1 {top1 * 100:.2f} (drop {ctx.drop(top1):+.2f} pt)")
            candidates.append(Candidate("ov-bf16", "openvino INFERENCE_PRECISION_HINT=bf16", "bf16",
                                        ctx.float_onnx, "onnx", None, (), top1))
    missed += [f"{c.name}: top-1 drop {ctx.drop(c.top1):.2f} pt exceeds the {ctx.max_drop:.2f} pt budget"
               for c in candidates if not ctx.within_budget(c.top1)]
    return candidates, missed


# ------------------------------------------------------------------------------------------- the run's stage
DEFAULT_CALIB_SIZE = 256


def calibration_set(q, calib_split, preprocess, *, announce: bool = True):
    """The calibration set ``quantize.*`` asks for; raises ``CalibrationError`` when it cannot be had."""
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


def quantize_stage(inp: StageInput, ctx: RunContext) -> StageResult:
    """Make every configured quantized candidate, fit each to the budget, measure each on every runtime.

    The budget is what the chain's budget (``pipeline.max_drop``) left, else ``quantize.max_drop``, in points of
    top-1 against the previous stage's float model on ONNX Runtime. The stage's pick is the fastest (candidate,
    runtime) at the smallest batch size within budget; when none is, the stage says so and the float model
    stays the pipeline's output.
    """
    import torch

    from calibration.evaluate import evaluate_top1
    from compress.quantize.base import ScoredFiles, artifact_evaluator
    from compress.run.measure import artifact_mb, cannot_run, mark_repeats, measure_engine, skipped
    from runtimes import get_runtime

    config = ctx.config
    q = config.quantize
    max_drop = q.max_drop if inp.budget_left is None else max(0.0, inp.budget_left)
    workdir = ctx.run_dir / "artifacts" / f"quantize-{inp.key}"
    workdir.mkdir(parents=True, exist_ok=True)
    calib = calibration_set(q, ctx.calib_data, ctx.preprocess)
    scored = ScoredFiles()  # each candidate as it was scored while fitting: measured below without scoring again
    evaluate = artifact_evaluator(ctx.eval_data, threads=ctx.threads, batch_size=config.measure.eval_batch_size,
                                  scored=scored)

    def evaluate_torch(module) -> float:
        torch.set_num_threads(ctx.threads)
        with torch.no_grad():
            return evaluate_top1(lambda x: module(torch.from_numpy(x)).numpy(), ctx.eval_data,
                                 batch_size=config.measure.eval_batch_size).top1

    float_top1 = stage_float_top1(inp.records, inp.previous)
    if float_top1 is None:
        float_top1 = evaluate(inp.onnx, "onnx", ctx.judge)
    qctx = QuantizeContext(
        model=inp.model, float_onnx=inp.onnx, calib=calib, evaluate=evaluate, reference_top1=float_top1,
        max_drop=max_drop, workdir=workdir, max_float_fraction=q.max_float_fraction, op_types=tuple(q.op_types),
        exclude=tuple(q.exclude), attention_matmul=q.attention_matmul, activations=q.activations,
        calibration_method=q.calibration_method, sensitivity_samples=q.sensitivity_samples,
        inc_max_trials=q.inc_max_trials, smoothquant_alpha=q.smoothquant_alpha,
        nncf_smooth_quant=q.nncf_smooth_quant, nncf_ac_max_iterations=q.nncf_ac_max_iterations,
        nncf_accuracy_control=q.nncf_accuracy_control,
        threads=ctx.threads, log=log.info,
    )
    log.info("stage quantize: %s on %d calibration images, budget %.2f pt against top-1 %.2f of %s",
             ", ".join(q.quantizers), calib.size, max_drop, float_top1 * 100, inp.previous)
    openvino_bf16 = "openvino" in config.measure.runtimes and "bf16" in get_runtime("openvino").precisions()
    candidates, missed = build_candidates(
        qctx, list(q.quantizers), evaluate_torch=evaluate_torch,
        eval_batches=lambda: ctx.eval_data.batches(config.measure.eval_batch_size), eval_count=len(ctx.eval_data),
        bf16_available=openvino_bf16, fp16_keep_float32=list(q.fp16_keep_float32),
    )
    for line in missed:
        log.warning("quantize: %s", line)

    records = []
    for candidate in candidates:
        fields = {"candidate": candidate.name, "quantizer": candidate.quantizer, "precision": candidate.precision,
                  "calibration": candidate.calibration, "float_layers": list(candidate.float_layers),
                  "artifact": str(candidate.path.relative_to(ctx.run_dir)), "size_mb": artifact_mb(candidate.path)}
        full = None  # the candidate scored in full on its first runtime; the others are checked on a sample
        for name in config.measure.runtimes:
            runtime = get_runtime(name)
            reason = cannot_run(runtime, candidate.format, candidate.precision)
            engine = None
            if reason is None:
                try:
                    engine = runtime.build(candidate.path, precision=candidate.precision, threads=ctx.threads)
                except (TypeError, AttributeError, NameError):
                    raise  # our bug, not the runtime's verdict on the model
                except Exception as e:  # a runtime rejecting an op of this candidate: recorded, not fatal
                    reason = f"{name} could not load {candidate.name}: {str(e).strip().splitlines()[0][:200]}"
            if engine is None:
                records += skipped(inp.new_record, ctx, runtime=name, reason=reason, **fields)
                continue
            rows, _, full = measure_engine(engine, f"quantize · {candidate.name} · {name}", inp.new_record, ctx,
                                           runtime=name, reference_top1=float_top1, full=full,
                                           given=scored.get(candidate.path, name, candidate.precision), **fields)
            records += rows
    batch = min(config.measure.batch_sizes)

    retimed: dict[tuple, str] = {}  # (artifact, runtime, precision): the verdict after re-timing

    def retime(rows) -> list[float]:  # close or noisy contenders, timed again interleaved from their files
        from runtimes.noise import interleaved

        engines = {i: ctx.engine(ctx.run_dir / r.artifact, r.runtime, r.precision) for i, r in enumerate(rows)}
        verdicts: dict[int, str] = {}
        medians = interleaved(engines, ctx.latency_input[:batch], threads=ctx.threads, verdicts=verdicts)
        retimed.update({(r.artifact, r.runtime, r.precision): verdicts[i] for i, r in enumerate(rows)})
        return [medians[i] for i in range(len(rows))]

    # an engine timed earlier in the run (the float model under BF16, say) and now again, with other results, is
    # noisy here already, so that it is timed again before anything is chosen from it
    records = mark_repeats(list(inp.records) + records)[len(inp.records):]
    selected = fastest_within(records, float_top1, max_drop, batch, retime=retime)
    records = [dataclasses.replace(r, latency_verdict=retimed[(r.artifact, r.runtime, r.precision)])
               if r.batch_size == batch and (r.artifact, r.runtime, r.precision) in retimed else r for r in records]
    if selected is None:
        log.warning("quantize: no candidate meets the %.2f pt budget; the float model of stage %s is carried "
                    "forward", max_drop, inp.previous)
    notes = {
        "reference_top1": float_top1, "max_drop": max_drop, "selected": selected, "missed": missed,
        "candidates": [{"name": c.name, "quantizer": c.quantizer, "precision": c.precision,
                        "artifact": str(c.path.relative_to(ctx.run_dir)), "top1_while_fitting": c.top1,
                        "calibration": c.calibration, "float_layers": list(c.float_layers),
                        "sensitivity": [[n, v] for n, v in (c.extra.get("sensitivity") or {}).items()]}
                       for c in candidates],
    }
    return StageResult(notes=notes, records=records)


def stage_float_top1(records, stage: str | None) -> float | None:
    """Top-1 of ``stage``'s float model as that stage scored it in full, in the float precision the run judges in
    (``measure.judge_precision``): on ONNX Runtime where it was (the other runtimes ran the same, parity-checked
    model on the same images). Only the stage's own model (``candidate`` None) counts, not a setting it tried on
    the way, such as the tokens stage's unreduced one."""
    from compress.run.measure import stage_float_rows

    scored = [r for r in stage_float_rows(records, stage) if r.scored_in_full]
    return scored[0].top1 if scored else None


def fastest_within(records, float_top1: float, max_drop: float, batch: int, *, retime=None) -> dict | None:
    """The fastest (candidate, runtime) at ``batch`` whose top-1 on that runtime is within the budget.

    ``retime(rows) -> medians`` times again, interleaved, the ones within ``runtimes.noise.CLOSE`` of the fastest
    and any whose own timing was noisy: their single measurements, minutes apart on a shared machine, cannot tell
    them apart.
    """
    from runtimes.noise import is_noisy, too_close_to_call

    fits = [r for r in records if r.status == "ok" and r.batch_size == batch and r.top1 is not None
            and (float_top1 - r.top1) * 100 <= max_drop + 1e-9]
    if not fits:
        return None
    best = min(fits, key=lambda r: r.latency_ms_p50)
    close = [r for r in too_close_to_call(fits, lambda r: r.latency_ms_p50, lambda r: is_noisy(r.latency_verdict))
             if r.artifact]
    interleaved = None
    if retime is not None and len(close) > 1:
        medians = retime(close)
        best, interleaved = min(zip(close, medians), key=lambda pair: pair[1])
        log.info("quantize: %s timed again interleaved (p50 %s ms): %s on %s is the fastest",
                 ", ".join(f"{r.candidate}/{r.runtime}" for r in close), " / ".join(f"{m:.3f}" for m in medians),
                 best.candidate, best.runtime)
    return {"candidate": best.candidate, "runtime": best.runtime, "precision": best.precision, "top1": best.top1,
            "latency_ms_p50": best.latency_ms_p50, "batch_size": batch, "artifact": best.artifact,
            **({"latency_ms_p50_interleaved": round(interleaved, 4)} if interleaved is not None else {})}
