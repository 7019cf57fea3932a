"""A folder of image files (PNG / JPEG) as a dataset, loaded once into host memory.

Images are converted to RGB or grayscale, resized so the shorter side is the target
size and center-cropped to a square. Class labels come from the first-level
subfolders (sorted by name) when there are any. Unreadable files are reported by name
and skipped, so one corrupt file never stops a long run; an empty folder is an error.
"""

import os

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from cm.data import pixels, streaming
from cm.data.sources import DatasetError

EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(root: str) -> list[tuple[str, str]]:
    """(path, class name) of every image file below `root`, in a fixed order."""
    if not os.path.isdir(root):
        raise DatasetError(f"data.path {root!r} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        cls = "" if rel == "." else rel.split(os.sep)[0]
        for name in sorted(filenames):
            if name.lower().endswith(EXTENSIONS):
                found.append((os.path.join(dirpath, name), cls))
    if not found:
        raise DatasetError(f"no {'/'.join(EXTENSIONS)} files found below {root!r}")
    return found


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to `size` (bicubic) and crops the center square."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _labels_of(classes: list[str]) -> np.ndarray | None:
    names = sorted(set(classes))
    if names == [""]:
        return None
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[c] for c in classes], np.int32)


def load_folder(root: str, image_size: int, num_channels: int = 3, stream: str = "never",
                max_memory_gb: float = 16.0):
    """Loads every image below `root`, or streams them when they would not fit in memory.

    Args:
      stream: "never" (decode all now), "always" (decode on access), or "auto" (stream
        when the decoded images would exceed `max_memory_gb`).

    Returns:
      uint8 images `[N, S, S, C]` (a numpy array, or a `cm.data.streaming.LazyImages`) and
      int32 labels `[N]` from the subfolder names (None when all files sit in `root`).
    """
    if num_channels not in (1, 3):
        raise DatasetError(f"data.num_channels must be 1 or 3 for a folder, got {num_channels}")
    files = list_images(root)
    shape = (image_size, image_size, num_channels)
    if stream == "always" or (stream == "auto" and streaming.too_large(len(files), shape,
                                                                        max_memory_gb)):
        return _stream_folder(root, files, image_size, num_channels)
    mode = "L" if num_channels == 1 else "RGB"
    images, classes, skipped = [], [], []
    for path, cls in files:
        try:
            with Image.open(path) as im:
                arr = np.asarray(center_crop_resize(pixels.convert(im, mode), image_size),
                                 np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            skipped.append(path)
            logging.warning("skipping unreadable image %s: %s", path, e)
            continue
        images.append(arr[..., None] if arr.ndim == 2 else arr)
        classes.append(cls)
    if not images:
        raise DatasetError(f"none of the {len(files)} image files below {root!r} could be read")
    if skipped:
        logging.warning("skipped %d unreadable of %d image files below %s", len(skipped),
                        len(files), root)
    return np.stack(images), _labels_of(classes)


def _stream_folder(root: str, files: list[tuple[str, str]], image_size: int,
                   num_channels: int):
    """Checks every file's header now (cheap) and decodes images on access."""
    good, classes, skipped = [], [], 0
    for path, cls in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            skipped += 1
            logging.warning("skipping unreadable image %s: %s", path, e)
            continue
        good.append(path)
        classes.append(cls)
    if not good:
        raise DatasetError(f"none of the {len(files)} image files below {root!r} could be read")
    logging.info("streaming %d images from %s (%d unreadable skipped)", len(good), root,
                 skipped)
    images = streaming.folder_images(good, image_size, num_channels,
                                     lambda im: center_crop_resize(im, image_size))
    return images, _labels_of(classes)
