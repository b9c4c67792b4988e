import pytest
import torch

from compress.errors import ConfigError
from compress.model.macs import count_macs, count_params
from compress.model.vit import ViTConfig, VisionTransformer
from tests.conftest import TINY


def test_output_shape_and_timm_names(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    assert tiny_vit(x).shape == (3, 10)
    names = set(tiny_vit.state_dict())
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.1.norm1.weight", "blocks.1.attn.qkv.weight",
                 "blocks.1.attn.proj.weight", "blocks.1.norm2.weight", "blocks.1.mlp.fc1.weight",
                 "blocks.1.mlp.fc2.weight", "norm.weight", "head.weight"):
        assert name in names


def test_layers_may_differ_in_heads_and_mlp_width():
    cfg = ViTConfig(**TINY | {"num_heads": (4, 2), "mlp_dim": (128, 32), "head_dim": 16})
    model = VisionTransformer(cfg)
    assert [b.attn.num_heads for b in model.blocks] == [4, 2]
    assert model.blocks[1].attn.qkv.out_features == 3 * 2 * 16
    assert model.blocks[1].mlp.fc1.out_features == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("variant", [
    {"pre_norm": False}, {"act": "relu"}, {"layer_scale_init": 0.1}, {"pool": "mean"}, {"pool": "mean_all"},
    {"class_token": False, "pool": "mean"}, {"qkv_bias": False}, {"final_norm": "pooled", "pool": "mean"},
    {"dist_token": True, "dist_head": True}, {"patch_pre_norm": True, "patch_post_norm": True}, {"in_chans": 1},
])
def test_variants_run(variant):
    cfg = ViTConfig(**TINY | variant)
    model = VisionTransformer(cfg).eval()
    out = model(torch.randn(2, cfg.in_chans, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_layerscale_is_applied():
    cfg = ViTConfig(**TINY | {"layer_scale_init": 1e-3})
    model = VisionTransformer(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    for block in model.blocks:
        block.ls1.gamma.data.zero_()
        block.ls2.gamma.data.zero_()
    after = model(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("bad, message", [
    ({"image_size": 30}, "not divisible by patch size"),
    ({"num_heads": (4,)}, "one per layer"),
    ({"num_heads": 0}, "at least one attention head"),
    ({"in_chans": 2}, "1 or 3"),
    ({"class_token": False}, "pool='cls' needs"),
])
def test_bad_configs_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        ViTConfig(**TINY | bad)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown model key.*'heads'.*valid keys"):
        ViTConfig.from_dict(TINY | {"heads": 3})


def test_config_round_trip():
    cfg = ViTConfig(**TINY | {"num_heads": (4, 2), "head_dim": 16})
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


def test_set_image_size_interpolates_and_keeps_prefix(tiny_vit):
    cls_pos = tiny_vit.pos_embed[:, :1].clone()
    tiny_vit.set_image_size(48)
    assert tiny_vit.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(tiny_vit.pos_embed[:, :1], cls_pos)
    assert tiny_vit(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    with pytest.raises(ConfigError, match="not divisible"):
        tiny_vit.set_image_size(50)


def test_param_and_mac_counts_follow_the_model(tiny_vit):
    # Per block: qkv 64*192 + proj 64*64 + fc1 64*128 + fc2 128*64, times 17 tokens, plus attention matmuls.
    tokens, d = 17, 64
    per_block = tokens * (d * 3 * d + d * d + d * 128 + 128 * d) + 2 * 4 * tokens * tokens * 16
    patch = 16 * 64 * 3 * 8 * 8
    assert count_macs(tiny_vit, (1, 3, 32, 32)) == 2 * per_block + patch + 64 * 10
    assert count_params(tiny_vit) == sum(p.numel() for p in tiny_vit.parameters())
    smaller = VisionTransformer(ViTConfig(**TINY | {"mlp_dim": 64}))
    assert count_macs(smaller, (1, 3, 32, 32)) < count_macs(tiny_vit, (1, 3, 32, 32))
