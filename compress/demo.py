"""The built-in demo: a small ViT trained on scikit-learn's digits, then the whole pipeline, with no download.

The digits are real handwritten data (UCI, 1,797 8x8 grayscale images) bundled with scikit-learn, so the demo
needs nothing but the installed packages. Training takes well under the three minutes the quick start allows
on a 2-core CPU.
"""

from __future__ import annotations

DEMO_RECIPE = {
    "model": {
        "image_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4,
        "mlp_dim": 128,
    },
    "preprocess": {"crop_size": 8, "mean": [0.5], "std": [0.5]},
    "data": {"path": "builtin:digits", "calib_size": 128},
    "quantize": {"calib_size": 128},
    # Measured here (2 cores): 14 s of training, 96.4% top-1 on the 359 held-out digits. A one-pixel shift is a
    # large augmentation on an 8x8 image and costs accuracy (88%); digits are not mirror-symmetric, so no flip.
    "train": {"epochs": 40, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 2, "crop_padding": 0, "flip": False,
              "label_smoothing": 0.0},
    "measure": {"iterations": 100, "max_seconds": 3.0},
    # The chain, under one budget of 1 pt: prune a quarter of the heads and MLP units, recover by distillation,
    # try token merging, quantize, and pack the fastest model within budget for an x86 CPU.
    "pipeline": {"stages": ["prune", "recover", "tokens", "quantize", "deploy"], "max_drop": 1.0, "target": "cpu-x86"},
    "prune": {"heads": 0.25, "mlp": 0.25},
    "recover": {"epochs": 5, "batch_size": 32, "lr": 5e-4, "crop_padding": 0, "flip": False},
    "tokens": {"macs": [0.75]},
}
