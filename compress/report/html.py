"""``compress report``: one self-contained HTML page, and a Markdown twin, from the records of one or more runs.

It reads ``RUN_DIR/records.jsonl`` (and ``stages/quantize.json`` for the selected candidate) and never measures
anything, so it can be redrawn at any time. Plots are drawn with matplotlib's Agg backend and embedded in the page
as base64 PNG: the page is one file with no external stylesheet, script, font or image, that can be mailed or
archived as it is. The Markdown file links the same PNGs, written into ``report-figures/`` beside it.

What it shows per run: top-1 against p50 latency per runtime and batch size with the Pareto front (lower latency
and higher top-1; the usual dominance definition of multi-objective optimisation, as in the accuracy-latency
plots of Once-for-All and similar NAS papers), per-stage latency bars and top-1 marks, the latency distribution of
each row (p50/p90/p99 and mean +- std, the statistics the records carry), the table of every record, and the
environment. The page is a Jinja2 template (``templates/report.html.j2``) with its CSS and script as package files
(``static/``), inlined when it is written. With several runs it adds a side-by-side comparison (same stage, runtime, precision and batch) with
the ratio of latencies, which is how one reads a model's speed across machines.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import importlib.resources
import io
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.io import atomic_write, atomic_write_text, read_json
from compress.records import StageRecord, pareto_front, read_records
from compress.report.columns import COLUMNS, fmt
from compress.report.profiles import profile_views

log = logging.getLogger(__name__)

GENERATOR = "vit-compress report"  # in the HTML's <meta name="generator">, the Markdown's last line, PNG metadata
FIGURE_DIR = "report-figures"
DPI = 130
MAX_WIDTH_IN = 12.0  # at DPI, about the page's width on a laptop screen, so text is shown near its set size
DEFAULT_BUDGET_PT = 1.0  # top-1 points; a run's own quantize.max_drop wins when it has one

# Fixed colours for the runtimes we ship, so a runtime has the same colour in every plot and in every report.
RUNTIME_COLORS = {"torch": "#e8710a", "onnxruntime": "#1a73e8", "openvino": "#8e24aa", "tensorrt": "#2e7d32"}
EXTRA_COLORS = ("#00897b", "#c62828", "#6d4c41", "#546e7a", "#f9a825")
PRECISION_MARKERS = {"fp32": "o", "bf16": "s", "fp16": "D", "int8": "^"}
PLOT_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.labelsize": 9,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8.5, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#9ca3af",
    "axes.grid": True, "axes.axisbelow": True, "grid.color": "#e5e7eb", "grid.linewidth": 0.7,
    "xtick.color": "#374151", "ytick.color": "#374151", "axes.labelcolor": "#111827", "text.color": "#111827",
}


# ---------------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    """One run directory's records, with the label it goes by in the report."""

    path: Path
    label: str
    records: tuple[StageRecord, ...]
    quantize: dict[str, Any] = field(default_factory=dict)  # stages/quantize.json, when the run quantized
    chain: dict[str, Any] = field(default_factory=dict)  # stages/pipeline.json, when a recipe chained stages

    @property
    def ok(self) -> list[StageRecord]:
        return [r for r in self.records if r.status == "ok"]

    @property
    def datasets(self) -> list[str]:
        return sorted({r.dataset for r in self.records if r.dataset})

    @property
    def env(self) -> dict[str, Any]:
        """The environment shared by the run's records, with the library versions of every runtime merged."""
        env: dict[str, Any] = {}
        versions: dict[str, dict[str, None]] = defaultdict(dict)  # library -> its distinct versions, in order
        for r in self.ok or list(self.records):
            env = env or dict(r.env)
            for name, version in (r.env.get("versions") or {}).items():
                if version:
                    versions[name][str(version)] = None
        return env | {"versions": {name: " / ".join(found) for name, found in versions.items()}}

    @property
    def device(self) -> str:
        """The machine a run measured on, as the env records it: CPU model and architecture."""
        env = self.env
        return f"{env.get('cpu') or 'unknown CPU'} ({env.get('machine') or '?'})"


