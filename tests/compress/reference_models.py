"""Reference models in other projects' parameter layouts, for numeric import checks.

vit-pytorch cannot be imported on these machines (it needs torchvision), so its two layouts are re-expressed
here from its documented architecture: same module tree, so the same state-dict keys, and the same
arithmetic. ``EncoderViT`` wraps ``torch.nn.TransformerEncoder`` as a user's own ViT would.
"""

from __future__ import annotations

import torch
from torch import nn


class Patchify(nn.Module):
    """(B, C, H, W) -> (B, N, p*p*C), patches flattened (p1 p2 c) like einops' Rearrange; no parameters."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.p
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)


def _attend(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    B, N, _ = qkv.shape
    q, k, v = (t.reshape(B, N, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, N, d)
    out = ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, N, -1)


class VPAttention(nn.Module):  # current layout: LayerNorm inside the attention
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.to_out(_attend(self.to_qkv(self.norm(x)), self.heads, self.scale))


class VPFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class VPTransformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([VPAttention(dim, heads, dim_head), VPFeedForward(dim, mlp_dim)]) for _ in range(depth))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class VitPytorchViT(nn.Module):
    """vit-pytorch's current ``ViT``: LayerNorm, Linear, LayerNorm patch embedding; ``pool='mean'`` has no cls."""

    def __init__(self, *, image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128,
                 channels=3, dim_head=16, pool="cls"):
        super().__init__()
        n, patch_dim = (image_size // patch_size) ** 2, channels * patch_size**2
        self.to_patch_embedding = nn.Sequential(Patchify(patch_size), nn.LayerNorm(patch_dim),
                                                nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        n_cls = 1 if pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.randn(1, n_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + n_cls, dim))
        self.transformer = VPTransformer(dim, depth, heads, dim_head, mlp_dim)
        self.pool = pool
        self.mlp_head = nn.Linear(dim, num_classes)

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.transformer(x)
        return self.mlp_head(x.mean(dim=1) if self.pool == "mean" else x[:, 0])


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class OldAttention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.to_out(_attend(self.to_qkv(x), self.heads, self.scale))


class OldFeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class OldVitPytorchViT(nn.Module):
    """The older vit-pytorch ``ViT``: Residual(PreNorm(...)) blocks, a Linear patch embedding, LN+Linear head.
    With ``pool='mean'`` it averages every token, the class token included."""

    def __init__(self, *, image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128,
                 channels=3, dim_head=16, pool="cls"):
        super().__init__()
        n, patch_dim = (image_size // patch_size) ** 2, channels * patch_size**2
        self.to_patch_embedding = nn.Sequential(Patchify(patch_size), nn.Linear(patch_dim, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList([Residual(PreNorm(dim, OldAttention(dim, heads, dim_head))),
                           Residual(PreNorm(dim, OldFeedForward(dim, mlp_dim)))]) for _ in range(depth))
        self.pool = pool
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for attn, ff in self.transformer.layers:
            x = ff(attn(x))
        return self.mlp_head(x.mean(dim=1) if self.pool == "mean" else x[:, 0])


class Attention2020(nn.Module):
    """vit-pytorch's first attention (2020-10-04 to 2021-01-21): logits scaled by the model width, ``dim ** -0.5``."""

    def __init__(self, dim, heads, dropout_wrapped):
        super().__init__()
        self.heads, self.scale = heads, dim**-0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0)) if dropout_wrapped else nn.Linear(dim, dim)

    def forward(self, x):
        return self.to_out(_attend(self.to_qkv(x), self.heads, self.scale))


class VitPytorch2020ViT(nn.Module):
    """vit-pytorch as released in October-December 2020 (its git history): ``patch_to_embedding`` beside an einops
    rearrange in ``forward``, Residual(PreNorm(...)) blocks, and an MLP head. ``head`` picks the release:
    ``"mlp"`` (2020-10-04: Linear, GELU, Linear; FeedForward without dropout), ``"norm-mlp"`` (2020-10-16:
    LayerNorm, Linear, GELU, Dropout, Linear; dropout everywhere), ``"norm-linear"`` (2020-12-07)."""

    def __init__(self, *, image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=96,
                 channels=3, head="norm-mlp"):
        super().__init__()
        self.p = patch_size
        n, patch_dim = (image_size // patch_size) ** 2, channels * patch_size**2
        dropout = head != "mlp"
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.patch_to_embedding = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        ff = (lambda: nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                    nn.Dropout(0.0))) if dropout else (
              lambda: nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim)))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList([Residual(PreNorm(dim, Attention2020(dim, heads, dropout))),
                           Residual(PreNorm(dim, _Net(ff())))]) for _ in range(depth))
        self.mlp_head = {
            "mlp": lambda: nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, num_classes)),
            "norm-mlp": lambda: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                              nn.Linear(mlp_dim, num_classes)),
            "norm-linear": lambda: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes)),
        }[head]()

    def forward(self, img):
        x = self.patch_to_embedding(Patchify(self.p)(img))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for attn, ff in self.transformer.layers:
            x = ff(attn(x))
        return self.mlp_head(x[:, 0])


class _Net(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


class EncoderViT(nn.Module):
    """A ViT a user might build around ``nn.TransformerEncoder``: conv or linear patches, cls token, head."""

    def __init__(self, *, image_size=32, patch=8, dim=64, heads=4, depth=2, classes=10, norm_first=False,
                 activation="relu", linear_patch=False, final_norm=True):
        super().__init__()
        n = (image_size // patch) ** 2
        self.linear_patch = linear_patch
        self.patchify = Patchify(patch)
        self.patch_embed = nn.Linear(3 * patch * patch, dim) if linear_patch else nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, activation=activation,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim) if final_norm else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        if self.linear_patch:
            x = self.patch_embed(self.patchify(x))
        else:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.encoder(x)[:, 0])
