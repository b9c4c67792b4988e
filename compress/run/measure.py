"""Measuring a model the same way for every stage: top-1 on the evaluation split, then latency at every batch size.

Every row becomes a ``StageRecord``; the fields every row of one stage shares (its key, the model's parameters,
MACs and structure, the environment) come from one ``Recorder``, so a stage never spells a record field by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.evaluate import EvalResult, evaluate_top1, paired_drop
from compress.env import environment
from compress.records import StageRecord
from compress.run.context import RunContext, StageInput, now

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")  # what every float stage is measured in, where the runtime offers it


def judge_precision(config) -> str:
    """``measure.judge_precision`` resolved on this machine: the float precision float models are judged in
    (scored on the whole split). "auto" is bf16 where the first of ``measure.runtimes`` runs bf16 natively (its
    own default float precision is bf16: OpenVINO on a CPU with AVX-512 BF16 or AMX), else fp32. An explicit bf16
    that runtime cannot run is a ``ConfigError`` before any work."""
    from compress.errors import ConfigError
    from runtimes import RuntimeUnavailableError, get_runtime

    m = config.measure
    if m.judge_precision == "fp32":
        return "fp32"
    first = m.runtimes[0]
    try:
        runtime = get_runtime(first)
    except RuntimeUnavailableError:  # the run names the runtime missing itself, where it measures
        return "fp32"
    if m.judge_precision == "auto":
        return "bf16" if getattr(runtime, "default_float", None) == "bf16" else "fp32"
    if "bf16" not in runtime.precisions():
        raise ConfigError(f"measure.judge_precision=bf16, but {first} (the first of measure.runtimes) offers "
                          f"{runtime.precisions()} here; use auto (bf16 where it runs natively) or fp32")
    return "bf16"


def float_order(judge: str, precisions: tuple[str, ...] = PRECISIONS) -> tuple[str, ...]:
    """``precisions`` with the one float models are judged in first: the first a runtime runs is scored in full."""
    return (judge, *[p for p in precisions if p != judge]) if judge in precisions else precisions


@dataclass(frozen=True)
class Recorder:
    """Makes the records of one stage: its common fields, and each top-1 drop against the baseline."""

    common: dict[str, Any]
    reference: EvalResult | None

    @classmethod
    def for_stage(cls, ctx: RunContext, stage: str, key: str, model, reference: EvalResult | None) -> Recorder:
        from compress.model.macs import count_macs, count_params

        fields = {"stage": stage, "stage_key": key, "dataset": ctx.dataset, "run_id": ctx.run_dir.name,
                  "env": environment() | {"threads": ctx.threads}}
        if model is not None:
            fields |= {"params": count_params(model), "structure": model_structure(model),
                       "macs": count_macs(model, (1, *ctx.input_shape))}
        return cls(fields, reference)

    @classmethod
    def lazy(cls, ctx: RunContext, stage: str, key: str, model, reference: EvalResult | None) -> LazyRecorder:
        """``for_stage``'s recorder, built on its first record: most stages never make one themselves, and its
        common fields cost a forward pass (MACs) of the stage's input model."""
        return LazyRecorder(lambda: cls.for_stage(ctx, stage, key, model, reference), reference)

    def __call__(self, *, runtime: str, **fields: Any) -> StageRecord:
        """A record of this stage on ``runtime``; unknown field names raise ``TypeError``.

        ``structure``, ``macs`` and ``params`` given here describe the measured model when it is not the stage's
        output (a setting the stage tried); ``top1_drop`` is recomputed against the baseline when top-1 is known.
        """
        row = self.common | {"timestamp": now()} | fields | {"runtime": runtime, "env": runtime_env(self.common["env"],
                                                                                                    runtime)}
        if self.reference is not None and row.get("top1") is not None and "top1_drop" not in fields:
            row["top1_drop"] = round((self.reference.top1 - row["top1"]) * 100, 4)
        return StageRecord(**row)


class LazyRecorder:
    """A ``Recorder`` made when the first record is (``Recorder.lazy``); used wherever a recorder is."""

    def __init__(self, build: Callable[[], Recorder], reference: EvalResult | None) -> None:
        self._build, self._made, self.reference = build, None, reference

    def __call__(self, **fields: Any) -> StageRecord:
        if self._made is None:
            self._made = self._build()
        return self._made(**fields)


