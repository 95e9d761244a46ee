"""Every data source on fixtures the tests write, plus the real MNIST test split when present."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import data
from pipeline.config import DataConfig
from pipeline.errors import DataError
from tests.conftest import MNIST_TEST
from tests.fixtures import synthetic_digits, write_idx, write_idx_folder, write_image_folder


def test_digits_splits_are_stratified_seeded_and_complete():
    splits = data.load(DataConfig())
    sizes = splits.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360  # 20% held out
    assert splits.x_train.shape[1:] == (1, 8, 8) and splits.x_train.max() == 16
    assert splits.preprocess.scale == 1 / 16
    # Stratified: every class is in every split, in about the same share.
    for y in (splits.y_train, splits.y_val, splits.y_test):
        shares = np.bincount(y, minlength=10) / len(y)
        assert np.all(np.abs(shares - 0.1) < 0.03)
    again = data.load(DataConfig())
    assert again.fingerprint == splits.fingerprint
    other = data.load(DataConfig(seed=1))
    assert other.fingerprint != splits.fingerprint


def test_preprocess_normalizes_the_training_split():
    splits = data.load(DataConfig())
    x = splits.preprocess.apply(splits.x_train)
    assert x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    assert data.Preprocess.from_dict(splits.preprocess.to_dict()) == splits.preprocess
    with pytest.raises(DataError, match="expected images of shape"):
        splits.preprocess.apply(np.zeros((2, 1, 9, 8), np.float32))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_with_train_and_test_files(tmp_path, gz):
    folder = write_idx_folder(tmp_path / "idx", gz=gz)
    splits = data.load(DataConfig(dataset="idx", data_dir=folder))
    assert len(splits.y_test) == 36  # the given test file, untouched
    assert len(splits.y_train) + len(splits.y_val) == 36
    assert splits.labels == ("0", "1", "2") and splits.preprocess.scale == 1 / 255


def test_idx_with_one_split_is_split_with_the_seed(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", splits=("t10k",), n_per_class=20)
    splits = data.load(DataConfig(dataset="idx", data_dir=folder))
    assert sum(splits.sizes().values()) == 60 and len(splits.y_test) == 12


def test_idx_rejects_wrong_magic_and_mismatched_counts(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", splits=("t10k",))
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="36 images but .* 5 labels"):
        data.load(DataConfig(dataset="idx", data_dir=folder))
    import gzip

    labels.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00" * 40))
    with pytest.raises(DataError, match="bad magic"):
        data.load(DataConfig(dataset="idx", data_dir=folder))


def test_idx_rejects_a_truncated_payload(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", splits=("t10k",), gz=False)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(DataError, match="header says shape"):
        data.load(DataConfig(dataset="idx", data_dir=folder))


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        data.load(DataConfig(dataset="idx", data_dir=tmp_path / "nope"))
    with pytest.raises(DataError, match="no IDX files"):
        data.load(DataConfig(dataset="idx", data_dir=tmp_path))


@pytest.mark.skipif(not MNIST_TEST.is_dir(), reason="../shared/data/mnist-test is not beside this checkout")
def test_real_mnist_test_split_loads():
    splits = data.load(DataConfig(dataset="idx", data_dir=MNIST_TEST))
    assert sum(splits.sizes().values()) == 10_000 and len(splits.y_test) == 2_000
    assert splits.x_train.shape[1:] == (1, 28, 28) and splits.labels == tuple("0123456789")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_folder_gray_and_rgb(tmp_path, mode, channels):
    folder = write_image_folder(tmp_path / "imgs", mode=mode)
    splits = data.load(DataConfig(dataset="folder", data_dir=folder, image_size=(10, 10), test_fraction=0.25))
    assert splits.x_train.shape[1:] == (channels, 10, 10)
    assert splits.labels == ("class_0", "class_1", "class_2")


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="at least 2 class"):
        data.load(DataConfig(dataset="folder", data_dir=tmp_path / "empty", image_size=(8, 8)))
    folder = write_image_folder(tmp_path / "imgs")
    (folder / "class_0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1 unreadable image file: class_0/broken.png \\(cannot identify image file\\)"):
        data.load(DataConfig(dataset="folder", data_dir=folder, image_size=(8, 8)))


def _write_npz(path, **overrides):
    x, y = synthetic_digits(n_per_class=10)
    arrays = {"x_train": x, "y_train": y.astype(np.int64), "x_test": x[:15], "y_test": y[:15].astype(np.int64)}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def test_image_size_resizes_every_source(tmp_path):
    plain, resized = data.load(DataConfig()), data.load(DataConfig(image_size=(16, 12)))
    assert plain.x_train.shape[2:] == (8, 8) and plain.preprocess.size == (8, 8)
    assert resized.x_train.shape[2:] == (16, 12) and resized.x_test.shape[2:] == (16, 12)
    assert resized.preprocess.size == (16, 12) and "resized to 16x12" in resized.source
    assert resized.fingerprint != plain.fingerprint  # a run trained at 8x8 refuses 16x12 data, and back
    # Same images, same labels, same range (bilinear mixes neighbours, it never leaves 0-16).
    assert np.array_equal(resized.y_train, plain.y_train)
    assert 0 <= resized.x_train.min() and resized.x_train.max() <= 16
    downsampled = resized.x_train[:, :, ::2, ::2]
    assert np.corrcoef(downsampled.ravel(), data.load(DataConfig(image_size=(8, 6))).x_train.ravel())[0, 1] > 0.9
    # Asking for the stored size changes nothing (the negative control).
    assert np.array_equal(data.load(DataConfig(image_size=(8, 8))).x_train, plain.x_train)
    folder = write_idx_folder(tmp_path / "idx")
    assert data.load(DataConfig(dataset="idx", data_dir=folder, image_size=(4, 4))).x_test.shape[2:] == (4, 4)


def test_npz_like_keras_mnist(tmp_path):
    path = _write_npz(tmp_path / "d.npz")
    splits = data.load(DataConfig(dataset="npz", data_dir=path))
    assert len(splits.y_test) == 15 and splits.preprocess.scale == 1 / 255


def test_npz_rejects_nan_bad_labels_and_missing_arrays(tmp_path):
    x, _ = synthetic_digits(n_per_class=10)
    bad = x.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        data.load(DataConfig(dataset="npz", data_dir=_write_npz(tmp_path / "nan.npz", x_train=bad)))
    labels = np.repeat(np.arange(3), 10) - 1
    with pytest.raises(DataError, match="out of range"):
        data.load(DataConfig(dataset="npz", data_dir=_write_npz(tmp_path / "neg.npz", y_train=labels)))
    np.savez(tmp_path / "missing.npz", x_train=x)
    with pytest.raises(DataError, match="missing arrays"):
        data.load(DataConfig(dataset="npz", data_dir=tmp_path / "missing.npz"))


def test_max_train_samples_keeps_a_stratified_subset():
    splits = data.load(DataConfig(max_train_samples=200))
    assert len(splits.y_train) == 200
    assert np.all(np.bincount(splits.y_train, minlength=10) >= 15)
