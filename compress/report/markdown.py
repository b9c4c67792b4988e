"""The run's table, from records only: ``report.md`` and the rows the CLI prints.

Nothing here measures; the report can be regenerated from ``records.jsonl`` at any time.
"""

from __future__ import annotations

from pathlib import Path

from compress.io import atomic_write_text, read_json
from compress.records import StageRecord
from compress.report.columns import MARKDOWN, fmt, rows
from compress.report.profiles import markdown_section, profile_views

def markdown_table(records: list[StageRecord]) -> str:
    lines = ["| " + " | ".join(c.heading for c in MARKDOWN) + " |", "|" + "---|" * len(MARKDOWN)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(records, MARKDOWN)]
    return "\n".join(lines)


def _pruning_section(records: list[StageRecord]) -> list[str]:
    """Heads and MLP units kept per layer after each stage that changed them, against the baseline."""
    first: dict[str, StageRecord] = {}
    for r in records:
        if r.structure and r.stage not in first:
            first[r.stage] = r
    base = first.get("baseline")
    changed = [r for name, r in first.items() if base and name != "baseline" and r.structure != base.structure]
    if not base or not changed:
        return []
    stages = list(dict.fromkeys(r.stage for r in changed if r.stage != "quantize"))
    parts = ["## Pruning", "", "Heads and MLP hidden units kept per layer (kept / original):", "",
             "| layer | " + " | ".join(f"{s} heads | {s} MLP" for s in stages) + " |",
             "|---|" + "---|---|" * len(stages)]
    for layer, (heads, mlp) in enumerate(zip(base.structure["heads"], base.structure["mlp"])):
        cells = []
        for name in stages:
            st = first[name].structure
            cells += [f"{st['heads'][layer]} / {heads}", f"{st['mlp'][layer]} / {mlp}"]
        parts.append(f"| {layer} | " + " | ".join(cells) + " |")
    totals = []
    for name in stages:
        st = first[name].structure
        totals += [f"{sum(st['heads'])} / {sum(base.structure['heads'])}",
                   f"{sum(st['mlp'])} / {sum(base.structure['mlp'])}"]
    parts += ["| all | " + " | ".join(totals) + " |", ""]
    return parts


def _quantization_section(run_dir: Path, records: list[StageRecord]) -> list[str]:
    """Candidates, their calibration, the layers each kept in float and why, and the one selected."""
    marker = run_dir / "stages" / "quantize.json"
    if not records and not marker.exists():
        return []
    summary = read_json(marker)
    parts = ["## Quantization", ""]
    if summary:
        parts.append(f"Budget: {summary['max_drop']} pt of top-1 against the float model's "
                     f"{summary['reference_top1'] * 100:.2f}% (ONNX Runtime FP32).")
        selected = summary.get("selected")
        parts.append(f"Fastest quantized candidate within this stage's budget: **{selected['candidate']}** on "
                     f"{selected['runtime']}, {selected['top1'] * 100:.2f}% "
                     f"top-1, {selected['latency_ms_p50']:.3f} ms at batch {selected['batch_size']}." if selected else
                     "**No candidate meets the budget**; the float model of the previous stage is carried forward.")
        parts.append("")
        for line in summary.get("missed", []):
            parts.append(f"- {line}")
    seen: set[str] = set()
    for r in records:
        if r.candidate in seen or r.candidate is None:
            continue
        seen.add(r.candidate)
        if not r.calibration:
            calibration = "none"
        elif not r.calibration.get("size"):
            calibration = f"none, {r.calibration['method']}"
        else:
            calibration = f"{r.calibration['method']}, {r.calibration['size']} images"
        if r.precision == "int8":
            what = f"{len(r.float_layers)} layer(s) kept in float" if r.float_layers else "every target layer in INT8"
        else:
            what = f"the whole model in {r.precision}" + (", except:" if r.float_layers else "")
        parts.append(f"- **{r.candidate}** ({r.quantizer}; calibration: {calibration}): {what}")
        for layer in r.float_layers or []:
            parts.append(f"  - `{layer['name']}`: {layer['reason']}")
    parts.append("")
    return parts


def _tokens_section(run_dir: Path) -> list[str]:
    """Every token-reduction setting tried, what it cost and bought, and the one kept."""
    import json

    marker = run_dir / "stages" / "tokens.json"
    if not marker.exists():
        return []
    notes = json.loads(marker.read_text())["notes"]
    trials = notes.get("trials", [])
    base = trials[0] if trials else {}
    counts = notes.get("token_counts")
    kept = "" if not counts else (f", {counts[0]} tokens in every layer" if len(set(counts)) == 1
                                  else f", tokens per layer {counts}")
    # the precision the stage ranked settings in, when not FP32 (tokens.time_precision): its column decides
    timed = next((t["timed_precision"] for t in trials if t.get("timed_precision") not in (None, "fp32")), None)
    parts = ["## Token reduction", "",
             f"Budget: {notes['budget_pt']:.2f} pt of top-1 against the stage's input on the target runtime. Kept: "
             f"**{notes['selected']}**{kept}." + (f" Top-1 is judged in FP32; the settings within budget are ranked "
                                                f"by their latency in {timed.upper()}." if timed else ""), "",
             "| setting | top-1 | drop (pt) | p50 ms, FP32 | speed-up | "
             + (f"p50 ms, {timed.upper()} | " if timed else "") + "MACs | OpenVINO parity |",
             "|---|---|---|---|---|" + ("---|" if timed else "") + "---|---|"]
    for t in trials:
        if t.get("top1") is None:
            parts.append(f"| {t['candidate']} | skipped: {t.get('reason')} | | | | " + ("| " if timed else "") + "| |")
            continue
        in_timed = ""
        if timed:
            in_timed = (f"{t['timed_ms_p50']:.3f} | " if t.get("timed_precision") == timed
                        else "over budget, not timed | ")
        parts.append(f"| {t['candidate']} | {t['top1'] * 100:.2f} | {t['top1_drop']:+.2f} | {t['latency_ms_p50']:.3f} | "
                     f"{base['latency_ms_p50'] / t['latency_ms_p50']:.2f}x | {in_timed}"
                     f"{t['macs'] / base['macs']:.2f}x | {fmt(t.get('openvino_parity_max_abs_diff'), '.1e')} |")
    return parts + [""]


