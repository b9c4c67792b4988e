"""QuantizeLinear/DequantizeLinear (QDQ) ONNX graphs: read them, tidy them, check them, return layers to float.

Every INT8 candidate that leaves this package as ONNX is a QDQ graph, whichever library made it (ONNX Runtime's
``quantize_static``, neural-compressor's PT2E export). This module gives them one shape and one set of tools:

- ``canonicalize``: the PT2E export stores float weights behind ``QuantizeLinear -> Clip -> DequantizeLinear
  -> Transpose``; this folds that chain into an INT8 initializer feeding ``DequantizeLinear`` directly (the
  form ONNX Runtime fuses into integer kernels and TensorRT reads as explicit quantization), 4x smaller.
- ``quantized_layers``: the Conv/Gemm/MatMul nodes that take a dequantized weight, with their scales.
- ``tensorrt_violations``: what TensorRT's explicit quantization would reject (non-zero zero points, weight
  scales on another axis than the output channels, Q/DQ feeding ops it cannot run in INT8).
- ``revert_to_float``: take named layers out of INT8 (float weight and float input), for the accuracy budget.

Weight per-channel axes follow TensorRT's rule "scales along the output channels (K)": axis 0 for Conv and
``Gemm(transB=1)`` weights stored (out, in), axis 1 for ``MatMul`` weights stored (in, out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# Ops a Q/DQ pair may sit next to in a TensorRT-consumable graph besides the compute ops: data movement that
# TensorRT propagates quantization through, and the graph input/output boundary.
_MOVEMENT_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Concat", "Split",
                 "Identity", "Shape"}


@dataclass(frozen=True)
class QuantizedLayer:
    name: str  # node name (the PyTorch module's name after export.name_weighted_nodes)
    op_type: str
    activation: str | None  # the float tensor quantized on the way in (None: input not quantized)
    act_scale: float | None
    act_zero_point: int | None
    weight: str  # the INT8 weight initializer
    weight_axis: int | None  # None: per-tensor
    act_signed: bool = True  # INT8 (True) or UINT8 activations


@dataclass
class QdqGraph:
    """A QDQ model plus, for each INT8 weight initializer, the float weight it came from (same layout)."""

    proto: onnx.ModelProto
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_quantize_static(cls, qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> QdqGraph:
        """ONNX Runtime names a weight ``W`` as ``W_quantized``: recover the float ``W`` from the float model."""
        floats = {i.name: i for i in float_model.graph.initializer}
        weights = {}
        for init in qdq.graph.initializer:
            if init.name.endswith("_quantized") and init.name[: -len("_quantized")] in floats:
                weights[init.name] = numpy_helper.to_array(floats[init.name[: -len("_quantized")]]).astype(np.float32)
        return cls(qdq, weights)

    def save(self, path: Path) -> Path:
        onnx.save(self.proto, str(path))
        return path

    def layers(self) -> list[QuantizedLayer]:
        return quantized_layers(self.proto)

    def revert_to_float(self, names: set[str] | list[str]) -> QdqGraph:
        return QdqGraph(revert_to_float(self.proto, set(names), self.float_weights), dict(self.float_weights))


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _scalar(inits: dict[str, onnx.TensorProto], name: str | None) -> np.ndarray | None:
    if not name or name not in inits:
        return None
    return numpy_helper.to_array(inits[name])


def quantized_layers(proto: onnx.ModelProto) -> list[QuantizedLayer]:
    """Compute nodes whose weight (input 1) is a dequantized INT8 initializer."""
    graph = proto.graph
    producer = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    layers = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        wdq = producer.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue
        act, scale, zp, signed = None, None, None, True
        adq = producer.get(node.input[0])
        if adq is not None and adq.op_type == "DequantizeLinear":
            q = producer.get(adq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                act = q.input[0]
                scale = float(_scalar(inits, adq.input[1]).reshape(-1)[0])
                zp_array = _scalar(inits, adq.input[2] if len(adq.input) > 2 else None)
                zp = 0 if zp_array is None else int(zp_array.reshape(-1)[0])
                signed = zp_array is None or zp_array.dtype == np.int8
        w_scale = _scalar(inits, wdq.input[1])
        axis = int(_attr(wdq, "axis", 1)) if w_scale is not None and w_scale.size > 1 else None
        layers.append(QuantizedLayer(node.name, node.op_type, act, scale, zp, wdq.input[0], axis, signed))
    return layers


def dequantize_weight(proto: onnx.ModelProto, layer: QuantizedLayer) -> np.ndarray:
    """The INT8 weight of ``layer`` as the float values its DequantizeLinear produces."""
    inits = {i.name: i for i in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == layer.weight)
    q = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zp = _scalar(inits, dq.input[2] if len(dq.input) > 2 else None)
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float32)
    if layer.weight_axis is not None:
        shape = [1] * q.ndim
        shape[layer.weight_axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


# ------------------------------------------------------------------------------------------- canonicalize
def canonicalize(proto: onnx.ModelProto) -> QdqGraph:
    """Fold constant ``QuantizeLinear [-> Clip] -> DequantizeLinear [-> Transpose]`` weight chains.

    The result has INT8 weight initializers named ``<float weight>_quantized`` feeding DequantizeLinear, a
    Transpose folded into the stored weight (with the per-channel axis moved along), and each compute node
    whose weight came from an initializer ``<module>.weight`` named ``<module>``. The float weights are kept
    (in the final layout) for ``revert_to_float``.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    users = _consumers(graph)
    float_weights: dict[str, np.ndarray] = {}
    remove: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    used_names = {n.name for n in graph.node}

    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
        zp_init = inits.get(q.input[2]) if len(q.input) > 2 else None
        zp = numpy_helper.to_array(zp_init) if zp_init is not None else np.zeros((), np.uint8)
        axis = int(_attr(q, "axis", 1))
        chain = [q]
        out = q.output[0]
        lo, hi = np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max
        nxt = users.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Clip":  # PT2E's quant_min/quant_max, on the integer values
            clip = nxt[0]
            lo = int(_scalar(inits, clip.input[1]).reshape(-1)[0]) if len(clip.input) > 1 and clip.input[1] else lo
            hi = int(_scalar(inits, clip.input[2]).reshape(-1)[0]) if len(clip.input) > 2 and clip.input[2] else hi
            chain.append(clip)
            out = clip.output[0]
            nxt = users.get(out, [])
        if len(nxt) != 1 or nxt[0].op_type != "DequantizeLinear":
            continue
        dq = nxt[0]
        per_channel = scale.size > 1
        bshape = [1] * w.ndim
        if per_channel:
            bshape[axis] = -1
        wq = np.round(w / scale.reshape(bshape)) + zp.astype(np.float32).reshape(bshape)
        wq = np.clip(wq, lo, hi).astype(zp.dtype)
        dq_out = dq.output[0]
        consumers = users.get(dq_out, [])
        if len(consumers) == 1 and consumers[0].op_type == "Transpose" and w.ndim == 2 and \
                list(_attr(consumers[0], "perm", [1, 0])) == [1, 0]:
            transpose = consumers[0]
            wq, w = np.ascontiguousarray(wq.T), np.ascontiguousarray(w.T)
            axis = 1 - axis
            for node in users.get(transpose.output[0], []):  # consumers now read the DQ output directly
                for i, name in enumerate(node.input):
                    if name == transpose.output[0]:
                        node.input[i] = dq_out
            remove.add(id(transpose))
        name = f"{q.input[0]}_quantized"
        new_inits.append(numpy_helper.from_array(wq, name))
        float_weights[name] = w
        dq.input[0] = name
        # Each weight gets its own scale and zero point: PT2E shares one zero-point vector between layers of
        # the same width, and OpenVINO then runs those layers in f32 (measured: 24 of 49 on ViT-S/16).
        dq.input[1] = f"{q.input[0]}_scale"
        new_inits.append(numpy_helper.from_array(scale, dq.input[1]))
        if len(dq.input) > 2 and dq.input[2]:
            dq.input[2] = f"{q.input[0]}_zero_point"
            new_inits.append(numpy_helper.from_array(zp, dq.input[2]))
        if per_channel:
            for a in dq.attribute:
                if a.name == "axis":
                    a.i = axis
            if not any(a.name == "axis" for a in dq.attribute):
                dq.attribute.append(helper.make_attribute("axis", axis))
        remove.update(id(n) for n in chain)
        for node in users.get(dq_out, []) + [c for t in consumers if t.op_type == "Transpose"
                                              for c in users.get(t.output[0], [])]:
            module = q.input[0][: -len(".weight")] if q.input[0].endswith(".weight") else None
            if node.op_type in COMPUTE_OPS and module and module not in used_names:
                used_names.discard(node.name)
                node.name = module
                used_names.add(module)
    kept = [n for n in graph.node if id(n) not in remove]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return QdqGraph(proto, float_weights)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (repeatedly, so whole dead chains go)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        kept = [n for n in graph.node if any(o in read for o in n.output)]
        del graph.node[:]
        graph.node.extend(kept)
    _drop_unused_initializers(graph)


