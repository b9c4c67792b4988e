"""Peak memory of the whole chain on ViT-B/16 (224x224): `compress run --recipe cpu-latency`, every stage.

    python bench/memory.py --data /tmp/cifar10 [--recover-epochs 0.005] [--eval-limit 200]

Builds a ViT-B/16 (86M parameters, random initialisation, 10 classes) with CIFAR-10 preprocessing upscaled to
224x224, then runs the built-in ``cpu-latency`` recipe on it in a child process: Taylor pruning, recovery by
distillation, EViT, INT8 by ONNX Runtime and NNCF, measurement on ONNX Runtime and OpenVINO, and a bundle. The
peak resident memory of the child (``getrusage`` RUSAGE_CHILDREN, the largest child's peak) is the figure.
Recovery, the token stage's fine-tuning and evaluation are cut short (``--recover-epochs`` for both trainings,
``--eval-limit``) to keep the run under an hour on 2 cores; memory does not grow with their length (training
images are decoded batch by batch above 1 GB, evaluation is streamed). Accuracy of random weights is meaningless
and not reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.preprocess import Preprocess  # noqa: E402
from compress.model.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from bench.common import require_cifar, write_result  # noqa: E402
from compress.model.vit import ViTConfig, VisionTransformer  # noqa: E402

VIT_B16 = ViTConfig(image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--recover-epochs", type=float, default=0.005)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory_vit_b16.json"))
    args = parser.parse_args()
    require_cifar(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    pre = Preprocess(crop_size=224, resize_size=224, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    ckpt = save_checkpoint(Checkpoint(VisionTransformer(VIT_B16), pre, classes), work / "vit_b16.safetensors")
    command = [sys.executable, "-m", "compress.cli", "run", str(ckpt), "--data", str(args.data), "--out",
               str(work / "run"), "--recipe", "cpu-latency", "--set", f"recover.epochs={args.recover_epochs}",
               "--set", "recover.batch_size=32", "--set", f"data.eval_limit={args.eval_limit}", "--set",
               f"tokens.finetune_epochs={args.recover_epochs}", "--set", "measure.batch_sizes=[1]",
               "--set", "measure.max_seconds=3", "--set", "pipeline.max_drop=100"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GB
    if result.returncode != 0:
        sys.exit(f"the chain failed:\n{result.stderr[-3000:]}")
    chain = json.loads((work / "run" / "stages" / "pipeline.json").read_text())
    out = {"benchmark": "peak RSS of compress run --recipe cpu-latency on ViT-B/16 224x224",
           "peak_rss_gb": round(peak_gb, 2), "limit_gb": 8, "seconds": round(seconds), "stages": chain["stages"],
           "selected": chain["selected"], "child_command": command}
    write_result(out, args.out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("env", "child_command")}, indent=1))


if __name__ == "__main__":
    main()
