"""Train or fine-tune the ViT: AdamW, linear warm-up then cosine decay, label smoothing, crop and flip.

The recipe follows the DeiT / timm training loop cut down to what a CPU can afford: the training split is
decoded once to uint8 at the model's resolution and augmented per batch in torch (random crop from a padded
image, horizontal flip), which keeps the two cores on the model instead of on JPEG decoding. BF16 autocast
uses the AVX-512 BF16 units where the CPU has them. A checkpoint (model, optimizer, schedule, step, RNG) is
written atomically every few minutes and at the end of each epoch; ``train`` resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from calibration.datasets import Subset
from compress.env import cpu_has_bf16
from compress.errors import InputError
from compress.io import atomic_torch_save, torch_load_weights
from compress.model.vit import VisionTransformer
from compress.train import distributed
from compress.train.frozen import FrozenPrefix

log = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    """What the progress callback receives after every step."""

    epoch: int
    step: int
    total_steps: int
    loss: float
    lr: float
    eval_top1: float | None = None
    phase: str = "train"  # or the one-off pass that caches a frozen prefix's outputs ("frozen features (...)")


def phase_progress(progress: Callable[[TrainProgress], None] | None) -> Callable[[str, int, int], None] | None:
    """The callback of a one-off pass (``what``, done, total), such as caching a frozen prefix, given to a
    ``TrainProgress`` callback as that phase; None for None."""
    if progress is None:
        return None
    return lambda what, done, total: progress(TrainProgress(0, done, total, math.nan, 0.0, phase=what))


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    device: str = "cpu"  # where the steps ran


def cosine_lr(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def augment(images: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop from a zero-padded image and random horizontal flip, per sample. (B, C, H, W) in and out."""
    B, C, H, W = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
        rows = (dy[:, None] + torch.arange(H)[None]).view(B, 1, H, 1).expand(B, C, H, W + 2 * padding)
        images = padded.gather(2, rows)  # (B, C, H, W+2p)
        cols = (dx[:, None] + torch.arange(W)[None]).view(B, 1, 1, W).expand(B, C, H, W)
        images = images.gather(3, cols)  # (B, C, H, W)
    if flip:
        mask = torch.rand(B, generator=generator) < 0.5
        images = torch.where(mask.view(B, 1, 1, 1), images.flip(3), images)
    return images


ACTIVATION_BUDGET_BYTES = 2 << 30  # activations kept for one backward pass, when micro_batch_size is not set


