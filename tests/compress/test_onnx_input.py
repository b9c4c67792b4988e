"""A model that exists only as an ONNX file goes through the ONNX-level stages exactly as a checkpoint's export."""

import json

import onnx
import pytest
from onnx import TensorProto, helper

from compress.config import load_config
from compress.deploy.runner import verify
from compress.errors import CheckpointError, ConfigError
from compress.model.onnx_model import load_onnx
from compress.run.pipeline import run_pipeline

DIGITS = ["data.path='builtin:digits'", "data.calib_size=64", "measure.iterations=5", "measure.max_seconds=0.5",
          "measure.warmup=1", "measure.batch_sizes=[1]", 'measure.runtimes=["onnxruntime", "openvino"]',
          'quantize.quantizers=["onnxruntime-static"]']
MEAN_STD = ["preprocess.mean=[0.5]", "preprocess.std=[0.5]"]  # the digits model's, which an ONNX file does not record


@pytest.fixture(scope="module")
def checkpoint_run(digits_model, tmp_path_factory):
    """The digits checkpoint through baseline and quantize: its baseline ONNX is the file a user would have."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    config = load_config(None, [*DIGITS, 'pipeline.stages=["quantize"]'])
    result = run_pipeline(digits_model, "digits", config, run)
    return run, result


def _top1(records, stage, runtime, candidate=None):
    return next(r.top1 for r in records if r.stage == stage and r.runtime == runtime and r.candidate == candidate
                and r.status == "ok")


@pytest.mark.slow
def test_an_onnx_file_gives_the_checkpoints_records_and_a_bundle(checkpoint_run, tmp_path):
    ckpt_run, ckpt_result = checkpoint_run
    source = next((ckpt_run / "artifacts").glob("baseline-*.onnx"))
    config = load_config(None, [*DIGITS, *MEAN_STD, 'pipeline.stages=["quantize", "deploy"]'])
    model = load_onnx(source, config)
    assert (model.preprocess.crop_size, model.preprocess.in_chans, model.num_classes) == (8, 1, 10)
    result = run_pipeline(model, "digits-onnx", config, tmp_path / "run")
    records = result.records
    for runtime in ("onnxruntime", "openvino"):  # the same file, the same images: the same top-1
        assert _top1(records, "baseline", runtime) == _top1(ckpt_result.records, "baseline", runtime)
    assert _top1(records, "quantize", "onnxruntime", "ort-static-minmax") == \
        _top1(ckpt_result.records, "quantize", "onnxruntime", "ort-static-minmax")
    assert all(r.status == "skipped" and "ONNX model only" in r.reason for r in records if r.runtime == "torch")
    chain = json.loads((tmp_path / "run" / "stages" / "pipeline.json").read_text())
    manifest = verify(tmp_path / "run" / chain["bundle"])
    assert manifest["preprocess"]["mean"] == [0.5] and len(manifest["classes"]) == 10
    assert manifest["selected"]["top1"] == chain["selected"]["top1"]
    again = run_pipeline(load_onnx(source, config), "digits-onnx", config, tmp_path / "run")
    assert again.resumed_stages == ["baseline", "quantize", "deploy"]


@pytest.mark.slow
def test_a_quantized_onnx_file_is_measured_as_it_is(checkpoint_run, tmp_path):
    ckpt_run, ckpt_result = checkpoint_run
    qdq = next((ckpt_run / "artifacts").glob("quantize-*/ort-static-minmax.onnx"))
    config = load_config(None, [*DIGITS, *MEAN_STD])
    model = load_onnx(qdq, config)
    assert model.has_qdq
    result = run_pipeline(model, "digits-qdq", config, tmp_path / "run")
    assert {r.stage for r in result.records} == {"baseline"}  # not quantized again
    ort = [r for r in result.records if r.runtime == "onnxruntime"]
    assert [r.precision for r in ort] == ["int8"]
    assert ort[0].top1 == _top1(ckpt_result.records, "quantize", "onnxruntime", "ort-static-minmax")


def test_what_an_onnx_file_cannot_say_must_be_given(tmp_path):
    path = _classifier(tmp_path / "m.onnx", dims=["N", 3, 16, 16])
    with pytest.raises(ConfigError, match=r"m.onnx records no normalisation, so preprocess.mean and std must be "
                                          r"given \(for ImageNet-trained models: --set 'preprocess.mean="):
        load_onnx(path, load_config(None, []))
    dynamic = _classifier(tmp_path / "d.onnx", dims=["N", 3, "H", "W"])
    with pytest.raises(ConfigError, match=r"input size is not fixed \(\(N, 3, H, W\)\); .*preprocess.crop_size=224"):
        load_onnx(dynamic, load_config(None, ["preprocess.mean=[0.5,0.5,0.5]", "preprocess.std=[0.5,0.5,0.5]"]))
    model = load_onnx(dynamic, load_config(None, ["preprocess.mean=[0.5,0.5,0.5]", "preprocess.std=[0.5,0.5,0.5]",
                                                  "preprocess.crop_size=16"]))
    assert model.preprocess.crop_size == 16 and model.classes == ["0", "1", "2", "3"]


def test_files_that_are_not_image_classifiers_are_one_line(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    with pytest.raises(CheckpointError, match="junk.onnx is not an ONNX model"):
        load_onnx(junk, load_config(None, []))
    flat = _classifier(tmp_path / "flat.onnx", dims=[1, 48])
    with pytest.raises(CheckpointError, match=r"input 'x' has shape \(1, 48\); an image classifier takes"):
        load_onnx(flat, load_config(None, []))


@pytest.mark.slow
def test_an_onnx_export_is_lifted_for_the_stages_that_need_pytorch(checkpoint_run, tmp_path):
    """The digits ViT's ONNX export, run with a pruning stage: the ViT is lifted out of it and every stage runs,
    with the baseline's top-1 the checkpoint's on every runtime."""
    ckpt_run, ckpt_result = checkpoint_run
    source = next((ckpt_run / "artifacts").glob("baseline-*.onnx"))
    config = load_config(None, [*DIGITS, *MEAN_STD, 'pipeline.stages=["prune"]', "prune.heads=0.25"])
    result = run_pipeline(load_onnx(source, config), "digits-onnx", config, tmp_path / "run")
    assert {r.stage for r in result.records} == {"baseline", "prune"}
    for runtime in ("onnxruntime", "openvino"):
        assert _top1(result.records, "baseline", runtime) == _top1(ckpt_result.records, "baseline", runtime)
    assert not any("ONNX model only" in (r.reason or "") for r in result.records)  # a PyTorch module, lifted


def test_a_graph_no_vit_can_be_lifted_from_takes_the_onnx_stages(tmp_path, caplog):
    """A pruning stage on a graph that is no ViT: skipped with one line naming why, and the quantizer still runs."""
    path = _classifier(tmp_path / "m.onnx", dims=["N", 1, 8, 8], classes=10)
    config = load_config(None, [*DIGITS, *MEAN_STD, 'pipeline.stages=["prune", "quantize"]', "prune.heads=0.25"])
    with caplog.at_level("WARNING"):
        result = run_pipeline(load_onnx(path, config), "m", config, tmp_path / "run")
    assert {r.stage for r in result.records} == {"baseline", "quantize"}
    line = next(r.getMessage() for r in caplog.records if "no ViT could be lifted" in r.getMessage())
    assert "(patch embedding: the image is reshaped to (1, 64), not cut into" in line
    assert "the stages that need the PyTorch module (prune) are skipped" in line
    chain = json.loads((tmp_path / "run" / "stages" / "pipeline.json").read_text())
    assert chain["stages"] == ["quantize"]  # the chain judges what ran, not a skipped prune as over budget


def _classifier(path, *, dims, classes=4):
    """A tiny ONNX graph: Flatten then MatMul to logits (or a 2-D input, which no image classifier takes)."""
    fixed = all(isinstance(d, int) for d in dims[1:])
    features = 48 if len(dims) == 2 else dims[1] * dims[2] * dims[3] if fixed else 3 * 16 * 16
    w = helper.make_tensor("w", TensorProto.FLOAT, (features, classes), [0.01] * (features * classes))
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims[0], classes])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_graphs_onnx_runtime_cannot_take_are_one_line(tmp_path):
    """A byte input, and an op no runtime knows: refused when the file is read, not mid-run."""
    config = load_config(None, ["preprocess.mean=[0.5,0.5,0.5]", "preprocess.std=[0.5,0.5,0.5]"])
    w = helper.make_tensor("w", TensorProto.FLOAT, (768, 4), [0.01] * 3072)
    cast = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["xf"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["logits"])]
    graph = helper.make_graph(cast, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "bytes.onnx"))
    with pytest.raises(CheckpointError, match="bytes.onnx takes uint8 images; .* float32 input"):
        load_onnx(tmp_path / "bytes.onnx", config)
    odd = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Mystery", ["f"], ["g"], domain="ex"),
           helper.make_node("MatMul", ["g", "w"], ["logits"])]
    graph = helper.make_graph(odd, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ex", 1)])
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot run odd.onnx: ") as error:
        load_onnx(tmp_path / "odd.onnx", config)
    assert "\n" not in str(error.value)
    fixed = _classifier(tmp_path / "fixed.onnx", dims=[1, 3, 16, 16])
    with pytest.raises(CheckpointError, match="fixed.onnx takes batches of exactly 1 image.*dynamic batch axis"):
        load_onnx(fixed, config)


@pytest.mark.slow
def test_weights_in_external_data_files_travel_into_the_run(tmp_path):
    """A file saved with its weights beside it (as large exports are): the run keeps a copy that stands alone."""
    (tmp_path / "src").mkdir()
    path = _classifier(tmp_path / "src" / "m.onnx", dims=["N", 3, 16, 16])
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.weights",
              size_threshold=0)
    config = load_config(None, ["preprocess.mean=[0.5,0.5,0.5]", "preprocess.std=[0.5,0.5,0.5]",
                                "preprocess.crop_size=16", "data.path='builtin:digits'", "data.calib_size=64",
                                "measure.iterations=3", "measure.max_seconds=0.3", "measure.warmup=1",
                                "measure.batch_sizes=[1]", 'measure.runtimes=["onnxruntime"]', "quantize.enabled=false"])
    # digits are 8x8 grey images: the 3x16x16 input takes them resized and as three channels is not the point here;
    # what matters is that the run's copy of the file loads without the weights file beside it.
    config = config.model_copy(update={"data": config.data.model_copy(update={"path": _rgb_folder(tmp_path)})})
    result = run_pipeline(load_onnx(path, config), "external", config, tmp_path / "run")
    copy = next((tmp_path / "run" / "artifacts").glob("baseline-*.onnx"))
    assert not list((tmp_path / "run" / "artifacts").glob("*.weights"))
    weights = onnx.load(str(copy), load_external_data=False).graph.initializer[0]  # inside the copy, not beside it
    assert weights.data_location != TensorProto.EXTERNAL and onnx.numpy_helper.to_array(weights).size == 768 * 4
    assert any(r.status == "ok" and r.runtime == "onnxruntime" for r in result.records)


def _rgb_folder(tmp_path):
    from tests.conftest import write_digit_folder

    return str(write_digit_folder(tmp_path / "data", per_class=8, classes=4, size=16))
