"""Import ViT checkpoints of other projects into the canonical ``VisionTransformer``.

Each layout has one converter ``state dict (+ user overrides) -> (ViTConfig values, canonical state dict)``:
- our own safetensors format (``compress.model.checkpoint``), which carries every hyper-parameter;
- timm ViT / DeiT state dicts (already in our names);
- Hugging Face ViT / DeiT directories (``config.json`` with safetensors or bin weights), in the transformers
  4.x layout (``vit.encoder.layer.N.attention.attention.query``) and the 5.x one (``vit.layers.N.attention.q_proj``);
- lucidrains vit-pytorch state dicts, current (``transformer.layers.N.0.to_qkv``, LayerNorm around a linear
  patch embedding) and older (``transformer.layers.N.0.fn.fn.to_qkv``, ``mlp_head`` = LayerNorm + Linear);
- ViTs built from ``torch.nn.TransformerEncoderLayer`` (packed ``in_proj_weight``, conv or linear patch
  embedding), whose wrapper names are found by parameter shape.

Hyper-parameters come from the checkpoint where it carries them (shapes, Hugging Face's config.json) and
from the user's ``[model]`` overrides where it does not. The head count is the one value no weight shape
reveals: timm and vit-pytorch checkpoints default to their projects' head width of 64, and a
``TransformerEncoder`` checkpoint needs ``model.num_heads``. Whatever the layout, ``load_exact`` checks
every key and shape and names the first that disagree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from calibration.preprocess import Preprocess
from compress.model.checkpoint import (
    Checkpoint, load_exact, load_own_checkpoint, read_metadata, resolve_preprocess, same_value,
)
from compress.config import RunConfig
from compress.errors import CheckpointError, ConfigError
from compress.io import torch_load_weights
from compress.model.vit import ViTConfig, VisionTransformer, grid_from_pos_embed

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> Checkpoint:
    """Load any supported checkpoint; ``overrides`` are ``[model]`` values from the recipe or ``--set``.

    ``image_size`` is applied after loading: the position embedding is interpolated to the new grid (it
    still exports) and the preprocessing scaled to match. ``key_map`` (a list of ``[pattern, replacement]``
    regular expressions) renames a state dict's keys onto a known layout before it is read, for checkpoints whose
    modules are named otherwise.
    """
    overrides = dict(overrides or {})
    image_size = overrides.pop("image_size", None)
    key_map = _key_map(overrides.pop("key_map", None))
    if "onnx_output" in overrides:
        raise ConfigError(f"model.onnx_output names a tensor of an ONNX file, and {Path(path).name} is a checkpoint; "
                          "drop the setting")
    ckpt = _load(Path(path), overrides, key_map, image_size)
    if image_size is not None and image_size != ckpt.config.image_size:
        old = ckpt.config.image_size
        ckpt.model.set_image_size(image_size)
        resize = ckpt.preprocess.resize_size
        ckpt.preprocess = dataclasses.replace(
            ckpt.preprocess, crop_size=image_size, resize_size=round(resize * image_size / old) if resize else None)
    return ckpt


def load_configured(path: str | Path, config: RunConfig) -> Checkpoint:
    """The checkpoint with the run config's ``[model]`` and ``[preprocess]`` overrides applied.

    A file that records no normalisation needs ``preprocess.mean`` and ``preprocess.std``: an assumed one costs
    accuracy without a word (an MNIST ViT run with mean/std 0.5 scored 26% instead of 84%).
    """
    ckpt = load_checkpoint(path, config.model)
    p = config.preprocess
    if not ckpt.normalisation_recorded and (p.mean is None or p.std is None):
        from compress.model.onnx_model import MEAN_STD_EXAMPLE

        raise ConfigError(f"{Path(path).name} records no normalisation, so preprocess.mean and std must be given, "
                          f"as the model was trained (for ImageNet-trained timm and DeiT models: {MEAN_STD_EXAMPLE})")
    ckpt.preprocess = resolve_preprocess(config, ckpt.config, ckpt.preprocess)
    return ckpt


def _key_map(value: Any) -> list[tuple[re.Pattern, str]]:
    """``[model] key_map``: ``[[pattern, replacement], ...]``, applied in order to every key (``re.sub``)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str)
                                                                                         for x in p) for p in value):
        raise ConfigError("model.key_map must be a list of [pattern, replacement] pairs of strings, e.g. "
                          "key_map = [['^encoder\\.(\\d+)\\.', 'blocks.\\1.']]")
    compiled = []
    for pattern, replacement in value:
        try:
            compiled.append((re.compile(pattern), replacement))
        except re.error as e:
            raise ConfigError(f"model.key_map pattern {pattern!r} is not a regular expression: {e}") from None
    return compiled


def _renamed(state: State, key_map: list[tuple[re.Pattern, str]], source: Path | str) -> State:
    """``state`` with ``key_map`` applied to its keys; two keys renamed to one name are an error."""
    if not key_map:
        return state
    out: State = {}
    for key, tensor in state.items():
        new = key
        for pattern, replacement in key_map:
            try:
                new = pattern.sub(replacement, new)
            except (re.error, IndexError) as e:
                raise ConfigError(f"model.key_map replacement {replacement!r} fails on {key!r}: {e}") from None
        if new in out:
            raise CheckpointError(f"model.key_map renames two tensors of {source} to {new!r}; make the patterns "
                                  "tell them apart")
        out[new] = tensor
    log.info("%s: model.key_map renamed %d of %d keys", source, sum(a != b for a, b in zip(state, out)), len(state))
    return out