def load_run(run_dir: Path, label: str | None = None) -> Run:
    """Read a run directory; a path without ``records.jsonl`` or with no records is an ``InputError``."""
    run_dir = Path(run_dir)
    records_path = run_dir / "records.jsonl"
    if not run_dir.is_dir() or not records_path.is_file():
        why = "does not exist" if not run_dir.exists() else "has no records.jsonl"
        raise InputError(f"{run_dir} is not a run directory ({why}); pass the --out of a `compress run`")
    try:
        records = read_records(records_path)
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{records_path} is not a records file of `compress run` ({e}); pass the --out of a "
                         "`compress run`") from None
    if not records:
        raise InputError(f"{records_path} holds no records (an interrupted run?); rerun `compress run` with the "
                         "same --out to finish it")
    return Run(run_dir, label or run_dir.name, tuple(records), read_json(run_dir / "stages" / "quantize.json"),
               read_json(run_dir / "stages" / "pipeline.json"))


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """Read every run; labels are the directory names, made unique with the parent folder where they clash."""
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise InputError("no run directory given; pass the --out of one or more `compress run`s")
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise InputError(f"{paths[i]} is given twice; pass each run directory once")
    labels = [p.name for p in resolved]
    for i, p in enumerate(resolved):
        if labels.count(p.name) > 1:
            labels[i] = f"{p.parent.name}/{p.name}"
    labels = [label if labels.count(label) == 1 else f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return [load_run(p, label) for p, label in zip(paths, labels)]


def variant(r: StageRecord) -> str:
    """What a row is called in plots: the quantized candidate, else the stage (with its precision unless FP32)."""
    if r.candidate:
        return r.candidate
    return r.stage if r.precision == "fp32" else f"{r.stage} · {r.precision}"


def _measured(records: Sequence[StageRecord]) -> list[int]:
    """Indices of the rows with both a top-1 and a p50 latency."""
    return [i for i, r in enumerate(records)
            if r.status == "ok" and r.top1 is not None and r.latency_ms_p50 is not None]


def _runtimes(records: Sequence[StageRecord]) -> list[str]:
    return list(dict.fromkeys(r.runtime for r in records))


def _runtime_color(name: str, runtimes: Sequence[str]) -> str:
    if name in RUNTIME_COLORS:
        return RUNTIME_COLORS[name]
    others = [r for r in runtimes if r not in RUNTIME_COLORS]
    return EXTRA_COLORS[others.index(name) % len(EXTRA_COLORS)] if name in others else EXTRA_COLORS[0]


# ------------------------------------------------------------------------------------------------ Pareto fronts


def pareto_marks(records: Sequence[StageRecord]) -> dict[int, str]:
    """Index of each measured row on a front -> ``"all"`` (on the front over every runtime at its batch size) or
    ``"runtime"`` (on its own runtime's front only). Latency is only comparable at one batch size."""
    by_batch: dict[int, list[int]] = defaultdict(list)
    for i in _measured(records):
        by_batch[records[i].batch_size].append(i)
    marks: dict[int, str] = {}
    for indices in by_batch.values():
        for runtime in _runtimes([records[i] for i in indices]):
            group = [i for i in indices if records[i].runtime == runtime]
            marks |= {i: "runtime" for i in _front_indices(records, group)}
        marks |= {i: "all" for i in _front_indices(records, indices)}
    return marks


def _front_indices(records: Sequence[StageRecord], indices: Sequence[int]) -> list[int]:
    on = pareto_front([(records[i].latency_ms_p50, records[i].top1) for i in indices])
    return [i for i, keep in zip(indices, on) if keep]


# ---------------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """A rendered plot: ``name`` is its file name (``.png``) in the figure folder."""

    name: str
    title: str
    caption: str
    png: bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def render_figures(runs: Sequence[Run]) -> dict[str, list[Figure]]:
    """Every plot of the report: {run label: its figures}, and {"": the comparison} when there are several runs."""
    import matplotlib

    with matplotlib.rc_context(PLOT_STYLE):
        figures: dict[str, list[Figure]] = {}
        for run in runs:
            prefix = "" if len(runs) == 1 else _slug(run.label) + "-"
            figures[run.label] = [f for f in _run_figures(run, prefix) if f is not None]
        if len(runs) > 1:
            figures[""] = [f for f in [_comparison_figure(runs)] if f is not None]
    return figures


def _run_figures(run: Run, prefix: str) -> Iterator[Figure | None]:
    yield _figure(f"{prefix}accuracy-latency", "Top-1 against latency",
                  "Each point is one row of the table (stage or quantized candidate, on a runtime, at a precision). "
                  "Ringed points are on the Pareto front over every runtime (nothing else is both at least as fast "
                  "and at least as accurate); dashed lines are each runtime's own front.",
                  plot_accuracy_latency(run))
    yield _figure(f"{prefix}stage-bars", "Latency and top-1 per stage",
                  "p50 latency per call for each runtime (a missing bar is a skipped row; the table says why), and "
                  "top-1 against the baseline's (the grey line).", plot_stage_bars(run))
    yield _figure(f"{prefix}latency-ranges", "Latency distributions",
                  "Per row: the bar spans p50 to p90, the thin line reaches p99, the black tick is p50; the diamond "
                  "below is the mean with ± one standard deviation.", plot_latency_ranges(run))


def _figure(name: str, title: str, caption: str, fig) -> Figure | None:
    return None if fig is None else Figure(f"{name}.png", title, caption, _png(fig))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": GENERATOR}, facecolor="white")
    return buffer.getvalue()


def _new_figure(width: float, height: float):
    """A figure on the Agg canvas (no pyplot, so no global state and no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _use_log(values: Sequence[float], spread: float = 8.0) -> bool:
    positive = [v for v in values if v and v > 0]
    return bool(positive) and max(positive) / min(positive) > spread


def plot_accuracy_latency(run: Run):
    """Top-1 (%) against p50 latency, one column per batch size: a first row with every runtime (the overall
    front named) and a row per runtime with its points named, the other runtimes' points grey behind them."""
    records = list(run.records)
    measured = _measured(records)
    if not measured:
        return None
    marks = pareto_marks(records)
    runtimes = _runtimes([records[i] for i in measured])
    batches = sorted({records[i].batch_size for i in measured})
    focuses: list[str | None] = [None, *runtimes] if len(runtimes) > 1 else runtimes
    fig = _new_figure(min(6.2 * len(batches), MAX_WIDTH_IN) if len(batches) > 1 else 8.5, 0.7 + 3.3 * len(focuses))
    axes = fig.subplots(len(focuses), len(batches), sharey=True, squeeze=False)
    panels = []
    for row, focus in enumerate(focuses):
        for col, batch in enumerate(batches):
            ax = axes[row][col]
            indices = [i for i in measured if records[i].batch_size == batch]
            named = _scatter_panel(ax, records, indices, marks, runtimes, focus)
            ax.set_title(f"{focus or 'all runtimes'} · batch {batch}", loc="left")
            ax.set_xlabel("p50 latency per call (ms" + (", log scale)" if ax.get_xscale() == "log" else ")"))
            panels.append((ax, indices, named))
        axes[row][0].set_ylabel("top-1 (%)")
    ys = [records[i].top1 * 100 for i in measured]
    pad = max(0.6, (max(ys) - min(ys)) * 0.2)
    axes[0][0].set_ylim(min(ys) - pad, max(ys) + 1.5 * pad)  # room above the top points for their labels
    _accuracy_legend(fig, runtimes, {records[i].precision for i in measured})
    fig.canvas.draw()  # the layout is settled; labels are placed in display coordinates
    renderer = fig.canvas.get_renderer()
    for ax, indices, named in panels:
        points = [(records[i].latency_ms_p50, records[i].top1 * 100) for i in indices]
        _label_points(ax, renderer, points, [(records[i].latency_ms_p50, records[i].top1 * 100,
                                              variant(records[i]), marks.get(i)) for i in named])
    return fig


def _scatter_panel(ax, records: Sequence[StageRecord], indices: Sequence[int], marks: dict[int, str],
                   runtimes: Sequence[str], focus: str | None) -> list[int]:
    """One batch size's points, the overall front as a grey staircase with its points ringed, and each runtime's
    front dashed. With a ``focus`` runtime, the others' points are grey context. Returns the points to name."""
    shown = [i for i in indices if focus is None or records[i].runtime == focus]
    xs = [records[i].latency_ms_p50 for i in shown]
    if _use_log(xs, 4.0):
        ax.set_xscale("log")
    overall = sorted((records[i].latency_ms_p50, records[i].top1 * 100) for i in indices if marks.get(i) == "all")
    ax.step(*zip(*overall), where="post", color="#111827", alpha=0.16 if focus else 0.22, linewidth=5,
            solid_capstyle="round", zorder=1)
    ringed = [(records[i].latency_ms_p50, records[i].top1 * 100) for i in shown if marks.get(i) == "all"]
    if ringed:
        ax.scatter(*zip(*ringed), s=190, facecolors="none", edgecolors="#111827", linewidths=1.3, zorder=4)
    for runtime in runtimes:
        mine = [i for i in indices if records[i].runtime == runtime]
        if focus is not None and runtime != focus:
            ax.scatter([records[i].latency_ms_p50 for i in mine], [records[i].top1 * 100 for i in mine], s=18,
                       color="#d1d5db", zorder=3, linewidths=0)
            continue
        color = _runtime_color(runtime, runtimes)
        front = sorted((records[i].latency_ms_p50, records[i].top1 * 100) for i in mine if i in marks)
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color=color, linestyle=(0, (4, 3)), linewidth=1.1, alpha=0.9,
                    zorder=2)
        for i in mine:
            r = records[i]
            ax.scatter([r.latency_ms_p50], [r.top1 * 100], s=46, color=color, edgecolors="white", linewidths=0.7,
                       marker=PRECISION_MARKERS.get(r.precision, "P"), zorder=5)
    if ax.get_xscale() == "log":
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.45)
        _plain_log_ticks(ax.xaxis)
    else:
        span = max(xs) - min(xs) or max(xs) * 0.2
        ax.set_xlim(max(0.0, min(xs) - span * 0.15), max(xs) + span * 0.25)
    return [i for i in shown if focus is not None or marks.get(i) == "all"]


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (0.2, 1, 10) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _accuracy_legend(fig, runtimes: Sequence[str], precisions: set[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=_runtime_color(r, runtimes), label=r)
               for r in runtimes]
    handles += [Line2D([], [], marker=PRECISION_MARKERS.get(p, "P"), linestyle="", color="#6b7280", label=p)
                for p in sorted(precisions, key=lambda p: list(PRECISION_MARKERS).index(p)
                                if p in PRECISION_MARKERS else 99)]
    handles += [Line2D([], [], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="#111827",
                       color="#111827", alpha=0.6, linewidth=3, label="Pareto front, all runtimes"),
                Line2D([], [], color="#6b7280", linestyle=(0, (4, 3)), label="Pareto front per runtime")]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles))


