"""Labels through batching, assignment and training; the image-folder loader."""

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from cm import config as config_lib
from cm import data, sample_run, train
from cm.data import image_folder
from cm.pairing import Options, make_batch_fn
from cm.runtime import workdir
from cm.runtime.views import DataConfig, view
from tests.helpers import tiny_config


def test_batcher_keeps_labels_with_images():
    images = data.load_digits(8)
    labels = data.load_digits_labels()
    batcher = data.Batcher(images, 32, seed=3, random_flip=False, labels=labels)
    for step in (0, 7, 60):  # 60 crosses an epoch boundary (1797 / 32)
        batch = batcher.batch(step)
        idx = batcher.indices(step)
        np.testing.assert_array_equal(batch["label"], labels[idx])
        np.testing.assert_array_equal(batch["x"], images[idx].astype(np.float32) / 127.5 - 1)


@pytest.mark.parametrize("method", ["none", "linear", "knn"])
@pytest.mark.parametrize("scope", ["device", "host"])
def test_assignment_never_separates_image_and_label(method, scope):
    images = data.load_digits(8)
    labels = data.load_digits_labels()
    batch = data.Batcher(images, 16, seed=0, labels=labels, random_flip=False).batch(2)
    fn = make_batch_fn(Options(method, scope=scope, num_shards=4, seed=0))
    out, _ = fn(dict(batch), 2)
    np.testing.assert_array_equal(out["x"], batch["x"])
    np.testing.assert_array_equal(out["label"], batch["label"])
    if method != "knn":  # the noise is permuted, never the images or labels
        rows = {r.tobytes() for r in batch["z"]}
        assert {r.tobytes() for r in out["z"]} == rows


def test_class_conditional_training_and_class_grid(tmp_path):
    config = tiny_config(**{"model.num_classes": 10, "training.n_iters": 2,
                            "training.snapshot_every": 2, "training.n_grid": 10})
    # A full-scale output layer: the default (init_scale 0, ~1e-10) gives samples that
    # two steps leave label-blind, where a sampler ignoring the label would pass.
    config.model.init_scale = 1.0
    train.train(config, str(tmp_path))
    assert os.path.exists(tmp_path / "samples" / "step_00000002.png")
    config = workdir.load_config(str(tmp_path))

    def samples(label):
        config.sample.n, config.sample.label = 8, label
        with np.load(sample_run.sample(config, str(tmp_path))) as f:
            return f["images"].astype(np.int32)

    three, grid = samples(3), samples(-1)  # the same noise: only the labels differ
    assert three.shape == (8, 8, 8, 1)
    # The class grid gives image i class i; class 3 everywhere agrees with it at i = 3 only.
    assert np.abs(three[3] - grid[3]).max() <= 1
    for i in (0, 5, 7):
        assert np.abs(three[i] - grid[i]).mean() > 2, i  # in uint8 levels
    config.sample.label = 10
    with pytest.raises(ValueError, match="10 classes"):
        sample_run.sample(config, str(tmp_path))


def test_conditional_model_needs_labels(tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=np.zeros((20, 8, 8, 1), np.uint8))
    config = tiny_config(**{"model.num_classes": 10, "data.name": "npz",
                            "data.path": str(path)})
    with pytest.raises(data.DatasetError, match="has no labels"):
        train.train(config, str(tmp_path / "run"))


def _write_folder(root):
    rng = np.random.default_rng(0)
    for cls, size in (("cat", (40, 30)), ("dog", (24, 36))):
        os.makedirs(root / cls)
        for i in range(3):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "broken.png").write_bytes(b"not an image at all")


