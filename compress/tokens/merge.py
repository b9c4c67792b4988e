"""The tensor math of token reduction, apart from any model: ToMe's bipartite merge, PiToMe's energy-guided merge
and EViT's token pruning.

Pure functions on token tensors (B, T, D), in the spirit of ToMe's ``merge.py`` (facebookresearch/ToMe); how a
ViT calls them is ``compress.tokens.patch``. Written to export: no scatter (ToMe's reference
``scatter_reduce(mean)`` exports to a ``ScatterElements`` that drops the reduction), only ``TopK``,
``GatherElements``, ``Equal`` and ``MatMul``, with shapes that depend on the plan alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# per position, in cosine similarity: far above the rounding differences between runtimes (~1e-7 in float32), far
# below what separates tokens that are not alike (ToMe's choices are otherwise unchanged)
TIE_BREAK = 1e-6


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, n) of ``t`` (B, T, C) -> (B, n, C), as one GatherElements."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: merge ``r`` patch tokens of ``x`` (B, T, D) into their best partners.

    ``metric`` (B, T, C) is what similarity is measured on (the keys, averaged over heads). Returns the tokens
    (B, T-r, D) and their sizes (B, T-r, 1): prefix tokens, then the unmerged A tokens in their original order,
    then the B tokens, each B token the size-weighted average of itself and the A tokens merged into it.
    """
    B, T, _ = x.shape
    size = x.new_ones(B, T, 1) if size is None else size
    head_x, head_size = x[:, :prefix], size[:, :prefix]  # prefix tokens pass through
    x, size, metric = x[:, prefix:], size[:, prefix:], metric[:, prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C): alternate tokens
    num_a, num_b = a.shape[1], b.shape[1]
    # Identical tokens (flat background) have identical similarities, and runtimes break such ties differently
    # (TopK and ArgMax among equal values), so an exported model would merge other pairs than PyTorch. A tiny
    # penalty by position breaks every tie the same way everywhere: the earlier token wins.
    # The penalties ride inside the similarity MatMul as one more feature (a's is 1, b's is minus the penalty), and
    # the A side's as a second column summed with the best similarity: with both as plain broadcast subtractions
    # OpenVINO 2026.4 computed wrong logits (off by 0.007 to 2.7), and with only the A side's so, still 0.007.
    ones_a = a.new_ones(B, num_a, 1)
    tie_b = (-TIE_BREAK * torch.arange(num_b, device=x.device, dtype=x.dtype)).view(1, num_b, 1).expand(B, -1, -1)
    scores = torch.cat([a, ones_a], dim=-1) @ torch.cat([b, tie_b], dim=-1).transpose(1, 2)  # (B, Na, Nb)
    best, partner = scores.max(dim=-1)  # (B, Na): best similarity (less its partner's penalty), and which B token
    tie_a = (-TIE_BREAK * torch.arange(num_a, device=x.device, dtype=x.dtype)).view(1, num_a, 1).expand(B, -1, -1)
    src = (torch.cat([best.unsqueeze(-1), tie_a], dim=-1).sum(dim=-1)).topk(r, dim=-1).indices  # (B, r): they merge
    # The A tokens that stay, in their original order: sort positions with the merged ones pushed past the end
    # (TopK on floats; sorting an integer tensor is not something every runtime's TopK accepts).
    position = torch.arange(num_a, device=x.device, dtype=x.dtype)  # (Na,)
    merged = (src.unsqueeze(-1) == torch.arange(num_a, device=x.device)).to(x.dtype).amax(dim=1)  # (B, Na)
    stay = (position + merged * num_a).topk(num_a - r, dim=-1, largest=False).indices  # (B, Na-r), ascending
    # into[b, j, i] = 1 when merging source i goes into B token j: the merge is a matrix product, not a scatter.
    dst = partner.gather(1, src)  # (B, r)
    into = (dst.unsqueeze(1) == torch.arange(num_b, device=x.device).view(1, num_b, 1)).to(x.dtype)  # (B, Nb, r)
    xa, sa = x[:, ::2], size[:, ::2]
    xb, sb = x[:, 1::2], size[:, 1::2]
    src_size = _take(sa, src)  # (B, r, 1)
    new_sb = sb + into @ src_size  # (B, Nb, 1)
    new_xb = (xb * sb + into @ (_take(xa, src) * src_size)) / new_sb  # (B, Nb, D): weighted sum, then divide
    x = torch.cat([head_x, _take(xa, stay), new_xb], dim=1)
    size = torch.cat([head_size, _take(sa, stay), new_sb], dim=1)
    return x, size


