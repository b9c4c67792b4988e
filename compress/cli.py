"""The ``compress`` command: thin typer commands over the library, in the manner of fastapi-cli.

A ``CompressError`` (or one of the leaf packages' user errors) becomes one line on stderr and exit code 1;
anything else is a bug and shows its traceback. Heavy libraries (torch, ONNX Runtime, OpenVINO) are imported
inside the commands, so ``compress --help`` is fast.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from compress.config import TARGETS, RunConfig
from compress.recipes import BUILTIN_RECIPES
from runtimes import RUNTIME_NAMES

# rich_markup_mode=None: help is printed as written, so "[model]" stays "[model]" (rich markup would eat it).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Shrink Vision Transformers and measure them on real runtimes.")


class _AboveBars(io.TextIOBase):
    """stderr for rich, written through ``tqdm.write`` so that log lines go above the progress bars, not through
    them."""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _Lines(io.TextIOBase):
    """For a log file or CI: each of tqdm's in-place redraws (a carriage return, then the bar) as its own line."""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


console = Console(file=_AboveBars())

RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help=(
    f"A built-in recipe ({', '.join(BUILTIN_RECIPES)}) or a TOML file with any of the sections "
    f"{', '.join(f'[{name}]' for name in RunConfig.model_fields)}"))]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: section.key=value")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs")]