def test_image_folder_loader_skips_corrupt_files_and_labels_by_subfolder(tmp_path):
    _write_folder(tmp_path)
    images, labels = image_folder.load_folder(str(tmp_path), 16, 3)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    gray, _ = image_folder.load_folder(str(tmp_path), 8, 1)
    assert gray.shape == (6, 8, 8, 1)
    cfg = DataConfig(name="folder", path=str(tmp_path), image_size=16, num_channels=3)
    images2, labels2 = data.load_dataset(cfg)
    np.testing.assert_array_equal(images2, images)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((10, 30), np.uint8)
    arr[:, 10:20] = 255  # a bright vertical band in the middle third
    out = np.asarray(image_folder.center_crop_resize(Image.fromarray(arr), 10))
    assert out.shape == (10, 10) and out.min() > 200


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(data.DatasetError, match="no .png"):
        image_folder.load_folder(str(tmp_path), 8)
    with pytest.raises(data.DatasetError, match="not a folder"):
        image_folder.load_folder(str(tmp_path / "nope"), 8)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(data.DatasetError, match="could be read"):
        image_folder.load_folder(str(tmp_path), 8)


@pytest.mark.parametrize("scope, shards", [("device", 2), ("host", 1)])
def test_within_class_pairs_only_inside_each_class_and_shard(scope, shards):
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 12)).astype(np.float32)
    z = rng.normal(size=(24, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 24).astype(np.int32)
    fn = make_batch_fn(Options("linear", scope=scope, num_shards=2, group_key="label",
                                  solver="scipy"))
    out, _ = fn({"x": x, "z": z, "label": labels}, 0)
    size = 24 // shards
    for s in range(shards):
        for g in range(3):
            rows = s * size + np.flatnonzero(labels[s * size:(s + 1) * size] == g)
            if not len(rows):
                continue
            got = {r.tobytes() for r in out["z"][rows]}
            assert got == {r.tobytes() for r in z[rows]}  # noise stays in its class + shard
            cost = np.linalg.norm(x[rows, None] - z[None, rows], axis=-1)
            r, c = linear_sum_assignment(cost)
            ours = np.linalg.norm(x[rows] - out["z"][rows], axis=-1).sum()
            assert ours == pytest.approx(cost[r, c].sum(), rel=1e-5)


def test_within_class_needs_labels_and_a_permuting_method():
    with pytest.raises(ValueError, match="permuting"):
        make_batch_fn(Options("knn", group_key="label"))
    config = tiny_config(**{"assignment.within_class": True, "assignment.method": "linear"})
    with pytest.raises(ValueError, match="num_classes"):
        config_lib.for_training(config)


def test_celeba_shaped_mock_data_is_cropped_and_resized():
    import tensorflow_datasets as tfds

    from configs import celeba64_ct

    config = celeba64_ct.get_config()
    cfg = view(DataConfig, config.data)
    with tfds.testing.mock_data(num_examples=5):
        images, labels = data.load_dataset(cfg)
        crop_only, _ = data.load_dataset(dataclasses.replace(cfg, image_size=140))
        source = tfds.data_source("celeb_a", split="train")
        raw = np.stack([source[i]["image"] for i in range(5)])  # [5, 218, 178, 3]
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
    # The central 140 x 140 window (rows 39..178, columns 19..158), then resized.
    np.testing.assert_array_equal(crop_only, raw[:, 39:179, 19:159])
    resized = [np.asarray(Image.fromarray(c).resize((64, 64), Image.BILINEAR)) for c in crop_only]
    np.testing.assert_array_equal(images, np.stack(resized))
    assert labels is None  # celeb_a has attributes, not class labels
    with pytest.raises(data.DatasetError, match="larger than the images"):
        data.center_crop(images, 65)
    with pytest.raises(data.DatasetError, match="tfds:<name>"):
        data.load_dataset(DataConfig(name="celeba"))


def test_network_at_64x64_in_shrunk_form():
    import jax

    from cm import nets

    config = tiny_config(**{"data.image_size": 64, "data.num_channels": 3})
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.attn_resolutions = (16,)
    module = nets.build_model(config)
    shapes = jax.eval_shape(lambda: nets.init_params(module, jax.random.PRNGKey(0), config))
    params = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(
        s.dtype) * 0.05, shapes)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    out = module.apply({"params": params}, x, np.zeros(2, np.float32), None, train=False)
    assert out.shape == (2, 64, 64, 3) and np.all(np.isfinite(out))
