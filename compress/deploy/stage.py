"""The deploy stage of a run: pack what the run chose for ``pipeline.target`` into a bundle (``bundle.deploy``)."""

from __future__ import annotations

import logging

from compress.errors import InputError
from compress.run.context import RunContext, StageInput, StageResult

log = logging.getLogger(__name__)


def deploy_stage(inp: StageInput, ctx: RunContext) -> StageResult:
    """Write ``RUN_DIR/bundle-TARGET`` from the run's records, by the rule ``compress deploy`` applies.

    A bundle already there (an earlier run of the same inputs) is kept. When nothing is within the chain's budget
    on the target's runtimes there is nothing to pack: the stage says so and the run goes on to its summary.
    """
    from compress.deploy.bundle import TARGETS, chain_budget, choose, deploy
    from compress.deploy.runner import load_manifest, manifest_digest

    target = TARGETS[ctx.config.pipeline.target]
    budget = chain_budget(ctx.config.dump())
    bundle = ctx.run_dir / f"bundle-{target.name}"
    records = list(inp.records)
    try:
        choose(records, target, max_drop=budget)
    except InputError as e:
        log.warning("deploy: nothing to pack for %s: %s", target.name, e)
        return StageResult(notes={"bundle": None, "none": str(e)})
    retimed = _retime_contenders(records, target, budget, ctx)
    notes = {"retimed": {"target": target.name, "budget_pt": budget, "p50_ms": retimed}} if retimed else {}
    if bundle.exists():
        log.info("deploy: %s is there from an earlier run of the same inputs; kept", bundle.name)
    else:
        deploy(ctx.run_dir, target.name, bundle, max_drop=budget, log=log.info, retimed=retimed)
    return StageResult(artifact=bundle, notes=notes | {"bundle": bundle.name,
                                                       "bundle_digest": manifest_digest(load_manifest(bundle))})


def _retime_contenders(records, target, budget: float, ctx: RunContext) -> dict[str, float] | None:
    """Time again, interleaved, the records ``choose`` would rank by medians too close to call (taken minutes
    apart on a shared machine); {``timing_key``: median ms}, or None when one stands out."""
    from compress.deploy.bundle import contenders, timing_key
    from runtimes.noise import interleaved, is_noisy

    close = contenders(records, target, max_drop=budget)
    keys = list(dict.fromkeys(timing_key(r) for r in close))  # one engine per file, runtime and precision
    if len(keys) < 2:
        return None
    first = {timing_key(r): r for r in reversed(close)}
    engines = {k: ctx.engine(ctx.run_dir / first[k].artifact, first[k].runtime, first[k].precision) for k in keys}
    verdicts: dict[str, str] = {}
    medians = interleaved(engines, ctx.latency_input[: close[0].batch_size], threads=ctx.threads, verdicts=verdicts)
    log.info("deploy: %s timed again interleaved (p50 %s ms)",
             ", ".join(f"{first[k].candidate or first[k].stage}/{first[k].runtime}" for k in keys),
             " / ".join(f"{medians[k]:.3f}" for k in keys))
    for k in keys:
        if is_noisy(verdicts[k]):
            log.warning("deploy: %s/%s %s", first[k].candidate or first[k].stage, first[k].runtime, verdicts[k])
    return {k: round(medians[k], 4) for k in keys}
