"""Import of other projects' checkpoints, checked numerically against the original implementations."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from compress.model.checkpoint import Checkpoint, save_checkpoint
from compress.errors import CheckpointError, ConfigError
from compress.model.importers import load_checkpoint
from calibration.preprocess import Preprocess
from tests.compress.reference_models import EncoderViT, OldVitPytorchViT, VitPytorch2020ViT, VitPytorchViT

ATOL = 1e-4


def _same_logits(reference: torch.nn.Module, imported: torch.nn.Module, channels: int = 3, size: int = 32) -> float:
    x = torch.randn(4, channels, size, size)
    with torch.inference_mode():
        ref, got = reference.eval()(x), imported.eval()(x)
    diff = (ref - got).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff}"
    return diff


# ------------------------------------------------------------------------------------------------ Hugging Face
def _hf_vit(tmp_path, deit: bool = False, teacher: bool = False):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e .[test]")
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                  patch_size=8, num_labels=10, id2label={i: f"class{i}" for i in range(10)},
                  label2id={f"class{i}": i for i in range(10)})
    if deit:
        cls = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
        model = cls(transformers.DeiTConfig(**kwargs))
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**kwargs))
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


class HFLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@pytest.mark.parametrize("deit, teacher", [(False, False), (True, False), (True, True)])
def test_hugging_face_5x_layout_matches_transformers(tmp_path, deit, teacher):
    model, path = _hf_vit(tmp_path, deit, teacher)
    assert any(k.startswith(("vit.layers.", "deit.layers.")) for k in model.state_dict())
    ckpt = load_checkpoint(path)
    _same_logits(HFLogits(model), ckpt.model)
    assert ckpt.classes[3] == "class3"
    assert ckpt.config.num_heads == (4, 4) and ckpt.config.dist_token == deit


def _to_4x(key: str) -> str:
    """transformers 5.x key -> the 4.x layout (``vit.encoder.layer.N.attention.attention.query``)."""
    m = re.match(r"(vit|deit)\.layers\.(\d+)\.(.*)", key)
    if not m:
        return key
    p, i, rest = m.groups()
    rest = (rest.replace("attention.q_proj", "attention.attention.query")
            .replace("attention.k_proj", "attention.attention.key")
            .replace("attention.v_proj", "attention.attention.value")
            .replace("attention.o_proj", "attention.output.dense")
            .replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense"))
    return f"{p}.encoder.layer.{i}.{rest}"


def test_hugging_face_4x_layout_with_bin_weights(tmp_path):
    model, path = _hf_vit(tmp_path)
    old = tmp_path / "hf4"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    torch.save({_to_4x(k): v for k, v in model.state_dict().items()}, old / "pytorch_model.bin")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in torch.load(old / "pytorch_model.bin")
    _same_logits(HFLogits(model), load_checkpoint(old).model)


def test_hugging_face_non_vit_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(CheckpointError, match="Hugging Face 'vit', 'deit' and 'dinov2' models import"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------ torch.nn.TransformerEncoder
@pytest.mark.parametrize("norm_first, activation, linear_patch", [(False, "relu", False), (True, "gelu", True)])
def test_transformer_encoder_matches_pytorch(tmp_path, norm_first, activation, linear_patch):
    reference = EncoderViT(norm_first=norm_first, activation=activation, linear_patch=linear_patch).eval()
    path = tmp_path / "encoder.pt"
    torch.save(reference.state_dict(), path)
    overrides = {"num_heads": 4, "pre_norm": norm_first, "act": activation}
    _same_logits(reference, load_checkpoint(path, overrides).model)


def test_transformer_encoder_needs_the_head_count(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save(EncoderViT().state_dict(), path)
    with pytest.raises(ConfigError, match="model.num_heads"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------- vit-pytorch
@pytest.mark.parametrize("cls, pool", [(VitPytorchViT, "cls"), (VitPytorchViT, "mean"), (OldVitPytorchViT, "cls"),
                                       (OldVitPytorchViT, "mean")])
def test_vit_pytorch_layouts(tmp_path, cls, pool):
    reference = cls(pool=pool).eval()
    path = tmp_path / "vp.pt"
    torch.save(reference.state_dict(), path)
    overrides = {"num_heads": 4} | ({"pool": "mean"} if pool == "mean" and cls is OldVitPytorchViT else {})
    _same_logits(reference, load_checkpoint(path, overrides).model)


def test_old_vit_pytorch_keys_are_the_documented_ones():
    keys = OldVitPytorchViT().state_dict()
    assert "transformer.layers.1.0.fn.fn.to_qkv.weight" in keys and "mlp_head.1.weight" in keys


@pytest.mark.parametrize("head", ["mlp", "norm-mlp", "norm-linear"])
def test_vit_pytorch_2020_releases_with_mlp_heads(tmp_path, head):
    """patch_to_embedding, a head of any depth, and attention scaled by the model width: identical logits."""
    reference = VitPytorch2020ViT(head=head).eval()
    path = tmp_path / "vp2020.pt"
    torch.save(reference.state_dict(), path)
    ckpt = load_checkpoint(path, {"num_heads": 4})
    assert ckpt.config.head_hidden == (() if head == "norm-linear" else (96,))
    assert ckpt.config.final_norm == ("none" if head == "mlp" else "pooled")
    _same_logits(reference, ckpt.model)


def test_vit_pytorch_2020_head_scale_may_be_set(tmp_path):
    reference = VitPytorch2020ViT(head="norm-linear").eval()
    path = tmp_path / "vp2020.pt"
    torch.save(reference.state_dict(), path)
    width = load_checkpoint(path, {"num_heads": 4}).model
    head = load_checkpoint(path, {"num_heads": 4, "attention_scale": "head"}).model
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(width(x), head(x), atol=1e-4)  # the setting reaches the weights
    with pytest.raises(ConfigError, match="attention_scale"):
        load_checkpoint(path, {"num_heads": 4, "attention_scale": "model"})


def test_vit_pytorch_defaults_to_64_wide_heads(tmp_path):
    reference = VitPytorchViT(dim=128, heads=2, dim_head=64).eval()
    path = tmp_path / "vp.pt"
    torch.save(reference.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt.config.num_heads == (2, 2)
    _same_logits(reference, ckpt.model)


# --------------------------------------------------------------------------------------------------- timm and ours
def test_timm_state_dict_with_training_wrapper(tmp_path, tiny_vit):
    path = tmp_path / "timm.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_vit.state_dict().items()}, "epoch": 3}, path)
    ckpt = load_checkpoint(path)  # 64 / 4 heads of 16 cannot be guessed: the 64-wide convention gives 1 head
    assert ckpt.config.num_heads == (1, 1)
    ckpt = load_checkpoint(path, {"num_heads": 4})
    _same_logits(tiny_vit, ckpt.model)


def test_timm_safetensors(tmp_path, tiny_vit):
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(path))
    _same_logits(tiny_vit, load_checkpoint(path, {"num_heads": 4}).model)


def test_own_format_round_trip(tmp_path, tiny_vit):
    pre = Preprocess(crop_size=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    path = save_checkpoint(Checkpoint(tiny_vit, pre, [f"c{i}" for i in range(10)]), tmp_path / "m.safetensors")
    ckpt = load_checkpoint(path)
    _same_logits(tiny_vit, ckpt.model)
    assert ckpt.preprocess == pre and ckpt.classes[9] == "c9" and ckpt.config == tiny_vit.config


# ---------------------------------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint(tmp_path, tiny_vit):
    path = tmp_path / "m.pt"
    torch.save(tiny_vit.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_truncated_safetensors(tmp_path, tiny_vit):
    path = save_checkpoint(Checkpoint(tiny_vit, Preprocess(crop_size=32), list("abcdefghij")), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_not_a_vit(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"matches no known ViT layout .* none of its 4 tensors could be placed, "
                                              r"in modules 0, 1; two ways out: .* key_map .* export the model to ONNX"):
        load_checkpoint(path)


def test_hyper_parameters_that_disagree_with_the_weights(tmp_path, tiny_vit):
    path = tmp_path / "timm.pt"
    torch.save(tiny_vit.state_dict(), path)
    with pytest.raises(CheckpointError, match="model.embed_dim=128 disagrees"):
        load_checkpoint(path, {"embed_dim": 128, "num_heads": 4})
    with pytest.raises(CheckpointError, match="does not divide"):
        load_checkpoint(path, {"num_heads": 5})


def test_shape_mismatch_names_the_key(tmp_path, tiny_vit):
    state = tiny_vit.state_dict()
    state["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    path = tmp_path / "timm.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"shape \['blocks.1.mlp.fc2.weight \(64, 100\) vs model \(64, 128\)"):
        load_checkpoint(path, {"num_heads": 4})


def test_image_size_override_interpolates_position_embedding(tmp_path, tiny_vit):
    pre = Preprocess(crop_size=32, resize_size=36)
    path = save_checkpoint(Checkpoint(tiny_vit, pre, [str(i) for i in range(10)]), tmp_path / "m.safetensors")
    ckpt = load_checkpoint(path, {"image_size": 48})
    assert ckpt.config.image_size == 48 and ckpt.model.pos_embed.shape == (1, 1 + 36, 64)
    assert ckpt.preprocess.crop_size == 48 and ckpt.preprocess.resize_size == 54
    assert ckpt.model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_per_layer_values_may_be_given_as_one_int(tmp_path, tiny_vit):
    path = tmp_path / "timm.pt"
    torch.save(tiny_vit.state_dict(), path)
    assert load_checkpoint(path, {"num_heads": 4, "mlp_dim": 128}).config.mlp_dim == (128, 128)
    own = save_checkpoint(Checkpoint(tiny_vit, Preprocess(crop_size=32), list("abcdefghij")), tmp_path / "m.safetensors")
    assert load_checkpoint(own, {"mlp_dim": 128, "num_heads": [4, 4]}).config.num_heads == (4, 4)
    with pytest.raises(CheckpointError, match="model.depth=3 disagrees"):
        load_checkpoint(own, {"depth": 3})


def test_recipe_preprocess_overrides_the_checkpoints(tmp_path, tiny_vit):
    from compress.config import load_config
    from compress.model.importers import load_configured

    pre = Preprocess(crop_size=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    path = save_checkpoint(Checkpoint(tiny_vit, pre, [str(i) for i in range(10)]), tmp_path / "m.safetensors")
    config = load_config(None, ["preprocess.interpolation=\"bicubic\"", "preprocess.std=[0.2, 0.2, 0.2]"])
    ckpt = load_configured(path, config)
    assert ckpt.preprocess == Preprocess(crop_size=32, mean=(0.1, 0.2, 0.3), std=(0.2, 0.2, 0.2), interpolation="bicubic")
    assert load_configured(path, load_config(None, [])).preprocess == pre  # no override: the checkpoint's own


def test_a_file_that_records_no_normalisation_must_be_told(tmp_path, tiny_vit):
    """A bare state dict, or a Hugging Face directory without preprocessor_config.json, says nothing of the mean
    and std its model was trained with: the run is told, or refuses in one line, rather than assume them."""
    from compress.config import load_config
    from compress.errors import ConfigError
    from compress.model.importers import load_configured

    bare = tmp_path / "timm.pt"
    torch.save(tiny_vit.state_dict(), bare)
    with pytest.raises(ConfigError, match=r"timm.pt records no normalisation, so preprocess.mean and std must be "
                                          r"given, .*--set 'preprocess.mean=\[0.485, 0.456, 0.406\]'"):
        load_configured(bare, load_config(None, []))
    told = load_config(None, ["preprocess.mean=[0.485, 0.456, 0.406]", "preprocess.std=[0.229, 0.224, 0.225]"])
    assert load_configured(bare, told).preprocess.std == (0.229, 0.224, 0.225)
    _, hf_dir = _hf_vit(tmp_path)  # save_pretrained writes no preprocessor_config.json
    with pytest.raises(ConfigError, match="hf records no normalisation"):
        load_configured(hf_dir, load_config(None, []))
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    assert load_configured(hf_dir, load_config(None, [])).preprocess.std == (0.25, 0.25, 0.25)


def _stray(state: dict) -> dict:
    """A final LayerNorm no layout places, as published checkpoints hold beside their encoders."""
    return dict(state) | {"extra_norm.weight": torch.ones(64), "extra_norm.bias": torch.zeros(64)}


@pytest.mark.parametrize("layout", ["timm", "huggingface", "vit-pytorch", "vit-pytorch-2020", "nn.TransformerEncoder"])
def test_a_tensor_no_layout_places_stops_the_load_naming_it(tmp_path, tiny_vit, layout):
    """Every tensor is used, or the load fails: a LayerNorm dropped in silence loads a model that predicts
    something else (two published checkpoints lost one each, with final_norm 'none' recorded)."""
    overrides = {"num_heads": 4}
    if layout == "huggingface":
        model, path = _hf_vit(tmp_path)
        state = _stray({f"vit.{k}" if not k.startswith(("vit.", "classifier.")) else k: v
                        for k, v in model.state_dict().items()})
        (path / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    else:
        module = {"timm": lambda: tiny_vit, "vit-pytorch": VitPytorchViT, "vit-pytorch-2020": OldVitPytorchViT,
                  "nn.TransformerEncoder": EncoderViT}[layout]()
        path = tmp_path / "model.pt"
        torch.save(_stray(module.state_dict()), path)
    with pytest.raises(CheckpointError, match=r"extra_norm\.bias \(64,\), extra_norm\.weight \(64,\)|unexpected "
                                              r"\['extra_norm"):
        load_checkpoint(path, overrides)


class _HomeBlock(torch.nn.Module):
    """A pre-norm block written by hand around nn.MultiheadAttention, as people write them."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(0.0),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _PosEmbed(torch.nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embedding = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.02)


