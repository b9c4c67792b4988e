"""The project's own checkpoint: one safetensors file whose metadata holds everything needed to use it.

Metadata keys (all JSON strings): ``format`` (``vit-compress/1``), ``model`` (the ``ViTConfig``),
``preprocess`` (the ``Preprocess`` every runtime must apply), ``classes`` (class names in label order) and,
when the model merges or prunes tokens at inference, ``tokens`` (the ``TokenReduction`` plan).
A checkpoint is therefore enough on its own to rebuild the model and feed it the right input.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from calibration.datasets import ImageSource
from calibration.preprocess import Preprocess
from compress.config import RunConfig
from compress.errors import CheckpointError, ConfigError, DatasetError
from compress.io import atomic_write
from compress.model.vit import ViTConfig, VisionTransformer

FORMAT = "vit-compress/1"
# [model] settings that say how to read a file, not what the model is: a new model ignores them
LOADING_OPTIONS = ("key_map", "attention_scale", "onnx_output")
log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A model together with the preprocessing and class names it was trained with."""

    model: VisionTransformer
    preprocess: Preprocess
    classes: list[str]
    # False where the file records no normalisation (a bare state dict; a Hugging Face directory without
    # preprocessor_config.json): the run must be told mean and std rather than assume them
    normalisation_recorded: bool = True

    @property
    def config(self) -> ViTConfig:
        return self.model.config


def save_checkpoint(ckpt: Checkpoint, path: Path) -> Path:
    metadata = {
        "format": FORMAT,
        "model": json.dumps(ckpt.config.to_dict()),
        "preprocess": json.dumps(ckpt.preprocess.to_dict()),
        "classes": json.dumps(ckpt.classes),
    }
    if ckpt.model.token_reduction is not None:
        metadata["tokens"] = json.dumps(ckpt.model.token_reduction.to_dict())
    tensors = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors header metadata, or None when the file is not a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None


def load_own_checkpoint(path: Path, overrides: dict | None = None) -> Checkpoint:
    metadata = read_metadata(path)
    if metadata is None or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    try:  # the metadata is text anyone can edit: every key parsed and checked, a failure named
        recorded = json.loads(metadata["model"])
        preprocess = Preprocess.from_dict(json.loads(metadata["preprocess"]))
        classes = json.loads(metadata["classes"])
        tokens = json.loads(metadata["tokens"]) if "tokens" in metadata else None
        if not isinstance(recorded, dict):
            raise ValueError("the model entry is not a mapping")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("the class names are not a list of strings")
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]!r} in its metadata; re-save it with `compress train` or "
                              "pass the original checkpoint") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} has damaged metadata ({str(e)[:160]}); re-save it with `compress train` or "
                              "pass the original checkpoint") from None
    for key, value in (overrides or {}).items():
        if key in recorded and not same_value(recorded[key], value):
            raise CheckpointError(
                f"model.{key}={value} disagrees with checkpoint {path}, which records {recorded[key]}; "
                "remove the override (this format carries every hyper-parameter)"
            )
    try:
        model = VisionTransformer(ViTConfig.from_dict(recorded | (overrides or {})))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} records a model that cannot be built ({str(e)[:160]}); re-save it with "
                              "`compress train`") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; the file may be truncated, re-download or re-export it") from e
    load_exact(model, state, source=str(path))
    if len(classes) != model.config.num_classes:
        raise CheckpointError(f"{path} names {len(classes)} classes but its model predicts {model.config.num_classes}; "
                              "re-save it with `compress train`")
    if tokens is not None:
        from compress.tokens import TokenError, TokenReduction, apply

        try:
            apply(model, TokenReduction.from_dict(tokens))
        except TokenError as e:
            raise CheckpointError(f"{path} has a token plan its own model cannot follow ({e}); re-save it with "
                                  "`compress run`") from None
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path} has a damaged token plan ({e!r}); re-save it with `compress run`") from None
    return Checkpoint(model, preprocess, classes)


def same_value(a: object, b: object) -> bool:
    """Equal as hyper-parameters: lists and tuples alike, and one int equal to a per-layer tuple of it."""
    a = tuple(a) if isinstance(a, list) else a
    b = tuple(b) if isinstance(b, list) else b
    if isinstance(a, tuple) and isinstance(b, int):
        return all(v == b for v in a)
    if isinstance(b, tuple) and isinstance(a, int):
        return all(v == a for v in b)
    return a == b


def load_exact(model: VisionTransformer, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``, naming the first missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if mismatched:
            parts.append(f"shape {mismatched[:2]}")
        raise CheckpointError(
            f"checkpoint {source} does not fit the model: {'; '.join(parts)}; "
            "check the [model] hyper-parameters (e.g. --set model.num_heads=N) or the checkpoint's layout"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval()


def resolve_preprocess(config: RunConfig, model_cfg: ViTConfig, base: Preprocess | None = None) -> Preprocess:
    """The checkpoint's preprocessing (or a plain default), with the recipe's ``[preprocess]`` overrides."""
    if base is None:
        c = model_cfg.in_chans
        base = Preprocess(crop_size=model_cfg.image_size, in_chans=c, mean=(0.5,) * c, std=(0.5,) * c)
    values = base.to_dict() | config.preprocess.model_dump(exclude_none=True)
    try:
        return Preprocess.from_dict(values)
    except ValueError as e:
        raise ConfigError(f"{e}; set it in [preprocess] or with --set (e.g. --set 'preprocess.mean=[0.485, 0.456, "
                          "0.406]')") from None


def new_checkpoint(config: RunConfig, source: ImageSource) -> Checkpoint:
    """A freshly initialised model for ``source``: its class count, and its channel count unless set."""
    first = source.load(0)
    in_chans = 1 if first.mode in ("L", "1", "I", "I;16") else 3
    values = {"num_classes": len(source.classes), "in_chans": in_chans} | {k: v for k, v in config.model.items()
                                                                          if k not in LOADING_OPTIONS}
    model_cfg = ViTConfig.from_dict(values)
    return Checkpoint(VisionTransformer(model_cfg), resolve_preprocess(config, model_cfg), list(source.classes))


def check_dataset_fits(ckpt: Checkpoint, source: ImageSource) -> None:
    """The model must predict as many classes as the dataset has (names may differ: imported models). ``ckpt`` is
    a ``Checkpoint`` or an ONNX file's ``OnnxModel``: both name one class per logit."""
    if len(ckpt.classes) != len(source.classes):
        raise DatasetError(
            f"the model predicts {len(ckpt.classes)} classes but dataset {source.name} has "
            f"{len(source.classes)}; use a dataset with the model's classes or fine-tune with `compress train`"
        )


def match_class_names(ckpt: Checkpoint, source: ImageSource) -> None:
    """Give the model the dataset's class names where its checkpoint recorded none, and its own order where both
    name the same classes; say in one line when the names differ, since labels then match by position."""
    index_names = [str(i) for i in range(len(ckpt.classes))]
    dataset = list(source.classes)
    if ckpt.classes == dataset:
        return
    if ckpt.classes == index_names:
        log.info("class names from the dataset: %s", ", ".join(dataset[:10]) + (" ..." if len(dataset) > 10 else ""))
        ckpt.classes = dataset
    elif sorted(ckpt.classes) == sorted(dataset):
        log.info("dataset %s relabelled to the checkpoint's class order", source.name)
        source.use_class_order(ckpt.classes)
    else:
        log.warning("the checkpoint's class names %s differ from the dataset's %s; labels are matched by position "
                    "(class folders in sorted order)", ckpt.classes[:5], dataset[:5])
