"""How long an ONNX export takes: PyTorch's TorchScript-based exporter against the dynamo exporter, side by side.

    python bench/export_speed.py [--rounds 3]

Each round exports the demo-sized ViT (4 blocks, 8x8 digits) and ViT-S/16 at 224x224 with both exporters, in
alternating order, through ``export.onnx_export.export_onnx`` (onnxslim and the parity check included, as a run
does); the table gives the median over rounds and the ratio. A run exports every stage's model and every
token-reduction candidate, so this is paid several times per run and hundreds of times per test suite. Then
the two ViT-S/16 files are timed side by side on ONNX Runtime and OpenVINO (FP32, batch 1, interleaved rounds):
the graphs differ in their shape nodes, and the export's speed must not cost run time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import VIT_S16, interleaved_rounds, paired_ratio, write_result  # noqa: E402
from compress.model.vit import ViTConfig, VisionTransformer  # noqa: E402
from export.onnx_export import EXPORTERS, export_onnx  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402

DEMO = ViTConfig(image_size=8, in_chans=1, patch_size=2, embed_dim=64, depth=4, num_heads=4, mlp_dim=128,
                 num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"demo ViT (4 blocks, 8x8)": DEMO, "ViT-S/16 (12 blocks, 224x224)": VIT_S16}
    seconds = {(m, e): [] for m in models for e in EXPORTERS}
    nodes, latency = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, cfg in models.items():
                model = VisionTransformer(cfg).eval()
                x = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size)
                order = EXPORTERS if r % 2 == 0 else EXPORTERS[::-1]
                for exporter in order:
                    start = time.perf_counter()
                    result = export_onnx(model, Path(tmp) / f"{name}-{exporter}.onnx", example=x, exporter=exporter)
                    seconds[(name, exporter)].append(time.perf_counter() - start)
                    nodes[(name, exporter)] = result.nodes_final
        # does the graph's shape cost run time? both files of ViT-S, on both runtimes, in interleaved rounds
        name, cfg = list(models.items())[-1]
        threads = default_threads()
        engines = {f"{runtime} · {exporter}": get_runtime(runtime).build(Path(tmp) / f"{name}-{exporter}.onnx",
                                                                         precision="fp32", threads=threads)
                   for runtime in ("onnxruntime", "openvino") for exporter in EXPORTERS}
        image = np.random.default_rng(0).standard_normal((1, cfg.in_chans, cfg.image_size, cfg.image_size))
        stats = interleaved_rounds(engines, image.astype(np.float32), [1], rounds=args.rounds + 1, seconds=2.0,
                                   threads=threads, iterations=50)[1]
        medians = {k: [s.latency_ms_p50 for s in v] for k, v in stats.items()}
        for runtime in ("onnxruntime", "openvino"):
            ts, dyn = medians[f"{runtime} · torchscript"], medians[f"{runtime} · dynamo"]
            latency[runtime] = {"torchscript_ms": round(float(np.median(ts)), 2),
                                "dynamo_ms": round(float(np.median(dyn)), 2),
                                "paired_ratio": round(paired_ratio(ts, dyn), 3)}
    rows = []
    print(f"| model | exporter | median s ({args.rounds} rounds) | nodes after onnxslim | vs dynamo |")
    print("|---|---|---|---|---|")
    for name in models:
        dynamo = float(np.median(seconds[(name, "dynamo")]))
        for exporter in EXPORTERS:
            median = float(np.median(seconds[(name, exporter)]))
            rows.append({"model": name, "exporter": exporter, "median_s": round(median, 2),
                         "rounds_s": [round(s, 2) for s in seconds[(name, exporter)]],
                         "nodes": nodes[(name, exporter)], "vs_dynamo": round(median / dynamo, 3)})
            print(f"| {name} | {exporter} | {median:.2f} | {nodes[(name, exporter)]} | {median / dynamo:.2f}x |")
    print(f"ViT-S/16 batch 1, FP32, the TorchScript-based export against the dynamo one: {latency}")
    print(write_result({"rows": rows, "latency_vit_s16_batch1": latency}, args.out))


if __name__ == "__main__":
    main()