class HomeViT(torch.nn.Module):
    """transformer.N.attn.in_proj_weight, norm1/norm2, mlp.0/mlp.3, pos_embed.pos_embedding: no known layout."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = _PosEmbed(17, dim)
        self.transformer = torch.nn.ModuleList(_HomeBlock(dim, heads, 128) for _ in range(depth))
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed.pos_embedding
        for block in self.transformer:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


HOME_KEY_MAP = [[r"^transformer\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."],
                [r"^transformer\.(\d+)\.mlp\.0\.", r"encoder.layers.\1.linear1."],
                [r"^transformer\.(\d+)\.mlp\.3\.", r"encoder.layers.\1.linear2."],
                [r"^transformer\.(\d+)\.", r"encoder.layers.\1."], [r"^norm\.", "encoder.norm."]]


def test_a_key_map_brings_a_home_written_vit_onto_a_known_layout(tmp_path):
    reference = HomeViT().eval()
    path = tmp_path / "home.pt"
    torch.save(reference.state_dict(), path)
    with pytest.raises(ConfigError, match="model.num_heads"):  # found by its shapes, all but the head count
        load_checkpoint(path)
    model = load_checkpoint(path, {"key_map": HOME_KEY_MAP, "num_heads": 4, "pre_norm": True, "act": "gelu"}).model
    _same_logits(reference, model)


@pytest.mark.parametrize("key_map, message", [
    ("blocks", "must be a list of \\[pattern, replacement\\] pairs"),
    ([["(", "x"]], "pattern '\\(' is not a regular expression"),
    ([["^transformer\\.\\d+\\.", "same."]], "renames two tensors of .* to 'same\\.norm1\\.weight'"),
])
def test_a_bad_key_map_is_one_line(tmp_path, key_map, message):
    path = tmp_path / "home.pt"
    torch.save(HomeViT().state_dict(), path)
    with pytest.raises((ConfigError, CheckpointError), match=message):
        load_checkpoint(path, {"key_map": key_map})


def test_a_home_written_vit_on_nn_multiheadattention_is_found_by_its_shapes(tmp_path):
    """transformer.N.attn.in_proj_weight, norm1/norm2, mlp.0/mlp.3, pos_embed.pos_embedding: no key map needed."""
    torch.manual_seed(0)
    reference = HomeViT().eval()
    path = tmp_path / "home.pt"
    torch.save(reference.state_dict(), path)
    ckpt = load_checkpoint(path, {"num_heads": 4, "pre_norm": True, "act": "gelu"})
    assert ckpt.config.final_norm == "token" and ckpt.config.mlp_dim == (128, 128)
    _same_logits(reference, ckpt.model)


def test_the_readmes_key_map_is_the_one_tested():
    """The README's [model] example loads the home-written ViT above: it is parsed from there, not copied."""
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text[text.index("[model]  # transformer.N.attn"):]
    model = tomllib.loads(block[: block.index("```")])["model"]
    assert model["key_map"] == HOME_KEY_MAP and (model["num_heads"], model["pre_norm"], model["act"]) == (4, True, "gelu")


