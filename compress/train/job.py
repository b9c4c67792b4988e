"""``compress train``: build or load a model, train it on a dataset, save it with its training summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from calibration.datasets import Subset, make_splits, open_source, stratified_sample
from calibration.evaluate import evaluate_top1
from compress.config import RunConfig
from compress.errors import InputError
from compress.io import atomic_write_json
from compress.model.checkpoint import (Checkpoint, check_dataset_fits, match_class_names, new_checkpoint,
                                       save_checkpoint)
from compress.model.vit import VisionTransformer
from compress.train import distributed
from compress.train.frozen import FrozenPrefix, compiled
from compress.train.loop import TrainProgress, phase_progress, train


def train_job(
    config: RunConfig,
    out_dir: Path,
    *,
    init: Checkpoint | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> tuple[Checkpoint, dict]:
    """``compress train``: build or load the model, train it, save ``model.safetensors`` and ``train.json``.

    Resumes from ``out_dir/train_state.pt`` when an earlier run of the same job was interrupted.
    """
    main = not distributed.init() or distributed.is_main()  # under torchrun, rank 0 alone writes
    source = open_source(config.data.path)
    splits = make_splits(source, calib_size=config.data.calib_size, eval_fraction=config.data.eval_fraction,
                         seed=config.data.seed)
    torch.manual_seed(config.train.seed)  # the initial weights, too, follow the recipe's seed
    ckpt = init if init is not None else new_checkpoint(config, source)
    check_dataset_fits(ckpt, source)
    match_class_names(ckpt, source)  # a new head (a lifted backbone's) gets the dataset's class names
    if main:
        if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "train_state.pt").exists():
            raise InputError(f"{out_dir} exists and is not an interrupted training run; choose a new --out")
        out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.active():
        torch.distributed.barrier()  # the others read the resumable state only once rank 0 has looked at out_dir
    train_data = Subset(source, stratified_sample(source, splits.train, config.data.train_limit,
                                                  seed=config.data.seed), ckpt.preprocess)
    eval_data = Subset(source, splits.eval[: config.data.eval_limit], ckpt.preprocess)
    frozen = (FrozenPrefix(ckpt.model, config.train.frozen_blocks, runtime=config.train.frozen_runtime)
              if config.train.frozen_blocks else None)
    eval_cache: list[torch.Tensor] = []  # the frozen blocks' outputs on the evaluation images, computed once

    def eval_fn(model: VisionTransformer) -> float:  # called on the CPU, the model in eval mode
        if frozen is None:
            # the trained model exported and scored on OpenVINO or ONNX Runtime, the faster here: PyTorch eager took
            # about 16 minutes for 10,000 images on a ViT-S at 224 on 2 cores (models/dinov2-s14-cifar10/README.md)
            run = None
            if model.token_reduction is None:  # merging needs its own export tolerance: PyTorch scores it
                run = compiled(model, next(eval_data.batches(8))[0], what="the evaluation images")
            with torch.inference_mode():
                return evaluate_top1(lambda x: (run(x) if run else model(torch.from_numpy(x))).numpy(), eval_data,
                                     batch_size=config.measure.eval_batch_size).top1
        if not eval_cache:
            eval_cache.append(frozen.cache(eval_data, what="evaluation", progress=phase_progress(progress)))
        with torch.inference_mode():
            predictions = torch.cat([frozen.tail(z).argmax(-1) for z in eval_cache[0].split(256)])
        return float((predictions.numpy() == eval_data.labels).mean())

    options = config.train.model_dump(exclude={"checkpoint_minutes", "eval_every_epochs"})
    result = train(ckpt.model, train_data, **options, checkpoint_path=out_dir / "train_state.pt",
                   checkpoint_minutes=config.train.checkpoint_minutes, frozen=frozen,
                   eval_every_epochs=config.train.eval_every_epochs, eval_fn=eval_fn, progress=progress)
    if not main:
        return ckpt, {}
    save_checkpoint(ckpt, out_dir / "model.safetensors")
    summary = {
        "dataset": source.name,
        "train_images": len(train_data),
        "eval_images": len(eval_data),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "device": result.device,
        "eval_top1": result.history[-1]["eval_top1"] if result.history else None,
        "history": result.history,
        "config": config.dump(),
        "threads": torch.get_num_threads(),
    }
    if frozen is not None:  # which runtime computed the cached outputs: "auto" picks by a timing
        summary["frozen_runtime"] = frozen.ran_on
    atomic_write_json(out_dir / "train.json", summary)
    return ckpt, summary
