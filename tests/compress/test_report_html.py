"""``compress report``: the self-contained HTML page and its Markdown twin, from records of real pipeline runs.

Two real runs are made once per module with the demo's trained digits ViT: one on scikit-learn's digits on every
runtime with two quantized candidates, and one on an ImageFolder of the same digits (another dataset, so the
comparison must say so) on ONNX Runtime with one thread. Nothing here mocks a record.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.config import load_config
from compress.errors import InputError
from compress.run.pipeline import run_pipeline
from compress.records import StageRecord, read_records
from compress.report.html import GENERATOR, dataset_note, load_run, pareto_front, pareto_marks, write_report
from tests.conftest import write_digit_folder

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FAST = ["measure.iterations=5", "measure.max_seconds=0.5", "measure.warmup=1", "data.eval_limit=128"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_model) -> Path:
    """A real run on builtin:digits: torch, ONNX Runtime and OpenVINO, batch 1 and 4, INT8 and FP16 candidates."""
    config = load_config(None, ['data.path="builtin:digits"', "data.calib_size=128", "quantize.calib_size=64",
                                'quantize.quantizers=["onnxruntime-dynamic", "fp16"]', "measure.batch_sizes=[1, 4]",
                                *FAST])
    run_dir = tmp_path_factory.mktemp("report") / "digits-run"
    run_pipeline(digits_model, "digits", config, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, digits_model) -> Path:
    """A real run of the same model on an ImageFolder of digits (another dataset), ONNX Runtime, one thread."""
    root = tmp_path_factory.mktemp("report-folder")
    data = write_digit_folder(root / "digits-folder", per_class=12, size=8, mode="L")
    config = load_config(None, [f'data.path="{data}"', "data.calib_size=20", "quantize.enabled=false",
                                'measure.runtimes=["onnxruntime"]', "measure.batch_sizes=[1]", "measure.threads=1",
                                *FAST])
    run_dir = root / "folder-run"
    run_pipeline(digits_model, "folder", config, run_dir)
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    """A private copy of a module-scoped run, so a test's report does not leak into another test."""
    return Path(shutil.copytree(run_dir, to))


