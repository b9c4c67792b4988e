"""Token reduction: ToMe and PiToMe token merging, EViT attentive token pruning and a lower working resolution,
written so that they export to ONNX.

Each shortens the token sequence inside the encoder, so the blocks after it (attention is quadratic in the token
count, the MLP linear) do less work:

- **ToMe** (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023). Between attention and MLP, the
  patch tokens are split alternately into sets A and B; each A token is matched to its most similar B token
  (cosine similarity of the attention keys, averaged over heads), and the ``r`` best-matched A tokens are merged
  into their partners. A merged token is the size-weighted average of what it absorbed, and attention is
  *proportional*: log(size) is added to the attention logits, so a token standing for three patches counts as
  three. Prefix tokens (class, distillation) are never merged.
- **PiToMe** (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024).
  ToMe's merge and schedule (``r`` per layer), with the candidates chosen by *energy*: how many close
  neighbours a token has, as a mean of ``elu(cos - margin)``. Only the ``2r`` highest-energy tokens can merge, so
  isolated, informative tokens are protected; the authors report 40-60% fewer FLOPs at about 0.5 pt off the
  shelf. The energy costs one (patches x patches) similarity product per merging layer.
- **EViT** (Liang et al., "Not All Patches are What You Need", ICLR 2022). At chosen layers, after attention,
  the patch tokens the class token attends to most (mean over heads) are kept, a share ``keep`` of them, and
  the rest are fused into one token: their sum weighted by that attention.
- **Resolution**: the encoder works at a smaller ``image_size`` than the model's input. The image is resized
  inside the graph (bilinear) and the position embedding interpolated to the smaller grid (bicubic, as DINOv2
  and timm do for other input sizes), so every block sees fewer tokens with no per-layer selection at all: no
  TopK or gather to break a runtime's fusion of an INT8 block, where ToMe's merge cost more than the MACs it saved
  (BENCHMARKS.md). The engine's input stays the size the user feeds. It pays where the images carry less detail
  than the input size holds (CIFAR-10's 32x32 images upscaled to 224); the accuracy budget decides.

This module holds the plans (what to reduce where, and the token counts that follow); the tensor math is
``merge``, the model surgery ``patch``. The export constraints shape the code: ToMe's reference merge
(facebookresearch/ToMe, ``tome/merge.py``) uses ``scatter_reduce(mean)``, which the ONNX exporter turns without
error into a ``ScatterElements`` that drops the reduction (pytorch/pytorch#101535, onnx/onnx#5100). Here nothing is
scattered: the merge is a product with a one-hot (destination x source) matrix, and every selection is
``TopK`` + ``GatherElements``; these, ``Equal``, ``MatMul`` and ``Slice`` with a step run in ONNX Runtime,
OpenVINO and TensorRT's ONNX parser. Token counts depend only on the plan, never on the data, so every shape
after the batch axis is static. The unmerged tokens keep their original order, so the class token stays first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from compress.errors import ConfigError

if TYPE_CHECKING:
    from compress.model.vit import ViTConfig

Method = Literal["tome", "pitome", "evit", "resolution"]
METHODS = ("tome", "pitome", "evit", "resolution")
Similarity = Literal["keys", "tokens"]
SIMILARITIES = ("keys", "tokens")  # what ToMe's and PiToMe's matching compares
MERGING = ("tome", "pitome")  # the methods that merge r tokens per layer


class TokenError(ConfigError):
    """A reduction plan the model cannot follow (r too large, keep rate out of range, no class token, a working
    size that is not a smaller multiple of the patch size)."""


@dataclass(frozen=True)
class TokenReduction:
    """What to reduce in each layer: ToMe's and PiToMe's ``r`` (tokens merged away) or EViT's ``keep`` (share of
    patches kept);
    or, for the resolution method, the ``image_size`` the whole encoder works at.

    Layers with ``r == 0`` or ``keep == 1`` are left as they are, so an all-zero plan is the original model, as is
    a resolution plan with ``image_size == 0``.
    """

    method: Method
    r: tuple[int, ...] = ()
    keep: tuple[float, ...] = ()
    image_size: int = 0
    # ToMe, PiToMe: the attention keys averaged over heads (the papers' choice), or the tokens themselves (the stream
    # after attention, what the merge averages)
    similarity: Similarity = "keys"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TokenError(f"unknown token reduction method {self.method!r}; choose from {list(METHODS)}")
        for layer, r in enumerate(self.r):
            if r < 0:
                raise TokenError(f"token merging r={r} at layer {layer} is negative; use 0 to leave a layer alone")
        for layer, keep in enumerate(self.keep):
            if not 0 < keep <= 1:
                raise TokenError(f"EViT keep rate {keep} at layer {layer} is outside (0, 1]; 1 keeps every token, "
                                 "0.7 keeps 70% of the patch tokens")
        if self.similarity not in SIMILARITIES:
            raise TokenError(f"token merging similarity {self.similarity!r} is not one of {list(SIMILARITIES)}")
        if self.similarity != "keys" and self.method not in MERGING:
            raise TokenError(f"a similarity for matching is a setting of ToMe and PiToMe, not {self.method}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 0:
            raise TokenError(f"working image size {self.image_size!r} must be a whole number of pixels, a multiple of "
                             "the patch size below the model's input size (0 leaves the resolution alone)")

    @property
    def active(self) -> bool:
        if self.method == "resolution":
            return self.image_size > 0
        return any(self.r) if self.method in MERGING else any(k < 1 for k in self.keep)

    def describe(self) -> str:
        """A short name for tables: ``tome r=8``, ``pitome r=[16,14,...]``, ``evit keep=0.7@[3,6,9]``,
        ``resolution 140``."""
        if self.method == "resolution":
            return f"resolution {self.image_size}" if self.image_size else "resolution unchanged"
        if self.method in MERGING:
            values = set(self.r)
            r = f"{self.r[0]}" if len(values) == 1 else f"[{','.join(map(str, self.r))}]"
            return f"{self.method} r={r}" + (" on tokens" if self.similarity == "tokens" else "")
        layers = [i for i, k in enumerate(self.keep) if k < 1]
        rates = {self.keep[i] for i in layers}
        rate = f"{rates.pop():g}" if len(rates) == 1 else "[" + ",".join(f"{self.keep[i]:g}" for i in layers) + "]"
        return f"evit keep={rate}@{layers}" if layers else "evit keep=1"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "r": list(self.r), "keep": list(self.keep)} | (
            {"image_size": self.image_size} if self.method == "resolution" else {}) | (
            {"similarity": self.similarity} if self.similarity != "keys" else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenReduction:
        return cls(d["method"], tuple(int(v) for v in d.get("r", ())), tuple(float(v) for v in d.get("keep", ())),
                   int(d.get("image_size", 0)), d.get("similarity", "keys"))


# ------------------------------------------------------------------------------------------------ plans
Schedule = Literal["constant", "decreasing", "first", "layers"]
SCHEDULES = ("constant", "decreasing", "first", "layers")


def tome(r: int | Sequence[int], depth: int, schedule: Schedule = "constant",
         method: Literal["tome", "pitome"] = "tome", layers: Sequence[int] | None = None,
         similarity: Similarity = "keys") -> TokenReduction:
    """A ToMe plan (a PiToMe one with ``method="pitome"``): ``r`` per layer as a constant, a list, a linearly
    decreasing schedule, all of it in the first block, or ``r`` in each of ``layers``.

    The decreasing schedule merges ``2r`` tokens in the first layer falling to 0 in the last, the same total as
    the constant ``r``, but more of it early, where it saves the most later work. ``first`` merges ``r`` tokens once,
    in the first block (after its attention), and none after: one merge instead of one per layer. On a CPU a merge's
    gathers and sorts cost more than the MACs a few tokens save, so merging in every layer can run slower in INT8
    than not merging at all, where merging once pays (BENCHMARKS.md). ``layers`` merges ``r`` in each block it is
    given (``layers=[1]``: once, in the second block). Where a single merge goes decides what it costs: on the
    reference DINOv2 ViT-S/14, 65 tokens merged in the first block cost 1.06 pt of top-1, in the second 0.31, in the
    third 0.65 (all 10,000 test images; BENCHMARKS.md, "Where the one merge goes").

    ``similarity`` is what the matching compares: ``"keys"``, the attention keys averaged over heads (ToMe's and
    PiToMe's choice), or ``"tokens"``, the tokens after attention themselves: all of their width, where the keys
    of a pruned block come from the heads it kept.
    """
    if method not in MERGING:
        raise TokenError(f"{method!r} does not merge tokens; a merging plan is one of {list(MERGING)}")
    if not isinstance(r, int):
        values = tuple(int(v) for v in r)
        if len(values) != depth:
            raise TokenError(f"tokens.r lists {len(values)} values but the model has {depth} layers; give one per "
                             "layer or a single int")
    elif schedule == "constant":
        values = (r,) * depth
    elif schedule == "decreasing":
        values = (r,) if depth == 1 else tuple(round(2 * r * (depth - 1 - i) / (depth - 1)) for i in range(depth))
    elif schedule == "first":
        values = (r,) + (0,) * (depth - 1)
    elif schedule == "layers":
        if not layers:
            raise TokenError("tokens.schedule=layers merges r in each of tokens.layers, which names none; set "
                             "tokens.layers=[1] (the second block), or tokens.schedule=first")
        _check_layers(layers, depth)
        values = tuple(r if i in layers else 0 for i in range(depth))
    else:
        raise TokenError(f"unknown ToMe schedule {schedule!r}; choose from {list(SCHEDULES)}")
    return TokenReduction(method, r=values, similarity=similarity)


def _check_layers(layers: Sequence[int], depth: int) -> None:
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise TokenError(f"tokens.layers {bad} are outside the model's layers 0..{depth - 1}")


def pitome(r: int | Sequence[int], depth: int, schedule: Schedule = "constant", layers: Sequence[int] | None = None,
           similarity: Similarity = "keys") -> TokenReduction:
    """A PiToMe plan: ``r`` tokens merged per layer, as for ``tome``."""
    return tome(r, depth, schedule, method="pitome", layers=layers, similarity=similarity)


def layers_at(fractions: Sequence[float], depth: int) -> list[int]:
    """Layers at ``fractions`` of the depth (0 <= f < 1), rounded: 2/3 is layer 8 of 12 and layer 4 of 6."""
    bad = [f for f in fractions if not 0 <= f < 1]
    if bad:
        raise TokenError(f"tokens.depths {bad} are outside [0, 1); 0.5 is the middle layer, 0.75 three quarters in")
    return sorted({min(depth - 1, round(depth * f)) for f in fractions})


def default_evit_layers(depth: int) -> list[int]:
    """EViT's placement, generalised: DeiT-S (12 layers) reduces at layers 3, 6 and 9 (0-based)."""
    return layers_at((0.25, 0.5, 0.75), depth)


def evit(keep: float | Sequence[float], depth: int, layers: Sequence[int] | None = None) -> TokenReduction:
    """An EViT plan: keep rate ``keep`` at ``layers`` (default ``default_evit_layers``), 1 elsewhere."""
    if not isinstance(keep, (int, float)):
        values = tuple(float(v) for v in keep)
        if len(values) != depth:
            raise TokenError(f"tokens.keep_rate lists {len(values)} values but the model has {depth} layers; give one "
                             "per layer or a single rate with tokens.layers")
        return TokenReduction("evit", keep=values)
    layers = default_evit_layers(depth) if layers is None else list(layers)
    _check_layers(layers, depth)
    return TokenReduction("evit", keep=tuple(float(keep) if i in layers else 1.0 for i in range(depth)))


def resolution(image_size: int, cfg: ViTConfig) -> TokenReduction:
    """A resolution plan: the encoder works at ``image_size`` (a multiple of the patch size below the input size)."""
    plan = TokenReduction("resolution", image_size=image_size)
    check_model(plan, cfg)
    return plan


def resolution_sizes(cfg: ViTConfig) -> list[int]:
    """The working sizes a model can take, largest first: every multiple of the patch size below its input size."""
    return [g * cfg.patch_size for g in range(cfg.grid_size - 1, 0, -1)]


def token_counts(plan: TokenReduction, cfg: ViTConfig) -> list[int]:
    """Tokens leaving each block under ``plan``; raises ``TokenError`` where the plan cannot be followed."""
    check_model(plan, cfg)
    prefix = cfg.num_prefix_tokens
    if plan.method == "resolution":
        grid = (plan.image_size or cfg.image_size) // cfg.patch_size
        return [prefix + grid * grid] * cfg.depth
    tokens = prefix + cfg.num_patches
    counts = []
    for layer in range(cfg.depth):
        patches = tokens - prefix
        if plan.method in MERGING:
            r = plan.r[layer]
            if r > patches // 2:
                raise TokenError(_too_large(plan, cfg, layer, patches))
            tokens -= r
        else:
            kept = math.ceil(plan.keep[layer] * patches)
            if kept < patches:
                tokens = prefix + kept + 1  # the kept patches and the fused one
        counts.append(tokens)
    return counts


def check_model(plan: TokenReduction, cfg: ViTConfig) -> None:
    """The plan's length fits the model, EViT has the class token it ranks tokens by, and a working size is a
    smaller multiple of the patch size."""
    if plan.method == "resolution":
        if plan.image_size and (plan.image_size % cfg.patch_size or plan.image_size >= cfg.image_size):
            sizes = resolution_sizes(cfg)
            valid = f"{sizes[0]}, {sizes[1]}, ... {sizes[-1]}" if len(sizes) > 2 else ", ".join(map(str, sizes))
            raise TokenError(f"the encoder cannot work at {plan.image_size} px: it takes a multiple of the patch size "
                             f"({cfg.patch_size}) below the input size ({cfg.image_size}): {valid or 'none'}")
        return
    values = plan.r if plan.method in MERGING else plan.keep
    if len(values) != cfg.depth:
        raise TokenError(f"the token reduction plan has {len(values)} layers but the model has {cfg.depth}")
    if plan.method == "evit" and not cfg.class_token:
        raise TokenError("EViT ranks tokens by the class token's attention, but this model has no class token "
                         "(model.class_token=false); use ToMe instead (tokens.method='tome')")


def max_constant_r(cfg: ViTConfig) -> int:
    """The largest constant ToMe ``r`` every layer can follow (each layer merges at most half its patches)."""
    best = 0
    for r in range(1, cfg.num_patches // 2 + 1):
        patches = cfg.num_patches
        for _ in range(cfg.depth):
            if r > patches // 2:
                return best
            patches -= r
        best = r
    return best


def _too_large(plan: TokenReduction, cfg: ViTConfig, layer: int, patches: int) -> str:
    r = plan.r[layer]
    msg = (f"token merging r={r} at layer {layer} is more than that layer can merge: it has {patches} patch tokens, "
           f"so the largest valid r there is {patches // 2}")
    if len(set(plan.r)) == 1:
        msg += f"; the largest constant r for this model is {max_constant_r(cfg)}"
    return msg
