"""The headline: our full chain against every single technique a peer offers, ViT-S/16 at 224x224, batch 1.

    python bench/pipeline.py --data /tmp/cifar10 [--heads 0.25] [--mlp 0.5] [--tokens-macs 0.8 0.65] [--rounds 5]

Paths, timed side by side in interleaved rounds on this CPU (each round times every path once, in turn; the
figure per path is the median of round medians, ratios are paired per round):
PyTorch eager FP32, ONNX Runtime FP32, OpenVINO FP32 and BF16, plain ``nncf.quantize`` INT8 on OpenVINO (the
peer), ToMe alone (merging at each MAC fraction asked, OpenVINO FP32), and our full chain for each fraction:
heads and MLP units pruned, ToMe, INT8 (NNCF on OpenVINO, and ONNX Runtime's QDQ on OpenVINO). Random weights (latency does not depend on them; accuracy of the same settings is measured on
the CIFAR-10 ViT by ``compress run --recipe cpu-latency``, see BENCHMARKS.md). Calibration: 128 real CIFAR-10
images upscaled to 224.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import VIT_S16, interleaved_rounds, paired_ratio, require_cifar, write_result  # noqa: E402
from calibration.calibrate import from_split  # noqa: E402
from calibration.datasets import Subset, make_splits, open_source  # noqa: E402
from calibration.preprocess import Preprocess  # noqa: E402
from compress.macs import count_macs  # noqa: E402
from compress.prune import l2_importance, prune_by_ratio, structure  # noqa: E402
from compress.quantize.base import QuantizeContext, artifact_evaluator  # noqa: E402
from compress.stages import token_settings  # noqa: E402
from compress.tokens import apply, token_counts  # noqa: E402
from compress.vit import VisionTransformer  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402

PEER = "nncf int8 (openvino, plain nncf.quantize)"


def _tome_at(model: VisionTransformer, fraction: float):
    """The decreasing-schedule ToMe plan that brings ``model`` to ``fraction`` of its MACs (as the stage finds it)."""
    from compress.config import load_config

    config = load_config(None, ["tokens.enabled=true", "tokens.schedule='decreasing'", f"tokens.macs=[{fraction}]"])
    return token_settings(model, config, (3, 224, 224))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--heads", type=float, default=0.25)
    parser.add_argument("--mlp", type=float, default=0.5)
    parser.add_argument("--tokens-macs", type=float, nargs="+", default=[0.8, 0.65],
                        help="ToMe's MAC fractions (of the model it merges), one chain each")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_vit_s16.json"))
    args = parser.parse_args()
    require_cifar(args.data)
    from compress.quantize.onnxruntime_ptq import quantize_static_qdq
    from compress.quantize.openvino_nncf import quantize_openvino

    threads = default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    source = open_source(args.data)
    splits = make_splits(source, calib_size=512, seed=0)
    pre = Preprocess(crop_size=224, resize_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    calib = from_split(Subset(source, splits.calib, pre), args.calib_size, (3, 224, 224), batch_size=16)
    eval_data = Subset(source, splits.eval[:8], pre)
    x = next(eval_data.batches(8))[0]
    evaluate = artifact_evaluator(eval_data, threads=threads)

    def exported(model: VisionTransformer, name: str) -> Path:
        path = work / f"{name}.onnx"
        export_onnx(model, path, example=torch.from_numpy(x[:2]), parity_inputs=x[:4])
        return path

    def int8(model: VisionTransformer, onnx: Path, name: str):
        sub = work / name
        sub.mkdir()
        ctx = QuantizeContext(model=model, float_onnx=onnx, calib=calib, evaluate=evaluate, reference_top1=0.0,
                              max_drop=100.0, workdir=sub, threads=threads, sensitivity_samples=8, inc_max_trials=0,
                              log=lambda m: print(m, flush=True))
        return quantize_openvino(ctx).path, quantize_static_qdq(ctx)[0].path

    base = VisionTransformer(VIT_S16).eval()
    full_macs = count_macs(base, (1, 3, 224, 224))
    base_onnx = exported(base, "base")
    peer_xml, _ = int8(base, base_onnx, "base-int8")

    pruned = prune_by_ratio(base, l2_importance(base), heads=args.heads, mlp=args.mlp)
    ort, ov = get_runtime("onnxruntime"), get_runtime("openvino")
    paths = {
        "pytorch eager fp32": (get_runtime("torch"), base, "fp32"),
        "onnxruntime fp32": (ort, base_onnx, "fp32"),
        "openvino fp32": (ov, base_onnx, "fp32"),
        "openvino bf16": (ov, base_onnx, "bf16"),
        PEER: (ov, peer_xml, "int8"),
    }
    settings = {"chain_structure": structure(pruned)}
    for fraction in args.tokens_macs:
        tome = VisionTransformer(VIT_S16).eval()
        tome.load_state_dict(base.state_dict())
        apply(tome, _tome_at(tome, fraction))
        chain = VisionTransformer(pruned.config).eval()
        chain.load_state_dict(pruned.state_dict())
        apply(chain, _tome_at(chain, fraction))
        tag = f"tome@{fraction:g}"
        chain_nncf, chain_qdq = int8(chain, exported(chain, f"chain-{tag}"), f"chain-{tag}-int8")
        paths[f"tome alone {tag} (openvino fp32)"] = (ov, exported(tome, f"tome-{tag}"), "fp32")
        paths[f"chain: prune + {tag} + nncf int8 (openvino)"] = (ov, chain_nncf, "int8")
        paths[f"chain: prune + {tag} + ort-static qdq int8 (openvino)"] = (ov, chain_qdq, "int8")
        settings[tag] = {"tome_tokens": token_counts(tome.token_reduction, tome.config),
                         "chain_tokens": token_counts(chain.token_reduction, chain.config),
                         "tome_macs_fraction": round(count_macs(tome, (1, 3, 224, 224)) / full_macs, 3),
                         "chain_macs_fraction": round(count_macs(chain, (1, 3, 224, 224)) / full_macs, 3)}
    engines = {name: rt.build(src, precision=p, threads=threads) for name, (rt, src, p) in paths.items()}
    data = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    stats = interleaved_rounds(engines, data, [1], rounds=args.rounds, seconds=args.seconds, threads=threads,
                               iterations=300)[1]
    medians = {n: [s.latency_ms_p50 for s in v] for n, v in stats.items()}
    rows = [{"path": name, "latency_ms_p50": round(float(np.median(v)), 3),
             "paired_ratio_vs_nncf_int8": round(paired_ratio(v, medians[PEER]), 3),
             "paired_ratio_vs_onnxruntime_fp32": round(paired_ratio(v, medians["onnxruntime fp32"]), 3),
             "round_medians_ms": [round(float(t), 3) for t in v]} for name, v in medians.items()]
    best = {}
    for fraction in args.tokens_macs:
        tag = f"tome@{fraction:g}"
        chain_rows = [r for r in rows if r["path"].startswith(f"chain: prune + {tag} ")]
        best[tag] = min(r["paired_ratio_vs_nncf_int8"] for r in chain_rows)
    result = {
        "benchmark": "ViT-S/16 224x224 batch 1, random weights; full chain vs single techniques",
        "settings": {"heads": args.heads, "mlp": args.mlp, "tokens_macs": args.tokens_macs} | settings,
        "rounds": args.rounds, "threads": threads, "rows": rows, "chain_vs_nncf_int8": best, "target": 0.5,
    }
    write_result(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
