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
    ``images`` (batches of (B, C, H, W) float32). Returns the mean squared stream error after the last block on
    the first batch, before and after, for the log and the stage's notes."""
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
        # the error the repair leaves, on the first batch: two more passes over every batch would cost as much as
        # the repair
        final = original.forward_features(batches[0])  # the unpruned model's last stream
        before = ((pruned.forward_features(batches[0]) - final) ** 2).mean().item()
        start = time.perf_counter()
        for layer, (block, reference) in enumerate(zip(pruned.blocks, original.blocks)):
            # Each branch of the unpruned block on the pruned model's own stream is what this layer should add to
            # it. Where the pruned block's heads (units) are the unpruned one's untouched, as removal leaves them,
            # their outputs are columns of the unpruned block's: computed once for both.
            if weights:
                ours = _refit_branch(block, reference, ours, "attn")
                ours = _refit_branch(block, reference, ours, "mlp")
            else:
                targets = [x + reference.ls1(reference.attn(reference.norm1(x))) for x in ours]
                _tune_heads(block, ours, targets)
                ours = [x + block.ls1(block.attn(block.norm1(x))) for x in ours]
                targets = [x + reference.ls2(reference.mlp(reference.norm2(x))) for x in ours]
                _tune_units(block, ours, targets)
                ours = [x + block.ls2(block.mlp(block.norm2(x))) for x in ours]
            if layer == 0:
                eta = (time.perf_counter() - start) * len(pruned.blocks)
                if eta > 60:
                    log.info("prune: least-squares reconstruction, %d layers: about %.0f min", len(pruned.blocks),
                             eta / 60)
        after = ((pruned.norm(ours[0]) - final) ** 2).mean().item()
    images = sum(len(x) for x in batches)
    log.info("prune: least-squares reconstruction on %d images: final-stream error %.4g -> %.4g (on %d of them)",
             images, before, after, len(batches[0]))
    return {"images": images, "stream_mse_before": before, "stream_mse_after": after, "error_images": len(batches[0]),
            "fit": "weights" if weights else "scales"}


def _refit_branch(block: Block, reference: Block, streams: list[torch.Tensor], branch: str) -> list[torch.Tensor]:
    """Refit the layer that ends ``block``'s attention (``attn.proj``) or MLP (``mlp.fc2``) branch so that the
    branch adds to each stream what ``reference``'s adds; returns the streams after it. The layer's inputs (the
    kept heads' outputs, the kept units' activations) are kept for the update, so nothing is computed twice."""
    attn = branch == "attn"
    layer = block.attn.proj if attn else block.mlp.fc2
    gamma = _gamma(block.ls1 if attn else block.ls2, layer.out_features)
    columns = _kept_head_columns(block, reference) if attn else _kept_units(block, reference)
    inputs, deltas = [], []
    for x in streams:
        if attn:
            full = _head_outputs(reference, x)  # (tokens, H * hd)
            delta = reference.ls1(reference.attn.proj(full))
            ins = full[:, columns] if columns is not None else _head_outputs(block, x)
        else:
            mlp = reference.mlp
            full = mlp.act(mlp.fc1(reference.norm2(x))).reshape(-1, mlp.fc2.in_features)  # (tokens, K)
            delta = reference.ls2(mlp.fc2(full))
            ins = full[:, columns] if columns is not None else block.mlp.act(block.mlp.fc1(block.norm2(x))).reshape(
                len(full), -1)
        inputs.append(ins)
        deltas.append(delta)
    _refit(layer, gamma, zip(inputs, deltas))
    ls = block.ls1 if attn else block.ls2
    return [x + ls(layer(z)).view(x.shape) for x, z in zip(streams, inputs)]


def _kept_head_columns(block: Block, reference: Block) -> torch.Tensor | None:
    """The columns of ``reference``'s per-head outputs that ``block``'s heads compute, when ``block``'s query, key
    and value weights (and its LayerNorm) are an untouched subset of ``reference``'s; else None."""
    a, r = block.attn, reference.attn
    if a.head_dim != r.head_dim or not _same_norm(block.norm1, reference.norm1):
        return None
    rows = _matching_rows(_head_rows(a), _head_rows(r))
    if rows is None:
        return None
    hd = a.head_dim
    return (torch.tensor(rows).view(-1, 1) * hd + torch.arange(hd).view(1, hd)).reshape(-1)


def _kept_units(block: Block, reference: Block) -> torch.Tensor | None:
    """The units of ``reference``'s MLP that ``block``'s are, untouched (weights, bias, LayerNorm), or None."""
    if not _same_norm(block.norm2, reference.norm2):
        return None
    rows = _matching_rows(_unit_rows(block.mlp.fc1), _unit_rows(reference.mlp.fc1))
    return torch.tensor(rows) if rows is not None else None


