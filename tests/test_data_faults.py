"""Silently wrong data: float images that would be cast to 0/1, 16-bit PNGs that would
saturate, and reference statistics of one folder reused for another."""

import os

import numpy as np
import pytest
from PIL import Image

from cm import data
from cm.data import image_folder, pixels
from cm.runtime.views import DataConfig, view
from evaluation import features
from evaluation import run as eval_run
from tests.helpers import tiny_config


def save_npz(tmp_path, images):
    path = tmp_path / "images.npz"
    np.savez(path, images=images)
    return str(path)


def test_float_npz_images_are_refused_unless_their_range_is_given(tmp_path):
    rng = np.random.default_rng(0)
    unit = rng.random((6, 8, 8, 1)).astype(np.float32)  # in [0, 1]: astype(uint8) is all 0
    path = save_npz(tmp_path, unit)
    with pytest.raises(data.DatasetError, match=r"float32 with values in \[.*\], not uint8; "
                                                "set data.value_range"):
        data.load_npz_with_labels(path)
    images, _ = data.load_npz_with_labels(path, "0,1")
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.round(unit * 255).astype(np.uint8))
    images, _ = data.load_npz_with_labels(save_npz(tmp_path, unit * 2 - 1), "-1,1")
    assert np.abs(images.astype(int) - np.round(unit * 255)).max() <= 1
    with pytest.raises(data.DatasetError, match="outside data.value_range='0,1'"):
        data.load_npz_with_labels(save_npz(tmp_path, unit * 255), "0,1")
    with pytest.raises(data.DatasetError, match="not uint8"):  # ints too: which range?
        data.load_npz_with_labels(save_npz(tmp_path, (unit * 255).astype(np.int64)))
    # Through the config, as a run loads it.
    config = tiny_config(**{"data.name": "npz", "data.path": save_npz(tmp_path, unit)})
    with pytest.raises(data.DatasetError, match="data.value_range"):
        data.load_dataset(view(DataConfig, config.data))
    config.data.value_range = "0,1"
    assert data.load_dataset(view(DataConfig, config.data))[0].max() > 200


def write_16bit_pngs(folder, values):
    os.makedirs(folder, exist_ok=True)
    for i, v in enumerate(values):
        Image.fromarray(np.full((8, 8), v, np.uint16)).save(os.path.join(folder, f"{i}.png"))


@pytest.mark.parametrize("stream", ["never", "always"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_pngs_are_scaled_not_saturated(tmp_path, stream, channels):
    write_16bit_pngs(tmp_path, [0, 16384, 32768, 65535])
    assert Image.open(tmp_path / "1.png").mode == "I;16"
    images, _ = image_folder.load_folder(str(tmp_path), 8, channels, stream=stream)
    images = np.asarray(images)
    assert images.shape == (4, 8, 8, channels)
    np.testing.assert_array_equal(images.reshape(4, -1).max(axis=1), [0, 64, 128, 255])
    assert pixels.convert(Image.new("RGB", (2, 2), (1, 2, 3)), "RGB").getpixel((0, 0)) \
        == (1, 2, 3)  # 8-bit images are untouched


def write_pngs(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"{i}.png"))


def test_fid_stats_of_two_folders_of_the_same_size_are_kept_apart(tmp_path):
    rng = np.random.default_rng(0)
    dark = [np.full((8, 8), 10 * i, np.uint8) for i in range(6)]
    noisy = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(6)]
    write_pngs(tmp_path / "a" / "images", dark)  # same folder name, same file names
    write_pngs(tmp_path / "b" / "images", noisy)
    paths, means = [], []
    for root in ("a", "b"):
        config = tiny_config(**{"data.name": "folder",
                                "data.path": str(tmp_path / root / "images"),
                                "eval.cache_dir": str(tmp_path / "cache"),
                                "eval.features": "pixels"})
        paths.append(eval_run.reference_stats(config))
        with np.load(paths[-1]) as f:
            means.append(float(f["mu"].mean()))
    assert paths[0] != paths[1]
    assert len(os.listdir(tmp_path / "cache" / "fid_stats")) == 2
    assert means[0] < 0.15 < means[1]  # each folder's own statistics
    # The same folder maps to the same file (the cache still works).
    same = DataConfig(name="folder", path=str(tmp_path / "a" / "images"), image_size=8,
                           num_channels=1)
    assert features.reference_path(same, "pixels", "", str(tmp_path / "cache")) == paths[0]