def runtime_env(env: dict[str, Any], runtime: str) -> dict[str, Any]:
    from runtimes import get_runtime

    return env | {"versions": env.get("versions", {}) | get_runtime(runtime).versions()}


def artifact_mb(path: Path) -> float:
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").exists():
        size += path.with_suffix(".bin").stat().st_size
    return size / 2**20


def cannot_run(runtime, fmt: str, precision: str) -> str | None:
    """Why ``runtime`` cannot run a ``fmt`` model at ``precision``; None when it can."""
    if fmt not in runtime.formats:
        return f"{runtime.name} does not load {fmt} models"
    if precision == "bf16":
        offered = runtime.precisions()
        return None if "bf16" in offered else f"{runtime.name} offers {offered} here, not bf16"
    if precision not in runtime.artifact_precisions:
        return f"{runtime.name} does not run {precision} models"
    return None


@dataclass(frozen=True)
class FullScore:
    """A model's top-1 from one engine that scored the whole evaluation split (or stopped early, over budget):
    the other runtimes and precisions measuring the same model in the stage are checked against it on a sample."""

    runtime: str
    precision: str
    result: EvalResult
    accuracy: dict[str, Any]  # the record fields: top1, top1_drop, top1_drop_ci95


def measure_engine(engine, label: str, record: Recorder | LazyRecorder, ctx: RunContext, *, runtime: str,
                   reference_top1: float | None = None, full: FullScore | None = None,
                   given: EvalResult | None = None, **fields: Any
                   ) -> tuple[list[StageRecord], EvalResult, FullScore | None]:
    """Top-1 on the evaluation split, then latency at every batch size: one record per batch size.

    ``top1_drop`` and ``agreement`` are against the recorder's reference (the baseline's first runtime) when
    there is one, else the drop is against ``reference_top1`` and agreement is unknown. With ``full``, the same
    model as scored in full by another engine, this one scores a sample only (``measure.agreement_sample``) and
    its top-1 is estimated from it (``sampled_accuracy``). ``given`` is this engine's predictions on the whole
    split as the stage already made them (``StageResult.scored``): taken instead of scoring again. Returns the
    records, the predictions made, and the full score to check the next engine against (``full`` itself, or this
    engine's when it scored in full).
    """
    m = ctx.config.measure
    accuracy, result = score(engine, label, record.reference, ctx, reference_top1=reference_top1, full=full,
                             given=given, precision=fields.get("precision"))
    if accuracy.get("sampled_against") is None:
        full = full or FullScore(runtime, fields.get("precision", "?"), result,
                                 {k: accuracy.get(k) for k in ("top1", "top1_drop", "top1_drop_ci95")})
    records = []
    for batch in m.batch_sizes:
        stats = ctx.time(engine, ctx.latency_input[:batch])
        kept_float = {d.get("name") for d in fields.get("float_layers") or []}  # the quantizer's choice, not a loss
        profile = layer_profile(engine, ctx.latency_input[:batch], label, int8=fields.get("precision") == "int8",
                                kept_float=kept_float) if m.profile and batch == m.batch_sizes[0] else None
        records.append(record(runtime=runtime, **fields, **accuracy, **timing_fields(stats),
                              **({"profile": profile} if profile else {})))
    log.info("%s: top-1 %.4f%s, p50 %.2f ms at batch %d", label, accuracy["top1"],
             " (estimated from a sample)" if accuracy.get("sampled_against") else "", records[0].latency_ms_p50,
             m.batch_sizes[0])
    return records, result, full


