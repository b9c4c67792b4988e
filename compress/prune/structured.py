"""Structured pruning of attention heads and MLP hidden units: importance, selection, physical removal.

Importance, per head and per MLP unit, normalised per layer (L2 norm over the layer's scores) and ranked
globally, as Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") do:

- ``taylor``: the expected absolute gradient of the loss with respect to a mask on each head's output (on each
  unit's activation), ``E_x |dL/d xi|``. With the mask at one, ``dL/d xi_h`` for one image is the sum over
  tokens and channels of (gradient x activation) of that head's slice of the ``attn.proj`` input (of that unit's
  ``mlp.fc2`` input), so forward/backward hooks give it with no mask in the model. The loss is cross-entropy on
  the labels (``targets="labels"``), on the unpruned model's top-1 predictions (``"predictions"``, needs no
  labels), or on its soft predictions (``"soft"``). Soft targets of a model scored against itself give a zero
  gradient (the loss is at its minimum), so ``"soft"`` on the unpruned model falls back to its predictions; it
  matters in iterative pruning, where the model scored is already pruned.
- ``l2``: data-free, the L2 norm of a head's q, k and v rows of ``attn.qkv`` with its ``attn.proj`` columns
  (of a unit's ``mlp.fc1`` row with its ``mlp.fc2`` column).

Selection is one share for heads and MLP units alike (``select``, ``prune_to_target``), or, under a MAC budget or
a latency budget (``ItemCosts``; ``compress.prune.latency`` fits one on the target), Kwon et al.'s mask search
(``search_mask``): how many heads and how many units to keep is itself chosen, so the kept importance is the
largest the budget allows.

Removal slices those rows and columns out and builds a smaller model whose config stores the head count and
MLP width per layer, so the result is physically smaller, exports, and every later stage sees its true shape
(a global head count would break it, intel/neural-compressor#525). Every layer keeps at least
``min_heads`` heads and one MLP unit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.model.vit import VisionTransformer

Scope = Literal["global", "layer"]
SCOPES = ("global", "layer")

log = logging.getLogger(__name__)


class PruneError(CompressError):
    """A pruning request that cannot be carried out on this model."""


@dataclass(frozen=True)
class Importance:
    heads: list[np.ndarray]  # per layer, (heads,)
    units: list[np.ndarray]  # per layer, (mlp units,)
    method: str
    images: int = 0  # how many images the scores are summed over
    # with taylor_importance(..., gram=True): per layer, the sums over images of the outer products of the mask
    # gradients, (heads, heads) and (units, units): the Fisher information of each layer's masks, whose diagonal
    # is ``heads`` / ``units``. rearrange_mask reads them.
    head_gram: list[np.ndarray] | None = None
    unit_gram: list[np.ndarray] | None = None

    def normalised(self) -> Importance:
        """Each layer's scores divided by their L2 norm, so layers of different scale rank together."""
        norm = lambda s: s / max(float(np.linalg.norm(s)), 1e-12)  # noqa: E731
        return Importance([norm(s) for s in self.heads], [norm(s) for s in self.units], self.method, self.images)


def check_layout(model: VisionTransformer) -> None:
    """The attention and MLP shapes pruning relies on; a mismatch is a clear error, not a silent mis-slice."""
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        rows = 3 * attn.num_heads * attn.head_dim
        if attn.qkv.out_features != rows or attn.proj.in_features != attn.num_heads * attn.head_dim:
            raise PruneError(
                f"blocks.{i}.attn does not have the fused layout pruning expects: qkv has {attn.qkv.out_features} "
                f"outputs and proj {attn.proj.in_features} inputs for {attn.num_heads} heads of width "
                f"{attn.head_dim} (expected {rows} and {attn.num_heads * attn.head_dim}); check model.num_heads "
                "and model.head_dim"
            )
        if mlp.fc1.out_features != mlp.fc2.in_features:
            raise PruneError(f"blocks.{i}.mlp: fc1 has {mlp.fc1.out_features} outputs but fc2 "
                             f"{mlp.fc2.in_features} inputs; the MLP cannot be pruned as a unit")


