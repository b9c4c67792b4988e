"""The per-layer profiles in the records (``runtimes.profile``), as the reports show them: the chosen engine's
time by op class beside its runtime's baseline, its time per model layer with the precision each executed in, and
the linear layers of an INT8 model that did not run in INT8. Read from the records only."""

from __future__ import annotations

from typing import Any

from compress.records import StageRecord
from runtimes.profile import OP_CLASSES

# one color per op class, for the stacked bars (the Okabe-Ito palette, then greys)
CLASS_COLORS = dict(zip(OP_CLASSES, ("#0072B2", "#E69F00", "#009E73", "#56B4E9", "#CC79A7", "#D55E00", "#999999",
                                     "#F0E442", "#BBBBBB", "#666666")))


def profile_views(records: list[StageRecord], chosen_id: str | None) -> list[dict[str, Any]]:
    """One view per profiled engine worth showing: the chosen record, beside the baseline on its runtime and batch."""
    ok = [r for r in records if r.status == "ok" and r.profile]
    chosen = next((r for r in ok if chosen_id and r.record_id == chosen_id), None)
    if chosen is None:
        return []
    base = next((r for r in ok if r.stage == "baseline" and r.runtime == chosen.runtime
                 and r.batch_size == chosen.batch_size and r.precision == "fp32"), None)
    return [_view(chosen, base)]


def _view(r: StageRecord, base: StageRecord | None) -> dict[str, Any]:
    p = r.profile

    def classes(profile: dict) -> list[dict[str, Any]]:
        total = sum(profile["by_class"].values()) or 1.0
        return [{"name": c, "ms": profile["by_class"][c], "share": profile["by_class"][c] / total,
                 "color": CLASS_COLORS[c]} for c in OP_CLASSES if c in profile["by_class"]]

    layers = []
    for layer in p["by_layer"]:
        total = layer["ms"] or 1.0
        precisions = sorted(layer["precision_ms"].items(), key=lambda kv: -kv[1])
        layers.append({"layer": layer["layer"], "ms": layer["ms"],
                       "executed": ", ".join(f"{'unreported' if name == '?' else name} {ms / total:.0%}"
                                             for name, ms in precisions if ms > 0)})
    title = f"{r.candidate or r.stage} on {r.runtime} ({r.precision}, batch {r.batch_size})"
    return {"title": title, "record": r, "total_ms": p["total_ms"], "p50": r.latency_ms_p50,
            "int8_share": p.get("linear_int8_share"), "not_int8": p.get("not_int8") or [],
            "classes": classes(p), "base_classes": classes(base.profile) if base else None,
            "base_total_ms": base.profile["total_ms"] if base else None, "layers": layers}


def markdown_section(views: list[dict[str, Any]]) -> list[str]:
    parts: list[str] = []
    for v in views:
        parts += ["## Where the time goes", "",
                  f"{v['title']}: {v['total_ms']:.3f} ms of node time per inference, profiled apart from the timed "
                  f"runs (p50 {v['p50']:.3f} ms)" + (f"; {v['int8_share']:.0%} of linear-layer time in INT8"
                                                     if v["int8_share"] is not None else "") + ".", ""]
        if v["not_int8"]:
            parts += [f"**Meant for INT8 but not executed in INT8:** {', '.join(v['not_int8'])}.", ""]
        base = {c["name"]: c for c in v["base_classes"] or []}
        parts += ["| op class | chosen ms | share | baseline ms | share |", "|---|---|---|---|---|"]
        mine = {c["name"]: c for c in v["classes"]}
        for name in [c for c in CLASS_COLORS if c in mine or c in base]:
            cells = [f"{d[name]['ms']:.3f} | {d[name]['share']:.0%}" if name in d else "– | –" for d in (mine, base)]
            parts.append(f"| {name} | {cells[0]} | {cells[1]} |")
        parts += ["", "| layer | ms | executed in |", "|---|---|---|"]
        parts += [f"| {layer['layer']} | {layer['ms']:.3f} | {layer['executed']} |" for layer in v["layers"]]
        parts.append("")
    return parts
