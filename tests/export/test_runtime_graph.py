"""The OpenVINO-shaped export (compress.model.runtime_graph): the same numbers, the graph the issue asks for, and the
names quantization and its exclusions rely on."""

import collections

import numpy as np
import onnx
import pytest
import torch

from compress.config import export_graph, load_config
from compress.model.runtime_graph import ProjectedAttention, for_runtime
from compress.model.vit import LayerScale, ViTConfig, VisionTransformer
from compress.quantize.base import layer_matches
from compress.tokens import apply, evit, tome
from export.onnx_export import export_onnx

SMALL = dict(image_size=32, patch_size=8, embed_dim=64, depth=3, num_classes=10, layer_scale_init=1e-2)


def _model(**changes) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**(SMALL | changes))).eval()
    for m in model.modules():  # LayerScale away from its constant init, so a wrong fold shows
        if isinstance(m, LayerScale):
            m.gamma.data.uniform_(0.2, 2.0)
    return model


CASES = {
    "layer scale, qkv bias": dict(num_heads=4),
    "pruned: heads and widths per layer": dict(num_heads=(4, 2, 1), head_dim=16, mlp_dim=(128, 64, 32)),
    "post-norm, no qkv bias, no layer scale": dict(num_heads=4, pre_norm=False, qkv_bias=False, layer_scale_init=None),
    "DINOv2 head (class and mean token)": dict(num_heads=4, pool="cls_mean"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("plan", ["none", "tome", "evit"])
def test_openvino_form_computes_what_the_model_does(case, plan):
    model = _model(**CASES[case])
    if plan == "tome":
        apply(model, tome([3, 2, 0], model.config.depth))
    elif plan == "evit":
        apply(model, evit(0.5, model.config.depth, [1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = for_runtime(model, "openvino")(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert not any(isinstance(b.attn, ProjectedAttention) for b in model.blocks)
    assert for_runtime(model, "standard") is model


def test_openvino_form_has_three_projections_and_no_layer_scale():
    shaped = for_runtime(_model(num_heads=4), "openvino")
    names = {n for n, _ in shaped.named_modules()}
    assert {"blocks.0.attn.qkv.q", "blocks.0.attn.qkv.k", "blocks.0.attn.qkv.v"} <= names
    assert not any(isinstance(m, LayerScale) for m in shaped.modules())
    with pytest.raises(ValueError, match="unknown export graph"):
        for_runtime(shaped, "tensorrt")


@pytest.mark.slow
def test_openvino_form_exports_an_einsum_and_openvino_runs_it(tmp_path):
    from compress.run.measure import openvino_parity

    model = apply(_model(num_heads=(4, 2, 1), head_dim=16), tome([3, 2, 0], 3))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    shaped = for_runtime(model, "openvino")
    result = export_onnx(shaped, tmp_path / "ov.onnx", example=torch.from_numpy(x[:2]), parity_inputs=x, atol=1e-4)
    proto = onnx.load(result.path)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Einsum"] == 3 and ops["Split"] == 0 and ops["Mul"] >= 3  # one per block, no split qkv, scale
    named = {n.name for n in proto.graph.node if n.op_type == "MatMul"}
    assert {f"blocks.{i}.attn.qkv.{p}" for i in range(3) for p in "qkv"} <= named
    # OpenVINO (FP32) against the user's own model, not just the rewritten copy
    assert openvino_parity(result.path, model, x, atol=1e-4, threads=2) < 1e-4
    standard = export_onnx(model, tmp_path / "std.onnx", example=torch.from_numpy(x[:2]), parity_inputs=x, atol=1e-4)
    assert collections.Counter(n.op_type for n in onnx.load(standard.path).graph.node)["Einsum"] == 0


def test_a_fused_qkv_name_covers_its_three_projections():
    assert layer_matches("blocks.0.attn.qkv.k", "blocks.0.attn.qkv")
    assert layer_matches("blocks.0.attn.qkv", "blocks.0.attn.qkv")
    assert layer_matches("blocks.11.mlp.fc1", "blocks.11.*")
    assert not layer_matches("blocks.0.attn.qkv_extra", "blocks.0.attn.qkv")
    assert not layer_matches("blocks.10.attn.proj", "blocks.1")


def test_auto_takes_the_first_runtime_that_runs_onnx_files():
    assert export_graph(load_config()) == "standard"  # torch, then ONNX Runtime
    assert export_graph(load_config(overrides=['measure.runtimes=["torch", "openvino", "onnxruntime"]'])) == "openvino"
    assert export_graph(load_config(overrides=['measure.runtimes=["openvino"]', "export.graph=standard"])) == "standard"
    chosen = load_config(overrides=['measure.runtimes=["onnxruntime"]', "export.graph=openvino"])
    assert export_graph(chosen) == "openvino"
    assert export_graph(load_config("cpu-training-free")) == "openvino"
    assert export_graph(load_config("jetson-latency")) == "standard"  # TensorRT's parser gets the MatMul form
