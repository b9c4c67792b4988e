"""An image classifier that a user has only as an ONNX file: NCHW images in, logits out.

Such a model takes the ONNX-level stages (every quantizer that works on ONNX, measurement on every runtime that
loads ONNX, the report and the deployment bundle) exactly as a checkpoint's export does. Where a run needs the
PyTorch module too (pruning, token reduction, training), the ViT in it is lifted out (``lift_checkpoint``,
``compress.model.onnx_lift``); a graph that cannot be lifted still takes the ONNX-level stages. An ONNX file records no
preprocessing: the input size comes from the graph where it is fixed, and the normalisation must be given
(``[preprocess]`` or ``--set preprocess.mean=[...]``); nothing is guessed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.preprocess import Preprocess
from compress.config import RunConfig
from compress.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from compress.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MEAN_STD_EXAMPLE = "--set 'preprocess.mean=[0.485, 0.456, 0.406]' --set 'preprocess.std=[0.229, 0.224, 0.225]'"


@dataclass
class OnnxModel:
    """An ONNX classifier with the preprocessing and class names it is run with (the ``Checkpoint`` of a file
    that has no PyTorch module)."""

    path: Path
    preprocess: Preprocess
    classes: list[str]
    input_name: str
    has_qdq: bool  # already quantized (Q/DQ nodes): measured as it is, never quantized again
    model: None = None  # no PyTorch module: the torch-only stages and runtime do not apply
    lift_error: str | None = None  # why no ViT could be lifted out of it, once that was tried

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def metadata(self) -> dict[str, str]:
        """What a deployment bundle takes from a checkpoint's metadata, in the same form (JSON strings)."""
        import json

        return {"format": "onnx", "model": json.dumps({"source": "onnx", "file": self.path.name,
                                                        "num_classes": self.num_classes}),
                "preprocess": json.dumps(self.preprocess.to_dict()), "classes": json.dumps(self.classes)}


def is_onnx(path: Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_onnx(path: str | Path, config: RunConfig) -> OnnxModel:
    """Read and check ``path``: one image input (N, C, H, W), one logits output (N, K). Raises ``CheckpointError``
    for a file that is not such a model and ``ConfigError`` for preprocessing the run must be told."""
    path = Path(path)
    graph, image, dims = _read_image_model(path)
    out = _dims(graph.output[0])
    if len(out) != 2 or not isinstance(out[1], int) or out[1] < 2:
        raise CheckpointError(f"{path.name}'s first output {graph.output[0].name!r} has shape {_shape_text(out)}; "
                              "an image classifier gives (N, classes) logits (for a ViT encoder inside a larger "
                              "graph, set model.num_classes and model.onnx_output and train its new head with "
                              "`compress train --init`)")
    preprocess = _preprocess(path, dims, config)
    if isinstance(dims[0], int):
        raise CheckpointError(f"{path.name} takes batches of exactly {dims[0]} image(s), and a run evaluates and times "
                              "batches of several: export it with a dynamic batch axis (torch.onnx.export(..., "
                              "dynamic_axes={'x': {0: 'batch'}}) or dynamic_shapes)")
    _check_it_runs(path, image.name, preprocess, out[1])
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    log.debug("%s: ONNX classifier, input %s %s, %d classes%s", path, image.name, _shape_text(dims), out[1],
             ", already quantized (Q/DQ)" if has_qdq else "")
    return OnnxModel(path, preprocess, [str(i) for i in range(out[1])], image.name, has_qdq)


# [model] settings an ONNX file's lift reads; every other hyper-parameter comes from the graph
LIFT_SETTINGS = ("onnx_output", "num_classes", "pool")


def lift_checkpoint(path: str | Path, config: RunConfig, inputs=None) -> Checkpoint:
    """The ViT in ONNX file ``path`` as a ``Checkpoint`` (``compress.model.onnx_lift``), with the preprocessing
    the config gives; ``inputs`` are the real images its parity with ONNX Runtime is checked on. A graph it cannot
    lift raises ``LiftError`` naming the first part it did not recognise."""
    from compress.model.checkpoint import Checkpoint
    from compress.model.onnx_lift import lift_onnx

    path = Path(path)
    _, _, dims = _read_image_model(path)
    model_settings = dict(config.model)
    other = sorted(set(model_settings) - set(LIFT_SETTINGS))
    if other:
        raise ConfigError(f"model.{other[0]} does not apply to an ONNX file, whose graph gives every "
                          f"hyper-parameter; drop it (an ONNX file takes {', '.join(LIFT_SETTINGS)})")
    preprocess = _preprocess(path, dims, config)
    model, lifted = lift_onnx(path, output=model_settings.get("onnx_output"),
                              num_classes=model_settings.get("num_classes"), pool=model_settings.get("pool"),
                              inputs=inputs, atol=config.export.atol)
    if lifted.backbone:
        log.warning("%s: the encoder's %d-class head is new; train it with `compress train --init` before measuring "
                    "accuracy", path.name, model.config.num_classes)
    return Checkpoint(model, preprocess, [str(i) for i in range(model.config.num_classes)])


def _read_image_model(path: Path):
    """The graph of ONNX file ``path``, its image input and that input's dimensions, checked: one (N, C, H, W)
    float input, a valid model. Raises ``CheckpointError`` naming what is wrong."""
    import onnx

    if not path.is_file():
        raise CheckpointError(f"model {path} does not exist; check the path")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise CheckpointError(f"{path} is not an ONNX model ({type(e).__name__}); pass an .onnx file exported "
                              "with torch.onnx.export or a converter") from None
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise CheckpointError(f"{path.name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an image "
                              "classifier takes one (N, C, H, W) image batch")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise CheckpointError(f"{path.name}'s input {inputs[0].name!r} has shape {_shape_text(dims)}; an image "
                              "classifier takes (N, C, H, W)")
    if not graph.output:
        raise CheckpointError(f"{path.name} has no output; an image classifier gives (N, classes) logits")
    try:
        onnx.checker.check_model(str(path))  # the path form follows external data beside the file
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name} is not a valid ONNX model: {first}") from None
    if inputs[0].type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        kind = onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type).lower()
        raise CheckpointError(f"{path.name} takes {kind} images; the stages feed normalised float images, so export "
                              "it with a float32 input (the normalisation inside the model, or in [preprocess])")
    return graph, inputs[0], dims


