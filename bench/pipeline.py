"""The headline: our full chain against every single technique a peer offers, ViT-S/16 at 224x224, batch 1.

    python bench/pipeline.py --data /tmp/cifar10 [--heads 0.3333 0.1667] [--mlp 0.6667] [--scope layer]
                             [--tokens none evit:0.5@8 tome:0.65] [--no-chain-smooth-quant] [--rounds 5]

The defaults are the ``cpu-latency`` recipe's pruning and token settings (``compress/recipes.py``).

Paths, timed side by side in interleaved rounds on this CPU (each round times every path once, in turn; the
figure per path is the median of round medians, ratios are paired per round):
PyTorch eager FP32, ONNX Runtime FP32, OpenVINO FP32 and BF16, plain ``nncf.quantize`` INT8 on OpenVINO (the
peer), ToMe alone (OpenVINO FP32), and our full chain once per token setting: heads and MLP units pruned, the
tokens reduced, INT8 (NNCF on OpenVINO, and ONNX Runtime's QDQ run on OpenVINO). Random weights: latency does
not depend on them; the accuracy of the same settings is measured on the CIFAR-10 ViT by
``compress run --recipe cpu-latency`` (BENCHMARKS.md). Calibration: 128 real CIFAR-10 images upscaled to 224.
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
from compress.model.macs import count_macs  # noqa: E402
from compress.prune.structured import l2_importance, prune_by_ratio, structure  # noqa: E402
from compress.quantize.base import QuantizeContext, artifact_evaluator  # noqa: E402
from compress.recipes import CPU_LATENCY  # noqa: E402
from compress.tokens.stage import token_settings  # noqa: E402
from compress.tokens import apply, evit, layers_at, token_counts  # noqa: E402
from compress.model.vit import VisionTransformer  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes import default_threads, get_runtime  # noqa: E402

PEER = "nncf int8 (openvino, plain nncf.quantize)"
# The cpu-latency recipe's settings, as it applies them to ViT-S/16 (12 layers): the default chain.
RECIPE_HEADS, RECIPE_MLP = CPU_LATENCY["prune"]["heads"], CPU_LATENCY["prune"]["mlp"]
RECIPE_TOKENS = (f"evit:{CPU_LATENCY['tokens']['keep_rate']:g}@"
                 + ",".join(str(v) for v in layers_at(CPU_LATENCY["tokens"]["depths"], VIT_S16.depth)))


def _tome_at(model: VisionTransformer, fraction: float):
    """The decreasing-schedule ToMe plan that brings ``model`` to ``fraction`` of its MACs (as the stage finds it)."""
    from compress.config import load_config

    config = load_config(None, ["tokens.enabled=true", "tokens.schedule='decreasing'", f"tokens.macs=[{fraction}]"])
    return token_settings(model, config, (3, 224, 224))[0]


def token_plan(spec: str, model: VisionTransformer):
    """``none``, ``tome:F`` (ToMe, decreasing schedule, to F of the model's MACs) or ``evit:K[@L,...]`` (EViT,
    keep K at layers L, by default 3, 6 and 9) as a plan for ``model``; None for ``none``."""
    method, _, value = spec.partition(":")
    if method == "none":
        return None
    if method == "tome" and value:
        return _tome_at(model, float(value))
    if method == "evit" and value:
        keep, _, layers = value.partition("@")
        return evit(float(keep), model.config.depth, [int(v) for v in layers.split(",")] if layers else None)
    raise SystemExit(f"unknown token setting {spec!r}: use none, tome:MAC_FRACTION or evit:KEEP_RATE[@LAYER,...]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--heads", type=float, nargs="+", default=[RECIPE_HEADS, 0.1667],
                        help="shares of the attention heads pruned, one chain each (6 heads a layer: 0.3333 removes "
                             "2, 0.1667 removes 1); default: the cpu-latency recipe's, and one head")
    parser.add_argument("--mlp", type=float, default=RECIPE_MLP, help="share of the MLP units pruned (the recipe's)")
    parser.add_argument("--scope", choices=["global", "layer"], default=CPU_LATENCY["prune"]["scope"],
                        help="prune the same share from every layer, or rank all layers together")
    parser.add_argument("--tokens", nargs="+", default=["none", RECIPE_TOKENS],
                        help="token settings, one chain each: none, tome:MAC_FRACTION, evit:KEEP_RATE[@LAYER,...]; "
                             f"default: none and the recipe's ({RECIPE_TOKENS})")
    parser.add_argument("--chain-smooth-quant", action=argparse.BooleanOptionalAction, default=False,
                        help="NNCF SmoothQuant in the chain's INT8 (the peer always has it, as nncf.quantize does)")
    parser.add_argument("--tome-alone", type=float, default=0.65, help="MAC fraction for the ToMe-alone path")
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
        # Random weights leave token ranks nearly tied, and a tie broken the other way in ONNX Runtime moves the
        # logits by ~1e-4 (a timing run; trained models are held to 1e-4 by the token stage).
        atol = 1e-4 if model.token_reduction is None else 1e-2
        export_onnx(model, path, example=torch.from_numpy(x[:2]), parity_inputs=x[:4], atol=atol)
        return path

    def int8(model: VisionTransformer, onnx: Path, name: str, smooth_quant: bool = True):
        sub = work / name
        sub.mkdir()
        ctx = QuantizeContext(model=model, float_onnx=onnx, calib=calib, evaluate=evaluate, reference_top1=0.0,
                              max_drop=100.0, workdir=sub, threads=threads, sensitivity_samples=8, inc_max_trials=0,
                              nncf_smooth_quant=smooth_quant, log=lambda m: print(m, flush=True))
        return quantize_openvino(ctx).path, quantize_static_qdq(ctx)[0].path

    base = VisionTransformer(VIT_S16).eval()
    full_macs = count_macs(base, (1, 3, 224, 224))
    base_onnx = exported(base, "base")
    peer_xml, _ = int8(base, base_onnx, "base-int8")

    importance = l2_importance(base)
    ort, ov = get_runtime("onnxruntime"), get_runtime("openvino")
    paths = {
        "pytorch eager fp32": (get_runtime("torch"), base, "fp32"),
        "onnxruntime fp32": (ort, base_onnx, "fp32"),
        "openvino fp32": (ov, base_onnx, "fp32"),
        "openvino bf16": (ov, base_onnx, "bf16"),
        PEER: (ov, peer_xml, "int8"),
    }
    tome_alone = VisionTransformer(VIT_S16).eval()
    tome_alone.load_state_dict(base.state_dict())
    apply(tome_alone, _tome_at(tome_alone, args.tome_alone))
    paths[f"tome alone @{args.tome_alone:g} macs (openvino fp32)"] = (ov, exported(tome_alone, "tome-alone"), "fp32")
    settings = {"tome_alone": {"tokens": token_counts(tome_alone.token_reduction, tome_alone.config),
                               "macs_fraction": round(count_macs(tome_alone, (1, 3, 224, 224)) / full_macs, 3)}}
    tags = []
    pruned_by_heads = {heads: prune_by_ratio(base, importance, heads=heads, mlp=args.mlp, scope=args.scope)
                       for heads in args.heads}
    for heads, spec in itertools.product(args.heads, args.tokens):
        pruned = pruned_by_heads[heads]
        chain = apply(copy.deepcopy(pruned), token_plan(spec, pruned))
        tag = f"heads {heads:g} mlp {args.mlp:g} + {spec}"
        tags.append(tag)
        chain_nncf, chain_qdq = int8(chain, exported(chain, f"chain-{tag}"), f"chain-{tag}-int8",
                                     smooth_quant=args.chain_smooth_quant)
        paths[f"chain: prune {tag} + nncf int8 (openvino)"] = (ov, chain_nncf, "int8")
        paths[f"chain: prune {tag} + ort-static qdq int8 (openvino)"] = (ov, chain_qdq, "int8")
        plan = chain.token_reduction
        settings[tag] = {"structure": structure(pruned), "plan": plan.describe() if plan is not None else "none",
                         "chain_tokens": token_counts(plan, chain.config) if plan is not None else None,
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
    for tag in tags:
        best[tag] = min(r["paired_ratio_vs_nncf_int8"] for r in rows if r["path"].startswith(f"chain: prune {tag} "))
    result = {
        "benchmark": "ViT-S/16 224x224 batch 1, random weights; full chain vs single techniques",
        "settings": {"heads": args.heads, "mlp": args.mlp, "scope": args.scope, "tokens": args.tokens,
                     "chain_smooth_quant": args.chain_smooth_quant} | settings,
        "rounds": args.rounds, "threads": threads, "rows": rows, "chain_vs_nncf_int8": best, "target": 0.5,
    }
    write_result(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
