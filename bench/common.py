"""What every benchmark script shares: the timing protocol, the ViT-S/16 shape, the data check, the result file.

Timing is in interleaved rounds: each round times every (batch size, path) once, in turn, so noise from other work
on the shared machine falls on all paths alike; callers take the median over rounds and pair each path with a
reference in the same round.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compress.env import environment
from compress.model.vit import ViTConfig
from runtimes import LatencyStats, measure_latency

# ViT-S/16 at 224x224 (DeiT-S / timm vit_small_patch16_224): 197 tokens, 22M parameters, 4.6 GMACs.
VIT_S16 = ViTConfig(image_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536, num_classes=1000)


def require_cifar(root: Path, part: str = "train") -> None:
    """Stop, saying how to unpack it, when the CIFAR-10 JPEG folders are not at ``root``."""
    if not (root / part).is_dir():
        sys.exit(f"CIFAR-10 is not at {root}: mkdir -p {root} && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C {root}")


def named_file(text: str, flag: str) -> tuple[str, Path]:
    """``NAME=PATH`` of a benchmark's command line -> (name, path); exits with the expected form when it is not
    that, or the file does not exist. Split at the last "=": a name may hold one ("ToMe r=65"), a path seldom does."""
    name, sep, path = text.rpartition("=")
    if not (sep and name and Path(path).is_file()):
        sys.exit(f"{flag} {text!r}: expected NAME=PATH of an existing file")
    return name, Path(path)


def test_images(data: Path, model: Path, limit: int | None = None):
    """The first ``limit`` images (all without one) of ``data``'s evaluation split, with ``model``'s preprocessing:
    a ``calibration.datasets.Subset``, the same images in the same order on every call."""
    from calibration.datasets import Subset, make_splits, open_source
    from compress.model.checkpoint import load_own_checkpoint

    source = open_source(data)
    return Subset(source, make_splits(source).eval[:limit], load_own_checkpoint(model).preprocess)


def scored(correct: np.ndarray):
    """An ``EvalResult`` from per-image correctness (bool, in split order): what ``paired_drop`` compares."""
    from calibration.evaluate import EvalResult

    correct = np.asarray(correct, dtype=bool)
    return EvalResult(float(correct.mean()), np.zeros(0), len(correct), correct)


def load_reused(path: Path | None) -> dict[str, np.ndarray]:
    """{key: per-image correctness} from an earlier run's ``.npz`` (``--reuse`` of the scripts that write one beside
    ``--out``); exits with one line when it is unreadable."""
    if path is None:
        return {}
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key].astype(bool) for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # a truncated .npz is a bad zip
        sys.exit(f"--reuse {path}: not a results file of this script (the .npz it writes beside --out); leave --reuse "
                 "out to score every engine")


def write_result(result: dict[str, Any], out: Path) -> Path:
    """Write ``result`` as JSON to ``out``, with the date, the command and the environment unless it has them."""
    result.setdefault("date", dt.date.today().isoformat())
    result.setdefault("command", "python " + " ".join(sys.argv))
    result.setdefault("env", environment())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def load_trained(path: Path):
    """A trained checkpoint for a benchmark, with PyTorch on this machine's benchmark threads: (the checkpoint, its
    model in eval mode, its input shape (C, H, W), the thread count)."""
    import torch

    from compress.api import load_model
    from runtimes import default_threads

    threads = default_threads()
    torch.set_num_threads(threads)
    ckpt = load_model(path)
    cfg = ckpt.model.config
    return ckpt, ckpt.model.eval(), (cfg.in_chans, cfg.image_size, cfg.image_size), threads


def interleaved_rounds(
    engines: dict, data: np.ndarray, batch_sizes: list[int], *, rounds: int, seconds: float, threads: int,
    iterations: int = 200,
) -> dict[int, dict[str, list[LatencyStats]]]:
    """{batch: {path: [stats per round]}} for inputs ``data[:batch]``."""
    stats: dict[int, dict[str, list[LatencyStats]]] = {b: {n: [] for n in engines} for b in batch_sizes}
    for r in range(rounds):
        for batch in batch_sizes:
            for name, engine in engines.items():
                stats[batch][name].append(measure_latency(engine, data[:batch], threads=threads,
                                                          warmup=2 if r == 0 else 1, iterations=iterations,
                                                          max_seconds=seconds))
        print(f"round {r + 1}/{rounds} done", flush=True)
    return stats


def paired_ratio(values: list[float], reference: list[float]) -> float:
    """Median over rounds of value / reference in the same round."""
    return float(np.median(np.asarray(values) / np.asarray(reference)))


def token_plan(spec: str, model):
    """A token reduction plan for ``model`` from a command-line spec: ``none`` (None), ``tome:R``, ``pitome:R``
    (``R`` one value for every layer, or one per layer: ``tome:0,0,64,0,...``; a ``/tokens`` suffix matches on the
    tokens rather than the keys, ``tokens.similarity``), ``evit:KEEP[@LAYER,...]`` (EViT's default layers without
    ``@``) or ``resolution:SIZE``."""
    from compress.tokens import TokenError, evit, resolution, tome

    method, _, value = spec.partition(":")
    depth = model.config.depth
    try:
        if method == "none":
            return None
        if method in ("tome", "pitome") and value:
            value, _, similarity = value.partition("/")
            r = [int(v) for v in value.split(",")]
            return tome(r if len(r) > 1 else r[0], depth, method=method, similarity=similarity or "keys")
        if method == "evit" and value:
            keep, _, layers = value.partition("@")
            return evit(float(keep), depth, [int(v) for v in layers.split(",")] if layers else None)
        if method == "resolution" and value:
            return resolution(int(value), model.config)
    except (ValueError, TokenError) as e:
        raise SystemExit(f"token setting {spec!r}: {e}") from None
    raise SystemExit(f"unknown token setting {spec!r}: use none, tome:R[,R...][/tokens], pitome:R[,R...][/tokens], "
                     "evit:KEEP[@LAYER,...] or resolution:SIZE")
