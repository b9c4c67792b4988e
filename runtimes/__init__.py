"""Runtimes registered by name; each SDK is imported only inside its own module, when first asked for."""

from __future__ import annotations

import importlib

from runtimes.base import Engine, LatencyStats, Runtime, default_threads, measure_latency
from runtimes.errors import RuntimeNotInstalledError, RuntimeUnavailableError

_REGISTRY = {
    "torch": ("runtimes.torch_eager", "TorchRuntime"),
    "onnxruntime": ("runtimes.onnxruntime_cpu", "OnnxRuntimeCPU"),
    "openvino": ("runtimes.openvino_cpu", "OpenVinoCPU"),
    "tensorrt": ("runtimes.tensorrt_gpu", "TensorRtRuntime"),
}

RUNTIME_NAMES = tuple(_REGISTRY)


def get_runtime(name: str, **options) -> Runtime:
    """The runtime called ``name`` (``options`` go to its constructor, e.g. OpenVINO's ``cache_dir``); an unknown
    or uninstalled one raises ``RuntimeUnavailableError``."""
    if name not in _REGISTRY:
        raise RuntimeUnavailableError(f"unknown runtime {name!r}; choose from {list(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = [
    "Engine", "LatencyStats", "Runtime", "RUNTIME_NAMES", "RuntimeNotInstalledError", "RuntimeUnavailableError",
    "default_threads", "get_runtime", "measure_latency",
]
