"""ONNX Runtime with its CPU execution provider: all graph optimisations, a fixed intra-op thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.errors import RuntimeNotInstalledError, RuntimeUnavailableError


class OrtEngine:
    def __init__(self, onnx_path: Path, threads: int) -> None:
        self.path, self.threads = Path(onnx_path), threads
        self.session = self._session(profiling=False)
        self.input_name = self.session.get_inputs()[0].name

    def _session(self, *, profiling: bool, prefix: str = ""):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        if profiling:
            options.enable_profiling = True
            options.profile_file_prefix = prefix
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def profile(self, x: np.ndarray, runs: int = 20) -> list:
        """Per-node times of ``runs`` inferences of ``x`` (``runtimes.profile.NodeTime``, execution order), from
        ONNX Runtime's session profile (a session of its own, so the timed one stays unprofiled)."""
        import json
        import tempfile

        from runtimes.profile import NodeTime, element_precision

        warmup = 3
        x = np.ascontiguousarray(x, dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            session = self._session(profiling=True, prefix=str(Path(tmp) / "ort"))
            for _ in range(warmup + runs):
                session.run(None, {self.input_name: x})
            events = json.loads(Path(session.end_profiling()).read_text())
        seen: dict[str, list] = {}  # node -> its events, in order: the last ``runs`` of each are kept
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                seen.setdefault(e["name"].removesuffix("_kernel_time"), []).append(e)
        nodes = []
        for name, calls in seen.items():
            args = calls[-1].get("args", {})
            inputs = args.get("input_type_shape") or [{}]
            element = next(iter(inputs[0]), "") if isinstance(inputs[0], dict) else ""
            ms = sum(c.get("dur", 0) for c in calls[-runs:]) / 1e3 / min(runs, len(calls))
            op = args.get("op_name", "?")
            nodes.append(NodeTime(name, op, element_precision(element, op), ms))
        return nodes

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