# ------------------------------------------------------------------------------------------- importance
def l2_importance(model: VisionTransformer) -> Importance:
    check_layout(model)
    heads, units = [], []
    with torch.no_grad():
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            H, hd = attn.num_heads, attn.head_dim
            qkv = attn.qkv.weight.reshape(3, H, hd, -1)  # (3, H, hd, D)
            proj = attn.proj.weight.reshape(-1, H, hd)  # (D, H, hd)
            heads.append((qkv.pow(2).sum((0, 2, 3)) + proj.pow(2).sum((0, 2))).sqrt().numpy())
            units.append((mlp.fc1.weight.pow(2).sum(1) + mlp.fc2.weight.pow(2).sum(0)).sqrt().numpy())
    return Importance(heads, units, "l2")


def taylor_importance(
    model: VisionTransformer, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, targets: str = "labels",
    teacher: VisionTransformer | None = None, fisher: bool = False, gram: bool = False, total: int | None = None,
) -> Importance:
    """Michel et al.'s head importance (and the same for MLP units) accumulated over ``batches``; with ``fisher``,
    the squares of the per-image gradients instead of their magnitudes: the diagonal of the Fisher information of
    the masks, Kwon et al.'s (NeurIPS 2022) score for post-training pruning. With ``gram`` (and ``fisher``), each
    layer's whole Fisher block too, for ``rearrange_mask``. With ``total`` (the images in ``batches``), the
    estimated time is logged after the first batch when the pass will take over a minute."""
    check_layout(model)
    if targets not in ("labels", "predictions", "soft"):
        raise PruneError(f"unknown importance targets {targets!r}; use 'labels', 'predictions' or 'soft'")
    if gram and not fisher:
        raise PruneError("the Fisher blocks between masks are products of per-image gradients; ask for fisher=True")
    teacher = teacher if teacher is not None else model
    if targets == "soft" and teacher is model:
        log.info("Taylor importance: soft targets of the model itself have zero gradient; using its predictions")
        targets = "predictions"
    heads = [torch.zeros(b.attn.num_heads, dtype=torch.float64) for b in model.blocks]
    units = [torch.zeros(b.mlp.fc1.out_features, dtype=torch.float64) for b in model.blocks]
    head_gram = [torch.zeros(len(h), len(h), dtype=torch.float64) for h in heads] if gram else None
    unit_gram = [torch.zeros(len(u), len(u), dtype=torch.float64) for u in units] if gram else None
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def capture(kind: str, layer: int):
        def hook(_module, inputs):
            x = inputs[0]
            if x.requires_grad:
                x.retain_grad()
            captured[(kind, layer)] = x
        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.proj.register_forward_pre_hook(capture("head", i)))
        handles.append(block.mlp.fc2.register_forward_pre_hook(capture("unit", i)))
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        start, done = time.perf_counter(), 0
        for x, y in batches:
            x = torch.from_numpy(x)
            if targets != "labels":
                with torch.no_grad():
                    soft = F.softmax(teacher(x), dim=-1)  # before the hooked pass (the teacher may be the model)
            x.requires_grad_(True)  # so hooked activations carry gradients while the weights are frozen
            captured.clear()
            logits = model(x)
            if targets == "labels":
                loss = F.cross_entropy(logits, torch.from_numpy(y), reduction="sum")
            elif targets == "predictions":
                loss = F.cross_entropy(logits, soft.argmax(-1), reduction="sum")
            else:
                loss = F.cross_entropy(logits, soft, reduction="sum")  # soft-label cross-entropy
            loss.backward()
            with torch.no_grad():
                for i, block in enumerate(model.blocks):
                    act = captured[("head", i)]  # (B, N, H*hd)
                    per_image = (act.grad * act).reshape(act.shape[0], act.shape[1], block.attn.num_heads, -1)
                    g_heads = per_image.sum((1, 3))  # (B, H): dL/dxi_h per image
                    hidden = captured[("unit", i)]  # (B, N, M)
                    g_units = (hidden.grad * hidden).sum(1)  # (B, M)
                    heads[i] += (g_heads.square() if fisher else g_heads.abs()).sum(0).double()
                    units[i] += (g_units.square() if fisher else g_units.abs()).sum(0).double()
                    if gram:
                        g_heads, g_units = g_heads.double(), g_units.double()
                        head_gram[i] += g_heads.T @ g_heads
                        unit_gram[i] += g_units.T @ g_units
            captured.clear()
            if total and not done:
                eta = (time.perf_counter() - start) * total / len(x)
                if eta > 60:
                    log.info("importance: a forward and backward pass over %d images, about %.0f min", total, eta / 60)
            done += len(x)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        model.train(was_training)
    return Importance([h.numpy() for h in heads], [u.numpy() for u in units],
                      f"{'fisher' if fisher else 'taylor'}-{targets}", done,
                      [g.numpy() for g in head_gram] if gram else None,
                      [g.numpy() for g in unit_gram] if gram else None)


