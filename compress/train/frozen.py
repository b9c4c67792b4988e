"""Training with a frozen prefix: what does not change is computed once per image and kept.

``train.frozen_blocks = N`` freezes the patch embedding, the prefix tokens, the position embedding and the first
N blocks. Their output does not depend on the step, so it is computed once for every training image (and every
evaluation image) and cached; each step then runs only the blocks after N and the head. With N equal to the
depth the whole backbone is frozen and the cache holds the pooled features the head reads: a linear probe, which
on a ViT-S at 224x224 costs one forward pass per image instead of one forward and backward pass per image per
epoch. This is how DINOv2's and CLIP's linear-probe evaluations are run (features extracted once, a linear
classifier fitted on them), and the partial form is the cheapest fine-tune that still moves the last blocks.

The cached inputs are fixed views: crop and flip augmentation do not apply (the images were seen once).

The one pass runs on the fastest engine here (``runtime="auto"``: OpenVINO or ONNX Runtime, whichever is faster on
a first batch, else PyTorch): the frozen prefix is exported to ONNX, checked against PyTorch on the first images,
and run in batches. For DINOv2 ViT-S/14 at 224x224 on this 2-core CPU that is about 130 ms per image in PyTorch
eager and 95-110 ms in ONNX Runtime and OpenVINO (BENCHMARKS.md, "The reference ViT-S").
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibration.datasets import Subset
from compress.errors import InputError
from compress.model.vit import VisionTransformer

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 8 << 30  # the largest cache kept in memory (10,000 ViT-S tokens after a block take 2 GB)


class FrozenPrefix:
    """The frozen front of ``model`` (``encode``) and the trainable rest (``tail``, a module for the optimizer)."""

    def __init__(self, model: VisionTransformer, blocks: int, *, runtime: str = "auto") -> None:
        depth = model.config.depth
        if not 0 < blocks <= depth:
            raise InputError(f"train.frozen_blocks={blocks}, but the model has {depth} blocks; give 1 to {depth} "
                             f"({depth}: a linear probe on frozen features), or 0 to train everything")
        if model.token_reduction is not None:
            raise InputError("train.frozen_blocks does not combine with token reduction (the tokens a block sees "
                             "depend on the blocks before it); fine-tune without freezing")
        self.model, self.blocks = model, blocks
        self.runtime = runtime  # asked for: "auto", "openvino", "onnxruntime" or "torch"
        self.ran_on: str | None = None  # where the outputs were computed, once they are
        self.probe = blocks == depth
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        self.tail = _Tail(self)
        self._runners: dict[str, Callable[[np.ndarray], torch.Tensor]] = {}
        cfg = model.config
        self.tokens = cfg.num_prefix_tokens + cfg.num_patches
        with torch.no_grad():
            self.feature_width = model.pool(torch.zeros(1, self.tokens, cfg.embed_dim)).shape[-1]  # what the head reads

    def frozen_modules(self) -> list[torch.nn.Module]:
        m = self.model
        return [m.patch_embed, m.norm_pre, *m.blocks[: self.blocks], *([m.norm, m.fc_norm] if self.probe else [])]

    def frozen_tokens(self) -> list[torch.nn.Parameter]:
        m = self.model
        return [t for t in (m.cls_token, m.dist_token, m.reg_token, m.pos_embed) if t is not None]

    def frozen_parameters(self) -> Iterator[torch.nn.Parameter]:
        for module in self.frozen_modules():
            yield from module.parameters()
        yield from self.frozen_tokens()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> the cached representation: tokens after block N (B, T, D), or the
        pooled features (B, F) for a probe."""
        m = self.model
        t = m.embed(x)
        for block in m.blocks[: self.blocks]:
            t = block(t)
        return m.pool(m.norm(t)) if self.probe else t

    def cache(self, data: Subset, *, batch_size: int = 64, what: str = "training",
              progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
        """``encode`` of every image of ``data``, in order, kept as float16 (float32 for a probe's small features),
        computed on the prefix's ``runtime`` (``auto``: the fastest installed; ``torch``: PyTorch eager).

        Logs the estimated time once the first batch is done when the whole pass will take more than a minute.
        """
        cfg = self.model.config
        per_image = self.feature_width * 4 if self.probe else self.tokens * cfg.embed_dim * 2
        if per_image * len(data) > CACHE_BUDGET_BYTES:
            raise InputError(f"caching the outputs of the {self.blocks} frozen blocks for {len(data):,} {what} images "
                             f"would take {per_image * len(data) / 2**30:.1f} GB; freeze all {cfg.depth} "
                             f"(train.frozen_blocks={cfg.depth}: {self.feature_width * 4:,} bytes per image) or "
                             "sample fewer images (data.train_limit)")
        shape = (len(data), self.feature_width) if self.probe else (len(data), self.tokens, cfg.embed_dim)
        out = torch.empty(shape, dtype=torch.float32 if self.probe else torch.float16)
        was_training = self.model.training
        self.model.eval()
        done = 0
        run = self._runner(self.runtime, next(data.batches(8))[0])
        with torch.inference_mode():
            start = time.perf_counter()  # the estimate counts the pass alone, not the export before it
            for x, _ in data.batches(batch_size):
                z = run(x)
                if not self.probe and z.abs().max() > torch.finfo(torch.float16).max:
                    raise InputError(f"activations after block {self.blocks} exceed float16's range and cannot be "
                                     "cached; freeze fewer blocks (train.frozen_blocks)")
                out[done : done + len(z)] = z
                done += len(z)
                if done == len(z):
                    eta = (time.perf_counter() - start) * len(data) / done
                    if eta > 60:
                        log.info("computing the frozen %s of %d %s images once: about %.0f min",
                                 "features" if self.probe else f"blocks 1-{self.blocks}", len(data), what, eta / 60)
                if progress is not None:
                    progress(f"frozen features ({what})", done, len(data))
        self.model.train(was_training)
        log.info("cached the frozen %s of %d %s images in %.0f s (%.0f MB)", "features" if self.probe else
                 "blocks", len(data), what, time.perf_counter() - start, out.numel() * out.element_size() / 2**20)
        return out

    def _runner(self, runtime: str, images: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
        """A function from normalised images to ``encode``'s output: the prefix exported to ONNX and run on
        ``runtime`` (checked against PyTorch on ``images``), or PyTorch itself; made once per prefix (the
        training and the evaluation pass share it)."""
        if runtime not in self._runners:
            self._runners[runtime] = self._make_runner(runtime, images)
        return self._runners[runtime]

    def _make_runner(self, runtime: str, images: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
        if runtime != "torch":
            run = compiled(_Encode(self), images, what="the frozen blocks", runtime=runtime)
            if run is not None:
                self.ran_on = run.runtime
                return run
            if runtime != "auto":
                raise InputError(f"the frozen blocks cannot run on {runtime} here (not installed, or their export "
                                 "failed: see the log above); set train.frozen_runtime to 'auto' or 'torch'")
        self.ran_on = "torch"
        return lambda x: self.encode(torch.from_numpy(x))


@dataclass(frozen=True)
class Compiled:
    """A module compiled on a runtime: normalised images -> its output, as a tensor."""

    engine: object
    runtime: str  # "openvino" or "onnxruntime"

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.engine.run(x)))


def compiled(module: torch.nn.Module, images: np.ndarray, *, what: str, runtime: str = "auto") -> Compiled | None:
    """``module`` (normalised images -> a tensor) exported to ONNX, checked against PyTorch on ``images`` and
    compiled in FP32 on ``runtime`` (``auto``: whichever of OpenVINO and ONNX Runtime is faster here on one warm
    call with ``images``): a ``Compiled`` function from images to its output, which names the runtime. None when
    no such runtime is installed or the export fails (logged; the caller then runs PyTorch, which is slower on a
    CPU, not wrong)."""
    from export.errors import ExportError
    from runtimes import RuntimeUnavailableError, get_runtime

    names = ["openvino", "onnxruntime"] if runtime == "auto" else [runtime]
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "module.onnx"
        for name in names:
            try:
                runtime_ = get_runtime(name)
            except RuntimeUnavailableError:
                continue
            if not path.exists():
                try:
                    _export(module, path, images)
                except ExportError as e:  # ParityError included
                    log.warning("%s run in PyTorch: their export failed (%s)", what, e)
                    return None
            engines[name] = runtime_.build(path, precision="fp32", threads=torch.get_num_threads())
        if not engines:
            return None
        seconds = {}
        for name, engine in engines.items():  # which is faster on this machine: one warm call each, timed
            engine.run(images)
            start = time.perf_counter()
            engine.run(images)
            seconds[name] = time.perf_counter() - start
    name = min(seconds, key=seconds.get)
    log.info("%s run on %s (%s ms per image)", what, name,
             " / ".join(f"{n} {t * 1000 / len(images):.0f}" for n, t in seconds.items()))
    return Compiled(engines[name], name)  # compiled in memory: the file may go with the folder


def _export(module: torch.nn.Module, path: Path, images: np.ndarray) -> None:
    from export.onnx_export import export_onnx

    with torch.no_grad():
        scale = float(module(torch.from_numpy(images)).abs().max())  # the tolerance follows the output's scale
    export_onnx(module, path, example=torch.from_numpy(images[:2]), parity_inputs=images,
                atol=1e-4 * max(1.0, scale), min_agreement=0.0)


class _Encode(torch.nn.Module):
    """``FrozenPrefix.encode`` as a module for the exporter, holding the frozen modules and tokens only (the
    export's checks count the modules it holds)."""

    def __init__(self, prefix: FrozenPrefix) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(prefix.frozen_modules())
        self.tokens = torch.nn.ParameterList(prefix.frozen_tokens())
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix.encode(x)


class _Tail(torch.nn.Module):
    """The trainable rest of the model, run on cached ``encode`` outputs: the blocks after N, the final norm, the
    pooling and the head (for a probe, the head alone)."""

    def __init__(self, prefix: FrozenPrefix) -> None:
        super().__init__()
        self.model = prefix.model
        self.start, self.probe = prefix.blocks, prefix.probe

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.probe:
            return m.classify(cached.float())  # (B, K)
        t = cached.float()
        for block in m.blocks[self.start :]:
            t = block(t)
        return m.forward_head(m.norm(t))  # (B, K)
