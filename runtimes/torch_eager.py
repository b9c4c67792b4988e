"""PyTorch eager on the CPU: the reference every exported engine is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from runtimes.errors import RuntimeUnavailableError


class TorchEngine:
    def __init__(self, model: nn.Module, threads: int) -> None:
        self.model = model.eval()
        self.threads = threads

    def run(self, x: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()


class TorchRuntime:
    name = "torch"
    input_kind = "torch"
    formats = ("torch",)
    artifact_precisions = ()

    def precisions(self) -> list[str]:
        return ["fp32"]

    def build(self, source: Any, *, precision: str, threads: int) -> TorchEngine:
        if precision != "fp32":
            raise RuntimeUnavailableError(f"torch eager runs fp32 here, not {precision}")
        if not isinstance(source, nn.Module):
            raise RuntimeUnavailableError("the torch runtime needs a PyTorch module, not an ONNX file")
        return TorchEngine(source, threads)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}
