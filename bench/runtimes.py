"""ViT-S/16 at 224x224 on every CPU runtime, side by side: medians and ratios against ONNX Runtime FP32.

    python bench/runtimes.py [--rounds 5] [--out bench/results/runtimes.json]

Random weights (latency does not depend on them). Paths are measured in interleaved rounds (each round
times every path once, in turn) so that noise from other work on the machine falls on all of them alike;
the figure per path is the median over rounds of each round's median latency, and its ratio to ONNX Runtime
FP32 is given both from those medians and paired (per round, then the median of the ratios), which is the
steadier of the two on a shared machine. The ONNX file is measured as exported and after onnxslim, to show
whether the simplifier pays for itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.env import environment  # noqa: E402
from compress.model.macs import count_macs, count_params  # noqa: E402
from compress.model.vit import VisionTransformer  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from bench.common import VIT_S16, interleaved_rounds, write_result  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per path, batch and round")
    parser.add_argument("--out", type=Path, default=Path("bench/results/runtimes.json"))
    args = parser.parse_args()

    threads = default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = VisionTransformer(VIT_S16).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    example = torch.randn(1, 3, 224, 224)
    raw = export_onnx(model, tmp / "vit_s16_raw.onnx", example=example, simplify="none")
    slim = export_onnx(model, tmp / "vit_s16.onnx", example=example, simplify="onnxslim")
    print(f"exported: {raw.nodes_final} nodes as exported, {slim.nodes_final} after onnxslim; "
          f"parity max |diff| {slim.parity.max_abs_diff:.1e}", flush=True)

    paths = {
        "pytorch eager fp32": (get_runtime("torch"), model, "fp32"),
        "onnxruntime fp32 (as exported)": (get_runtime("onnxruntime"), raw.path, "fp32"),
        "onnxruntime fp32": (get_runtime("onnxruntime"), slim.path, "fp32"),
        "openvino fp32": (get_runtime("openvino"), slim.path, "fp32"),
    }
    if "bf16" in get_runtime("openvino").precisions():
        paths["openvino bf16"] = (get_runtime("openvino"), slim.path, "bf16")
    engines = {name: rt.build(src, precision=p, threads=threads) for name, (rt, src, p) in paths.items()}

    x = np.random.default_rng(0).standard_normal((max(args.batch_sizes), 3, 224, 224)).astype(np.float32)
    stats = interleaved_rounds(engines, x, args.batch_sizes, rounds=args.rounds, seconds=args.seconds, threads=threads)
    medians = {b: {n: [s.latency_ms_p50 for s in v] for n, v in per.items()} for b, per in stats.items()}
    p99 = {b: {n: [s.latency_ms_p99 for s in v] for n, v in per.items()} for b, per in stats.items()}

    rows = []
    for batch in args.batch_sizes:
        ref = float(np.median(medians[batch]["onnxruntime fp32"]))
        for name in engines:
            p50 = float(np.median(medians[batch][name]))
            # Paired: this path against ONNX Runtime FP32 in the same round, then the median over rounds.
            paired = np.asarray(medians[batch][name]) / np.asarray(medians[batch]["onnxruntime fp32"])
            rows.append({"batch_size": batch, "path": name, "latency_ms_p50": round(p50, 2),
                         "latency_ms_p99": round(float(np.median(p99[batch][name])), 2),
                         "throughput_ips": round(batch * 1000 / p50, 1), "ratio_vs_ort_fp32": round(p50 / ref, 3),
                         "paired_ratio_vs_ort_fp32": round(float(np.median(paired)), 3),
                         "round_medians_ms": [round(v, 2) for v in medians[batch][name]]})
    result = {
        "benchmark": "ViT-S/16 224x224, random weights", "date": dt.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv), "threads": threads, "rounds": args.rounds,
        "params": count_params(model), "macs": count_macs(model, (1, 3, 224, 224)),
        "onnx_nodes": {"as_exported": raw.nodes_final, "onnxslim": slim.nodes_final},
        "env": environment(), "rows": rows,
    }
    write_result(result, args.out)
    print("\n| batch | path | p50 ms | p99 ms | img/s | vs ORT FP32 | paired vs ORT FP32 |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['path']} | {row['latency_ms_p50']:.2f} | {row['latency_ms_p99']:.2f} | "
              f"{row['throughput_ips']:.1f} | {row['ratio_vs_ort_fp32']:.2f}x | {row['paired_ratio_vs_ort_fp32']:.2f}x |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
