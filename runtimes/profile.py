"""Where an engine's time goes, layer by layer: OpenVINO's per-node counters and ONNX Runtime's session profile,
in one shape, grouped back to the model's own layers and to classes of op.

Both runtimes report executed nodes in execution order, after their fusions, with their own names. Our exporter
names every node that holds a module's weight after that module (``blocks.3.mlp.fc1``), and the runtimes keep that
name on the fused node (``blocks.3.mlp.fc1/DequantizationMultiply``); a node without such a name belongs to the
layer before it, except a LayerNorm, which opens the layer after it (a pre-norm block normalises its input). The
executed precision comes from OpenVINO's exec type (``jit_gemm_i8``, ``brgemm_avx512_f32``) and, for ONNX Runtime,
from the element type of a node's first input. Users ask this of every engine ("which layers really run in
INT8?"; openvinotoolkit/openvino and NVIDIA/TensorRT issue trackers), so an INT8 model's linear layers that did not
execute in INT8 are listed by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OP_CLASSES = ("linear", "attention", "softmax", "layernorm", "gelu", "quantize", "layout", "tokens", "elementwise",
              "other")
_MODULE = re.compile(r"^(patch_embed|blocks\.(\d+)\.(attn|mlp)|head_dist|head)(\.(?!bias|weight)[A-Za-z0-9]+)?(?=[./_]|$)")
# ONNX Runtime kernels that compute in 8-bit integers whatever type their first input has (dynamic quantization
# takes float activations and quantizes them inside the kernel)
ORT_INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm",
                "QLinearConv", "ConvInteger", "QAttention", "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul"}


@dataclass(frozen=True)
class NodeTime:
    """One executed node: its name and type as the runtime reports them, the precision it ran in, and its time per
    inference."""

    name: str
    op_type: str
    precision: str  # int8, fp32, bf16, fp16, or "?" where the runtime does not say
    ms: float
    fused: str = ""  # the original ops a runtime fused into this node, where it says (OpenVINO)


def exec_precision(exec_type: str) -> str:
    """OpenVINO's exec type (``jit_gemm_i8``, ``brgemm_avx2_f32``, ``ref_any_f32``) as a precision."""
    tail = exec_type.lower().rsplit("_", 1)[-1]
    return {"i8": "int8", "u8": "int8", "f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(tail, "?")


def element_precision(element: str, op_type: str = "") -> str:
    """An ONNX Runtime profile's input element type (``float``, ``uint8``) as a precision; an integer kernel is
    INT8 whatever it is fed."""
    if op_type in ORT_INT8_OPS:
        return "int8"
    return {"float": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "uint8": "int8"}.get(element, "?")


def op_class(op_type: str, weighted: bool, after_norm: bool = False, fused: str = "") -> str:
    t = op_type.lower()
    if "fullyconnected" in t or "convolution" in t or (
            weighted and any(k in t for k in ("matmul", "gemm", "conv", "qlinear"))):
        return "linear"
    if "quantize" in t:  # QuantizeLinear, DequantizeLinear, FakeQuantize
        return "quantize"
    if t == "subgraph":  # OpenVINO's fused snippets: what they hold says what they are
        f = fused.lower()
        if "softmax" in f or "matmul" in f:
            return "attention"
        return "layernorm" if "layer_norm" in f or "mvn" in f else "gelu" if "gelu" in f else "elementwise"
    if any(k in t for k in ("matmul", "mha", "attention")):  # products of activations, fused attention
        return "attention"
    if "softmax" in t:
        return "softmax"
    if t in ("mvn", "layernormalization", "layernorm", "simplifiedlayernormalization") or (
            after_norm and t in ("muladd", "multiply", "add")):
        return "layernorm"
    if any(k in t for k in ("gelu", "erf", "tanh")):
        return "gelu"
    if t in ("reorder", "transpose", "reshape", "concat", "split", "gather", "slice", "squeeze", "unsqueeze",
             "flatten", "memorycopy", "expand", "shape", "identity", "cast", "convert"):
        return "layout"
    if any(k in t for k in ("topk", "scatter", "gatherelements", "argmax", "cumsum", "sort")):
        return "tokens"
    if t in ("add", "mul", "sub", "div", "eltwise", "multiply", "muladd", "powerstatic", "subtract", "divide", "pow",
             "sqrt", "where", "relu", "sigmoid", "reducemean", "reducesum", "reducemax"):
        return "elementwise"
    return "other"


def _label(match: re.Match) -> str:
    module, block, part = match.group(1), match.group(2), match.group(3)
    if module == "patch_embed":
        return "patch embedding"
    if block is not None:
        return f"block {block} {'attention' if part == 'attn' else 'MLP'}"
    return "head"


def summarize(nodes: list[NodeTime], *, int8_expected: bool = False) -> dict:
    """``nodes`` (execution order) as the record keeps them: total time, time per op class, per model layer (with
    the time per executed precision), the share of linear-layer time that ran in INT8, and, for a model meant to
    run in INT8, the linear layers that did not."""
    labels = [(_MODULE.search(n.name)) for n in nodes]
    named = [_label(m) if m else None for m in labels]
    classes, groups = [], []
    previous_norm = False
    for n, m in zip(nodes, labels):
        c = op_class(n.op_type, weighted=m is not None, after_norm=previous_norm, fused=n.fused)
        classes.append(c)
        previous_norm = c == "layernorm" and n.op_type.lower() in ("mvn",)
    for i, c in enumerate(classes):
        if named[i] is not None:
            groups.append(named[i])
            continue
        look = range(i + 1, len(nodes)) if c == "layernorm" else range(i - 1, -1, -1)
        found = next((named[j] for j in look if named[j] is not None), None)
        groups.append(found or ("patch embedding" if c != "layernorm" and i < len(nodes) // 2 else "head"))
    by_class = {c: 0.0 for c in OP_CLASSES}
    by_layer: dict[str, dict] = {}
    for n, c, g in zip(nodes, classes, groups):
        by_class[c] += n.ms
        layer = by_layer.setdefault(g, {"layer": g, "ms": 0.0, "precision_ms": {}})
        layer["ms"] += n.ms
        layer["precision_ms"][n.precision] = layer["precision_ms"].get(n.precision, 0.0) + n.ms
    linear = [(n, c) for n, c in zip(nodes, classes) if c == "linear"]
    linear_ms = sum(n.ms for n, _ in linear)
    int8_ms = sum(n.ms for n, _ in linear if n.precision == "int8")
    out = {
        "total_ms": round(sum(n.ms for n in nodes), 4),
        "by_class": {c: round(v, 4) for c, v in by_class.items() if v > 0},
        "by_layer": [{"layer": v["layer"], "ms": round(v["ms"], 4),
                      "precision_ms": {p: round(t, 4) for p, t in v["precision_ms"].items()}}
                     for v in by_layer.values()],
        "linear_int8_share": round(int8_ms / linear_ms, 4) if linear_ms else None,
        "nodes": len(nodes),
    }
    if int8_expected:
        out["not_int8"] = sorted({_MODULE.search(n.name).group(0) for n, _ in linear if n.precision != "int8"})
    return out