class _Page(HTMLParser):
    """The parts of the page the tests read: tables (rows of cell texts), images, links, and the notes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.notes: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._note: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag == "table":
            self._table = (a.get("class") or "").replace("sortable", "").strip()
            self.tables.setdefault(self._table, [])
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = []
        if tag == "div" and a.get("class") == "note":
            self._note = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        if tag == "tbody":
            self._in_body = False
        if tag == "div" and self._note is not None:
            self.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._note is not None:
            self._note.append(data)


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _snapshot(root: Path, skip: str = "") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and not (skip and str(p.relative_to(root)).startswith(skip))}


# ------------------------------------------------------------------------------------------------ Pareto front


def test_pareto_front_on_known_points():
    points = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.90), (3.0, 0.95), (0.5, 0.50), (2.0, 0.95), (0.5, 0.40),
              (4.0, 0.99)]
    # (1.5, .90) loses to (1, .90); (3, .95) to (2, .95); (0.5, .40) to (0.5, .50); the equal pair both stay.
    assert pareto_front(points) == [True, True, False, False, True, True, False, True]
    assert pareto_front([]) == [] and pareto_front([(1.0, 0.1)]) == [True]


def _row(runtime: str, p50: float, top1: float, batch: int = 1, stage: str = "baseline") -> StageRecord:
    return StageRecord(stage=stage, runtime=runtime, precision="fp32", batch_size=batch, top1=top1,
                       latency_ms_p50=p50, latency_ms_p90=p50 * 1.2, latency_ms_p99=p50 * 1.5)


def test_pareto_marks_are_per_batch_size_and_per_runtime():
    records = [
        _row("onnxruntime", 0.20, 0.95),  # 0: fastest at top accuracy: front over all runtimes
        _row("openvino", 0.30, 0.95),  # 1: beaten by 0, but best of openvino: its runtime's front only
        _row("openvino", 0.40, 0.90),  # 2: beaten by 1 on its own runtime
        _row("onnxruntime", 0.10, 0.80, stage="prune"),  # 3: fastest of all, less accurate: front
        StageRecord(stage="baseline", runtime="torch", precision="bf16", batch_size=1, status="skipped",
                    reason="torch offers fp32 here"),  # 4: skipped, never on a front
        _row("openvino", 5.0, 0.80, batch=8),  # 5: alone at batch 8: front (not compared with batch 1)
    ]
    assert pareto_marks(records) == {0: "all", 1: "runtime", 3: "all", 5: "all"}


# ------------------------------------------------------------------------------------------------- one run


@pytest.mark.slow
def test_single_run_page_is_self_contained_with_every_record(tmp_path, digits_run):
    run_dir = _copy(digits_run, tmp_path / "run")
    records = read_records(run_dir / "records.jsonl")
    before = _snapshot(run_dir)
    files = write_report([run_dir])
    assert files.html == run_dir / "report.html" and files.markdown == run_dir / "report.md"
    text = files.html.read_text()
    assert f'<meta name="generator" content="{GENERATOR}">' in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)  # nothing fetched
    assert "<link" not in text and "@import" not in text and "url(" not in text
    page = _page(files.html)
    assert len(page.srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in page.srcs)
    assert all(h.startswith("#") for h in page.hrefs)

    rows = page.tables["records"]
    assert len(rows) == len(records) and any(r.status == "skipped" for r in records)
    for row, r in zip(rows, records):
        assert row[:5] == [r.stage, r.candidate or "", r.runtime, r.precision, str(r.batch_size)]
        if r.status == "ok":
            assert row[6] == f"{r.top1 * 100:.2f}" and row[10:13] == [
                f"{r.latency_ms_p50:.3f}", f"{r.latency_ms_p90:.3f}", f"{r.latency_ms_p99:.3f}"]
        else:
            assert row[5] == f"skipped: {r.reason}" and len(row) == 6

    # The front column against the definition, checked here by brute force per batch size.
    ok = [r for r in records if r.status == "ok"]
    for row, r in zip(rows, records):
        if r.status != "ok":
            continue
        rivals = [q for q in ok if q.batch_size == r.batch_size]
        beaten = any(q.latency_ms_p50 <= r.latency_ms_p50 and q.top1 >= r.top1
                     and (q.latency_ms_p50 < r.latency_ms_p50 or q.top1 > r.top1) for q in rivals)
        assert (row[5] == "★ all") == (not beaten), (row, r)

    markdown = files.markdown.read_text()
    linked = re.findall(r"!\[[^\]]*\]\((report-figures/[^)]+\.png)\)", markdown)
    assert len(linked) == 3 and all((run_dir / link).is_file() for link in linked)
    assert "| baseline |  | onnxruntime | fp32 | 1 |" in markdown  # the run's full table is still there
    assert "## Where the time goes" in markdown and "Where the time goes: " in text  # the chosen engine's profile
    assert "| block 0 attention |" in markdown
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before and k != "report.md"} == {
        k: v for k, v in before.items() if k != "report.md"}  # only the report's own files changed
    assert set(after) - set(before) == {"report.html", *linked}


@pytest.mark.slow
def test_report_replaces_its_own_files_but_nothing_of_the_users(tmp_path, digits_run):
    run_dir = _copy(digits_run, tmp_path / "run")
    write_report([run_dir])
    write_report([run_dir])  # its own report: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("<html>my notes</html>")
    with pytest.raises(InputError, match="was not written by `compress report`"):
        write_report([run_dir], out=mine)
    assert (mine / "report.html").read_text() == "<html>my notes</html>"
    assert not (mine / "report.md").exists() and not (mine / "report-figures").exists()


# ------------------------------------------------------------------------------------------------ several runs


@pytest.mark.slow
def test_comparison_shows_both_runs_side_by_side_and_names_the_datasets(tmp_path, digits_run, folder_run, caplog):
    a, b = _copy(digits_run, tmp_path / "a"), _copy(folder_run, tmp_path / "b")
    a_before, b_before = _snapshot(a), _snapshot(b)
    with caplog.at_level(logging.WARNING, logger="compress"):
        files = write_report([a, b])
    assert files.html == a / "compare" / "report.html"  # default: inside the first run, nothing else touched
    assert _snapshot(a, skip="compare") == a_before and _snapshot(b) == b_before
    folder_dataset = read_records(b / "records.jsonl")[0].dataset
    assert folder_dataset.startswith("folder:")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "different datasets" in warned and "builtin:digits" in warned and folder_dataset in warned

    page = _page(files.html)
    # one note on the datasets; the others can only be the INT8 check's, which depends on the CPU's kernels
    dataset_notes = [n for n in page.notes if "different datasets" in n]
    assert len(dataset_notes) == 1 and "builtin:digits" in dataset_notes[0] and folder_dataset in dataset_notes[0]
    assert all(n.startswith("Meant for INT8 but not executed in INT8: ") for n in page.notes if n not in dataset_notes)
    records_tables = [t for name, t in page.tables.items() if name == "records"]
    assert len(records_tables) == 1  # both runs' tables share the class, so their rows add up
    total = len(read_records(a / "records.jsonl")) + len(read_records(b / "records.jsonl"))
    assert len(page.tables["records"]) == total
    overview = page.tables[""][:2] if "" in page.tables else []
    assert [row[0] for row in overview] == ["a", "b"] and [row[3] for row in overview][1] == "1"
    side = page.tables["compare"]
    ra = next(r for r in read_records(a / "records.jsonl") if r.stage == "baseline" and r.runtime == "onnxruntime"
              and r.precision == "fp32" and r.batch_size == 1)
    rb = next(r for r in read_records(b / "records.jsonl") if r.stage == "baseline" and r.runtime == "onnxruntime")
    row = next(r for r in side if r[:4] == ["baseline", "onnxruntime", "fp32", "1"])
    assert row[4:] == [f"{ra.top1 * 100:.2f}", f"{ra.latency_ms_p50:.3f}", f"{rb.top1 * 100:.2f}",
                       f"{rb.latency_ms_p50:.3f}", f"×{rb.latency_ms_p50 / ra.latency_ms_p50:.2f}"]
    only_a = next(r for r in side if r[:4] == ["baseline", "torch", "fp32", "1"])
    assert only_a[6:] == ["–", "–", "–"]  # run b has no torch row: shown, not hidden
    assert len(page.srcs) == 3 + 3 + 1 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    markdown = files.markdown.read_text()
    assert "different datasets" in markdown and "## Run `a`" in markdown and "## Run `b`" in markdown
    assert all((files.markdown.parent / link).is_file()
               for link in re.findall(r"\]\((report-figures/[^)]+\.png)\)", markdown))


@pytest.mark.slow
def test_dataset_note_only_when_datasets_differ(digits_run, folder_run):
    same = [load_run(digits_run, "a"), load_run(digits_run, "b")]
    assert dataset_note(same) is None
    note = dataset_note([load_run(digits_run, "a"), load_run(folder_run, "b")])
    assert note and "a: builtin:digits" in note and "b: folder:" in note


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_bad_run_directories_are_one_clear_error(tmp_path, digits_run):
    with pytest.raises(InputError, match=r"nowhere is not a run directory \(does not exist\); pass the --out of a"):
        write_report([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty is not a run directory \(has no records.jsonl\)"):
        write_report([tmp_path / "empty"])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "records.jsonl").write_text("")
    with pytest.raises(InputError, match="holds no records"):
        write_report([tmp_path / "blank"])
    with pytest.raises(InputError, match="is given twice"):
        write_report([digits_run, digits_run])
    assert not (tmp_path / "empty" / "report.html").exists()


@pytest.mark.slow
def test_cli_report_writes_files_and_prints_one_line_errors(tmp_path, digits_run):
    run_dir = _copy(digits_run, tmp_path / "run")
    runner = CliRunner()
    ok = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "report.md").is_file()
    bad = runner.invoke(app, ["report", str(tmp_path / "missing")], catch_exceptions=False)
    assert bad.exit_code == 1
    assert "is not a run directory" in bad.output and "Traceback" not in bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) == 1


# ---------------------------------------------------------------------------------------------- in a browser


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(tmp_path, digits_run):
    from PIL import Image

    run_dir = _copy(digits_run, tmp_path / "run")
    files = write_report([run_dir])
    png = tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_report.py"), str(files.html), str(png),
                           "--width", "1400", "--height", "3000"], capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stderr
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    assert rgb.size == (1400, 3000)
    colours = rgb.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 200  # text, plots and tables, not a blank page
    pixels = rgb.resize((350, 750)).getdata()
    onnxruntime_blue = (0x1A, 0x73, 0xE8)  # the plots' colour for ONNX Runtime: the PNGs were decoded and drawn
    assert sum(1 for p in pixels if all(abs(c - t) < 40 for c, t in zip(p, onnxruntime_blue))) > 20
