"""The TensorRT runtime: what it says where TensorRT or a GPU is missing, the checks that need neither, and, where
TensorRT imports and a CUDA GPU is visible, real engines built from the tiny ViT and compared with ONNX Runtime."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.onnx_export import INPUT_NAME, export_onnx
from runtimes import RUNTIME_NAMES, RuntimeUnavailableError, get_runtime, measure_latency
from runtimes.errors import RuntimeNotInstalledError
from runtimes.tensorrt_gpu import (
    CudaUnavailableError, EngineBuildError, EngineMismatchError, OnnxSummary, _polygraphy, batch_profile,
    build_engine, check_engine_metadata, gpu_info, inspect_onnx, load_engine, metadata_path,
    parity_against_onnxruntime, plan_network,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = "TensorRT is not installed (it ships with JetPack on Jetson; pip install tensorrt on x86 with an NVIDIA GPU)"
ATOL_FP32 = 1e-3

ORIN = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "cuda_runtime": "12.6"}


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --- without TensorRT --------------------------------------------------------------------------------------------
def test_registered_everywhere():
    assert "tensorrt" in RUNTIME_NAMES
    runtime = get_runtime("tensorrt")  # never raises: precisions()/build() say what is missing
    assert (runtime.name, runtime.input_kind, runtime.formats) == ("tensorrt", "onnx", ("onnx",))
    assert runtime.artifact_precisions == ("fp32", "fp16", "int8")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; the message for its absence cannot show")
def test_missing_tensorrt_is_one_clear_line(tmp_path):
    runtime = get_runtime("tensorrt")
    assert runtime.versions() == {}
    for call in (runtime.precisions, lambda: runtime.build(tmp_path / "m.onnx", precision="fp32", threads=1)):
        with pytest.raises(RuntimeUnavailableError) as error:
            call()
        text = _one_line(error)
        assert text.startswith("TensorRT is not installed")
        for hint in ("JetPack 6", "sudo apt install nvidia-jetpack", "python3-libnvinfer", "pip install tensorrt",
                     "built on the device that runs them"):
            assert hint in text


def test_missing_gpu_is_one_clear_line():
    if not HAS_TENSORRT:
        pytest.skip(NO_TENSORRT + "; the no-GPU message needs TensorRT to import")
    try:
        gpu_info()
        pytest.skip("a CUDA GPU is visible here; the message for its absence cannot show")
    except CudaUnavailableError:
        pass
    with pytest.raises(RuntimeUnavailableError) as error:
        get_runtime("tensorrt").precisions()
    assert "is installed but no CUDA" in _one_line(error)


def test_metadata_of_another_device_is_refused():
    check_engine_metadata(ORIN, ORIN)  # same TensorRT, GPU and compute capability: accepted
    check_engine_metadata(ORIN, ORIN | {"cuda_runtime": "12.8"})  # the CUDA runtime does not tie an engine
    cases = {"tensorrt": "10.7.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    for key, value in cases.items():
        with pytest.raises(EngineMismatchError) as error:
            check_engine_metadata(ORIN, ORIN | {key: value}, engine="vit.engine")
        text = _one_line(error)
        assert text.startswith("vit.engine built with TensorRT 10.3.0 on GPU Orin (compute capability 8.7)")
        assert value in text
        assert text.endswith("rebuild it on this device with `compress build-engine BUNDLE`")
    with pytest.raises(EngineMismatchError, match="lacks gpu, compute_capability.*compress build-engine"):
        check_engine_metadata({"tensorrt": "10.3.0"}, ORIN)


def test_load_refuses_engines_without_or_with_foreign_metadata(tmp_path):
    engine = tmp_path / "vit.engine"
    with pytest.raises(RuntimeUnavailableError, match="no TensorRT engine at"):
        load_engine(engine, current=ORIN)
    engine.write_bytes(b"serialized engine")
    with pytest.raises(EngineMismatchError, match=r"has no vit\.engine\.json.*rebuild it on this device"):
        load_engine(engine, current=ORIN)
    metadata_path(engine).write_text(json.dumps(ORIN))
    here = ORIN | {"tensorrt": "10.7.0", "gpu": "Jetson Thor", "compute_capability": "11.0"}
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0 on GPU Orin.*TensorRT 10.7.0 on Jetson"):
        load_engine(engine, current=here)  # refused before TensorRT is asked to read it


def test_batch_profile():
    assert batch_profile((-1, 3, 32, 32), 1, 4, 8) == ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    assert batch_profile((2, 3, 32, 32), 2, 2, 2) is None  # static batch: no profile needed
    for shape, batches, match in [((-1, 3, 32, 32), (2, 1, 8), "1 <= min <= opt <= max"),
                                  ((-1, 3, 32, 32), (0, 1, 8), "1 <= min <= opt <= max"),
                                  ((-1, 3, -1, -1), (1, 1, 8), "fixed image size"),
                                  ((1, 3, 32, 32), (1, 1, 8), "fixed batch of 1.*dynamic batch axis")]:
        with pytest.raises(EngineBuildError, match=match):
            batch_profile(shape, *batches)


TRT10 = dict(strong_typing=True, builder_flags=frozenset({"FP16", "INT8"}), version="10.3.0")
TRT11 = dict(strong_typing=True, builder_flags=frozenset(), version="11.0.0")
TRT86 = dict(strong_typing=False, builder_flags=frozenset({"FP16", "INT8"}), version="8.6.2")
FLOAT, HALF, QDQ = OnnxSummary(False, False), OnnxSummary(True, False), OnnxSummary(False, True)


def test_precision_comes_from_the_onnx_file():
    for trt in (TRT10, TRT11):
        plan = plan_network("fp32", FLOAT, **trt)
        assert plan.strongly_typed and plan.flags == ()
        assert plan_network("fp16", HALF, **trt).flags == ()  # an FP16 file: strongly typed, no flag
        assert plan_network("int8", QDQ, **trt).flags == ()  # Q/DQ: explicit quantization, no flag
    # TensorRT 10 can still make FP16 from a float32 file, weakly typed (FP16 is refused on typed networks)
    plan = plan_network("fp16", FLOAT, **TRT10)
    assert not plan.strongly_typed and plan.flags == ("FP16",)
    with pytest.raises(EngineBuildError, match="11.0.0 takes FP16 only from an FP16 ONNX"):
        plan_network("fp16", FLOAT, **TRT11)
    assert plan_network("int8", QDQ, **TRT86).flags == ("INT8",)  # 8.6: Q/DQ needs the flag, never a calibrator
    # a DLA core on TensorRT 10 is driven by the precision flags on a weakly typed network; on 11 by the types
    assert plan_network("fp16", HALF, dla=True, **TRT10) == plan_network("fp16", FLOAT, dla=True, **TRT10)
    assert plan_network("int8", QDQ, dla=True, **TRT10).flags == ("INT8",)
    assert plan_network("fp16", HALF, dla=True, **TRT11).strongly_typed
    for precision, onnx_kind, match in [("int8", FLOAT, "only from a Q/DQ ONNX"), ("fp32", HALF, "build it as fp16"),
                                        ("fp32", QDQ, "builds as int8"), ("fp16", QDQ, "builds as int8"),
                                        ("bf16", FLOAT, "not bf16")]:
        for dla in (False, True):
            with pytest.raises(EngineBuildError, match=match):
                plan_network(precision, onnx_kind, dla=dla, **TRT10)


def _linear_onnx(path, *, weight_type=TensorProto.FLOAT, qdq=False):
    dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[weight_type]
    weight = helper.make_tensor("w", weight_type, (4, 2), np.ones((4, 2), dtype).flatten().tolist())
    nodes, source = [], "x"
    if weight_type == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
        source = "x16"
    inits = [weight]
    if qdq:
        inits += [helper.make_tensor("s", TensorProto.FLOAT, (), [0.1]), helper.make_tensor("z", TensorProto.INT8, (), [0])]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        source = "dq"
    nodes.append(helper.make_node("MatMul", [source, "w"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4))],
                              [helper.make_tensor_value_info("y", weight_type, (1, 2))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_inspect_onnx(tmp_path):
    assert inspect_onnx(_linear_onnx(tmp_path / "f.onnx")) == FLOAT
    assert inspect_onnx(_linear_onnx(tmp_path / "h.onnx", weight_type=TensorProto.FLOAT16)) == HALF
    assert inspect_onnx(_linear_onnx(tmp_path / "q.onnx", qdq=True)) == QDQ


def test_missing_cuda_bindings_are_one_clear_line():
    if importlib.util.find_spec("cuda") is not None:
        pytest.skip("cuda-python is installed here; the message for its absence cannot show")
    with pytest.raises(CudaUnavailableError) as error:
        gpu_info()
    text = _one_line(error)
    assert text.startswith("no CUDA runtime bindings: pip install cuda-python") and "JetPack" in text
    assert isinstance(error.value, RuntimeUnavailableError)  # the CLI prints it as one line


def test_missing_polygraphy_is_one_clear_line():
    if importlib.util.find_spec("polygraphy") is not None:
        pytest.skip("Polygraphy is installed here; the message for its absence cannot show")
    with pytest.raises(RuntimeNotInstalledError) as error:
        _polygraphy()
    assert _one_line(error).endswith("pip install polygraphy")


def test_cuda_bindings_without_a_gpu():
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda-python is absent here; its absence is tested by test_missing_cuda_bindings_are_one_clear_line")
    try:
        gpu_info()
        pytest.skip("a CUDA GPU is visible here; the message for its absence cannot show")
    except CudaUnavailableError as e:
        assert str(e).startswith("no CUDA GPU is visible to this process (cudaGetDeviceCount")


# --- with TensorRT and a GPU ---------------------------------------------------------------------------------------
@pytest.fixture
def trt():
    module = pytest.importorskip("tensorrt", reason=NO_TENSORRT)
    try:
        gpu_info()
    except CudaUnavailableError as e:
        pytest.skip(f"TensorRT is installed but {e}")
    return module


@pytest.fixture
def onnx_file(tmp_path, tiny_vit):
    return export_onnx(tiny_vit, tmp_path / "m.onnx", example=torch.randn(1, 3, 32, 32)).path


@pytest.fixture
def fp16_onnx_file(onnx_file):
    """The FP16 artifact as the fp16 quantizer makes it: FP16 weights, LayerNorm in FP32, float32 inputs/outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(onnx_file)), keep_io_types=True,
                                    op_block_list=["LayerNormalization"])
    path = onnx_file.with_name("m-fp16.onnx")
    onnx.save(half, str(path))
    return path