def _chain_section(run_dir: Path) -> list[str]:
    """The chain against its one budget: where it broke, what was chosen for the target, the Pareto set."""
    import json

    marker = run_dir / "stages" / "pipeline.json"
    if not marker.exists():
        return []
    chain = json.loads(marker.read_text())
    judged_in = chain.get("judged_in")
    judged = f" (the baseline run in {judged_in.upper()})" if judged_in not in (None, "fp32") else ""
    # every ONNX file of the run in OpenVINO's graph form (compress.model.runtime_graph), which a reader comparing
    # its engines with a plain export should know
    shaped = "; exported in OpenVINO's graph form (export.graph)" if chain.get("exported_as") == "openvino" else ""
    parts = ["## The chain", "", f"Stages: {' -> '.join(['baseline', *chain['stages']])}; budget "
             f"{chain['budget_pt']:.2f} pt of top-1 against the baseline{judged}; target {chain['target']}{shaped}.",
             ""]
    for s in chain["per_stage"]:
        verdict = ("within budget" if s["within_budget"] else "over budget") if s["judged"] else "judged after recovery"
        parts.append(f"- {s['stage']}: {fmt(s['drop_pt'], '+.2f')} pt, {verdict}")
    broke = chain.get("broke_at")
    parts += ["", f"**The budget broke at stage {broke['stage']}**" + (
        f" ({broke['drop_pt']:+.2f} pt)." if broke.get("drop_pt") is not None else
        " (no quantized candidate within what was left).") if broke else "Every judged stage stayed within budget.", ""]
    selected = chain["selected"]
    parts.append(f"Chosen for {chain['target']}: **{selected['candidate']}** on {selected['runtime']} "
                 f"({selected['precision']}), {selected['top1'] * 100:.2f}% top-1 ({selected['top1_drop']:+.2f} pt), "
                 f"{selected['latency_ms_p50']:.3f} ms at batch {selected['batch_size']}."
                 if "none" not in selected else f"Chosen: nothing. {selected['none']}")
    if chain.get("budget_unsure"):
        parts.append(f"\n**Caution**: {chain['budget_unsure']}.")
    if chain.get("bundle"):
        parts.append(f"Bundle: `{chain['bundle']}/` (and `.tar.gz`).")
    parts += ["", "Pareto set (no other candidate is both faster and more accurate):", "",
              "| candidate | runtime | precision | top-1 | drop (pt) | p50 ms |", "|---|---|---|---|---|---|"]
    parts += [f"| {p['candidate']} | {p['runtime']} | {p['precision']} | {p['top1'] * 100:.2f} | {p['top1_drop']:+.2f} | "
              f"{p['latency_ms_p50']:.3f} |" for p in chain["pareto"]]
    return parts + [""]


def write_markdown_report(run_dir: Path, records: list[StageRecord]) -> Path:
    return atomic_write_text(run_dir / "report.md", markdown_report(run_dir, records))


def markdown_report(run_dir: Path, records: list[StageRecord]) -> str:
    """The text of ``report.md``: every record, pruning, quantization, what was skipped, and the environment."""
    ok = [r for r in records if r.status == "ok"]
    skipped = [r for r in records if r.status != "ok"]
    env = ok[0].env if ok else {}
    parts = [
        f"# Run `{run_dir.name}`",
        "",
        f"Dataset: `{ok[0].dataset}`, {ok[0].eval_total or ok[0].eval_samples} evaluation images. " if ok else "",
        "Top-1 is on the held-out evaluation split; *drop* is in points against the baseline's first runtime, "
        "*agree* the share of predictions equal to the baseline's. Latency is per call at the batch size shown "
        "(p50/p90/p99 over the timed iterations); MMACs per image.",
        "",
        markdown_table(ok),
        "",
    ]
    parts += _chain_section(run_dir)
    chain = read_json(run_dir / "stages" / "pipeline.json") or {}
    parts += markdown_section(profile_views(records, (chain.get("selected") or {}).get("record")))
    parts += _pruning_section([r for r in ok if r.stage != "tokens"])
    parts += _tokens_section(run_dir)
    parts += _quantization_section(run_dir, [r for r in records if r.stage == "quantize"])
    if skipped:
        parts += ["## Skipped", ""]
        parts += sorted({f"- {r.stage} {r.candidate + ' ' if r.candidate else ''}{r.runtime} {r.precision}: {r.reason}"
                         for r in skipped})
        parts.append("")
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()) if v)
        parts += ["## Environment", "", f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} logical cores), "
                  f"{env.get('threads')} threads", f"- {env.get('system')}, Python {env.get('python')}",
                  f"- {versions}", ""]
    return "\n".join(parts)
