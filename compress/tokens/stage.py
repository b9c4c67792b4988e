"""The tokens stage of a run: try token reduction settings on the target runtime, keep the fastest within budget.

The settings come from the config (``tokens.r`` / ``tokens.keep_rate`` / ``tokens.image_size``) or are searched:
for each MAC fraction in ``tokens.macs``, the mildest setting that reaches it (``token_settings``). The plans are
``compress.tokens.plan``, the math ``merge``, the model patch ``patch``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from compress.config import RunConfig
from compress.run.context import RunContext, StageInput, StageResult, bisect_settings
from compress.run.timing import available, final_precision, timing_calibration, timing_engine
from compress.tokens.plan import MERGING
from compress.train.distill import distill

log = logging.getLogger(__name__)


def requested_plan(config: RunConfig, model):
    """The one setting the config names (``tokens.r``, ``tokens.keep_rate`` or ``tokens.image_size``), or None to
    search."""
    t = config.tokens
    if t.method in MERGING and t.r is not None:
        return merge_plan(config, model, t.r)
    if t.method == "evit" and t.keep_rate is not None:
        return evit_plan(config, model, t.keep_rate)
    if t.method == "resolution" and t.image_size is not None:
        from compress.tokens import resolution

        return resolution(t.image_size, model.config)
    return None


def evit_plan(config: RunConfig, model, keep):
    from compress.tokens import evit

    return evit(keep, model.config.depth, placed(config, model))


def merge_plan(config: RunConfig, model, r):
    """The ToMe or PiToMe plan merging ``r`` (an int spread by ``tokens.schedule``, or one per layer) as the tokens
    settings place and match it."""
    from compress.tokens import tome

    t = config.tokens
    return tome(r, model.config.depth, t.schedule, method=t.method, layers=placed(config, model),
                similarity=t.similarity)


def placed(config: RunConfig, model) -> list[int] | None:
    """The layers ``tokens.layers`` or ``tokens.depths`` name (EViT's pruning layers, ToMe's merging ones under
    ``schedule="layers"``), or None where neither is set."""
    from compress.tokens import layers_at

    t = config.tokens  # not both layers and depths: TokensConfig checked that
    return layers_at(t.depths, model.config.depth) if t.depths is not None else t.layers


def token_settings(model, config: RunConfig, shape: tuple[int, int, int]) -> list:
    """The settings to try: the requested one, or for each ``tokens.macs`` fraction the mildest that reaches it,
    in order of MACs, the mildest first.

    ToMe and PiToMe: the smallest ``r`` (under ``tokens.schedule``, leaving a multiple of ``tokens.align`` tokens
    after every merging layer) whose MACs are at most the fraction; EViT: the
    largest keep rate on a 0.05 grid; resolution: the largest working size (a multiple of the patch size). A fraction no
    valid setting reaches gets the strongest valid one, once.
    """
    from compress.model.macs import count_macs
    from compress.tokens import TokenError, resolution, resolution_sizes
    from compress.tokens.plan import token_counts

    plan = requested_plan(config, model)
    if plan is not None:
        return [plan]
    t = config.tokens
    probe = copy.copy(model)  # shares the weights; only the plan differs
    probe.token_reduction = None
    full = count_macs(probe, (1, *shape))
    ladder = []  # (plan, MAC fraction), mildest first
    if t.method in MERGING:
        r = 1
        while True:
            try:
                candidate = merge_plan(config, model, r)
                counts = token_counts(candidate, probe.config)
                if all(n % t.align == 0 for n, merged in zip(counts, candidate.r) if merged):
                    ladder.append((candidate, _macs_with(probe, candidate, shape) / full))
            except TokenError:
                break
            r += 1
        if not ladder:
            raise TokenError(f"no {t.method} setting under tokens.schedule={t.schedule} leaves a multiple of "
                             f"{t.align} tokens after every merging layer (the model has "
                             f"{probe.config.num_prefix_tokens + probe.config.num_patches}); set "
                             "tokens.schedule=first, or lower tokens.align")
    elif t.method == "resolution":
        for size in resolution_sizes(model.config):
            candidate = resolution(size, model.config)
            ladder.append((candidate, _macs_with(probe, candidate, shape) / full))
    else:
        for keep in np.arange(0.95, 0.0, -0.05):
            candidate = evit_plan(config, model, round(float(keep), 2))
            ladder.append((candidate, _macs_with(probe, candidate, shape) / full))
    settings: list = []  # (plan, MAC fraction)
    for fraction in t.macs:
        reaching = [(plan, f) for plan, f in ladder if f <= fraction + 1e-9]
        chosen = reaching[0] if reaching else (ladder[-1] if ladder else None)
        if chosen is not None and chosen[0] not in [p for p, _ in settings]:
            settings.append(chosen)
    return [plan for plan, _ in sorted(settings, key=lambda s: -s[1])]  # mildest first, as the stage bisects them


def _macs_with(model, plan, shape: tuple[int, int, int]) -> int:
    from compress.model.macs import count_macs
    from compress.tokens import apply

    return count_macs(apply(model, plan), (1, *shape))


# what a trial notes that is not a record field
NOTES_ONLY = ("plan", "openvino_parity_max_abs_diff", "top1_drop", "latency_ms_p50_interleaved", "timed_precision",
              "timed_ms_p50", "timed_verdict")


class _NotTimed(Exception):
    """A setting that could not be made ready for timing in the chain's final precision."""