# Where a label may go relative to its point, in points: nearest first; the far ones get a leader line.
_LABEL_OFFSETS = [(6, 4), (6, -10), (-6, 4), (-6, -10), (0, 9), (0, -14)] + [
    (dx, dy) for dy in (18, -22, 30, -34, 42, -46, 54, -58) for dx in (8, -8, 24, -24, 0)]


def _label_points(ax, renderer, obstacles: Sequence[tuple[float, float]],
                  points: Sequence[tuple[float, float, str, str | None]]) -> None:
    """Name ``points`` without overlapping another label or any of the ``obstacles`` (every point drawn): front
    points first, each at the first free offset; where none is free, at the least crowded one, in grey."""
    from matplotlib.transforms import Bbox

    shown = ax.get_window_extent(renderer)
    taken = [Bbox.from_bounds(x - 5, y - 5, 10, 10) for x, y in ax.transData.transform(obstacles)] if obstacles \
        else []
    order = sorted(range(len(points)), key=lambda k: ({"all": 0, "runtime": 1}.get(points[k][3], 2), points[k][0]))
    for k in order:
        x, y, text, mark = points[k]
        best: tuple[int, float, float] | None = None
        for dx, dy in _LABEL_OFFSETS:
            ann = _annotate(ax, x, y, text, dx, dy, bold=mark == "all")
            box = _text_extent(ann, renderer).padded(1.5)
            clashes = sum(box.overlaps(t) for t in taken) + (0 if _inside(box, shown) else 100)
            if clashes == 0:
                taken.append(box)
                break
            ann.remove()
            if best is None or clashes < best[0]:
                best = (clashes, dx, dy)
        else:
            ann = _annotate(ax, x, y, text, best[1], best[2], bold=False, faint=True)
            taken.append(_text_extent(ann, renderer))


LEADER = {"arrowstyle": "-", "color": "#9ca3af", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4}


def _annotate(ax, x: float, y: float, text: str, dx: float, dy: float, *, bold: bool, faint: bool = False):
    far = abs(dy) > 16
    return ax.annotate(
        text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7.8,
        ha="left" if dx > 0 else "right" if dx < 0 else "center", va="bottom" if dy >= 0 else "top",
        color="#9ca3af" if faint else "#1f2937", fontweight="bold" if bold else "normal", zorder=6,
        arrowprops=LEADER if far else None,
    )


