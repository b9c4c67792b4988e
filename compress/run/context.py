"""What a stage is given and what it gives back: the run context, the stage input, the stage result, the plan entry.

A run is a list of ``Stage`` entries (``compress.run.plan``). The orchestrator (``compress.run.pipeline``) calls
each entry's ``run(StageInput, RunContext)`` and gets one ``StageResult``:

- a *model* stage (``takes="torch"``: baseline, prune, recover, tokens) returns the new PyTorch model; the
  orchestrator saves, exports, checks and measures it on every runtime, as for every other model stage (a run
  of an ONNX file starts instead with a baseline that takes and returns the file, measured the same way);
- an *ONNX* stage (``takes="onnx"``: quantize) works on the previous stage's float ONNX file and returns the
  records of what it made;
- a *records* stage (``takes="records"``: deploy) works on the records so far and returns an artifact.

``RunContext`` is frozen: it is fixed before the first stage and shared by all of them, so no stage takes a long
list of positional arguments. ``StageInput`` is what the previous stages handed on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from calibration.datasets import Subset
from calibration.evaluate import EvalResult
from calibration.preprocess import Preprocess
from compress.config import RunConfig
from compress.records import StageRecord

if TYPE_CHECKING:
    from compress.model.vit import VisionTransformer

Progress = Callable[[str, int, int], None]  # (what, done, total)
Takes = Literal["torch", "onnx", "records"]


@dataclass(frozen=True)
class RunContext:
    """Everything the stages of one run share, fixed before the first stage runs."""

    config: RunConfig
    run_dir: Path
    dataset: str  # the dataset's name, as records carry it
    train_data: Subset
    calib_data: Subset
    eval_data: Subset
    teacher: VisionTransformer | None  # the model as loaded (None for an ONNX file): pruning's reference and teacher
    parity_inputs: np.ndarray  # (<=32, C, H, W) real images: export and runtime parity
    latency_input: np.ndarray  # (B_max, C, H, W) real images: latency at every batch size
    threads: int
    progress: Progress | None = None
    judge: str = "fp32"  # the float precision models are judged in (measure.judge_precision, resolved)

    @property
    def preprocess(self) -> Preprocess:
        return self.eval_data.preprocess

    @property
    def input_shape(self) -> tuple[int, int, int]:
        pre = self.preprocess
        return pre.in_chans, pre.crop_size, pre.crop_size

    def say(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    def engine(self, path: Path, runtime: str, precision: str = "fp32"):
        """An engine of the ONNX file ``path`` on ``runtime``, with the run's thread count."""
        from runtimes import get_runtime

        return get_runtime(runtime).build(path, precision=precision, threads=self.threads)

    def judging_on(self, runtime: str) -> str:
        """The float precision a setting is judged in on ``runtime``: the run's (``judge``) where that runtime runs
        it, else fp32."""
        from runtimes import get_runtime

        return self.judge if self.judge == "fp32" or self.judge in get_runtime(runtime).precisions() else "fp32"

    def time(self, engine, x: np.ndarray, *, warmup: int | None = None):
        """Latency statistics of ``engine`` at the batch of ``x``, under the run's measurement settings."""
        from runtimes import measure_latency

        m = self.config.measure
        return measure_latency(engine, x, threads=self.threads, warmup=m.warmup if warmup is None else warmup,
                               iterations=m.iterations, max_seconds=m.max_seconds)

    def export(self, model: VisionTransformer, path: Path, parity_inputs: np.ndarray):
        """Export ``model`` to ``path`` with the run's ``[export]`` settings (in the graph form of its first runtime:
        ``compress.config.export_graph``), checked against PyTorch on
        ``parity_inputs`` in ONNX Runtime (``ParityError``); the ``ExportResult``. Every export of a run goes
        through here, so a stage's temporary files and its artifacts are made alike."""
        from compress.config import export_graph
        from compress.model.runtime_graph import for_runtime
        from export.onnx_export import export_onnx

        e = self.config.export
        model = for_runtime(model, export_graph(self.config))  # a rewritten copy where the run's runtime asks
        return export_onnx(model, path, example=torch.from_numpy(parity_inputs[:2].copy()), opset=e.opset,
                           exporter=e.exporter, simplify=e.simplify, atol=e.atol_for(model),
                           min_agreement=e.min_agreement, parity_inputs=parity_inputs)

    @contextlib.contextmanager
    def exported(self, model: VisionTransformer, parity_inputs: np.ndarray) -> Iterator[Path]:
        """``model`` as a temporary FP32 ONNX file (``export``), removed on leaving."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "candidate.onnx"
            self.export(model, path, parity_inputs)
            yield path


@dataclass(frozen=True)
class StageInput:
    """What the stages before hand to the next: the current model, its float ONNX file, and the records so far."""

    key: str  # this stage's content hash: its artifacts and its marker carry it
    previous: str | None  # the stage before, None for the first
    model: VisionTransformer | None  # the current PyTorch model (None in a run that has only an ONNX file)
    onnx: Path | None  # the current float model as validated ONNX
    records: tuple[StageRecord, ...]  # every record so far
    reference: EvalResult | None  # the baseline's predictions on the evaluation split (its first runtime)
    budget_left: float | None  # top-1 points the chain's budget (pipeline.max_drop) still allows; None: no chain budget
    state_dir: Path  # where the stage may keep resumable state (recovery's training state)
    new_record: Callable[..., StageRecord]  # a record with this stage's common fields (``measure.LazyRecorder``)

    def stage_budget(self, max_drop: float, share: float) -> float:
        """The top-1 points a stage that judges its own settings may spend: its own ``max_drop`` without a chain
        budget; under one, ``share`` of what the stages before left (none when they spent it all)."""
        return max_drop if self.budget_left is None else max(0.0, self.budget_left) * share


@dataclass
class StageResult:
    """What a stage gives back: the model or artifact it produced, notes for its marker, and its records."""

    model: VisionTransformer | None = None  # a model stage's output; the orchestrator exports and measures it
    artifact: Path | None = None  # an ONNX or records stage's product (a bundle)
    notes: dict[str, Any] = field(default_factory=dict)  # written into ``stages/<name>.json``
    records: list[StageRecord] = field(default_factory=list)  # records the stage measured itself
    # The output model's top-1 as the stage already scored it on the whole evaluation split, by (runtime,
    # precision), from the same export: the orchestrator takes it instead of scoring the same model again.
    scored: dict[tuple[str, str], EvalResult] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One entry of a run's plan."""

    name: str
    takes: Takes
    run: Callable[[StageInput, RunContext], StageResult]
    # What goes into the stage's content hash besides the previous stage's key, the measurement and data settings:
    # the stage's options, and for a model stage the export settings.
    options: dict[str, Any] = field(default_factory=dict)
    measured: bool = False  # the orchestrator measures what it returns (a float model, or a float ONNX file)


def bisect_settings(count: int, attempt: Callable[[int], bool]) -> None:
    """Try settings ``0..count-1``, ordered from the mildest to the strongest, by bisection: the middle one first,
    then the stronger half if it fits (``attempt(i)`` tries setting ``i`` and says whether it fits), else the milder
    half. A stronger setting seldom costs less than a milder one, so of three, two are tried, and the last one that
    fitted is the strongest that does. The prune stage's targets and the tokens stage's settings go through it."""
    lo, hi = 0, count - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid + 1
        else:
            hi = mid - 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def format_seconds(seconds: float) -> str:
    """A wall time as people read it: seconds under two minutes, minutes above."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
