"""vit-compress: shrink Vision Transformers and measure them on real runtimes.

The Python API (``compress.api``) is importable from here; names load on first use, so ``import compress`` (and
``compress --help``) stays fast and never imports torch, ONNX Runtime or OpenVINO until they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Checkpoint", "CompressError", "Dataset", "Measurement", "export_model", "load_data", "load_model", "measure",
    "prune_model", "quantize_onnx", "reduce_tokens", "run_recipe", "train_model",
]

_HOMES = {"Checkpoint": "compress.model.checkpoint", "CompressError": "compress.errors"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES.get(name, "compress.api")), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
