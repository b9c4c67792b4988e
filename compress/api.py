"""The Python API: every step of the pipeline as one function, for notebooks and scripts.

In the shape of ``nncf.quantize(model, calibration_dataset, *, ...)``: required inputs are positional, options
keyword-only, and each function does one whole job and checks its own result. The ``compress`` command is a thin
layer over ``train_model`` and ``run_recipe``; ``examples/api_tour.py`` uses every function here.

    import compress

    ckpt = compress.load_model("model.safetensors")                       # any supported checkpoint
    data = compress.load_data("cifar10/", ckpt.preprocess)                 # train / calib / eval splits
    model = compress.prune_model(ckpt.model, heads=0.25, mlp=0.25)         # structured pruning
    model = compress.reduce_tokens(model, method="tome", r=4)              # token merging
    compress.export_model(model, "model.onnx", data.example(32))           # ONNX, checked against PyTorch
    int8 = compress.quantize_onnx("model.onnx", data.calib, data.eval)     # INT8 within 1 pt of top-1
    print(compress.measure(int8.path, runtime="openvino", eval_data=data.eval))
    result = compress.run_recipe("model.safetensors", "cifar10/", out="runs/x", recipe="cpu-latency")
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from calibration.datasets import Subset
    from compress.config import RunConfig
    from calibration.preprocess import Preprocess
    from compress.model.checkpoint import Checkpoint
    from compress.model.onnx_model import OnnxModel
    from compress.model.vit import VisionTransformer
    from compress.quantize.base import Candidate
    from compress.run.pipeline import RunResult
    from export.onnx_export import ExportResult

Progress = Callable[[str, int, int], None]  # (what, done, total)


# ------------------------------------------------------------------------------------------------- inputs
def load_model(path: str | Path, *, recipe: str | Path | RunConfig | None = None,
               overrides: Sequence[str] = ()) -> Checkpoint | OnnxModel:
    """Load a ViT checkpoint, or an ONNX classifier, with its preprocessing and class names.

    Args:
        path: our ``.safetensors``, a timm / vit-pytorch / ``nn.TransformerEncoder`` state dict, a Hugging Face
            model directory (the README's formats table lists each layout), or an ``.onnx`` image classifier
            (NCHW in, logits out; give its ``preprocess.mean`` and ``preprocess.std``: the file records none).
        recipe: a TOML recipe or a built-in recipe's name, for its ``[model]`` and ``[preprocess]`` sections.
        overrides: ``section.key=value`` settings, as ``--set`` takes them (e.g. ``"model.image_size=224"``).

    Returns a ``Checkpoint`` (``.model``, ``.preprocess``, ``.classes``), or for an ONNX file an ``OnnxModel``
    (``.path``, ``.preprocess``, ``.classes``; ``.model`` is None; ``run_recipe`` lifts the ViT out of it when a
    stage needs the module). With ``model.onnx_output`` (an encoder inside a larger graph) the ONNX file's ViT is
    lifted here, into a ``Checkpoint`` with a new head of ``model.num_classes``. Raises ``CheckpointError`` for a
    file that is not a ViT checkpoint or classifier, naming what is wrong.
    """
    return _load(Path(path), _config(recipe, overrides))


@dataclass(frozen=True)
class Dataset:
    """An image dataset in the three splits a run draws: training, calibration and evaluation."""

    train: Subset
    calib: Subset
    eval: Subset

    def example(self, n: int = 2) -> np.ndarray:
        """The first ``n`` evaluation images, preprocessed: (n, C, H, W) float32."""
        return next(self.eval.batches(n))[0]


def load_data(path: str | Path, preprocess: Preprocess, *, calib_size: int = 512, eval_fraction: float = 0.2,
              eval_limit: int | None = None, seed: int = 0) -> Dataset:
    """Open an image dataset and draw stratified, seeded, disjoint splits, as ``compress run`` does.

    Args:
        path: an ImageFolder (``class/image.jpg``; ``train/`` and ``test/`` parts are honoured), an idx folder
            (MNIST), or ``builtin:digits``.
        preprocess: the model's preprocessing (``load_model(...).preprocess``).
        calib_size: images set aside for calibration (at most a tenth of the pool).
        eval_fraction: the share held out for evaluation when the dataset has no test part.
        eval_limit: evaluate on at most this many images (a seeded random sample of the split).
        seed: the seed of the split.
    """
    from calibration.datasets import Subset, make_splits, open_source

    source = open_source(str(path))
    splits = make_splits(source, calib_size=calib_size, eval_fraction=eval_fraction, seed=seed)
    return Dataset(Subset(source, splits.train, preprocess), Subset(source, splits.calib, preprocess),
                   Subset(source, splits.eval[:eval_limit], preprocess))


# --------------------------------------------------------------------------------------------- transforms
def prune_model(model: VisionTransformer, *, heads: float = 0.0, mlp: float = 0.0, target_macs: float | None = None,
                importance: Literal["l2", "taylor", "fisher"] = "l2", data: Subset | None = None,
                targets: Literal["labels", "predictions", "soft"] = "labels", search: bool = False,
                rearrange: bool = False, reconstruct: bool = False,
                reconstruct_fit: Literal["scales", "weights"] = "weights", min_heads_per_layer: int = 1,
                mlp_round_to: int = 1, scope: Literal["global", "layer"] = "global",
                target_latency: float | None = None, target_runtime: Literal["onnxruntime", "openvino"] = "openvino",
                time_precision: Literal["fp32", "bf16", "int8"] = "fp32", threads: int | None = None
                ) -> VisionTransformer:
    """Remove attention heads and MLP hidden units; returns a new, smaller model. The same rules as ``[prune]``.

    Args:
        model: the ViT to prune (left unchanged).
        heads: share of all attention heads removed, in [0, 1).
        mlp: share of all MLP hidden units removed, in [0, 1).
        target_macs: instead of ``heads`` and ``mlp``, the fraction of the model's MACs to keep: one share for
            both, raised until it is met, or with ``search`` the heads and units the mask search finds.
        importance: ``"l2"`` (weight norms, no data), ``"taylor"`` (first-order loss change on ``data``) or
            ``"fisher"`` (squared per-image gradients on ``data``; Kwon et al. 2022).
        data: images for Taylor and Fisher importance and for ``reconstruct`` (e.g. ``load_data(...).calib``).
        targets: the loss against the labels, or the unpruned model's hard or soft predictions (no labels needed).
        search: with ``target_macs``, Kwon et al.'s mask search: every layer's heads and units ranked together.
        rearrange: with ``search`` and ``"fisher"``, Kwon et al.'s mask rearrangement within each layer.
        reconstruct: repair what is kept by least squares against ``model`` on up to 256 images of ``data``,
            without training.
        reconstruct_fit: what the repair fits: the whole ``attn.proj`` and ``mlp.fc2`` of every block
            (``"weights"``), or one scale per kept head and unit (``"scales"``, Kwon et al.'s mask tuning).
        min_heads_per_layer: never leave a layer with fewer heads.
        mlp_round_to: keep a multiple of this many MLP units per layer (aligned GEMM widths).
        scope: rank heads and units across all layers (``"global"``) or remove the same share from each.
        target_latency: with ``search``, instead of ``target_macs``: the fraction of the model's latency to keep,
            under a latency model fitted on ``target_runtime`` (``compress.prune.latency``: four evenly pruned
            copies exported and timed side by side: 20-25 s per copy in INT8 on a ViT-S at 224).
        target_runtime: where the latency model is timed, at batch 1 on the first image of ``data``.
        time_precision: what it is timed in: the precision the model will be deployed in (``"int8"``: each copy
            quantized by ``nncf.quantize`` on 32 images of ``data``, for timing only; BF16 and INT8 on OpenVINO).
        threads: threads of the timing runtime (default: every core).
    """
    from compress.config import load_config
    from compress.errors import ConfigError
    from compress.model.macs import count_macs
    from compress.prune.reconstruct import reconstruct as repair
    from compress.prune.structured import (check_layout, l2_importance, prune_by_ratio, prune_searched,
                                           prune_to_target, taylor_importance)

    settings = {"heads": heads, "mlp": mlp, "target_macs": target_macs, "importance": importance,
                "targets": targets, "search": search, "rearrange": rearrange, "reconstruct": reconstruct,
                "reconstruct_fit": reconstruct_fit, "min_heads_per_layer": min_heads_per_layer,
                "mlp_round_to": mlp_round_to, "scope": scope, "target_latency": target_latency,
                "target_runtime": target_runtime, "time_precision": time_precision}
    load_config(base={"prune": settings})  # the [prune] section's rules, with its one-line errors
    if time_precision == "auto":  # the config's "auto" is the precision a chain ends in; here there is no chain
        raise ConfigError("time_precision='auto' follows a run's quantize stage; prune_model has none: pass the "
                          "precision the model will be deployed in, 'fp32', 'bf16' or 'int8'")
    check_layout(model)
    if (importance != "l2" or reconstruct) and (data is None or len(data) == 0):
        needs = "reconstruct" if importance == "l2" else f"{importance.capitalize()} importance"
        raise ConfigError(f"{needs} needs images: pass data=load_data(...).calib"
                          + (", or importance='l2'" if importance != "l2" else ""))
    if importance == "l2":
        scores = l2_importance(model)
    else:  # gradients only; the weights are kept as they were
        scores = taylor_importance(model, data.batches(32), targets=targets, fisher=importance == "fisher",
                                   gram=rearrange, total=len(data))
    if search:
        costs = None if target_latency is None else _latency_model(
            model, data, runtime=target_runtime, precision=time_precision, threads=threads, mlp_round_to=mlp_round_to)
        pruned, _ = prune_searched(model, scores, target_macs if costs is None else target_latency,
                                   min_heads=min_heads_per_layer, mlp_round_to=mlp_round_to, rearrange=rearrange,
                                   costs=costs)
    elif target_macs is not None:
        shape = (1, model.config.in_chans, model.config.image_size, model.config.image_size)
        full = count_macs(model, shape)
        pruned = prune_to_target(model, scores, lambda m: count_macs(m, shape) / full, target_macs, what="MAC",
                                 unit="x the unpruned MACs", min_heads=min_heads_per_layer,
                                 mlp_round_to=mlp_round_to, scope=scope).model
    else:
        pruned = prune_by_ratio(model, scores, heads=heads, mlp=mlp, min_heads=min_heads_per_layer,
                                mlp_round_to=mlp_round_to, scope=scope)
    if reconstruct:
        repair(pruned, model, (x for x, _ in data.head(256).batches(32)), weights=reconstruct_fit == "weights")
    return pruned


def _latency_model(model: VisionTransformer, data: Subset, *, runtime: str, precision: str, threads: int | None,
                   mlp_round_to: int):
    """``prune_model``'s latency model: evenly pruned copies of ``model`` exported, made ready at ``precision`` and
    timed on ``runtime`` on the first image of ``data`` (``compress.prune.latency``)."""
    from calibration.calibrate import from_split
    from compress.prune.latency import fit_latency_model, timer
    from runtimes import default_threads

    x = np.ascontiguousarray(next(data.batches(8))[0], dtype=np.float32)  # (B, C, H, W) real images
    shape = tuple(x.shape[1:])
    time_models = timer(lambda m, path: export_model(m, path, x[:2], parity_inputs=x), precision, x[:1],
                        runtime=runtime, threads=threads or default_threads(),
                        calib=from_split(data, min(32, len(data)), shape) if precision == "int8" else None)
    return fit_latency_model(model, time_models, mlp_round_to=mlp_round_to,
                             label=f"{runtime} {precision.upper()}, batch 1")


def reduce_tokens(model: VisionTransformer, *, method: Literal["tome", "pitome", "evit", "resolution"] = "tome",
                  r: int | Sequence[int] | None = None, keep_rate: float | Sequence[float] | None = None,
                  layers: Sequence[int] | None = None,
                  schedule: Literal["constant", "decreasing", "first", "layers"] = "constant",
                  image_size: int | None = None, similarity: Literal["keys", "tokens"] = "keys") -> VisionTransformer:
    """A copy of ``model`` that merges (ToMe) or prunes (EViT) tokens inside the encoder, or runs the encoder at a
    lower resolution; it still exports, and still takes the model's input size.

    Args:
        model: the ViT (left unchanged).
        method: ``"tome"`` (Bolya et al., ICLR 2023), ``"pitome"`` (Tran et al., NeurIPS 2024), ``"evit"`` (Liang
            et al., ICLR 2022) or ``"resolution"``.
        r: ToMe, PiToMe: tokens merged away per layer, one int or one per layer.
        keep_rate: EViT: share of patch tokens kept at each of ``layers``, or one rate per layer.
        layers: EViT: where to prune (default: at 1/4, 1/2 and 3/4 of the depth); ToMe, PiToMe with
            ``schedule="layers"``: where ``r`` is merged.
        schedule: ToMe, PiToMe: an int ``r`` in every layer (``"constant"``), 2r falling to 0 (``"decreasing"``),
            ``r`` once in the first block (``"first"``), or ``r`` in each of ``layers`` (``"layers"``).
        image_size: resolution: the side the encoder works at, a multiple of the patch size below the input size.
        similarity: ToMe, PiToMe: match tokens on their attention keys averaged over heads (``"keys"``) or on the
            tokens themselves (``"tokens"``).

    Raises ``TokenError`` naming the largest valid value when the model cannot follow the setting.
    """
    from compress.config import TOKEN_SETTING
    from compress.tokens import MERGING, TokenError, apply, evit, resolution, tome

    depth = model.config.depth
    given = {"r": r, "keep_rate": keep_rate, "image_size": image_size}
    if method not in TOKEN_SETTING:
        raise TokenError(f"unknown token reduction method {method!r}; choose from {sorted(TOKEN_SETTING)}")
    takes = TOKEN_SETTING[method]
    stray = [k for k, v in given.items() if v is not None and k != takes]
    if given[takes] is None or stray:
        raise TokenError(f"{method} takes {takes}" + (f", not {', '.join(stray)}" if stray else ""))
    if similarity != "keys" and method not in MERGING:
        raise TokenError(f"similarity is what ToMe and PiToMe match on, not a setting of {method}")
    if method in MERGING:
        plan = tome(r if isinstance(r, int) else list(r), depth, schedule, method=method, layers=layers,
                    similarity=similarity)
    elif method == "evit":
        plan = evit(keep_rate if isinstance(keep_rate, (int, float)) else list(keep_rate), depth, layers)
    else:
        plan = resolution(image_size, model.config)
    return apply(copy.deepcopy(model), plan)


def export_model(model: VisionTransformer, path: str | Path, example: np.ndarray, *, opset: int = 18,
                 atol: float = 1e-4, min_agreement: float = 0.99, parity_inputs: np.ndarray | None = None,
                 simplify: Literal["onnxslim", "none"] = "onnxslim",
                 graph: Literal["standard", "openvino"] = "standard") -> ExportResult:
    """Export ``model`` to ONNX (dynamic batch), checked against PyTorch in ONNX Runtime before it is written.

    Args:
        model: the ViT (token reduction and pruning included).
        path: the ``.onnx`` file to write (atomically: a file that fails the parity check is never written).
        example: a (B, C, H, W) float32 batch; it fixes the input shape after the batch axis.
        opset: ONNX opset, 17 or later (LayerNorm stays one node).
        atol: the largest absolute logit difference accepted.
        min_agreement: the smallest share of inputs whose top-1 must agree.
        parity_inputs: the inputs compared (default: ``example``); real images make the check meaningful.
        simplify: ``"onnxslim"`` folds what the exporter leaves; ``"none"`` keeps its graph.
        graph: ``"openvino"`` writes the model as OpenVINO runs it fastest (``compress.model.runtime_graph``: qkv
            split, LayerScale folded, attention scores as an einsum; the same numbers), ``"standard"`` as it is.
    """
    import torch

    from compress.model.runtime_graph import for_runtime
    from export.onnx_export import export_onnx

    example = np.ascontiguousarray(example, dtype=np.float32)
    return export_onnx(for_runtime(model, graph), Path(path), example=torch.from_numpy(example[:2]), opset=opset,
                       simplify=simplify, atol=atol, min_agreement=min_agreement,
                       parity_inputs=example if parity_inputs is None else parity_inputs)


QuantizerName = Literal["onnxruntime-static", "onnxruntime-dynamic", "nncf", "fp16"]


def quantize_onnx(onnx_path: str | Path, calibration: Subset | np.ndarray, eval_data: Subset, *,
                  out_dir: str | Path | None = None, quantizer: QuantizerName = "onnxruntime-static", max_drop: float = 1.0,
                  exclude: Sequence[str] = (), method: Literal["minmax", "entropy", "percentile"] = "minmax",
                  max_float_fraction: float = 0.5, threads: int | None = None) -> Candidate:
    """Quantize an ONNX classifier, keeping top-1 within ``max_drop`` points of the float model on ``eval_data``.

    Layers are returned to float, most sensitive first, until the candidate is within budget (at most
    ``max_float_fraction`` of them); ``QuantizeError`` when even that is not enough.

    Args:
        onnx_path: the float model (NCHW input, logits out).
        calibration: a calibration split (``load_data(...).calib``) or a (N, C, H, W) float32 array of inputs.
        eval_data: labelled images the budget is judged on.
        out_dir: where the candidate is written (default: ``quantized/`` beside ``onnx_path``).
        quantizer: ONNX Runtime static Q/DQ or dynamic INT8, NNCF INT8 (OpenVINO IR), or FP16.
        max_drop: the accuracy budget, top-1 points against the float model.
        exclude: layer names or glob patterns kept in float (e.g. ``"head"``, ``"blocks.11.*"``).
        method: ONNX Runtime static calibration method.
        max_float_fraction: the share of quantizable layers the budget may return to float.
        threads: threads for evaluation (default: every core).
    """
    from calibration.calibrate import from_array, from_split
    from compress.quantize.base import QuantizeContext, QuantizeError, artifact_evaluator
    from compress.quantize.stage import build_candidates
    from runtimes import default_threads

    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir) if out_dir is not None else onnx_path.parent / "quantized"
    threads = threads or default_threads()
    pre = eval_data.preprocess
    shape = (pre.in_chans, pre.crop_size, pre.crop_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(calibration, np.ndarray):
        array_path = out_dir / "calibration.npy"
        np.save(array_path, np.ascontiguousarray(calibration, dtype=np.float32))
        calib = from_array(array_path, len(calibration), shape)  # checks the shape against the model's input
    else:
        calib = from_split(calibration, min(256, len(calibration)), shape)
    evaluate = artifact_evaluator(eval_data, threads=threads)
    ctx = QuantizeContext(model=None, float_onnx=onnx_path, calib=calib, evaluate=evaluate,
                          reference_top1=evaluate(onnx_path, "onnx", "fp32"), max_drop=max_drop, workdir=out_dir,
                          max_float_fraction=max_float_fraction, exclude=tuple(exclude), calibration_method=method,
                          threads=threads, log=_log)
    candidates, missed = build_candidates(ctx, [quantizer], evaluate_torch=_no_torch,
                                          eval_batches=lambda: eval_data.batches(64), eval_count=len(eval_data),
                                          bf16_available=False)
    fitting = [c for c in candidates if ctx.within_budget(c.top1)]
    if not fitting:
        raise QuantizeError(f"{quantizer}: " + ("; ".join(missed) or "no candidate") +
                            "; raise max_drop, or exclude the most sensitive layers")
    return fitting[0]


# ---------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Measurement:
    """Top-1 on the evaluation images (None without them) and latency statistics per batch size."""

    runtime: str
    precision: str
    top1: float | None
    latency: dict[int, Any]  # batch size -> runtimes.LatencyStats

    def __str__(self) -> str:
        top1 = f"top-1 {self.top1 * 100:.2f}%, " if self.top1 is not None else ""
        times = ", ".join(f"p50 {s.latency_ms_p50:.3f} ms at batch {b}" for b, s in self.latency.items())
        return f"{self.runtime} {self.precision}: {top1}{times}"


def measure(artifact: str | Path, *, runtime: str = "onnxruntime", precision: str = "fp32",
            eval_data: Subset | None = None, example: np.ndarray | None = None, batch_sizes: Sequence[int] = (1,),
            threads: int | None = None, iterations: int = 50, max_seconds: float = 10.0) -> Measurement:
    """Build an engine of ``artifact`` on ``runtime`` and measure its top-1 and latency, as every stage is measured.

    Args:
        artifact: an ONNX file (or OpenVINO IR ``.xml`` for ``runtime="openvino"``).
        runtime: ``onnxruntime``, ``openvino`` or ``tensorrt``.
        precision: what the runtime runs it in (``fp32``; ``bf16`` on OpenVINO; an INT8 or FP16 file runs as it is).
        eval_data: labelled images for top-1; their first batch is also the latency input.
        example: a (B, C, H, W) input for latency when there is no ``eval_data``.
        batch_sizes: the batch sizes timed.
        threads: threads of the runtime (default: every core).
        iterations, max_seconds: timed runs per batch size, and the time allowed for them.
    """
    from calibration.evaluate import evaluate_top1
    from compress.errors import InputError
    from runtimes import default_threads, get_runtime, measure_latency

    threads = threads or default_threads()
    engine = get_runtime(runtime).build(Path(artifact), precision=precision, threads=threads)
    top1 = evaluate_top1(engine.run, eval_data).top1 if eval_data is not None else None
    if example is None:
        if eval_data is None:
            raise InputError("measure needs eval_data or an example input to time")
        example = next(eval_data.batches(max(batch_sizes)))[0]
    x = np.concatenate([example] * -(-max(batch_sizes) // len(example)))  # (B_max, C, H, W)
    latency = {b: measure_latency(engine, x[:b], threads=threads, iterations=iterations, max_seconds=max_seconds)
               for b in batch_sizes}
    return Measurement(runtime, precision, top1, latency)


# ------------------------------------------------------------------------------------------- whole recipes
def train_model(data: str | Path, *, out: str | Path = "runs/train", recipe: str | Path | RunConfig | None = None,
                overrides: Sequence[str] = (), init: str | Path | None = None,
                progress: Callable[[Any], None] | None = None) -> tuple[Checkpoint, dict[str, Any]]:
    """Train a ViT (from scratch, or fine-tune ``init``) as ``compress train`` does; resumable in ``out``.

    Args:
        data: the dataset (``load_data``'s ``path``).
        out: the training directory: ``model.safetensors``, ``train.json``, and the state to resume from.
        recipe: a built-in recipe's name, a TOML file, or a ``RunConfig`` (``compress.config.load_config``).
        overrides: ``section.key=value`` settings, as ``--set`` takes them (e.g. ``"train.epochs=5"``).
        init: a checkpoint to fine-tune instead of training from scratch.
        progress: called with each step's ``TrainProgress``.

    Returns the trained checkpoint and the training summary (also written to ``out/train.json``).
    """
    from compress.train.job import train_job

    config = _config(recipe, overrides, data)
    ckpt = _load(Path(init), config, torch_module=True) if init is not None else None
    return train_job(config, Path(out), init=ckpt, progress=progress)


def run_recipe(checkpoint: str | Path | Checkpoint | OnnxModel, data: str | Path, *, out: str | Path | None = None,
               recipe: str | Path | RunConfig | None = None, overrides: Sequence[str] = (), checkpoint_id: str | None = None,
               progress: Progress | None = None) -> RunResult:
    """The whole staged pipeline, as ``compress run`` runs it: every stage measured on every runtime, the chain
    judged against its budget, ``out/records.jsonl`` and ``out/report.md`` written; resumes a run of the same
    inputs in ``out``.

    Args:
        checkpoint: a checkpoint or ONNX file's path, or what ``load_model`` returned.
        checkpoint_id: a stable name of the checkpoint, which a run is resumed by (default: the file's SHA-256;
            required for a ``Checkpoint`` object).
        data: the dataset (``load_data``'s ``path``).
        out: the run directory (default: ``runs/<checkpoint name>``).
        recipe: a built-in recipe's name (``cpu-latency``, ``jetson-latency``, ``digits-demo``), a TOML file, or
            a ``RunConfig`` (``compress.config.load_config``).
        overrides: ``section.key=value`` settings, as ``--set`` takes them.
        progress: called with (what, done, total) during long steps.
    """
    from compress.errors import InputError
    from compress.io import sha256_file, sha256_json
    from compress.model.checkpoint import Checkpoint
    from compress.model.onnx_model import OnnxModel
    from compress.run.pipeline import run_pipeline

    config = _config(recipe, overrides, data)
    if isinstance(checkpoint, OnnxModel) and checkpoint_id is None:
        checkpoint_id = sha256_file(checkpoint.path)
    if isinstance(checkpoint, (Checkpoint, OnnxModel)):
        if checkpoint_id is None:
            raise InputError("a Checkpoint object needs checkpoint_id= (any stable name for it): runs resume by it")
        ckpt = checkpoint
    else:
        path = Path(checkpoint)
        ckpt = _load(path, config)
        if checkpoint_id is None:
            checkpoint_id = sha256_file(path) if path.is_file() else sha256_json(
                {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()})
    named = not isinstance(checkpoint, (Checkpoint, OnnxModel))
    out = Path(out) if out is not None else Path("runs") / (Path(checkpoint).stem if named else checkpoint_id[:16])
    return run_pipeline(ckpt, checkpoint_id, config, out, progress=progress)


# ------------------------------------------------------------------------------------------------ helpers
def _recipe(recipe: str | Path | None) -> Path | None:
    return None if recipe is None else Path(recipe)


def _config(recipe: str | Path | RunConfig | None, overrides: Sequence[str], data: str | Path | None = None
            ) -> RunConfig:
    """defaults < recipe (a name, a TOML file, or a resolved ``RunConfig``) < overrides < ``data``."""
    from compress.config import RunConfig, load_config

    settings = [*overrides, *([f"data.path={_toml_string(data)}"] if data is not None else [])]
    if isinstance(recipe, RunConfig):
        return load_config(None, settings, base=recipe.dump())
    return load_config(_recipe(recipe), settings)


def _load(path: Path, config: RunConfig, *, torch_module: bool = False) -> Checkpoint | OnnxModel:
    """An ONNX classifier or a checkpoint, by the file's kind, with the config's [model] and [preprocess]. An ONNX
    file's ViT is lifted into a ``Checkpoint`` where the PyTorch module is needed (``torch_module``: training) or
    asked for (``model.onnx_output``: an encoder inside a larger graph); a run lifts it itself when a stage needs
    it."""
    from compress.model.importers import load_configured
    from compress.model.onnx_model import is_onnx, lift_checkpoint, load_onnx

    if not is_onnx(path):
        return load_configured(path, config)
    if torch_module or "onnx_output" in config.model:
        return lift_checkpoint(path, config)
    return load_onnx(path, config)


def _toml_string(value: str | Path) -> str:
    import json

    return json.dumps(str(value))  # a JSON string is a TOML basic string


def _log(message: str) -> None:
    import logging

    logging.getLogger("compress.api").info(message)


def _no_torch(module) -> float:
    raise AssertionError("quantize_onnx runs only ONNX-level quantizers")