def pitome_margin(layer: int, depth: int) -> float:
    """PiToMe's similarity margin for ``layer``: 0.9 in the first layer falling linearly towards 0.1, so deeper
    layers, whose tokens are alike, count fewer neighbours as close (hchautran/PiToMe, ``patch/deit.py``)."""
    return 0.9 - 0.8 * layer / depth


def pitome_merge(
    x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int, prefix: int, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024):
    merge ``r`` patch tokens of ``x`` (B, T, D), chosen by energy rather than by position.

    A token's energy is the mean over all patch tokens of ``elu(cos - margin)`` on ``metric`` (B, T, C): high
    where it has many close neighbours (background, repeated texture), low where it is unlike the rest. The
    ``2r`` highest-energy tokens are the candidates, split alternately (in energy order) into A and B; each A
    token is merged into its most similar B token, as in ToMe. The other tokens are protected: informative,
    isolated tokens are never merged, which ToMe's split by position cannot promise. Returns the tokens
    (B, T-r, D) and their sizes (B, T-r, 1): prefix tokens, the protected tokens (highest energy first), then
    the B tokens, each the size-weighted average of itself and what merged into it.
    """
    B, T, _ = x.shape
    size = x.new_ones(B, T, 1) if size is None else size
    head_x, head_size = x[:, :prefix], size[:, :prefix]
    x, size, metric = x[:, prefix:], size[:, prefix:], metric[:, prefix:]
    n = x.shape[1]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    # The mean over neighbours is a product with a column of ones: as ReduceMean after the Elu, OpenVINO 2026.4 (CPU,
    # FP32) computed energies off by up to 6e-5, enough to reorder tokens and move logits by 0.01. Flatten, not
    # squeeze: the TorchScript exporter turns squeeze(-1) into an If where it cannot prove the axis is 1, and
    # nncf.quantize fails on an If ("Could not find a node ... in NNCFGraph").
    energy = (F.elu(metric @ metric.transpose(1, 2) - margin) @ metric.new_full((n, 1), 1.0 / n)).flatten(1)  # (B, N)
    # equal energies (identical tokens) are ordered by position, the earlier first, the same in every runtime; so are
    # energies closer than TIE_BREAK per position apart (on the reference ViT-S, top-1 moved 0.2 pt without it)
    position = torch.arange(n, device=x.device, dtype=x.dtype)
    order = (energy - TIE_BREAK * position).topk(n, dim=-1).indices  # (B, N): highest energy first
    a_idx, b_idx, kept = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2], order[:, 2 * r :]  # (B, r) x2, (B, N-2r)
    a, b = _take(metric, a_idx), _take(metric, b_idx)  # (B, r, C)
    # each A token's most similar B token; ties go to the earlier B token in every runtime (see merge_tokens)
    tie_b = (-TIE_BREAK * torch.arange(r, device=x.device, dtype=x.dtype)).view(1, r, 1).expand(B, -1, -1)
    scores = torch.cat([a, a.new_ones(B, r, 1)], dim=-1) @ torch.cat([b, tie_b], dim=-1).transpose(1, 2)  # (B, r, r)
    partner = scores.max(dim=-1).indices  # (B, r)
    into = (partner.unsqueeze(1) == torch.arange(r, device=x.device).view(1, r, 1)).to(x.dtype)  # (B, r_B, r_A)
    xa, sa = _take(x, a_idx), _take(size, a_idx)
    xb, sb = _take(x, b_idx), _take(size, b_idx)
    new_sb = sb + into @ sa  # (B, r, 1)
    new_xb = (xb * sb + into @ (xa * sa)) / new_sb  # (B, r, D)
    x = torch.cat([head_x, _take(x, kept), new_xb], dim=1)
    size = torch.cat([head_size, _take(size, kept), new_sb], dim=1)
    return x, size


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """The class token's attention over all tokens, averaged over heads: (B, H, T, hd) x2 -> (B, T)."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, T)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, T)


def prune_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep: float, prefix: int) -> torch.Tensor:
    """EViT: keep the ``ceil(keep * patches)`` most attended patch tokens of ``x`` (B, T, D), fuse the rest.

    The fused token is the inattentive tokens' sum weighted by their class attention (EViT, eq. 4) and goes last.
    """
    patches = x.shape[1] - prefix
    kept = math.ceil(keep * patches)
    if kept >= patches:
        return x
    attn = cls_attn[:, prefix:]  # (B, N)
    order = attn.topk(patches, dim=-1).indices  # (B, N): most attended first
    top, rest = order[:, :kept], order[:, kept:]
    tokens = x[:, prefix:]
    fused = (_take(tokens, rest) * attn.gather(1, rest).unsqueeze(-1)).sum(dim=1, keepdim=True)  # (B, 1, D)
    return torch.cat([x[:, :prefix], _take(tokens, top), fused], dim=1)  # (B, P+kept+1, D)
