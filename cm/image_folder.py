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

from cm.data import DatasetError

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


def load_folder(root: str, image_size: int, num_channels: int = 3,
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads every image below `root`.

    Returns:
      uint8 images `[N, S, S, C]` and int32 labels `[N]` from the subfolder names
      (None when all files sit directly in `root`).
    """
    if num_channels not in (1, 3):
        raise DatasetError(f"data.num_channels must be 1 or 3 for a folder, got {num_channels}")
    files = list_images(root)
    mode = "L" if num_channels == 1 else "RGB"
    images, classes, skipped = [], [], []
    for path, cls in files:
        try:
            with Image.open(path) as im:
                arr = np.asarray(center_crop_resize(im.convert(mode), image_size), np.uint8)
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
    names = sorted(set(classes))
    labels = None
    if names != [""]:
        index = {n: i for i, n in enumerate(names)}
        labels = np.asarray([index[c] for c in classes], np.int32)
    return np.stack(images), labels
