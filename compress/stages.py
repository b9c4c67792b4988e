"""The model stages of a run, in order: ``baseline``, then ``prune``, ``recover`` and ``tokens`` when configured.

A stage maps the previous stage's PyTorch model to a new one, given a ``StageContext`` (data splits, the
config, where to keep resumable state, progress). The orchestrator (``pipeline``) exports, validates and
measures whatever a stage returns, so every stage gets records on every runtime. Quantization comes after
these and branches into candidates (``compress.quantize``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Callable, Iterator
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
    records: list[dict[str, Any]] = field(default_factory=list)  # extra record fields: settings a stage tried
    budget_left: float | None = None  # top-1 points the chain's budget (pipeline.max_drop) still allows


@dataclass(frozen=True)
class Stage:
    name: str
    transform: Callable[[VisionTransformer, StageContext], VisionTransformer]
    options: dict[str, Any] = field(default_factory=dict)  # part of the stage's content hash


def baseline(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    """The model as loaded: the reference every later stage is measured against."""
    return model


def stage_plan(config: RunConfig) -> list[str]:
    """The stages to run after the baseline, in order: ``pipeline.stages``, or the sections' own switches.

    Raises ``ConfigError`` for an unknown stage, one listed twice, or an order that cannot work.
    """
    from compress.config import STAGES
    from compress.errors import ConfigError

    order = config.pipeline.stages
    if order is None:
        order = (["prune"] if config.prune.enabled else []) + \
            (["recover"] if config.prune.enabled and config.recover.epochs > 0 else []) + \
            (["tokens"] if config.tokens.enabled else []) + \
            (["quantize"] if config.quantize.enabled and config.quantize.quantizers else [])
        return order
    unknown = [s for s in order if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r} in pipeline.stages; valid stages are {list(STAGES)}")
    twice = sorted({s for s in order if order.count(s) > 1})
    if twice:
        raise ConfigError(f"stage {twice[0]!r} is listed twice in pipeline.stages; list each stage once")
    position = {s: i for i, s in enumerate(order)}
    if "recover" in position and position.get("prune", len(order)) > position["recover"]:
        raise ConfigError("pipeline.stages puts 'recover' before 'prune' (or has no 'prune'): recovery fine-tunes a "
                          "pruned model, so list 'prune' first")
    if "recover" in position and config.recover.epochs <= 0:
        raise ConfigError("pipeline.stages lists 'recover' but recover.epochs is 0; set recover.epochs > 0")
    for stage in ("quantize", "deploy"):
        later = [s for s in order[position.get(stage, len(order)) + 1:] if s not in ("deploy",)]
        if stage in position and later:
            raise ConfigError(f"pipeline.stages puts {later[0]!r} after {stage!r}: {stage} works on the final "
                              f"float model, so list it after prune, recover and tokens")
    if "deploy" in position and position["deploy"] != len(order) - 1:
        raise ConfigError("pipeline.stages: 'deploy' packs the final choice, so it comes last")
    if not (config.quantize.enabled and config.quantize.quantizers):  # --set quantize.enabled=false still wins
        order = [s for s in order if s != "quantize"]
    return list(order)


def model_stages(config: RunConfig) -> list[Stage]:
    """The model-to-model stages of ``stage_plan`` (quantize and deploy branch off afterwards)."""
    stages = [Stage("baseline", baseline)]
    plan = stage_plan(config)
    p = config.prune
    if "prune" in plan and not (p.heads or p.mlp or p.target_macs or p.target_latency_ms):
        from compress.errors import ConfigError

        raise ConfigError("prune is on but there is nothing to prune: set prune.heads and/or prune.mlp, or "
                          "prune.target_macs or prune.target_latency_ms")
    for name in plan:
        if name == "prune":
            stages.append(Stage("prune", prune_stage, {"prune": p.model_dump(), "recover": config.recover.model_dump()}))
        elif name == "recover":
            stages.append(Stage("recover", recover_stage, {"recover": config.recover.model_dump()}))
        elif name == "tokens":
            t = config.tokens
            options = {"tokens": t.model_dump()} | ({"recover": config.recover.model_dump()} if t.finetune_epochs
                                                    else {})
            stages.append(Stage("tokens", tokens_stage, options))
    return stages


def check_feasible(model: VisionTransformer, config: RunConfig) -> None:
    """Refuse, before any work, a model pruning cannot handle, ratios that would empty a layer, or a token
    reduction setting the model cannot follow."""
    from compress.prune import check_layout, select

    plan = stage_plan(config)
    if "tokens" in plan:
        from compress.tokens import token_counts

        requested = requested_plan(config, model)
        if requested is not None:
            token_counts(requested, model.config)  # raises TokenError naming the largest valid value
        elif config.tokens.method == "evit" and not model.config.class_token:
            token_counts(evit_plan(config, model, 1.0), model.config)  # the no-class-token error
    p = config.prune
    if "prune" not in plan:
        return
    check_layout(model)
    heads = [np.ones(b.attn.num_heads) for b in model.blocks]
    units = [np.ones(b.mlp.fc1.out_features) for b in model.blocks]
    select(heads, p.heads, minimum=p.min_heads_per_layer, what="heads", scope=p.scope)  # raises when impossible
    select(units, p.mlp, minimum=1, what="MLP units", scope=p.scope)


def model_structure(model: VisionTransformer) -> dict[str, list[int]]:
    """Heads and MLP units per layer, and with token reduction the tokens leaving each layer."""
    from compress.prune import structure
    from compress.tokens import token_counts

    plan = model.token_reduction
    return structure(model) | ({"tokens": token_counts(plan, model.config)} if plan is not None else {})


# ------------------------------------------------------------------------------------------------ prune
def prune_stage(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    from compress.macs import count_macs
    from compress.prune import prune_by_ratio, prune_to_target, structure

    p = ctx.config.prune  # one target at a time, without iterations: PruneConfig checked that when it was loaded
    if p.target_macs or p.target_latency_ms:
        importance = _importance(model, ctx)
        C, H, W = _input_shape(ctx)
        if p.target_macs:
            full = count_macs(model, (1, C, H, W))
            result = prune_to_target(model, importance, lambda m: count_macs(m, (1, C, H, W)) / full, p.target_macs,
                                     what="MAC", unit="x the unpruned MACs", min_heads=p.min_heads_per_layer,
                                     mlp_round_to=p.mlp_round_to, scope=p.scope)
        else:
            result = prune_to_target(model, importance, lambda m: _latency_ms(m, ctx), p.target_latency_ms,
                                     what="latency", unit=f"ms ({p.target_runtime}, batch {p.target_batch})",
                                     min_heads=p.min_heads_per_layer, mlp_round_to=p.mlp_round_to, scope=p.scope)
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
                               mlp_round_to=p.mlp_round_to, scope=p.scope)
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
    # Scores are summed per image, so the batch size changes only memory: a ViT-B at 224 keeps ~190 MB of
    # activations per image for the backward pass, so large models go 8 at a time.
    batch = 8 if sum(q.numel() for q in model.parameters()) > 50e6 else 32
    return taylor_importance(model, data.batches(batch), targets=p.targets, teacher=ctx.teacher)


def _input_shape(ctx: StageContext) -> tuple[int, int, int]:
    pre = ctx.eval_data.preprocess
    return pre.in_chans, pre.crop_size, pre.crop_size


def _latency_ms(model: VisionTransformer, ctx: StageContext) -> float:
    """FP32 p50 latency of ``model`` on the target runtime: exported to a temporary ONNX file and timed."""
    p = ctx.config.prune
    x = np.random.default_rng(0).standard_normal((p.target_batch, *_input_shape(ctx))).astype(np.float32)
    with _exported(model, ctx, x[:1]) as path:
        return _time(_engine(path, p.target_runtime, ctx), x, ctx).latency_ms_p50


@contextlib.contextmanager
def _exported(model: VisionTransformer, ctx: StageContext, parity_inputs: np.ndarray) -> Iterator[Path]:
    """``model`` as a temporary FP32 ONNX file, checked against PyTorch in ONNX Runtime (``ParityError``)."""
    from export.onnx_export import export_onnx

    e = ctx.config.export
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.onnx"
        export_onnx(model, path, example=torch.from_numpy(parity_inputs[:2]), opset=e.opset, simplify=e.simplify,
                    atol=e.atol, min_agreement=e.min_agreement, parity_inputs=parity_inputs)
        yield path


def _threads(ctx: StageContext) -> int:
    from runtimes import default_threads

    return ctx.config.measure.threads or default_threads()


def _engine(path: Path, runtime: str, ctx: StageContext):
    """An FP32 engine of the ONNX file ``path`` on ``runtime``, with the run's thread count."""
    from runtimes import get_runtime

    return get_runtime(runtime).build(path, precision="fp32", threads=_threads(ctx))


