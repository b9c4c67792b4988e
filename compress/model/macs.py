"""Parameter and multiply-accumulate counts, measured by running the model once with forward hooks.

Hooks on every ``nn.Linear`` and ``nn.Conv2d`` count their MACs from the actual input shapes, and each
``Attention`` adds its two matrix products (Q K^T and A V), so the count follows whatever a later stage did
to the model (fewer heads, narrower MLPs, fewer tokens) without a formula to keep in step. Token merging's
own similarity and merge products are left out: under 1% of a block at the settings this tool uses.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.model.vit import Attention


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass at ``input_shape`` (batch included), via hooks on the real modules."""
    total = 0

    def linear(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    def conv(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * k

    def attention(module: Attention):
        def hook(qkv: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            nonlocal total
            B, N, _ = inputs[0].shape
            total += 2 * B * module.num_heads * N * N * module.head_dim  # Q K^T and A V

        return hook

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        if isinstance(m, Attention):  # counted from its qkv projection, which every forward path calls
            hooks.append(m.qkv.register_forward_hook(attention(m)))
    try:
        with torch.inference_mode():
            model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total
