"""The real timm and vit-pytorch, not imitations of them: their randomly initialised models' state dicts, and
their ONNX exports, go through our import and give their logits.

They need torchvision, which does not import beside the main environment's torch 2.13.0, so ``.ci/run`` builds a
second environment (torch 2.14.1, torchvision 0.29.1, timm, vit-pytorch) and runs this folder there; elsewhere the
tests skip, saying so.
"""

import pytest
import torch

from compress.errors import CheckpointError
from compress.model.importers import load_checkpoint

timm = pytest.importorskip("timm", reason="timm is not installed here: .ci/run tests it in a second environment "
                                          "(torch 2.14.1, torchvision 0.29.1, timm, vit-pytorch)")

# Every timm ViT that is a plain ViT with switches: class/distillation/register tokens, a position embedding with
# or without them, pre-norm before the blocks, a bias-free patch embedding, LayerScale, mean pooling.
TIMM_MODELS = ["vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k", "deit_small_patch16_224",
               "deit_small_distilled_patch16_224", "vit_medium_patch16_gap_256", "deit3_small_patch16_224",
               "vit_base_patch16_clip_224", "vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"]
# And those that stay out, with the reason the error gives.
TIMM_OUT = {"vit_small_patch16_18x2_224": "parallel blocks (two attention and two MLP branches side by side)"}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Parameters that start at zero or one (tokens, LayerScale, norms, the head) moved, so each one counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def _same(reference: torch.nn.Module, imported: torch.nn.Module, size: int) -> float:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = reference(x), imported.eval()(x)
    diff = float((ref - got).abs().max())
    assert diff <= 1e-5 * max(1.0, float(ref.abs().max())), f"max |logit diff| {diff:.2e}"
    return diff


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_import_to_timms_logits(tmp_path, name):
    model = _perturbed(timm.create_model(name, pretrained=False, num_classes=10))
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    # What the weights cannot say is given, as a user gives it: the head count, and LayerNorm's epsilon (1e-5 in
    # the CLIP models, 1e-6 in the others)
    overrides = {"num_heads": model.blocks[0].attn.num_heads, "image_size": size, "norm_eps": model.blocks[0].norm1.eps}
    if getattr(model, "global_pool", "token") == "avg":
        overrides["pool"] = "mean"
    ckpt = load_checkpoint(path, overrides)
    _same(model, ckpt.model, size)


@pytest.mark.parametrize("name", list(TIMM_OUT))
def test_timm_models_that_stay_out_say_so_in_one_line(tmp_path, name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, {"num_heads": 6})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_imports_to_its_logits(tmp_path, pool):
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed here")
    model = _perturbed(vit_pytorch.ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4,
                                       mlp_dim=128, pool=pool))
    path = tmp_path / "vp.pt"
    torch.save(model.state_dict(), path)
    _same(model, load_checkpoint(path, {"num_heads": 4} | ({"pool": "mean"} if pool == "mean" else {})).model, 32)


# ------------------------------------------------------------------------------------------ their ONNX exports
# timm's switches, each in a two-block model small enough to export in a second: the ViT is lifted out of the
# graph (compress.model.onnx_lift) and gives timm's logits
TIMM_ONNX = ["vit_small_patch16_224", "deit_small_distilled_patch16_224", "vit_medium_patch16_gap_256",
             "deit3_small_patch16_224", "vit_base_patch16_clip_224", "vit_small_patch14_reg4_dinov2"]


def _export(model: torch.nn.Module, path, size: int, opset: int = 17):
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


@pytest.mark.parametrize("name", TIMM_ONNX)
def test_timm_onnx_exports_lift_to_timms_logits(tmp_path, name):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here")
    from compress.model.onnx_lift import lift_onnx

    patch = 14 if "patch14" in name else 16
    size = 4 * patch
    model = _perturbed(timm.create_model(name, pretrained=False, num_classes=10, depth=2, img_size=size))
    lifted, _ = lift_onnx(_export(model, tmp_path / "m.onnx", size), atol=1e-5)
    _same(model, lifted, size)


def test_vit_pytorch_onnx_export_lifts_to_its_logits(tmp_path):
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed here")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here")
    from compress.model.onnx_lift import lift_onnx

    model = _perturbed(vit_pytorch.ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4,
                                       mlp_dim=128))
    lifted, _ = lift_onnx(_export(model, tmp_path / "vp.onnx", 32, opset=14), atol=1e-5)
    _same(model, lifted, 32)
