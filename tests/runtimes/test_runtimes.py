import time

import numpy as np
import pytest
import torch

from export.onnx_export import export_onnx
from compress.model.vit import ViTConfig, VisionTransformer
from runtimes import RUNTIME_NAMES, RuntimeUnavailableError, get_runtime, measure_latency
from tests.conftest import TINY

ATOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """The tiny ViT's ONNX, exported once: the ``tiny_vit`` fixture builds the same weights (seed 0)."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**TINY)).eval()
    return export_onnx(model, tmp_path_factory.mktemp("runtimes") / "m.onnx", example=torch.randn(1, 3, 32, 32)).path


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_fp32_engines_match_pytorch(name, onnx_file, tiny_vit):
    x = np.random.randn(5, 3, 32, 32).astype(np.float32)
    engine = get_runtime(name).build(onnx_file, precision="fp32", threads=1)
    ref = tiny_vit(torch.from_numpy(x)).detach().numpy()
    assert np.abs(engine.run(x) - ref).max() < ATOL_FP32
    assert np.abs(engine.run(x[:2]) - ref[:2]).max() < ATOL_FP32  # another batch size on the same engine


def test_openvino_bf16_where_the_cpu_has_it(onnx_file, tiny_vit):
    runtime = get_runtime("openvino")
    if "bf16" not in runtime.precisions():
        pytest.skip("this CPU has no BF16 units, so OpenVINO offers no bf16 precision")
    x = np.random.randn(4, 3, 32, 32).astype(np.float32)
    ref = tiny_vit(torch.from_numpy(x)).detach().numpy()
    got = runtime.build(onnx_file, precision="bf16", threads=1).run(x)
    # bf16 keeps 8 bits of mantissa: relative error around 1e-2 on logits of this size
    assert np.abs(got - ref).max() < 0.05 * max(1.0, np.abs(ref).max())


def test_openvino_runs_int8_models_with_its_own_default_float_precision(onnx_file):
    """What stays in float in an INT8 model runs as ``ov.compile_model`` would run it (bf16 on a CPU with AMX or
    AVX-512 BF16, f32 elsewhere), as a user of nncf.quantize gets it; FP32 stays f32 everywhere."""
    import openvino as ov

    runtime = get_runtime("openvino")
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    hints = {}
    for precision in ("int8", "fp32"):
        engine = runtime.build(onnx_file, precision=precision, threads=1)
        engine.run(np.zeros((1, 3, 32, 32), np.float32))
        hints[precision] = engine._compiled[(1, 3, 32, 32)].get_property("INFERENCE_PRECISION_HINT")
    assert hints["int8"] == default
    assert hints["fp32"] == ov.Type.f32


def test_torch_runtime(tiny_vit):
    x = np.random.randn(2, 3, 32, 32).astype(np.float32)
    engine = get_runtime("torch").build(tiny_vit, precision="fp32", threads=1)
    assert np.array_equal(engine.run(x), tiny_vit(torch.from_numpy(x)).detach().numpy())


def test_unknown_runtime_and_precision(onnx_file):
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime 'tensorflow'.*onnxruntime"):
        get_runtime("tensorflow")
    with pytest.raises(RuntimeUnavailableError, match="fp16 graphs, not int4"):
        get_runtime("onnxruntime").build(onnx_file, precision="int4", threads=1)
    assert set(RUNTIME_NAMES) >= {"torch", "onnxruntime", "openvino"}


def test_latency_statistics_are_consistent(onnx_file):
    engine = get_runtime("onnxruntime").build(onnx_file, precision="fp32", threads=1)
    start = time.perf_counter()
    stats = measure_latency(engine, np.zeros((4, 3, 32, 32), np.float32), threads=1, warmup=2, iterations=30,
                            max_seconds=5)
    wall_s = time.perf_counter() - start
    assert stats.iterations == 30 and stats.batch_size == 4 and stats.threads == 1
    # Bounds that hold however noisy the machine is, and break on a wrong unit or count: throughput counts the timed
    # calls only, so it is at least what the whole call (warm-up included) achieved and at most the fastest call's.
    images = stats.iterations * stats.batch_size
    assert images / wall_s <= stats.throughput_ips <= stats.batch_size / (stats.latency_ms_min / 1e3) * (1 + 1e-9)
    assert stats.latency_ms_mean * stats.iterations / 1e3 <= wall_s
    assert stats.peak_rss_mb > 0


def test_time_budget_stops_early(onnx_file):
    engine = get_runtime("onnxruntime").build(onnx_file, precision="fp32", threads=1)
    stats = measure_latency(engine, np.zeros((1, 3, 32, 32), np.float32), threads=1, warmup=0,
                            iterations=10**9, max_seconds=0.2, min_iterations=3)
    assert 3 <= stats.iterations < 10**9
