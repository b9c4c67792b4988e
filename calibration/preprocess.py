"""Image preprocessing that travels with the model, so every runtime sees identical input.

The recipe of timm's eval transform (resize the shorter side, centre-crop, scale to [0, 1], normalise by
mean and std), written with Pillow and numpy because torchvision has no CPU build on these machines. It is
stored in the checkpoint's config and applied once, in numpy; the same float32 array then goes to PyTorch,
ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import dataclasses
import math
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
        """Refuse preprocessing that cannot be right (``ValueError`` naming the value), before any image is read."""
        for name in ("crop_size", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"preprocess {name}={value!r} must be a positive whole number")
        if self.in_chans not in (1, 3):
            raise ValueError(f"preprocess in_chans={self.in_chans}: images are read as 1 (grey) or 3 (RGB) channels")
        if self.resize_size is not None and (not isinstance(self.resize_size, int) or self.resize_size < self.crop_size):
            raise ValueError(f"preprocess resize_size={self.resize_size!r} must be a whole number no smaller than "
                             f"crop_size {self.crop_size}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"preprocess interpolation={self.interpolation!r}; choose from {sorted(_RESAMPLE)}")
        try:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        except (TypeError, ValueError):
            raise ValueError(f"preprocess mean {self.mean!r} and std {self.std!r} must be lists of numbers") from None
        if not all(math.isfinite(v) for v in self.mean + self.std) or not all(s > 0 for s in self.std):
            raise ValueError(f"preprocess std {list(self.std)} must be positive and mean {list(self.mean)} finite: "
                             "the input is divided by std")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"preprocess mean and std need {self.in_chans} value(s) each, one per input channel; "
                             f"got {list(self.mean)} and {list(self.std)}")

    @property
    def mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (H, W, C) uint8 at ``crop_size``: the deterministic geometric part."""
        image = to_8bit(image).convert(self.mode)
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
        """From ``to_dict``'s form (a checkpoint's or a bundle's); a wrong key or value is a ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be a mapping of crop_size, mean, std, ...; got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown or "crop_size" not in d:
            raise ValueError(f"preprocessing has unknown keys {unknown}" if unknown else "preprocessing has no crop_size")
        return cls(**d)


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(image: Image.Image) -> Image.Image:
    """The image in a mode Pillow converts to L or RGB without loss of meaning; ``ValueError`` when there is none.

    Pillow's ``convert("L")`` saturates 16-bit grey at 255 (a 16-bit PNG of a digit turns white), so 16-bit
    values are scaled to 8 bits (divided by 257, the ratio of 65535 to 255). 32-bit integer images are read the
    same way when their values fit 16 bits, and as they are when they fit 8; float images and modes Pillow cannot
    convert have no agreed range and are refused.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"{mode} image values span {low}..{high}, outside 16 bits; save it as 8- or 16-bit PNG")
        scale = 257.0 if mode in _SIXTEEN_BIT or high > 255 else 1.0
        return Image.fromarray(np.round(values.astype(np.float64) / scale).astype(np.uint8), mode="L")
    if mode == "F":
        raise ValueError("a 32-bit float image has no agreed value range; save it as an 8- or 16-bit PNG or a JPEG")
    if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV"):
        raise ValueError(f"images of mode {mode} are not read; save it as an 8- or 16-bit PNG or a JPEG")
    return image
