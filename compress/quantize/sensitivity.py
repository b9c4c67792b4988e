"""Per-layer quantization sensitivity, measured on calibration data.

For each quantized layer we compare, on the same real inputs, the layer's float output with the output it
gives when its input and weight pass through their INT8 scales: ``NSR = ||Y_q - Y_f||^2 / ||Y_f||^2`` (noise
to signal ratio, summed over the calibration batches). The inputs are those the layer sees inside the
quantized model, so the ranking reflects each layer's own error where it sits, without re-quantizing the
model once per layer (the measured-accuracy alternative, N evaluations, is what NNCF's accuracy control does).
The most sensitive layers are the first the accuracy budget returns to float.
"""

from __future__ import annotations

import logging

import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from calibration.calibrate import CalibrationSet
from compress.quantize.qdq import QdqGraph, QuantizedLayer, _attr, dequantize_weight

log = logging.getLogger(__name__)


def layer_sensitivity(
    graph: QdqGraph, calib: CalibrationSet, *, samples: int = 64, threads: int = 1
) -> dict[str, float]:
    """{layer name: NSR} for every quantized layer with a recorded float weight, most sensitive first."""
    import onnxruntime as ort

    layers = [layer for layer in graph.layers() if layer.weight in graph.float_weights]
    if not layers:
        return {}
    nodes = {n.name: n for n in graph.proto.graph.node}
    inputs = {layer.name: layer.activation or nodes[layer.name].input[0] for layer in layers}
    probe = onnx.ModelProto.FromString(graph.proto.SerializeToString())
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(inputs.values()):
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    weights = {layer.name: (torch.from_numpy(graph.float_weights[layer.weight]),
                            torch.from_numpy(dequantize_weight(graph.proto, layer))) for layer in layers}
    noise = dict.fromkeys(weights, 0.0)
    signal = dict.fromkeys(weights, 0.0)
    seen = 0
    for batch in calib.batches():
        batch = batch[: samples - seen]
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch})))
        with torch.inference_mode():
            for layer in layers:
                x = torch.from_numpy(outputs[inputs[layer.name]])
                w_float, w_int8 = weights[layer.name]
                y = _apply(nodes[layer.name], x, w_float)
                y_q = _apply(nodes[layer.name], _fake_quant(x, layer), w_int8)
                noise[layer.name] += float(((y_q - y) ** 2).sum())
                signal[layer.name] += float((y**2).sum())
        seen += len(batch)
        if seen >= samples:
            break
    nsr = {name: noise[name] / max(signal[name], 1e-30) for name in noise}
    return dict(sorted(nsr.items(), key=lambda kv: kv[1], reverse=True))


def _fake_quant(x: torch.Tensor, layer: QuantizedLayer) -> torch.Tensor:
    if layer.activation is None:
        return x
    lo, hi = (-128, 127) if layer.act_signed else (0, 255)
    q = torch.clamp(torch.round(x / layer.act_scale) + layer.act_zero_point, lo, hi)
    return (q - layer.act_zero_point) * layer.act_scale


def _apply(node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if node.op_type == "MatMul":
        return torch.matmul(x, w)
    if node.op_type == "Gemm":
        x = x.T if _attr(node, "transA", 0) else x
        return x @ (w.T if _attr(node, "transB", 0) else w)
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    return F.conv2d(x, w, stride=tuple(_attr(node, "strides", [1, 1])), padding=tuple(pads[:2]),
                    dilation=tuple(_attr(node, "dilations", [1, 1])), groups=int(_attr(node, "group", 1)))
