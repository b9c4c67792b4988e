"""Image classification datasets, their deterministic splits, and streamed batches.

Three sources, one interface (``ImageSource``: labels, class names, and ``load(i)`` returning a PIL image):
- an ImageFolder directory (``root/<class>/*.jpg``, or ``root/train/<class>`` beside ``root/test`` or
  ``root/val``), JPEG or PNG, RGB or grayscale;
- MNIST-style idx files (``*-images-idx3-ubyte[.gz]`` with ``*-labels-idx1-ubyte[.gz]``);
- scikit-learn's bundled 8x8 digits, real data that needs no download (the demo's default).

``make_splits`` draws train, calibration and evaluation indices that never overlap, stratified by class and
seeded, so the same dataset and seed always give the same splits. A dataset that ships its own test split
keeps it as the evaluation split. Evaluation streams decoded batches; nothing holds the whole dataset.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calibration.errors import DatasetError
from calibration.preprocess import Preprocess, to_8bit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TEST_DIRS = ("test", "val", "valid", "validation")


class ImageSource:
    """A labelled set of images. ``is_test`` marks a split the dataset itself reserved for evaluation."""

    name: str
    classes: list[str]
    labels: np.ndarray  # (N,) int64
    is_test: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def use_class_order(self, classes: list[str]) -> None:
        """Renumber the labels so that label i is ``classes[i]`` (the same names, in a model's order)."""
        if sorted(classes) != sorted(self.classes):
            raise DatasetError(f"dataset {self.name} has classes {self.classes[:10]}, not {classes[:10]}")
        position = np.asarray([classes.index(c) for c in self.classes], np.int64)
        self.labels = position[self.labels]
        self.classes = list(classes)


class FolderSource(ImageSource):
    def __init__(self, root: Path) -> None:
        self.name = f"folder:{root.resolve()}"
        parts = [(root / "train", False)] + [(root / d, True) for d in TEST_DIRS if (root / d).is_dir()]
        if not (root / "train").is_dir():
            parts = [(root, False)]
        self.classes = sorted(p.name for p in parts[0][0].iterdir() if p.is_dir())
        paths, labels, is_test = [], [], []
        for folder, test in parts:
            for label, cls in enumerate(self.classes):
                files = sorted(f for f in (folder / cls).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
                paths += files
                labels += [label] * len(files)
                is_test += [test] * len(files)
        self.paths = paths
        self.labels = np.asarray(labels, np.int64)
        self.is_test = np.asarray(is_test, bool)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image.load()
                return to_8bit(image)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}; remove or replace the file") from e
        except (ValueError, Image.DecompressionBombError) as e:  # a mode with no 8-bit meaning, or a pixel bomb
            raise DatasetError(f"cannot use image {path}: {e}") from e


class ArraySource(ImageSource):
    """Images held as a (N, H, W) or (N, H, W, C) uint8 array (idx files, scikit-learn digits)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: list[str], is_test: np.ndarray) -> None:
        self.name, self.images, self.classes = name, images, classes
        self.labels = labels.astype(np.int64)
        self.is_test = is_test

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DatasetError(f"cannot read idx file {path}: {e}; it may be truncated or not in idx format") from e


def _idx_source(root: Path) -> ArraySource:
    image_files = sorted(root.glob("*images-idx3-ubyte*"))
    images, labels, is_test = [], [], []
    for image_file in image_files:
        label_file = root / image_file.name.replace("images-idx3", "labels-idx1")
        if not label_file.exists():
            raise DatasetError(f"idx images {image_file} have no labels file {label_file.name} beside them")
        x, y = _read_idx(image_file), _read_idx(label_file)
        if len(x) != len(y):
            raise DatasetError(f"{image_file.name} holds {len(x)} images but {label_file.name} {len(y)} labels")
        images.append(x)
        labels.append(y)
        # MNIST's t10k files are its test split, evaluated whole, also when they are the only files there
        is_test.append(np.full(len(y), image_file.name.startswith(("t10k", "test"))))
    y = np.concatenate(labels)
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return ArraySource(f"idx:{root.resolve()}", np.concatenate(images), y, classes, np.concatenate(is_test))


def digits_source() -> ArraySource:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI), scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return ArraySource("builtin:digits", images, digits.target, [str(c) for c in range(10)], np.zeros(len(images), bool))


def open_source(data: str | Path) -> ImageSource:
    """``builtin:digits``, a directory of idx files, or an ImageFolder directory."""
    if str(data) == "builtin:digits":
        return digits_source()
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"dataset path {root} does not exist; pass --data with an ImageFolder or idx directory")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a directory; pass the folder that holds the class folders")
    source: ImageSource = _idx_source(root) if any(root.glob("*images-idx3-ubyte*")) else FolderSource(root)
    if len(source) == 0:
        raise DatasetError(
            f"no images found under {root}; expected class folders of {sorted(IMAGE_SUFFIXES)} files "
            "(root/<class>/*.jpg, optionally under train/ and test/) or idx files"
        )
    present = np.unique(source.labels)
    if len(present) < 2:
        raise DatasetError(f"dataset {root} has a single class ({source.classes[present[0]]}); classification needs two or more")
    return source


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    calib: np.ndarray
    eval: np.ndarray

    def check_disjoint(self) -> None:
        parts = [set(self.train.tolist()), set(self.calib.tolist()), set(self.eval.tolist())]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), "splits overlap"


def make_splits(
    source: ImageSource, *, calib_size: int = 512, eval_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Stratified, seeded, disjoint splits. A dataset's own test part becomes the evaluation split whole.

    The evaluation split is in a seeded random order, not the files' (class folders one after another): any
    prefix of it is then a simple random sample, which is what ``data.eval_limit`` takes and where scoring that
    stops early (``calibration.evaluate``) stops. In file order the first 2,000 of CIFAR-10's test images are two
    classes, and a pruned model's drop on them was 5 pt where the whole split gave 13.
    """
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~source.is_test)
    has_test = bool(source.is_test.any())
    calib_size = min(calib_size, len(pool) // 10 if not has_test else len(pool) // 5)
    train, calib, evals = [], [], [np.flatnonzero(source.is_test)] if has_test else []
    counts = np.bincount(source.labels[pool], minlength=len(source.classes))
    for label in range(len(source.classes)):
        members = rng.permutation(pool[source.labels[pool] == label])
        share = counts[label] / max(1, len(pool))
        n_eval = 0 if has_test else int(round(len(members) * eval_fraction))
        n_calib = int(round(calib_size * share))
        evals.append(members[:n_eval])
        calib.append(members[n_eval : n_eval + n_calib])
        train.append(members[n_eval + n_calib :])
    train_idx, calib_idx, eval_idx = (np.sort(np.concatenate(p)).astype(np.int64) for p in (train, calib, evals))
    splits = Splits(train_idx, calib_idx, rng.permutation(eval_idx).astype(np.int64))
    splits.check_disjoint()
    return splits


def stratified_sample(source: ImageSource, indices: np.ndarray, limit: int | None, *, seed: int = 0) -> np.ndarray:
    """At most ``limit`` of ``indices`` (all when None or fewer), each class keeping its share, drawn by ``seed``;
    sorted like ``indices``. What ``data.train_limit`` takes: 5,000 of CIFAR-10's 49,488 training images are 500
    per class, not the first five classes."""
    if limit is None or limit >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    labels = source.labels[indices]
    keep = []
    for label in np.unique(labels):
        members = indices[labels == label]
        keep.append(rng.permutation(members)[: int(round(limit * len(members) / len(indices)))])
    return np.sort(np.concatenate(keep))[:limit]


@dataclass
class Subset:
    """Indices into a source plus the preprocessing the model expects."""

    source: ImageSource
    indices: np.ndarray
    preprocess: Preprocess

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def _decode(self, index: int) -> np.ndarray:
        return self.preprocess.resize_crop(self.source.load(int(index)))  # (H, W, C) uint8

    def decode_uint8(self, indices: np.ndarray | None = None, *, workers: int = 2) -> np.ndarray:
        """Decode the given rows (default: all) to (N, H, W, C) uint8 at the model's size; threads for JPEG."""
        indices = self.indices if indices is None else indices
        with ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(pool.map(self._decode, indices, chunksize=256))
        if not arrays:
            return np.zeros((0, self.preprocess.crop_size, self.preprocess.crop_size, self.preprocess.in_chans), np.uint8)
        return np.stack(arrays)

    def head(self, n: int) -> Subset:
        """The first ``n`` rows: a simple random sample where the split is shuffled, as the evaluation split is."""
        return Subset(self.source, self.indices[:n], self.preprocess)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (B, C, H, W) float32 inputs with their labels; memory bounded by one batch."""
        for start in range(0, len(self.indices), batch_size):
            rows = self.indices[start : start + batch_size]
            yield self.preprocess.normalize(self.decode_uint8(rows)), self.source.labels[rows]