def _time(engine, x: np.ndarray, ctx: StageContext):
    """Latency statistics of ``engine`` at the batch of ``x``, under the run's measurement settings."""
    from runtimes import measure_latency

    return measure_latency(engine, x, threads=_threads(ctx), warmup=3, iterations=ctx.config.measure.iterations,
                           max_seconds=ctx.config.measure.max_seconds)


# ---------------------------------------------------------------------------------------------- recover
def recover_stage(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    r, p = ctx.config.recover, ctx.config.prune
    _recover(model, ctx, epochs=r.epochs / p.iterations, tag="final")
    return model


def _recover(model: VisionTransformer, ctx: StageContext, *, epochs: float, tag: str,
             switch: str = "recover.epochs") -> None:
    """Distil ``ctx.teacher`` into ``model`` in place on the training split; resumable from its state file."""
    from calibration.evaluate import evaluate_top1
    from compress.distributed import train_together

    r = ctx.config.recover
    if len(ctx.train_data) == 0:
        from compress.errors import InputError

        raise InputError(f"fine-tuning ({tag}) needs training images but the dataset's training split is empty; "
                         f"add images or set {switch}=0")
    options = r.model_dump(exclude={"epochs", "kd_alpha", "kd_temperature"})

    def eval_fn(m: VisionTransformer) -> float:
        with torch.inference_mode():
            return evaluate_top1(lambda x: m(torch.from_numpy(x)).numpy(), ctx.eval_data).top1

    def report(p) -> None:
        if ctx.progress is not None:
            ctx.progress(f"recover ({tag})", p.step, p.total_steps)

    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    result = train_together(model, ctx.train_data, epochs=epochs, **options, teacher=ctx.teacher, kd_alpha=r.kd_alpha,
                   kd_temperature=r.kd_temperature, checkpoint_path=ctx.state_dir / f"recover-{tag}.pt",
                   eval_fn=eval_fn, progress=report)
    ctx.notes.setdefault("recovery", []).append({"tag": tag, "epochs": epochs, "steps": result.steps,
                                                 "seconds": round(result.seconds, 1), "history": result.history})
    log.info("recover (%s): %d steps in %.0f s, top-1 %.4f", tag, result.steps, result.seconds,
             result.history[-1]["eval_top1"] if result.history else float("nan"))


# ----------------------------------------------------------------------------------------------- tokens
def requested_plan(config: RunConfig, model: VisionTransformer):
    """The one setting the config names (``tokens.r`` or ``tokens.keep_rate``), or None to search."""
    t = config.tokens
    if t.method == "tome" and t.r is not None:
        from compress.tokens import tome

        return tome(t.r, model.config.depth, t.schedule)
    if t.method == "evit" and t.keep_rate is not None:
        return evit_plan(config, model, t.keep_rate)
    return None


def evit_plan(config: RunConfig, model: VisionTransformer, keep):
    from compress.tokens import evit, layers_at

    t, depth = config.tokens, model.config.depth  # not both layers and depths: TokensConfig checked that
    return evit(keep, depth, layers_at(t.depths, depth) if t.depths is not None else t.layers)


def token_settings(model: VisionTransformer, config: RunConfig, shape: tuple[int, int, int]) -> list:
    """The settings to try: the requested one, or for each ``tokens.macs`` fraction the mildest that reaches it.

    ToMe: the smallest ``r`` (under ``tokens.schedule``) whose MACs are at most the fraction; EViT: the largest
    keep rate on a 0.05 grid. A fraction no valid setting reaches gets the strongest valid one, once.
    """
    from compress.macs import count_macs
    from compress.tokens import TokenError, tome

    plan = requested_plan(config, model)
    if plan is not None:
        return [plan]
    t = config.tokens
    probe = copy.copy(model)  # shares the weights; only the plan differs
    probe.token_reduction = None
    full = count_macs(probe, (1, *shape))
    ladder = []  # (plan, MAC fraction), mildest first
    if t.method == "tome":
        r = 1
        while True:
            try:
                candidate = tome(r, model.config.depth, t.schedule)
                ladder.append((candidate, _macs_with(probe, candidate, shape) / full))
            except TokenError:
                break
            r += 1
    else:
        for keep in np.arange(0.95, 0.0, -0.05):
            candidate = evit_plan(config, model, round(float(keep), 2))
            ladder.append((candidate, _macs_with(probe, candidate, shape) / full))
    settings = []
    for fraction in t.macs:
        reaching = [plan for plan, f in ladder if f <= fraction + 1e-9]
        chosen = reaching[0] if reaching else (ladder[-1][0] if ladder else None)
        if chosen is not None and chosen not in settings:
            settings.append(chosen)
    return settings


def _macs_with(model: VisionTransformer, plan, shape: tuple[int, int, int]) -> int:
    from compress.macs import count_macs
    from compress.tokens import apply

    return count_macs(apply(model, plan), (1, *shape))


def tokens_stage(model: VisionTransformer, ctx: StageContext) -> VisionTransformer:
    """Try token reduction settings on the target runtime; keep the fastest within the budget.

    Each setting (and the unreduced model, the reference) is exported, checked against PyTorch in ONNX Runtime
    and OpenVINO (the export is refused beyond ``export.atol``), scored on the evaluation split and timed; every
    one becomes a record. A setting the config names (``tokens.r`` / ``tokens.keep_rate``) is kept whenever it is
    within the budget, faster or not, and with ``tokens.finetune_epochs`` it is fine-tuned *before* it is judged;
    searched settings are judged training-free and the chosen one is fine-tuned afterwards.
    """
    from calibration.evaluate import evaluate_top1
    from compress.macs import count_macs
    from compress.tokens import apply, token_counts
    from export.errors import ParityError

    t = ctx.config.tokens
    # The stage sets plans on, and may fine-tune, its model: work on a copy, since the model it is given can be the
    # one loaded, which is also the teacher (a run without pruning) and the caller's.
    model = copy.deepcopy(model)
    shape = _input_shape(ctx)
    settings = token_settings(model, ctx.config, shape)
    fixed = requested_plan(ctx.config, model) is not None
    original = {k: v.clone() for k, v in model.state_dict().items()} if fixed and t.finetune_epochs > 0 else None
    x = next(ctx.eval_data.batches(max(t.target_batch, 1)))[0]
    x = np.concatenate([x] * -(-t.target_batch // len(x)))[: t.target_batch]  # (B, C, H, W) real images
    probe = next((ctx.calib_data if len(ctx.calib_data) else ctx.eval_data).batches(32))[0]
    trials, base_top1 = [], None
    for plan in [None, *settings]:
        name = plan.describe() if plan is not None else "unreduced"
        apply(model, plan)
        if plan is not None and original is not None:
            _recover(model, ctx, epochs=t.finetune_epochs, tag="tokens", switch="tokens.finetune_epochs")
            name += f" fine-tuned {t.finetune_epochs:g} ep"
        fields = {"candidate": name, "runtime": t.target_runtime, "precision": "fp32", "batch_size": t.target_batch,
                  "macs": count_macs(model, (1, *shape)), "structure": model_structure(model)}
        try:
            with _exported(model, ctx, probe) as path:
                ov_diff = openvino_parity(path, model, probe, atol=ctx.config.export.atol, threads=_threads(ctx))
                engine = _engine(path, t.target_runtime, ctx)
                result = evaluate_top1(engine.run, ctx.eval_data, batch_size=ctx.config.measure.eval_batch_size,
                                       progress=(lambda d, n: ctx.progress(f"tokens · {name}", d, n))
                                       if ctx.progress else None)
                stats = _time(engine, x, ctx)
        except ParityError as e:
            if plan is None:
                raise
            log.warning("tokens: %s not kept: %s", name, e)
            trials.append(fields | {"status": "skipped", "reason": f"export parity: {e}"})
            continue
        base_top1 = result.top1 if base_top1 is None else base_top1
        drop = round((base_top1 - result.top1) * 100, 4)
        trials.append(fields | {"top1": result.top1, "top1_drop": drop, "eval_samples": result.num_samples,
                                "openvino_parity_max_abs_diff": ov_diff, "plan": plan} |
                      {k: v for k, v in stats.to_dict().items() if k.startswith(("latency_ms", "throughput", "iter"))})
        log.info("tokens: %s top-1 %.4f (drop %.2f pt), p50 %.2f ms on %s at batch %d, %.2fx the MACs", name,
                 result.top1, drop, stats.latency_ms_p50, t.target_runtime, t.target_batch,
                 fields["macs"] / trials[0]["macs"])
    max_drop = t.max_drop if ctx.budget_left is None else max(0.0, ctx.budget_left)  # the chain's budget rules
    fits = [r for r in trials if r.get("top1_drop") is not None and r["top1_drop"] <= max_drop + 1e-9]
    if fixed:  # the setting asked for, when within budget
        best = fits[-1] if fits[-1]["plan"] is not None else fits[0]
    else:
        best = min(fits, key=lambda r: r["latency_ms_p50"])
    if best["plan"] is None and len(trials) > 1:
        log.warning("tokens: %s; the model goes on unreduced", "no setting within budget is faster than the "
                    f"unreduced model on {t.target_runtime}" if len(fits) > 1 else
                    f"no setting stays within {max_drop:.2f} pt of top-1 {base_top1:.4f}")
        if original is not None:
            model.load_state_dict(original)  # the fine-tuned weights were for the rejected setting
    apply(model, best["plan"])
    if best["plan"] is not None and t.finetune_epochs > 0 and original is None:
        _recover(model, ctx, epochs=t.finetune_epochs, tag="tokens", switch="tokens.finetune_epochs")
    ctx.records += [{k: v for k, v in r.items() if k not in ("plan", "openvino_parity_max_abs_diff")} for r in trials]
    ctx.notes |= {
        "method": t.method, "selected": best["candidate"], "budget_pt": max_drop, "reference_top1": base_top1,
        "plan": best["plan"].to_dict() if best["plan"] is not None else None,
        "token_counts": token_counts(best["plan"], model.config) if best["plan"] is not None else None,
        "trials": [{k: r.get(k) for k in ("candidate", "top1", "top1_drop", "latency_ms_p50", "macs", "status",
                                          "reason", "openvino_parity_max_abs_diff")} for r in trials],
    }
    return model


def openvino_parity(path: Path, model: VisionTransformer, x: np.ndarray, *, atol: float, threads: int) -> float | None:
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
        raise ParityError(f"OpenVINO's logits differ from PyTorch's by {diff:.2e} (more than export.atol={atol}) "
                          f"with {plan}")
    return diff