def _text_extent(ann, renderer):
    """The label's own box in display coordinates, without its leader line (which may cross its point)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _inside(box, outer) -> bool:
    return box.x0 >= outer.x0 and box.x1 <= outer.x1 and box.y0 >= outer.y0 and box.y1 <= outer.y1


def plot_stage_bars(run: Run):
    """p50 latency bars per stage (or candidate) and runtime, one panel per batch size, and a top-1 panel."""
    ok = [r for r in run.ok if r.latency_ms_p50 is not None]
    if not ok:
        return None
    variants = list(dict.fromkeys(variant(r) for r in ok))
    runtimes = _runtimes(ok)
    batches = sorted({r.batch_size for r in ok})
    height = 1.2 + 0.16 * len(variants) * max(len(runtimes), 2)
    fig = _new_figure(min(3.9 * (len(batches) + 1) + 1.2, MAX_WIDTH_IN), height)
    axes = fig.subplots(1, len(batches) + 1, sharey=True, squeeze=False)[0]
    slot = 0.8 / len(runtimes)
    for ax, batch in zip(axes, batches):
        rows = {(variant(r), r.runtime): r for r in ok if r.batch_size == batch}
        _latency_bars(ax, rows, variants, runtimes, slot)
        ax.set_title(f"p50 latency, batch {batch}")
    _top1_marks(axes[-1], ok, variants, runtimes, slot)
    axes[0].set_yticks(range(len(variants)), variants)
    axes[0].set_ylim(len(variants) - 0.5, -0.5)
    _runtime_legend(fig, runtimes)
    return fig


def _latency_bars(ax, rows: dict[tuple[str, str], StageRecord], variants: Sequence[str], runtimes: Sequence[str],
                  slot: float) -> None:
    values = [r.latency_ms_p50 for r in rows.values()]
    log_scale = _use_log(values)
    if log_scale:
        ax.set_xscale("log")
    floor = min(values) / 2 if log_scale else 0.0
    for j, runtime in enumerate(runtimes):
        for i, name in enumerate(variants):
            r = rows.get((name, runtime))
            if r is None:
                continue
            y = i - 0.4 + slot * (j + 0.5)
            ax.barh(y, r.latency_ms_p50 - floor, left=floor, height=slot * 0.9,
                    color=_runtime_color(runtime, runtimes))
            ax.annotate(f"{r.latency_ms_p50:.3g}", (r.latency_ms_p50, y), xytext=(2, 0), textcoords="offset points",
                        va="center", fontsize=7, color="#4b5563")
    ax.set_xlim(floor, max(values) * (2.2 if log_scale else 1.18))
    ax.set_xlabel("ms per call" + (" (log scale)" if log_scale else ""))
    ax.grid(axis="y", visible=False)
    if log_scale:
        _plain_log_ticks(ax.xaxis)


def _top1_marks(ax, ok: Sequence[StageRecord], variants: Sequence[str], runtimes: Sequence[str],
                slot: float) -> None:
    """Top-1 per stage and runtime as a stem from the baseline's top-1 (grey line) to the row's top-1."""
    smallest = min(r.batch_size for r in ok)
    rows = {(variant(r), r.runtime): r for r in ok if r.batch_size == smallest and r.top1 is not None}
    if not rows:
        return
    reference = _baseline_top1(ok)
    for j, runtime in enumerate(runtimes):
        for i, name in enumerate(variants):
            r = rows.get((name, runtime))
            if r is None:
                continue
            y, color = i - 0.4 + slot * (j + 0.5), _runtime_color(runtime, runtimes)
            ax.plot([reference * 100, r.top1 * 100], [y, y], color=color, linewidth=2.2, solid_capstyle="butt")
            ax.plot([r.top1 * 100], [y], marker="o", markersize=4, color=color)
            right = r.top1 >= reference
            ax.annotate(f"{r.top1 * 100:.2f}", (r.top1 * 100, y), xytext=(4 if right else -4, 0),
                        textcoords="offset points", va="center", ha="left" if right else "right", fontsize=7,
                        color="#4b5563")
    tops = [r.top1 * 100 for r in rows.values()] + [reference * 100]
    pad = max(0.5, (max(tops) - min(tops)) * 0.2)
    ax.set_xlim(min(tops) - pad, max(tops) + pad)
    ax.axvline(reference * 100, color="#6b7280", linewidth=1)
    ax.set_title("top-1 (%) vs baseline")
    ax.set_xlabel(f"top-1 (%); baseline {reference * 100:.2f}")
    ax.grid(axis="y", visible=False)


def _baseline_top1(records: Sequence[StageRecord]) -> float:
    """The reference top-1 the records' drops are against: the first measured row (the baseline's first runtime)."""
    first = next(r for r in records if r.top1 is not None)
    return first.top1 + (first.top1_drop or 0.0) / 100


def _runtime_legend(fig, runtimes: Sequence[str], extra: Sequence = ()) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=_runtime_color(r, runtimes), label=r) for r in runtimes] + list(extra)
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles))


def plot_latency_ranges(run: Run):
    """Box-like marks of each row's latency statistics: p50-p90 bar, p99 whisker, mean +- std, per batch size."""
    ok = [r for r in run.ok if r.latency_ms_p50 is not None]
    if not ok:
        return None
    runtimes = _runtimes(ok)
    keys = list(dict.fromkeys((variant(r), r.runtime) for r in ok))
    batches = sorted({r.batch_size for r in ok})
    fig = _new_figure(min(5.6 * len(batches) + 1.6, MAX_WIDTH_IN), 1.3 + 0.27 * len(keys))
    axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    for ax, batch in zip(axes, batches):
        rows = {(variant(r), r.runtime): r for r in ok if r.batch_size == batch}
        _range_panel(ax, rows, keys, runtimes)
        ax.set_title(f"batch {batch}")
    _group_ticks(axes[0], keys)
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="#6b7280", linewidth=6, label="p50 – p90"),
             Line2D([], [], color="#6b7280", linewidth=1, label="to p99"),
             Line2D([], [], color="#6b7280", marker="D", markersize=4, markerfacecolor="white", linewidth=0.8,
                    label="mean ± std")]
    _runtime_legend(fig, runtimes, extra)
    return fig