def unquantize_graph_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Q/DQ pairs that only round a graph output (ONNX Runtime quantizes a Gemm's output, the logits)."""
    graph = proto.graph
    producer = _producers(graph)
    users = _consumers(graph)
    for output in graph.output:
        dq = producer.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(users.get(q.input[0], [])) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None:
            continue
        source.output[list(source.output).index(q.input[0])] = output.name
        dq.output[0] = dq.output[0] + "_unused"
    _drop_dead_nodes(graph)
    return proto


# ---------------------------------------------------------------------------------------- revert to float
def revert_to_float(proto: onnx.ModelProto, names: set[str], float_weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` in which the compute nodes called ``names`` run in float.

    Their weight comes from ``float_weights`` (exact, not the dequantized INT8 values) and their input skips
    its Q/DQ pair; Q/DQ pairs still used by other layers stay. Unknown names are an error.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    layers = {layer.name: layer for layer in quantized_layers(proto)}
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise KeyError(f"not quantized layers of this graph: {unknown}")
    producer = _producers(graph)
    existing = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.name not in names:
            continue
        layer = layers[node.name]
        if layer.weight not in float_weights:
            raise KeyError(f"no float weight recorded for {layer.weight}")
        float_name = layer.weight[: -len("_quantized")] + "_float" if layer.weight.endswith("_quantized") \
            else layer.weight + "_float"
        if float_name not in existing:
            weight = float_weights[layer.weight].astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(weight, float_name))
            existing.add(float_name)
        node.input[1] = float_name
        if layer.activation is not None:
            node.input[0] = layer.activation
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
            bias_dq = producer.get(node.input[2])  # ORT quantizes a Gemm/Conv bias to INT32 behind a DQ
            if bias_dq is not None and bias_dq.op_type == "DequantizeLinear":
                node.input[2] = bias_dq.output[0]  # the DQ still yields the float bias; keep it
    _drop_dead_nodes(graph)
    return proto


# ----------------------------------------------------------------------------------------- TensorRT check
def tensorrt_violations(proto: onnx.ModelProto) -> list[str]:
    """What TensorRT's explicit (Q/DQ) quantization would refuse or run outside INT8; empty when consumable."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    users = _consumers(graph)
    problems = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = _scalar(inits, node.input[2] if len(node.input) > 2 else None)
        if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            problems.append(f"{node.name}: zero point must be INT8 0 (symmetric), got {zp.dtype} {zp.reshape(-1)[:1]}")
        if node.op_type == "DequantizeLinear":
            for user in users.get(node.output[0], []):
                if user.op_type not in COMPUTE_OPS and user.op_type not in _MOVEMENT_OPS | {"QuantizeLinear"}:
                    problems.append(f"{node.name}: feeds {user.op_type} ({user.name}), which TensorRT runs in float")
    for layer in quantized_layers(proto):
        node = next(n for n in graph.node if n.name == layer.name)
        expected = 0 if layer.op_type == "Conv" or (layer.op_type == "Gemm" and _attr(node, "transB", 0)) else 1
        if layer.weight_axis is not None and layer.weight_axis != expected:
            problems.append(f"{layer.name}: weight scales on axis {layer.weight_axis}, TensorRT wants the output "
                            f"channels (axis {expected} for {layer.op_type})")
    return problems


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node))
