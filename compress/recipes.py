"""Built-in recipes: whole chains tuned for a target, usable as ``--recipe cpu-latency`` or ``jetson-latency``.

A recipe file (TOML) or one of these names gives the stages in order (``[pipeline] stages``), one accuracy budget
for the whole chain (``pipeline.max_drop``, top-1 points against the model as loaded) and the target the final
choice is made for. Each stage's own settings follow in its section; ``--set`` overrides any of them.

The settings come from this project's measurements (BENCHMARKS.md): pruning MLP units pays more latency than
pruning heads (25% heads + 50% MLP gives 1.59x on ViT-S/16), ToMe's decreasing schedule reaches half the MACs
where a constant ``r`` cannot, and INT8 on OpenVINO is the fastest CPU path. Recovery is distillation from the
unpruned model; fine-tuning with merging on recovers most of what training-free merging costs (Bolya et al.).
"""

from __future__ import annotations

from typing import Any

CPU_LATENCY: dict[str, Any] = {
    "pipeline": {"stages": ["prune", "recover", "tokens", "quantize", "deploy"], "max_drop": 1.0,
                 "target": "cpu-x86"},
    "prune": {"heads": 0.25, "mlp": 0.5, "importance": "taylor"},
    "recover": {"epochs": 3, "bf16": True},
    "tokens": {"method": "tome", "schedule": "decreasing", "macs": [0.8, 0.65, 0.5], "target_runtime": "openvino",
               "finetune_epochs": 1},
    "quantize": {"quantizers": ["onnxruntime-static", "nncf"]},
    "measure": {"runtimes": ["onnxruntime", "openvino"], "batch_sizes": [1, 8]},
}

JETSON_LATENCY: dict[str, Any] = {
    # TensorRT runs on the Jetson, not here: candidates are judged on ONNX Runtime (same ONNX files), INT8 as
    # TensorRT-ready Q/DQ (symmetric, per-channel) and FP16 with LayerNorm in float32; the engine is built on the
    # device from the bundle (`compress build-engine`).
    "pipeline": {"stages": ["prune", "recover", "tokens", "quantize", "deploy"], "max_drop": 1.0,
                 "target": "jetson-orin"},
    "prune": {"heads": 0.25, "mlp": 0.5, "importance": "taylor", "mlp_round_to": 32},
    "recover": {"epochs": 3, "bf16": True},
    "tokens": {"method": "tome", "schedule": "decreasing", "macs": [0.8, 0.65, 0.5], "target_runtime": "onnxruntime",
               "finetune_epochs": 1},
    "quantize": {"quantizers": ["onnxruntime-static", "fp16"], "activations": "int8"},
    "measure": {"runtimes": ["onnxruntime"], "batch_sizes": [1, 8]},
}

BUILTIN_RECIPES: dict[str, dict[str, Any]] = {"cpu-latency": CPU_LATENCY, "jetson-latency": JETSON_LATENCY}