def _range_panel(ax, rows: dict[tuple[str, str], StageRecord], keys: Sequence[tuple[str, str]],
                 runtimes: Sequence[str]) -> None:
    lows = [r.latency_ms_p50 for r in rows.values()]
    highs = [max(r.latency_ms_p99 or 0, (r.latency_ms_mean or 0) + (r.latency_ms_std or 0), r.latency_ms_p50)
             for r in rows.values()]
    log_scale = _use_log(lows + highs)
    if log_scale:
        ax.set_xscale("log")
    low_edge = min(lows) / 1.6 if log_scale else 0.0
    for i, key in enumerate(keys):
        r = rows.get(key)
        if r is None:
            continue
        color = _runtime_color(r.runtime, runtimes)
        p50, p90, p99 = r.latency_ms_p50, r.latency_ms_p90 or r.latency_ms_p50, r.latency_ms_p99
        if p99:
            ax.plot([p50, p99], [i - 0.08, i - 0.08], color=color, linewidth=1, solid_capstyle="butt")
        ax.plot([p50, p90], [i - 0.08, i - 0.08], color=color, linewidth=6, solid_capstyle="butt", alpha=0.85)
        ax.plot([p50, p50], [i - 0.36, i + 0.2], color="#111827", linewidth=1.2)
        if r.latency_ms_mean is not None:
            std = r.latency_ms_std or 0.0
            left = max(r.latency_ms_mean - std, low_edge)
            ax.plot([left, r.latency_ms_mean + std], [i + 0.28, i + 0.28], color=color, linewidth=0.8)
            ax.plot([r.latency_ms_mean], [i + 0.28], marker="D", markersize=3.5, color=color,
                    markerfacecolor="white", markeredgewidth=0.9)
    _shade_groups(ax, keys)
    ax.set_xlim(low_edge, max(highs) * (1.5 if log_scale else 1.08))
    ax.set_ylim(len(keys) - 0.5, -0.5)
    ax.set_xlabel("ms per call" + (" (log scale)" if log_scale else ""))
    ax.grid(axis="y", visible=False)
    if log_scale:
        _plain_log_ticks(ax.xaxis)


def _shade_groups(ax, keys: Sequence[tuple[str, str]]) -> None:
    """A light band behind every other stage, so the rows of one stage read as a group."""
    start, group = 0, 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i][0] != keys[start][0]:
            if group % 2 == 0:
                ax.axhspan(start - 0.5, i - 0.5, color="#f3f4f6", zorder=0, linewidth=0)
            start, group = i, group + 1


def _group_ticks(ax, keys: Sequence[tuple[str, str]]) -> None:
    """One y label per stage, at the middle of its rows."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (name, _) in enumerate(keys):
        groups[name].append(i)
    ax.set_yticks([sum(rows) / len(rows) for rows in groups.values()], list(groups))
    ax.tick_params(axis="y", length=0)


# ------------------------------------------------------------------------------------------- across several runs


RowKey = tuple[str, str, str, int]  # (stage or candidate, runtime, precision, batch size)


def _row_key(r: StageRecord) -> RowKey:
    return (variant(r), r.runtime, r.precision, r.batch_size)


def matched_rows(runs: Sequence[Run]) -> list[tuple[RowKey, list[StageRecord | None]]]:
    """Every measured (stage, runtime, precision, batch) of any run, with each run's row or None, in run order."""
    by_run = [{_row_key(r): r for r in run.ok if r.latency_ms_p50 is not None} for run in runs]
    keys = list(dict.fromkeys(k for rows in by_run for k in rows))
    return [(k, [rows.get(k) for rows in by_run]) for k in keys]


def latency_ratio(base: StageRecord | None, other: StageRecord | None) -> float | None:
    """``other``'s p50 over ``base``'s: below 1 means ``other`` is faster."""
    if base is None or other is None or not base.latency_ms_p50 or other.latency_ms_p50 is None:
        return None
    return other.latency_ms_p50 / base.latency_ms_p50


def _geomean(values: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _comparison_figure(runs: Sequence[Run]) -> Figure | None:
    fig = plot_comparison(runs)
    return _figure("comparison", "Latency across runs",
                   f"p50 latency of each run over {runs[0].label}'s for the same stage, runtime, precision and "
                   "batch size; left of the line is faster. Only rows measured in both runs are drawn.", fig)


def plot_comparison(runs: Sequence[Run]):
    """Ratio of p50 latencies against the first run, per (stage, runtime, precision) row and batch size."""
    rows = [(k, recs) for k, recs in matched_rows(runs)
            if recs[0] is not None and any(latency_ratio(recs[0], o) for o in recs[1:])]
    if not rows:
        return None
    runtimes = _runtimes(runs[0].ok)
    batches = sorted({k[3] for k, _ in rows})
    labels = list(dict.fromkeys(f"{k[0]} · {k[1]}" + ("" if k[2] in ("fp32", "int8") or k[0].endswith(k[2])
                                                       else f" {k[2]}") for k, _ in rows))
    fig = _new_figure(min(5.2 * len(batches) + 2.2, MAX_WIDTH_IN), 1.3 + 0.24 * len(labels) * max(1, len(runs) - 1))
    axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    hatches = ["", "///", "...", "xx"]
    slot = 0.8 / (len(runs) - 1)
    for ax, batch in zip(axes, batches):
        ratios = []
        for k, recs in rows:
            if k[3] != batch:
                continue
            i = labels.index(f"{k[0]} · {k[1]}" + ("" if k[2] in ("fp32", "int8") or k[0].endswith(k[2])
                                                   else f" {k[2]}"))
            for j, other in enumerate(recs[1:]):
                ratio = latency_ratio(recs[0], other)
                if ratio is None:
                    continue
                ratios.append(ratio)
                y = i - 0.4 + slot * (j + 0.5)
                ax.barh(y, math.log2(ratio), height=slot * 0.88, color=_runtime_color(k[1], runtimes),
                        hatch=hatches[j % len(hatches)], edgecolor="white", linewidth=0)
                ax.annotate(f"×{ratio:.2f}", (math.log2(ratio), y), xytext=(3 if ratio >= 1 else -3, 0),
                            textcoords="offset points", va="center", ha="left" if ratio >= 1 else "right",
                            fontsize=7, color="#374151")
        _ratio_axis(ax, ratios)
        ax.set_title(f"{runs[1].label} / {runs[0].label} · batch {batch}" if len(runs) == 2 else f"batch {batch}")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].set_ylim(len(labels) - 0.5, -0.5)
    from matplotlib.patches import Patch

    extra = [Patch(facecolor="#9ca3af", hatch=hatches[j % len(hatches)], edgecolor="white",
                   label=f"{run.label} / {runs[0].label}") for j, run in enumerate(runs[1:])] if len(runs) > 2 else []
    _runtime_legend(fig, [r for r in runtimes if any(k[1] == r for k, _ in rows)], extra)
    return fig