# ------------------------------------------------------------------------------------------- Hugging Face DINOv2
def _hf_dinov2(tmp_path, *, classifier: bool = True):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e .[test]")
    config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                       patch_size=8, num_labels=10, layerscale_value=0.5)
    torch.manual_seed(0)
    model = (transformers.Dinov2ForImageClassification if classifier else transformers.Dinov2Model)(config).eval()
    with torch.no_grad():  # LayerScale and the tokens away from their initial values, so that a lost one shows
        for name, param in model.named_parameters():
            if name.endswith(("lambda1", "cls_token", "position_embeddings")):
                param.add_(torch.randn_like(param) * 0.3)
    path = tmp_path / ("dinov2" if classifier else "dinov2-backbone")
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 36},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    return model, path


def test_hugging_face_dinov2_matches_transformers_at_its_size_and_another(tmp_path):
    model, path = _hf_dinov2(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.config.pool == "cls_mean" and ckpt.config.layer_scale_init == 1.0 and ckpt.preprocess.crop_size == 32
    _same_logits(HFLogits(model), ckpt.model)
    # resampled once at import to the size asked for, as DINOv2 resamples its grid for every input of that size
    small = load_checkpoint(path, {"image_size": 16})
    assert small.config.image_size == 16 and small.preprocess.crop_size == 16
    _same_logits(HFLogits(model), small.model, size=16)


def test_a_dinov2_backbone_needs_its_classes_and_gets_a_new_head(tmp_path):
    _, path = _hf_dinov2(tmp_path, classifier=False)
    with pytest.raises(CheckpointError, match=r"backbone without a classifier; give the classes it will learn "
                                              r"\(--set model.num_classes=N\)"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, {"num_classes": 7})
    assert ckpt.model.head.weight.shape == (7, 128)  # the class token beside the mean patch token


@pytest.mark.parametrize("switches", [
    {"pos_embed_prefix": False},  # timm no_embed_class (DeiT III)
    {"reg_tokens": 4, "pos_embed_prefix": False, "layer_scale_init": 1e-5},  # timm's DINOv2 with registers
    {"blocks_pre_norm": True, "patch_bias": False},  # timm's CLIP ViTs: norm_pre, a bias-free patch projection
    {"class_token": False, "pool": "mean", "pos_embed_prefix": False},
])
def test_timm_switches_are_read_from_the_state_dict(tmp_path, switches):
    """Each switch of timm's VisionTransformer that the canonical ViT has is found in a state dict by its keys
    and shapes alone; the real timm models are checked in tests/interop (a second environment in CI)."""
    from compress.model.vit import ViTConfig, VisionTransformer

    from tests.conftest import TINY

    torch.manual_seed(0)
    reference = VisionTransformer(ViTConfig(**(TINY | switches))).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(("_token", "pos_embed", "gamma")) or "norm_pre" in name:
                param.add_(torch.randn_like(param) * 0.3)
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_checkpoint(path, {"num_heads": 4})
    for key, value in switches.items():
        if key == "layer_scale_init":  # an initial value only: the weights hold LayerScale itself
            assert loaded.config.layer_scale_init is not None
        elif key != "pos_embed_prefix" or loaded.config.num_prefix_tokens:  # without a prefix, the two are one
            assert getattr(loaded.config, key) == value, key
    _same_logits(reference, loaded.model)
