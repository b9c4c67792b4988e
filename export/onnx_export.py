"""PyTorch module -> validated ONNX file.

Uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) at opset >= 17 with a
dynamic batch axis, and the dynamo exporter (``dynamo=True``) where that one fails or is asked for
(``export.exporter``). Both give the same graph for this ViT (parity below holds either way); the TorchScript one
takes 0.3 s for a 4-block ViT and 1.8 s for ViT-S where the dynamo one takes 5 s and 12 s on this CPU, and a run
exports every stage and every token-reduction candidate.
Two traps others fell into shape it: LayerNorm must stay one ``LayerNormalization`` node, since a
decomposed one overflows in FP16 on TensorRT (NVIDIA/TensorRT#2709), and an export can succeed while computing something else
(ToMe's ``scatter_reduce`` mean: pytorch/pytorch#101535), so parity against ONNX Runtime is part of exporting: a file that disagrees
with PyTorch beyond tolerance is never handed on. onnxslim, a maintained graph simplifier, folds what the
exporter leaves behind; the node counts before and after are reported so its effect is visible.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.errors import ExportError, ParityError
from runtimes.files import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    agreement: float  # share of samples whose top-1 class is the same
    num_samples: int


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    nodes_exported: int
    nodes_final: int
    parity: ParityReport


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    example: torch.Tensor,
    opset: int = 18,
    simplify: str = "onnxslim",
    atol: float = 1e-4,
    min_agreement: float = 0.99,
    parity_inputs: np.ndarray | None = None,
    exporter: str = "torchscript",
) -> ExportResult:
    """Export ``model`` to ``path`` (atomically) and check it against PyTorch in ONNX Runtime.

    ``example`` fixes the input shape after the batch axis; ``parity_inputs`` (default: ``example``) are the
    inputs compared. Raises ``ParityError`` when the maximum absolute logit difference exceeds ``atol`` or
    top-1 agreement falls below ``min_agreement``.
    """
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset 17 or later")
    model = model.eval()
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    proto = None
    if exporter == "torchscript":
        try:
            proto = _export_torchscript(model, example, opset)
        except ExportError as e:
            log.info("%s; exporting with the dynamo exporter instead", e)
    if proto is None:
        proto = _export(model, example, opset)
    nodes_exported = len(proto.graph.node)
    if simplify == "onnxslim":
        import onnxslim

        proto = onnxslim.slim(proto)
    elif simplify != "none":
        raise ExportError(f"unknown simplifier {simplify!r}; use 'onnxslim' or 'none'")
    _check_layernorm(proto, model)
    name_weighted_nodes(proto, model)
    with atomic_path(path) as tmp:  # renamed into place only once the file passed every check
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp)
        inputs = parity_inputs if parity_inputs is not None else example.numpy()
        parity = check_parity(model, tmp, inputs, atol=atol, min_agreement=min_agreement)
    log.info("exported %s: %d nodes (%d before %s), max |diff| %.2e", path, len(proto.graph.node),
             nodes_exported, simplify, parity.max_abs_diff)
    return ExportResult(path, opset, nodes_exported, len(proto.graph.node), parity)


EXPORTERS = ("torchscript", "dynamo")


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer, captured = io.BytesIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"},
                                                                        OUTPUT_NAME: {0: "batch"}})
    except Exception as e:  # an op it has no symbolic for, or the exporter gone from a later PyTorch
        raise ExportError(f"the TorchScript exporter failed ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from e
    return onnx.load_from_string(buffer.getvalue())


def _export(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress and warnings on stdout; library code stays quiet and logs instead.
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), optimize=True, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the cause is what the user needs
        raise ExportError(f"ONNX export failed: {str(e).splitlines()[0][:300]}") from e
    log.debug("exporter output: %s", captured.getvalue())
    return program.model_proto


def name_weighted_nodes(proto: onnx.ModelProto, model: nn.Module) -> int:
    """Name each Conv/Gemm/MatMul node that holds a module's weight after that module (``blocks.0.mlp.fc1``).

    The exporter names nodes ``node_MatMul_64`` and transposed weights ``val_67``; quantization reports, layer
    exclusions and sensitivity rankings must speak of ``blocks.0.mlp.fc1``. Weights are matched by content
    (a Linear's weight appears transposed under MatMul, as is under Gemm and Conv); the node and its weight
    initializer are renamed. Returns how many nodes were named.
    """
    from onnx import numpy_helper

    by_content: dict[bytes, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach().float().numpy()
            for variant in {w.tobytes(), np.ascontiguousarray(w.T).tobytes() if w.ndim == 2 else w.tobytes()}:
                by_content[variant] = name if variant not in by_content else ""  # "" marks a collision
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    renamed: dict[str, str] = {}
    used = {n.name for n in graph.node}
    count = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in initializers or weight in graph_inputs:
            continue
        module = by_content.get(numpy_helper.to_array(initializers[weight]).astype(np.float32).tobytes())
        if not module or module in used:
            continue
        used.add(module)
        node.name = module
        count += 1
        consumers = [n for n in graph.node if node.output[0] in n.input]
        if len(consumers) == 1 and consumers[0].op_type == "Add" and f"{module}.bias" not in used:
            consumers[0].name = f"{module}.bias"  # runtimes fuse the bias into the product and keep this name
            used.add(consumers[0].name)
        if weight not in renamed and f"{module}.weight" not in initializers:
            renamed[weight] = f"{module}.weight"
    for old, new in renamed.items():
        initializers[old].name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    return count


def _check_layernorm(proto: onnx.ModelProto, model: nn.Module) -> None:
    expected = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    found = sum(n.op_type == "LayerNormalization" for n in proto.graph.node)
    if expected and found < expected:
        raise ExportError(
            f"the ONNX graph has {found} LayerNormalization nodes for {expected} LayerNorm modules: a decomposed "
            "LayerNorm overflows in FP16; export at opset >= 17 with the dynamo exporter"
        )


def check_parity(
    model: nn.Module, onnx_path: Path, inputs: np.ndarray, *, atol: float, min_agreement: float, batch_size: int = 64
) -> ParityReport:
    """Compare PyTorch and ONNX Runtime logits on ``inputs`` (N, C, H, W) float32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    max_diff, same, n = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            x = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
            ref = model(torch.from_numpy(x)).numpy()
            got = session.run(None, {session.get_inputs()[0].name: x})[0]
            max_diff = max(max_diff, float(np.abs(ref - got).max()))
            same += int((ref.argmax(1) == got.argmax(1)).sum())
            n += len(x)
    report = ParityReport(max_abs_diff=max_diff, agreement=same / max(1, n), num_samples=n)
    if max_diff > atol or report.agreement < min_agreement:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch: max |logit diff| {max_diff:.3g} (tolerance {atol:g}), "
            f"top-1 agreement {report.agreement:.3f} (minimum {min_agreement}); the export is wrong, "
            "report it with the model's config"
        )
    return report