# -------------------------------------------------------------------------------------------- selection
def select(scores: list[np.ndarray], ratio: float, *, minimum: int, what: str, round_to: int = 1,
           scope: Scope = "global") -> list[list[int]]:
    """Indices to keep per layer after removing ``ratio`` of all items, lowest normalised score first.

    ``scope="global"`` ranks every layer's items together, so layers lose different shares; ``"layer"`` removes
    the same share from each layer (its own lowest first), which keeps every layer the same width: one GEMM
    shape per layer type, and on CPU the latency of an evenly pruned model follows its MACs more closely.
    ``round_to`` rounds each layer's kept count up to a multiple of it (never above the original): GEMM
    kernels are faster on aligned widths, so an MLP of 1,152 units can beat one of 1,100.
    """
    if not 0 <= ratio < 1:
        raise PruneError(f"the {what} pruning ratio must be in [0, 1), got {ratio}")
    total = sum(len(s) for s in scores)
    remove = int(round(ratio * total))
    removable = sum(max(0, len(s) - minimum) for s in scores)
    if remove > removable:
        raise PruneError(
            f"removing {ratio:.0%} of {total} {what} would leave a layer with fewer than {minimum}; at most "
            f"{removable / total:.0%} can go with {minimum} kept per layer"
        )
    if scope not in SCOPES:
        raise PruneError(f"unknown pruning scope {scope!r}; choose from {list(SCOPES)}")
    kept = [set(range(len(s))) for s in scores]
    if scope == "layer":
        for layer, layer_scores in enumerate(scores):
            n = len(layer_scores)
            drop = min(round(ratio * n), n - minimum)
            for idx in sorted(range(n), key=lambda i: (float(layer_scores[i]), i))[:drop]:
                kept[layer].discard(idx)
    else:
        order = sorted(((float(s), layer, idx) for layer, layer_scores in enumerate(scores)
                        for idx, s in enumerate(layer_scores)), key=lambda t: (t[0], t[1], t[2]))
        removed = 0
        for _, layer, idx in order:
            if removed == remove:
                break
            if len(kept[layer]) > minimum:
                kept[layer].discard(idx)
                removed += 1
    _round_up(kept, scores, round_to)
    return [sorted(k) for k in kept]