ExpectOpt = Annotated[Optional[str], typer.Option("--expect", help="Refuse the bundle unless its identity is this sha256:DIGEST (compress deploy prints it)")]
PublicKeyOpt = Annotated[Optional[Path], typer.Option("--public-key", help="Refuse the bundle unless manifest.sig is this Ed25519 public key's signature")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="ImageFolder or idx directory, or builtin:digits")]


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False)
    for name in ("compress", "calibration", "export", "runtimes"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
    # The ONNX exporter notes at WARNING that torchvision ops are unavailable; they are irrelevant to a ViT.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _fail(message: str) -> None:
    # The message is the user's data (paths, "[preprocess]"): escaped, so rich prints it and never reads it as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _plain(message: str) -> None:
    """Print a line that holds the user's data (paths, names in brackets) exactly, without rich markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _guard(fn):
    """Run ``fn``; user errors become one line and exit code 1."""
    from compress.errors import USER_ERRORS

    try:
        return fn()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): every atomic write has removed its temporary file
        console.print("interrupted; rerun the same command to resume")
        raise typer.Exit(130) from None
    except USER_ERRORS as e:
        _fail(str(e))
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        _fail(f"cannot write {e.filename or 'the output'}: {e.strerror}; free space or choose a writable --out, then "
              "rerun the same command (finished stages are kept)")


class _ProgressBars:
    """Renders the library's (what, done, total) progress callbacks as tqdm bars, one per piece of work, with the
    time left. On a terminal they redraw in place; elsewhere (a log file, CI, ``nohup``) work that lasts longer
    than ``min_interval_s`` prints a line at most every ``min_interval_s`` seconds, and quick work prints nothing."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.min_interval_s = 15.0  # without a terminal: seconds before the first line, and between lines
        self.bars: dict = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(what)
        if bar is None or bar.disable:
            quiet = {} if self.live else {"file": _Lines(), "mininterval": self.min_interval_s,
                                          "delay": self.min_interval_s,
                                          "bar_format": "{desc}: {n}/{total} ({percentage:.0f}%), {elapsed} elapsed, "
                                                        "about {remaining} left"}
            bar = self.bars[what] = tqdm(total=total, desc=what, unit="", dynamic_ncols=self.live, leave=True,
                                         **({"file": sys.stderr} | quiet))
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[what]

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _train_progress(bars: _ProgressBars):
    def report(p) -> None:
        bars(p.phase, p.step, p.total_steps)
        if p.eval_top1 is not None:
            console.print(f"epoch {p.epoch}: loss {p.loss:.3f}, held-out top-1 {p.eval_top1:.4f}")

    return report


@app.command()
def train(
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for model.safetensors, train.json, and resume state")] = Path("runs/train"),
    init: Annotated[Optional[Path], typer.Option("--init", help="Checkpoint to fine-tune instead of training from scratch")] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a ViT from scratch (or fine-tune --init) on a dataset; resumes an interrupted run in --out."""
    _setup_logging(verbose)

    def job():
        from compress.api import train_model

        config = _resolve_config(recipe, set_, data)
        with _ProgressBars() as bars:
            _, summary = train_model(config.data.path, out=out, recipe=config, init=init,
                                     progress=_train_progress(bars))
        if not summary:  # a torchrun rank other than 0: rank 0 reports
            return
        console.print(f"trained in {summary['seconds']:.0f} s: top-1 {summary['eval_top1']:.4f} on "
                      f"{summary['eval_images']} held-out images -> {out / 'model.safetensors'}")

    _guard(job)


@app.command()
def run(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint (ours, timm, Hugging Face dir, vit-pytorch, nn.TransformerEncoder) or an ONNX classifier")] = None,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (new, or a run of the same inputs to resume)")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Train a small ViT on the built-in digits and run everything")] = False,
    runtime: Annotated[Optional[list[str]], typer.Option("--runtime", help=f"Runtime to measure (repeat): {', '.join(RUNTIME_NAMES)}; default torch, onnxruntime and openvino")] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the staged pipeline on CHECKPOINT and write RUN_DIR/records.jsonl and report.md."""
    _setup_logging(verbose)

    def job():
        from compress.api import run_recipe
        from compress.demo import DEMO_RECIPE

        if demo == (checkpoint is not None):
            _fail("pass a CHECKPOINT with --data, or --demo (not both)")
        extra = [f"measure.runtimes={json.dumps(runtime)}"] if runtime else []
        config = _resolve_config(recipe, set_, data, extra, base=DEMO_RECIPE if demo else None)
        run_dir = out or Path("runs/demo" if demo else f"runs/{checkpoint.stem}")
        with _ProgressBars() as bars:
            model, checkpoint_id = _demo_checkpoint(config, run_dir, bars) if demo else (checkpoint, None)
            result = run_recipe(model, config.data.path, out=run_dir, recipe=config, checkpoint_id=checkpoint_id,
                                progress=bars)
        if not result.records and not result.resumed_stages:  # a torchrun rank that only served fine-tuning
            return
        if result.resumed_stages:
            _plain(f"resumed: stages {', '.join(result.resumed_stages)} were done in an earlier run")
        _print_table(result.records)
        summary = json.loads((run_dir / "stages" / "pipeline.json").read_text())
        chosen = summary["selected"]
        if summary.get("broke_at"):
            _plain(f"budget: broke at stage {summary['broke_at']['stage']} "
                          f"(budget {summary['budget_pt']:.2f} pt; see report.md)")
        # The rule `compress deploy` applies to the same records: the bundle holds what this line names.
        _plain(f"chosen for {summary['target']}: {chosen['candidate']} on {chosen['runtime']} "
                      f"{chosen['precision']}, top-1 {chosen['top1'] * 100:.2f}%, {chosen['latency_ms_p50']:.3f} ms "
                      f"(within {summary['budget_pt']:g} pt)" if "none" not in chosen
                      else f"chosen for {summary['target']}: nothing within budget ({chosen['none']})")
        if summary.get("budget_unsure"):
            _plain(f"caution: {summary['budget_unsure']}")
        if summary.get("bundle"):
            _plain(f"bundle:  {run_dir / summary['bundle']} ({summary['bundle_digest']})")
        took = summary.get("stage_seconds") or {}
        if took:  # each stage's wall time when it ran, in this command or the run it resumed
            from compress.run.context import format_seconds

            _plain("time:    " + ", ".join(f"{stage} {format_seconds(sec)}" for stage, sec in took.items())
                   + f" (all stages: {format_seconds(sum(took.values()))})")
        _plain(f"records: {run_dir / 'records.jsonl'}\nreport:  {run_dir / 'report.md'}")

    _guard(job)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (the --out of `compress run`); several are compared", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for report.html, report.md and report-figures/ (default: the run's own folder; for several runs, compare/ in the first)")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write one self-contained report.html (plots, every record, the environment) and report.md from the records
    of one or more runs; measures nothing."""
    _setup_logging(verbose)

    def job():
        from compress.report.html import write_report

        files = _with_status("drawing the report", lambda: write_report(run_dirs, out=out))
        _plain(f"report:   {files.html}\nmarkdown: {files.markdown} (plots in {files.markdown.parent / 'report-figures'})")

    _guard(job)


@app.command()
def deploy(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (the --out of `compress run`)", show_default=False)],
    target: Annotated[str, typer.Option("--target", help=f"Target device: {', '.join(TARGETS)}")],
    out: Annotated[Path, typer.Option("--out", help="The bundle directory to write (BUNDLE.tar.gz goes beside it)")],
    candidate: Annotated[Optional[str], typer.Option("--candidate", help="Deploy this stage or candidate, not the fastest")] = None,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Restrict the choice to one of the target's runtimes (cpu-x86 and cpu-arm: openvino, onnxruntime)")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy budget in top-1 points (default: the run's own budget)")] = None,
    sign: Annotated[Optional[Path], typer.Option("--sign", help="Sign the manifest with this Ed25519 private key (PEM); devices check it with --public-key")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Pack the fastest model within the accuracy budget for a target device, with a runner that needs no torch."""
    _setup_logging(verbose)

    def job():
        from compress.deploy.bundle import deploy as make_bundle

        make_bundle(run_dir, target, out, candidate=candidate, runtime=runtime, max_drop=max_drop, sign=sign,
                    log=_plain)

    _guard(job)


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="A deployment bundle (the --out of `compress deploy`)", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="ImageFolder with the model's classes, for top-1")] = None,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Another of the bundle's runtimes (its manifest lists them: onnxruntime, openvino or tensorrt)")] = None,
    batch: Annotated[Optional[list[int]], typer.Option("--batch", help="Batch sizes (default: the run's)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where records.jsonl goes (default: BUNDLE/device/HOST-RUNTIME)")] = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Time budget per batch size")] = 10.0,
    expect: ExpectOpt = None,
    public_key: PublicKeyOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Measure a bundle on this device; the records (appended, never replaced) join `compress report`."""
    _setup_logging(verbose)

    def job():
        from compress.deploy.runner import bench as run_bench

        path, _ = run_bench(bundle, runtime=runtime, batch_sizes=batch, data=data, out=out, seconds=seconds,
                            expect=expect, public_key=public_key, log=_plain)
        _plain(f"records: {path}")

    _guard(job)


@app.command("build-engine")
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="A jetson-orin deployment bundle", show_default=False)],
    dla_core: Annotated[Optional[int], typer.Option("--dla-core", help="Build for this DLA core (GPU fallback on)")] = None,
    workspace_mb: Annotated[int, typer.Option("--workspace-mb", help="TensorRT workspace limit")] = 1024,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch of the optimization profile")] = 32,
    expect: ExpectOpt = None,
    public_key: PublicKeyOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Build the TensorRT engine of a bundle on this device (engines do not move between GPUs)."""
    _setup_logging(verbose)

    def job():
        from compress.deploy.runner import build_engine as build

        path = build(bundle, workspace_mb=workspace_mb, max_batch=max_batch, dla_core=dla_core, expect=expect,
                     public_key=public_key, log=_plain)
        _plain(f"engine: {path}")

    _guard(job)


