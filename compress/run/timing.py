"""Timing a model stage's candidates in the precision the chain will end in.

A stage that reduces the model (tokens, prune) chooses among settings by their latency. Timed in FP32, they rank as
FP32 runs them; but when a quantize stage follows, what ships is INT8 (or BF16), and the two do not rank alike: a
setting that removes GEMM work saves more in FP32 than in INT8, where the GEMMs are the cheap part. So these stages
time in the chain's final precision on OpenVINO (``final_precision``), through an engine made ready for it
(``timing_engine``): INT8 from ``nncf.quantize`` on a few calibration images, which is enough for latency.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from calibration.calibrate import CalibrationSet
    from compress.config import RunConfig
    from compress.run.context import RunContext

log = logging.getLogger(__name__)


def final_precision(config: RunConfig, stage: str, runtime: str, asked: str) -> str:
    """The precision ``stage``'s settings are timed in: ``asked`` unless it is "auto"; for "auto", the one the chain
    will end in on OpenVINO when a quantize stage follows ``stage`` (INT8 when it runs NNCF, BF16 when it offers
    only bf16), else FP32."""
    if asked != "auto":
        return asked
    order = config.stage_order()
    later = order[order.index(stage) + 1:] if stage in order else []
    if runtime != "openvino" or "quantize" not in later:
        return "fp32"
    quantizers = config.quantize.quantizers
    return "int8" if "nncf" in quantizers else "bf16" if "bf16" in quantizers else "fp32"


def available(precision: str, stage: str) -> str:
    """``precision``, or FP32 where OpenVINO offers no BF16 on this CPU (said once in the log)."""
    from runtimes import get_runtime

    if precision == "bf16" and "bf16" not in get_runtime("openvino").precisions():
        log.info("%s: OpenVINO offers no BF16 on this CPU; settings are timed in FP32", stage)
        return "fp32"
    return precision


def timing_calibration(ctx: RunContext, precision: str, size: int) -> CalibrationSet | None:
    """The images the timing-only ``nncf.quantize`` calibrates on (INT8 only): the first ``size`` of the
    calibration split (the evaluation split's when there is none)."""
    if precision != "int8":
        return None
    from calibration.calibrate import from_split

    split = ctx.calib_data if len(ctx.calib_data) else ctx.eval_data
    return from_split(split, min(size, len(split)), ctx.input_shape)


def timing_engine(path: Path, precision: str, calib: CalibrationSet | None, *, threads: int,
                  runtime: str = "openvino", smooth_quant: bool = False):
    """An engine of the exported FP32 ONNX file ``path`` at ``precision``: FP32 on ``runtime``; BF16 or INT8 on
    OpenVINO, INT8 from ``nncf.quantize`` on ``calib`` (the transformer recipe, with SmoothQuant if asked, as
    ``quantize.nncf_smooth_quant``), saved beside ``path``."""
    from runtimes import get_runtime

    if precision == "fp32":
        return get_runtime(runtime).build(path, precision="fp32", threads=threads)
    if precision == "bf16":
        return get_runtime("openvino").build(path, precision="bf16", threads=threads)
    import openvino as ov

    from compress.quantize.openvino_nncf import transformer_int8

    quantized = transformer_int8(ov.Core().read_model(str(path)), calib, smooth_quant=smooth_quant)
    xml = path.with_name(path.stem + "-timing-int8.xml")
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return get_runtime("openvino").build(xml, precision="int8", threads=threads)
