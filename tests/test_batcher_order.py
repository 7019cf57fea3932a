"""The batcher's epoch order, flips and noise as functions of (seed, step).

References are computed here with plain NumPy (sets, counts, `np.flip`), never by the
batcher itself: every epoch visits every image exactly once, each epoch and each seed
has its own order, and flips and noise change with the step and the seed.
"""

import numpy as np
import pytest

from cm import data


def _images(n: int, size: int = 4) -> np.ndarray:
    """n distinct, left-right asymmetric uint8 images [n, size, size, 1]; image i's pixel
    (0, 0) is i, so a batch row says which image it is."""
    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    images[:, 0, -1, 0] = 255  # never equal to pixel (0, 0) (n < 255): flips show
    return images


@pytest.mark.parametrize("n, batch, n_epochs", [(24, 8, 3), (20, 8, 4)])  # 20: batches
def test_every_epoch_visits_every_image_once(n, batch, n_epochs):  # straddle epochs
    images = _images(n)
    b = data.Batcher(images, batch, seed=5, random_flip=False)
    steps = n_epochs * n // batch  # whole epochs (n * n_epochs divisible by batch)
    ids = np.concatenate([
        np.rint((b.batch(s)["x"][:, 0, 0, 0] + 1.0) * 127.5).astype(int) for s in range(steps)])
    assert len(ids) == n_epochs * n
    epochs = ids.reshape(n_epochs, n)
    for e in range(n_epochs):
        assert sorted(epochs[e].tolist()) == list(range(n)), e
    # Each epoch has its own order (two equal orders of 20+ items: chance 1 / n!).
    assert len({tuple(e) for e in epochs.tolist()}) == n_epochs


def test_the_order_depends_on_the_seed_and_is_reproducible():
    images = _images(32)
    a = [data.Batcher(images, 32, seed=0, random_flip=False).indices(0) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    other = data.Batcher(images, 32, seed=1, random_flip=False).indices(0)
    assert sorted(other.tolist()) == sorted(a[0].tolist()) == list(range(32))
    assert not np.array_equal(other, a[0])


def test_flips_are_fair_coins_that_change_with_step_and_seed():
    images = _images(16)
    b = data.Batcher(images, 32, seed=7)
    flips = np.stack([b.flips(s) for s in range(64)])  # [steps, rows]
    # 2,048 fair coins: the share of heads is 0.5 +- 0.011 (1 sd); 0.45..0.55 is 4.5 sd.
    assert 0.45 < flips.mean() < 0.55, flips.mean()
    # A row's flip is a new coin each step: not the same pattern at every step.
    assert len({f.tobytes() for f in flips}) > 60
    np.testing.assert_array_equal(data.Batcher(images, 32, seed=7).flips(5), flips[5])
    other = np.stack([data.Batcher(images, 32, seed=8).flips(s) for s in range(4)])
    assert not np.array_equal(other, flips[:4])


def test_flipped_rows_are_mirrored_left_right_in_the_batch():
    images = _images(16)
    b = data.Batcher(images, 16, seed=2)
    for step in range(4):
        batch, idx, flip = b.batch(step), b.indices(step), b.flips(step)
        for row in range(16):
            want = images[idx[row]].astype(np.float32) / 127.5 - 1.0  # [H, W, C]
            if flip[row]:
                want = np.flip(want, axis=1)  # W: left-right
            np.testing.assert_array_equal(batch["x"][row], want)


def test_noise_depends_on_seed_and_step_and_replays():
    images = _images(16)
    z = data.Batcher(images, 16, seed=3).batch(4)["z"]
    np.testing.assert_array_equal(data.Batcher(images, 16, seed=3).batch(4)["z"], z)
    assert not np.allclose(data.Batcher(images, 16, seed=4).batch(4)["z"], z)
    assert not np.allclose(data.Batcher(images, 16, seed=3).batch(5)["z"], z)


def test_iterating_from_a_step_replays_that_steps_batches():
    images = _images(20)
    b = data.Batcher(images, 8, seed=9)
    it = b(3)
    for step in (3, 4, 5):
        got, want = next(it), b.batch(step)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
