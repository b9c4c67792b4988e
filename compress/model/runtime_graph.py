"""The same ViT written the way a runtime runs it fastest, before it is exported: exact rewrites, no new weights.

The model a user trains, prunes and checkpoints keeps one layout (``compress.model.vit``: a fused ``attn.qkv``,
LayerScale as its own multiply, attention through ``F.scaled_dot_product_attention``). What OpenVINO's CPU plugin
makes of that graph once NNCF has quantized it leaves time on the table (BENCHMARKS.md, "The graph OpenVINO runs
fastest"):

- the fused qkv output is split by a ``VariadicSplit`` that runs in OpenVINO's reference implementation, and the
  FakeQuantize on each split part cannot fuse into the projection that made it;
- the keys reach the attention product through a (B, N, H, hd) -> (B, H, hd, N) transpose, which the plugin's
  attention kernel does not take in and executes apart, on INT8 data, in a slow generic kernel;
- LayerScale adds a multiply per residual branch.

``for_runtime(model, "openvino")`` returns a copy in which each LayerScale is folded into the projection before it
(``gamma * (W x + b) = (gamma W) x + gamma b``), each fused qkv projection is three (``attn.qkv.q``, ``.k``,
``.v``: every name that matched ``attn.qkv`` is still under it), and the scores are an ``einsum`` over the head
width, which OpenVINO lowers to a MatMul that reads the keys as they are (``transpose_b``). Each step changes
rounding only. On ONNX Runtime the ``einsum`` is slower than the MatMul it replaces (its FP32 engine: 1.06-1.09x), so
the form is chosen per run for its first runtime (``compress.config.export_graph``); "standard" is the model as
it is.
"""

from __future__ import annotations

import copy
import torch
from torch import nn

from compress.model.vit import Attention, Block, LayerScale, VisionTransformer

GRAPHS: tuple[str, ...] = ("standard", "openvino")


class ProjectedAttention(Attention):
    """``Attention`` with queries, keys and values from three projections (``qkv.q``, ``qkv.k``, ``qkv.v``) and the
    scores as an ``einsum``; the same numbers as the fused ``Attention`` it is made from."""

    def __init__(self, fused: Attention) -> None:
        nn.Module.__init__(self)
        self.num_heads, self.head_dim, self.scale = fused.num_heads, fused.head_dim, fused.scale
        width = fused.num_heads * fused.head_dim
        weights = fused.qkv.weight.detach().split(width)  # (width, D) each: the q, k and v rows, in that order
        biases = fused.qkv.bias.detach().split(width) if fused.qkv.bias is not None else (None, None, None)
        parts = {}
        for name, weight, bias in zip("qkv", weights, biases):
            part = nn.Linear(fused.qkv.in_features, width, bias=bias is not None)
            part.weight.data.copy_(weight)
            if bias is not None:
                part.bias.data.copy_(bias)
            parts[name] = part
        self.qkv = nn.ModuleDict(parts)
        self.proj = fused.proj

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = (self.qkv[name](x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for name in "qkv")
        return q, k, v  # (B, H, N, hd) each

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        scores = torch.einsum("bhqd,bhkd->bhqk", q * self.scale, k)  # (B, H, N, N)
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1) @ v  # (B, H, N, hd)


def fold_layer_scale(block: Block) -> None:
    """Fold ``block``'s LayerScales into ``attn.proj`` and ``mlp.fc2`` (in place); they become identities."""
    for name, linear in (("ls1", block.attn.proj), ("ls2", block.mlp.fc2)):
        scale = getattr(block, name)
        if not isinstance(scale, LayerScale):
            continue
        gamma = scale.gamma.detach()
        linear.weight.data.mul_(gamma[:, None])
        if linear.bias is not None:
            linear.bias.data.mul_(gamma)
        setattr(block, name, nn.Identity())


@torch.no_grad()
def for_runtime(model: VisionTransformer, graph: str) -> VisionTransformer:
    """``model`` for export in the ``graph`` form: itself for "standard", else a rewritten copy (``model`` is left
    as it is). Token reduction plans and every other attribute travel with the copy."""
    if graph == "standard":
        return model
    if graph != "openvino":
        raise ValueError(f"unknown export graph {graph!r}; use one of {', '.join(GRAPHS)}")
    copied = copy.deepcopy(model)
    for block in copied.blocks:
        fold_layer_scale(block)
        if not isinstance(block.attn, ProjectedAttention):
            block.attn = ProjectedAttention(block.attn)
    return copied