def test_inspect_real_artifacts(onnx_file, fp16_onnx_file):
    assert inspect_onnx(onnx_file) == FLOAT  # the exported float32 ViT
    assert inspect_onnx(fp16_onnx_file) == HALF  # the fp16 quantizer's file: built strongly typed as fp16


def _inputs(n=8):
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_fp32_engine_matches_onnxruntime(trt, onnx_file, tmp_path):
    cache = tmp_path / "timing.cache"
    built = build_engine(onnx_file, tmp_path / "m.engine", precision="fp32", min_batch=1, opt_batch=4, max_batch=8,
                         timing_cache=cache)
    meta = json.loads(metadata_path(built.path).read_text())
    assert meta["tensorrt"] == trt.__version__ and meta["precision"] == "fp32"
    assert meta["batch"] == {"min": 1, "opt": 4, "max": 8} and meta["dla_core"] is None
    assert meta["gpu"] == gpu_info()["gpu"] and meta["build_seconds"] > 0 and len(meta["onnx_sha256"]) == 64
    assert cache.stat().st_size > 0
    engine = load_engine(built.path)
    x = _inputs(20)
    for batch in (8, 3, 1, 20):  # inside the profile, and above it (run in chunks)
        parity = parity_against_onnxruntime(engine, onnx_file, x[:batch], atol=ATOL_FP32)
        assert parity.ok, parity
        assert parity.agreement == 1.0


