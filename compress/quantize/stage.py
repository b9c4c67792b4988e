"""Run the configured quantizers and collect their candidates, each already fitted to the accuracy budget."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from compress.quantize.base import Candidate, QuantizeContext
from compress.quantize.fp16 import convert_fp16


def build_candidates(
    ctx: QuantizeContext, quantizers: list[str], *, evaluate_torch: Callable[[object], float],
    eval_batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], eval_count: int, bf16_available: bool,
    fp16_keep_float32: list[str] | None = None,
) -> tuple[list[Candidate], list[str]]:
    """(candidates within or outside the budget, one line per quantizer that yielded none and why)."""
    candidates: list[Candidate] = []
    missed: list[str] = []
    ranking = None

    def add(name: str, candidate: Candidate | None) -> None:
        if candidate is None:
            missed.append(f"{name}: no candidate within the {ctx.max_drop} pt budget, even with layers in float")
        else:
            candidates.append(candidate)

    for name in quantizers:
        if name == "onnxruntime-static":
            from compress.quantize.onnxruntime_ptq import quantize_static_qdq

            candidate, ranking = quantize_static_qdq(ctx)
            add(name, candidate)
        elif name == "onnxruntime-dynamic":
            from compress.quantize.onnxruntime_ptq import quantize_dynamic_int8

            add(name, quantize_dynamic_int8(ctx, ranking))
        elif name == "nncf":
            from compress.quantize.openvino_nncf import quantize_openvino

            add(name, quantize_openvino(ctx, eval_batches, eval_count))
        elif name == "neural-compressor":
            from compress.quantize.neural_compressor_pt2e import quantize_pt2e

            add(name, quantize_pt2e(ctx, evaluate_torch))
        elif name == "fp16":
            add(name, convert_fp16(ctx, fp16_keep_float32))
        elif name == "bf16":
            if not bf16_available:
                missed.append("bf16: OpenVINO offers no BF16 on this CPU (it needs AVX-512 BF16 or AMX)")
                continue
            top1 = ctx.evaluate(ctx.float_onnx, "onnx", "bf16")
            ctx.log(f"bf16: top-1 {top1 * 100:.2f} (drop {ctx.drop(top1):+.2f} pt)")
            candidates.append(Candidate("ov-bf16", "openvino INFERENCE_PRECISION_HINT=bf16", "bf16",
                                        ctx.float_onnx, "onnx", None, (), top1))
    missed += [f"{c.name}: top-1 drop {ctx.drop(c.top1):.2f} pt exceeds the {ctx.max_drop} pt budget"
               for c in candidates if not ctx.within_budget(c.top1)]
    return candidates, missed