def _round_up(kept: list[set[int]], scores: list[np.ndarray], round_to: int) -> None:
    """Grow each layer's kept set (in place) to a multiple of ``round_to`` (never above the layer's size), adding
    back the best-scoring removed items first."""
    if round_to <= 1:
        return
    for layer, layer_scores in enumerate(scores):
        want = min(len(layer_scores), -(-len(kept[layer]) // round_to) * round_to)
        ranked = sorted(range(len(layer_scores)), key=lambda i: -float(layer_scores[i]))
        for idx in ranked:
            if len(kept[layer]) >= want:
                break
            kept[layer].add(idx)


# ------------------------------------------------------------------------------------------- mask search
def item_macs(model: VisionTransformer) -> tuple[list[int], list[int]]:
    """MACs one attention head and one MLP unit cost in each layer, for one image.

    A head of width ``hd`` costs its q, k and v rows and its ``proj`` columns for each of the ``n`` tokens entering
    the block (``4 * D * hd * n``) and its two attention products (``2 * n * n * hd``); a unit its ``fc1`` row and
    ``fc2`` column for each of the ``m`` tokens reaching the MLP (``2 * D * m``; ``m < n`` where a token plan
    reduces between attention and MLP).
    """
    from compress.tokens.plan import token_counts

    cfg = model.config
    plan = getattr(model, "token_reduction", None)
    start = cfg.num_prefix_tokens + cfg.num_patches
    after = token_counts(plan, cfg) if plan is not None else [start] * cfg.depth
    before = after if plan is not None and plan.method == "resolution" else [start] + after[:-1]
    heads, units = [], []
    for block, n, m in zip(model.blocks, before, after):
        d, hd = block.attn.qkv.in_features, block.attn.head_dim
        heads.append(4 * d * hd * n + 2 * n * n * hd)
        units.append(2 * d * m)
    return heads, units


@dataclass(frozen=True)
class ItemCosts:
    """What one head and one MLP unit of each layer cost, and the whole model, on one scale: MACs (``mac_costs``),
    or milliseconds on a target (``compress.prune.latency.fit_latency_model``)."""

    head: list[float]
    unit: list[float]
    full: float
    what: str  # "MAC" or "latency": how a target on this scale is named in messages
    notes: dict = dataclasses.field(default_factory=dict)  # how the costs were found (a latency fit's points)

    def of(self, model: VisionTransformer, heads: list[int], units: list[int]) -> float:
        """The cost of ``model`` (the one the costs are for) kept to ``heads[i]`` heads and ``units[i]`` units in
        layer ``i``: what pruning leaves untouched, plus what is kept."""
        fixed = self.full - sum(b.attn.num_heads * c for b, c in zip(model.blocks, self.head)) - sum(
            b.mlp.fc1.out_features * c for b, c in zip(model.blocks, self.unit))
        return fixed + sum(h * c for h, c in zip(heads, self.head)) + sum(u * c for u, c in zip(units, self.unit))


def mac_costs(model: VisionTransformer) -> ItemCosts:
    """Each item's MACs (``item_macs``) and the model's, as ``count_macs`` counts them."""
    heads, units = item_macs(model)
    return ItemCosts([float(c) for c in heads], [float(c) for c in units], float(_macs(model)), "MAC")


@dataclass(frozen=True)
class SearchResult:
    heads_keep: list[list[int]]
    units_keep: list[list[int]]
    macs_fraction: float  # of the unpruned model's, as ``count_macs`` counts them
    kept_importance: float  # share of the total importance (heads and units) kept
    cost_fraction: float  # of the unpruned model's cost, on the scale searched under (MACs, or the latency model's)


def search_mask(model: VisionTransformer, importance: Importance, target: float, *, min_heads: int = 1,
                mlp_round_to: int = 1, costs: ItemCosts | None = None) -> SearchResult:
    """Kwon et al.'s (NeurIPS 2022) mask search: the heads and MLP units to keep within ``target`` (a fraction of
    the model's cost: its MACs, or with ``costs`` what those say, e.g. milliseconds from
    ``compress.prune.latency.fit_latency_model``) that keep the most importance, all layers ranked together.

    Scores are used raw: each is the loss change of removing a mask on the head's (unit's) output, so heads and
    units, and every layer, are on one scale (Fisher or Taylor importance; L2 norms are not). For each number of
    heads kept (the best ones), the budget left goes to the best units; the split keeping the most importance wins.
    Every layer keeps its ``min_heads`` best heads and its best unit. With ``mlp_round_to``, each layer's unit count
    is rounded up to a multiple of it, and the budget is tightened until the rounded mask fits it again.
    Kwon et al. then rearrange the mask within each layer using the Fisher between its masks (``rearrange_mask``),
    and tune it (``compress.prune.reconstruct``).
    """
    check_layout(model)
    if importance.method.startswith("l2"):
        raise PruneError("the mask search weighs heads against MLP units by their effect on the loss, which L2 norms "
                         "do not measure; use prune.importance='fisher' (or 'taylor')")
    costs = costs or mac_costs(model)
    what = costs.what
    if not 0 < target < 1:
        raise PruneError(f"the {what} target must be a fraction in (0, 1), got {target}")
    head_cost, unit_cost, full = costs.head, costs.unit, costs.full
    depth = len(model.blocks)
    counts = [b.attn.num_heads for b in model.blocks], [b.mlp.fc1.out_features for b in model.blocks]
    if len(head_cost) != depth or len(unit_cost) != depth:
        raise PruneError(f"the item costs cover {len(head_cost)} layers but the model has {depth}; find the costs "
                         "of the model being pruned")
    fixed = costs.of(model, [0] * depth, [0] * depth)  # embedding, norms, head: untouched by pruning
    # the floor every layer keeps: its best min_heads heads and its best unit
    forced_heads = [set(np.argsort(-importance.heads[i], kind="stable")[:min(min_heads, counts[0][i])].tolist())
                    for i in range(depth)]
    forced_units = [{int(np.argmax(importance.units[i]))} for i in range(depth)]
    floor = fixed + sum(len(f) * head_cost[i] for i, f in enumerate(forced_heads)) + sum(unit_cost)
    if floor > target * full:
        raise PruneError(f"the {what} target {target:g} is below what pruning can reach: with {min_heads} head(s) "
                         f"and one MLP unit per layer the model keeps {floor / full:.3f} of its {_scale(what)}; raise "
                         "the target, or add token reduction")
    free_heads = sorted(((float(importance.heads[i][j]), i, j) for i in range(depth) for j in range(counts[0][i])
                         if j not in forced_heads[i]), key=lambda t: (-t[0], t[1], t[2]))
    free_units = sorted(((float(importance.units[i][j]), i, j) for i in range(depth) for j in range(counts[1][i])
                         if j not in forced_units[i]), key=lambda t: (-t[0], t[1], t[2]))
    unit_costs = np.cumsum([unit_cost[i] for _, i, _ in free_units])
    unit_values = np.cumsum([v for v, _, _ in free_units])
    head_costs = np.concatenate([[0], np.cumsum([head_cost[i] for _, i, _ in free_heads])])
    head_values = np.concatenate([[0.0], np.cumsum([v for v, _, _ in free_heads])])
    total = sum(float(s.sum()) for s in importance.heads) + sum(float(s.sum()) for s in importance.units)
    forced_value = sum(float(importance.heads[i][j]) for i, f in enumerate(forced_heads) for j in f) + sum(
        float(importance.units[i][j]) for i, f in enumerate(forced_units) for j in f)
    budget = target * full
    for _ in range(20):  # tighten the budget until the rounded mask fits it
        best = None
        for h in range(len(free_heads) + 1):
            left = budget - floor - head_costs[h]
            if left < 0:
                break
            n = int(np.searchsorted(unit_costs, left, side="right"))  # the best units whose MACs fit
            value = head_values[h] + (unit_values[n - 1] if n else 0.0)
            if best is None or value > best[0]:
                best = (value, h, n)
        if best is None:  # the rounding's overshoot took the budget below the floor
            raise PruneError(f"no mask with MLP widths rounded to {mlp_round_to} fits {target:g} of the "
                             f"{_scale(what)}; lower prune.mlp_round_to or raise the target")
        _, h, n = best
        heads_keep = [set(f) for f in forced_heads]
        units_keep = [set(f) for f in forced_units]
        for _, i, j in free_heads[:h]:
            heads_keep[i].add(j)
        for _, i, j in free_units[:n]:
            units_keep[i].add(j)
        _round_up(units_keep, importance.units, mlp_round_to)
        cost = costs.of(model, [len(k) for k in heads_keep], [len(k) for k in units_keep])
        if cost <= target * full * (1 + 1e-9):
            break
        budget -= cost - target * full  # the rounding's overshoot, taken off the budget
    else:
        raise PruneError(f"no mask with MLP widths rounded to {mlp_round_to} fits {target:g} of the {_scale(what)}; "
                         "lower prune.mlp_round_to or raise the target")
    kept = sum(float(importance.heads[i][list(k)].sum()) for i, k in enumerate(heads_keep)) + sum(
        float(importance.units[i][list(k)].sum()) for i, k in enumerate(units_keep))
    kept_counts = [len(k) for k in heads_keep], [len(k) for k in units_keep]
    macs = costs if what == "MAC" else mac_costs(model)
    macs_fraction = macs.of(model, *kept_counts) / macs.full
    log.info("mask search: %d of %d heads and %d of %d MLP units kept, %.3f of the %s (%.3f of the MACs), %.1f%% of "
             "the importance (forced floor %.1f%%)", sum(map(len, heads_keep)), sum(counts[0]),
             sum(map(len, units_keep)), sum(counts[1]), cost / full, _scale(what), macs_fraction,
             100 * kept / max(total, 1e-30), 100 * forced_value / max(total, 1e-30))
    return SearchResult([sorted(k) for k in heads_keep], [sorted(k) for k in units_keep], macs_fraction,
                        kept / max(total, 1e-30), cost / full)


@dataclass(frozen=True)
class Rearranged:
    heads_keep: list[list[int]]
    units_keep: list[list[int]]
    loss_before: float  # the Fisher estimate of the loss the removed masks add, per image, before rearranging
    loss_after: float  # and after
    swaps: int  # heads and units exchanged for others of their layer


def rearrange_mask(importance: Importance, heads_keep: list[list[int]], units_keep: list[list[int]], *,
                   max_passes: int = 10) -> Rearranged:
    """Kwon et al.'s (NeurIPS 2022) mask rearrangement: within each layer, the same number of heads (of MLP units)
    kept, but exchanged so that those removed cost the least together.

    The mask search ranks items one by one, by the diagonal of the Fisher information, as if removing two heads
    cost the sum of removing each. Removing a set ``S`` of a layer's masks adds about ``1/2 g_S' g_S`` to the loss
    per image, summed over images, where ``g_S`` is the sum of their gradients: ``1/2 1_S' F 1_S`` with ``F`` the
    layer's Fisher block (``Importance.head_gram`` / ``unit_gram``). Two units whose gradients cancel cost less
    together than alone; two that agree cost more. Starting from the given mask, each kept item in turn (least
    important first) joins the removed set, and the member whose leaving lowers ``1_S' F 1_S`` most leaves it; Kwon
    et al. make one such pass, this repeats them (``max_passes``) until one exchanges nothing. The estimate never
    rises: leaving the newcomer out again is always a choice. Layers are treated apart (Kwon et al.'s
    block-diagonal approximation), and each layer's counts are unchanged, so its MACs are too.
    """
    if importance.head_gram is None or importance.unit_gram is None:
        raise PruneError("mask rearrangement needs each layer's Fisher block between masks; compute the importance "
                         "with taylor_importance(..., fisher=True, gram=True)")
    if len(heads_keep) != len(importance.head_gram) or len(units_keep) != len(importance.unit_gram):
        raise PruneError(f"the mask has {len(heads_keep)} layers but the importance {len(importance.head_gram)}; "
                         "score the model being pruned")
    images = max(importance.images, 1)
    before = after = 0.0
    swaps = 0
    new_heads, new_units = [], []
    for grams, keeps, out in ((importance.head_gram, heads_keep, new_heads),
                              (importance.unit_gram, units_keep, new_units)):
        for gram, keep in zip(grams, keeps):
            kept, cost_before, cost_after, exchanged = _rearrange_layer(np.asarray(gram, dtype=np.float64), keep,
                                                                        max_passes)
            out.append(kept)
            before += cost_before / (2 * images)
            after += cost_after / (2 * images)
            swaps += exchanged
    log.info("mask rearrangement: %d heads and units exchanged within their layers; the Fisher estimate of the loss "
             "the removed ones add fell from %.4g to %.4g per image", swaps, before, after)
    return Rearranged(new_heads, new_units, before, after, swaps)


def prune_searched(model: VisionTransformer, importance: Importance, target: float, *, min_heads: int = 1,
                   mlp_round_to: int = 1, rearrange: bool = False,
                   costs: ItemCosts | None = None) -> tuple[VisionTransformer, dict]:
    """``search_mask`` within ``target`` (of the MACs, or of ``costs``), then (with ``rearrange``)
    ``rearrange_mask``, then ``remove``: the pruned model, and what the search found (for a stage's notes)."""
    found = search_mask(model, importance, target, min_heads=min_heads, mlp_round_to=mlp_round_to, costs=costs)
    heads_keep, units_keep = found.heads_keep, found.units_keep
    notes = {"macs_fraction": round(found.macs_fraction, 4), "kept_importance": round(found.kept_importance, 4)}
    if costs is not None and costs.what != "MAC":
        notes[f"{costs.what}_fraction"] = round(found.cost_fraction, 4)
    if rearrange:
        moved = rearrange_mask(importance, heads_keep, units_keep)
        heads_keep, units_keep = moved.heads_keep, moved.units_keep
        notes["rearrange"] = {"swaps": moved.swaps, "fisher_loss_before": round(moved.loss_before, 6),
                              "fisher_loss_after": round(moved.loss_after, 6)}
    return remove(model, heads_keep, units_keep), notes


def _rearrange_layer(gram: np.ndarray, keep: list[int], max_passes: int) -> tuple[list[int], float, float, int]:
    """One layer of ``rearrange_mask``: the kept indices, ``1_S' F 1_S`` of the removed set before and after, and
    the exchanges made. ``reach[j]`` is ``sum_{i in S} F[j, i]``; removing ``j`` from ``S`` lowers the cost by
    ``2 reach[j] - F[j, j]``."""
    n = len(gram)
    if gram.shape != (n, n) or any(not 0 <= k < n for k in keep) or len(set(keep)) != len(keep):
        raise PruneError(f"a layer's mask keeps {sorted(keep)[:5]}... of a Fisher block of shape {gram.shape}; "
                         "score the model being pruned")
    removed = np.ones(n, dtype=bool)
    removed[list(keep)] = False
    cost = lambda: float(gram[np.ix_(removed, removed)].sum())  # noqa: E731
    before = cost()
    if removed.all() or not removed.any():
        return sorted(keep), before, before, 0
    diag = np.diag(gram)
    exchanged = 0
    for _ in range(max_passes):
        reach = gram[:, removed].sum(1)  # recomputed each pass, so rounding does not build up
        moved = 0
        for k in sorted(np.flatnonzero(~removed).tolist(), key=lambda i: (diag[i], i)):  # each still kept here
            reach += gram[:, k]
            removed[k] = True
            relief = np.where(removed, 2 * reach - diag, -np.inf)
            j = int(relief.argmax())
            if relief[j] <= relief[k] + 1e-12 * abs(relief[k]):  # no better than letting k go back: keep k
                j = k
            removed[j] = False
            reach -= gram[:, j]
            moved += j != k
        exchanged += moved
        if not moved:
            break
    return np.flatnonzero(~removed).tolist(), before, cost(), exchanged


def _scale(what: str) -> str:
    return "MACs" if what == "MAC" else what


def _macs(model: VisionTransformer) -> int:
    from compress.model.macs import count_macs

    cfg = model.config
    return count_macs(model, (1, cfg.in_chans, cfg.image_size, cfg.image_size))


# ---------------------------------------------------------------------------------------------- removal
@torch.no_grad()
def remove(model: VisionTransformer, heads_keep: list[list[int]], units_keep: list[list[int]]) -> VisionTransformer:
    """A new, smaller model with only the kept heads and MLP units; ``model`` is left as it was."""
    check_layout(model)
    cfg = model.config
    if any(not k for k in heads_keep) or any(not k for k in units_keep):
        raise PruneError("every layer must keep at least one head and one MLP unit")
    new_cfg = dataclasses.replace(cfg, num_heads=tuple(len(k) for k in heads_keep),
                                  mlp_dim=tuple(len(k) for k in units_keep), head_dim=cfg.head_dim)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        H, hd = block.attn.num_heads, block.attn.head_dim
        heads = torch.tensor(heads_keep[i])
        rows = (torch.arange(3).view(3, 1, 1) * H * hd + heads.view(1, -1, 1) * hd
                + torch.arange(hd).view(1, 1, hd)).reshape(-1)  # q, k and v rows of the kept heads
        cols = (heads.view(-1, 1) * hd + torch.arange(hd).view(1, hd)).reshape(-1)
        p = f"blocks.{i}."
        state[p + "attn.qkv.weight"] = state[p + "attn.qkv.weight"][rows]
        if p + "attn.qkv.bias" in state:
            state[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][rows]
        state[p + "attn.proj.weight"] = state[p + "attn.proj.weight"][:, cols]
        units = torch.tensor(units_keep[i])
        state[p + "mlp.fc1.weight"] = state[p + "mlp.fc1.weight"][units]
        state[p + "mlp.fc1.bias"] = state[p + "mlp.fc1.bias"][units]
        state[p + "mlp.fc2.weight"] = state[p + "mlp.fc2.weight"][:, units]
    pruned = VisionTransformer(new_cfg)
    pruned.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return pruned.eval()


def prune_by_ratio(model: VisionTransformer, importance: Importance, *, heads: float, mlp: float,
                   min_heads: int = 1, mlp_round_to: int = 1, scope: Scope = "global") -> VisionTransformer:
    scores = importance.normalised()
    return remove(model, select(scores.heads, heads, minimum=min_heads, what="heads", scope=scope),
                  select(scores.units, mlp, minimum=1, what="MLP units", round_to=mlp_round_to, scope=scope))


@dataclass(frozen=True)
class TargetResult:
    model: VisionTransformer
    ratio: float  # applied to heads and MLP units alike
    value: float  # the measured quantity at that ratio
    trail: tuple[tuple[float, float], ...]  # (ratio, value) tried


def prune_to_target(
    model: VisionTransformer, importance: Importance, measure: Callable[[VisionTransformer], float], target: float,
    *, what: str, unit: str, min_heads: int = 1, mlp_round_to: int = 1, scope: Scope = "global", step: float = 0.05,
    max_ratio: float = 0.9,
    log_fn: Callable[[str], None] = log.info,
) -> TargetResult:
    """Raise one ratio for heads and MLP units together, in ``step``s, until ``measure(model) <= target``."""
    trail = []
    ratio = 0.0
    best = None
    while ratio <= max_ratio + 1e-9:
        try:
            candidate = prune_by_ratio(model, importance, heads=ratio, mlp=ratio, min_heads=min_heads,
                                       mlp_round_to=mlp_round_to, scope=scope)
        except PruneError:
            break  # no more heads can go with min_heads per layer
        value = measure(candidate)
        trail.append((round(ratio, 4), value))
        log_fn(f"prune to target: ratio {ratio:.2f} -> {value:.4g} {unit} (target {target:g})")
        best = TargetResult(candidate, ratio, value, tuple(trail))
        if value <= target:
            return best
        ratio = round(ratio + step, 4)
    closest = f"{best.value:.4g} {unit} at ratio {best.ratio:.2f}" if best else "nothing measurable"
    raise PruneError(f"the {what} target {target:g} {unit} cannot be met by pruning heads and MLP units: the closest "
                     f"was {closest}; relax the target or add token reduction or quantization")


def structure(model: VisionTransformer) -> dict[str, list[int]]:
    return {"heads": [b.attn.num_heads for b in model.blocks], "mlp": [b.mlp.fc1.out_features for b in model.blocks]}
