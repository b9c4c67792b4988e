"""ONNX Runtime with its CPU execution provider: all graph optimisations, a fixed intra-op thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.errors import RuntimeNotInstalledError, RuntimeUnavailableError


class OrtEngine:
    def __init__(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OnnxRuntimeCPU:
    name = "onnxruntime"
    input_kind = "onnx"
    formats = ("onnx",)
    # Precisions that live in the file itself (QDQ INT8, FP16 weights): the session runs what the graph says.
    artifact_precisions = ("int8", "fp16")

    def __init__(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise RuntimeNotInstalledError("ONNX Runtime is not installed; pip install onnxruntime") from e

    def precisions(self) -> list[str]:
        return ["fp32"]

    def build(self, source: Path, *, precision: str, threads: int) -> OrtEngine:
        if precision not in ("fp32", *self.artifact_precisions):
            raise RuntimeUnavailableError(f"ONNX Runtime CPU runs fp32, int8 and fp16 graphs, not {precision}")
        return OrtEngine(Path(source), threads)

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}