def score(engine, label: str, reference: EvalResult | None, ctx: RunContext, *, reference_top1: float | None = None,
          full: FullScore | None = None, given: EvalResult | None = None, precision: str | None = None
          ) -> tuple[dict[str, Any], EvalResult]:
    """The accuracy fields of a record for ``engine`` (in ``precision``), and its predictions: ``given`` when it
    covers the whole split (the same engine's, scored by the stage), else on a sample when ``full`` is given and
    the engine agrees with it there (``measure.sample_min_agreement``), else on the whole split (stopping early
    once the drop is over the chain's budget with confidence).

    Agreement is the test against a full score in the same float precision: there, disagreement means a runtime
    computes something else. FP32 checked against a run judged in BF16 is another matter: rounding alone flips
    answers, most where tokens merge (on the reference ViT-S, FP32 and BF16 on OpenVINO agreed on
    99.7% of 300 images as loaded, 97.7% after pruning and ToMe: bench/judge_precision.py), so the sample's estimate
    stands with its widened interval rather than a second full scoring of the split at FP32's cost. (BF16 checked
    against an FP32 full score is still scored in full when it disagrees: that costs a quarter as much.)"""
    m = ctx.config.measure
    total = len(ctx.eval_data)
    say = (lambda d, t: ctx.say(label, d, t)) if ctx.progress else None
    whole = given is not None and given.num_samples == total and given.correct is not None
    result = given if whole else None
    if result is not None:
        log.info("%s: top-1 as its stage scored it on the same file, all %d images: not scored again", label, total)
    elif full is not None and 0 < m.agreement_sample < total and full.result.correct is not None:
        n = min(m.agreement_sample, full.result.num_samples)
        sample = evaluate_top1(engine.run, ctx.eval_data.head(n), batch_size=m.eval_batch_size, progress=say)
        agree = float(np.mean(sample.predictions == full.result.predictions[:n]))
        rounding = precision == "fp32" and full.precision == "bf16"  # a run judged in BF16, FP32 checked
        if agree >= m.sample_min_agreement or rounding:
            if agree < m.sample_min_agreement:
                log.info("%s: agrees with %s %s on %.1f%% of %d images: rounding between precisions, so the sample's "
                         "estimate stands (its interval widened by the difference)", label, full.runtime,
                         full.precision, agree * 100, n)
            return sampled_accuracy(full, sample, reference, total, agree), sample
        log.info("%s: agrees with %s %s on %.1f%% of %d images, under measure.sample_min_agreement=%.2f: scored on "
                 "the whole split", label, full.runtime, full.precision, agree * 100, n, m.sample_min_agreement)
    if result is None:
        result = evaluate_top1(engine.run, ctx.eval_data, batch_size=m.eval_batch_size, progress=say,
                               reference=reference, stop_above=ctx.config.pipeline.max_drop)
    against = reference.top1 if reference is not None else reference_top1
    against = result.top1 if against is None else against
    accuracy = {"top1": result.top1, "eval_samples": result.num_samples, "eval_total": result.total,
                "top1_drop": round((against - result.top1) * 100, 4),
                "agreement": result.agreement(reference) if reference is not None else None}
    paired = paired_drop(reference, result) if reference is not None else None
    if paired is not None:
        # the drop on the images both scored, with its paired interval: equal to the drop above on a whole split
        accuracy |= {"top1_drop": round(paired[0], 4), "top1_drop_ci95": [round(paired[1], 4), round(paired[2], 4)]}
    if result.stopped_early:
        log.info("%s: scoring stopped after %d of %d images: top-1 drop %+.2f pt, above the %.2f pt budget with 95%% "
                 "confidence", label, result.num_samples, result.total, accuracy["top1_drop"],
                 ctx.config.pipeline.max_drop)
    return accuracy, result


def sampled_accuracy(full: FullScore, sample: EvalResult, reference: EvalResult | None, total: int,
                     agree: float, max_listed: int = 20) -> dict[str, Any]:
    """A record's accuracy fields from a sample: the fully scored top-1 moved by the paired difference between the
    two engines on the sample's images. The drop's interval is the full score's widened by the difference's own
    interval (adding the half-widths: conservative). ``sampled_against`` says what it was compared with."""
    n = sample.num_samples
    head = EvalResult(full.result.top1, full.result.predictions[:n], n, full.result.correct[:n])
    diff, low, high = paired_drop(head, sample) or (0.0, 0.0, 0.0)  # points this engine lost against the full one
    if high - low == 0:  # no image scored differently: the normal interval collapses to a point, which the rest
        low, high = diff - 300 / n, diff + 300 / n  # of the split can still contradict; the rule of three bounds it
    disagree = np.flatnonzero(sample.predictions != head.predictions)
    accuracy = {"top1": min(1.0, max(0.0, full.accuracy["top1"] - diff / 100)), "eval_samples": n,
                "eval_total": total, "agreement": sample.agreement(reference) if reference is not None else None,
                "sampled_against": {"runtime": full.runtime, "precision": full.precision, "images": n,
                                    "agreement": round(agree, 4), "top1_diff_ci95": [round(low, 4), round(high, 4)],
                                    "disagree": [int(i) for i in disagree[:max_listed]]}}
    if full.accuracy.get("top1_drop") is not None:
        accuracy["top1_drop"] = round(full.accuracy["top1_drop"] + diff, 4)
    ci = full.accuracy.get("top1_drop_ci95")
    if ci is None and reference is full.result:  # the full score is the reference: its drop is 0 exactly
        ci = [0.0, 0.0]
    if ci is not None:
        accuracy["top1_drop_ci95"] = [round(ci[0] + low, 4), round(ci[1] + high, 4)]
    return accuracy


