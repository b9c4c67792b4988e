"""A run's plan: the baseline, then the stages of ``RunConfig.stage_order()``, each a ``Stage`` entry.

The config has already checked the order (``RunConfig._stages_can_run``); here each name becomes the entry that
runs it, with the options that go into its content hash. ``check_feasible`` refuses, before any work, what the
loaded model cannot follow.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from compress.config import RunConfig, export_graph
from compress.run.context import RunContext, Stage, StageInput, StageResult

if TYPE_CHECKING:
    from compress.model.onnx_model import OnnxModel

log = logging.getLogger(__name__)


def baseline(inp: StageInput, ctx: RunContext) -> StageResult:
    """The model as loaded: the reference every later stage is measured against."""
    return StageResult(model=inp.model)


def onnx_baseline(inp: StageInput, ctx: RunContext) -> StageResult:
    """The ONNX file as given (``inp.onnx``, checked when it was loaded), copied into the run as one file: weights
    kept in external data files beside it are taken in, so the run's copy stands alone."""
    import onnx

    from compress.io import atomic_write

    path = ctx.run_dir / "artifacts" / f"baseline-{inp.key}.onnx"
    atomic_write(path, lambda tmp: onnx.save(onnx.load(str(inp.onnx)), str(tmp)))
    return StageResult(artifact=path)


TORCH_STAGES = ("prune", "recover", "tokens")


def build_plan(config: RunConfig, *, onnx: OnnxModel | None = None) -> list[Stage]:
    """Every stage of the run, in order, baseline first. With ``onnx`` (a run of an ONNX file no ViT was lifted
    out of), the baseline is the file, the stages that need the PyTorch module are skipped with one line saying
    why, and a file that already holds Q/DQ is measured as it is and not quantized again."""
    from compress.deploy.stage import deploy_stage
    from compress.prune.stage import prune_stage, recover_stage
    from compress.quantize.stage import quantize_stage
    from compress.tokens.stage import tokens_stage

    export = config.export.model_dump() | {"graph": export_graph(config)}  # "auto" as resolved: it shapes the files

    def model_stage(name, run, options) -> Stage:  # exported by the orchestrator: the export settings are inputs too
        return Stage(name, "torch", run, {"options": options, "export": export}, measured=True)

    recover = config.recover.model_dump()
    order = config.stage_order()
    if onnx is None:
        plan = [model_stage("baseline", baseline, {})]
    else:
        torch_only = [s for s in order if s in TORCH_STAGES]
        if torch_only:  # the run tried to lift a ViT out of the file and could not (run.pipeline._lift_if_needed)
            why = onnx.lift_error or ("it already holds Q/DQ nodes" if onnx.has_qdq else "it was not tried")
            log.warning("%s: no ViT could be lifted out of it (%s); the stages that need the PyTorch module (%s) "
                        "are skipped, the ONNX-level stages run on the file as it is", onnx.path.name, why,
                        ", ".join(torch_only))
            order = [s for s in order if s not in TORCH_STAGES]
        plan = [Stage("baseline", "onnx", onnx_baseline, {"options": {"source": "onnx"}}, measured=True)]
        if onnx.has_qdq and "quantize" in order:
            log.info("%s already holds Q/DQ nodes: it is measured as it is and not quantized again", onnx.path.name)
            order = [s for s in order if s != "quantize"]
    for name in order:
        if name == "prune":
            plan.append(model_stage("prune", prune_stage, {"prune": config.prune.model_dump(), "recover": recover}))
        elif name == "recover":
            plan.append(model_stage("recover", recover_stage, {"recover": recover}))
        elif name == "tokens":
            t = config.tokens
            plan.append(model_stage("tokens", tokens_stage,
                                    {"tokens": t.model_dump()} | ({"recover": recover} if t.finetune_epochs else {})))
        elif name == "quantize":
            plan.append(Stage("quantize", "onnx", quantize_stage, {"options": config.quantize.model_dump(),
                                                                   "budget": config.pipeline.max_drop}))
        elif name == "deploy":
            plan.append(Stage("deploy", "records", deploy_stage, {"options": {"target": config.pipeline.target,
                                                                             "budget": config.pipeline.max_drop}}))
        else:  # RunConfig types pipeline.stages with the names above
            raise AssertionError(f"no stage entry for {name!r}")
    return plan


def check_feasible(model, config: RunConfig) -> None:
    """Refuse, before any work, a model pruning cannot handle, ratios that would empty a layer, or a token
    reduction setting the model cannot follow."""
    from compress.prune.structured import check_layout, select

    order = config.stage_order()
    if "tokens" in order:
        from compress.tokens import token_counts
        from compress.tokens.stage import evit_plan, requested_plan

        requested = requested_plan(config, model)
        if requested is not None:
            token_counts(requested, model.config)  # raises TokenError naming the largest valid value
        elif config.tokens.method == "evit" and not model.config.class_token:
            token_counts(evit_plan(config, model, 1.0), model.config)  # the no-class-token error
    p = config.prune
    if "prune" not in order:
        return
    check_layout(model)
    heads = [np.ones(b.attn.num_heads) for b in model.blocks]
    units = [np.ones(b.mlp.fc1.out_features) for b in model.blocks]
    select(heads, p.heads, minimum=p.min_heads_per_layer, what="heads", scope=p.scope)  # raises when impossible
    select(units, p.mlp, minimum=1, what="MLP units", scope=p.scope)