def _ratio_axis(ax, ratios: Sequence[float]) -> None:
    """A log2 axis through a ratio of 1, ticks at powers of two labelled as ratios (×1/4, ×1, ×4)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    logs = [math.log2(r) for r in ratios] + [-0.5, 0.5]
    span = max(logs) - min(logs)
    ax.set_xlim(min(logs) - 0.12 * span, max(logs) + 0.12 * span)
    ax.axvline(0, color="#374151", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=span > 2))
    ax.xaxis.set_major_formatter(FuncFormatter(_ratio_label))
    ax.set_xlabel("p50 ratio (log scale; < 1 is faster)")
    ax.grid(axis="y", visible=False)


def _ratio_label(log2_ratio: float, _pos: object = None) -> str:
    ratio = 2 ** log2_ratio
    if ratio >= 1:
        return f"×{ratio:.3g}"
    inverse = 1 / ratio
    return f"×1/{inverse:.0f}" if abs(inverse - round(inverse)) < 1e-6 else f"×{ratio:.2g}"


# ------------------------------------------------------------------------------------------------- notes, summary


def dataset_note(runs: Sequence[Run]) -> str | None:
    """A plain sentence when the runs were measured on different datasets (allowed, but top-1 does not compare)."""
    datasets = {run.label: run.datasets for run in runs}
    if len({tuple(d) for d in datasets.values()}) <= 1 and all(len(d) <= 1 for d in datasets.values()):
        return None
    named = "; ".join(f"{label}: {', '.join(d) or 'unknown'}" for label, d in datasets.items())
    return (f"These runs were measured on different datasets ({named}). Top-1 does not compare across them, and "
            "latency only where the input shape is the same.")


def _budget(run: Run) -> float:
    return float(run.quantize.get("max_drop", DEFAULT_BUDGET_PT))


def fastest_within_budget(run: Run) -> tuple[StageRecord, StageRecord | None] | None:
    """The fastest row at the smallest batch size whose top-1 drop is within the budget, and the baseline FP32 row
    on the same runtime and batch size (for the speed-up), or None when no row qualifies."""
    ok = [run.records[i] for i in _measured(run.records)]
    if not ok:
        return None
    batch = min(r.batch_size for r in ok)
    fits = [r for r in ok if r.batch_size == batch and (r.top1_drop or 0.0) <= _budget(run) + 1e-9]
    if not fits:
        return None
    best = min(fits, key=lambda r: r.latency_ms_p50)
    first_stage = ok[0].stage
    base = next((r for r in ok if r.stage == first_stage and r.runtime == best.runtime and r.precision == "fp32"
                 and r.batch_size == batch), None)
    return best, base


# --------------------------------------------------------------------------------------------------------- HTML
# The page is ``templates/report.html.j2`` with ``static/report.css`` and ``static/sort.js`` inlined; the code below
# builds what it shows. Every value reaches the page through Jinja2's autoescaping.


@dataclass(frozen=True)
class Cell:
    text: str
    value: Any = None  # what the column sorts by; a number sorts as a number

    @property
    def numeric(self) -> bool:
        return isinstance(self.value, (int, float)) and not isinstance(self.value, bool)


@dataclass(frozen=True)
class Row:
    cells: list[Cell]
    cls: str = ""  # a row with fewer cells than headings stretches its last cell over the rest


FRONT_AFTER = "batch"  # the records table's Pareto-front column (the HTML's own) follows this one of COLUMNS
RECORD_HEADINGS = [h for c in COLUMNS for h in ([c.heading, "front"] if c.heading == FRONT_AFTER else [c.heading])]


def _record_row(r: StageRecord, mark: str | None) -> Row:
    """One row of the records table (``columns.COLUMNS`` and the front mark); a skipped record is its key cells
    and one cell with the reason."""
    cls = "skipped" if r.status != "ok" else f"front-{mark}" if mark else ""
    keys = [Cell(*c.cell(r)) for c in COLUMNS if c.key]
    if r.status != "ok":
        return Row(keys + [Cell(f"{r.status}: {r.reason or 'no reason recorded'}")], cls)
    front = Cell(*{"all": ("★ all", 2), "runtime": ("☆ runtime", 1)}.get(mark or "", ("", 0)))
    cells = []
    for c in COLUMNS:
        cells.append(Cell(*c.cell(r)))
        if c.heading == FRONT_AFTER:
            cells.append(front)
    return Row(cells, cls)


def _card(title: str, value: str, detail: str = "") -> dict[str, str]:
    return {"title": title, "value": value, "detail": detail}


def _run_cards(run: Run) -> list[dict[str, str]]:
    ok = run.ok
    env = run.env
    cards = [_card("dataset", ", ".join(run.datasets) or "unknown",
                   f"{ok[0].eval_total or ok[0].eval_samples} evaluation images" if ok and ok[0].eval_samples else ""),
             _card("device", env.get("cpu") or "unknown",
                   f"{env.get('machine', '?')}, {env.get('cpu_count', '?')} logical cores, "
                   f"{env.get('threads', '?')} threads"),
             _card("rows", f"{len(ok)} measured", f"{len(run.records) - len(ok)} skipped (see the table)")]
    best = fastest_within_budget(run)
    if best:
        row, base = best
        speedup = (f"; {base.latency_ms_p50 / row.latency_ms_p50:.2f}× as fast as the {base.stage} on "
                   f"{row.runtime} ({base.latency_ms_p50:.3f} ms)" if base and row is not base else "")
        cards.append(_card(f"fastest within {_budget(run):g} pt (batch {row.batch_size})",
                           f"{variant(row)} · {row.runtime}",
                           f"{row.latency_ms_p50:.3f} ms, top-1 {row.top1 * 100:.2f}%{speedup}"))
    selected = run.quantize.get("selected") if run.quantize else None
    if run.quantize:
        cards.append(_card("fastest quantized", f"{selected['candidate']} · {selected['runtime']}" if selected
                           else "none within budget",
                           f"{selected['top1'] * 100:.2f}% top-1, {selected['latency_ms_p50']:.3f} ms at batch "
                           f"{selected['batch_size']}" if selected else "the float model is carried forward"))
    return cards


def _chain_view(chain: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's chain: each stage's drop against the one budget, where it broke, the choice, the Pareto set."""
    if not chain:
        return None
    per_stage = [Row([Cell(s["stage"], s["stage"]), Cell(fmt(s["drop_pt"], "+.2f"), s["drop_pt"]),
                      Cell(("within budget" if s["within_budget"] else "over budget") if s["judged"]
                           else "judged after recovery")],
                     "over" if not s["within_budget"] and s["judged"] else "") for s in chain["per_stage"]]
    front = [Row([Cell(p["candidate"], p["candidate"]), Cell(p["runtime"], p["runtime"]),
                  Cell(p["precision"], p["precision"]), Cell(fmt(p["top1"] * 100, ".2f"), p["top1"]),
                  Cell(fmt(p["top1_drop"], "+.2f"), p["top1_drop"]),
                  Cell(fmt(p["latency_ms_p50"], ".3f"), p["latency_ms_p50"])]) for p in chain["pareto"]]
    selected = chain["selected"]
    return {"stages": ["baseline", *chain["stages"]], "budget": chain["budget_pt"], "per_stage": per_stage,
            "broke": (chain.get("broke_at") or {}).get("stage"), "target": chain["target"],
            "chosen": None if "none" in selected else selected, "nothing": selected.get("none"), "front": front,
            "unsure": chain.get("budget_unsure")}


