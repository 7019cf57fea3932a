"""A dataset whose channel count is not the configured one is a clear error at load time."""

import numpy as np
import pytest

from cm import data
from cm.runtime.views import DataConfig


def test_a_channel_count_other_than_the_configured_one_is_refused(tmp_path):
    path = str(tmp_path / "rgb.npz")
    np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
    cfg = DataConfig(name="npz", path=path, image_size=8, num_channels=1)
    with pytest.raises(data.DatasetError, match="3 channels but data.num_channels=1"):
        data.load_dataset(cfg)
    images, _ = data.load_dataset(DataConfig(name="npz", path=path, image_size=8,
                                                  num_channels=3))
    assert images.shape == (4, 8, 8, 3)
