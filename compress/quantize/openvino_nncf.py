"""NNCF post-training quantization of the OpenVINO model, and NNCF's own accuracy control.

``nncf.quantize(..., model_type=ModelType.TRANSFORMER)`` is NNCF's transformer recipe: INT8 MatMuls (with
SmoothQuant, unless ``quantize.nncf_smooth_quant=false``), LayerNorm, Softmax and GELU kept in float, symmetric
("performance" preset). When that misses the budget, ``nncf.quantize_with_accuracy_control(max_drop=...,
drop_type=ABSOLUTE)`` ranks groups of quantizers by their harm and reverts the worst until the drop fits; the
layers it reverted are read back by comparing which MatMul/Conv inputs carry FakeQuantize before and after. The
candidate is an OpenVINO IR (``.xml``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from calibration.calibrate import CalibrationSet, Reiterable, nncf_dataset
from compress.quantize.base import Candidate, QuantizeContext, require

COMPUTE_TYPES = ("MatMul", "Convolution")
RANKING_SUBSET = 300  # images each quantizer group is ranked on by the accuracy control (NNCF's default)


def quantize_openvino(
    ctx: QuantizeContext, eval_batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]] | None = None,
    eval_count: int = 0,
) -> Candidate | None:
    """``eval_batches()`` streams (images, labels) of the evaluation split for the accuracy control."""
    nncf = require("nncf", "nncf")
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from compress.run.context import format_seconds

    name, path = "nncf-ov", ctx.workdir / "nncf-ov.xml"
    smooth = "SmoothQuant" if ctx.nncf_smooth_quant else "no SmoothQuant"
    ctx.log(f"{name}: nncf.quantize (ModelType.TRANSFORMER, {smooth}) on {ctx.calib.size} images")
    model = ov.Core().read_model(str(ctx.float_onnx))
    quantized = transformer_int8(model, ctx.calib, smooth_quant=ctx.nncf_smooth_quant, exclude=ctx.exclude)
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    started = time.perf_counter()
    top1 = ctx.evaluate(path, "openvino", "int8")
    one_pass = time.perf_counter() - started  # seconds for the evaluation split, in INT8
    ctx.log(f"{name}: top-1 {top1 * 100:.2f} (drop {ctx.drop(top1):+.2f} pt)")
    calibration = {"method": f"nncf minmax (ModelType.TRANSFORMER, {smooth})", "size": ctx.calib.size,
                   "source": ctx.calib.name}
    excluded = tuple({"name": p, "reason": "excluded by quantize.exclude"} for p in ctx.exclude)
    if ctx.within_budget(top1) or eval_batches is None:  # without accuracy control the caller judges it
        return Candidate(name, "nncf.quantize", "int8", path, "openvino", calibration, excluded, top1)
    before = _quantized_ops(quantized)
    # NNCF scores the float and the INT8 model on the split, ranks each quantizer group on a subset (300 images
    # by default), then reverts groups one at a time with a pass after each: an upper bound in passes
    ranked = min(RANKING_SUBSET, eval_count)  # images per quantizer group
    passes = 3 + len(before) * ranked / max(eval_count, 1) + ctx.nncf_ac_max_iterations  # float pass: two INT8 ones
    ctx.log(f"{name}: over the {ctx.max_drop:.2f} pt budget; running nncf.quantize_with_accuracy_control: up to about "
            f"{format_seconds(passes * one_pass)} ({len(before)} quantized ops ranked on "
            f"{ranked} images each, then at most {ctx.nncf_ac_max_iterations} reverts "
            f"(quantize.nncf_ac_max_iterations), each a {one_pass:.0f} s pass)")
    validation = nncf.Dataset(Reiterable(eval_batches, eval_count))

    def validate(compiled, items) -> float:
        correct = seen = 0
        for x, y in items:
            logits = compiled(x)[0]
            correct += int((np.asarray(logits).argmax(1) == y).sum())
            seen += len(y)
        return correct / max(seen, 1)

    common, advanced = _transformer_options(nncf, smooth_quant=ctx.nncf_smooth_quant, exclude=ctx.exclude)
    controlled = nncf.quantize_with_accuracy_control(
        model, nncf_dataset(ctx.calib), validation, validate, max_drop=ctx.max_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=ctx.calib.size, advanced_quantization_parameters=advanced,
        **common,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=ctx.nncf_ac_max_iterations, ranking_subset_size=RANKING_SUBSET),
    )
    path = ctx.workdir / "nncf-ov-ac.xml"
    ov.save_model(controlled, str(path), compress_to_fp16=False)
    top1 = ctx.evaluate(path, "openvino", "int8")
    reverted = sorted(before - _quantized_ops(controlled))
    reasons = excluded + tuple({"name": op, "reason": f"reverted by nncf.quantize_with_accuracy_control (max_drop "
                                                      f"{ctx.max_drop:.2f} pt absolute)"} for op in reverted)
    ctx.log(f"{name}: accuracy control kept {len(reverted)} op(s) in float; top-1 {top1 * 100:.2f}")
    if not ctx.within_budget(top1):
        return None
    return Candidate("nncf-ov-ac", "nncf.quantize_with_accuracy_control", "int8", path,
                     "openvino", calibration, reasons, top1)


def transformer_int8(model, calib: CalibrationSet, *, smooth_quant: bool, exclude: tuple[str, ...] = (),
                     preset: str = "PERFORMANCE"):
    """``nncf.quantize`` of an OpenVINO model with the transformer recipe (ModelType.TRANSFORMER, the performance
    preset unless ``preset`` names another ``nncf.QuantizationPreset``) on ``calib``; ``exclude`` (layer names or
    glob patterns) stays in float."""
    nncf = require("nncf", "nncf")

    common, advanced = _transformer_options(nncf, smooth_quant=smooth_quant, exclude=exclude, preset=preset)
    return nncf.quantize(model, nncf_dataset(calib), subset_size=calib.size, advanced_parameters=advanced, **common)


def _transformer_options(nncf, *, smooth_quant: bool, exclude: tuple[str, ...],
                         preset: str = "PERFORMANCE") -> tuple[dict, object]:
    """(the keyword arguments both NNCF calls share, the advanced quantization parameters or None)."""
    ignored = nncf.IgnoredScope(patterns=[_regex(p) for p in exclude], validate=False) if exclude else None
    # SmoothQuant moves activation outliers into the weights through a Multiply per MatMul input; off, those
    # Multiplies are gone (NNCF's switch: alpha -1), which a small model without outliers can afford.
    advanced = None if smooth_quant else nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    return {"model_type": nncf.ModelType.TRANSFORMER, "preset": getattr(nncf.QuantizationPreset, preset),
            "ignored_scope": ignored or nncf.IgnoredScope()}, advanced


def _quantized_ops(model) -> set[str]:
    """Friendly names of MatMul/Convolution ops that read a FakeQuantize (directly or through a Convert)."""
    names = set()
    for op in model.get_ops():
        if op.get_type_name() not in COMPUTE_TYPES:
            continue
        for value in op.input_values():
            source = value.get_node()
            while source.get_type_name() in ("Convert", "Reshape", "Transpose"):
                source = source.input_value(0).get_node()
            if source.get_type_name() == "FakeQuantize":
                names.add(op.get_friendly_name())
                break
    return names


def _regex(pattern: str) -> str:
    import fnmatch

    # a name covers its parts, as in quantize.base.layer_matches: "blocks.0.attn.qkv" also "blocks.0.attn.qkv.q"
    return fnmatch.translate(pattern).replace("\\Z", "").removeprefix("(?s:").removesuffix(")") + r"(\..*)?"