def _check_it_runs(path: Path, input_name: str, preprocess: Preprocess, classes: int) -> None:
    """One image through ONNX Runtime: a graph it cannot load or run (an op it lacks, a shape that does not fit)
    is one line here, not a traceback in the middle of the run."""
    import numpy as np
    import onnxruntime as ort

    p = preprocess
    x = np.zeros((1, p.in_chans, p.crop_size, p.crop_size), np.float32)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if session.get_inputs()[0].type == "tensor(float16)":
            x = x.astype(np.float16)
        logits = session.run(None, {input_name: x})[0]
    except Exception as e:  # ONNX Runtime raises its own types (Fail, InvalidGraph, NotImplemented, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"ONNX Runtime cannot run {path.name}: {first}") from None
    if tuple(logits.shape) != (1, classes):
        raise CheckpointError(f"{path.name} gave logits of shape {tuple(logits.shape)} for one image, not (1, "
                              f"{classes}); an image classifier gives (N, classes)")


def _dims(value_info) -> list[Any]:
    """The dimensions of a graph input or output: ints where fixed, names (or None) where not."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _shape_text(dims: list[Any]) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"


def _preprocess(path: Path, dims: list[Any], config: RunConfig) -> Preprocess:
    """The input size from the graph where it is fixed (``preprocess.crop_size`` otherwise); mean and std from the
    config, which must name them: an ONNX file records no normalisation, and a wrong guess costs accuracy silently
    (an MNIST ViT scored 26% instead of 84% with mean/std 0.5 assumed)."""
    _, channels, height, width = dims
    p = config.preprocess
    if not isinstance(channels, int):
        raise ConfigError(f"{path.name}'s input has no fixed channel count; export it with a fixed (N, C, H, W) "
                          "shape after the batch axis")
    if isinstance(height, int) and isinstance(width, int):
        if height != width:
            raise ConfigError(f"{path.name} takes {height}x{width} images; only square inputs are supported")
        if p.crop_size is not None and p.crop_size != height:
            raise ConfigError(f"preprocess.crop_size={p.crop_size}, but {path.name} takes {height}x{width} images; "
                              f"drop the setting or set it to {height}")
        size = height
    elif p.crop_size is not None:
        size = p.crop_size
    else:
        raise ConfigError(f"{path.name}'s input size is not fixed ({_shape_text(dims)}); set the size it was trained "
                          "at: --set preprocess.crop_size=224")
    if p.mean is None or p.std is None:
        missing = " and ".join(n for n, v in (("mean", p.mean), ("std", p.std)) if v is None)
        raise ConfigError(f"{path.name} records no normalisation, so preprocess.{missing} must be given "
                          f"(for ImageNet-trained models: {MEAN_STD_EXAMPLE})")
    values = {"crop_size": size, "in_chans": channels, "mean": tuple(p.mean), "std": tuple(p.std)}
    values |= {k: v for k, v in (("resize_size", p.resize_size), ("interpolation", p.interpolation)) if v is not None}
    try:
        return Preprocess.from_dict(values)
    except ValueError as e:
        raise ConfigError(f"{e}; set it in [preprocess] or with --set") from None