def _with_status(what: str, fn):
    with console.status(what):
        return fn()


def _demo_checkpoint(config, run_dir: Path, bars: _ProgressBars):
    """Train the demo model once (resumable) in ``<RUN_DIR>-train`` beside the run directory."""
    from compress.api import load_model, train_model
    from compress.io import sha256_file

    train_dir = run_dir.parent / f"{run_dir.name}-train"
    model_path = train_dir / "model.safetensors"
    if not model_path.exists():
        console.print("demo: training a small ViT on scikit-learn's digits")
        _, summary = train_model(config.data.path, out=train_dir, recipe=config, progress=_train_progress(bars))
        console.print(f"demo: trained in {summary['seconds']:.0f} s, top-1 {summary['eval_top1']:.4f}")
    return load_model(model_path), sha256_file(model_path)


def _print_table(records) -> None:
    from rich import box
    from rich.table import Table

    from compress.report.columns import CONSOLE, rows

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False,
                  title="top-1 and latency per stage and runtime (every column: report.md)")
    ok = [r for r in records if r.status == "ok"]
    lines = [[r.candidate or cells[0], *cells[1:]]  # a candidate (quantized, or a token setting) is shown by its name
             for r, cells in zip(ok, rows(ok, CONSOLE))]
    for n, column in enumerate(CONSOLE):
        if n == 0:  # the name gives way, with an ellipsis, so that no number is ever cut
            table.add_column(column.console, no_wrap=True, overflow="ellipsis", max_width=18)
        else:
            width = max([len(column.console), *(len(line[n]) for line in lines)])
            table.add_column(column.console, no_wrap=True, min_width=width)
    for line in lines:
        table.add_row(*line)
    Console().print(table)


def _resolve_config(recipe: Path | None, sets: list[str] | None, data: str | None, extra: list[str] = (),
                    base: dict | None = None):
    """defaults < base < recipe < --set < --data and the command's own options; a dataset is required."""
    from compress.config import load_config

    overrides = [*(sets or []), *([f"data.path={json.dumps(str(data))}"] if data else []), *extra]
    config = load_config(recipe, overrides, base=base)
    if config.data.path is None:
        _fail("no dataset: pass --data DIR (an ImageFolder or idx directory, or builtin:digits)")
    return config


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every atomic write removes its temporary file


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it so: restore Ctrl-C's meaning.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
