"""The columns of the records table: one specification for the terminal, ``report.md`` and ``report.html``.

Each column says how a record is shown (``text``), what the HTML table sorts it by (``value``), its heading, and
where it appears: every column is in the HTML table; ``markdown`` and ``console`` (a short heading, so the
terminal's table fits 80 columns) choose the others' subsets. Key columns identify a row and are shown for a
skipped record too, whose other cells give way to the reason it was skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compress.records import StageRecord


def fmt(value: float | int | None, spec: str) -> str:
    """``value`` formatted, or an en dash when it is unknown."""
    return "–" if value is None else format(value, spec)


@dataclass(frozen=True)
class Column:
    heading: str
    text: Callable[[StageRecord], str]
    value: Callable[[StageRecord], Any] | None = None  # the sort value; None: the text
    console: str | None = None  # the terminal's heading; None: not on the terminal
    markdown: bool = True
    key: bool = False  # identifies the row: shown for skipped records too

    def cell(self, r: StageRecord) -> tuple[str, Any]:
        """(text, sort value) of ``r`` in this column."""
        return self.text(r), (self.value(r) if self.value is not None else self.text(r))


def _num(attr: str, spec: str, scale: float = 1.0) -> tuple[Callable[[StageRecord], str], Callable[[StageRecord], Any]]:
    def value(r: StageRecord) -> Any:
        return getattr(r, attr)

    def text(r: StageRecord) -> str:
        v = getattr(r, attr)
        return fmt(None if v is None else v * scale if scale != 1 else v, spec)

    return text, value


def _drop_ci(r: StageRecord) -> str:
    if r.top1_drop_ci95 is None:
        return "–"
    low, high = r.top1_drop_ci95
    text = f"{low:+.2f} to {high:+.2f}"
    if r.sampled_against:
        s, agree = r.sampled_against, r.sampled_against.get("agreement")
        agree = f"{agree * 100:.1f}% agree with" if isinstance(agree, (int, float)) else "against"
        return text + f" (sample of {r.eval_samples or 0:,}, {agree} {s.get('runtime')} {s.get('precision')})"
    stopped = r.eval_total is not None and r.eval_samples is not None and r.eval_samples < r.eval_total
    return text + (f" (stopped at {r.eval_samples:,} of {r.eval_total:,})" if stopped else "")


def _mean_std(r: StageRecord) -> str:
    return "–" if r.latency_ms_mean is None else f"{r.latency_ms_mean:.3f} ± {r.latency_ms_std or 0:.3f}"


COLUMNS: tuple[Column, ...] = (
    Column("stage", lambda r: r.stage, console="stage", key=True),
    Column("candidate", lambda r: r.candidate or "", key=True),
    Column("runtime", lambda r: r.runtime, console="runtime", key=True),
    Column("precision", lambda r: r.precision, console="prec", key=True),
    Column("batch", lambda r: str(r.batch_size), lambda r: r.batch_size, console="batch", key=True),
    Column("top-1 %", *_num("top1", ".2f", 100), console="top-1"),
    Column("drop pt", *_num("top1_drop", "+.2f"), console="drop"),
    Column("drop 95% CI", _drop_ci, lambda r: None if r.top1_drop_ci95 is None else r.top1_drop_ci95[0]),
    Column("agree", *_num("agreement", ".3f"), console="agree"),
    Column("p50 ms", *_num("latency_ms_p50", ".3f"), console="p50 ms"),
    Column("p90 ms", *_num("latency_ms_p90", ".3f")),
    Column("p99 ms", *_num("latency_ms_p99", ".3f")),
    Column("mean ± std ms", _mean_std, lambda r: r.latency_ms_mean, markdown=False),
    Column("timing", lambda r: r.latency_verdict or "–"),  # "stable", or "noisy: <why>" (runtimes.noise)
    Column("img/s", *_num("throughput_ips", ",.0f"), console="img/s"),
    Column("params", *_num("params", ",")),
    Column("MMACs", *_num("macs", ",.1f", 1e-6)),
    Column("MB", *_num("size_mb", ".2f")),
)


def rows(records: list[StageRecord], columns: tuple[Column, ...]) -> list[list[str]]:
    """The text of ``columns`` for each record; a skipped record shows its key columns, then "skipped"."""
    out = []
    for r in records:
        if r.status == "ok":
            out.append([c.text(r) for c in columns])
        else:
            keys = [c.text(r) if c.key else "" for c in columns]
            first_value = next((i for i, c in enumerate(columns) if not c.key), len(columns))
            out.append(keys[:first_value] + ["skipped"] + keys[first_value + 1:] if first_value < len(columns)
                       else keys)
    return out


MARKDOWN = tuple(c for c in COLUMNS if c.markdown)
CONSOLE = tuple(c for c in COLUMNS if c.console is not None)
