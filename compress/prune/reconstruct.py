"""Repair a pruned ViT from calibration images alone: per-layer least squares on what follows the removed heads
and units.

After heads and MLP units are removed, each block's branch output is a sum over what is left: the attention
branch is ``sum_h W_o[:, h] o_h`` over the kept heads, the MLP branch ``sum_k W2[:, k] h_k`` over the kept units.
Both are linear in ``W_o`` and ``W2``, so the weights that best reconstruct the unpruned model's outputs are a
linear least-squares problem, layer by layer, and nothing is trained. Two ways to pose it:

- **weights** (the default): all of ``W_o`` and ``W2`` and their biases (``_refit``), one regression per output
  channel on the same inputs, so one Gram matrix of the kept heads' outputs (the kept units' activations) serves
  every channel: the layer-wise reconstruction post-training compression methods use for the layer after the
  removed structure.
- **scales**: one scale ``m`` per kept head and unit, folded into ``W_o`` and ``W2`` (Kwon et al., NeurIPS 2022, "A
  Fast Post-Training Pruning Framework for Transformers", their *mask tuning*). The normal equations need only
  Gram matrices, accumulated batch by batch: for the MLP, ``G = (H^T H) * (W2^T W2)`` (elementwise) and
  ``b_k = sum_d W2[d, k] (T^T H)[d, k]``, with ``H`` the kept units' activations over every token and ``T`` the
  target less what does not depend on ``m``.

Either way the target of each branch is the **unpruned model's residual stream** after that branch, and the input
is the **pruned model's** stream so far: each layer also undoes the drift the layers before it left. A small
ridge towards the weights (scales of one) the layer had keeps rarely active units where they were. On the
reference ViT-S/14 pruned to 0.8x the MACs by the mask search, the weights brought the loss from 19.3 points to
0.4 and the scales to 4.8 (BENCHMARKS.md). Pre-norm blocks only (every checkpoint layout this tool reads but the
post-norm ``nn.TransformerEncoder`` ones).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch

from compress.model.vit import Block, VisionTransformer
from compress.prune.structured import PruneError

log = logging.getLogger(__name__)

RIDGE = 1e-3  # relative to the Gram matrix's mean diagonal


def reconstruct(pruned: VisionTransformer, original: VisionTransformer, images: Iterable[np.ndarray], *,
                weights: bool = True) -> dict:
    """Refit each block's ``attn.proj`` and ``mlp.fc2`` of ``pruned`` in place (``_refit``), or with ``weights=False``
    only scale its kept heads and MLP units, so that, block by block, its residual stream follows ``original``'s on
    ``images`` (batches of (B, C, H, W) float32). Returns the mean squared stream error after the
    last block, before and after, for the log and the stage's notes."""
    if not pruned.config.pre_norm or not original.config.pre_norm:
        raise PruneError("least-squares reconstruction (prune.reconstruct) works on pre-norm blocks; this model "
                         "has post-norm ones: recover with distillation instead (recover.epochs)")
    if pruned.token_reduction is not None or original.token_reduction is not None:
        raise PruneError("prune.reconstruct runs before token reduction; put the prune stage first")
    batches = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in images]
    if not batches:
        raise PruneError("prune.reconstruct needs calibration images; set data.calib_size above 0")
    with torch.no_grad():
        ours = [pruned.embed(x) for x in batches]  # (B, T, D): the pruning left the embedding as it was
        theirs = [original.embed(x) for x in batches]
        before = _stream_error(pruned, original, batches)
        start = time.perf_counter()
        for layer, (block, reference) in enumerate(zip(pruned.blocks, original.blocks)):
            # the unpruned block's branch on the pruned model's own stream: what this layer should add to it
            targets = [x + reference.ls1(reference.attn(reference.norm1(x))) for x in ours]
            (_refit_heads if weights else _tune_heads)(block, ours, targets)
            ours = [x + block.ls1(block.attn(block.norm1(x))) for x in ours]
            targets = [x + reference.ls2(reference.mlp(reference.norm2(x))) for x in ours]
            (_refit_units if weights else _tune_units)(block, ours, targets)
            ours = [x + block.ls2(block.mlp(block.norm2(x))) for x in ours]
            theirs = [t + reference.ls1(reference.attn(reference.norm1(t))) for t in theirs]
            theirs = [t + reference.ls2(reference.mlp(reference.norm2(t))) for t in theirs]
            if layer == 0:
                eta = (time.perf_counter() - start) * len(pruned.blocks)
                if eta > 60:
                    log.info("prune: least-squares reconstruction, %d layers: about %.0f min", len(pruned.blocks),
                             eta / 60)
        after = float(np.mean([((pruned.norm(o) - original.norm(t)) ** 2).mean().item() for o, t in zip(ours, theirs)]))
    log.info("prune: least-squares reconstruction on %d images: final-stream error %.4g -> %.4g",
             sum(len(x) for x in batches), before, after)
    return {"images": sum(len(x) for x in batches), "stream_mse_before": before, "stream_mse_after": after,
            "fit": "weights" if weights else "scales"}


