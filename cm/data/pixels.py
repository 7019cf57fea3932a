"""Pixel values as they arrive from files, made uint8 without silent damage.

A float array in [0, 1] cast to uint8 is all 0s and 1s (black images that train without
a complaint), and a 16-bit PNG converted by PIL saturates to white. Arrays that are not
uint8 therefore need their range declared (`data.value_range`), and 16-bit images are
scaled down.
"""

import numpy as np
from PIL import Image

# data.value_range -> the (low, high) of the stored values, mapped to 0 and 255.
VALUE_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0), "0,255": (0.0, 255.0)}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_uint8(images: np.ndarray, value_range: str = "") -> np.ndarray:
    """uint8 images from an array of any numeric dtype whose range is declared.

    Args:
      images: `[N, H, W, C]`; uint8 is returned as it is.
      value_range: a key of `VALUE_RANGES`; required for any other dtype.

    Raises:
      ValueError: a non-uint8 array without a declared range, an unknown range, or
        values outside the declared range.
    """
    if images.dtype == np.uint8:
        return images
    if images.size == 0 or not np.issubdtype(images.dtype, np.number):
        raise ValueError(f"images must be numeric, got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if not value_range:
        raise ValueError(
            f"images are {images.dtype} with values in [{lo:.4g}, {hi:.4g}], not uint8; set "
            f"data.value_range to the range they are stored in ({', '.join(VALUE_RANGES)}) "
            "to have them scaled to uint8, or save them as uint8")
    if value_range not in VALUE_RANGES:
        raise ValueError(f"data.value_range must be one of {sorted(VALUE_RANGES)} (or '' for "
                         f"uint8 images), got {value_range!r}")
    low, high = VALUE_RANGES[value_range]
    tolerance = 1e-3 * (high - low)
    if lo < low - tolerance or hi > high + tolerance:
        raise ValueError(f"images have values in [{lo:.4g}, {hi:.4g}], outside data.value_range"
                         f"={value_range!r}")
    out = np.empty(images.shape, np.uint8)
    chunk = 4096  # rows at a time: no float64 copy of a whole dataset
    for start in range(0, len(images), chunk):
        block = (images[start:start + chunk].astype(np.float32) - low) * (255.0 / (high - low))
        out[start:start + chunk] = np.clip(np.round(block), 0, 255)
    return out


def convert(image: Image.Image, mode: str) -> Image.Image:
    """`image.convert(mode)` ("L" or "RGB"), scaling 16-bit grayscale to 8 bits first.

    PIL clips 16-bit values to 255 when converting, so every pixel above 255/65535 of
    full scale would come out white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, np.float64), 0, 65535)
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8))  # mode L
    return image.convert(mode)