def _run_view(run: Run, figures: Sequence[Figure], anchor: str) -> dict[str, Any]:
    marks = pareto_marks(run.records)
    skipped = sorted({f"{r.stage} {r.candidate + ' ' if r.candidate else ''}{r.runtime} {r.precision}: {r.reason}"
                      for r in run.records if r.status != "ok"})
    return {"anchor": anchor, "label": run.label, "path": str(run.path), "cards": _run_cards(run),
            "chain": _chain_view(run.chain), "figures": list(figures),
            "profiles": profile_views(list(run.records), (run.chain.get("selected") or {}).get("record")),
            "records": [_record_row(r, marks.get(i)) for i, r in enumerate(run.records)], "skipped": skipped}


ENV_FIELDS = (("CPU", "cpu"), ("machine", "machine"), ("logical cores", "cpu_count"), ("threads", "threads"),
              ("system", "system"), ("Python", "python"))


def _environment_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per environment field and library, one column per run; rows that differ are marked."""
    envs = [run.env for run in runs]
    libraries = sorted({name for env in envs for name in env.get("versions", {})})
    rows = [(label, [env.get(key) for env in envs]) for label, key in ENV_FIELDS]
    rows += [(name, [env.get("versions", {}).get(name) for env in envs]) for name in libraries]
    return [{"label": label, "cells": [v if v is not None else "–" for v in values],
             "differs": len(runs) > 1 and len({str(v) for v in values}) > 1} for label, values in rows]


def _comparison_view(runs: Sequence[Run], figures: Sequence[Figure]) -> dict[str, Any]:
    base = runs[0]
    overview = [Row([Cell(run.label, run.label), Cell(", ".join(run.datasets), ""), Cell(run.device, ""),
                     Cell(str(run.env.get("threads", "–")), run.env.get("threads")),
                     Cell(str(len(run.ok)), len(run.ok)), Cell(str(run.path), "")]) for run in runs]
    cards = []
    matched = matched_rows(runs)
    for j, run in enumerate(runs[1:], start=1):
        pairs = [(k[1], x) for k, recs in matched if (x := latency_ratio(recs[0], recs[j])) is not None]
        mean = _geomean([x for _, x in pairs])
        per_runtime = " · ".join(f"{rt} ×{_geomean([x for name, x in pairs if name == rt]):.2f}"
                                 for rt in dict.fromkeys(name for name, _ in pairs))
        cards.append(_card(f"p50 of {run.label} / {base.label}", f"×{mean:.2f}" if mean else "nothing in common",
                           f"geometric mean over {len(pairs)} matched rows: {per_runtime}" if pairs else
                           "no (stage, runtime, precision, batch) measured in both"))
    headings = ["stage", "runtime", "precision", "batch"] + ["top-1 %", "p50 ms"] * len(runs)
    headings += [f"{run.label} / {base.label}" for run in runs[1:]]
    groups = [("", 4), *((run.label, 2) for run in runs), ("p50 ratio", len(runs) - 1)]
    rows = []
    for (name, runtime, precision, batch), recs in matched:
        cells = [Cell(name, name), Cell(runtime, runtime), Cell(precision, precision), Cell(str(batch), batch)]
        for r in recs:
            top1 = None if r is None or r.top1 is None else r.top1 * 100
            p50 = None if r is None else r.latency_ms_p50
            cells += [Cell(fmt(top1, ".2f"), top1), Cell(fmt(p50, ".3f"), p50)]
        for other in recs[1:]:
            ratio = latency_ratio(recs[0], other)
            cells.append(Cell(f"×{ratio:.2f}" if ratio is not None else "–", ratio))
        rows.append(Row(cells, "" if all(recs) else "partial"))
    return {"overview": overview, "cards": cards, "figures": list(figures), "headings": headings, "groups": groups,
            "rows": rows}


@functools.cache
def _templates():
    """The Jinja2 environment of the package's templates, autoescaping everything."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("compress.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)


def _static(name: str) -> str:
    return importlib.resources.files("compress.report").joinpath("static", name).read_text(encoding="utf-8")


def render_html(runs: Sequence[Run], figures: dict[str, list[Figure]], notes: Sequence[str]) -> str:
    """The whole page: one file, every image inline, no external resource."""
    several = len(runs) > 1
    title = (f"Comparison of {', '.join(run.label for run in runs)}" if several else f"Run {runs[0].label}")
    anchors = {run.label: f"run-{i + 1}" for i, run in enumerate(runs)}
    nav = ([("comparison", "Comparison")] if several else []) + (
        [(anchors[run.label], run.label) for run in runs] if several else [(anchors[runs[0].label], "Results")])
    nav.append(("environment", "Environment"))
    return _templates().get_template("report.html.j2").render(
        generator=GENERATOR, title=title, several=several, nav=nav, notes=list(notes),
        total_rows=sum(len(r.records) for r in runs),
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        comparison=_comparison_view(runs, figures.get("", [])) if several else None,
        runs=[_run_view(run, figures[run.label], anchors[run.label]) for run in runs],
        record_headings=RECORD_HEADINGS, environment=_environment_rows(runs),
        css=_static("report.css"), script=_static("sort.js"),
    ) + "\n"


