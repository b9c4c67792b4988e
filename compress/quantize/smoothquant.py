"""SmoothQuant (Xiao et al., 2023) for the pre-norm ViT: move activation outliers into the weights.

Per input channel j of a Linear fed by a LayerNorm, ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``; the
LayerNorm's weight and bias are divided by ``s`` and the Linear's weight columns multiplied by it. The float
function is unchanged (up to rounding), but the Linear's input no longer has a few channels hundreds of times
larger than the rest, so a per-tensor INT8 scale keeps the others (the residual stream reaches |x| ~ 1400
in ViTs: NVIDIA/TensorRT#4084, #4068). It applies where a LayerNorm feeds Linear layers directly:
``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` of each pre-norm block. Post-norm blocks have no such pair and are left alone.

neural-compressor 3.x runs its own SmoothQuant only through intel-extension-for-pytorch; this transform gives
the PT2E path the same migration without it. The maxima come from the calibration set.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from calibration.calibrate import CalibrationSet


@torch.no_grad()
def smooth(model: nn.Module, calib: CalibrationSet, *, alpha: float = 0.5, samples: int = 128) -> nn.Module:
    """A smoothed copy of ``model``; ``model`` itself is not modified."""
    model = copy.deepcopy(model).eval()
    pairs = [(block.norm1, block.attn.qkv) for block in model.blocks if block.pre_norm] + \
            [(block.norm2, block.mlp.fc1) for block in model.blocks if block.pre_norm]
    if not pairs:
        return model
    maxima: dict[int, torch.Tensor] = {}

    def observe(norm: nn.LayerNorm):
        def hook(_module, _inputs, output):
            m = output.detach().abs().flatten(0, -2).amax(0)  # (D,)
            maxima[id(norm)] = torch.maximum(maxima[id(norm)], m) if id(norm) in maxima else m
        return norm.register_forward_hook(hook)

    handles = [observe(norm) for norm, _ in pairs]
    seen = 0
    try:
        for batch in calib.batches():
            model(torch.from_numpy(batch[: samples - seen]))
            seen += min(len(batch), samples - seen)
            if seen >= samples:
                break
    finally:
        for handle in handles:
            handle.remove()
    for norm, linear in pairs:
        act = maxima[id(norm)].clamp(min=1e-5)
        weight = linear.weight.abs().amax(0).clamp(min=1e-5)  # (D,) over output rows
        s = (act.pow(alpha) / weight.pow(1 - alpha)).clamp(min=1e-5)
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)
        linear.weight.mul_(s)
    return model