def test_the_layer_profile_adds_up_and_names_each_layers_precision(trt, onnx_file, tmp_path):
    from runtimes.profile import summarize

    engine = load_engine(build_engine(onnx_file, tmp_path / "p.engine", precision="fp32", max_batch=8).path)
    nodes = engine.profile(_inputs(1))
    assert nodes and all(n.ms >= 0 for n in nodes) and {n.precision for n in nodes} <= {"fp32", "?"}
    summary = summarize(nodes)
    assert abs(sum(summary["by_class"].values()) - summary["total_ms"]) < 1e-3
    assert summary["total_ms"] > 0  # real layer time; how it compares to the end-to-end median is not asserted


def test_fp16_engine_from_an_fp16_onnx(trt, onnx_file, fp16_onnx_file, tmp_path):
    built = build_engine(fp16_onnx_file, tmp_path / "h.engine", precision="fp16", max_batch=8)
    engine = load_engine(built.path)
    x = _inputs()
    reference_scale = max(1.0, float(np.abs(get_runtime("onnxruntime").build(onnx_file, precision="fp32",
                                                                             threads=1).run(x)).max()))
    parity = parity_against_onnxruntime(engine, onnx_file, x, atol=2e-2 * reference_scale)  # FP16: ~3 digits
    assert parity.ok, parity


