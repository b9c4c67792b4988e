"""The prune and recover stages of a run: structured pruning of heads and MLP units, then distillation.

Pruning removes a share of heads and MLP units ranked by importance (``structured``), or enough of both to meet
a MAC or latency target, or (``prune.search``) the heads and units a mask search finds within a MAC target or a
share of the latency a model of the target predicts (``latency``); given several targets, the stage tries them and
keeps the most cut within its budget. With ``prune.iterations`` it alternates pruning and recovery. Recovery
fine-tunes the pruned model by distillation from the model as loaded (``compress.train.distill``).
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np

from calibration.datasets import Subset
from compress.run.context import RunContext, StageInput, StageResult, bisect_settings
from compress.train.distill import distill

log = logging.getLogger(__name__)


def prune_stage(inp: StageInput, ctx: RunContext) -> StageResult:
    from compress.model.macs import count_macs
    from compress.prune.structured import prune_by_ratio, prune_searched, prune_to_target, structure

    model = inp.model
    p = ctx.config.prune  # one target at a time, without iterations: PruneConfig checked that when it was loaded
    if p.search:
        start = time.perf_counter()
        importance = _importance(model, ctx)
        seconds = {"importance": round(time.perf_counter() - start, 1)}
        costs = _latency_costs(model, ctx) if p.target_latency is not None else None
        if costs is not None:
            seconds["latency_model"] = round(time.perf_counter() - start - seconds["importance"], 1)
        extra = {"seconds": seconds} | ({"latency_model": costs.notes} if costs is not None else {})
        targets = p.search_targets()
        if len(targets) > 1:
            return _search_targets(model, importance, costs, targets, inp, ctx, extra)
        pruned, search = prune_searched(model, importance, targets[0], min_heads=p.min_heads_per_layer,
                                        mlp_round_to=p.mlp_round_to, rearrange=p.rearrange, costs=costs)
        repaired = _reconstructed(pruned, model, ctx)
        return StageResult(model=pruned, notes={"importance": importance.method, "search": search,
                                                "structure": structure(pruned)} | extra
                           | ({"reconstruct": repaired} if repaired else {}))
    if p.target_macs or p.target_latency_ms:
        importance = _importance(model, ctx)
        shape = (1, *ctx.input_shape)
        if p.target_macs:
            full = count_macs(model, shape)
            result = prune_to_target(model, importance, lambda m: count_macs(m, shape) / full, p.target_macs,
                                     what="MAC", unit="x the unpruned MACs", min_heads=p.min_heads_per_layer,
                                     mlp_round_to=p.mlp_round_to, scope=p.scope)
        else:
            result = prune_to_target(model, importance, lambda m: _latency_ms(m, ctx), p.target_latency_ms,
                                     what="latency", unit=f"ms ({p.target_runtime}, batch {p.target_batch})",
                                     min_heads=p.min_heads_per_layer, mlp_round_to=p.mlp_round_to, scope=p.scope)
        repaired = _reconstructed(result.model, model, ctx)
        return StageResult(model=result.model, notes={"importance": importance.method, "ratio": result.ratio,
                                                      "trail": result.trail, "structure": structure(result.model)}
                           | ({"reconstruct": repaired} if repaired else {}))
    original = structure(model)
    total_heads, total_units = sum(original["heads"]), sum(original["mlp"])
    recovery, repairs, unpruned = [], [], model
    for i in range(1, p.iterations + 1):
        importance = _importance(model, ctx)  # re-scored on the current (partly pruned, recovered) model
        now = structure(model)
        heads = _relative(p.heads * i / p.iterations, total_heads, sum(now["heads"]))
        units = _relative(p.mlp * i / p.iterations, total_units, sum(now["mlp"]))
        model = prune_by_ratio(model, importance, heads=heads, mlp=units, min_heads=p.min_heads_per_layer,
                               mlp_round_to=p.mlp_round_to, scope=p.scope)
        log.info("prune %d/%d: heads %s, MLP units %s", i, p.iterations, structure(model)["heads"],
                 structure(model)["mlp"])
        repaired = _reconstructed(model, unpruned, ctx)
        if repaired:
            repairs.append(repaired)
        if i < p.iterations and ctx.config.recover.epochs > 0:
            recovery.append(distill(model, ctx, epochs=ctx.config.recover.epochs / p.iterations,
                                    tag=f"iteration{i}", state_dir=inp.state_dir))
    notes = {"importance": importance.method, "structure": structure(model)} | ({"recovery": recovery} if recovery
                                                                                else {}) | (
        {"reconstruct": repairs} if repairs else {})
    return StageResult(model=model, notes=notes)


def recover_stage(inp: StageInput, ctx: RunContext) -> StageResult:
    r, p = ctx.config.recover, ctx.config.prune
    done = distill(inp.model, ctx, epochs=r.epochs / p.iterations, tag="final", state_dir=inp.state_dir)
    return StageResult(model=inp.model, notes={"recovery": [done]})


def _relative(share_of_original: float, original: int, current: int) -> float:
    """The ratio of the *current* count to remove so that ``share_of_original`` of the original is gone."""
    keep = original - int(round(share_of_original * original))
    return max(0.0, (current - keep) / current) if current else 0.0


def _importance(model, ctx: RunContext):
    from compress.prune.structured import l2_importance, taylor_importance

    p = ctx.config.prune
    if p.importance == "l2":
        return l2_importance(model)
    rows = ctx.calib_data.indices[: p.importance_samples]
    if len(rows) == 0:
        rows = ctx.train_data.indices[: p.importance_samples]
    data = Subset(ctx.calib_data.source, rows, ctx.calib_data.preprocess)
    log.info("prune: %s importance on %d images (%s)", p.importance.capitalize(), len(data), p.targets)
    # Scores are summed per image, so the batch size changes only memory: a ViT-B at 224 keeps ~190 MB of
    # activations per image for the backward pass, so large models go 8 at a time.
    batch = 8 if sum(q.numel() for q in model.parameters()) > 50e6 else 32
    return taylor_importance(model, data.batches(batch), targets=p.targets, teacher=ctx.teacher,
                             fisher=p.importance == "fisher", gram=p.rearrange, total=len(data))


def _reconstructed(pruned, original, ctx: RunContext) -> dict | None:
    """``pruned`` repaired by least squares against ``original`` (``prune.reconstruct``, fitting what
    ``prune.reconstruct_fit`` says), on up to 256 calibration images; the notes say how far the stream error fell."""
    from compress.prune.reconstruct import reconstruct

    if not ctx.config.prune.reconstruct:
        return None
    data = ctx.calib_data if len(ctx.calib_data) else ctx.train_data
    return reconstruct(pruned, original, (x for x, _ in data.head(256).batches(32)),
                       weights=ctx.config.prune.reconstruct_fit == "weights")


def _latency_ms(model, ctx: RunContext) -> float:
    """FP32 p50 latency of ``model`` on the target runtime: exported to a temporary ONNX file and timed."""
    p = ctx.config.prune
    x = np.random.default_rng(0).standard_normal((p.target_batch, *ctx.input_shape)).astype(np.float32)
    with ctx.exported(model, x[:1]) as path:
        return ctx.time(ctx.engine(path, p.target_runtime), x, warmup=3).latency_ms_p50


def _latency_costs(model, ctx: RunContext):
    """What a head and an MLP unit cost on ``prune.target_runtime`` in the precision the chain ends in
    (``compress.prune.latency``): uniformly pruned copies of ``model`` exported, made ready and timed side by side."""
    from compress.prune.latency import fit_latency_model, timer
    from compress.run.timing import available, final_precision, timing_calibration

    p = ctx.config.prune
    precision = available(final_precision(ctx.config, "prune", p.target_runtime, p.time_precision), "prune")
    probe = ctx.parity_inputs[:8]
    label = f"{p.target_runtime} {precision.upper()}, batch {p.target_batch}"
    time_models = timer(lambda m, path: ctx.export(m, path, probe), precision, _timing_input(ctx, p.target_batch),
                        runtime=p.target_runtime, threads=ctx.threads,
                        calib=timing_calibration(ctx, precision, p.time_calib_size),
                        smooth_quant=ctx.config.quantize.nncf_smooth_quant,
                        progress=lambda done, total: ctx.say("prune · latency model", done, total))
    log.info("prune: fitting a latency model (%s) on 4 uniformly pruned copies; about %d s", label,
             4 * (20 if precision == "int8" else 8) + 15)
    return fit_latency_model(model, time_models, mlp_round_to=p.mlp_round_to, label=label)


def _search_targets(model, importance, costs, targets: list[float], inp: StageInput, ctx: RunContext,
                    extra: dict) -> StageResult:
    """The most cut of ``targets`` whose top-1 drop against the stage's input stays within ``prune.max_drop`` (under
    a chain budget, ``prune.budget_share`` of what is left) goes on; when none does, the model goes on unpruned.

    A target tried is searched, repaired, exported and scored on ``prune.target_runtime`` in the float precision
    the run judges in (``measure.judge_precision``). A harder target
    seldom costs less top-1 than a milder one, so the targets are bisected: the middle one first, then the harder
    half if it fits, else the milder half. Of three targets two are scored, whichever is chosen; a target below
    what pruning can reach counts as over budget."""
    from calibration.evaluate import evaluate_top1, paired_drop
    from compress.model.macs import count_macs, count_params
    from compress.prune.structured import PruneError, prune_searched, structure
    from compress.run.measure import model_structure, scored_input, timing_fields

    p = ctx.config.prune
    what = costs.what if costs is not None else "MAC"
    max_drop = inp.stage_budget(p.max_drop, p.budget_share)
    probe = ctx.parity_inputs
    x = _timing_input(ctx, p.target_batch)
    shape = (1, *ctx.input_shape)
    full_macs = count_macs(model, shape)
    judge = ctx.judging_on(p.target_runtime)
    scored, base = scored_input(inp, p.target_runtime, len(ctx.eval_data), judge), None
    if scored is not None:
        base_top1, base_drop = scored.top1, scored.top1_drop or 0.0
    else:
        with ctx.exported(model, probe) as path:
            base = evaluate_top1(ctx.engine(path, p.target_runtime, judge).run, ctx.eval_data,
                                 batch_size=ctx.config.measure.eval_batch_size)
        base_top1 = base.top1
        base_drop = (inp.reference.top1 - base_top1) * 100 if inp.reference is not None else 0.0
    log.info("prune: %d %s targets (%s), bisected; the most cut within %.2f pt of top-1 %.4f goes on", len(targets),
             what, ", ".join(f"{t:g}" for t in targets), max_drop, base_top1)

    def attempt(target: float) -> tuple[dict, tuple | None]:
        name = f"{what} {target:g}"
        start = time.perf_counter()
        try:
            pruned, search = prune_searched(model, importance, target, min_heads=p.min_heads_per_layer,
                                            mlp_round_to=p.mlp_round_to, rearrange=p.rearrange, costs=costs)
        except PruneError as e:
            log.warning("prune: %s not tried: %s", name, e)
            return {"candidate": name, "status": "skipped", "reason": str(e)}, None
        repaired = _reconstructed(pruned, model, ctx)
        pruning_s = time.perf_counter() - start
        with ctx.exported(pruned, probe) as path:
            engine = ctx.engine(path, p.target_runtime, judge)
            # Scoring stops early once the drop is beyond the budget with confidence (against the baseline, whose
            # predictions the run keeps: the input's own drop is added to the stage's budget).
            result = evaluate_top1(engine.run, ctx.eval_data, batch_size=ctx.config.measure.eval_batch_size,
                                   reference=inp.reference, stop_above=base_drop + max_drop
                                   if inp.reference is not None else None,
                                   progress=(lambda d, n: ctx.say(f"prune · {name}", d, n)) if ctx.progress else None)
            stats = ctx.time(engine, x, warmup=3)
        drop = round((base_top1 - result.top1) * 100, 4)
        paired = paired_drop(inp.reference, result) if inp.reference is not None else None
        fits = drop <= max_drop + 1e-9 and not result.stopped_early
        trial = {"candidate": name, "status": "ok", "runtime": p.target_runtime, "precision": judge,
                 "batch_size": p.target_batch, "macs": count_macs(pruned, shape), "params": count_params(pruned),
                 "structure": model_structure(pruned),
                 "top1": result.top1, "eval_samples": result.num_samples, "stage_drop": drop, "fits": fits,
                 "search": search, **({"reconstruct": repaired} if repaired else {}), **timing_fields(stats),
                 **({"top1_drop_ci95": [round(paired[1], 4), round(paired[2], 4)]} if paired else {}),
                 "seconds": {"search_and_repair": round(pruning_s, 1),
                             "export_score_time": round(time.perf_counter() - start - pruning_s, 1)}}
        log.info("prune: %s: top-1 %.4f (%.2f pt against the input%s), %.2fx the MACs, p50 %.2f ms %s on %s%s; "
                 "%.0f s", name, result.top1, drop, ", scoring stopped early" if result.stopped_early else "",
                 trial["macs"] / full_macs, stats.latency_ms_p50, judge.upper(), p.target_runtime,
                 "" if fits else f": over the {max_drop:.2f} pt budget", time.perf_counter() - start)
        return trial, (pruned, result) if fits else None

    trials, chosen = [], None

    def tried(i: int) -> bool:  # targets run from the mildest (0) to the hardest
        nonlocal chosen
        trial, kept = attempt(targets[i])
        trials.append(trial)
        if kept is not None:
            chosen = (trial, *kept)  # bisection tries stronger targets after one fits: the last is the strongest
        return kept is not None

    bisect_settings(len(targets), tried)
    if chosen is None:
        log.warning("prune: no %s target stays within %.2f pt of top-1 %.4f; the model goes on unpruned", what,
                    max_drop, base_top1)
    records = [inp.new_record(**{k: v for k, v in t.items() if k not in ("stage_drop", "fits", "search",
                                                                          "reconstruct", "seconds")})
               for t in trials if t.get("status") != "skipped"]
    # unpruned, a copy: the input can be the model as loaded, the teacher, which recovery must not fine-tune
    kept = chosen[1] if chosen is not None else copy.deepcopy(model)
    # what goes on was scored here on the whole split, from the same export: the orchestrator takes that score
    given = chosen[2] if chosen is not None else base
    notes = {"importance": importance.method, "budget_pt": max_drop, "reference_top1": base_top1,
             "selected": chosen[0]["candidate"] if chosen is not None else None, "structure": structure(kept),
             "trials": [{k: t.get(k) for k in ("candidate", "top1", "stage_drop", "fits", "eval_samples", "macs",
                                               "latency_ms_p50", "search", "reconstruct", "seconds", "status",
                                               "reason")} for t in trials]} | extra
    return StageResult(model=kept, notes=notes, records=records,
                       scored={(p.target_runtime, judge): given} if given is not None else {})


def _timing_input(ctx: RunContext, batch: int) -> np.ndarray:
    """``batch`` real images to time on: the run's latency input, repeated when the batch is larger."""
    return np.ascontiguousarray(np.concatenate([ctx.latency_input] * batch)[:batch])

