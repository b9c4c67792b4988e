"""Training across processes and machines with ``torchrun`` and DistributedDataParallel.

``torchrun`` starts one process per worker and sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init()`` joins the process group (gloo on CPUs, NCCL on GPUs). Every rank draws the same global batch and the
same augmentation, then trains on its own slice of it; DDP averages the gradients, so the update equals one
process training on the whole batch, up to the order of floating-point sums. Rank 0 alone writes files.

``compress train`` runs on every rank. In ``compress run`` rank 0 runs the pipeline and every other rank serves
it: each fine-tuning job (recovery, token-merging fine-tuning) is broadcast to them and trained together, and a
final empty job sends them home. ::

    torchrun --nproc_per_node 2 -m compress.cli train --data DIR --out OUT                  # two processes here
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \\
        -m compress.cli run CKPT --data DIR --out RUN --recipe cpu-latency                  # on each of two machines

The run directory must be on storage every machine sees (rank 0 writes, all ranks read resumable state).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Join the process group when started by torchrun with more than one process; True when distributed."""
    if world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per process: the one torchrun's LOCAL_RANK names
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device(asked: str = "auto") -> torch.device:
    """The device training runs on: ``cuda`` (this process's GPU under torchrun), ``cpu``, or ``auto`` (a GPU when
    PyTorch sees one). Asking for CUDA where there is none is an ``InputError`` naming the fix."""
    from compress.errors import InputError

    if asked not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown training device {asked!r}: use auto, cpu or cuda")
    if asked == "cpu" or (asked == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise InputError(f"train.device=cuda, but PyTorch {torch.__version__} ({build}) sees no CUDA GPU here; use "
                         "device=auto or cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    return torch.device("cuda", local_rank() % torch.cuda.device_count() if world_size() > 1 else
                        torch.cuda.current_device())


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: Any) -> Any:
    """``obj`` from rank 0 on every rank (pickled; models travel as modules)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def release() -> None:
    """Rank 0, at the end of ``compress run``: tell the serving ranks there is no more work."""
    if active() and is_main():
        broadcast(None)
