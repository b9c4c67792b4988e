"""Fine-tuning a compressed model by distillation from the model as loaded: recovery after pruning, and token
reduction's fine-tuning. Resumable from a state file, and shared with the other ranks under ``torchrun``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from calibration.evaluate import evaluate_top1
from compress.errors import InputError
from compress.run.context import RunContext
from compress.train.loop import train_together

log = logging.getLogger(__name__)


def distill(model, ctx: RunContext, *, epochs: float, tag: str, state_dir: Path,
            switch: str = "recover.epochs") -> dict[str, Any]:
    """Distil ``ctx.teacher`` into ``model`` in place on the training split, with the ``recover.*`` settings.

    Resumes from ``state_dir/recover-TAG.pt``. Returns what happened (epochs, steps, seconds, history) for the
    stage's notes. ``switch`` names the setting that turns this fine-tuning off, for the empty-split error.
    """
    r = ctx.config.recover
    if len(ctx.train_data) == 0:
        raise InputError(f"fine-tuning ({tag}) needs training images but the dataset's training split is empty; "
                         f"add images or set {switch}=0")
    if ctx.teacher is None:
        raise InputError(f"fine-tuning ({tag}) distils from a PyTorch model, and this run has an ONNX model only; "
                         f"set {switch}=0")
    options = r.model_dump(exclude={"epochs", "kd_alpha", "kd_temperature"})

    def eval_fn(m) -> float:
        with torch.inference_mode():
            return evaluate_top1(lambda x: m(torch.from_numpy(x)).numpy(), ctx.eval_data).top1

    def report(p) -> None:
        ctx.say(f"recover ({tag})", p.step, p.total_steps)

    state_dir.mkdir(parents=True, exist_ok=True)
    result = train_together(model, ctx.train_data, epochs=epochs, **options, teacher=ctx.teacher,
                            kd_alpha=r.kd_alpha, kd_temperature=r.kd_temperature,
                            checkpoint_path=state_dir / f"recover-{tag}.pt", eval_fn=eval_fn, progress=report)
    log.info("recover (%s): %d steps in %.0f s, top-1 %.4f", tag, result.steps, result.seconds,
             result.history[-1]["eval_top1"] if result.history else float("nan"))
    return {"tag": tag, "epochs": epochs, "steps": result.steps, "seconds": round(result.seconds, 1),
            "history": result.history}