def _head_rows(attn) -> torch.Tensor:
    """One row per head: its query, key and value weights and biases, flattened."""
    H, hd = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.view(3, H, hd, -1).transpose(0, 1).reshape(H, -1)
    if attn.qkv.bias is None:
        return w
    return torch.cat([w, attn.qkv.bias.view(3, H, hd).transpose(0, 1).reshape(H, -1)], dim=1)


def _unit_rows(fc1: torch.nn.Linear) -> torch.Tensor:
    return torch.cat([fc1.weight, fc1.bias[:, None]], dim=1)


def _matching_rows(rows: torch.Tensor, among: torch.Tensor) -> list[int] | None:
    """For each row of ``rows``, the index of the identical row of ``among`` (bit for bit); None if one has none."""
    index = {bytes(r.numpy().tobytes()): i for i, r in enumerate(among.detach().contiguous())}
    found = [index.get(bytes(r.numpy().tobytes())) for r in rows.detach().contiguous()]
    return None if any(i is None for i in found) else found


def _same_norm(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


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
        o = _head_outputs(block, x).double().view(-1, H, hd)  # (tokens, H, hd)
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
    """What ``attn.proj`` takes in, every token's heads side by side: (tokens, heads * head width)."""
    attn = block.attn
    q, k, v = attn.split_heads(block.norm1(x))  # (B, H, T, hd) each
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, H, T, hd)
    return o.transpose(1, 2).reshape(-1, attn.num_heads * attn.head_dim)


def _refit(linear: torch.nn.Linear, gamma: torch.Tensor, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``linear``'s whole weight and bias, in place, so that ``gamma * linear(z)`` best matches ``y`` over every
    token of ``pairs`` (``z``: (tokens, in), ``y``: (..., out)), by least squares with a small ridge towards
    the weight it had. Each output channel is its own regression on the same inputs, so one Gram matrix of the
    inputs serves them all: ``W = (Y'Z + lam W0) (Z'Z + lam I)^-1``, centred so the bias is fitted beside it.
    Where ``mask tuning`` (``_tune_heads``, ``_tune_units``) fits one scale per kept head or unit, this fits every
    weight of the layer after the pruned ones, as layer-wise reconstruction for post-training compression does
    (the optimal update of the layer's remaining weights for its own output error): many more unknowns, still
    far fewer than the calibration tokens give equations (256 images of a ViT-S/14 at 224: 65,792 tokens per
    row, against at most 1,536 weights)."""
    K, D = linear.in_features, linear.out_features
    gamma = gamma.detach().float()
    safe = torch.where(gamma.abs() > 1e-12, gamma, torch.ones_like(gamma))  # a zero LayerScale: any weight does
    zz = torch.zeros(K, K, dtype=torch.float64)
    yz = torch.zeros(D, K, dtype=torch.float64)
    z_sum = torch.zeros(K, dtype=torch.float64)
    y_sum = torch.zeros(D, dtype=torch.float64)
    z_shift = y_shift = None
    n = 0
    for z, y in pairs:
        z, y = z.float(), y.reshape(-1, D).float() / safe  # what linear(z) itself should give
        if z_shift is None:  # products of inputs shifted by the first batch's means: float32 products stay exact
            z_shift, y_shift = z.mean(0), y.mean(0)  # enough once the Gram matrix is centred (no cancellation)
        z, y = z - z_shift, y - y_shift
        zz += (z.T @ z).double()  # float32 within a batch, float64 across batches
        yz += (y.T @ z).double()
        z_sum += z.sum(0).double()
        y_sum += y.sum(0).double()
        n += len(z)
    z_mean, y_mean = z_sum / n, y_sum / n
    zz -= n * torch.outer(z_mean, z_mean)
    yz -= n * torch.outer(y_mean, z_mean)
    lam = RIDGE * float(torch.diagonal(zz).mean()) + 1e-12
    w0 = linear.weight.double()
    weight = torch.linalg.solve(zz + lam * torch.eye(K, dtype=zz.dtype), (yz + lam * w0).T).T
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        bias = y_mean + y_shift.double() - weight @ (z_mean + z_shift.double())
        linear.bias.copy_(bias.to(linear.bias.dtype))


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``argmin |T - F m|^2 + lam |m - 1|^2`` from the normal equations, ``lam`` a small share of the mean diagonal."""
    n = len(rhs)
    lam = RIDGE * float(torch.diagonal(gram).mean()) + 1e-12
    return torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype), rhs + lam * torch.ones(n, dtype=gram.dtype))