def test_fp16_flag_where_tensorrt_still_has_it(trt, onnx_file, tmp_path):
    if not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in 11): FP16 comes from FP16 files")
    built = build_engine(onnx_file, tmp_path / "w.engine", precision="fp16", max_batch=8)
    assert built.metadata["builder_flags"] == ["FP16"] and not built.metadata["strongly_typed"]
    parity = parity_against_onnxruntime(load_engine(built.path), onnx_file, _inputs(), atol=5e-2)
    assert parity.ok, parity


def test_int8_engine_from_qdq(trt, onnx_file, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compress.quantize.qdq import tensorrt_violations

    x = _inputs(16)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter({INPUT_NAME: x[i:i + 1]} for i in range(len(x)))

        def get_next(self):
            return next(self.batches, None)

    qdq = tmp_path / "q.onnx"  # TensorRT-ready Q/DQ: symmetric INT8, per-channel weights, no INT32 bias
    quantize_static(str(onnx_file), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]})
    assert tensorrt_violations(onnx.load(str(qdq))) == []
    built = build_engine(qdq, tmp_path / "q.engine", precision="int8", max_batch=16)
    got = load_engine(built.path)
    reference = get_runtime("onnxruntime").build(qdq, precision="int8", threads=1).run(x)
    # both run the same INT8 graph; kernels and rounding differ, so compare at the scale of the logits
    parity = parity_against_onnxruntime(got, qdq, x, atol=0.1 * max(1.0, float(np.abs(reference).max())))
    assert parity.ok, parity


def test_runtime_builds_caches_and_measures(trt, onnx_file):
    runtime = get_runtime("tensorrt")
    assert runtime.versions() == {"tensorrt": trt.__version__}
    assert "fp32" in runtime.precisions()
    engine = runtime.build(onnx_file, precision="fp32", threads=1)
    engines = list((onnx_file.parent / "tensorrt").glob("m-fp32-*.engine"))
    assert len(engines) == 1 and metadata_path(engines[0]).is_file()
    stamp = engines[0].stat().st_mtime_ns
    runtime.build(onnx_file, precision="fp32", threads=1)  # the cached engine, not a rebuild
    assert engines[0].stat().st_mtime_ns == stamp

    x = _inputs(4)
    stats = measure_latency(engine, x, threads=1, warmup=2, iterations=10, max_seconds=5)
    assert stats.batch_size == 4 and stats.latency_ms_p50 > 0
    timed = engine.measure(x, warmup=2, iterations=20, max_seconds=5)
    assert timed["iterations"] == 20 and timed["batch_size"] == 4
    assert 0 < timed["gpu_compute_ms_p50"] <= timed["gpu_compute_ms_p90"] <= timed["gpu_compute_ms_p99"]
    assert timed["gpu_compute_ms_mean"] <= timed["latency_ms_mean"]  # end to end includes the copies
    engine.close()


def test_engine_from_another_device_is_refused_on_load(trt, onnx_file, tmp_path):
    built = build_engine(onnx_file, tmp_path / "m.engine", max_batch=2)
    meta = metadata_path(built.path)
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"tensorrt": "8.6.2", "gpu": "Orin"}))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 8.6.2 on GPU Orin.*compress build-engine"):
        load_engine(built.path)
