import numpy as np
import pytest

from calibration.calibrate import (
    CalibrationError, forward_loop, from_array, from_split, nncf_dataset, onnxruntime_reader,
)
from calibration.datasets import Subset, digits_source, make_splits
from calibration.preprocess import Preprocess

PRE = Preprocess(crop_size=8, in_chans=1, mean=(0.5,), std=(0.5,))


def _calib_split(calib_size=100):
    source = digits_source()
    splits = make_splits(source, calib_size=calib_size, seed=0)
    return source, splits, Subset(source, splits.calib, PRE)


def test_split_calibration_is_stratified_seeded_and_disjoint_from_eval():
    source, splits, subset = _calib_split()
    calib = from_split(subset, 50, (1, 8, 8), batch_size=16)
    rows = calib._subset.indices
    assert len(rows) == 50 and set(rows) <= set(splits.calib) and not set(rows) & set(splits.eval)
    counts = np.bincount(source.labels[rows], minlength=10)
    assert counts.min() >= 4 and counts.max() <= 6  # every class, in proportion
    batches = list(calib.batches())
    assert [len(b) for b in batches] == [16, 16, 16, 2] and batches[0].shape[1:] == (1, 8, 8)
    again = from_split(_calib_split()[2], 50, (1, 8, 8), batch_size=16)
    assert np.array_equal(next(again.batches()), batches[0])  # same seed, same images


def test_empty_or_small_calibration_split_is_refused():
    _, _, subset = _calib_split()
    with pytest.raises(CalibrationError, match="calibration split holds 100"):
        from_split(subset, 500, (1, 8, 8))
    source = digits_source()
    empty = Subset(source, np.zeros(0, np.int64), PRE)
    with pytest.raises(CalibrationError, match="empty"):
        from_split(empty, 10, (1, 8, 8))


def test_calibration_array_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.zeros((20, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match=r"shape \(20, 3, 8, 8\) but the model takes \(N, 1, 8, 8\)"):
        from_array(path, 10, (1, 8, 8))
    with pytest.raises(CalibrationError, match="holds 20"):
        from_array(path, 64, (3, 8, 8))
    np.save(path, np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="no images"):
        from_array(path, 1, (3, 8, 8))
    with pytest.raises(CalibrationError, match="does not exist"):
        from_array(tmp_path / "missing.npy", 1, (3, 8, 8))


def test_split_images_of_another_size_than_the_model_are_refused():
    _, _, subset = _calib_split()
    calib = from_split(subset, 10, (3, 32, 32))  # a 1-channel 8x8 dataset for a 3-channel 32x32 model
    with pytest.raises(CalibrationError, match="the model takes"):
        next(calib.batches())


def test_adapters_stream_the_same_images(tmp_path):
    array = np.random.default_rng(0).normal(size=(10, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", array)
    calib = from_array(tmp_path / "c.npy", 10, (1, 8, 8), batch_size=4)
    reader = onnxruntime_reader(calib, "pixel_values")
    got = []
    while (item := reader.get_next()) is not None:
        got.append(item["pixel_values"])
    assert np.array_equal(np.concatenate(got), array)
    reader.rewind()
    assert reader.get_next()["pixel_values"].shape == (4, 1, 8, 8)

    dataset = nncf_dataset(calib)
    items = list(dataset.get_inference_data())
    assert len(items) == 10 and items[3].shape == (1, 1, 8, 8) and np.array_equal(items[3][0], array[3])
    assert len(list(dataset.get_inference_data())) == 10  # NNCF may walk it twice

    seen = []
    forward_loop(calib)(lambda x: seen.append(x.shape[0]) or x)
    assert seen == [4, 4, 2]


def test_onnxruntime_reader_rebatches_and_serves_strided_ranges(tmp_path):
    array = np.random.default_rng(1).normal(size=(10, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", array)
    calib = from_array(tmp_path / "c.npy", 10, (1, 8, 8), batch_size=4)  # batches of 4, 4, 2
    reader = onnxruntime_reader(calib, "x", batch_size=3)
    assert len(reader) == 5  # 3+1, 3+1, 2
    sizes = []
    while (item := reader.get_next()) is not None:
        sizes.append(item["x"].shape[0])
    assert sizes == [3, 1, 3, 1, 2]

    # ONNX Runtime's strided calibration: one range after another, each ends where asked
    served = []
    for start in range(0, len(reader), 2):
        reader.set_range(start_index=start, end_index=start + 2)
        while (item := reader.get_next()) is not None:
            served.append(item["x"])
    assert np.array_equal(np.concatenate(served), array)
    reader.set_range(start_index=0, end_index=1)  # from 0 again: a restart
    assert np.array_equal(reader.get_next()["x"], array[:3]) and reader.get_next() is None
    with pytest.raises(CalibrationError, match="read in order"):
        reader.set_range(start_index=3, end_index=4)
    with pytest.raises(CalibrationError, match="batch size is 0"):
        onnxruntime_reader(calib, "x", batch_size=0)