def auto_micro_batch(model: VisionTransformer, batch: int) -> int:
    """The largest piece of ``batch`` whose activations fit ``ACTIVATION_BUDGET_BYTES``, by a rough count per image:
    each layer keeps about 12 floats per token and width (norms, qkv, MLP) plus the attention maps."""
    cfg = model.config
    tokens = cfg.num_prefix_tokens + cfg.num_patches
    per_layer = tokens * cfg.embed_dim * 12 + sum(cfg.num_heads) / cfg.depth * tokens * tokens * 2
    per_image = cfg.depth * per_layer * 4  # float32 bytes
    return max(1, min(batch, int(ACTIVATION_BUDGET_BYTES // per_image)))


DECODE_ALL_BYTES = 1 << 30  # decode the training split once when it fits in this; else batch by batch


class _DecodeOnDemand:
    """``images[rows]`` decoded when asked, so memory holds one batch, not the split (ViT-B at 224 x 224 on
    CIFAR-10's 49,000 training images would be 7.4 GB decoded)."""

    def __init__(self, data: Subset) -> None:
        self.data = data

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.data.decode_uint8(self.data.indices[rows.numpy()]))


def _training_images(data: Subset):
    p = data.preprocess
    size = len(data) * p.crop_size * p.crop_size * p.in_chans
    if size <= DECODE_ALL_BYTES:
        log.info("decoding %d training images (%.0f MB)", len(data), size / 2**20)
        return torch.from_numpy(data.decode_uint8())  # (N, H, W, C) uint8
    log.info("training images would take %.1f GB decoded: decoding each batch as it is needed", size / 2**30)
    return _DecodeOnDemand(data)


def train(
    model: VisionTransformer,
    train_data: Subset,
    *,
    epochs: float,
    batch_size: int = 128,
    lr: float = 1e-3,
    min_lr: float = 1e-5,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.1,
    crop_padding: int = 4,
    flip: bool = True,
    bf16: bool = False,
    device: str = "auto",
    seed: int = 0,
    checkpoint_path: Path | None = None,
    checkpoint_minutes: float = 5.0,
    eval_every_epochs: int = 0,
    eval_fn: Callable[[VisionTransformer], float] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    teacher: VisionTransformer | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 2.0,
    max_steps: int | None = None,
    micro_batch_size: int | None = None,
    frozen_blocks: int = 0,
    frozen_runtime: str = "auto",
    frozen: FrozenPrefix | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_data``; resume from ``checkpoint_path`` when it exists.

    ``eval_fn`` is called at the end and every ``eval_every_epochs`` epochs (0: only at the end). With a
    ``teacher`` (recovery after pruning) the loss is knowledge distillation (Hinton et al. 2015):
    ``kd_alpha * T^2 * KL(teacher_T || student_T) + (1 - kd_alpha) * cross-entropy`` at temperature ``T``.
    ``max_steps`` caps the run below ``epochs`` (a step budget). ``micro_batch_size`` splits each batch into
    pieces whose gradients accumulate (the update is the same; memory holds one piece); None picks it so one
    piece's activations stay near ``ACTIVATION_BUDGET_BYTES``.

    ``frozen_blocks`` (or a ``frozen`` prefix already made, whose evaluation cache the caller shares) freezes the
    embedding and the first N blocks and trains the rest on their outputs, computed once per image on
    ``frozen_runtime`` (``compress.train.frozen``); N equal to the depth is a linear probe.

    ``device`` (``auto``, ``cpu``, ``cuda``; ``distributed.device``) is where the steps run; the images are
    decoded and augmented on the CPU, and evaluation runs there too. The model (and teacher) return to the CPU.
    """
    dev = distributed.device(device)
    if bf16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("BF16 autocast was asked for, but this GPU has no BF16 support; training in FP32")
        bf16 = False
    elif bf16 and dev.type == "cpu" and cpu_has_bf16() is False:
        log.warning("BF16 autocast was asked for, but this CPU has no BF16 units (avx512_bf16, amx_bf16): it would "
                    "be emulated, usually slower than FP32; training in FP32")
        bf16 = False
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    together = distributed.active()  # under torchrun: every rank takes its slice of each global batch
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if together else (1, 0)
    if batch_size % world:
        raise InputError(f"batch size {batch_size} does not split evenly over {world} processes; use a multiple "
                         f"of {world} so the update equals one process's")
    local = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    if frozen is None and frozen_blocks:
        frozen = FrozenPrefix(model, frozen_blocks, runtime=frozen_runtime)
    if frozen is not None:
        if together or teacher is not None:
            raise InputError("train.frozen_blocks runs in one process without a teacher: its cost is the one pass "
                             "that caches the frozen blocks; drop torchrun (or the distillation) for it")
        frozen_blocks = frozen.blocks
        if crop_padding or flip:
            log.info("the frozen blocks' outputs are cached from fixed views: crop and flip do not apply")
        crop_padding, flip = 0, False
        images = frozen.cache(train_data, progress=phase_progress(progress))  # images[rows] -> cached (B, ...) features
    micro = micro_batch_size or (batch_size // world if frozen is not None else
                                 auto_micro_batch(model, batch_size // world))
    if micro < batch_size // world:
        log.info("batches of %d go through in pieces of %d (gradients accumulate)", batch_size // world, micro)
    if frozen is None:
        images = _training_images(train_data)  # images[rows] -> (B, H, W, C) uint8
    labels = torch.from_numpy(train_data.labels)
    mean = torch.tensor(train_data.preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(train_data.preprocess.std).view(1, -1, 1, 1)

    steps_per_epoch = max(1, len(labels) // batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token")) else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True
    )

    options = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "weight_decay": weight_decay,
               "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing, "crop_padding": crop_padding,
               "flip": flip, "bf16": bf16, "seed": seed, "train_images": len(labels), "max_steps": max_steps,
               "kd": [kd_alpha, kd_temperature] if teacher is not None else None, "frozen_blocks": frozen_blocks}
    if teacher is not None:
        teacher.eval().to(dev)
    if dev.type != "cpu":
        log.info("training on %s (%s)", dev, torch.cuda.get_device_name(dev))
    model.to(dev)  # after any frozen prefix was cached: its one pass exports the model from the CPU
    net = frozen.tail if frozen is not None else \
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if together else model
    step, history, elapsed_before = 0, [], 0.0
    if checkpoint_path is not None and checkpoint_path.exists():
        state = _resume_state(checkpoint_path)
        if state.get("options") != options:
            raise InputError(
                f"{checkpoint_path} was written by a training run with other options or data; "
                "rerun with the same recipe to resume, or choose a new --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, history, elapsed_before = state["step"], state["history"], state["seconds"]
        log.info("resuming training at step %d of %d", step, total_steps)

    def save() -> None:
        if checkpoint_path is not None and rank == 0:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "step": step,
                    "history": history,
                    "seconds": elapsed_before + time.perf_counter() - start,
                    "options": options,
                },
                checkpoint_path,
            )

    try:
        start = last_save = time.perf_counter()
        model.train()
        order_epoch = None
        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                # Each epoch's order comes from the epoch number alone, so a run resumed mid-epoch sees the same order.
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
                order_epoch = epoch
            rows = order[pos * batch_size : (pos + 1) * batch_size]
            if frozen is not None:
                x = images[rows].to(dev, non_blocking=True)  # (B, ...): the frozen blocks' cached outputs
            else:
                x = images[rows].permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W)
                x = augment(x, padding=crop_padding, flip=flip, generator=generator)  # the whole batch on every rank
                x = ((x - mean) / std)[local].to(dev, non_blocking=True)  # (B / world, C, H, W): this rank's slice
            y = labels[rows][local].to(dev, non_blocking=True)
            current_lr = cosine_lr(step, total_steps, warmup_steps, lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            optimizer.zero_grad(set_to_none=True)
            pieces = list(zip(x.split(micro), y.split(micro)))  # gradients accumulate: memory holds one piece
            loss = torch.zeros((), device=dev)
            for j, (xp, yp) in enumerate(pieces):
                sync = contextlib.nullcontext() if not together or j == len(pieces) - 1 else net.no_sync()
                with sync:
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = net(xp)  # (b, K)
                    part = F.cross_entropy(logits.float(), yp, label_smoothing=label_smoothing)
                    if teacher is not None:
                        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                            soft = teacher(xp)  # (b, K)
                        T = kd_temperature
                        kd = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(soft.float() / T, -1),
                                      reduction="batchmean", log_target=True) * T * T
                        part = kd_alpha * kd + (1 - kd_alpha) * part
                    part = part * (len(xp) / len(x))  # each piece's share of the batch mean
                    part.backward()
                loss = loss + part.detach()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            step += 1
            if together:  # the loss of the whole batch, for the log
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
                loss /= world
            loss_value = loss.item()

            eval_top1 = None
            if step % steps_per_epoch == 0 or step == total_steps:
                epoch_done = step // steps_per_epoch
                if eval_fn is not None and rank == 0 and (step == total_steps or
                                                          (eval_every_epochs and epoch_done % eval_every_epochs == 0)):
                    model.eval().cpu()  # evaluation feeds the model from the CPU
                    eval_top1 = eval_fn(model)
                    model.to(dev).train()
                history.append({"epoch": epoch + 1, "step": step, "loss": loss_value, "eval_top1": eval_top1,
                                "seconds": elapsed_before + time.perf_counter() - start})
                save()
                last_save = time.perf_counter()
            elif time.perf_counter() - last_save > checkpoint_minutes * 60:
                save()
                last_save = time.perf_counter()
            if progress is not None and rank == 0:
                progress(TrainProgress(epoch + 1, step, total_steps, loss_value, current_lr, eval_top1))
    finally:  # the model goes on from the CPU (export, the next stage), whatever happened here
        model.cpu()
        if teacher is not None:
            teacher.cpu()
    model.eval()
    if frozen is not None:
        for p in frozen.frozen_parameters():
            p.requires_grad_(True)  # the model goes on as a whole (a later stage may train all of it)
    return TrainResult(steps=step, seconds=elapsed_before + time.perf_counter() - start, history=history,
                       device=str(dev))


def serve() -> None:
    """Ranks other than 0 in ``compress run``: train each job rank 0 broadcasts, until it sends None."""
    while True:
        job = distributed.broadcast(None)
        if job is None:
            return
        model, data, options = job
        train(model, data, **options)


def train_together(model, data, **options):
    """``compress.train.loop.train`` on every rank: rank 0 sends the job (without its callbacks) to the others first."""
    if distributed.active() and distributed.is_main():
        shared = {k: v for k, v in options.items() if k not in ("eval_fn", "progress")}
        distributed.broadcast((model, data, shared))
    return train(model, data, **options)


RESUME_KEYS = ("options", "model", "optimizer", "generator", "step", "history", "seconds")


def _resume_state(path: Path) -> dict:
    """The state an interrupted run saved (``train_state.pt``), loaded without running code; a file that is not
    one (damaged, or written by something else) is one line naming the fix, not a traceback."""
    fix = "delete it to train from the start, or choose a new --out"
    try:
        state = torch_load_weights(path)
    except Exception as e:  # noqa: BLE001  (torch.load answers damaged bytes with almost any exception type)
        # torch's own messages run to paragraphs about its defaults and internals: name what they mean, as the
        # checkpoint loader does (only an "Unsupported global" is a file of Python objects)
        reason = ("it holds Python objects besides tensors, which are never loaded" if "Unsupported global" in str(e)
                  else "truncated or corrupt")
        raise InputError(f"{path} cannot be read as an interrupted run's state ({reason}); {fix}") from None
    if not isinstance(state, dict) or any(k not in state for k in RESUME_KEYS):
        raise InputError(f"{path} is not an interrupted run's state (no {', '.join(RESUME_KEYS)}); {fix}")
    return state
