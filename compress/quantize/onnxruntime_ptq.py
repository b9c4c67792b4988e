"""ONNX Runtime post-training quantization: ``quantize_static`` (QDQ) and ``quantize_dynamic``.

Static: per-channel symmetric INT8 weights, INT8 symmetric activations by default (what TensorRT's explicit
quantization accepts; ``quantize.activations = "uint8"`` gives ONNX Runtime's asymmetric U8S8 instead),
MinMax, Entropy or Percentile calibration on the streamed calibration set, only the target layers of
``base.target_layers``. Calibration runs ``CALIB_BATCH`` images at a time, each run folded into the ranges
before the next (ONNX Runtime's strided calibration), so peak memory follows that batch, not the calibration
set. Over budget, layers go back to float by graph surgery on the QDQ model, most sensitive first
(``sensitivity.layer_sensitivity``), with no re-calibration.

Dynamic: INT8 weights, activation ranges computed per batch at run time (no calibration data needed; ONNX
Runtime's ``DynamicQuantizeLinear`` + ``MatMulInteger``, an ONNX Runtime format). Over budget it re-quantizes
with ``nodes_to_exclude`` using the static candidate's sensitivity ranking when there is one.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from calibration.calibrate import CalibrationSet, onnxruntime_reader
from compress.io import atomic_write
from compress.quantize.base import Candidate, QuantizeContext, QuantizeError, target_layers, user_excluded
from compress.quantize.budget import fit_budget, fit_qdq
from compress.quantize.qdq import QdqGraph, unquantize_graph_outputs

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")

# Images per calibration run. ONNX Runtime's calibration model keeps every calibrated tensor of a run alive at
# once (MinMax's added ReduceMin/ReduceMax nodes run after the rest of the graph in the default node order; Entropy
# and Percentile return the tensors whole and hold them until the histograms are built, for the whole set unless
# strided), so memory grows with the images per run. On the pruned ViT-B/16 chain (EViT, 8 of 12 layers at 197
# tokens), a MinMax calibration process peaked at 7.2 GB in runs of 32 images and at 2.0 GB in runs of 4, with the
# same scales and in less time; Entropy at 7.3 GB in one pass and 2.0 GB folded per run of 4. Folded histograms bin
# differently (Entropy scales moved), but on the CIFAR-10 ViT the top-1 of each method stayed within 0.03 pt of its
# one-pass form (python bench/calibration_memory.py; BENCHMARKS.md, "Memory").
CALIB_BATCH = 4


def run_quantize_static(
    float_onnx: Path, out: Path, calib: CalibrationSet, input_name: str, method: str, op_types: Sequence[str], *,
    nodes: list[str] | None = None, signed: bool = True, images_per_run: int = CALIB_BATCH, strided: bool = True,
) -> None:
    """``onnxruntime.quantization.quantize_static`` to Q/DQ with this project's options, calibrated on ``calib``.

    Only ``nodes`` (default: every node of ``op_types``) get Q/DQ; every tensor of ``op_types`` is calibrated.
    ``images_per_run`` and ``strided`` exist to compare with ONNX Runtime's one-pass form (the set's own batches,
    ``strided=False``), as ``bench/calibration_memory.py`` and the tests do.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # Q/DQ only on the inputs of the target layers: no INT32 bias (TensorRT has no INT32 DQ) and no
    # quantized outputs (the following bias Add and residual stay float: INT8 on the residual stream
    # destroys ViT accuracy, NVIDIA/TensorRT#4084).
    extra = {"ActivationSymmetric": signed, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": list(op_types)}
    if strided:
        extra["CalibStridedMinMax"] = 1  # fold every run into the ranges (histograms) before the next; any method
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    quantize_static(
        str(float_onnx), str(out), onnxruntime_reader(calib, input_name, images_per_run),
        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types), per_channel=True,
        activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=nodes, calibrate_method=calib_method, extra_options=extra,
    )


def quantize_static_qdq(
    ctx: QuantizeContext, method: str | None = None
) -> tuple[Candidate | None, list[tuple[str, float]]]:
    """The static QDQ candidate fitted to the budget (None when nothing fits), and its sensitivity ranking."""
    method = method or ctx.calibration_method
    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose from {list(METHODS)}")
    float_proto = onnx.load(str(ctx.float_onnx))
    targets, excluded = target_layers(float_proto, ctx)
    name = f"ort-static-{method}"
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        out = Path(tmp) / "qdq.onnx"
        ctx.log(f"{name}: calibrating on {ctx.calib.size} images")
        run_quantize_static(ctx.float_onnx, out, ctx.calib, float_proto.graph.input[0].name, method, ctx.op_types,
                            nodes=targets, signed=ctx.activations == "int8")
        graph = QdqGraph.from_quantize_static(onnx.load(str(out)), float_proto)
    graph.proto = unquantize_graph_outputs(graph.proto)
    calibration = {"method": method, "size": ctx.calib.size, "source": ctx.calib.name}
    candidate, ranking = fit_qdq(ctx, graph, name, "onnxruntime.quantization.quantize_static", calibration, excluded)
    return candidate, ranking


def quantize_dynamic_int8(ctx: QuantizeContext, ranking: list[tuple[str, float]] | None = None) -> Candidate | None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_proto = onnx.load(str(ctx.float_onnx))
    targets, excluded = target_layers(float_proto, ctx)
    targets = [t for t in targets if next(n for n in float_proto.graph.node if n.name == t).op_type != "Conv"]
    name = "ort-dynamic"
    path = ctx.workdir / f"{name}.onnx"

    def build(in_float: list[str]) -> Path:
        return atomic_write(path, lambda tmp: quantize_dynamic(
            str(ctx.float_onnx), str(tmp), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
            weight_type=QuantType.QInt8, nodes_to_quantize=[t for t in targets if t not in in_float]))

    first = ctx.evaluate(build([]), "onnx", "int8")
    ctx.log(f"{name}: top-1 {first * 100:.2f} (drop {ctx.drop(first):+.2f} pt)")
    calibration = {"method": "activation ranges computed per batch at run time", "size": 0}
    if ctx.within_budget(first):
        return Candidate(name, "onnxruntime.quantization.quantize_dynamic", "int8", path, "onnx", calibration,
                         user_excluded(excluded), first)
    # ranked by the static candidate's sensitivity when it ran; otherwise the last layers first
    ranking = [(n, v) for n, v in (ranking or []) if n in targets] or [(t, 0.0) for t in reversed(targets)]
    ranking = ctx.fallback(ranking)
    result = fit_budget(build, lambda p: ctx.evaluate(p, "onnx", "int8"), ranking, reference_top1=ctx.reference_top1,
                        max_drop=ctx.max_drop, first_top1=first, score="static NSR", log=ctx.log)
    if result.artifact is None:
        path.unlink(missing_ok=True)
        return None
    build([n for n, _ in ranking[: len(result.float_layers)]])  # bisection may have evaluated another last
    return Candidate(name, "onnxruntime.quantization.quantize_dynamic", "int8", path, "onnx", calibration,
                     user_excluded(excluded) + result.float_layers, result.top1)
