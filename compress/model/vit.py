"""The canonical Vision Transformer every stage works on.

Architecture of Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (patch embedding, class token,
position embedding, encoder blocks of multi-head self-attention and MLP, classification head), with the
parameter names of timm's ``vision_transformer.py`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.norm1/attn/ls1/norm2/mlp/ls2``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm``,
``head``) so that timm checkpoints load as they are and every later stage finds the same attributes.

Unlike timm, the head count, head width and MLP width are stored **per layer**: head and MLP pruning make
layers differ, and any code that assumed one global head count would break (intel/neural-compressor#525).
The variations that real checkpoints need are switches on ``ViTConfig``: pre- or post-norm blocks, ReLU or
GELU, qkv bias, LayerScale, class token, DeiT's distillation token, mean pooling, and the LayerNorms that
lucidrains' vit-pytorch puts around its linear patch embedding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError


Pool = Literal["cls", "mean", "mean_all", "cls_mean"]
FinalNorm = Literal["token", "pooled", "none"]
Activation = Literal["gelu", "relu"]


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT. ``num_heads`` and ``mlp_dim`` may be one int or one value per layer."""

    image_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int | tuple[int, ...] = 12
    head_dim: int | None = None  # default: embed_dim // num_heads of the first layer
    mlp_dim: int | tuple[int, ...] | None = None  # default: 4 * embed_dim
    num_classes: int = 1000
    qkv_bias: bool = True
    class_token: bool = True
    dist_token: bool = False  # DeiT's distillation token, a second prefix token
    dist_head: bool = False  # DeiT's second head on the distillation token; logits are the mean of both
    # "mean" averages patch tokens (timm), "mean_all" every token (vit-pytorch), "cls_mean" gives the head the class
    # token beside the mean patch token (DINOv2's classifier: a head twice as wide)
    pool: Pool = "cls"
    final_norm: FinalNorm = "token"  # "token": `norm` on every token; "pooled": `fc_norm` after pooling
    pre_norm: bool = True  # False: post-norm blocks as in the original Transformer
    act: Activation = "gelu"
    layer_scale_init: float | None = None  # LayerScale (CaiT / DeiT-III) when set
    norm_eps: float = 1e-6
    patch_pre_norm: bool = False  # LayerNorm over flattened patch pixels before the projection
    patch_post_norm: bool = False  # LayerNorm after the patch projection (timm `patch_embed.norm`)
    patch_bias: bool = True  # False: a bias-free patch projection (timm's CLIP ViTs)
    reg_tokens: int = 0  # register tokens after the class token (Darcet et al. 2024, "Vision Transformers Need
    # Registers"; timm `reg_token`): prefix tokens that no head reads
    pos_embed_prefix: bool = True  # False: the position embedding covers the patches only (timm `no_embed_class`)
    blocks_pre_norm: bool = False  # a LayerNorm before the first block (timm `norm_pre`, CLIP)
    head_hidden: tuple[int, ...] = ()  # widths of hidden layers in an MLP head (vit-pytorch 2020: one, GELU)
    head_act: Activation = "gelu"  # the activation after each hidden head layer

    def __post_init__(self) -> None:
        heads = _per_layer(self.num_heads, self.depth, "num_heads")
        mlp = _per_layer(self.mlp_dim if self.mlp_dim is not None else 4 * self.embed_dim, self.depth, "mlp_dim")
        head_dim = self.head_dim if self.head_dim is not None else self.embed_dim // max(1, heads[0])
        object.__setattr__(self, "head_hidden", tuple(int(w) for w in self.head_hidden))
        object.__setattr__(self, "num_heads", heads)
        object.__setattr__(self, "mlp_dim", mlp)
        object.__setattr__(self, "head_dim", head_dim)
        self._validate()

    def _validate(self) -> None:
        for name in ("image_size", "patch_size", "embed_dim", "depth", "num_classes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.in_chans not in (1, 3):
            raise ConfigError(f"model.in_chans must be 1 or 3, got {self.in_chans}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}; "
                f"use an image size that is a multiple of {self.patch_size} (e.g. "
                f"{self.image_size // self.patch_size * self.patch_size or self.patch_size})"
            )
        if any(h < 1 for h in self.num_heads):
            raise ConfigError(f"every layer needs at least one attention head, got num_heads={self.num_heads}")
        if any(m < 1 for m in self.mlp_dim):
            raise ConfigError(f"every layer needs at least one MLP unit, got mlp_dim={self.mlp_dim}")
        if self.head_dim < 1:
            raise ConfigError(f"model.head_dim must be positive, got {self.head_dim}")
        if self.pool in ("cls", "cls_mean") and not self.class_token:
            raise ConfigError(f"model.pool={self.pool!r} needs model.class_token=true; set pool='mean' for a model "
                              "without one")
        if self.pool == "cls_mean" and (self.final_norm == "pooled" or self.dist_head):
            raise ConfigError("model.pool='cls_mean' takes final_norm='token' or 'none', and no distillation head")
        if self.dist_token and not self.class_token:
            raise ConfigError("model.dist_token needs model.class_token=true")
        if self.dist_head and not self.dist_token:
            raise ConfigError("model.dist_head needs model.dist_token=true")
        if self.reg_tokens < 0 or (self.reg_tokens and self.dist_token):
            raise ConfigError(f"model.reg_tokens={self.reg_tokens}: give 0 or more register tokens, and not beside a "
                              "distillation token")
        if any(w < 1 for w in self.head_hidden) or (self.head_hidden and self.dist_head):
            raise ConfigError(f"model.head_hidden={list(self.head_hidden)}: give positive widths, and no distillation "
                              "head beside an MLP head")
        for name, allowed in (("pool", Pool), ("final_norm", FinalNorm), ("act", Activation), ("head_act", Activation)):
            if getattr(self, name) not in allowed.__args__:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {list(allowed.__args__)}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def num_pos_prefix(self) -> int:
        """The prefix tokens the position embedding covers (all of them, or none with ``pos_embed_prefix=False``)."""
        return self.num_prefix_tokens if self.pos_embed_prefix else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_heads"] = list(self.num_heads)
        d["mlp_dim"] = list(self.mlp_dim)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """Build a config, naming any unknown key and the valid ones (nanoGPT: unknown keys are an error)."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ConfigError(f"unknown model key(s) {unknown}; valid keys are {sorted(valid)}")
        values = dict(d)
        for key in ("num_heads", "mlp_dim", "head_hidden"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def _per_layer(value: int | tuple[int, ...] | list[int], depth: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * depth
    values = tuple(int(v) for v in value)
    if len(values) != depth:
        raise ConfigError(f"model.{name} has {len(values)} entries but the model has depth {depth}; give one per layer")
    return values


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D) with a stride-p convolution (`patch_embed.proj`).

    With ``pre_norm`` the patches are flattened in (c, p, p) order, normalised, and projected with the same
    convolution weight used as a matrix; that is vit-pytorch's LayerNorm -> Linear -> LayerNorm embedding.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        patch_dim = cfg.in_chans * cfg.patch_size**2
        self.norm_pre = nn.LayerNorm(patch_dim, eps=cfg.norm_eps) if cfg.patch_pre_norm else None
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                              bias=cfg.patch_bias)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.patch_post_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_pre is None:
            x = self.proj(x)  # (B, D, H/p, W/p)
            x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        else:
            B, C, H, W = x.shape
            p = self.patch_size
            x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
            x = x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)
            x = self.norm_pre(x)
            x = F.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, D)
        return self.norm(x)


class Attention(nn.Module):
    """Multi-head self-attention with its own head count and head width (they differ after pruning)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of tokens ``x`` (B, N, D), each (B, H, N, hd).

        Split into three, then into heads: the same numbers as timm's reshape to (B, N, 3, H, hd) and permute,
        but OpenVINO 2026.4's CPU plugin computes that pattern wrongly once the token count equals the head count
        (static shapes; seen here, and token reduction can land on such counts), and this one it computes right.
        """
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, self.num_heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return q, k, v

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B, H, N, hd) -> projected tokens (B, N, D)."""
        B, _, N, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v per head: queries, keys, values (B, H, N, hd), an additive ``bias``
        broadcast to the scores (B, H, N, N) -> (B, H, N, hd). The one place the attention product is written, so
        an export form (``compress.model.runtime_graph``) can write it otherwise."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # (B, H, N, hd) each
        return self.merge_heads(self.attend(q, k, v))  # (B, N, D)


def activation(act: Activation) -> nn.Module:
    return nn.GELU() if act == "gelu" else nn.ReLU()


def mlp_head_layers(in_features: int, hidden: tuple[int, ...], act: Activation) -> nn.Sequential | None:
    """The hidden layers of an MLP head (Linear, activation, ...) before the final ``head``; None for a linear head."""
    if not hidden:
        return None
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), activation(act)]
        in_features = width
    return nn.Sequential(*layers)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: Activation) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, layer: int) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.pre_norm = cfg.pre_norm
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads[layer], cfg.head_dim, cfg.qkv_bias)
        self.ls1 = LayerScale(d, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.mlp_dim[layer], cfg.act)
        self.ls2 = LayerScale(d, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.ls1(self.attn(self.norm1(x)))  # (B, N, D)
            x = x + self.ls2(self.mlp(self.norm2(x)))  # (B, N, D)
        else:
            x = self.norm1(x + self.ls1(self.attn(x)))
            x = self.norm2(x + self.ls2(self.mlp(x)))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_prefix + cfg.num_patches, d))
        self.norm_pre = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.blocks_pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm == "pooled" else nn.Identity()
        pooled = 2 * d if cfg.pool == "cls_mean" else d
        self.head_hidden = mlp_head_layers(pooled, cfg.head_hidden, cfg.head_act)  # (B, pooled) -> (B, hidden[-1])
        self.head = nn.Linear(cfg.head_hidden[-1] if cfg.head_hidden else pooled, cfg.num_classes)
        self.head_dist = nn.Linear(d, cfg.num_classes) if cfg.dist_head else None
        # Token merging or pruning at inference (compress.tokens.plan): a plan, not weights; None runs every token.
        self.token_reduction: Any = None  # a compress.tokens.TokenReduction
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) for linears and embeddings, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight.view(m.weight.shape[0], -1), std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) -> prefix and patch tokens with position embedding (B, P+N, D).

        ``pos_embed`` replaces the model's own for another grid (``resize_pos_embed``); None uses ``self.pos_embed``.
        """
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if not self.config.pos_embed_prefix:
            x = x + pos_embed  # (B, N, D): the prefix tokens carry no position
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, P+N, D)
        if self.config.pos_embed_prefix:
            x = x + pos_embed
        return self.norm_pre(x)  # (B, P+N, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, P+N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, P+N, D)

    def forward_head(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and classify tokens (B, T, D); ``size`` (B, T, 1) weights mean pooling after token merging."""
        return self.classify(self.pool(x, size))  # (B, K)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head alone: ``pool``'s features (B, F) -> logits (B, K). A linear probe trains just this."""
        if self.config.dist_head:
            cls, dist = pooled.chunk(2, dim=-1)  # (B, D) each
            return (self.head(cls) + self.head_dist(dist)) / 2  # (B, K)
        if self.head_hidden is not None:
            pooled = self.head_hidden(pooled)  # (B, hidden[-1])
        return self.head(pooled)  # (B, K)

    def pool(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, T, D) -> the features the head reads (B, F), after the pooled norm (``fc_norm``)."""
        cfg = self.config
        if cfg.dist_head:
            return torch.cat([self.fc_norm(x[:, 0]), self.fc_norm(x[:, 1])], dim=-1)  # (B, 2D)
        if cfg.pool == "cls":
            x = x[:, 0]  # (B, D)
        elif cfg.pool == "cls_mean":
            patches = x[:, cfg.num_prefix_tokens :]  # (B, N', D)
            weights = None if size is None else size[:, cfg.num_prefix_tokens :]
            mean = patches.mean(dim=1) if weights is None else (patches * weights).sum(dim=1) / weights.sum(dim=1)
            x = torch.cat([x[:, 0], mean], dim=-1)  # (B, 2D)
        else:
            if cfg.pool == "mean":
                x = x[:, cfg.num_prefix_tokens :]  # (B, N', D)
                size = None if size is None else size[:, cfg.num_prefix_tokens :]
            # A merged token stands for `size` original tokens: weight it so the mean is over the originals.
            x = x.mean(dim=1) if size is None else (x * size).sum(dim=1) / size.sum(dim=1)  # (B, D)
        return self.fc_norm(x)  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.token_reduction is None, "token reduction is set with compress.tokens.apply, which patches forward"
        return self.forward_head(self.forward_features(x))  # (B, K)

    def set_image_size(self, image_size: int, *, antialias: bool = True) -> None:
        """Resize the position embedding for another input size (bicubic; antialiased as timm does, or not, as
        DINOv2 does); done once, so the exported graph holds no interpolation."""
        cfg = dataclasses.replace(self.config, image_size=image_size)  # validates divisibility
        self.pos_embed = nn.Parameter(
            resize_pos_embed(self.pos_embed.data, self.config.grid_size, cfg.grid_size, cfg.num_pos_prefix,
                             antialias=antialias)
        )
        self.config = cfg


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: int, new_grid: int, num_prefix: int, *,
                     antialias: bool = True) -> torch.Tensor:
    """Interpolate the grid part of a (1, P + g*g, D) position embedding to a new grid size."""
    if old_grid == new_grid:
        return pos_embed.clone()
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]  # (1, P, D), (1, g*g, D)
    D = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D)  # (1, g'*g', D)
    return torch.cat([prefix, grid], dim=1)


def grid_from_pos_embed(num_positions: int, num_prefix: int) -> int:
    """The side of the square patch grid that a position embedding of this length covers."""
    side = math.isqrt(num_positions - num_prefix)
    if side * side != num_positions - num_prefix:
        raise ConfigError(
            f"a position embedding of {num_positions} entries with {num_prefix} prefix token(s) is not a square grid"
        )
    return side