def _load(path: Path, overrides: dict[str, Any], key_map: list[tuple[re.Pattern, str]] | None = None,
          image_size: int | None = None) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        return _load_hf_dir(path, overrides, image_size)
    metadata = read_metadata(path)
    if metadata is not None and metadata.get("format", "").startswith("vit-compress/"):
        return load_own_checkpoint(path, overrides)
    state = _renamed(_read_state_dict(path, is_safetensors=metadata is not None), key_map or [], path)
    layout, convert = detect_layout(state, path)
    log.info("%s: %s layout", path, layout)
    try:
        values, canonical = _converted(convert, state, overrides, layout, path)
    except KeyError as e:  # the layout was recognised by some keys, but one it needs is not there
        raise CheckpointError(f"{path} looks like a {layout} checkpoint but has no {e.args[0]!r}; the file is "
                              "incomplete or damaged, or of another layout: re-save or re-download it") from None
    except (IndexError, ValueError) as e:  # a tensor of a shape the layout cannot have
        raise CheckpointError(f"{path} looks like a {layout} checkpoint but a tensor has an impossible shape "
                              f"({str(e)[:100]}); the file is damaged or of another layout") from None
    cfg = _build_config(values, overrides, path)
    model = VisionTransformer(cfg)
    load_exact(model, canonical, source=str(path))
    c = cfg.in_chans
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,), (0.5,))
    preprocess = Preprocess(crop_size=cfg.image_size, in_chans=c, interpolation="bicubic", mean=mean, std=std)
    return Checkpoint(model, preprocess, [str(i) for i in range(cfg.num_classes)], normalisation_recorded=False)


class _Tracked(dict):
    """A state dict that notes which tensors a converter read (``state[key]``), so that none is dropped unseen."""

    def __init__(self, state: State) -> None:
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)


def _converted(convert, state: State, overrides: dict, layout: str, source: Path | str) -> tuple[dict, State]:
    """``convert(state, overrides)``, refusing a checkpoint with tensors the layout did not place.

    A tensor no converter reads would be lost without a word (a final LayerNorm outside the encoder, a head's
    LayerNorm): the model would load and predict something else. A converter that hands keys on unchanged (timm)
    leaves the unexpected ones to ``load_exact``, which names them too.
    """
    tracked = _Tracked(state)
    values, canonical = convert(tracked, overrides)
    unused = sorted(k for k in state if k not in tracked.read and k not in canonical)
    if unused:
        shown = ", ".join(f"{k} {tuple(state[k].shape)}" for k in unused[:4]) + (" ..." if len(unused) > 4 else "")
        raise CheckpointError(
            f"{source} is a {layout} checkpoint with {len(unused)} tensor(s) the layout does not place: {shown}; "
            "loading without them would change the model's output, so the load stops: export the model to ONNX "
            "(torch.onnx.export) and pass the .onnx file, or re-save it without tensors that are not part of the "
            "classifier"
        )
    return values, canonical


def _read_state_dict(path: Path, *, is_safetensors: bool) -> State:
    """The tensors of a safetensors file or a ``torch.save`` file, loaded with ``weights_only`` (no code runs).

    ``torch.load`` answers damaged bytes with almost any exception type (IndexError, KeyError, UnpicklingError,
    RuntimeError, ...), so its failures are told apart by what the file is, not by the exception's type.
    """
    if is_safetensors:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path} ({str(e).splitlines()[0][:160]}); the "
                                  "file is truncated or corrupt: re-download or re-export it") from None
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # a safetensors header that did not parse
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: its header is damaged (the file is "
                              "truncated or corrupt); re-download or re-export it")
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        what = "an empty file" if not head else "not a PyTorch or safetensors checkpoint"
        raise CheckpointError(f"{path} is {what}; pass a state dict saved with torch.save(model.state_dict(), path), "
                              "a .safetensors file or a Hugging Face model directory")
    try:
        obj = torch_load_weights(path)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler refuses a class or function it does not allow ("Unsupported global"), and
        # refuses garbage the same way ("Unsupported operand"): only the first is a file of Python objects.
        if "Weights only load failed" not in str(e) or "Unsupported global" not in str(e):
            raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt; re-download "
                                  "it") from None
        raise CheckpointError(
            f"{path} contains code or Python objects other than tensors, which are never loaded (they could run "
            "code); in Python you trust, load it and re-save the weights alone: torch.save(model.state_dict(), "
            "path) or safetensors.torch.save_file"
        ) from None
    except Exception as e:  # noqa: BLE001  (any type, see above; our own bugs cannot happen inside torch.load)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({reason}); the file is truncated or corrupt, or not a PyTorch "
            "state dict: re-download it or save it with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "module", "state"):  # common training wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; save it with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def detect_layout(state: State, path: Path | str = "checkpoint") -> tuple[str, Callable[[State, dict], tuple[dict, State]]]:
    keys = set(state)
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.0.attn.qkv.") for k in keys):
        return "timm", _convert_timm
    if any(k.startswith("transformer.layers.0.") for k in keys) and any("to_qkv" in k for k in keys):
        return "vit-pytorch", _convert_vit_pytorch
    if any(re.search(r"layers\.0\.self_attn\.in_proj_weight$", k) for k in keys):
        return "torch.nn.TransformerEncoder", _convert_torch_encoder
    if any(re.search(r"\.0\.\w+\.in_proj_weight$", k) for k in keys):  # blocks around nn.MultiheadAttention
        return "nn.MultiheadAttention blocks", _convert_torch_encoder
    if any(re.match(r"(vit|deit)\.(encoder\.layer|layers)\.0\.", k) for k in keys):
        return "huggingface", lambda s, o: _convert_hf(s, o, {})
    raise CheckpointError(
        f"{path} matches no known ViT layout (timm, Hugging Face, vit-pytorch, nn.TransformerEncoder or other "
        "nn.MultiheadAttention blocks); none of its "
        f"{len(keys)} tensors could be placed, in modules {_modules(keys)}; two ways out: rename its keys onto a "
        "known layout with [model] key_map (regular expressions, README 'Models it reads'), or export the model to "
        "ONNX (torch.onnx.export) and pass the .onnx file"
    )


