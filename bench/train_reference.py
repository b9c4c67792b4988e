"""Train the reference CIFAR-10 ViT with the recipe in models/cifar10-vit/recipe.toml, exactly as `compress train` does.

    python bench/train_reference.py /tmp/cifar10 runs/cifar10-train

It calls the same `train_job` as `compress train --recipe models/cifar10-vit/recipe.toml`, and prints the time
and top-1 that BENCHMARKS.md records.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.config import load_config  # noqa: E402
from compress.train.job import train_job  # noqa: E402


def main() -> None:
    data, out = sys.argv[1], Path(sys.argv[2])
    config = load_config(Path(__file__).resolve().parents[1] / "models/cifar10-vit/recipe.toml", [f"data.path={json.dumps(data)}"])
    out.mkdir(parents=True, exist_ok=True)

    def progress(p):
        if p.step % 50 == 0 or p.eval_top1 is not None:
            print(f"epoch {p.epoch} step {p.step}/{p.total_steps} loss {p.loss:.3f} lr {p.lr:.2e}"
                  + (f" eval_top1 {p.eval_top1:.4f}" if p.eval_top1 is not None else ""), flush=True)

    _, summary = train_job(config, out, progress=progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
