"""Calibration data for post-training quantization, and one adapter per quantization library.

A ``CalibrationSet`` is a bounded, seeded, class-stratified subset of the *calibration* split from
``make_splits`` (disjoint from evaluation by construction), or a user's ``.npy`` array of already
preprocessed inputs. It streams batches: nothing holds the whole set, since percentile and entropy
calibration already take a lot of memory (microsoft/onnxruntime#10503). Each library wants the same batches
in its own shape:

- ONNX Runtime: a ``CalibrationDataReader`` (``get_next`` returns ``{input_name: batch}`` until ``None``);
- NNCF: an ``nncf.Dataset`` over an iterable it may walk more than once;
- neural-compressor (PT2E): a forward loop ``run_fn(model)`` that feeds every batch through the prepared model.

There is no path that quantizes without data: an empty set, one smaller than asked, or batches of another
shape than the model's input are errors (ModelOpt silently falls back to random scales; we refuse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.datasets import Subset
from calibration.errors import DatasetError


class CalibrationError(DatasetError):
    """Calibration data that cannot calibrate this model: missing, too small, or of the wrong shape."""


@dataclass
class CalibrationSet:
    """``size`` inputs of shape ``input_shape`` (C, H, W), streamed in batches of ``batch_size``."""

    name: str
    input_shape: tuple[int, int, int]
    size: int
    batch_size: int
    _subset: Subset | None = None
    _array_path: Path | None = None

    def batches(self) -> Iterator[np.ndarray]:
        """Float32 (B, C, H, W) batches, each checked against the model's input shape."""
        if self._subset is not None:
            for x, _ in self._subset.batches(self.batch_size):
                yield _checked(x, self.input_shape, self.name)
        else:
            array = np.load(self._array_path, mmap_mode="r")  # memory-mapped: read one batch at a time
            for start in range(0, self.size, self.batch_size):
                yield _checked(np.array(array[start : start + self.batch_size], np.float32),  # a copy, writable
                               self.input_shape, self.name)

    def describe(self) -> dict[str, object]:
        return {"source": self.name, "size": self.size}


def from_split(subset: Subset, size: int, input_shape: tuple[int, int, int], *, batch_size: int = 32) -> CalibrationSet:
    """The first ``size`` images of the calibration split (seeded by ``make_splits``), classes interleaved."""
    available = len(subset)
    if size <= 0:
        raise CalibrationError("the calibration size is 0; set quantize.calib_size to a positive number of images")
    if available == 0 and len(subset.source) and subset.source.is_test.all():
        raise CalibrationError(
            f"{subset.source.name} holds only its test split, which is evaluated whole; calibration needs other "
            "images: add the training files beside it (e.g. train-images-idx3-ubyte), pass "
            "quantize.calibration_data=FILE.npy, or measure without quantizing (--set quantize.enabled=false)"
        )
    if available == 0:
        raise CalibrationError(
            f"the calibration split of {subset.source.name} is empty; raise data.calib_size (images held out for "
            "calibration) or add images to the dataset"
        )
    if available < size:
        raise CalibrationError(
            f"asked for {size} calibration images but the calibration split holds {available}; lower "
            f"quantize.calib_size to at most {available} or raise data.calib_size"
        )
    rows = _stratified_prefix(subset, size)
    return CalibrationSet(f"split:calib[{size}]", input_shape, size, batch_size,
                          _subset=Subset(subset.source, rows, subset.preprocess))


def from_array(path: Path, size: int, input_shape: tuple[int, int, int], *, batch_size: int = 32) -> CalibrationSet:
    """A ``.npy`` file of preprocessed float inputs (N, C, H, W), for users with their own preprocessing."""
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist; pass a .npy array of shape (N, C, H, W)")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read calibration file {path} as a .npy array: {e}") from e
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(input_shape):
        raise CalibrationError(
            f"calibration array {path.name} has shape {tuple(array.shape)} but the model takes (N, "
            f"{', '.join(map(str, input_shape))}); preprocess the images to the model's channels and size"
        )
    if len(array) == 0:
        raise CalibrationError(f"calibration array {path} holds no images; save at least quantize.calib_size of them")
    if len(array) < size:
        raise CalibrationError(
            f"asked for {size} calibration images but {path.name} holds {len(array)}; lower quantize.calib_size "
            f"to at most {len(array)} or add images"
        )
    return CalibrationSet(f"array:{path.name}[{size}]", input_shape, size, batch_size, _array_path=path)