def layer_profile(engine, x: np.ndarray, label: str, *, int8: bool, kept_float: set[str] = frozenset()
                  ) -> dict[str, Any] | None:
    """Where ``engine``'s time goes at the batch of ``x`` (``runtimes.profile``), for the runtimes that say; the
    linear layers of an INT8 model that did not execute in INT8 (and that its quantizer did not keep in float on
    purpose, ``kept_float``) are named in the log too."""
    from runtimes.profile import summarize

    if not hasattr(engine, "profile"):
        return None
    try:
        profile = summarize(engine.profile(x), int8_expected=int8)
    except Exception as e:  # a profiler that fails costs the profile, never the measurement
        log.warning("%s: no per-layer profile (%s)", label, str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
        return None
    if "not_int8" in profile:
        profile["not_int8"] = [n for n in profile["not_int8"] if n not in kept_float]
    if profile.get("not_int8"):
        log.warning("%s: %d linear layer(s) meant for INT8 ran in another precision: %s", label,
                    len(profile["not_int8"]), ", ".join(profile["not_int8"][:6]))
    return profile


def timing_fields(stats) -> dict[str, Any]:
    """The latency statistics a record keeps (``LatencyStats`` has more, e.g. the minimum, than a record holds),
    with the verdict on how far to trust them."""
    from runtimes.noise import spread_verdict

    fields = {k: v for k, v in stats.to_dict().items() if k in StageRecord.__dataclass_fields__}
    return fields | {"latency_verdict": spread_verdict(stats.latency_ms_p50, stats.latency_ms_p90,
                                                       stats.latency_ms_mean)}


def mark_repeats(records: list[StageRecord]) -> list[StageRecord]:
    """Records of one artifact timed more than once in the run (same runtime, precision and batch) whose medians
    disagree, marked noisy with both figures: the machine was busy during one of them. A record whose interleaved
    re-timing agreed with itself keeps that verdict."""
    import dataclasses

    from runtimes.noise import repeat_verdict, settled_by_retiming

    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        if r.status == "ok" and r.artifact and r.latency_ms_p50:
            groups.setdefault((r.artifact, r.runtime, r.precision, r.batch_size), []).append(i)
    out = list(records)
    for members in groups.values():
        verdict = repeat_verdict([records[i].latency_ms_p50 for i in members])
        if verdict is not None:
            for i in members:
                if not settled_by_retiming(records[i].latency_verdict):
                    out[i] = dataclasses.replace(records[i], latency_verdict=verdict)
    return out


def skipped(record: Recorder | LazyRecorder, ctx: RunContext, *, runtime: str, reason: str, **fields: Any) -> list[StageRecord]:
    """One ``status="skipped"`` record per batch size, with the reason."""
    return [record(runtime=runtime, **fields, batch_size=b, status="skipped", reason=reason)
            for b in ctx.config.measure.batch_sizes]


def measure_float(stage: str, model, ckpt_path: Path | None, onnx_path: Path, record: Recorder, ctx: RunContext, *,
                  precisions: tuple[str, ...] | None = None,
                  scored: dict[tuple[str, str], EvalResult] | None = None
                  ) -> tuple[list[StageRecord], EvalResult | None]:
    """A float stage's model on every runtime and precision (``PRECISIONS``, the one the run judges in first, so it
    is the one scored in full; an already quantized ONNX file is measured as ``("int8",)``); returns its records
    and the reference predictions (the first runtime's, when there was no reference yet). ``scored``: what the
    stage already scored in full, by (runtime, precision)."""
    from runtimes import get_runtime

    records, reference, full = [], record.reference, None
    for name in ctx.config.measure.runtimes:
        runtime = get_runtime(name)
        torch_side = runtime.input_kind == "torch"
        artifact = ckpt_path if torch_side else onnx_path
        if torch_side and (model is None or artifact is None):
            records += skipped(record, ctx, runtime=name, precision=(precisions or PRECISIONS)[0],
                               reason="the run has an ONNX model only; there is no PyTorch module to run")
            continue
        for precision in precisions or float_order(ctx.judge):
            fields = {"precision": precision, "artifact": str(artifact.relative_to(ctx.run_dir)),
                      "size_mb": artifact_mb(artifact)}
            if precision not in runtime.precisions() and precision not in runtime.artifact_precisions:
                records += skipped(record, ctx, runtime=name, reason=f"the {name} runtime offers "
                                   f"{runtime.precisions()} here, not {precision}", **fields)
                continue
            engine = runtime.build(model if torch_side else onnx_path, precision=precision, threads=ctx.threads)
            rows, result, full = measure_engine(engine, f"{stage} · {name} {precision}", record, ctx, runtime=name,
                                                full=full, given=(scored or {}).get((name, precision)), **fields)
            if reference is None:
                reference = result  # the first runtime of the baseline stage (torch fp32 by default)
                record = replace(record, reference=result)
                rows = [replace(r, top1_drop=0.0, agreement=1.0) for r in rows]
            records += rows
    return records, reference


def model_structure(model) -> dict[str, list[int]]:
    """Heads and MLP units per layer, and with token reduction the tokens leaving each layer."""
    from compress.prune.structured import structure
    from compress.tokens import token_counts

    plan = model.token_reduction
    return structure(model) | ({"tokens": token_counts(plan, model.config)} if plan is not None else {})


def openvino_parity(path: Path, model, x: np.ndarray, *, atol: float, threads: int) -> float | None:
    """Max |logit difference| of ONNX file ``path`` in OpenVINO (FP32) against PyTorch on ``x``.

    Raises ``ParityError`` beyond ``atol``; None when OpenVINO is not installed.
    """
    from export.errors import ParityError
    from runtimes import RuntimeUnavailableError, get_runtime

    try:
        engine = get_runtime("openvino").build(path, precision="fp32", threads=threads)
    except RuntimeUnavailableError:
        return None
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(engine.run(x) - expected).max())
    if diff > atol:
        plan = model.token_reduction.describe() if model.token_reduction is not None else "no token reduction"
        raise ParityError(f"OpenVINO's logits differ from PyTorch's by {diff:.2e} (more than {atol}: export.atol, or "
                          f"export.merge_atol with ToMe merging) "
                          f"with {plan}")
    return diff


def stage_float_rows(records: list[StageRecord], stage: str | None) -> list[StageRecord]:
    """The records of ``stage``'s own float model (``candidate`` None, not a setting it tried), in the order a
    figure of the stage is taken from them: scored in full before estimated from a sample, ONNX Runtime before the
    others, FP32 before BF16 (a run judged in BF16 scores only BF16 in full)."""
    rows = [r for r in records if r.stage == stage and r.status == "ok" and r.candidate is None
            and r.precision in PRECISIONS]
    return sorted(rows, key=lambda r: (r.sampled_against is not None, r.runtime != "onnxruntime",
                                       r.precision != "fp32"))


def scored_input(inp: StageInput, runtime: str, images: int, precision: str = "fp32") -> StageRecord | None:
    """The record of the stage's input model as its own stage scored it on ``runtime`` in ``precision`` (the one the
    run judges in) over the whole evaluation split, or None: then the stage scores its input itself."""
    for r in inp.records:
        if (r.stage == inp.previous and r.runtime == runtime and r.precision == precision and r.status == "ok"
                and r.candidate in (None, r.stage) and r.scored_in_full and r.eval_samples == images):
            return r
    return None
