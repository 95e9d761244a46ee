"""Image folders as users have them: bad files, resource forks, nested folders, 16-bit PNGs,
other aspect ratios, rare classes. Tiny generated folders; no training."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import data, images
from pipeline import folder as folder_source
from pipeline.config import DataConfig
from pipeline.errors import DataError
from tests.fixtures import write_image_folder


def _folder_config(folder, tmp_path, **overrides) -> DataConfig:
    return DataConfig(**{"dataset": "folder", "data_dir": folder, "cache_dir": tmp_path / "cache", **overrides})


def _with_bad_files(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", n_per_class=8)
    good = (folder / "class_0" / "1.png").read_bytes()
    (folder / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "class_1" / "empty.png").write_bytes(b"")
    (folder / "class_1" / "._1.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # macOS AppleDouble
    (folder / "class_2" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "class_2" / "notes.txt").write_text("not an image")
    return folder


def test_bad_files_fail_by_default_naming_all_of_them(tmp_path):
    folder = _with_bad_files(tmp_path)
    with pytest.raises(DataError) as failure:
        data.load(_folder_config(folder, tmp_path))
    message = str(failure.value)
    assert "2 unreadable image files" in message and "\n" not in message
    assert "class_0/truncated.png" in message and "class_1/empty.png" in message
    assert "._1.png" not in message and ".DS_Store" not in message  # never taken as images


def test_bad_files_skipped_are_listed(tmp_path):
    folder = _with_bad_files(tmp_path)
    splits = data.load(_folder_config(folder, tmp_path, on_bad_image="skip"))
    assert sum(splits.sizes().values()) == 24  # the 24 good images, no more
    assert [name for name, _ in splits.bad] == ["class_0/truncated.png", "class_1/empty.png"]
    assert ("class_2/notes.txt", f"not an image ({', '.join(images.IMAGE_SUFFIXES)})") in splits.ignored
    record = splits.skipped_record()
    assert len(record["unreadable"]) == 2 and "truncated" in record["unreadable"][0]["reason"]
    assert not any("._1.png" in entry["file"] for entry in record["ignored"])
    assert splits.record(_folder_config(folder, tmp_path))["skipped_images"] == 2
    # The negative control: the same folder without the bad files has nothing to list.
    for name in ("class_0/truncated.png", "class_1/empty.png"):
        (folder / name).unlink()
    assert data.load(_folder_config(folder, tmp_path)).bad == ()


def test_nested_folders_belong_to_their_class_and_stray_images_are_reported(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", n_per_class=6)
    nested = folder / "class_2" / "2019" / "summer"
    nested.mkdir(parents=True)
    for i in range(3):
        (nested / f"n{i}.png").write_bytes((folder / "class_2" / "13.png").read_bytes())
    (folder / "stray.png").write_bytes((folder / "class_2" / "13.png").read_bytes())
    listing = folder_source.list_folder(folder)
    assert listing.classes == ("class_0", "class_1", "class_2")
    assert sum(1 for f in listing.files if f.startswith("class_2/")) == 9
    assert "class_2/2019/summer/n0.png" in listing.files
    assert ("stray.png", "an image outside any class folder") in listing.ignored
    splits = data.load(_folder_config(folder, tmp_path))
    assert sum(splits.sizes().values()) == 21


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = images.decode(path, None, 1)[0]
    assert pixels.max() == 255 and pixels.min() == 0
    assert np.mean(pixels == 255) < 0.05  # clipping made 99.6% of pixels 255
    assert np.abs(pixels.astype(int) - np.rint(ramp / 257).astype(int)).max() == 0


def _two_by_four() -> Image.Image:
    """A 2 (H) x 4 (W) gray image: columns 10, 20, 30, 40."""
    return Image.fromarray(np.tile(np.array([10, 20, 30, 40], dtype=np.uint8), (2, 1)), mode="L")


@pytest.mark.parametrize("mode,expected", [
    ("crop", [[20, 30], [20, 30]]),     # the centre 2x2 cut out, no scaling needed
    ("pad", [[17, 33], [0, 0]]),        # scaled to 1x2, then centred on black (rounded down: top row)
    ("squash", [[17, 33], [17, 33]]),   # stretched: 4 columns into 2 (Pillow's bilinear widens when shrinking)
])
def test_resize_modes_give_the_expected_pixels(tmp_path, mode, expected):
    path = tmp_path / "wide.png"
    _two_by_four().save(path)
    got = images.decode(path, (2, 2), 1, mode)[0]
    assert got.tolist() == expected


def test_resize_mode_is_recorded_in_the_preprocessing_contract(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    splits = data.load(_folder_config(folder, tmp_path, image_size=(10, 8), resize="pad"))
    assert splits.preprocess.resize == "pad" and splits.preprocess.to_dict()["resize"] == "pad"
    assert data.Preprocess.from_dict(splits.preprocess.to_dict()) == splits.preprocess
    old_record = {k: v for k, v in splits.preprocess.to_dict().items() if k != "resize"}
    assert data.Preprocess.from_dict(old_record).resize == "squash"  # manifests written before the option


def test_image_size_is_not_needed_when_all_images_have_one_size(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", size=12)
    assert data.load(_folder_config(folder, tmp_path)).preprocess.size == (12, 12)
    Image.new("L", (20, 10)).save(folder / "class_0" / "odd.png")
    with pytest.raises(DataError, match=r"2 different sizes \(12x12 \(18 images\), 10x20 \(1 images\)\); pass --image-size"):
        data.load(_folder_config(folder, tmp_path))
    assert data.load(_folder_config(folder, tmp_path, image_size=(12, 12))).preprocess.size == (12, 12)


def test_a_class_too_small_to_split_is_named_by_its_folder(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", n_per_class=6)
    (folder / "cats").mkdir()
    (folder / "cats" / "only.png").write_bytes((folder / "class_0" / "1.png").read_bytes())
    with pytest.raises(DataError) as failure:
        data.load(_folder_config(folder, tmp_path))
    assert str(failure.value) == ("class 'cats' has 1 image; each class needs at least 3 for a stratified split "
                                  "(training, validation and test)")
    (folder / "cats" / "two.png").write_bytes((folder / "class_0" / "3.png").read_bytes())
    (folder / "cats" / "three.png").write_bytes((folder / "class_0" / "5.png").read_bytes())
    assert "cats" in data.load(_folder_config(folder, tmp_path)).labels  # 3 images are enough


def test_relative_paths_are_resolved_when_the_config_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = DataConfig(dataset="folder", data_dir="imgs", cache_dir="cache")
    assert config.data_dir == tmp_path / "imgs" and config.cache_dir == tmp_path / "cache"


# --- the decoded-image cache ----------------------------------------------------------------


def _count_decodes(monkeypatch) -> list:
    calls: list = []
    real = images.decode

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "decode", counting)
    return calls


def test_a_folder_is_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "imgs", mode="RGB")
    calls = _count_decodes(monkeypatch)
    first = data.load(_folder_config(folder, tmp_path))
    assert len(calls) == 18
    second = data.load(_folder_config(folder, tmp_path))
    assert len(calls) == 18  # nothing decoded again
    assert second.fingerprint == first.fingerprint and second.cache == first.cache
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"images.npy", "index.json", "moments.npy"}
    # The store is a plain .npy that memory-maps, and the lazy splits read exactly its rows.
    stored = np.load(entries[0] / "images.npy", mmap_mode="r")
    assert stored.dtype == np.uint8 and stored.shape == (18, 3, 12, 12)
    assert isinstance(first.x_train, data.LazyImages) and first.x_train.shape == (len(first.y_train), 3, 12, 12)
    eager = data.load(DataConfig(dataset="folder", data_dir=folder, cache_dir=tmp_path / "cache"))
    assert np.array_equal(first.x_test[:], np.asarray(eager.x_test))
    # Normalization per batch gives what normalizing everything at once gives.
    batchwise = np.concatenate([first.preprocess.apply(first.x_train)[i:i + 4] for i in range(0, len(first.y_train), 4)])
    assert np.allclose(batchwise, first.preprocess.apply(np.asarray(first.x_train, dtype=np.float32)), atol=1e-5)
    pixels = np.asarray(first.x_train, dtype=np.float64) / 255
    assert np.allclose(first.preprocess.mean, pixels.mean(axis=(0, 2, 3)))
    assert np.allclose(first.preprocess.std, pixels.std(axis=(0, 2, 3)))


def test_parallel_decoding_gives_the_same_store_and_reports_progress(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "imgs", mode="RGB", n_per_class=10)
    listing = folder_source.list_folder(folder)
    sequential = folder_source.build(listing, None, None, "squash", tmp_path / "one", workers=1)
    monkeypatch.setattr(folder_source, "PARALLEL_FROM", 1)
    monkeypatch.setattr(folder_source, "CHUNK", 7)
    seen: list = []
    parallel = folder_source.build(listing, None, None, "squash", tmp_path / "two", workers=2,
                                   on_progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert parallel.fingerprint == sequential.fingerprint and parallel.index["decode"]["workers"] == 2
    assert seen[0] == ("probe", 0, 30) and seen[-1] == ("decode", 30, 30)
    assert [d for stage, d, _ in seen if stage == "decode"] == sorted(d for stage, d, _ in seen if stage == "decode")


def test_a_failed_decode_leaves_no_cache_entry(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "imgs")

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of the decode

    monkeypatch.setattr(images, "decode", broken)
    with pytest.raises(KeyboardInterrupt):
        data.load(_folder_config(folder, tmp_path))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_changed_file_changes_the_fingerprint_and_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    config = _folder_config(folder, tmp_path)
    trained = data.load(config)
    assert data.load_trained_on(config, trained.fingerprint, "the run").fingerprint == trained.fingerprint
    Image.fromarray(np.full((12, 12), 255, dtype=np.uint8)).save(folder / "class_1" / "3.png")
    with pytest.raises(DataError, match="the run: the data at .* is not the data it was trained on"):
        data.load_trained_on(config, trained.fingerprint, "the run")
    assert data.load(config).fingerprint != trained.fingerprint


def test_a_moved_or_deleted_source_is_read_from_the_cache_or_from_data_dir(tmp_path):
    import shutil

    folder = write_image_folder(tmp_path / "imgs")
    config = _folder_config(folder, tmp_path)
    trained = data.load(config)
    moved = tmp_path / "elsewhere" / "photos"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    # The folder is gone: the cache entry with the recorded fingerprint serves.
    assert data.load_trained_on(config, trained.fingerprint, "the run").fingerprint == trained.fingerprint
    # No cache either: the error says what to pass.
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(DataError, match="is not there and no entry of the image cache .* --data-dir"):
        data.load_trained_on(config, trained.fingerprint, "the run")
    # --data-dir: the folder where it is now, decoded again into a new cache; same data, same fingerprint.
    with data.reading(data_dir=moved, cache_dir=tmp_path / "other-cache"):
        assert data.load_trained_on(config, trained.fingerprint, "the run").fingerprint == trained.fingerprint
    assert (tmp_path / "other-cache").is_dir()


# --- whole runs on a photo folder (slow: they train and export) -----------------------------


def _train_folder_run(folder, out, cache):
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.workflow import train_run

    config = DataConfig(dataset="folder", data_dir=folder, cache_dir=cache, on_bad_image="skip", test_fraction=0.25)
    return train_run(config, ModelConfig(conv_channels=(8,), fc_units=(16,)),
                     TrainConfig(epochs=2, batch_size=16, patience=0), out)


@pytest.mark.slow
def test_a_photo_run_exports_from_elsewhere_moved_and_refuses_changed_data(tmp_path, monkeypatch):
    import json
    import shutil

    from pipeline.config import ExportConfig
    from pipeline.workflow import export_run

    folder = write_image_folder(tmp_path / "photos", mode="RGB", n_per_class=12)
    (folder / "class_1" / "empty.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    run = _train_folder_run("photos", tmp_path / "run", "cache")  # relative paths, resolved when the run is made
    manifest = run.manifest
    assert manifest["dataset"]["config"]["data_dir"] == str(folder)
    assert manifest["dataset"]["skipped_images"] == 1 and manifest["dataset"]["cache"]["images"] == 37
    per_class = json.loads((tmp_path / "run" / "metrics.json").read_text())["test_per_class"]
    assert [c["label"] for c in per_class["classes"]] == ["class_0", "class_1", "class_2"]
    assert sum(c["support"] for c in per_class["classes"]) == manifest["dataset"]["sizes"]["test"]
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 1000
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert [entry["file"] for entry in skipped["unreadable"]] == ["class_1/empty.png"]
    # Another working directory, and the run folder moved: the recorded absolute paths still serve.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moved = shutil.move(tmp_path / "run", tmp_path / "moved-run")
    assert export_run(moved, ExportConfig()).record["test_accuracy"] >= 0
    # The source folder gone: the cache alone is enough.
    shutil.move(folder, tmp_path / "photos-moved")
    assert export_run(moved, ExportConfig()).record["verification"]["test_images"] == manifest["dataset"]["sizes"]["test"]
    # Back, but changed: refused, whatever the cache holds.
    shutil.move(tmp_path / "photos-moved", folder)
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(folder / "class_0" / "extra.png")
    with pytest.raises(DataError, match="not the data it was trained on"):
        export_run(moved, ExportConfig())


@pytest.mark.slow
def test_cli_trains_an_imbalanced_photo_folder_with_augmentation_and_balancing(tmp_path):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    folder = write_image_folder(tmp_path / "photos", mode="RGB", n_per_class=30)
    for extra in ("class_1", "class_2"):  # 30 / 4 / 4 images
        for path in sorted((folder / extra).iterdir())[4:]:
            path.unlink()
    result = CliRunner().invoke(app, ["train", "--dataset", "folder", "--data-dir", str(folder), "--cache-dir",
                                      str(tmp_path / "cache"), "--augment", "photo", "--balance", "sampler", "--epochs", "2",
                                      "--conv-channels", "8", "--fc-units", "16", "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["training"]["config"]["augment"] == "photo" and manifest["training"]["config"]["balance"] == "sampler"
    supports = [c["support"] for c in json.loads((tmp_path / "run" / "metrics.json").read_text())["test_per_class"]["classes"]]
    assert supports[0] > supports[1] >= 1
