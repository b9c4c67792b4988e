import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from calibration.datasets import Subset, digits_source, make_splits, open_source
from calibration.errors import DatasetError
from calibration.evaluate import evaluate_top1
from calibration.preprocess import Preprocess
from tests.conftest import SHARED_DATA, write_digit_folder


def test_image_folder_rgb_png(digit_folder):
    source = open_source(digit_folder)
    assert len(source) == 200 and source.classes == [str(i) for i in range(10)]
    assert source.load(0).size == (32, 32)


def test_image_folder_grayscale_jpeg_with_train_and_test(tmp_path):
    write_digit_folder(tmp_path / "d" / "train", per_class=12, mode="L", suffix=".jpg")
    write_digit_folder(tmp_path / "d" / "test", per_class=3, mode="L", suffix=".jpg")
    source = open_source(tmp_path / "d")
    splits = make_splits(source, calib_size=20)
    assert source.is_test.sum() == 30
    assert set(splits.eval.tolist()) == set(np.flatnonzero(source.is_test).tolist())  # the dataset's own test split
    assert len(splits.calib) == 20 and len(splits.train) == 100
    x, y = next(Subset(source, splits.eval, Preprocess(crop_size=32, in_chans=1, mean=(0.5,), std=(0.5,))).batches(8))
    assert x.shape == (8, 1, 32, 32) and x.dtype == np.float32


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files(tmp_path):
    digits = digits_source()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", digits.images[:1000])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", digits.labels[:1000])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", digits.images[1000:1200])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", digits.labels[1000:1200])
    source = open_source(tmp_path)
    assert len(source) == 1200 and source.is_test.sum() == 200
    test_images = np.stack([np.asarray(source.load(int(i))) for i in np.flatnonzero(source.is_test)])
    assert np.array_equal(test_images, digits.images[1000:1200])
    assert np.array_equal(source.labels[source.is_test], digits.labels[1000:1200])


def test_real_mnist_idx_when_present():
    mnist = SHARED_DATA / "mnist"
    if not (mnist / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST test set is not available at {mnist}")
    source = open_source(mnist)
    assert len(source) == 10_000 and len(source.classes) == 10 and source.load(0).size == (28, 28)


def test_a_test_split_alone_is_evaluated_whole_and_calibration_says_why_it_cannot(tmp_path):
    """MNIST's t10k files alone are its test set: every image is evaluated, none is split off for training or
    calibration, and quantization says where calibration images can come from instead."""
    from calibration.calibrate import CalibrationError, from_split
    from calibration.datasets import Subset, make_splits
    from calibration.preprocess import Preprocess

    digits = digits_source()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", digits.images[:300])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", digits.labels[:300])
    source = open_source(tmp_path)
    splits = make_splits(source, calib_size=64)
    assert len(splits.eval) == 300 and len(splits.train) == 0 and len(splits.calib) == 0
    with pytest.raises(CalibrationError, match="holds only its test split, which is evaluated whole; .*"
                                               "quantize.calibration_data=FILE.npy"):
        from_split(Subset(source, splits.calib, Preprocess(crop_size=8, in_chans=1, mean=(0.5,), std=(0.5,))), 64,
                   (1, 8, 8))


def test_truncated_idx(tmp_path):
    _write_idx(tmp_path / "x-images-idx3-ubyte.gz", np.zeros((10, 8, 8)))
    raw = gzip.decompress((tmp_path / "x-images-idx3-ubyte.gz").read_bytes())[:100]
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    _write_idx(tmp_path / "x-labels-idx1-ubyte.gz", np.zeros(10))
    with pytest.raises(DatasetError, match="truncated"):
        open_source(tmp_path)


def test_splits_are_deterministic_disjoint_and_stratified():
    source = digits_source()
    a, b = make_splits(source, calib_size=100, seed=3), make_splits(source, calib_size=100, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((a.train, a.calib, a.eval), (b.train, b.calib, b.eval)))
    assert not set(a.train) & set(a.eval) and not set(a.train) & set(a.calib) and not set(a.calib) & set(a.eval)
    assert len(a.train) + len(a.calib) + len(a.eval) == len(source)
    assert np.bincount(source.labels[a.eval]).min() >= 30  # every class is represented
    c = make_splits(source, calib_size=100, seed=4)
    assert not np.array_equal(a.eval, c.eval)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p, "no images found"),
    (lambda p: (p / "only").mkdir() or write_digit_folder(p, classes=1, per_class=3), "single class"),
    (lambda p: p / "missing", "does not exist"),
])
def test_bad_datasets(tmp_path, setup, message):
    path = setup(tmp_path) or tmp_path
    with pytest.raises(DatasetError, match=message):
        open_source(path)


def test_corrupt_image_names_the_file(tmp_path):
    write_digit_folder(tmp_path, per_class=2, classes=2)
    (tmp_path / "1" / "001.png").write_bytes(b"not a png")
    source = open_source(tmp_path)
    with pytest.raises(DatasetError, match="001.png"):
        Subset(source, np.arange(len(source)), Preprocess(crop_size=32)).decode_uint8()


def test_preprocess_resize_and_centre_crop():
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8))
    out = Preprocess(crop_size=32, resize_size=40).resize_crop(image)
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out, np.asarray(image)[4:36, 14:46])  # no resize needed: shorter side is 40
    x = Preprocess(crop_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)(Image.new("RGB", (32, 32), (255, 0, 128)))
    assert x.shape == (3, 32, 32)
    assert np.allclose(x[:, 0, 0], [2.0, -2.0, (128 / 255 - 0.5) / 0.25], atol=1e-6)  # float32


def test_evaluate_streams_and_scores():
    source = digits_source()
    data = Subset(source, np.arange(100), Preprocess(crop_size=8, in_chans=1, mean=(0.5,), std=(0.5,)))
    labels = source.labels[:100]
    seen = []

    def oracle(x):
        seen.append(len(x))
        logits = np.zeros((len(x), 10), np.float32)
        start = sum(seen[:-1])
        logits[np.arange(len(x)), labels[start:start + len(x)]] = 1
        return logits

    result = evaluate_top1(oracle, data, batch_size=32)
    assert result.top1 == 1.0 and seen == [32, 32, 32, 4]
    assert result.agreement(result) == 1.0
