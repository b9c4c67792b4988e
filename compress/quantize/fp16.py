"""FP16 ONNX: weights and activations in half precision, LayerNorm kept fused and in float32.

A decomposed LayerNorm overflows in FP16 (ViT-B/16 at 19% top-1 on a Jetson Orin
Nano with TensorRT 10.3, onnxsim's scripts/nvidia/README.md; NVIDIA/TensorRT#2709); the export keeps one
``LayerNormalization`` node per LayerNorm and the conversion leaves those nodes in float32, with casts around
them, and keeps the model's inputs and outputs float32 so callers need not change. The conversion is ONNX
Runtime's own (``onnxruntime.transformers.float16``).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from compress.quantize.base import Candidate, QuantizeContext, QuantizeError

KEEP_FLOAT32 = ["LayerNormalization"]


def convert_fp16(ctx: QuantizeContext, keep_float32: list[str] | None = None) -> Candidate:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = keep_float32 if keep_float32 is not None else KEEP_FLOAT32
    proto = onnx.load(str(ctx.float_onnx))
    norms = sum(n.op_type == "LayerNormalization" for n in proto.graph.node)
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=keep)
    if sum(n.op_type == "LayerNormalization" for n in half.graph.node) != norms:
        raise QuantizeError("the FP16 conversion split a LayerNormalization node; report this with the model's config")
    path: Path = ctx.workdir / "fp16.onnx"
    onnx.save(half, str(path))
    top1 = ctx.evaluate(path, "onnx", "fp16")
    ctx.log(f"fp16: top-1 {top1 * 100:.2f} (drop {ctx.drop(top1):+.2f} pt)")
    reasons = tuple({"name": f"every {op} node", "reason": "kept in float32: it can overflow in FP16"} for op in keep)
    return Candidate("fp16", "onnxruntime.transformers.float16", "fp16", path, "onnx", None, reasons, top1)
