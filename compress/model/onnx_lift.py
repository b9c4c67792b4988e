"""Lift a Vision Transformer out of an ONNX graph into the canonical ``VisionTransformer``.

A user whose ViT exists only as an export (timm, Hugging Face Optimum, ``torch.onnx.export`` of a home-written
model, a vendor's file) gets every torch stage too (pruning, recovery, token reduction, training) once the
model is rebuilt from the graph's weights. Exporters differ in everything but the arithmetic, so the graph is
first reduced to that arithmetic and then read along the residual stream:

1. **Fold.** The batch axis is fixed to 1 and every tensor that does not depend on the image's values (weights,
   ``Shape`` of static tensors, the shape arithmetic around them, a position embedding resampled by ``Resize``
   as Hugging Face's DINOv2 does) is computed once by ONNX Runtime and becomes a constant.
2. **Walk.** From the image input: a patch embedding (a stride-p ``Conv``, or a ``MatMul`` on patches cut by
   ``Reshape``/``Transpose``, whose order is read by running those ops on pixel indices), prefix tokens
   (``Concat`` with a constant), the position embedding (``Add`` of a constant), then one block per residual
   ``Add``: pre- or post-norm, LayerNorm fused (``LayerNormalization``) or decomposed (``ReduceMean``, ``Sub``,
   ``Pow``, ``Sqrt``, ``Div``), projections as ``MatMul`` + ``Add`` or ``Gemm``, optional LayerScale, and the head
   (class token, mean or both, a distillation head, an MLP of any depth).
3. **Check.** The rebuilt model's output is compared with ONNX Runtime's on the same images: the same parity
   rule as export. A graph that differs anywhere is named, never returned.

Whatever the walk does not recognise stops it with one line naming the part (``block 3 attention: a constant is
added to the attention scores``); the ONNX-level stages can still run on the file as it is.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import CheckpointError

log = logging.getLogger(__name__)

VIEW_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Dropout"}
# never computed ahead: random ops, and ops with subgraphs (their inputs do not say everything they read)
_NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
               "If", "Loop", "Scan"}


class LiftError(CheckpointError):
    """The graph holds something the canonical ViT does not: the message names the first such part."""


@dataclass(eq=False)
class Linear:
    weight: np.ndarray  # (out, in), as torch.nn.Linear stores it
    bias: np.ndarray | None
    input: str
    output: str  # after the bias
    nodes: list[Any]


@dataclass(eq=False)
class Norm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float
    output: str
    nodes: list[Any]


@dataclass
class Lifted:
    """What the walk read: ``ViTConfig`` values and a canonical state dict, and which graph tensor they reproduce."""

    values: dict[str, Any]
    state: dict[str, np.ndarray]
    output: str  # logits, or the encoder's tokens for a backbone
    backbone: bool  # the graph's own head was not taken: a new one must be trained
    input_name: str = ""


# --------------------------------------------------------------------------------------------------- folding
class Graph:
    """An ONNX graph at batch 1 with its input-independent tensors computed, and lookups the walk needs."""

    def __init__(self, proto) -> None:
        import onnx

        self.proto = proto
        g = proto.graph
        init_names = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in init_names]
        if len(inputs) != 1:
            raise LiftError(f"the graph has {len(inputs)} inputs; a ViT takes one image batch")
        self.input = inputs[0].name
        self.const: dict[str, np.ndarray] = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
        self.nodes = list(g.node)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._index()

    def _index(self) -> None:
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def is_const(self, name: str) -> bool:
        return name in self.const

    def users(self, name: str) -> list[Any]:
        return self.consumers.get(name, [])

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)


def fold(path: Path) -> Graph:
    """``path`` at batch 1 with every input-independent tensor computed by ONNX Runtime (see the module doc).

    Folding repeats until nothing changes: a shape computed in one round makes more tensors static in the next
    (Hugging Face's DINOv2 resamples its position embedding to sizes read from the image's shape).
    """
    import onnx

    proto = onnx.load(str(path))  # external data, where there is any, is read too
    g = proto.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1:
        raise LiftError(f"the graph has {len(inputs)} inputs; a ViT takes one image batch")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise LiftError(f"the input {inputs[0].name!r} is not an (N, C, H, W) image batch of a fixed size")
    dims[0].Clear()
    dims[0].dim_value = 1
    for _ in range(8):
        proto, changed = _fold_once(proto)
        if not changed:
            break
    out = Graph(proto)
    for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out.shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
    return out


def _fold_once(proto):
    """One round of folding: (the new graph with shapes inferred, whether any node was folded)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper, shape_inference

    try:
        proto = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # onnx raises InferenceError and friends for a graph it cannot type
        raise LiftError(f"ONNX shape inference fails on the graph ({str(e).splitlines()[0][:120]})") from None
    g = proto.graph
    image = next(i for i in g.input if i.name not in {t.name for t in g.initializer})
    types = {v.name: v.type.tensor_type for v in [*g.value_info, *g.output, *g.input]}
    static = {name for name, t in types.items()
              if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)}
    weights = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    const = set(weights)
    folded = []
    for node in g.node:
        ins = [n for n in node.input if n]
        if (node.op_type == "Constant" or (node.op_type in ("Shape", "Size") and ins and ins[0] in static)
                or (node.op_type not in _NOT_FOLDED and ins and all(n in const for n in ins))):
            const.update(node.output)
            folded.append(node)
    if not folded:
        return proto, False
    kept = [n for n in g.node if n not in folded]
    needed = sorted({n for node in kept for n in node.input if n in const and n not in weights}
                    | {o.name for o in g.output if o.name in const and o.name not in weights})
    values: dict[str, np.ndarray] = {}
    if needed:
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        del probe.graph.output[:]
        for name in needed:
            t = types.get(name)
            if t is None or not t.elem_type:
                raise LiftError(f"cannot compute the constant tensor {name!r} (its type is unknown)")
            probe.graph.output.append(helper.make_tensor_value_info(name, t.elem_type, None))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        dims = [d.dim_value for d in image.type.tensor_type.shape.dim]
        half = image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        x = np.zeros(dims, np.float16 if half else np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            probe_path = Path(tmp) / "probe.onnx"
            onnx.save(probe, str(probe_path), save_as_external_data=probe.ByteSize() > 1_500_000_000)
            try:
                session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
                values = dict(zip(needed, session.run(needed, {image.name: x})))
            except Exception as e:  # ORT's own exception types
                raise LiftError(f"ONNX Runtime cannot compute the graph's constants "
                                f"({str(e).splitlines()[0][:120]})") from None
    used = {n for node in kept for n in node.input} | {o.name for o in g.output}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    del out.graph.initializer[:]
    for name, array in {**{k: v for k, v in weights.items() if k in used}, **values}.items():
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    del out.graph.value_info[:]
    try:
        out = shape_inference.infer_shapes(out, data_prop=True)
    except Exception as e:
        raise LiftError(f"ONNX shape inference fails on the folded graph ({str(e).splitlines()[0][:120]})") from None
    return out, True


# ------------------------------------------------------------------------------------------------ primitives
def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _other(node, name: str) -> str:
    """The input of a two-input node that is not ``name``."""
    a, b = node.input[0], node.input[1]
    return b if a == name else a


def _scalar(g: Graph, name: str) -> float | None:
    if name in g.const and g.const[name].size == 1:
        return float(g.const[name].reshape(()))
    return None


def _through_views(g: Graph, name: str) -> tuple[str, list[Any]]:
    """Follow ``name`` through single-consumer view ops (Reshape, Transpose, Squeeze, Cast, ...)."""
    passed = []
    while True:
        users = g.users(name)
        if len(users) != 1 or users[0].op_type not in VIEW_OPS:
            return name, passed
        passed.append(users[0])
        name = users[0].output[0]


def _linear_at(g: Graph, node) -> Linear | None:
    """``node`` as a linear layer: MatMul by a constant 2-D matrix (+ an Add of a constant vector), or Gemm."""
    if node.op_type == "MatMul" and node.input[1] in g.const and g.const[node.input[1]].ndim == 2:
        weight = g.const[node.input[1]].astype(np.float32).T  # (out, in)
        nodes, out, bias = [node], node.output[0], None
        users = g.users(out)
        if len(users) == 1 and users[0].op_type == "Add":
            b = g.const.get(_other(users[0], out))
            if b is not None and b.size == weight.shape[0] and b.squeeze().ndim <= 1:
                bias, out = b.astype(np.float32).reshape(-1), users[0].output[0]
                nodes.append(users[0])
        return Linear(weight, bias, node.input[0], out, nodes)
    if node.op_type == "Gemm" and node.input[1] in g.const:
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        b = g.const[node.input[1]].astype(np.float32)
        weight = b if _attr(node, "transB", 0) else b.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in g.const:
                return None
            bias = np.broadcast_to(g.const[node.input[2]].astype(np.float32).reshape(-1), (weight.shape[0],)).copy()
        return Linear(weight, bias, node.input[0], node.output[0], [node])
    return None


def _norm_at(g: Graph, x: str) -> Norm | None:
    """A LayerNorm over the last axis of ``x``: one LayerNormalization node, or its decomposition."""
    users = g.users(x)
    for node in users:
        if node.op_type == "LayerNormalization" and node.input[0] == x:
            if _attr(node, "axis", -1) not in (-1, len(g.shape(x) or (0,)) - 1):
                return None
            w = g.const.get(node.input[1])
            if w is None:
                return None
            b = g.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros_like(w)
            if b is None:
                return None
            return Norm(w.astype(np.float32), b.astype(np.float32), float(_attr(node, "epsilon", 1e-5)),
                        node.output[0], [node])
    mean = next((n for n in users if n.op_type == "ReduceMean"), None)
    if mean is None:
        return None
    sub = next((n for n in users if n.op_type == "Sub" and list(n.input) == [x, mean.output[0]]), None)
    if sub is None:
        return None
    d = sub.output[0]
    div = None
    for n in g.users(d):
        if n.op_type == "Div" and n.input[0] == d:
            div, denom = n, n.input[1]
        elif n.op_type == "Mul" and d in n.input:
            src = g.producer.get(_other(n, d))
            if src is not None and src.op_type == "Reciprocal":
                div, denom = n, src.input[0]
    if div is None:
        return None
    sqrt = g.producer.get(denom)
    add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    eps = None
    if add is not None and add.op_type == "Add":
        eps = _scalar(g, add.input[1]) if _scalar(g, add.input[1]) is not None else _scalar(g, add.input[0])
    if eps is None:
        return None
    nodes = [mean, sub, div]
    out = div.output[0]
    dim = (g.shape(x) or (0,))[-1]
    weight, bias = np.ones(dim, np.float32), np.zeros(dim, np.float32)
    users = g.users(out)
    if len(users) == 1 and users[0].op_type == "Mul" and _other(users[0], out) in g.const:
        weight = np.broadcast_to(g.const[_other(users[0], out)].astype(np.float32).reshape(-1), (dim,)).copy()
        nodes.append(users[0])
        out = users[0].output[0]
        users = g.users(out)
    if len(users) == 1 and users[0].op_type == "Add" and _other(users[0], out) in g.const:
        bias = np.broadcast_to(g.const[_other(users[0], out)].astype(np.float32).reshape(-1), (dim,)).copy()
        nodes.append(users[0])
        out = users[0].output[0]
    return Norm(weight, bias, eps, out, nodes)


def _ancestors(g: Graph, names: Iterable[str], stop: set[str]) -> set[str]:
    """Every tensor that ``names`` are computed from, not looking past ``stop``."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None or name in stop:
            continue
        todo.extend(n for n in node.input if n and n not in g.const)
    return seen


def _region(g: Graph, src: str, dst: str) -> list[Any]:
    """The nodes on paths from tensor ``src`` to tensor ``dst``, in graph order."""
    back = _ancestors(g, [dst], {src})
    return [n for n in g.nodes if n.output and n.output[0] in back and any(i in back for i in n.input if i)]


def _apply_views(g: Graph, nodes: list[Any], array: np.ndarray) -> np.ndarray:
    """Run view ops on a numpy array with ONNX's semantics: used to read which pixel a patch feature holds."""
    for node in nodes:
        op = node.op_type
        if op == "Reshape":
            shape = [int(s) for s in g.const[node.input[1]]]
            shape = [array.shape[i] if s == 0 and not _attr(node, "allowzero", 0) else s for i, s in enumerate(shape)]
            array = array.reshape(shape)
        elif op == "Transpose":
            array = array.transpose(_attr(node, "perm", list(range(array.ndim))[::-1]))
        elif op == "Flatten":
            axis = _attr(node, "axis", 1) % array.ndim if array.ndim else 0
            array = array.reshape(int(np.prod(array.shape[:axis])), -1)
        elif op in ("Squeeze", "Unsqueeze"):
            axes = _attr(node, "axes") or (list(g.const[node.input[1]]) if len(node.input) > 1 else None)
            if op == "Squeeze":
                array = np.squeeze(array, axis=tuple(int(a) for a in axes) if axes is not None else None)
            else:
                for a in sorted(int(a) % (array.ndim + len(axes)) for a in axes):
                    array = np.expand_dims(array, a)
        elif op not in ("Identity", "Cast", "Dropout"):
            raise LiftError(f"the patch embedding passes through {op}, which is not a view")
    return array


# -------------------------------------------------------------------------------------------------- the walk
class _Walk:
    def __init__(self, g: Graph, output: str | None) -> None:
        self.g = g
        self.stop_at = output
        self.values: dict[str, Any] = {}
        self.state: dict[str, np.ndarray] = {}
        self.tokens = 0  # tokens in the stream
        self.dim = 0

    def fail(self, where: str, what: str) -> LiftError:
        return LiftError(f"{where}: {what}")

    # ---- embedding
    def embed(self) -> str:
        g = self.g
        c, h, w = g.shape(g.input)[1:] if g.shape(g.input) else (0, 0, 0)
        if h != w:
            raise self.fail("input", f"{h}x{w} images; only square inputs are supported")
        self.values |= {"in_chans": c, "image_size": h}
        x, _ = _through_views(g, g.input)
        users = g.users(x)
        if len(users) == 1 and users[0].op_type == "Conv":
            t = self._conv_patches(users[0])
        else:  # patches cut by view ops: x's readers are a projection, or a LayerNorm's nodes
            t = self._linear_patches(g.input)
        return self._prefix_and_position(t)

    def _conv_patches(self, node) -> str:
        g = self.g
        w = g.const.get(node.input[1])
        if w is None or w.ndim != 4:
            raise self.fail("patch embedding", "the Conv's weight is not a constant")
        p = w.shape[2]
        if (w.shape[3] != p or list(_attr(node, "strides", [1, 1])) != [p, p] or any(_attr(node, "pads", [0]))
                or _attr(node, "group", 1) != 1 or any(d != 1 for d in _attr(node, "dilations", [1, 1]))):
            raise self.fail("patch embedding", f"a Conv that is not stride {p} over {p}x{p} patches")
        D = w.shape[0]
        self.dim = D
        bias = g.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        self.state["patch_embed.proj.weight"] = w.astype(np.float32)
        if bias is not None:
            self.state["patch_embed.proj.bias"] = bias.astype(np.float32)
        self.values |= {"patch_size": p, "embed_dim": D, "patch_bias": bias is not None}
        grid = self.values["image_size"] // p
        t, views = _through_views(g, node.output[0])
        ids = _apply_views(g, views, np.arange(D * grid * grid).reshape(1, D, grid, grid))
        expected = np.arange(D * grid * grid).reshape(1, D, grid * grid).transpose(0, 2, 1)
        if ids.shape != expected.shape or not np.array_equal(ids, expected):
            raise self.fail("patch embedding", f"the Conv's output is rearranged to {ids.shape}, not (1, patches, "
                                               f"{D}) in row-major patch order")
        self.tokens = grid * grid
        return t

    def _linear_patches(self, image: str) -> str:
        """Patches cut by view ops, then (optionally a LayerNorm and) a linear projection (vit-pytorch)."""
        g = self.g
        c, size = self.values["in_chans"], self.values["image_size"]
        t, views = _through_views(g, image)
        if not views:
            first = g.users(image)[0].op_type if g.users(image) else "nothing"
            raise self.fail("patch embedding", f"the image goes to {first}, not a Conv or a patch reshape")
        ids = _apply_views(g, views, np.arange(c * size * size).reshape(1, c, size, size))
        if ids.ndim != 3 or ids.shape[0] != 1:
            raise self.fail("patch embedding", f"the image is reshaped to {ids.shape}, not cut into (1, patches, "
                                               "features)")
        n, f = ids.shape[1:]
        p = int(round((f // c) ** 0.5)) if f % c == 0 else 0
        if p == 0 or p * p * c != f or (size // p) ** 2 != n:
            raise self.fail("patch embedding", f"{n} patches of {f} values do not tile a {size}x{size} image")
        ch, yy, xx = np.unravel_index(ids[0], (c, size, size))  # (n, f) each
        grid = size // p
        gy, gx = yy // p, xx // p
        token = gy * grid + gx
        if not (token == np.arange(n)[:, None]).all():
            raise self.fail("patch embedding", "patches are not in row-major order")
        feature = ch * p * p + (yy % p) * p + (xx % p)  # the Conv weight's (c, p, p) position of each feature
        order = feature[0]
        if not (feature == order).all():
            raise self.fail("patch embedding", "patches flatten their pixels in different orders")
        pre = _norm_at(g, t)
        if pre is not None:
            w = np.zeros(f, np.float32)
            b = np.zeros(f, np.float32)
            w[order], b[order] = pre.weight, pre.bias
            self.state["patch_embed.norm_pre.weight"], self.state["patch_embed.norm_pre.bias"] = w, b
            self.values["norm_eps"] = pre.eps
            t = pre.output
        users = g.users(t)
        lin = _linear_at(g, users[0]) if len(users) == 1 else None
        if lin is None:
            raise self.fail("patch embedding", f"the patches go to {users[0].op_type if users else 'nothing'}, "
                                               "not a linear projection")
        D = lin.weight.shape[0]
        weight = np.zeros((D, f), np.float32)
        weight[:, order] = lin.weight
        self.state["patch_embed.proj.weight"] = weight.reshape(D, c, p, p)
        if lin.bias is not None:
            self.state["patch_embed.proj.bias"] = lin.bias
        self.dim, self.tokens = D, n
        self.values |= {"patch_size": p, "embed_dim": D, "patch_bias": lin.bias is not None,
                        "patch_pre_norm": pre is not None}
        return lin.output

    def _prefix_and_position(self, t: str) -> str:
        g, D = self.g, self.dim
        prefix, pos_before, pos_after, post_norm, pre_blocks = 0, None, None, None, None
        while True:
            t, _ = _through_views(g, t)
            if self._residual(t) is not None or t == self.stop_at:
                break
            users = g.users(t)
            norm = _norm_at(g, t)
            if norm is not None and all(u in norm.nodes for u in users):  # a LayerNorm alone reads the tokens
                if prefix == 0 and pos_before is None and pos_after is None and post_norm is None:
                    post_norm = norm
                elif pre_blocks is None:
                    pre_blocks = norm
                else:
                    raise self.fail("embedding", "more LayerNorms than a patch norm and a pre-block norm")
                t = norm.output
                continue
            if len(users) != 1:
                raise self.fail("embedding", f"the tokens go to {len(users)} nodes ({', '.join(u.op_type for u in users)}) "
                                             "before the first block")
            node = users[0]
            if node.op_type == "Concat":
                parts = list(node.input)
                at = parts.index(t)
                if any(p not in g.const for p in parts if p != t) or at != len(parts) - 1:
                    raise self.fail("embedding", "a Concat that is not constant prefix tokens before the patches")
                tokens = np.concatenate([g.const[p].reshape(-1, D) for p in parts[:at]], axis=0)
                prefix = tokens.shape[0]
                self.state["_prefix"] = tokens.astype(np.float32)
                self.tokens += prefix
                t = node.output[0]
            elif node.op_type == "Add" and _other(node, t) in g.const:
                pos = g.const[_other(node, t)].astype(np.float32)
                if pos.size != self.tokens * D:
                    raise self.fail("embedding", f"an Add of a constant of shape {pos.shape} to {self.tokens} tokens")
                if prefix:
                    pos_after = pos.reshape(1, -1, D)
                else:
                    pos_before = pos.reshape(1, -1, D)
                t = node.output[0]
            else:
                raise self.fail("embedding", f"{node.op_type} ({node.name}) between the patch embedding and the "
                                             "first block")
        if (pos_before is None) == (pos_after is None):
            raise self.fail("embedding", "no position embedding (or two)")
        self.state["pos_embed"] = pos_after if pos_after is not None else pos_before
        self.values["pos_embed_prefix"] = pos_after is not None
        self.values["prefix"] = prefix
        if post_norm is not None:
            self._put_norm("patch_embed.norm", post_norm)
            self.values["patch_post_norm"] = True
        if pre_blocks is not None:
            self._put_norm("norm_pre", pre_blocks)
            self.values["blocks_pre_norm"] = True
        return t

    # ---- blocks
    def _residual(self, x: str):
        """The residual Add that ``x`` feeds, if any: an Add whose other input is computed, not constant."""
        for node in self.g.users(x):
            if node.op_type == "Add" and _other(node, x) not in self.g.const and node.input[0] != node.input[1]:
                return node
        return None

    def blocks(self, x: str) -> str:
        g = self.g
        i = 0
        while x != self.stop_at and (r1 := self._residual(x)) is not None:
            where = f"block {i}"
            norm1 = _norm_at(g, x)
            pre = norm1 is not None and norm1.output in _ancestors(g, [_other(r1, x)], {x})
            if i == 0:
                self.values["pre_norm"] = pre
            elif pre != self.values["pre_norm"]:
                raise self.fail(where, "pre-norm and post-norm blocks in one model")
            branch_in = norm1.output if pre else x
            self._attention(i, branch_in, _other(r1, x))
            mid = r1.output[0]
            if not pre:
                norm1 = self._post_norm(mid, where, "attention")
                mid = norm1.output
            self._put_norm(f"blocks.{i}.norm1", norm1)
            r2 = self._residual(mid)
            if r2 is None:
                raise self.fail(where, "an attention without an MLP after it")
            norm2 = _norm_at(g, mid) if pre else None
            if pre and norm2 is None:
                raise self.fail(f"{where} MLP", "no LayerNorm before the MLP")
            self._mlp(i, norm2.output if pre else mid, _other(r2, mid))
            x = r2.output[0]
            if not pre:
                norm2 = self._post_norm(x, where, "MLP")
                x = norm2.output
            self._put_norm(f"blocks.{i}.norm2", norm2)
            i += 1
        if i == 0:
            raise self.fail("encoder", "no residual block after the embedding")
        self.values["depth"] = i
        return x

    def _post_norm(self, x: str, where: str, after: str) -> Norm:
        """The LayerNorm a post-norm block applies to ``x``, its residual sum after the ``after`` branch."""
        norm = _norm_at(self.g, x)
        if norm is None:
            raise self.fail(where, f"a post-norm block without a LayerNorm after its {after}")
        return norm

    def _layer_scale(self, where: str, out: str, end: str, key: str) -> None:
        """A LayerScale (Mul by a constant vector) between a projection's output and the residual Add."""
        nodes = [n for n in _region(self.g, out, end) if n.op_type not in VIEW_OPS]
        if not nodes:
            return
        consts = [i for i in nodes[0].input if i in self.g.const]
        if len(nodes) != 1 or nodes[0].op_type != "Mul" or len(consts) != 1 or self.g.const[consts[0]].size not in (
                1, self.dim):
            raise self.fail(where, f"{', '.join(n.op_type for n in nodes)} after the output projection")
        gamma = self.g.const[consts[0]].astype(np.float32)
        self.state[key] = np.broadcast_to(gamma.reshape(-1), (self.dim,)).copy()

    def _attention(self, i: int, y: str, end: str) -> None:
        g, where = self.g, f"block {i} attention"
        region = _region(g, y, end)
        softmax = [n for n in region if n.op_type == "Softmax"]
        if len(softmax) != 1:
            raise self.fail(where, f"{len(softmax)} Softmax nodes where one is expected (is it an attention?)")
        linears = [lin for n in region if (lin := _linear_at(g, n)) is not None]
        inputs = [lin for lin in linears if lin.input in self._views_of(y)]
        outputs = [lin for lin in linears if lin not in inputs]
        if len(outputs) != 1 or len(inputs) not in (1, 3):
            raise self.fail(where, f"{len(inputs)} input and {len(outputs)} output projections; expected q, k and v "
                                   "(or one qkv) and one output projection")
        out = outputs[0]
        scores = softmax[0].input[0]
        matmuls = [n for n in region if n.op_type == "MatMul" and all(x not in g.const for x in n.input)]
        qk = next((n for n in matmuls if n.output[0] in _ancestors(g, [scores], {y})), None)
        if qk is None:
            raise self.fail(where, "no product of queries and keys before the Softmax")
        # the scale: every constant factor between the projections and the Softmax
        before = _ancestors(g, [scores], {lin.output for lin in inputs})
        scale = 1.0
        for n in region:
            if n.output[0] not in before or any(n in lin.nodes for lin in linears) or n.op_type in VIEW_OPS:
                continue
            if n.op_type in ("Mul", "Div"):
                c = _scalar(g, n.input[1]) if n.op_type == "Div" else (_scalar(g, n.input[1]) or _scalar(g, n.input[0]))
                if c is None:
                    raise self.fail(where, f"{n.op_type} by a non-scalar before the Softmax")
                scale *= c if n.op_type == "Mul" else 1.0 / c
            elif n.op_type == "Add" and any(i in g.const and not g.const[i].any() for i in n.input):
                continue  # an all-zero mask (the dynamo exporter's scaled_dot_product_attention without one)
            elif n.op_type not in ("MatMul", "Split", "Slice", "Gather", "Softmax"):
                what = "a constant is added to the attention scores (a mask or position bias)" if n.op_type == "Add" \
                    else f"{n.op_type} before the Softmax"
                raise self.fail(where, what)
        if len(inputs) == 3:
            q_side, k_side = (_ancestors(g, [qk.input[j]], {lin.output for lin in inputs}) for j in (0, 1))
            q = next((lin for lin in inputs if lin.output in q_side), None)
            k = next((lin for lin in inputs if lin.output in k_side and lin is not q), None)
            v = next((lin for lin in inputs if lin is not q and lin is not k), None)
            if q is None or k is None or v is None:
                raise self.fail(where, "cannot tell queries, keys and values apart")
            weight = np.concatenate([q.weight, k.weight, v.weight])
            biases = [q.bias, k.bias, v.bias]
        else:
            weight = inputs[0].weight
            biases = [inputs[0].bias]
        if weight.shape[0] % 3:
            raise self.fail(where, f"a qkv projection of {weight.shape[0]} outputs")
        inner = weight.shape[0] // 3
        size = int(np.prod(g.shape(scores))) if g.shape(scores) else 0
        heads = size // (self.tokens * self.tokens) if self.tokens else 0
        if heads < 1 or heads * self.tokens**2 != size or inner % heads:
            raise self.fail(where, f"attention scores of shape {g.shape(scores)} for {self.tokens} tokens")
        head_dim = inner // heads
        factor = scale / head_dim**-0.5  # folded into the queries so the canonical scale applies
        weight = weight.copy()
        weight[:inner] *= factor
        if any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(len(weight) // len(biases), np.float32)
                                   for b in biases]).copy()
            bias[:inner] *= factor
            self.state[f"blocks.{i}.attn.qkv.bias"] = bias
        self.state[f"blocks.{i}.attn.qkv.weight"] = weight
        self.state[f"blocks.{i}.attn.proj.weight"] = out.weight
        self.state[f"blocks.{i}.attn.proj.bias"] = out.bias if out.bias is not None else np.zeros(self.dim, np.float32)
        self.values.setdefault("num_heads", []).append(heads)
        self.values.setdefault("head_dims", []).append(head_dim)
        self.values.setdefault("qkv_bias", any(b is not None for b in biases))
        self._layer_scale(where, out.output, end, f"blocks.{i}.ls1.gamma")

    def _views_of(self, y: str) -> set[str]:
        """``y`` and what view ops make of it (a projection may read a reshaped copy of its input)."""
        seen, todo = {y}, [y]
        while todo:
            for n in self.g.users(todo.pop()):
                if n.op_type in VIEW_OPS:
                    seen.add(n.output[0])
                    todo.append(n.output[0])
        return seen

    def _mlp(self, i: int, y: str, end: str) -> None:
        g, where = self.g, f"block {i} MLP"
        region = _region(g, y, end)
        linears = [lin for n in region if (lin := _linear_at(g, n)) is not None]
        if len(linears) != 2:
            raise self.fail(where, f"{len(linears)} linear layers where fc1 and fc2 are expected")
        fc1, fc2 = linears
        act = self._activation(where, _region(g, fc1.output, fc2.input))
        if i == 0:
            self.values["act"] = act
        elif act != self.values["act"]:
            raise self.fail(where, f"{act} where earlier blocks use {self.values['act']}")
        for name, lin in (("fc1", fc1), ("fc2", fc2)):
            self.state[f"blocks.{i}.mlp.{name}.weight"] = lin.weight
            self.state[f"blocks.{i}.mlp.{name}.bias"] = lin.bias if lin.bias is not None else np.zeros(
                lin.weight.shape[0], np.float32)
        self.values.setdefault("mlp_dim", []).append(fc1.weight.shape[0])
        self._layer_scale(where, fc2.output, end, f"blocks.{i}.ls2.gamma")

    def _activation(self, where: str, nodes: list[Any]) -> str:
        ops = {n.op_type for n in nodes} - VIEW_OPS
        if "Gelu" in ops:
            gelu = next(n for n in nodes if n.op_type == "Gelu")
            if _attr(gelu, "approximate", "none") not in ("none", b"none"):
                raise self.fail(where, "GELU's tanh approximation, which the canonical ViT does not compute")
            return "gelu"
        if "Erf" in ops:
            return "gelu"
        if ops == {"Relu"}:
            return "relu"
        if "Tanh" in ops:
            raise self.fail(where, "GELU's tanh approximation, which the canonical ViT does not compute")
        raise self.fail(where, f"an activation of {sorted(ops) or 'nothing'}; GELU or ReLU expected")

    # ---- the end
    def head(self, x: str, output: str) -> None:
        """Final norm, pooling and head from the last block's output ``x`` to the graph's ``output``."""
        g = self.g
        final = _norm_at(g, x)
        if final is not None and self._residual(x) is None:
            self._put_norm("norm", final)
            self.values["final_norm"] = "token"
            x = final.output
        else:
            self.values["final_norm"] = "none"
        region = _region(g, x, output)
        if not region:
            raise self.fail("head", f"the graph's output {output!r} is not computed from the last block")
        prefix = self.values["prefix"]
        picks, means = {}, []
        for n in region:
            if n.input[0] != x:
                continue
            token = self._token_pick(n, x)
            if token is not None:
                if isinstance(token, int):
                    picks[token] = n
                else:
                    means.append((token, n))
        if means and len(means) > 1:
            raise self.fail("head", "more than one token average")
        if means:
            start = means[0][0][0]
            if 0 in picks:
                pool = "cls_mean"
                if start != prefix:
                    raise self.fail("head", f"a class token beside a mean from token {start}, not {prefix}")
            else:
                pool = "mean_all" if start == 0 else "mean"
                if start not in (0, prefix):
                    raise self.fail("head", f"a mean from token {start}")
        elif 0 in picks:
            pool = "cls"
        else:
            raise self.fail("head", "neither the class token nor a mean of tokens is read")
        linears = [lin for n in region if (lin := _linear_at(g, n)) is not None]
        if not linears:
            raise self.fail("head", "no linear layer")
        if 1 in picks:  # DeiT: heads on the class and distillation tokens, averaged
            if len(linears) != 2:
                raise self.fail("head", f"{len(linears)} linear layers on two tokens")
            cls_side = _ancestors(g, [linears[0].input], {x})
            a, b = (linears if picks[0].output[0] in cls_side else linears[::-1])
            self._put_linear("head", a)
            self._put_linear("head_dist", b)
            self.values |= {"dist_token": True, "dist_head": True}
        else:
            for j, lin in enumerate(linears[:-1]):
                self._put_linear(f"head_hidden.{2 * j}", lin)
                if j == 0:
                    self.values["head_act"] = self._activation("head", _region(g, lin.output, linears[1].input))
            self._put_linear("head", linears[-1])
            self.values["head_hidden"] = [lin.weight.shape[0] for lin in linears[:-1]]
        pre_head = _ancestors(g, [linears[0].input], {x})
        fc_norm = None
        for n in region:
            if n.output[0] in pre_head:
                cand = _norm_at(g, n.output[0])
                if cand is not None and cand.output in pre_head and (1 not in picks):
                    fc_norm = cand
                    break
        if fc_norm is not None:
            if self.values["final_norm"] == "token":
                raise self.fail("head", "a LayerNorm after pooling beside one on every token")
            self._put_norm("fc_norm", fc_norm)
            self.values["final_norm"] = "pooled"
        self.values["pool"] = pool
        self.values["num_classes"] = linears[-1].weight.shape[0] if 1 not in picks else linears[0].weight.shape[0]

    def _token_pick(self, node, x: str):
        """``node`` as a read of token ``i`` (Gather / a one-token Slice), or of tokens ``(start,)`` averaged."""
        g = self.g
        shape = g.shape(x)
        axis_of = lambda a: int(a) % len(shape) if shape else int(a)  # noqa: E731
        token_axis = next((a for a, s in enumerate(shape or ()) if s == self.tokens), 1)
        if node.op_type == "Gather" and axis_of(_attr(node, "axis", 0)) == token_axis:
            idx = g.const.get(node.input[1])
            if idx is not None and idx.size == 1:
                return int(idx.reshape(())) % self.tokens
        if node.op_type == "Slice" and node.input[0] == x:
            starts, ends = g.const.get(node.input[1]), g.const.get(node.input[2])
            axes = g.const.get(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
            if starts is None or ends is None or axes is None:
                return None
            for s, e, a in zip(starts, ends, axes):
                if axis_of(a) == token_axis:
                    s, e = int(s) % self.tokens if s < 0 else int(s), min(int(e), self.tokens)
                    if e - s == 1:
                        return s
                    users = g.users(node.output[0])
                    if e == self.tokens and len(users) == 1 and users[0].op_type == "ReduceMean":
                        return (s,)
            return None
        if node.op_type == "ReduceMean" and node.input[0] == x:
            axes = _attr(node, "axes") or (list(g.const[node.input[1]]) if len(node.input) > 1 else None)
            if axes is not None and [axis_of(a) for a in axes] == [token_axis]:
                return (0,)
        return None

    # ---- helpers
    def _put_norm(self, key: str, norm: Norm) -> None:
        self.state[f"{key}.weight"], self.state[f"{key}.bias"] = norm.weight, norm.bias
        self.values.setdefault("norm_eps", float(f"{norm.eps:.6g}"))  # 1e-06, not float32's 9.99999997e-07

    def _put_linear(self, key: str, lin: Linear) -> None:
        self.state[f"{key}.weight"] = lin.weight
        self.state[f"{key}.bias"] = lin.bias if lin.bias is not None else np.zeros(lin.weight.shape[0], np.float32)


def walk(g: Graph, *, output: str | None = None, backbone: bool = False) -> Lifted:
    """Read the ViT in ``g``. ``output`` names the encoder's output tensor (a block's or the final norm's); with
    ``backbone`` (or ``output``) the graph's head is not read and the model gets a new one."""
    w = _Walk(g, output)
    graph_output = g.proto.graph.output[0].name
    x = w.embed()
    x = w.blocks(x)
    if output is not None and x != output:
        final = _norm_at(g, x)
        if final is None or final.output != output:
            raise LiftError(f"{output!r} is not the output of a block or of the final LayerNorm after the last "
                            f"block; name one of those (the last block gives {x!r})")
    if output is None and not backbone:
        w.head(x, graph_output)
        out = graph_output
    else:  # the encoder's tokens, after the final LayerNorm unless the user named a block's output
        final = _norm_at(g, x) if output != x else None
        w.values["final_norm"] = "token" if final is not None else "none"
        if final is not None:
            w._put_norm("norm", final)
            x = final.output
        out = x
    values = _config_values(w)
    state = dict(w.state)
    prefix = state.pop("_prefix", None)
    if prefix is not None:
        n = len(prefix)
        dist = values.get("dist_token", False)
        state["cls_token"] = prefix[None, :1]
        if dist:
            state["dist_token"] = prefix[None, 1:2]
        elif n > 1:
            state["reg_token"] = prefix[None, 1:]
            values["reg_tokens"] = n - 1
    if "blocks.0.ls1.gamma" in state:
        values["layer_scale_init"] = 1.0
    lifted = Lifted(values, state, out, backbone=output is not None or backbone, input_name=g.input)
    return lifted


def _config_values(w: _Walk) -> dict[str, Any]:
    v = dict(w.values)
    prefix = v.pop("prefix", 0)
    head_dims = v.pop("head_dims", [])
    if len(set(head_dims)) > 1:
        raise LiftError(f"attention heads of different widths across blocks ({sorted(set(head_dims))})")
    v["head_dim"] = head_dims[0]
    v["class_token"] = prefix > 0
    v.setdefault("norm_eps", 1e-5)
    v.setdefault("num_classes", 1)
    return v


# ----------------------------------------------------------------------------------------------- entry point
def _walk(g, **options):
    """``walk``, with a graph shaped in a way no check of the walk foresaw (an index past a list, a missing input,
    an array of another shape) reported as a ``LiftError`` too: the file is the user's, and a run then goes on
    with the ONNX-level stages instead of stopping on a traceback."""
    try:
        return walk(g, **options)
    except LiftError:
        raise
    except (IndexError, KeyError, ValueError, TypeError, AttributeError) as e:
        where = e.__traceback__
        while where.tb_next is not None:
            where = where.tb_next
        raise LiftError(f"the graph has a structure the ViT reader does not follow ({type(e).__name__}: "
                        f"{str(e)[:120]} in {where.tb_frame.f_code.co_name})") from None


def lift_onnx(path: str | Path, *, output: str | None = None, num_classes: int | None = None,
              pool: str | None = None, inputs: np.ndarray | None = None, atol: float = 1e-4):
    """The ``VisionTransformer`` in ONNX file ``path``, checked against ONNX Runtime.

    Args:
        output: the encoder's output tensor in a larger graph (a block's, or the final LayerNorm's); the model
            then gets a new head of ``num_classes``.
        num_classes: for a graph whose head is not read (``output``, or a head the walk does not recognise):
            the classes of the new head.
        pool: the new head's pooling (``cls`` by default; ``cls_mean`` as DINOv2's classifier).
        inputs: (N, C, H, W) float32 images the rebuilt model and ONNX Runtime are compared on (default: 4
            standard-normal images; real ones are better).
        atol: the largest absolute difference allowed, relative to the output's largest magnitude where that
            is above 1.

    Returns ``(model, lifted)``: the model in eval mode and what the walk read. Raises ``LiftError`` naming the
    first part of the graph it did not recognise, or the disagreement.
    """
    import torch

    from compress.model.vit import ViTConfig, VisionTransformer

    path = Path(path)
    g = fold(path)
    try:
        lifted = _walk(g, output=output)
    except LiftError as e:
        if output is not None or not str(e).startswith("head:"):
            raise
        if num_classes is None:
            raise LiftError(f"{e}; to take the encoder with a new head, set model.num_classes=N (and "
                            "model.onnx_output=TENSOR to choose where it ends)") from None
        log.info("%s: %s; taking the encoder with a new %d-class head", path.name, e, num_classes)
        lifted = _walk(g, backbone=True)
    values = dict(lifted.values)
    if lifted.backbone:
        if num_classes is None:
            raise LiftError("a backbone without a classifier needs the classes of its new head: set "
                            "model.num_classes=N and train the head with `compress train --init`")
        values |= {"num_classes": num_classes, "pool": pool or ("cls" if values["class_token"] else "mean"),
                   "head_hidden": []}
        values.pop("head_act", None)
    elif num_classes is not None and num_classes != values["num_classes"]:
        raise LiftError(f"model.num_classes={num_classes}, but the graph's head predicts {values['num_classes']} "
                        "classes; drop the setting, or name the encoder's output (model.onnx_output) for a new head")
    try:
        cfg = ViTConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise LiftError(f"the graph reads as a ViT that cannot be built ({str(e)[:160]})") from None
    model = VisionTransformer(cfg)
    expected = model.state_dict()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).reshape(expected[k].shape) if k in expected and
             np.asarray(v).size == expected[k].numel() else torch.from_numpy(np.ascontiguousarray(v))
             for k, v in lifted.state.items()}
    if lifted.backbone:
        state |= {k: v for k, v in expected.items() if k.startswith(("head.", "head_hidden.", "head_dist."))}
    from compress.model.checkpoint import load_exact

    load_exact(model, state, source=path.name)
    _check_parity(model, path, lifted, inputs, atol)
    return model, lifted


def _check_parity(model, path: Path, lifted: Lifted, inputs: np.ndarray | None, atol: float) -> float:
    """Compare the rebuilt model with ONNX Runtime on ``inputs``: logits, or the backbone's tokens."""
    import onnx
    import onnxruntime as ort
    import torch

    cfg = model.config
    if inputs is None:
        inputs = np.random.default_rng(0).standard_normal((4, cfg.in_chans, cfg.image_size, cfg.image_size))
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    proto = onnx.load(str(path))
    if lifted.output not in {o.name for o in proto.graph.output}:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(lifted.output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe), save_as_external_data=proto.ByteSize() > 1_500_000_000)
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        if session.get_inputs()[0].type == "tensor(float16)":
            raise LiftError("the graph takes float16 images; lift its float32 export")
        worst = 0.0
        for start in range(0, len(inputs), 8):
            x = inputs[start : start + 8]
            ref = session.run([lifted.output], {lifted.input_name: x})[0].astype(np.float32)
            with torch.inference_mode():
                t = torch.from_numpy(x)
                got = (model.forward_features(t) if lifted.backbone else model(t)).numpy()
            if got.size != ref.size:
                raise LiftError(f"the rebuilt model gives {got.shape} where the graph gives {ref.shape}")
            got = got.reshape(ref.shape)
            diff = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
            worst = max(worst, diff)
    if worst > atol:
        raise LiftError(f"the ViT rebuilt from {path.name} disagrees with ONNX Runtime (largest relative difference "
                        f"{worst:.2g}, tolerance {atol:g}): a part of the graph was misread; report it with the file")
    log.info("%s: ViT lifted (%d blocks, width %d, heads %s); matches ONNX Runtime within %.2g on %d images",
             path.name, cfg.depth, cfg.embed_dim, sorted(set(cfg.num_heads)), worst, len(inputs))
    return worst