def _stream_error(pruned: VisionTransformer, original: VisionTransformer, batches: list[torch.Tensor]) -> float:
    return float(np.mean([((pruned.forward_features(x) - original.forward_features(x)) ** 2).mean().item()
                          for x in batches]))


def _gamma(ls: torch.nn.Module, dim: int) -> torch.Tensor:
    return ls.gamma if hasattr(ls, "gamma") else torch.ones(dim)


def _channel_weights(targets: list[torch.Tensor]) -> torch.Tensor:
    """1 / the standard deviation of each channel of the target stream: an error is judged relative to how much
    its channel varies (a ViT's residual stream carries a few channels hundreds of times larger than the rest,
    which would otherwise decide the fit alone)."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets]).double()
    return 1.0 / x.std(0).clamp_min(1e-6)


def _tune_heads(block: Block, streams: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Per-head scales of ``attn.proj``'s input columns: its output, over every token, against the target."""
    attn = block.attn
    H, hd, D = attn.num_heads, attn.head_dim, attn.proj.out_features
    gamma = _gamma(block.ls1, D).double()
    s = _channel_weights(targets)
    W = attn.proj.weight.double() * (gamma * s)[:, None]  # (D, H*hd): LayerScale and channel weights folded in
    gram = torch.zeros(H, H, dtype=torch.float64)
    rhs = torch.zeros(H, dtype=torch.float64)
    f_sum = torch.zeros(H, D, dtype=torch.float64)
    r_sum = torch.zeros(D, dtype=torch.float64)
    n = 0
    for x, target in zip(streams, targets):
        o = _head_outputs(block, x).view(-1, H, hd)  # (tokens, H, hd)
        features = torch.einsum("thc,dhc->thd", o, W.view(D, H, hd))  # (tokens, H, D): each head's contribution
        rest = ((target - x).reshape(-1, D).double() - gamma * attn.proj.bias.double()) * s  # what the heads make
        gram += torch.einsum("thd,tjd->hj", features, features)
        rhs += torch.einsum("thd,td->h", features, rest)
        f_sum += features.sum(0)
        r_sum += rest.sum(0)
        n += len(rest)
    f_mean, r_mean = f_sum / n, r_sum / n  # centred: the bias is fitted beside the scales
    gram -= n * f_mean @ f_mean.T
    rhs -= n * f_mean @ r_mean
    scales = _solve(gram, rhs)
    shift = (r_mean - scales @ f_mean) / (gamma * s)  # the bias change, back in the layer's own units
    with torch.no_grad():
        attn.proj.weight.mul_(scales.repeat_interleave(hd).to(attn.proj.weight.dtype)[None, :])
        attn.proj.bias.add_(shift.to(attn.proj.bias.dtype))


