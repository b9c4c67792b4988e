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
    try:
        choose(list(inp.records), target, max_drop=budget)
    except InputError as e:
        log.warning("deploy: nothing to pack for %s: %s", target.name, e)
        return StageResult(notes={"bundle": None, "none": str(e)})
    if bundle.exists():
        log.info("deploy: %s is there from an earlier run of the same inputs; kept", bundle.name)
    else:
        deploy(ctx.run_dir, target.name, bundle, max_drop=budget, log=log.info)
    return StageResult(artifact=bundle, notes={"bundle": bundle.name,
                                               "bundle_digest": manifest_digest(load_manifest(bundle))})