def _modules(keys: set[str], shown: int = 6) -> str:
    """The distinct modules of ``keys`` with layer numbers folded (``blocks.N.attn``), in order of appearance."""
    seen: dict[str, None] = {}
    for key in sorted(keys, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]):
        seen.setdefault(re.sub(r"\.\d+(?=\.)", ".N", key.rsplit(".", 1)[0]), None)
    names = list(seen)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _build_config(values: dict[str, Any], overrides: dict[str, Any], source: Path | str) -> ViTConfig:
    """The checkpoint's values, then the user's overrides; a disagreement on a shape-given value is an error."""
    merged = dict(values)
    for key, value in overrides.items():
        if key in values and not same_value(values[key], value) and key not in _SOFT_KEYS:
            raise CheckpointError(
                f"model.{key}={value} disagrees with checkpoint {source}, whose weights give {values[key]}; "
                f"remove the override or use a matching checkpoint"
            )
        merged[key] = value
    return ViTConfig.from_dict(merged)


# Values a converter only guesses (head count, pooling, norm placement); the user may override them freely.
_SOFT_KEYS = {"num_heads", "head_dim", "pool", "pre_norm", "act", "norm_eps", "layer_scale_init", "head_act"}


def _heads(inner: int, overrides: dict, layout: str, head_dim_default: int | None = 64) -> dict[str, Any]:
    """Head count and width: the user's, else the project's convention of 64-wide heads."""
    if "num_heads" in overrides:
        heads = overrides["num_heads"]
        first = heads if isinstance(heads, int) else heads[0]
        if inner % first:
            raise CheckpointError(f"model.num_heads={first} does not divide the attention width {inner} of this {layout} checkpoint")
        return {"num_heads": heads, "head_dim": overrides.get("head_dim", inner // first)}
    if head_dim_default is None or inner % head_dim_default:
        raise ConfigError(
            f"this {layout} checkpoint does not record its head count (attention width {inner}); "
            f"pass it with --set model.num_heads=N"
        )
    log.warning("%s checkpoint: assuming %d heads of width %d; set model.num_heads if that is wrong",
                layout, inner // head_dim_default, head_dim_default)
    return {"num_heads": inner // head_dim_default, "head_dim": head_dim_default}


def _depth(state: State, pattern: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


# ----------------------------------------------------------------------------------------------------- timm
def _convert_timm(state: State, overrides: dict) -> tuple[dict, State]:
    w = state["patch_embed.proj.weight"]  # (D, C, p, p)
    depth = _depth(state, r"blocks\.(\d+)\.")
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int("cls_token" in state) + int("dist_token" in state) + regs
    positions = state["pos_embed"].shape[1]
    # timm's no_embed_class: the position embedding covers the patches alone, and the prefix tokens none
    on_prefix = not (prefix and _is_square(positions) and not _is_square(positions - prefix))
    patch = w.shape[-1]
    values: dict[str, Any] = {
        "embed_dim": w.shape[0], "in_chans": w.shape[1], "patch_size": patch, "depth": depth,
        "image_size": grid_from_pos_embed(positions, prefix if on_prefix else 0) * patch,
        "reg_tokens": regs, "pos_embed_prefix": on_prefix, "patch_bias": "patch_embed.proj.bias" in state,
        "blocks_pre_norm": "norm_pre.weight" in state,
        "mlp_dim": tuple(state[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)),
        "num_classes": _require(state, "head.weight", "timm").shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "class_token": "cls_token" in state, "dist_token": "dist_token" in state,
        "dist_head": "head_dist.weight" in state,
        "final_norm": "pooled" if "fc_norm.weight" in state else "token" if "norm.weight" in state else "none",
        "pool": "mean" if "fc_norm.weight" in state or "cls_token" not in state else "cls",
        "layer_scale_init": 1.0 if "blocks.0.ls1.gamma" in state else None,
        "patch_post_norm": "patch_embed.norm.weight" in state,
        "norm_eps": 1e-6,
    }
    values |= _heads(state["blocks.0.attn.proj.weight"].shape[1], overrides, "timm")
    return values, dict(state)


def _require(state: State, key: str, layout: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"this {layout} checkpoint has no {key}: a classification head is needed (is it a feature extractor?)")
    return state[key]


# ------------------------------------------------------------------------------------------- Hugging Face
def _load_hf_dir(path: Path, overrides: dict, image_size: int | None = None) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} is a directory without config.json; pass a Hugging Face model directory or a file")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    if hf.get("model_type") not in ("vit", "deit", "dinov2"):
        raise CheckpointError(f"{path} holds a {hf.get('model_type')!r} model; Hugging Face 'vit', 'deit' and "
                              "'dinov2' models import")
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()), None)
    if weights is None:
        raise CheckpointError(f"{path} has no model.safetensors or pytorch_model.bin beside config.json")
    state = _read_state_dict(weights, is_safetensors=weights.suffix == ".safetensors")
    dinov2 = hf["model_type"] == "dinov2"
    convert = (lambda s, o: _convert_dinov2(s, o, hf)) if dinov2 else (lambda s, o: _convert_hf(s, o, hf))
    values, canonical = _converted(convert, state, overrides, "Hugging Face " + hf["model_type"], path)
    cfg = _build_config(values, overrides, path)
    model = VisionTransformer(cfg)
    if "head.weight" not in canonical:  # a backbone: the new head stays as initialised, for `compress train`
        canonical |= {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        log.warning("%s is a backbone without a classifier: its %d-class head is new; train it with `compress train "
                    "--init` before measuring accuracy", path, cfg.num_classes)
    load_exact(model, canonical, source=str(path))
    id2label = hf.get("id2label") or {}
    classes = [str(id2label.get(str(i), i)) for i in range(cfg.num_classes)]
    preprocess, recorded = _hf_preprocess(path, cfg)
    ckpt = Checkpoint(model, preprocess, classes, normalisation_recorded=recorded)
    if dinov2:  # DINOv2 resamples its position grid to each input; here once, to the size the model will run at
        size = image_size or preprocess.crop_size
        if size != cfg.image_size:
            model.set_image_size(size, antialias=False)  # as Dinov2Embeddings.interpolate_pos_encoding does
            ckpt.preprocess = dataclasses.replace(preprocess, crop_size=size)
    return ckpt


def _hf_preprocess(path: Path, cfg: ViTConfig) -> tuple[Preprocess, bool]:
    """The directory's preprocessing, and whether ``preprocessor_config.json`` named its mean and std."""
    pp: dict[str, Any] = {}
    if (path / "preprocessor_config.json").exists():
        pp = json.loads((path / "preprocessor_config.json").read_text())
    size = pp.get("size", {})
    resize = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
    crop = pp.get("crop_size", {})
    crop = crop.get("height") if isinstance(crop, dict) else crop
    crop = crop if pp.get("do_center_crop") else None
    c = cfg.in_chans
    return Preprocess(
        crop_size=crop or cfg.image_size, in_chans=c, resize_size=resize or None,
        interpolation={2: "bilinear", 3: "bicubic", 0: "nearest"}.get(pp.get("resample", 2), "bilinear"),
        mean=tuple(pp.get("image_mean", (0.5,) * c)), std=tuple(pp.get("image_std", (0.5,) * c)),
    ), "image_mean" in pp and "image_std" in pp


def _convert_dinov2(state: State, overrides: dict, hf: dict) -> tuple[dict, State]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2ForImageClassification`` (transformers 4.x and 5.x key names):
    pre-norm blocks with LayerScale, and a classifier on the class token beside the mean patch token."""
    if hf.get("use_swiglu_ffn"):
        raise CheckpointError("this DINOv2 uses a SwiGLU MLP (the giant models), which the canonical ViT does not "
                              "have; export it to ONNX and pass the .onnx file instead")
    p = "dinov2." if any(k.startswith("dinov2.") for k in state) else ""
    depth = _depth(state, rf"{re.escape(p)}encoder\.layer\.(\d+)\.")
    w = state[f"{p}embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    D, patch = w.shape[0], w.shape[-1]
    if f"{p}embeddings.mask_token" in state:
        state[f"{p}embeddings.mask_token"]  # read on purpose: DINOv2's masked-image training token, unused here
    out: State = {
        "patch_embed.proj.weight": w, "patch_embed.proj.bias": state[f"{p}embeddings.patch_embeddings.projection.bias"],
        "cls_token": state[f"{p}embeddings.cls_token"], "pos_embed": state[f"{p}embeddings.position_embeddings"],
        "norm.weight": state[f"{p}layernorm.weight"], "norm.bias": state[f"{p}layernorm.bias"],
    }
    new = f"{p}encoder.layer.0.attention.q_proj.weight" in state  # transformers 5.x names
    names = (("q_proj", "k_proj", "v_proj"), "o_proj") if new else \
        (("attention.query", "attention.key", "attention.value"), "output.dense")
    for i in range(depth):
        src, dst = f"{p}encoder.layer.{i}", f"blocks.{i}"
        qkv = [f"{src}.attention.{n}" for n in names[0]]
        out[f"{dst}.attn.qkv.weight"] = torch.cat([state[f"{n}.weight"] for n in qkv])
        out[f"{dst}.attn.qkv.bias"] = torch.cat([state[f"{n}.bias"] for n in qkv])
        for ours, theirs in (("attn.proj", f"attention.{names[1]}"), ("norm1", "norm1"), ("norm2", "norm2"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"{dst}.{ours}.weight"], out[f"{dst}.{ours}.bias"] = state[f"{src}.{theirs}.weight"], \
                state[f"{src}.{theirs}.bias"]
        out[f"{dst}.ls1.gamma"] = state[f"{src}.layer_scale1.lambda1"]
        out[f"{dst}.ls2.gamma"] = state[f"{src}.layer_scale2.lambda1"]
    if "classifier.weight" in state:
        out["head.weight"], out["head.bias"] = state["classifier.weight"], state["classifier.bias"]
        num_classes = out["head.weight"].shape[0]
    elif "num_classes" in overrides:
        num_classes = overrides["num_classes"]
    else:
        raise CheckpointError("this DINOv2 checkpoint is a backbone without a classifier; give the classes it will "
                              "learn (--set model.num_classes=N) and train the new head with `compress train --init`")
    values: dict[str, Any] = {
        "embed_dim": D, "in_chans": w.shape[1], "patch_size": patch, "depth": depth,
        "image_size": grid_from_pos_embed(out["pos_embed"].shape[1], 1) * patch,
        "mlp_dim": tuple(out[f"blocks.{j}.mlp.fc1.weight"].shape[0] for j in range(depth)),
        "num_classes": num_classes, "qkv_bias": True, "class_token": True, "pool": "cls_mean",
        "final_norm": "token", "layer_scale_init": 1.0, "norm_eps": hf.get("layer_norm_eps", 1e-6),
        "act": "gelu", "num_heads": hf.get("num_attention_heads", D // 64),
    }
    if D % values["num_heads"]:
        raise CheckpointError(f"DINOv2 config.json gives {values['num_heads']} heads for width {D}")
    values["head_dim"] = D // values["num_heads"]
    return values, out


def _convert_hf(state: State, overrides: dict, hf: dict) -> tuple[dict, State]:
    p = "deit" if any(k.startswith("deit.") for k in state) else "vit"
    new_layout = any(k.startswith(f"{p}.layers.") for k in state)
    depth = _depth(state, rf"{p}\.(?:layers|encoder\.layer)\.(\d+)\.")
    w = state[f"{p}.embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    has_dist = f"{p}.embeddings.distillation_token" in state
    head = "cls_classifier" if "cls_classifier.weight" in state else "classifier"
    out: State = {
        "patch_embed.proj.weight": w,
        "patch_embed.proj.bias": state[f"{p}.embeddings.patch_embeddings.projection.bias"],
        "cls_token": state[f"{p}.embeddings.cls_token"],
        "pos_embed": state[f"{p}.embeddings.position_embeddings"],
        "norm.weight": state[f"{p}.layernorm.weight"], "norm.bias": state[f"{p}.layernorm.bias"],
        "head.weight": _require(state, f"{head}.weight", "Hugging Face"), "head.bias": state[f"{head}.bias"],
    }
    if has_dist:
        out["dist_token"] = state[f"{p}.embeddings.distillation_token"]
    if "distillation_classifier.weight" in state:
        out["head_dist.weight"] = state["distillation_classifier.weight"]
        out["head_dist.bias"] = state["distillation_classifier.bias"]
    names = (
        {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
         "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        if new_layout else
        {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
         "o": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense"}
    )
    layer = f"{p}.layers" if new_layout else f"{p}.encoder.layer"
    for i in range(depth):
        src, dst = f"{layer}.{i}", f"blocks.{i}"
        qkv = [f"{src}.{names[t]}" for t in "qkv"]
        out[f"{dst}.attn.qkv.weight"] = torch.cat([state[f"{n}.weight"] for n in qkv])
        if f"{qkv[0]}.bias" in state:
            out[f"{dst}.attn.qkv.bias"] = torch.cat([state[f"{n}.bias"] for n in qkv])
        for ours, theirs in (("attn.proj", names["o"]), ("mlp.fc1", names["fc1"]), ("mlp.fc2", names["fc2"]),
                             ("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            out[f"{dst}.{ours}.weight"] = state[f"{src}.{theirs}.weight"]
            out[f"{dst}.{ours}.bias"] = state[f"{src}.{theirs}.bias"]
    hidden = hf.get("hidden_size", w.shape[0])
    heads = hf.get("num_attention_heads")
    values: dict[str, Any] = {
        "embed_dim": w.shape[0], "in_chans": w.shape[1], "patch_size": w.shape[-1], "depth": depth,
        "image_size": grid_from_pos_embed(out["pos_embed"].shape[1], 1 + has_dist) * w.shape[-1],
        "mlp_dim": tuple(out[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)),
        "num_classes": out["head.weight"].shape[0], "qkv_bias": "blocks.0.attn.qkv.bias" in out,
        "class_token": True, "dist_token": has_dist, "dist_head": "head_dist.weight" in out,
        "final_norm": "token", "pool": "cls", "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "act": {"gelu": "gelu", "relu": "relu"}.get(hf.get("hidden_act", "gelu"), "gelu"),
    }
    if hf.get("hidden_act", "gelu") not in ("gelu", "relu"):
        raise CheckpointError(f"Hugging Face hidden_act={hf['hidden_act']!r} is not supported; only 'gelu' and 'relu'")
    values |= ({"num_heads": heads, "head_dim": hidden // heads} if heads and "num_heads" not in overrides
               else _heads(out["blocks.0.attn.proj.weight"].shape[1], overrides, "Hugging Face"))
    return values, out


# -------------------------------------------------------------------------------------------- vit-pytorch
def _convert_vit_pytorch(state: State, overrides: dict) -> tuple[dict, State]:
    """Every vit-pytorch ``ViT`` layout since its first release. Linear patch embeddings see patches flattened as
    (p1 p2 c) (einops).

    - current: ``to_patch_embedding`` = Rearrange, LayerNorm, Linear, LayerNorm; a final ``transformer.norm``; a
      Linear ``mlp_head``;
    - 2021: ``to_patch_embedding`` = Rearrange, Linear; ``Residual(PreNorm(...))`` blocks; ``mlp_head`` = LayerNorm,
      Linear;
    - 2020 (before 2021-02-19): ``patch_to_embedding``, and until 2020-12-07 an MLP head (LayerNorm, Linear, GELU,
      Linear; at first without the LayerNorm). Until 2021-01-21 attention scaled its logits by the model width,
      ``dim ** -0.5``, not the head width (vit-pytorch commit 85314cf): that factor is folded into the query
      weights, so the canonical attention computes the same numbers.
    """
    depth = _depth(state, r"transformer\.layers\.(\d+)\.")
    if "to_patch_embedding.2.weight" in state:  # current: Rearrange, LayerNorm, Linear, LayerNorm
        lin, pre, post = "to_patch_embedding.2", "to_patch_embedding.1", "to_patch_embedding.3"
    elif "patch_to_embedding.weight" in state:  # 2020: a Linear beside a rearrange in forward()
        lin, pre, post = "patch_to_embedding", None, None
    else:  # 2021: Rearrange, Linear
        lin, pre, post = "to_patch_embedding.1", None, None
    w = _require(state, f"{lin}.weight", "vit-pytorch")  # (D, p*p*c)
    D, patch_dim = w.shape
    c = 3 if _is_square(patch_dim // 3) and patch_dim % 3 == 0 else 1
    c = overrides.get("in_chans", c)
    p = round((patch_dim // c) ** 0.5)
    if p * p * c != patch_dim:
        raise CheckpointError(f"vit-pytorch patch embedding of width {patch_dim} is not channels x patch x patch; set model.in_chans")
    to_conv = lambda t: t.reshape(*t.shape[:-1], p, p, c).movedim(-1, -3)  # (..., p, p, c) -> (..., c, p, p)
    cls = state["cls_token"]
    has_cls = cls.numel() > 0
    out: State = {
        "patch_embed.proj.weight": to_conv(w),  # (D, c, p, p)
        "patch_embed.proj.bias": state[f"{lin}.bias"],
        "pos_embed": state["pos_embedding"].reshape(1, -1, D),
    }
    if has_cls:
        out["cls_token"] = cls.reshape(1, 1, D)
    if pre is not None:
        out["patch_embed.norm_pre.weight"] = to_conv(state[f"{pre}.weight"]).flatten()
        out["patch_embed.norm_pre.bias"] = to_conv(state[f"{pre}.bias"]).flatten()
        out["patch_embed.norm.weight"], out["patch_embed.norm.bias"] = state[f"{post}.weight"], state[f"{post}.bias"]
    heads_inner = None
    for i in range(depth):
        a, f, dst = f"transformer.layers.{i}.0", f"transformer.layers.{i}.1", f"blocks.{i}"
        qkv_key = next(k for k in state if re.fullmatch(rf"{re.escape(a)}\.(fn\.)*to_qkv\.weight", k))
        attn = qkv_key.removesuffix(".to_qkv.weight")
        out[f"{dst}.attn.qkv.weight"] = state[qkv_key]
        inner = state[qkv_key].shape[0] // 3
        heads_inner = heads_inner or inner
        to_out = next((f"{attn}.{m}" for m in ("to_out.0", "to_out") if f"{attn}.{m}.weight" in state), None)
        if to_out is not None:
            out[f"{dst}.attn.proj.weight"], out[f"{dst}.attn.proj.bias"] = state[f"{to_out}.weight"], state[f"{to_out}.bias"]
        else:  # vit-pytorch uses no output projection for a single head as wide as the model
            out[f"{dst}.attn.proj.weight"], out[f"{dst}.attn.proj.bias"] = torch.eye(D), torch.zeros(D)
        norm1 = f"{a}.norm" if f"{a}.norm.weight" in state else f"{a}.fn.norm"
        if f"{f}.net.0.weight" in state and state[f"{f}.net.0.weight"].ndim == 1:  # current: LayerNorm inside net
            norm2, fc1, fc2 = f"{f}.net.0", f"{f}.net.1", f"{f}.net.4"
        else:  # net = Linear, GELU, [Dropout,] Linear[, Dropout]: the second Linear is net.2 or net.3
            ff = next(k for k in state if re.fullmatch(rf"{re.escape(f)}\.(fn\.)*net\.0\.weight", k)).removesuffix(".net.0.weight")
            norm2 = f"{f}.norm" if f"{f}.norm.weight" in state else f"{f}.fn.norm"
            fc1, fc2 = f"{ff}.net.0", _sequential_linears(state, f"{ff}.net")[-1]
        for ours, theirs in (("norm1", norm1), ("norm2", norm2), ("mlp.fc1", fc1), ("mlp.fc2", fc2)):
            out[f"{dst}.{ours}.weight"], out[f"{dst}.{ours}.bias"] = state[f"{theirs}.weight"], state[f"{theirs}.bias"]
    final_norm, head_hidden = "none", ()
    if "transformer.norm.weight" in state:  # current: a final norm over every token, then a Linear head
        out["norm.weight"], out["norm.bias"] = state["transformer.norm.weight"], state["transformer.norm.bias"]
        final_norm = "token"
    if "mlp_head.weight" in state:
        out["head.weight"], out["head.bias"] = state["mlp_head.weight"], state["mlp_head.bias"]
    else:  # older: mlp_head = [LayerNorm,] Linear[, GELU, [Dropout,] Linear] after pooling
        if "mlp_head.0.weight" in state and state["mlp_head.0.weight"].ndim == 1:
            out["fc_norm.weight"], out["fc_norm.bias"] = state["mlp_head.0.weight"], state["mlp_head.0.bias"]
            final_norm = "pooled"
        linears = _sequential_linears(state, "mlp_head")
        if not linears:
            raise KeyError("mlp_head.1.weight")
        for j, name in enumerate(linears[:-1]):
            out[f"head_hidden.{2 * j}.weight"], out[f"head_hidden.{2 * j}.bias"] = state[f"{name}.weight"], state[f"{name}.bias"]
        out["head.weight"], out["head.bias"] = state[f"{linears[-1]}.weight"], state[f"{linears[-1]}.bias"]
        head_hidden = tuple(state[f"{name}.weight"].shape[0] for name in linears[:-1])
    pool = overrides.pop("pool", "cls" if has_cls else "mean")
    if has_cls and pool == "mean":
        pool = "mean_all"  # vit-pytorch averages over every token, the class token included
    values: dict[str, Any] = {
        "embed_dim": D, "in_chans": c, "patch_size": p, "depth": depth,
        "image_size": grid_from_pos_embed(out["pos_embed"].shape[1], int(has_cls)) * p,
        "mlp_dim": tuple(out[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)),
        "num_classes": out["head.weight"].shape[0], "qkv_bias": False, "class_token": has_cls,
        "pool": pool, "final_norm": final_norm, "norm_eps": 1e-5, "head_hidden": head_hidden,
        "patch_pre_norm": pre is not None, "patch_post_norm": pre is not None,
    }
    values |= _heads(heads_inner, overrides, "vit-pytorch")
    scale = overrides.pop("attention_scale", "width" if lin == "patch_to_embedding" else "head")
    if scale not in ("width", "head"):
        raise ConfigError(f"model.attention_scale={scale!r} is not 'width' (dim ** -0.5, vit-pytorch before "
                          "2021-01-21) or 'head' (dim_head ** -0.5)")
    if scale == "width":
        log.info("vit-pytorch 2020 layout: attention scaled by the model width (dim ** -0.5), as vit-pytorch did "
                 "before 2021-01-21; set model.attention_scale='head' for a checkpoint from 2021-01-21 to 2021-02-19")
        factor = (values["head_dim"] / D) ** 0.5  # D**-0.5 over the canonical head_dim**-0.5
        for i in range(depth):
            q, k, v = out[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q * factor, k, v])
    return values, out


def _sequential_linears(state: State, prefix: str) -> list[str]:
    """The Linear layers (2-D weights) of an ``nn.Sequential`` at ``prefix``, in order: ``[prefix.0, prefix.3]``."""
    found = {int(m.group(1)) for k, t in state.items() for m in [re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.weight", k)]
             if m and t.ndim == 2}
    return [f"{prefix}.{n}" for n in sorted(found)]


def _is_square(n: int) -> bool:
    return n > 0 and round(n**0.5) ** 2 == n


# ------------------------------------------------------------------------------- torch.nn.TransformerEncoder
def _mha_blocks(state: State) -> tuple[str, str, int]:
    """(prefix of the block list, the attention module's name, depth) of blocks built around
    ``nn.MultiheadAttention``: ``encoder.layers.N.self_attn`` in ``nn.TransformerEncoder``, ``transformer.N.attn`` in
    a home-written ViT."""
    first = next(k for k in state if re.search(r"\.0\.\w+\.in_proj_weight$", k))
    m = re.search(r"^(.*?)0\.(\w+)\.in_proj_weight$", first)
    blocks, attn = m.group(1), m.group(2)
    return blocks, attn, _depth(state, rf"{re.escape(blocks)}(\d+)\.{re.escape(attn)}\.in_proj_weight$")


def _block_parts(state: State, src: str, attn: str, D: int) -> dict[str, str]:
    """A block's modules by shape: its two LayerNorms in module order, the Linear into the hidden width and the one
    out of it (nn.TransformerEncoderLayer's names, or any others)."""
    names = sorted({k.removeprefix(src).rsplit(".", 1)[0] for k in state if k.startswith(src)
                    and not k.removeprefix(src).startswith(f"{attn}.")},
                   key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    norms = [n for n in names if state[f"{src}{n}.weight"].ndim == 1 and state[f"{src}{n}.weight"].shape[0] == D]
    linears = [n for n in names if state[f"{src}{n}.weight"].ndim == 2]
    into = [n for n in linears if state[f"{src}{n}.weight"].shape[1] == D]
    out_of = [n for n in linears if state[f"{src}{n}.weight"].shape[0] == D and n not in into[:1]]
    if len(norms) != 2 or len(linears) != 2 or not into or not out_of:
        raise CheckpointError(f"block {src.rstrip('.')} holds {len(norms)} LayerNorm(s) and {len(linears)} Linear(s) "
                              f"beside its attention ({', '.join(names)}); a ViT block has two of each: rename its "
                              "keys with [model] key_map, or export it to ONNX and pass the .onnx file")
    return {"norm1": norms[0], "norm2": norms[1], "mlp.fc1": into[0], "mlp.fc2": out_of[0]}


def _convert_torch_encoder(state: State, overrides: dict) -> tuple[dict, State]:
    """A ViT around ``nn.TransformerEncoder``, or around blocks of the user's own built on
    ``nn.MultiheadAttention``: the packed attention by its names (``in_proj_weight``, ``out_proj``), everything
    else by shape (a block's LayerNorms in module order, its Linear into and out of the hidden width; outside the
    blocks, class token, position embedding, patch embedding, final LayerNorm and head)."""
    blocks, attn, depth = _mha_blocks(state)
    D = state[f"{blocks}0.{attn}.in_proj_weight"].shape[1]
    inside = re.compile(rf"^{re.escape(blocks)}\d+\.")
    outside = {k: v for k, v in state.items() if not inside.match(k)}
    tokens = [k for k, v in outside.items() if v.ndim == 3 and v.shape[0] == 1 and v.shape[-1] == D]
    cls = [k for k in tokens if state[k].shape[1] == 1]
    pos = [k for k in tokens if state[k].shape[1] > 1]
    convs = [k for k, v in outside.items() if v.ndim == 4 and v.shape[0] == D]
    linears = [k for k, v in outside.items() if k.endswith("weight") and v.ndim == 2]
    heads = [k for k in linears if state[k].shape[1] == D and state[k].shape[0] != D]
    patch_lin = [k for k in linears if state[k].shape[0] == D and k not in heads]
    if len(pos) != 1 or len(cls) > 1 or len(heads) != 1 or len(convs) + len(patch_lin) != 1:
        raise CheckpointError(
            "cannot identify the patch embedding, position embedding and head around this nn.TransformerEncoder "
            f"(position embeddings {pos}, class tokens {cls}, heads {heads}, patch embeddings {convs + patch_lin}); "
            "expected exactly one of each (the class token is optional)"
        )
    out: State = {"pos_embed": state[pos[0]]}
    if convs:
        proj = convs[0].removesuffix(".weight")
        out["patch_embed.proj.weight"] = state[convs[0]]
        c, p = state[convs[0]].shape[1], state[convs[0]].shape[-1]
    else:
        proj = patch_lin[0].removesuffix(".weight")
        w = state[patch_lin[0]]  # (D, p*p*c), patches flattened (p1 p2 c) as einops' Rearrange does
        c = overrides.get("in_chans", 3 if patch_lin and w.shape[1] % 3 == 0 and _is_square(w.shape[1] // 3) else 1)
        p = round((w.shape[1] // c) ** 0.5)
        out["patch_embed.proj.weight"] = w.reshape(D, p, p, c).permute(0, 3, 1, 2)
    out["patch_embed.proj.bias"] = state[f"{proj}.bias"]
    if cls:
        out["cls_token"] = state[cls[0]]
    head = heads[0].removesuffix(".weight")
    out["head.weight"], out["head.bias"] = state[heads[0]], state[f"{head}.bias"]
    final_norm = "none"
    norms = [k.removesuffix(".weight") for k, v in outside.items() if k.endswith(".weight") and v.ndim == 1
             and v.shape[0] == D and f"{k.removesuffix('.weight')}.bias" in outside]
    own = f"{blocks.removesuffix('layers.')}norm"  # nn.TransformerEncoder's own final norm, beside its layers
    if len(norms) > 1 and own in norms:
        norms = [own]  # any other is left unplaced, and the load names it
    if len(norms) > 1:
        raise CheckpointError(f"{len(norms)} LayerNorms outside the blocks ({', '.join(norms)}), where a ViT has at "
                              "most a final one: rename its keys with [model] key_map, or export it to ONNX")
    if norms:  # the encoder's final norm (nn.TransformerEncoder's `norm`, or a top-level one)
        out["norm.weight"], out["norm.bias"] = state[f"{norms[0]}.weight"], state[f"{norms[0]}.bias"]
        final_norm = "token"
    for i in range(depth):
        src, dst = f"{blocks}{i}.", f"blocks.{i}"
        out[f"{dst}.attn.qkv.weight"] = state[f"{src}{attn}.in_proj_weight"]
        if f"{src}{attn}.in_proj_bias" in state:
            out[f"{dst}.attn.qkv.bias"] = state[f"{src}{attn}.in_proj_bias"]
        parts = {"attn.proj": f"{attn}.out_proj"} | _block_parts(state, src, attn, D)
        for ours, theirs in parts.items():
            out[f"{dst}.{ours}.weight"], out[f"{dst}.{ours}.bias"] = state[f"{src}{theirs}.weight"], state[f"{src}{theirs}.bias"]
    values: dict[str, Any] = {
        "embed_dim": D, "in_chans": c, "patch_size": p, "depth": depth,
        "image_size": grid_from_pos_embed(out["pos_embed"].shape[1], int(bool(cls))) * p,
        "mlp_dim": tuple(out[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)),
        "num_classes": out["head.weight"].shape[0], "qkv_bias": "blocks.0.attn.qkv.bias" in out,
        "class_token": bool(cls), "pool": "cls" if cls else "mean", "final_norm": final_norm,
        # PyTorch's defaults for TransformerEncoderLayer: post-norm, ReLU, eps 1e-5. Override as the model was built.
        "pre_norm": False, "act": "relu", "norm_eps": 1e-5,
    }
    values |= _heads(D, overrides, "nn.TransformerEncoder", head_dim_default=None)
    return values, out
