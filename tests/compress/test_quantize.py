"""Quantizers on a real trained model (the demo ViT on digits), run by the real libraries.

Tolerances: an INT8 model's logits differ from FP32 by quantization noise, so "close" here means a relative
logit error ||q - f|| / ||f|| under 10% and top-1 agreement of at least 95% on 128 held-out digits.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibration.calibrate import from_split
from calibration.datasets import Subset, digits_source, make_splits
from calibration.evaluate import evaluate_top1
from compress.quantize.base import QuantizeContext, QuantizeError, artifact_evaluator, require, target_layers
from compress.quantize.budget import fit_budget
from compress.quantize.onnxruntime_ptq import quantize_dynamic_int8, quantize_static_qdq
from compress.quantize.qdq import QdqGraph, canonicalize, quantized_layers, tensorrt_violations
from export.onnx_export import export_onnx
from runtimes import get_runtime


@pytest.fixture(scope="module")
def setup(digits_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("quantize")
    source = digits_source()
    splits = make_splits(source, calib_size=128, seed=0)
    eval_data = Subset(source, np.sort(splits.eval)[:128], digits_model.preprocess)  # the 128 these tests were set on
    calib = from_split(Subset(source, splits.calib, digits_model.preprocess), 64, (1, 8, 8))
    example = next(eval_data.batches(16))[0]
    onnx_path = work / "float.onnx"
    export_onnx(digits_model.model, onnx_path, example=torch.from_numpy(example[:2]), parity_inputs=example)
    return digits_model, onnx_path, calib, eval_data, work


def _ctx(setup, **kw) -> QuantizeContext:
    ckpt, onnx_path, calib, eval_data, work = setup

    evaluate = artifact_evaluator(eval_data, threads=2)
    reference = evaluate(onnx_path, "onnx", "fp32")
    options = dict(model=ckpt.model, float_onnx=onnx_path, calib=calib, evaluate=evaluate, reference_top1=reference,
                   max_drop=1.0, workdir=work, threads=2, log=lambda m: None)
    return QuantizeContext(**(options | kw))


def _openvino_int8_layers(path: Path) -> int:
    """How many FullyConnected/Convolution layers OpenVINO really runs in i8/u8 for this model."""
    engine = get_runtime("openvino").build(path, precision="int8", threads=1)
    counts = engine.executed_precisions((1, 1, 8, 8))
    return sum(n for kind in ("FullyConnected", "Convolution") for p, n in counts.get(kind, {}).items()
               if p in ("i8", "u8"))


def _logits(runtime: str, path: Path, x: np.ndarray, precision: str = "int8") -> np.ndarray:
    return get_runtime(runtime).build(path, precision=precision, threads=2).run(x)


def test_static_qdq_runs_in_onnxruntime_and_openvino_close_to_fp32(setup):
    ctx = _ctx(setup)
    candidate, ranking = quantize_static_qdq(ctx)
    x = next(setup[3].batches(128))[0]
    reference = _logits("onnxruntime", ctx.float_onnx, x, "fp32")
    for runtime in ("onnxruntime", "openvino"):
        got = _logits(runtime, candidate.path, x)
        assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.10, runtime
        assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.95, runtime
    assert _openvino_int8_layers(candidate.path) == len(quantized_layers(onnx.load(str(candidate.path))))
    assert candidate.calibration == {"method": "minmax", "size": 64, "source": "split:calib[64]"}
    assert candidate.float_layers == () and ctx.within_budget(candidate.top1)
    assert [name for name, _ in ranking] and all(v >= 0 for _, v in ranking)


def test_qdq_graph_is_what_tensorrt_explicit_quantization_reads(setup):
    candidate, _ = quantize_static_qdq(_ctx(setup))
    proto = onnx.load(str(candidate.path))
    layers = {layer.name: layer for layer in quantized_layers(proto)}
    # the default op set: every Linear and the patch embedding, named after their modules; nothing else
    linear = {n for n, m in setup[0].model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(layers) == linear
    assert layers["patch_embed.proj"].weight_axis == 0 and layers["blocks.0.mlp.fc1"].weight_axis == 1
    assert all(layer.act_zero_point == 0 and layer.act_signed for layer in layers.values())
    assert tensorrt_violations(proto) == []
    consumers = {n.op_type for n in proto.graph.node for i in n.input
                 if any(d.output[0] == i and d.op_type == "DequantizeLinear" for d in proto.graph.node)}
    assert consumers <= {"MatMul", "Gemm", "Conv", "Shape"}  # LayerNorm, Softmax, GELU, Add stay float


def test_uint8_activations_are_flagged_for_tensorrt(setup):
    candidate, _ = quantize_static_qdq(_ctx(setup, activations="uint8"))
    assert any("zero point" in p for p in tensorrt_violations(onnx.load(str(candidate.path))))


def _with_outlier(model: torch.nn.Module) -> torch.nn.Module:
    """The same function with one residual-stream channel 300x larger going into blocks.0.mlp.fc1.

    Real ViTs have such outlier channels (|x| ~ 1400: NVIDIA/TensorRT#4084); per-tensor INT8 on fc1's input then
    rounds every other channel to zero, so this layer becomes by far the most sensitive.
    """
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        block = model.blocks[0]
        block.norm2.weight[0] *= 300
        block.norm2.bias[0] *= 300
        block.mlp.fc1.weight[:, 0] /= 300
    return model


@pytest.mark.slow
def test_budget_returns_the_most_sensitive_layers_to_float(setup, tmp_path):
    _, onnx_path = _outlier_setup(setup, tmp_path)
    # 1 pt, not 0: with fc1 back in float the other layers' INT8 noise may still flip one of the 128 images
    # (0.78 pt; it does with onnxruntime 1.32), while the outlier alone costs ~10 pt
    ctx = _ctx(setup, float_onnx=onnx_path, max_drop=1.0, workdir=tmp_path)
    candidate, ranking = quantize_static_qdq(ctx)
    assert ranking[0][0] == "blocks.0.mlp.fc1"
    assert candidate is not None and ctx.within_budget(candidate.top1)
    assert candidate.float_layers and candidate.float_layers[0]["name"] == "blocks.0.mlp.fc1"
    assert "sensitivity rank 1" in candidate.float_layers[0]["reason"]
    in_int8 = {layer.name for layer in quantized_layers(onnx.load(str(candidate.path)))}
    assert "blocks.0.mlp.fc1" not in in_int8 and "blocks.1.mlp.fc1" in in_int8


def test_fit_budget_bisects_to_the_smallest_prefix():
    ranking = [(f"l{i}", 1.0 / (i + 1)) for i in range(10)]
    calls = []

    def evaluate(k: int) -> float:
        calls.append(k)
        return 0.90 if k >= 5 else 0.80  # five layers in float are needed

    result = fit_budget(lambda names: len(names), evaluate, ranking, reference_top1=0.90, max_drop=0.5,
                        first_top1=0.80, log=lambda m: None)
    assert result.artifact == 5 and [d["name"] for d in result.float_layers] == ["l0", "l1", "l2", "l3", "l4"]
    assert calls == [1, 2, 4, 8, 6, 5]
    never = fit_budget(lambda names: len(names), lambda k: 0.5, ranking, reference_top1=0.9, max_drop=0.5,
                       first_top1=0.5, log=lambda m: None)
    assert never.artifact is None and never.float_layers == ()


def test_exclusions_by_name_and_pattern(setup):
    ctx = _ctx(setup, exclude=("head", "blocks.1.*"))
    targets, excluded = target_layers(onnx.load(str(ctx.float_onnx)), ctx)
    assert "head" in excluded and "blocks.1.mlp.fc2" in excluded and "blocks.0.mlp.fc2" in targets
    candidate, _ = quantize_static_qdq(ctx)
    assert {"name": "head", "reason": "excluded by quantize.exclude"} in candidate.float_layers
    assert "head" not in {layer.name for layer in quantized_layers(onnx.load(str(candidate.path)))}
    with pytest.raises(QuantizeError, match="match no layer"):
        target_layers(onnx.load(str(ctx.float_onnx)), _ctx(setup, exclude=("blocks.99.*",)))


def test_dynamic_candidate_runs_in_onnxruntime(setup):
    ctx = _ctx(setup)
    candidate = quantize_dynamic_int8(ctx)
    ops = {n.op_type for n in onnx.load(str(candidate.path)).graph.node}
    assert "DynamicQuantizeLinear" in ops and candidate.calibration["size"] == 0
    assert ctx.within_budget(candidate.top1)


def test_nncf_on_openvino(setup):
    pytest.importorskip("nncf", reason="nncf is not installed (pip install nncf)")
    from compress.quantize.openvino_nncf import quantize_openvino

    ctx = _ctx(setup)
    candidate = quantize_openvino(ctx)
    assert candidate.path.suffix == ".xml" and candidate.path.with_suffix(".bin").exists()
    x = next(setup[3].batches(128))[0]
    reference = _logits("onnxruntime", ctx.float_onnx, x, "fp32")
    got = _logits("openvino", candidate.path, x)
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.95


@pytest.mark.slow
def test_nncf_without_smooth_quant_drops_its_multiplies(setup, tmp_path):
    pytest.importorskip("nncf", reason="nncf is not installed (pip install nncf)")
    import openvino as ov

    from compress.quantize.openvino_nncf import quantize_openvino

    def smoothing_ops(path: Path) -> int:
        return sum("smooth_quant" in op.get_friendly_name() for op in ov.Core().read_model(str(path)).get_ops())

    # What is tested is the graph and its agreement; the budget is wide so that two flipped images of 128 (1.56 pt,
    # as measured on 2026-11-30) do not turn the candidate away
    with_sq = quantize_openvino(_ctx(setup, workdir=tmp_path / "sq", max_drop=5.0))
    without = quantize_openvino(_ctx(setup, workdir=tmp_path / "plain", nncf_smooth_quant=False, max_drop=5.0))
    assert smoothing_ops(with_sq.path) > 0 and smoothing_ops(without.path) == 0
    assert without.calibration["method"].endswith("no SmoothQuant)")
    x = next(setup[3].batches(128))[0]
    reference = _logits("onnxruntime", setup[1], x, "fp32")
    assert np.mean(_logits("openvino", without.path, x).argmax(1) == reference.argmax(1)) >= 0.95


@pytest.mark.slow
def test_neural_compressor_pt2e_exports_canonical_qdq(setup):
    pytest.importorskip("neural_compressor.torch.quantization", reason="neural-compressor-pt is not installed")
    from compress.quantize.neural_compressor_pt2e import quantize_pt2e

    ckpt, _, _, eval_data, _ = setup
    ctx = _ctx(setup)
    candidate = quantize_pt2e(ctx, lambda m: evaluate_top1(lambda x: m(torch.from_numpy(x)).detach().numpy(),
                                                           eval_data).top1)
    proto = onnx.load(str(candidate.path))
    assert len(quantized_layers(proto)) == 1 + 4 * len(ckpt.model.blocks) + 1  # patch embed, 4 per block, head
    assert tensorrt_violations(proto) == []
    assert not any(n.op_type == "Clip" for n in proto.graph.node)  # PT2E's weight Clip folded into INT8 weights
    weight_dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    scales = [name for n in weight_dqs for name in n.input[1:]]
    assert len(scales) == len(set(scales))  # no scale or zero point shared between layers (OpenVINO needs that)
    assert _openvino_int8_layers(candidate.path) == len(quantized_layers(proto))
    x = next(eval_data.batches(128))[0]
    reference = _logits("onnxruntime", ctx.float_onnx, x, "fp32")
    for runtime in ("onnxruntime", "openvino"):
        assert np.mean(_logits(runtime, candidate.path, x).argmax(1) == reference.argmax(1)) >= 0.95, runtime


def test_fp16_keeps_layernorm_fused_in_float32(setup):
    from compress.quantize.fp16 import convert_fp16

    ctx = _ctx(setup)
    candidate = convert_fp16(ctx)
    proto = onnx.load(str(candidate.path))
    norms = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * len(setup[0].model.blocks) + 1
    fp16_inits = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_inits and all(
        next(i for i in proto.graph.initializer if i.name == n.input[1]).data_type == onnx.TensorProto.FLOAT
        for n in norms if any(i.name == n.input[1] for i in proto.graph.initializer))
    x = next(setup[3].batches(64))[0]
    reference = _logits("onnxruntime", ctx.float_onnx, x, "fp32")
    assert np.abs(_logits("onnxruntime", candidate.path, x, "fp16") - reference).max() < 5e-2


def test_missing_quantizer_library_names_the_package():
    with pytest.raises(QuantizeError, match="pip install not-a-real-package"):
        require("not_a_real_module", "not-a-real-package")


def test_canonicalize_folds_weight_chains(setup):
    """A hand-built PT2E-style chain (float W -> Q -> Clip -> DQ -> Transpose -> MatMul) becomes INT8 W -> DQ."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)  # (out, in) as PyTorch stores it
    scale = (np.abs(w).max(1) / 127).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["fc.weight", "s", "z"], ["wq"], axis=0),
        helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"]),
        helper.make_node("DequantizeLinear", ["wc", "s", "z"], ["wd"], axis=0),
        helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="node_MatMul_1"),
    ]
    inits = [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.zeros(6, np.int8), "z"), numpy_helper.from_array(np.array(-127, np.int8), "lo"),
             numpy_helper.from_array(np.array(127, np.int8), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    result = canonicalize(proto)
    ops = [n.op_type for n in result.proto.graph.node]
    assert ops == ["DequantizeLinear", "MatMul"] and result.proto.graph.node[1].name == "fc"
    layer = quantized_layers(result.proto)[0]
    assert layer.weight_axis == 1 and np.array_equal(result.float_weights[layer.weight], w.T)
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    import onnxruntime as ort

    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    after = ort.InferenceSession(result.proto.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(before, after, atol=1e-6)
    reverted = QdqGraph(result.proto, result.float_weights).revert_to_float(["fc"])
    assert np.allclose(ort.InferenceSession(reverted.proto.SerializeToString()).run(None, {"x": x})[0], x @ w.T,
                       atol=1e-5)


def test_smoothquant_keeps_the_function_and_tames_the_outlier_channel(setup):
    from compress.quantize.smoothquant import smooth

    ckpt, _, calib, eval_data, _ = setup
    model = _with_outlier(ckpt.model)
    smoothed = smooth(model, calib, alpha=0.5)
    x = torch.from_numpy(next(eval_data.batches(64))[0])
    with torch.no_grad():
        assert torch.allclose(smoothed(x), model(x), atol=1e-4)

        def channel_spread(m):  # max over channels / median over channels of fc1's input magnitude
            seen = []
            handle = m.blocks[0].mlp.fc1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
            m(x)
            handle.remove()
            peak = seen[0].abs().amax((0, 1))
            return float(peak.max() / peak.median())

        assert channel_spread(smoothed) < channel_spread(model) / 10
    assert model.blocks[0].norm2.weight[0] > 100  # the input model is untouched


@pytest.mark.parametrize("module, package, call", [
    ("nncf", "nncf", lambda ctx: __import__("compress.quantize.openvino_nncf", fromlist=["x"]).quantize_openvino(ctx)),
    ("neural_compressor.torch.quantization", "neural-compressor-pt",
     lambda ctx: __import__("compress.quantize.neural_compressor_pt2e", fromlist=["x"]).quantize_pt2e(ctx, None)),
])
def test_quantizer_without_its_library_names_the_package(setup, monkeypatch, module, package, call):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # Python's own "not installed": import raises ImportError
    with pytest.raises(QuantizeError, match=f"pip install {package}"):
        call(_ctx(setup))


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_entropy_and_percentile_calibration(setup, method):
    ctx = _ctx(setup, calibration_method=method)
    candidate, _ = quantize_static_qdq(ctx)
    assert candidate.name == f"ort-static-{method}" and candidate.calibration["method"] == method
    assert ctx.within_budget(candidate.top1) and tensorrt_violations(onnx.load(str(candidate.path))) == []


def _outlier_setup(setup, tmp_path):
    ckpt, _, calib, eval_data, _ = setup
    model = _with_outlier(ckpt.model)
    example = next(eval_data.batches(16))[0]
    onnx_path = tmp_path / "outlier.onnx"
    export_onnx(model, onnx_path, example=torch.from_numpy(example[:2]), parity_inputs=example)
    return model, onnx_path


@pytest.mark.slow
def test_neural_compressor_autotune_runs_when_over_budget(setup, tmp_path):
    pytest.importorskip("neural_compressor.torch.quantization", reason="neural-compressor-pt is not installed")
    from compress.quantize.neural_compressor_pt2e import quantize_pt2e

    model, onnx_path = _outlier_setup(setup, tmp_path)
    eval_data = setup[3]
    scores = []

    def evaluate_torch(m):
        scores.append(evaluate_top1(lambda x: m(torch.from_numpy(x)).detach().numpy(), eval_data).top1)
        return scores[-1]

    # 1 pt: the outlier costs ~10 pt, so autotune must run; 0 pt is out of reach of any INT8 here (one image flips)
    ctx = _ctx(setup, model=model, float_onnx=onnx_path, workdir=tmp_path, max_drop=1.0, smoothquant_alpha=None,
               inc_max_trials=2)
    candidate = quantize_pt2e(ctx, evaluate_torch)
    assert len(scores) >= 3  # the first quantization, autotune's float baseline, and its trials
    assert candidate is not None and ctx.within_budget(candidate.top1)
    assert candidate.calibration["method"].startswith("autotune") and candidate.float_layers  # then the fallback


def test_nncf_accuracy_control_when_over_budget(setup, tmp_path):
    """Two calibration images give NNCF poor ranges (a 0.8 pt drop here); accuracy control must recover it."""
    pytest.importorskip("nncf", reason="nncf is not installed (pip install nncf)")
    from compress.quantize.openvino_nncf import quantize_openvino

    ckpt, _, calib, eval_data, _ = setup
    source = eval_data.source
    few = from_split(Subset(source, make_splits(source, calib_size=128, seed=0).calib, ckpt.preprocess), 2, (1, 8, 8))
    said: list[str] = []
    ctx = _ctx(setup, calib=few, workdir=tmp_path, max_drop=0.0, log=said.append)
    candidate = quantize_openvino(ctx, lambda: eval_data.batches(64), len(eval_data))
    if candidate is not None and candidate.name == "nncf-ov":
        pytest.skip("plain nncf.quantize met a zero budget here; accuracy control was not needed")
    # before it starts, the accuracy control says how long it may take and what bounds it
    assert any("quantize_with_accuracy_control: up to about" in line and "nncf_ac_max_iterations" in line
               for line in said), said
    assert candidate is not None and candidate.name == "nncf-ov-ac" and ctx.within_budget(candidate.top1)
    assert candidate.float_layers and all("quantize_with_accuracy_control" in layer["reason"]
                                          for layer in candidate.float_layers)
    assert candidate.path.name == "nncf-ov-ac.xml"


def test_with_nncf_accuracy_control_off_an_int8_model_over_budget_is_dropped_and_said(setup, tmp_path):
    pytest.importorskip("nncf", reason="nncf is not installed (pip install nncf)")
    from compress.quantize.stage import build_candidates

    ckpt, _, calib, eval_data, _ = setup
    source = eval_data.source
    few = from_split(Subset(source, make_splits(source, calib_size=128, seed=0).calib, ckpt.preprocess), 2, (1, 8, 8))
    # a budget no model meets (the config refuses one below 0; the context is made here directly)
    ctx = _ctx(setup, calib=few, workdir=tmp_path, max_drop=-100.0, nncf_accuracy_control=False)
    candidates, missed = build_candidates(ctx, ["nncf"], evaluate_torch=None, eval_batches=lambda: eval_data.batches(64),
                                          eval_count=len(eval_data), bf16_available=False)
    assert candidates == [] and len(missed) == 1
    assert re.fullmatch(r"nncf: nncf.quantize's top-1 \d+\.\d\d% is a drop of -?\d+\.\d\d pt, over the -100.00 pt "
                        r"budget, and its accuracy control is off \(quantize.nncf_accuracy_control=false\)", missed[0])
    assert not (tmp_path / "nncf-ov-ac.xml").exists()  # the accuracy control never ran


def test_static_minmax_in_small_runs_has_the_scales_of_one_run_over_the_set(setup, tmp_path):
    """Calibration folds runs of CALIB_BATCH images (for memory); MinMax must give the scales of ONNX Runtime's
    one-pass calibration (the set's own batches of 32, every run kept, ranges computed once)."""
    from compress.quantize.onnxruntime_ptq import CALIB_BATCH, run_quantize_static

    ctx = _ctx(setup)
    assert ctx.calib.size > CALIB_BATCH
    candidate, _ = quantize_static_qdq(ctx)
    float_proto = onnx.load(str(ctx.float_onnx))
    targets, _ = target_layers(float_proto, ctx)
    one_run = tmp_path / "one-run.onnx"
    run_quantize_static(ctx.float_onnx, one_run, ctx.calib, float_proto.graph.input[0].name, "minmax", ctx.op_types,
                        nodes=targets, images_per_run=ctx.calib.batch_size, strided=False)
    ours, reference = ({layer.name: layer.act_scale for layer in quantized_layers(onnx.load(str(path)))}
                       for path in (candidate.path, one_run))
    assert ours and ours == reference


def test_the_budget_is_judged_against_the_previous_stages_own_model_not_a_setting_it_tried():
    """The tokens stage records each setting it tried (``candidate`` set) before the model it chose; the quantize
    stage's reference is the chosen one, on ONNX Runtime where it was scored."""
    from compress.quantize.stage import stage_float_top1
    from compress.records import StageRecord

    tried = [StageRecord("tokens", "openvino", "fp32", 1, top1=0.756, candidate="unreduced"),
             StageRecord("tokens", "openvino", "fp32", 1, top1=0.760, candidate="resolution 140")]
    chosen = [StageRecord("tokens", "openvino", "fp32", 1, top1=0.761),
              StageRecord("tokens", "onnxruntime", "fp32", 1, top1=0.762),
              StageRecord("tokens", "openvino", "int8", 1, top1=0.70)]
    assert stage_float_top1(tried + chosen, "tokens") == 0.762
    assert stage_float_top1(tried + chosen[:1], "tokens") == 0.761
    assert stage_float_top1(tried, "tokens") is None  # then the stage scores the float model itself