def _stratified_prefix(subset: Subset, size: int) -> np.ndarray:
    """``size`` rows, classes taken in turn so any prefix is balanced; within a class, in index order."""
    labels = subset.labels
    order = [subset.indices[labels == c] for c in np.unique(labels)]
    rows, depth = [], 0
    while len(rows) < size:
        rows += [members[depth] for members in order if depth < len(members)][: size - len(rows)]
        depth += 1
    return np.asarray(rows, np.int64)


def _checked(x: np.ndarray, shape: tuple[int, int, int], name: str) -> np.ndarray:
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise CalibrationError(
            f"calibration batch from {name} has shape {tuple(x.shape)}, the model takes (B, "
            f"{', '.join(map(str, shape))}); give images of the model's channel count and size"
        )
    return x


# ---------------------------------------------------------------------------------------------- adapters
def onnxruntime_reader(calib: CalibrationSet, input_name: str, batch_size: int | None = None):
    """An ONNX Runtime ``CalibrationDataReader`` that streams ``calib``, each of its batches cut into pieces of at
    most ``batch_size`` images (by default left whole); ``rewind`` restarts it.

    It also takes ONNX Runtime's strided calibration (``extra_options["CalibStridedMinMax"]``): ``len`` counts its
    batches and ``set_range(start, end)`` serves batches ``start`` to ``end``; the stream is read once, in order,
    so ranges must follow one another (a range from 0 restarts it).
    """
    from onnxruntime.quantization import CalibrationDataReader

    size = calib.batch_size if batch_size is None else batch_size
    if size <= 0:
        raise CalibrationError(f"the calibration batch size is {size}; it must be a positive number of images")

    def pieces() -> Iterator[np.ndarray]:
        for batch in calib.batches():
            for start in range(0, len(batch), size):
                yield batch[start : start + size]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._end is not None and self._position >= self._end:
                return None
            batch = next(self._it, None)
            if batch is None:
                return None
            self._position += 1
            return {input_name: batch}

        def rewind(self) -> None:
            self._it, self._position, self._end = pieces(), 0, None

        def set_range(self, start_index: int, end_index: int) -> None:
            if start_index == 0:
                self.rewind()
            elif start_index != self._position:
                raise CalibrationError(f"the calibration stream is read in order: asked for batch {start_index} "
                                       f"after batch {self._position}")
            self._end = end_index

        def __len__(self) -> int:
            full, rest = divmod(calib.size, calib.batch_size)
            return full * -(-calib.batch_size // size) + -(-rest // size)

    return _Reader()


class Reiterable:
    """An iterable that restarts the stream on every ``iter``: NNCF walks the dataset more than once."""

    def __init__(self, make: Callable[[], Iterator[np.ndarray]], length: int) -> None:
        self._make, self._length = make, length

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._make()

    def __len__(self) -> int:
        return self._length


def nncf_dataset(calib: CalibrationSet, transform: Callable[[np.ndarray], object] | None = None):
    """An ``nncf.Dataset`` of single images (NNCF counts ``subset_size`` in items), streamed from ``calib``."""
    import nncf

    def items() -> Iterator[np.ndarray]:
        for batch in calib.batches():
            for image in batch:
                yield image[None]  # (1, C, H, W): OpenVINO models are quantized at their deployed batch of 1

    return nncf.Dataset(Reiterable(items, calib.size), transform)


def forward_loop(calib: CalibrationSet) -> Callable[[object], None]:
    """``run_fn(model)`` for neural-compressor's ``prepare``/``convert``: every batch through the observed model."""

    def run(model) -> None:
        import torch

        with torch.no_grad():
            for batch in calib.batches():
                model(torch.from_numpy(batch))

    return run
