"""The model stages of a run, in order: ``baseline``, then ``prune`` and ``recover`` when configured.

A stage maps the previous stage's PyTorch model to a new one, given a ``StageContext`` (data splits, the
config, where to keep resumable state, progress). The orchestrator (``pipeline``) exports, validates and
measures whatever a stage returns, so every stage gets records on every runtime. Quantization comes after
these and branches into candidates (``compress.quantize``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.datasets import Subset
from compress.config import RunConfig
from compress.vit import VisionTransformer

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    config: RunConfig
    train_data: Subset
    calib_data: Subset
    eval_data: Subset
    teacher: VisionTransformer  # the model as loaded: what pruning is measured and distilled against
    state_dir: Path  # resumable state of a stage (recovery's train_state.pt)
    progress: Callable[[str, int, int], None] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # what a stage wants written into its marker


@dataclass(frozen=True)
class Stage:
    name: str
    transform: Callable[[VisionTransformer, StageContext], VisionTransformer]
    options: dict[str, Any] = field(default_factory=dict)  # part of the stage's content hash


def baseline(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    """The model as loaded: the reference every later stage is measured against."""
    return model


def model_stages(config: RunConfig) -> list[Stage]:
    stages = [Stage("baseline", baseline)]
    p = config.prune
    if p.enabled:
        if not (p.heads or p.mlp or p.target_macs or p.target_latency_ms):
            from compress.errors import ConfigError

            raise ConfigError("prune.enabled is set but nothing to prune: set prune.heads and/or prune.mlp, or "
                              "prune.target_macs or prune.target_latency_ms")
        stages.append(Stage("prune", prune_stage, {"prune": p.model_dump(), "recover": config.recover.model_dump()}))
        if config.recover.epochs > 0:
            stages.append(Stage("recover", recover_stage, {"recover": config.recover.model_dump()}))
    return stages


def check_feasible(model: VisionTransformer, config: RunConfig) -> None:
    """Refuse, before any work, a model pruning cannot handle or ratios that would empty a layer."""
    from compress.prune import check_layout, select

    p = config.prune
    if not p.enabled:
        return
    check_layout(model)
    heads = [np.ones(b.attn.num_heads) for b in model.blocks]
    units = [np.ones(b.mlp.fc1.out_features) for b in model.blocks]
    select(heads, p.heads, minimum=p.min_heads_per_layer, what="heads")  # raises PruneError when impossible
    select(units, p.mlp, minimum=1, what="MLP units")


# ------------------------------------------------------------------------------------------------ prune
def prune_stage(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    from compress.errors import ConfigError
    from compress.macs import count_macs
    from compress.prune import prune_by_ratio, prune_to_target, structure

    p = ctx.config.prune
    if (p.target_macs or p.target_latency_ms) and p.iterations > 1:
        raise ConfigError("prune.iterations > 1 works with prune.heads / prune.mlp ratios, not with a MAC or "
                          "latency target; set prune.iterations=1")
    if p.target_macs and p.target_latency_ms:
        raise ConfigError("set one of prune.target_macs and prune.target_latency_ms, not both")
    if p.target_macs or p.target_latency_ms:
        importance = _importance(model, ctx)
        C, H, W = _input_shape(ctx)
        if p.target_macs:
            full = count_macs(model, (1, C, H, W))
            result = prune_to_target(model, importance, lambda m: count_macs(m, (1, C, H, W)) / full, p.target_macs,
                                     what="MAC", unit="x the unpruned MACs", min_heads=p.min_heads_per_layer,
                                     mlp_round_to=p.mlp_round_to)
        else:
            result = prune_to_target(model, importance, lambda m: _latency_ms(m, ctx), p.target_latency_ms,
                                     what="latency", unit=f"ms ({p.target_runtime}, batch {p.target_batch})",
                                     min_heads=p.min_heads_per_layer, mlp_round_to=p.mlp_round_to)
        ctx.notes |= {"importance": importance.method, "ratio": result.ratio, "trail": result.trail,
                      "structure": structure(result.model)}
        return result.model
    original = structure(model)
    total_heads, total_units = sum(original["heads"]), sum(original["mlp"])
    for i in range(1, p.iterations + 1):
        importance = _importance(model, ctx)  # re-scored on the current (partly pruned, recovered) model
        now = structure(model)
        heads = _relative(p.heads * i / p.iterations, total_heads, sum(now["heads"]))
        units = _relative(p.mlp * i / p.iterations, total_units, sum(now["mlp"]))
        model = prune_by_ratio(model, importance, heads=heads, mlp=units, min_heads=p.min_heads_per_layer,
                               mlp_round_to=p.mlp_round_to)
        log.info("prune %d/%d: heads %s, MLP units %s", i, p.iterations, structure(model)["heads"],
                 structure(model)["mlp"])
        if i < p.iterations and ctx.config.recover.epochs > 0:
            _recover(model, ctx, epochs=ctx.config.recover.epochs / p.iterations, tag=f"iteration{i}")
    ctx.notes |= {"importance": importance.method, "structure": structure(model)}
    return model


def _relative(share_of_original: float, original: int, current: int) -> float:
    """The ratio of the *current* count to remove so that ``share_of_original`` of the original is gone."""
    keep = original - int(round(share_of_original * original))
    return max(0.0, (current - keep) / current) if current else 0.0


def _importance(model: VisionTransformer, ctx: StageContext):
    from compress.prune import l2_importance, taylor_importance

    p = ctx.config.prune
    if p.importance == "l2":
        return l2_importance(model)
    rows = ctx.calib_data.indices[: p.importance_samples]
    if len(rows) == 0:
        rows = ctx.train_data.indices[: p.importance_samples]
    data = Subset(ctx.calib_data.source, rows, ctx.calib_data.preprocess)
    log.info("prune: Taylor importance on %d images (%s)", len(data), p.targets)
    return taylor_importance(model, data.batches(32), targets=p.targets, teacher=ctx.teacher)


def _input_shape(ctx: StageContext) -> tuple[int, int, int]:
    pre = ctx.eval_data.preprocess
    return pre.in_chans, pre.crop_size, pre.crop_size


def _latency_ms(model: VisionTransformer, ctx: StageContext) -> float:
    """FP32 p50 latency of ``model`` on the target runtime: exported to a temporary ONNX file and timed."""
    from export.onnx_export import export_onnx
    from runtimes import default_threads, get_runtime, measure_latency

    p = ctx.config.prune
    threads = ctx.config.measure.threads or default_threads()
    x = np.random.default_rng(0).standard_normal((p.target_batch, *_input_shape(ctx))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.onnx"
        export_onnx(model, path, example=torch.from_numpy(x[:1]), opset=ctx.config.export.opset,
                    simplify=ctx.config.export.simplify, parity_inputs=x[:1])
        engine = get_runtime(p.target_runtime).build(path, precision="fp32", threads=threads)
        return measure_latency(engine, x, threads=threads, warmup=3, iterations=ctx.config.measure.iterations,
                               max_seconds=ctx.config.measure.max_seconds).latency_ms_p50


# ---------------------------------------------------------------------------------------------- recover
def recover_stage(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    r, p = ctx.config.recover, ctx.config.prune
    _recover(model, ctx, epochs=r.epochs / p.iterations, tag="final")
    return model


def _recover(model: VisionTransformer, ctx: StageContext, *, epochs: float, tag: str) -> None:
    """Distil ``ctx.teacher`` into ``model`` in place on the training split; resumable from its state file."""
    from calibration.evaluate import evaluate_top1
    from compress.train import train

    r = ctx.config.recover
    if len(ctx.train_data) == 0:
        from compress.errors import InputError

        raise InputError("recovery needs training images but the dataset's training split is empty; add images "
                         "or set recover.epochs=0")
    options = r.model_dump(exclude={"epochs", "kd_alpha", "kd_temperature"})

    def eval_fn(m: VisionTransformer) -> float:
        with torch.inference_mode():
            return evaluate_top1(lambda x: m(torch.from_numpy(x)).numpy(), ctx.eval_data).top1

    def report(p) -> None:
        if ctx.progress is not None:
            ctx.progress(f"recover ({tag})", p.step, p.total_steps)

    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    result = train(model, ctx.train_data, epochs=epochs, **options, teacher=ctx.teacher, kd_alpha=r.kd_alpha,
                   kd_temperature=r.kd_temperature, checkpoint_path=ctx.state_dir / f"recover-{tag}.pt",
                   eval_fn=eval_fn, progress=report)
    ctx.notes.setdefault("recovery", []).append({"tag": tag, "epochs": epochs, "steps": result.steps,
                                                 "seconds": round(result.seconds, 1), "history": result.history})
    log.info("recover (%s): %d steps in %.0f s, top-1 %.4f", tag, result.steps, result.seconds,
             result.history[-1]["eval_top1"] if result.history else float("nan"))