def timing_precision(config: RunConfig) -> str:
    """The precision the settings are timed in (``tokens.time_precision``; "auto": the chain's final precision)."""
    t = config.tokens
    return final_precision(config, "tokens", t.target_runtime, t.time_precision)


def tokens_stage(inp: StageInput, ctx: RunContext) -> StageResult:
    """Try token reduction settings on the target runtime; keep the fastest within the budget.

    Each setting (and the unreduced model, the reference) is exported, checked against PyTorch in ONNX Runtime
    and OpenVINO (the export is refused beyond ``export.atol``, ``export.merge_atol`` where tokens merge), scored on the
    evaluation split and timed; every one becomes a record. A setting the config names (``tokens.r`` /
    ``tokens.keep_rate`` / ``tokens.image_size``) is kept whenever it is within the budget, faster or not, and with
    ``tokens.finetune_epochs`` it is fine-tuned *before* it is judged; searched settings are judged training-free
    and the chosen one is fine-tuned afterwards, unless ``tokens.finetune_each`` fine-tunes each of them (from the
    same weights) before it is judged too. Searched settings are bisected, mildest first: of three, two are tried.
    """
    from calibration.evaluate import EvalResult, evaluate_top1, paired_drop
    from compress.model.macs import count_macs
    from compress.run.measure import model_structure, openvino_parity, scored_input, timing_fields
    from compress.tokens import apply, token_counts
    from export.errors import ParityError

    t = ctx.config.tokens
    # The stage sets plans on, and may fine-tune, its model: work on a copy, since the model it is given can be the
    # one loaded, which is also the teacher (a run without pruning) and the caller's.
    model = copy.deepcopy(inp.model)
    shape = ctx.input_shape
    recovery = []
    settings = token_settings(model, ctx.config, shape)
    fixed = requested_plan(ctx.config, model) is not None
    tune_first = t.finetune_epochs > 0 and (fixed or t.finetune_each)  # fine-tuned before judged
    original = {k: v.clone() for k, v in model.state_dict().items()} if tune_first else None
    tuned = {}  # each searched setting's fine-tuned weights, until one is chosen
    x = next(ctx.eval_data.batches(max(t.target_batch, 1)))[0]
    x = np.concatenate([x] * -(-t.target_batch // len(x)))[: t.target_batch]  # (B, C, H, W) real images
    probe = ctx.parity_inputs
    trials, base_top1, engines, results = [], None, {}, {}
    judge = ctx.judging_on(t.target_runtime)  # the float precision top-1 is judged in (measure.judge_precision)
    scored = scored_input(inp, t.target_runtime, len(ctx.eval_data), judge)  # the unreduced model's, by its stage
    # the chain's budget rules, and this stage spends at most its share of what is left
    max_drop = inp.stage_budget(t.max_drop, t.budget_share)
    precision = available(timing_precision(ctx.config), "tokens")
    timing_calib = timing_calibration(ctx, precision, t.time_calib_size)
    if precision != judge:
        log.info("tokens: settings are timed in %s on OpenVINO, the precision the chain ends in%s; top-1 is judged "
                 "in %s", precision.upper(), f" (nncf.quantize on {timing_calib.size} images, for timing only)"
                 if timing_calib is not None else "", judge.upper())
    def attempt(index: int, plan) -> bool:
        """Fine-tune (where asked), export, check, score and time one setting (None: the unreduced model) into
        ``trials``; True when it is within the stage's budget, scored on every image."""
        nonlocal base_top1, precision
        name = plan.describe() if plan is not None else "unreduced"
        apply(model, plan)
        if plan is not None and original is not None:
            model.load_state_dict(original)  # every setting is fine-tuned from the same weights
            recovery.append(distill(model, ctx, epochs=t.finetune_epochs, tag="tokens" if fixed else f"tokens-{index}",
                                    state_dir=inp.state_dir, switch="tokens.finetune_epochs"))
            name += f" fine-tuned {t.finetune_epochs:g} ep"
            if not fixed:
                tuned[name] = {k: v.clone() for k, v in model.state_dict().items()}
        fields = {"candidate": name, "runtime": t.target_runtime, "precision": judge, "batch_size": t.target_batch,
                  "macs": count_macs(model, (1, *shape)), "structure": model_structure(model)}
        try:
            with ctx.exported(model, probe) as path:
                ov_diff = openvino_parity(path, model, probe, atol=ctx.config.export.atol_for(model),
                                          threads=ctx.threads)
                engine = ctx.engine(path, t.target_runtime, judge)
                if plan is None and scored is not None:  # the same file's top-1 on the same runtime and images:
                    result = EvalResult(scored.top1, None, scored.eval_samples)  # not scored twice
                else:
                    # a setting stops being scored once it is over the stage's budget with confidence (against the
                    # baseline's predictions, so the unreduced model's own drop is added to the budget)
                    over = None if plan is None or inp.reference is None else \
                        (inp.reference.top1 - base_top1) * 100 + max_drop
                    result = evaluate_top1(engine.run, ctx.eval_data, batch_size=ctx.config.measure.eval_batch_size,
                                           progress=(lambda d, n: ctx.say(f"tokens · {name}", d, n))
                                           if ctx.progress else None, reference=inp.reference, stop_above=over)
                stats = ctx.time(engine, x, warmup=3)
                results[name] = result
                base_top1 = result.top1 if base_top1 is None else base_top1
                drop = round((base_top1 - result.top1) * 100, 4)
                timed, timed_stats = engine, stats
                if precision != judge and drop > max_drop + 1e-9:  # the same test as `fits` below
                    timed, timed_stats = None, None  # over budget, it cannot be chosen: not made ready for timing
                elif precision != judge:
                    try:
                        timed = timing_engine(path, precision, timing_calib, threads=ctx.threads,
                                              runtime=t.target_runtime,
                                              smooth_quant=ctx.config.quantize.nncf_smooth_quant)
                    except (TypeError, AttributeError, NameError):
                        raise  # our bug, not the quantizer's verdict on the graph
                    except Exception as e:
                        why = f"{precision.upper()} timing: {str(e).strip().splitlines()[0][:200]}"
                        if plan is not None:  # the chain could not quantize it either
                            raise _NotTimed(why) from e
                        log.warning("tokens: %s; the settings are timed in %s instead", why, judge.upper())
                        precision = judge
                    else:
                        timed_stats = ctx.time(timed, x, warmup=3)
                if timed is not None:
                    engines[name] = timed  # kept (in memory) should its timing need re-taking beside another's
        except ParityError as e:
            if plan is None:
                raise
            log.warning("tokens: %s not kept: %s", name, e)
            trials.append(fields | {"status": "skipped", "reason": f"export parity: {e}"})
            return False
        except _NotTimed as e:
            log.warning("tokens: %s not kept: %s", name, e)
            trials.append(fields | {"status": "skipped", "reason": str(e)})
            return False
        # The record's drop is against the baseline (the recorder's); its interval is paired on the same images.
        # The unreduced setting reuses its own stage's score, so it takes that record's interval; a record without
        # one is the reference's own score, whose drop is 0 exactly.
        paired = paired_drop(inp.reference, result) if inp.reference is not None else None
        if paired is None and plan is None and scored is not None:
            ci = scored.top1_drop_ci95 or ([0.0, 0.0] if scored.top1_drop == 0 else None)
            paired = (scored.top1_drop, *ci) if ci else None
        trials.append(fields | {"top1": result.top1, "top1_drop": drop, "eval_samples": result.num_samples,
                                "eval_total": result.total,
                                "openvino_parity_max_abs_diff": ov_diff, "plan": plan} | timing_fields(stats) |
                      ({"top1_drop_ci95": [round(paired[1], 4), round(paired[2], 4)]} if paired else {}) |
                      ({"timed_precision": precision, "timed_ms_p50": timed_stats.latency_ms_p50,
                        "timed_verdict": timing_fields(timed_stats)["latency_verdict"]} if timed_stats else {}))
        log.info("tokens: %s top-1 %.4f (drop %.2f pt%s), p50 %.2f ms on %s at batch %d%s, %.2fx the MACs", name,
                 result.top1, drop, f", scoring stopped after {result.num_samples} images" if result.stopped_early
                 else "", stats.latency_ms_p50, t.target_runtime, t.target_batch,
                 "" if precision == judge else f" ({timed_stats.latency_ms_p50:.2f} ms in {precision.upper()})"
                 if timed_stats else f" (over the {max_drop:.2f} pt budget: not timed in {precision.upper()})",
                 fields["macs"] / trials[0]["macs"])
        return drop <= max_drop + 1e-9 and not result.stopped_early

    attempt(0, None)  # the unreduced model first: the stage's drops are against its top-1
    # the searched settings (mildest first) bisected as the prune stage's targets are; the fastest of those tried
    # within the budget goes on
    bisect_settings(len(settings), lambda i: attempt(i + 1, settings[i]))
    fits = [r for r in trials if r.get("top1_drop") is not None and r["top1_drop"] <= max_drop + 1e-9
            and r["eval_samples"] == (r["eval_total"] or r["eval_samples"])]  # not stopped early
    if fixed:  # the setting asked for, when within budget
        best = fits[-1] if fits[-1]["plan"] is not None else fits[0]
    else:
        best = _fastest(fits, engines, x, ctx)
    if best["plan"] is None and len(trials) > 1:
        log.warning("tokens: %s; the model goes on unreduced", "no setting within budget is faster than the "
                    f"unreduced model on {t.target_runtime}" if len(fits) > 1 else
                    f"no setting stays within {max_drop:.2f} pt of top-1 {base_top1:.4f}")
        if original is not None:
            model.load_state_dict(original)  # the fine-tuned weights were for the rejected setting
    elif best["candidate"] in tuned:
        model.load_state_dict(tuned[best["candidate"]])  # the chosen setting's own fine-tuned weights
    apply(model, best["plan"])
    given = results.get(best["candidate"])  # scored here on the whole split: the orchestrator takes that score
    if best["plan"] is not None and t.finetune_epochs > 0 and original is None:
        recovery.append(distill(model, ctx, epochs=t.finetune_epochs, tag="tokens", state_dir=inp.state_dir,
                                switch="tokens.finetune_epochs"))
        given = None  # fine-tuned after it was judged: not the model that was scored
    # In the records, as in every other row, top1_drop is against the baseline (the recorder computes it).
    records = [inp.new_record(**{k: v for k, v in r.items() if k not in NOTES_ONLY}) for r in trials]
    notes = {
        "method": t.method, "selected": best["candidate"], "budget_pt": max_drop, "reference_top1": base_top1,
        "plan": best["plan"].to_dict() if best["plan"] is not None else None,
        "token_counts": token_counts(best["plan"], model.config) if best["plan"] is not None else None,
        "timed_in": precision,
        "trials": [{k: r.get(k) for k in ("candidate", "top1", "top1_drop", "latency_ms_p50", "timed_precision",
                                          "timed_ms_p50", "timed_verdict", "latency_ms_p50_interleaved", "macs",
                                          "status", "reason", "openvino_parity_max_abs_diff")} for r in trials],
    }
    if recovery:
        notes["recovery"] = recovery
    return StageResult(model=model, notes=notes, records=records,
                       scored={(t.target_runtime, judge): given} if given is not None else {})


def _fastest(fits: list[dict], engines: dict, x: np.ndarray, ctx: RunContext) -> dict:
    """The fastest of ``fits`` in the precision they were timed in (``timed_ms_p50``). Settings timed within
    ``runtimes.noise.CLOSE`` of the fastest, and any whose own timing was noisy, are timed again, interleaved, and
    ranked by that: one pass each, minutes apart, is not enough to tell them apart. Their verdicts then say how the
    re-timing went."""
    from runtimes.noise import interleaved, is_noisy, too_close_to_call

    def p50(r: dict) -> float:
        return r.get("timed_ms_p50", r["latency_ms_p50"])

    def verdict(r: dict) -> str | None:
        return r.get("timed_verdict", r.get("latency_verdict"))

    best = min(fits, key=p50)
    close = [r for r in too_close_to_call(fits, p50, lambda r: is_noisy(verdict(r))) if r["candidate"] in engines]
    if len(close) < 2:
        return best
    verdicts: dict[str, str] = {}
    medians = interleaved({r["candidate"]: engines[r["candidate"]] for r in close}, x, threads=ctx.threads,
                          verdicts=verdicts)
    for r in close:
        r["latency_ms_p50_interleaved"] = round(medians[r["candidate"]], 4)
        r["timed_verdict"] = verdicts[r["candidate"]]
        if r.get("timed_precision") in (None, r.get("precision")):  # the record's own engine was timed again
            r["latency_verdict"] = verdicts[r["candidate"]]
    chosen = min(close, key=lambda r: medians[r["candidate"]])
    log.info("tokens: %s timed again interleaved (p50 %s ms): %s is the fastest", ", ".join(r["candidate"] for r in close),
             " / ".join(f"{medians[r['candidate']]:.3f}" for r in close), chosen["candidate"])
    return chosen
