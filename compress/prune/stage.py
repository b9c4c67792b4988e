"""The prune and recover stages of a run: structured pruning of heads and MLP units, then distillation.

Pruning removes a share of heads and MLP units ranked by importance (``structured``), or enough of both to meet
a MAC or latency target, or (``prune.search``) the heads and units a mask search finds within a MAC target; with
``prune.iterations`` it alternates pruning and recovery. Recovery fine-tunes the pruned model by distillation from
the model as loaded (``compress.train.distill``).
"""

from __future__ import annotations

import logging

import numpy as np

from calibration.datasets import Subset
from compress.run.context import RunContext, StageInput, StageResult
from compress.train.distill import distill

log = logging.getLogger(__name__)


def prune_stage(inp: StageInput, ctx: RunContext) -> StageResult:
    from compress.model.macs import count_macs
    from compress.prune.structured import prune_by_ratio, prune_searched, prune_to_target, structure

    model = inp.model
    p = ctx.config.prune  # one target at a time, without iterations: PruneConfig checked that when it was loaded
    if p.search:
        importance = _importance(model, ctx)
        pruned, search = prune_searched(model, importance, p.target_macs, min_heads=p.min_heads_per_layer,
                                        mlp_round_to=p.mlp_round_to, rearrange=p.rearrange)
        repaired = _reconstructed(pruned, model, ctx)
        return StageResult(model=pruned, notes={"importance": importance.method, "search": search,
                                                "structure": structure(pruned)}
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
