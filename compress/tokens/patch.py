"""Token reduction applied to a ``VisionTransformer``: the model surgery, apart from the math (``merge``).

``apply(model, plan)`` checks the plan against the model and swaps the model's class for
``ReducedVisionTransformer``, whose forward runs each block with proportional attention and reduces tokens
between attention and MLP where the plan says so (as ToMe's ``patch/timm.py`` swaps timm's classes). Layers the
plan leaves alone run the block unchanged. A resolution plan instead resizes the image and the position
embedding before the first block and runs every block unchanged. The plan is a model attribute
(``token_reduction``), not weights: it travels in checkpoints' metadata and is re-applied on load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compress.model.vit import Block, VisionTransformer, resize_pos_embed
from compress.tokens.merge import class_attention, merge_tokens, pitome_margin, pitome_merge, prune_tokens
from compress.tokens.plan import MERGING, TokenReduction, token_counts


class ReducedVisionTransformer(VisionTransformer):
    """A ``VisionTransformer`` that follows its ``token_reduction`` plan (set by ``apply``; None runs every token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_reduction is None:
            return super().forward(x)
        return forward_reduced(self, x, self.token_reduction)  # (B, K)


def forward_reduced(
    model: VisionTransformer, x: torch.Tensor, plan: TokenReduction, trace: list[dict[str, Any]] | None = None
) -> torch.Tensor:
    """Logits (B, K) of ``model`` on images ``x`` (B, C, H, W) with tokens reduced by ``plan``.

    ``trace``, when given, receives per block the token count and the sizes (B, T, 1) of the tokens after it.
    """
    if plan.method == "resolution":
        return _forward_resized(model, x, plan.image_size or model.config.image_size, trace)
    prefix = model.config.num_prefix_tokens
    x = model.embed(x)  # (B, T, D)
    size = None  # (B, T, 1): how many original tokens each token stands for; None while every size is 1
    depth = len(model.blocks)
    for layer, block in enumerate(model.blocks):
        r = plan.r[layer] if plan.method in MERGING else 0
        keep = plan.keep[layer] if plan.method == "evit" else 1.0
        margin = pitome_margin(layer, depth) if plan.method == "pitome" else None
        if size is None and r == 0 and keep >= 1:
            x = block(x)  # untouched layer: exactly the original computation
        else:
            x, size = _reduced_block(block, x, size, r=r, keep=keep, prefix=prefix, margin=margin,
                                     on_tokens=plan.similarity == "tokens")
        if trace is not None:
            trace.append({"tokens": x.shape[1], "size": size if size is not None else x.new_ones(*x.shape[:2], 1)})
    return model.forward_head(model.norm(x), size)  # (B, K)


def _forward_resized(
    model: VisionTransformer, x: torch.Tensor, image_size: int, trace: list[dict[str, Any]] | None
) -> torch.Tensor:
    """The encoder at ``image_size``: the image (B, C, H, W) resized (bilinear, no antialiasing: ONNX Resize
    without it runs in every runtime, and on the reference ViT-S it scored as resizing with it did), the
    position embedding interpolated to the smaller grid from the weights on every call, so fine-tuning trains
    the model's own one and the exported graph folds it to a constant."""
    cfg = model.config
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)  # (B, C, s, s)
    pos = resize_pos_embed(model.pos_embed, cfg.grid_size, image_size // cfg.patch_size, cfg.num_pos_prefix,
                           antialias=False)  # (1, P + g'*g', D)
    x = model.embed(x, pos)  # (B, P + g'*g', D)
    for block in model.blocks:
        x = block(x)
        if trace is not None:
            trace.append({"tokens": x.shape[1], "size": x.new_ones(*x.shape[:2], 1)})
    return model.forward_head(model.norm(x))  # (B, K)


def _reduced_block(
    block: Block, x: torch.Tensor, size: torch.Tensor | None, *, r: int, keep: float, prefix: int,
    margin: float | None = None, on_tokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder block with proportional attention, then a merge (ToMe; PiToMe where ``margin`` is given) or a
    prune (EViT) before the MLP. A merge matches tokens on their keys averaged over heads, or with ``on_tokens`` on
    the tokens themselves."""
    attn = block.attn
    q, k, v = attn.split_heads(block.norm1(x) if block.pre_norm else x)  # (B, H, T, hd) each
    bias = None if size is None else size.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, T)
    out = attn.merge_heads(attn.attend(q, k, v, bias))  # (B, T, D)
    x = x + block.ls1(out) if block.pre_norm else block.norm1(x + block.ls1(out))
    metric = x if on_tokens else k.mean(dim=1)  # (B, T, D) or (B, T, hd)
    if r > 0 and margin is not None:
        x, size = pitome_merge(x, size, metric, r, prefix, margin)  # (B, T-r, D)
    elif r > 0:
        x, size = merge_tokens(x, size, metric, r, prefix)  # (B, T-r, D)
    elif keep < 1:
        x = prune_tokens(x, class_attention(q, k, attn.scale, bias), keep, prefix)  # (B, P+kept+1, D)
    if block.pre_norm:
        x = x + block.ls2(block.mlp(block.norm2(x)))
    else:
        x = block.norm2(x + block.ls2(block.mlp(x)))
    return x, size


def apply(model: VisionTransformer, plan: TokenReduction | None) -> VisionTransformer:
    """Set ``plan`` on ``model`` (in place) after checking the model can follow it; None removes reduction."""
    if plan is not None:
        token_counts(plan, model.config)  # raises TokenError with the largest valid value
        plan = plan if plan.active else None
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"token reduction applies to a VisionTransformer, not {type(model).__name__}")
    model.__class__ = VisionTransformer if plan is None else ReducedVisionTransformer
    model.token_reduction = plan
    return model
