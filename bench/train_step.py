"""Training step time of the reference CIFAR-10 ViT recipe: FP32 against BF16 autocast, side by side.

    python bench/train_step.py [--rounds 5] [--steps 10]

Rounds alternate the two modes so that machine noise falls on both; the figure is the median step time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress.env import environment  # noqa: E402
from compress.model.vit import ViTConfig, VisionTransformer  # noqa: E402
from bench.common import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    recipe = tomllib.loads((REPO / "models/cifar10-vit/recipe.toml").read_text())
    batch = recipe["train"]["batch_size"]
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    models = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = VisionTransformer(ViTConfig.from_dict(recipe["model"])).train()
        models[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for mode, (model, opt) in models.items():
            for i in range(args.steps + (2 if r == 0 else 0)):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if r > 0 or i >= 2:
                    times[mode].append(time.perf_counter() - start)
    fp32, bf16 = (float(np.median(times[m])) * 1e3 for m in ("fp32", "bf16"))
    steps_per_epoch = 49_490 // batch
    result = {"date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "batch_size": batch,
              "step_ms_fp32": round(fp32, 1), "step_ms_bf16": round(bf16, 1), "speedup_bf16": round(fp32 / bf16, 2),
              "epoch_minutes_fp32": round(fp32 * steps_per_epoch / 6e4, 2),
              "epoch_minutes_bf16": round(bf16 * steps_per_epoch / 6e4, 2), "threads": torch.get_num_threads(),
              "env": environment()}
    write_result(result, REPO / "bench/results/train_step.json")
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))


if __name__ == "__main__":
    main()