# ----------------------------------------------------------------------------------------------------- Markdown


def render_markdown(runs: Sequence[Run], figures: dict[str, list[Figure]], notes: Sequence[str]) -> str:
    """The Markdown twin: the per-run tables of ``report.md`` plus the plots, linked as PNG files beside it."""
    from compress.report.markdown import markdown_report

    def images(figs: Sequence[Figure]) -> list[str]:
        return [line for f in figs for line in (f"![{f.title}]({FIGURE_DIR}/{f.name})", "", f"*{f.caption}*", "")]

    parts: list[str] = []
    if len(runs) > 1:
        parts += [f"# Comparison of {', '.join(f'`{run.label}`' for run in runs)}", ""]
        parts += [f"> **Note:** {n}" for n in notes] + ([""] if notes else [])
        parts += ["| run | dataset | device | threads | folder |", "|---|---|---|---|---|"]
        parts += [f"| {run.label} | {', '.join(run.datasets)} | {run.device} | {run.env.get('threads', '–')} | "
                  f"`{run.path}` |" for run in runs]
        parts += ["", *images(figures.get("", [])), _comparison_markdown(runs), ""]
    else:
        parts += [f"> **Note:** {n}" for n in notes]
    for run in runs:
        text = markdown_report(run.path, list(run.records))
        if len(runs) > 1:  # each run's report one heading level down, under the comparison
            text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        head, _, rest = text.partition("\n")
        level = "#" * (3 if len(runs) > 1 else 2)
        parts += [head, "", f"{level} Plots", "", *images(figures[run.label]), f"{level} Pareto front", "",
                  *_front_markdown(run), f"{level} Records", rest]
    parts += ["", f"<!-- written by {GENERATOR} -->", ""]
    return "\n".join(parts)


def _front_markdown(run: Run) -> list[str]:
    """The rows on the front over every runtime, per batch size, fastest first."""
    marks = pareto_marks(run.records)
    on = sorted((run.records[i] for i, mark in marks.items() if mark == "all"),
                key=lambda r: (r.batch_size, r.latency_ms_p50))
    lines = [f"- batch {r.batch_size}: **{variant(r)}** on {r.runtime} ({r.precision}), {r.latency_ms_p50:.3f} ms, "
             f"top-1 {r.top1 * 100:.2f}%" for r in on]
    return [*lines, "", "Lower latency and higher top-1: nothing else measured is at least as good in both.", ""]


def _comparison_markdown(runs: Sequence[Run]) -> str:
    base = runs[0]
    heads = ["stage", "runtime", "precision", "batch"]
    heads += [f"{what} {run.label}" for run in runs for what in ("top-1 %", "p50 ms")]
    heads += [f"p50 {run.label} / {base.label}" for run in runs[1:]]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for (name, runtime, precision, batch), recs in matched_rows(runs):
        cells = [name, runtime, precision, str(batch)]
        for r in recs:
            cells += [fmt(None if r is None or r.top1 is None else r.top1 * 100, ".2f"),
                      fmt(None if r is None else r.latency_ms_p50, ".3f")]
        cells += [fmt(latency_ratio(recs[0], other), ".2f") for other in recs[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    figures: list[Path]


def default_out_dir(runs: Sequence[Run]) -> Path:
    """One run: its own directory. Several: ``compare/`` inside the first run's directory."""
    return runs[0].path if len(runs) == 1 else runs[0].path / "compare"


def write_report(run_dirs: Sequence[Path], *, out: Path | None = None) -> ReportFiles:
    """Read the runs, draw the plots, and write ``report.html``, ``report.md`` and ``report-figures/*.png``.

    Only files this command (or, for ``report.md`` in a run directory, ``compress run``) wrote are replaced;
    anything else in the way is an ``InputError``. Every file is written atomically.
    """
    runs = load_runs(run_dirs)
    out_dir = Path(out) if out is not None else default_out_dir(runs)
    notes = [n for n in [dataset_note(runs)] if n]
    for note in notes:
        log.warning("report: %s", note)
    files = ReportFiles(out_dir / "report.html", out_dir / "report.md", [])
    figures = render_figures(runs)
    pngs = {out_dir / FIGURE_DIR / f.name: f.png for figs in figures.values() for f in figs}
    _check_writable(out_dir, [files.html, files.markdown, *pngs], runs)
    for path, data in pngs.items():
        atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
    atomic_write_text(files.markdown, render_markdown(runs, figures, notes))
    atomic_write_text(files.html, render_html(runs, figures, notes))
    log.debug("report: %s and %s", files.html, files.markdown)
    return ReportFiles(files.html, files.markdown, list(pngs))


def _check_writable(out_dir: Path, targets: Sequence[Path], runs: Sequence[Run]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; choose a directory for the report")
    for path in targets:
        if path.exists() and not _ours(path, runs):
            raise InputError(f"{path} exists and was not written by `compress report`; choose another --out "
                             "(or move that file yourself)")


def _ours(path: Path, runs: Sequence[Run]) -> bool:
    """Whether an existing file is one this tool wrote and may replace."""
    if not path.is_file():
        return False
    if path.suffix == ".png":
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.info.get("Software") == GENERATOR
        except OSError:
            return False
    head = path.read_bytes()[:4096].decode("utf-8", "replace")
    tail = path.read_bytes()[-200:].decode("utf-8", "replace")
    if path.suffix == ".md" and any(path.parent.resolve() == run.path.resolve() for run in runs):
        return path.name == "report.md"  # `compress run` writes it there and rewrites it on every resume
    return GENERATOR in head or GENERATOR in tail


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"
