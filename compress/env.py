"""The environment a measurement was taken in: CPU, threads, and library versions."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata

PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "onnxslim", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names``; None for one that is not installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@lru_cache(maxsize=1)
def environment() -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
    }
