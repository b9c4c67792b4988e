"""What every quantizer shares: its inputs (``QuantizeContext``), its output (``Candidate``) and its errors."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from calibration.calibrate import CalibrationSet
from calibration.datasets import Subset
from compress.errors import CompressError

if TYPE_CHECKING:
    from calibration.evaluate import EvalResult

FORMATS = ("onnx", "openvino")


class QuantizeError(CompressError):
    """A quantizer that cannot run: a missing library, or a budget no candidate meets."""


def require(module: str, package: str) -> Any:
    """Import ``module`` or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QuantizeError(f"this quantizer needs {package}, which is not installed; pip install {package}") from e


@dataclass(frozen=True)
class Candidate:
    """One quantized (or reduced-precision) model, ready to be measured."""

    name: str  # e.g. "ort-static-minmax"
    quantizer: str  # the library call that made it, e.g. "onnxruntime.quantization.quantize_static"
    precision: str  # "int8", "fp16" or "bf16"
    path: Path  # .onnx, or .xml for OpenVINO IR
    format: str  # one of FORMATS
    calibration: dict[str, Any] | None  # {"method": ..., "size": ...}; None when none was used
    float_layers: tuple[dict[str, str], ...] = ()  # {"name": layer, "reason": why it stayed in float}
    top1: float | None = None  # measured on the evaluation split while fitting the budget
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizeContext:
    """Everything a quantizer may use. ``evaluate(path, format, precision)`` returns top-1 on the eval split."""

    model: Any  # the float VisionTransformer of the previous stage
    float_onnx: Path
    calib: CalibrationSet
    evaluate: Callable[[Path, str, str], float]
    reference_top1: float  # the float model's top-1 on the same split and runtime family
    max_drop: float  # points
    workdir: Path
    max_float_fraction: float = 0.5  # the budget may return at most this share of the target layers to float
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    exclude: tuple[str, ...] = ()
    attention_matmul: bool = False
    activations: str = "int8"
    calibration_method: str = "minmax"
    sensitivity_samples: int = 64
    inc_max_trials: int = 4
    smoothquant_alpha: float | None = 0.5
    nncf_smooth_quant: bool = True
    nncf_ac_max_iterations: int = 8
    nncf_accuracy_control: bool = True
    threads: int = 1
    log: Callable[[str], None] = print

    def fallback(self, ranking: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The part of a sensitivity ranking the budget may return to float (a mostly-float model is no INT8)."""
        return ranking[: int(len(ranking) * self.max_float_fraction)]

    def drop(self, top1: float) -> float:
        return (self.reference_top1 - top1) * 100

    def within_budget(self, top1: float) -> bool:
        return self.drop(top1) <= self.max_drop + 1e-9


def artifact_evaluator(eval_data: Subset, *, threads: int, batch_size: int = 64,
                       scored: ScoredFiles | None = None) -> Callable[[Path, str, str], float]:
    """``evaluate(path, format, precision) -> top-1`` on ``eval_data``: OpenVINO for its IR and for BF16, ONNX
    Runtime for every other ONNX file (the runtime every QDQ candidate must load). ``scored`` keeps each file's
    predictions, so the stage that measures the candidate afterwards need not score it again."""
    from calibration.evaluate import evaluate_top1
    from runtimes import get_runtime

    def evaluate(path: Path, fmt: str, precision: str) -> float:
        name = "openvino" if fmt == "openvino" or precision == "bf16" else "onnxruntime"
        engine = get_runtime(name).build(path, precision=precision, threads=threads)
        result = evaluate_top1(engine.run, eval_data, batch_size=batch_size)
        if scored is not None:
            scored.keep(path, name, precision, result)
        return result.top1

    return evaluate


class ScoredFiles:
    """Predictions of model files on the whole evaluation split, by (file, runtime, precision), each valid while the
    file is unchanged (its size and modification time as when it was scored): a quantizer that rewrites a file
    after scoring it leaves nothing to reuse."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str, str], tuple[tuple[int, int], EvalResult]] = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = Path(path).stat()
        return st.st_size, st.st_mtime_ns

    def keep(self, path: Path, runtime: str, precision: str, result: EvalResult) -> None:
        self._kept[(str(path), runtime, precision)] = (self._stamp(path), result)

    def get(self, path: Path, runtime: str, precision: str) -> EvalResult | None:
        kept = self._kept.get((str(path), runtime, precision))
        if kept is None or not Path(path).exists() or self._stamp(path) != kept[0]:
            return None
        return kept[1]


def target_layers(proto: onnx.ModelProto, ctx: QuantizeContext) -> tuple[list[str], list[str]]:
    """(names to quantize, names excluded by the user) among the graph's compute nodes.

    By default only nodes with a constant weight (the Linear layers and the patch-embedding convolution) are
    targets; ``attention_matmul`` adds the activation x activation MatMuls of attention. LayerNorm, Softmax,
    GELU and the residual Add are never targets.
    """
    inits = {i.name for i in proto.graph.initializer}
    targets, excluded = [], []
    for node in proto.graph.node:
        if node.op_type not in ctx.op_types:
            continue
        weighted = len(node.input) > 1 and node.input[1] in inits
        if not weighted and not ctx.attention_matmul:
            continue
        if any(layer_matches(node.name, pattern) for pattern in ctx.exclude):
            excluded.append(node.name)
        else:
            targets.append(node.name)
    unmatched = [p for p in ctx.exclude if not any(layer_matches(n.name, p) for n in proto.graph.node)]
    if unmatched:
        names = [n.name for n in proto.graph.node if n.op_type in ctx.op_types and not n.name.startswith("node_")]
        raise QuantizeError(f"quantize.exclude {unmatched} match no layer; layer names look like {names[:4]}")
    return targets, excluded


def layer_matches(name: str, pattern: str) -> bool:
    """Whether the layer ``name`` is ``pattern`` (a name or glob) or one of its parts: "blocks.0.attn.qkv" covers
    the three projections ("blocks.0.attn.qkv.q", ...) an OpenVINO-shaped export splits it into."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def user_excluded(names: list[str]) -> tuple[dict[str, str], ...]:
    return tuple({"name": n, "reason": "excluded by quantize.exclude"} for n in names)
