"""Image preprocessing that travels with the model, so every runtime sees identical input.

The recipe of timm's eval transform (resize the shorter side, centre-crop, scale to [0, 1], normalise by
mean and std), written with Pillow and numpy because torchvision has no CPU build on these machines. It is
stored in the checkpoint's config and applied once, in numpy; the same float32 array then goes to PyTorch,
ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize_size``, centre-crop ``crop_size``, normalise per channel."""

    crop_size: int
    in_chans: int = 3
    resize_size: int | None = None  # None: same as crop_size (no crop margin)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean and std need {self.in_chans} values each, got {self.mean} and {self.std}")

    @property
    def mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (H, W, C) uint8 at ``crop_size``: the deterministic geometric part."""
        image = image.convert(self.mode)
        size = self.resize_size or self.crop_size
        w, h = image.size
        if min(w, h) != size:
            scale = size / min(w, h)
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), _RESAMPLE[self.interpolation])
        w, h = image.size
        left, top = (w - self.crop_size) // 2, (h - self.crop_size) // 2
        if (w, h) != (self.crop_size, self.crop_size):
            image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        array = np.asarray(image, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array  # (H, W, C)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, C) uint8 -> (B, C, H, W) float32, normalised."""
        x = images.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> (C, H, W) float32."""
        return self.normalize(self.resize_crop(image)[None])[0]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(**d)