def _tune_units(block: Block, streams: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Per-unit scales of ``mlp.fc2``'s input columns, from Gram matrices: ``(H^T H) * (W2^T W2)``."""
    mlp = block.mlp
    D, K = mlp.fc2.out_features, mlp.fc2.in_features
    gamma = _gamma(block.ls2, D).double()
    s = _channel_weights(targets)
    W = mlp.fc2.weight.double() * (gamma * s)[:, None]  # (D, K)
    hth = torch.zeros(K, K, dtype=torch.float64)
    tth = torch.zeros(D, K, dtype=torch.float64)
    h_sum = torch.zeros(K, dtype=torch.float64)
    r_sum = torch.zeros(D, dtype=torch.float64)
    n = 0
    for x, target in zip(streams, targets):
        h = mlp.act(mlp.fc1(block.norm2(x))).reshape(-1, K).double()  # (tokens, K)
        rest = ((target - x).reshape(-1, D).double() - gamma * mlp.fc2.bias.double()) * s  # (tokens, D)
        hth += h.T @ h
        tth += rest.T @ h
        h_sum += h.sum(0)
        r_sum += rest.sum(0)
        n += len(h)
    h_mean, r_mean = h_sum / n, r_sum / n  # centred: the bias is fitted beside the scales
    hth -= n * torch.outer(h_mean, h_mean)
    tth -= n * torch.outer(r_mean, h_mean)
    gram = hth * (W.T @ W)
    rhs = (tth * W).sum(0)
    scales = _solve(gram, rhs)
    shift = (r_mean - W @ (scales * h_mean)) / (gamma * s)
    with torch.no_grad():
        mlp.fc2.weight.mul_(scales.to(mlp.fc2.weight.dtype)[None, :])
        mlp.fc2.bias.add_(shift.to(mlp.fc2.bias.dtype))


def _head_outputs(block: Block, x: torch.Tensor) -> torch.Tensor:
    """What ``attn.proj`` takes in, every token's heads side by side: (tokens, heads * head width), float64."""
    attn = block.attn
    q, k, v = attn.split_heads(block.norm1(x))  # (B, H, T, hd) each
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, H, T, hd)
    return o.transpose(1, 2).reshape(-1, attn.num_heads * attn.head_dim).double()


def _refit_heads(block: Block, streams: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    gamma = _gamma(block.ls1, block.attn.proj.out_features).double()
    _refit(block.attn.proj, gamma, ((_head_outputs(block, x), target - x) for x, target in zip(streams, targets)))


def _refit_units(block: Block, streams: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    mlp, gamma = block.mlp, _gamma(block.ls2, block.mlp.fc2.out_features).double()
    hidden = (mlp.act(mlp.fc1(block.norm2(x))).reshape(-1, mlp.fc2.in_features).double() for x in streams)
    _refit(mlp.fc2, gamma, zip(hidden, (target - x for x, target in zip(streams, targets))))


def _refit(linear: torch.nn.Linear, gamma: torch.Tensor, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``linear``'s whole weight and bias, in place, so that ``gamma * linear(z)`` best matches ``y`` over every
    token of ``pairs`` (``z``: (tokens, in) float64, ``y``: (..., out)), by least squares with a small ridge towards
    the weight it had. Each output channel is its own regression on the same inputs, so one Gram matrix of the
    inputs serves them all: ``W = (Y'Z + lam W0) (Z'Z + lam I)^-1``, centred so the bias is fitted beside it.
    Where ``mask tuning`` (``_tune_heads``, ``_tune_units``) fits one scale per kept head or unit, this fits every
    weight of the layer after the pruned ones, as layer-wise reconstruction for post-training compression does
    (the optimal update of the layer's remaining weights for its own output error): many more unknowns, still
    far fewer than the calibration tokens give equations (256 images of a ViT-S/14 at 224: 65,792 tokens per
    row, against at most 1,536 weights)."""
    K, D = linear.in_features, linear.out_features
    safe = torch.where(gamma.abs() > 1e-12, gamma, torch.ones_like(gamma))  # a zero LayerScale: any weight does
    zz = torch.zeros(K, K, dtype=torch.float64)
    yz = torch.zeros(D, K, dtype=torch.float64)
    z_sum = torch.zeros(K, dtype=torch.float64)
    y_sum = torch.zeros(D, dtype=torch.float64)
    n = 0
    for z, y in pairs:
        y = y.reshape(-1, D).double() / safe  # what linear(z) itself should give
        zz += z.T @ z
        yz += y.T @ z
        z_sum += z.sum(0)
        y_sum += y.sum(0)
        n += len(z)
    z_mean, y_mean = z_sum / n, y_sum / n
    zz -= n * torch.outer(z_mean, z_mean)
    yz -= n * torch.outer(y_mean, z_mean)
    lam = RIDGE * float(torch.diagonal(zz).mean()) + 1e-12
    w0 = linear.weight.double()
    weight = torch.linalg.solve(zz + lam * torch.eye(K, dtype=zz.dtype), (yz + lam * w0).T).T
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.copy_((y_mean - weight @ z_mean).to(linear.bias.dtype))


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``argmin |T - F m|^2 + lam |m - 1|^2`` from the normal equations, ``lam`` a small share of the mean diagonal."""
    n = len(rhs)
    lam = RIDGE * float(torch.diagonal(gram).mean()) + 1e-12
    return torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype), rhs + lam * torch.ones(n, dtype=gram.dtype))
