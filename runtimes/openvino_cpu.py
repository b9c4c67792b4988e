"""OpenVINO on the CPU, FP32 and, where the CPU has BF16 units, OpenVINO's BF16 default.

The ONNX file is read once; each batch size gets its own compiled model with a static shape (OpenVINO's CPU
plugin is fastest on static shapes, and a deployed engine has one), compiled on first use and kept.
``INFERENCE_PRECISION_HINT`` selects the precision: on CPUs with AVX-512 BF16 or AMX OpenVINO picks bf16
unless told f32, so both are recorded as separate precisions.

An INT8 model runs as OpenVINO runs it by default: its quantized layers in int8, and what stays in float
(LayerNorm, softmax, GELU, the residual adds) in the CPU's fastest float precision, bf16 where the CPU has it. That
is what a user of ``nncf.quantize`` gets from ``ov.compile_model``; on the AMX machine of BENCHMARKS.md it ran plain
NNCF INT8 of the reference ViT-S at 0.859x its latency with the rest held in f32, for 0.05 pt of top-1 on 2,000
images (``bench/int8_float_precision.py``; BENCHMARKS.md, "INT8 as OpenVINO runs it by default").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.errors import RuntimeNotInstalledError, RuntimeUnavailableError

# INT8 and FP16 models carry their precision in the graph (FakeQuantize / QDQ, FP16 weights); the hint then sets
# the precision of what stays in float: f32 for FP16 weights, the CPU's default float for INT8 (None: bf16 or f32).
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": None, "fp16": "f32"}


class OpenVinoEngine:
    def __init__(self, model_path: Path, precision: str, threads: int, cache_dir: Path | None = None,
                 default_float: str = "f32") -> None:
        import openvino as ov

        self.core = ov.Core()
        if cache_dir is not None:  # OpenVINO's model cache: a later start loads the compiled blob instead
            self.core.set_property({"CACHE_DIR": str(cache_dir)})
        self.model = self.core.read_model(str(model_path))
        self.config = {
            "INFERENCE_PRECISION_HINT": _HINT[precision] or default_float,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self._requests: dict[tuple[int, ...], object] = {}
        self._compiled: dict[tuple[int, ...], object] = {}

    def _request(self, shape: tuple[int, ...]):
        if shape not in self._requests:
            model = self.model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            self._compiled[shape] = self.core.compile_model(model, "CPU", self.config)
            self._requests[shape] = self._compiled[shape].create_infer_request()
        return self._requests[shape]

    def executed_precisions(self, shape: tuple[int, ...]) -> dict[str, dict[str, int]]:
        """{layer type: {precision it runs in: count}} of the compiled model for ``shape``, from OpenVINO's
        runtime graph: whether an INT8 model really runs its FullyConnected layers in i8/u8."""
        self._request(tuple(shape))
        compiled = self._compiled[tuple(shape)]
        counts: dict[str, dict[str, int]] = {}
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            counts.setdefault(kind, {}).setdefault(precision, 0)
            counts[kind][precision] += 1
        return counts

    def profile(self, x: np.ndarray, runs: int = 20) -> list:
        """Per-node times of ``runs`` inferences of ``x`` (``runtimes.profile.NodeTime``, execution order), from
        OpenVINO's performance counters on a model compiled apart, so that the timed one stays unprofiled."""
        from runtimes.profile import NodeTime, exec_precision

        model = self.model.clone()
        model.reshape({model.inputs[0]: list(x.shape)})
        compiled = self.core.compile_model(model, "CPU", self.config | {"PERF_COUNT": True})
        fused = {}  # node name -> the original ops fused into it
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "originalLayersNames" in info:
                fused[op.get_friendly_name()] = info["originalLayersNames"].astype(str)
        request = compiled.create_infer_request()
        x = np.ascontiguousarray(x, dtype=np.float32)
        for _ in range(3):  # warm-up: the counters keep the last inference's times
            request.infer({0: x})
        totals: dict[int, float] = {}
        info = []
        for _ in range(runs):
            request.infer({0: x})
            info = [p for p in request.get_profiling_info() if p.status.name == "EXECUTED"]
            for i, p in enumerate(info):
                totals[i] = totals.get(i, 0.0) + p.real_time.total_seconds() * 1e3
        return [NodeTime(p.node_name, p.node_type, exec_precision(p.exec_type), totals[i] / runs,
                         fused.get(p.node_name, "")) for i, p in enumerate(info)]

    def run(self, x: np.ndarray) -> np.ndarray:
        request = self._request(x.shape)
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()


class OpenVinoCPU:
    name = "openvino"
    input_kind = "onnx"
    formats = ("onnx", "openvino")  # ONNX files and OpenVINO IR (.xml beside its .bin)
    artifact_precisions = ("int8", "fp16")

    def __init__(self, cache_dir: Path | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeNotInstalledError("OpenVINO is not installed; pip install openvino") from e
        self.cache_dir = cache_dir
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")  # asked once: it cannot change
        self._precisions = ["fp32", "bf16"] if "BF16" in capabilities else ["fp32"]
        self.default_float = "bf16" if "bf16" in self._precisions else "f32"  # OpenVINO's own default on this CPU

    def precisions(self) -> list[str]:
        return list(self._precisions)

    def build(self, source: Path, *, precision: str, threads: int) -> OpenVinoEngine:
        if precision not in (*self.precisions(), *self.artifact_precisions):
            raise RuntimeUnavailableError(f"OpenVINO cannot run {precision} on this CPU; it offers {self.precisions()}")
        return OpenVinoEngine(Path(source), precision, threads, self.cache_dir, self.default_float)

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {"openvino": ov.get_version()}
