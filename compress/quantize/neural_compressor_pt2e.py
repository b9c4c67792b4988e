"""neural-compressor (Intel Neural Compressor 3.x, PyTorch) PT2E static INT8, exported to QDQ ONNX.

``export`` captures the model with ``torch.export`` (dynamic batch), ``prepare`` inserts observers from a
``StaticQuantConfig`` (INT8 symmetric activations so TensorRT can read the result, per-channel weights), our
forward loop calibrates, and ``convert`` folds in the quantize/dequantize ops. When the result misses the
budget, neural-compressor's ``autotune`` searches its own config space (activation algorithm MinMax or KL,
symmetric) against our evaluation with ``tolerable_loss`` set from the budget. The quantized graph is exported
with the dynamo ONNX exporter and canonicalized (``qdq.canonicalize``); if it still misses, the same
sensitivity-ranked fallback as every QDQ candidate applies.

SmoothQuant: neural-compressor 3.x runs its own only through intel-extension-for-pytorch (deprecated there),
which is not a dependency here, so the float model is first smoothed by ``smoothquant.smooth`` (``quantize.
smoothquant_alpha``, default 0.5; ``None`` turns it off) with the same calibration set.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import numpy as np
import torch

from calibration.calibrate import forward_loop
from compress.quantize.base import Candidate, QuantizeContext, QuantizeError, require
from compress.quantize.budget import fit_qdq
from compress.quantize.qdq import canonicalize

log = logging.getLogger(__name__)


def quantize_pt2e(ctx: QuantizeContext, evaluate_torch) -> Candidate | None:
    """``evaluate_torch(module) -> top-1`` scores a quantized PyTorch module on the evaluation split."""
    require("neural_compressor.torch.quantization", "neural-compressor-pt")
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, TuningConfig, autotune, convert, prepare

    if ctx.exclude:
        raise QuantizeError("quantize.exclude is not supported by the neural-compressor PT2E path yet; "
                            "drop 'neural-compressor' from quantize.quantizers or clear quantize.exclude")
    example = torch.from_numpy(np.ascontiguousarray(next(ctx.calib.batches())[:2]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    name = "inc-pt2e"
    run = forward_loop(ctx.calib)
    if ctx.smoothquant_alpha is not None:
        from compress.quantize.smoothquant import smooth

        float_model = smooth(ctx.model, ctx.calib, alpha=ctx.smoothquant_alpha)  # a smoothed copy
    else:
        float_model = copy.deepcopy(ctx.model).eval()
    with _quiet():
        exported = export(float_model, (example,), dynamic_shapes=({0: batch},))
    if exported is None:
        raise QuantizeError("neural-compressor could not capture the model with torch.export; see the log above")
    signed = ctx.activations == "int8"
    ctx.log(f"{name}: prepare / calibrate on {ctx.calib.size} images / convert")
    with _quiet():
        config = StaticQuantConfig(act_dtype="int8" if signed else "uint8", act_sym=signed)
        model = prepare(_copy(exported), config)
        run(model)
        model = convert(model)
    top1 = evaluate_torch(model)
    ctx.log(f"{name}: top-1 {top1 * 100:.2f} in PyTorch (drop {ctx.drop(top1):+.2f} pt)")
    method = "minmax" + (f" + SmoothQuant(alpha={ctx.smoothquant_alpha})" if ctx.smoothquant_alpha is not None else "")
    if not ctx.within_budget(top1) and ctx.inc_max_trials > 0:
        ctx.log(f"{name}: over budget; neural-compressor autotune (at most {ctx.inc_max_trials} trials)")
        space = StaticQuantConfig(act_dtype="int8" if signed else "uint8", act_sym=signed, act_algo=["minmax", "kl"],
                                  w_algo=["minmax"])
        tolerable = ctx.max_drop / 100 / max(ctx.reference_top1, 1e-9)  # autotune's loss is relative
        with _quiet():
            tuned = autotune(_copy(exported), TuningConfig(config_set=[space], tolerable_loss=tolerable,
                                                                   max_trials=ctx.inc_max_trials),
                             eval_fn=evaluate_torch, run_fn=run, example_inputs=(example,))
        if tuned is not None:
            model, method = tuned, method.replace("minmax", "autotune (minmax / kl)")
    proto = _to_onnx(model, example)
    graph = canonicalize(proto)
    calibration = {"method": method, "size": ctx.calib.size, "source": ctx.calib.name}
    candidate, _ = fit_qdq(ctx, graph, name, "neural_compressor.torch.quantization (PT2E static)", calibration, [])
    return candidate


def _copy(exported: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that keeps the attributes neural-compressor's ``export`` sets and ``prepare`` reads."""
    clone = copy.deepcopy(exported)
    for attr in ("_exported", "dynamic_shapes"):
        setattr(clone, attr, getattr(exported, attr, None))
    return clone


def _to_onnx(model: torch.nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18, input_names=["pixel_values"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), optimize=True)
    return program.model_proto


@contextlib.contextmanager
def _quiet():
    """neural-compressor and the exporter print to stdout and log at INFO; keep the user's console readable."""
    inc_logger = logging.getLogger("neural_compressor")
    level = inc_logger.level
    inc_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        inc_logger.setLevel(level)
