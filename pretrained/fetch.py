"""Fetching pretrained weight files once, with their sha256 checked.

The bottom floor shared by `cm` (LPIPS) and `evaluation` (the FID Inception): a file is
downloaded into a cache directory through a temporary name and kept only once its hash
is right; a cached file's hash is checked at every use.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import numpy as np

DEFAULT_CACHE_DIR = "~/.cache/immiscible_cm"


class WeightsError(RuntimeError):
    """Weights (the FID Inception's, LPIPS's) are missing, corrupt, or not the expected ones."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_digest(state_dict: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        a = np.ascontiguousarray(state_dict[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def download_weights(
    cache_dir: str,
    url: str,
    name: str,
    sha256_prefix: str | None,
    what: str,
    where_to_get: str,
) -> Path:
    """The cached weights file, downloaded first if absent; its hash is checked each time.

    The download goes to a temporary file in the cache directory and is renamed only
    once its hash is right, so an interrupted download never leaves a bad file behind.
    `what` ("pytorch-fid's weights") and `where_to_get` (what to do) word the errors.

    Raises:
      WeightsError: no network, or the file (downloaded or cached) has the wrong hash.
    """
    target = Path(cache_dir).expanduser() / name
    hint = where_to_get
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=name + ".", suffix=".part")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
            if sha256_prefix and not h.hexdigest().startswith(sha256_prefix):
                raise WeightsError(
                    f"downloaded {url} but its sha256 {h.hexdigest()[:16]}... does not start "
                    f"with {sha256_prefix}. {hint}"
                )
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError) as e:
            raise WeightsError(f"could not download {url} ({e}). {hint}") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    check_hash(target, sha256_prefix, what, hint)
    return target


def check_hash(path: Path, sha256_prefix: str | None, what: str, where_to_get: str) -> None:
    """Raises `WeightsError` if `path`'s sha256 does not start with `sha256_prefix`."""
    if sha256_prefix and not sha256_file(path).startswith(sha256_prefix):
        raise WeightsError(
            f"{path} is corrupt or not {what}: its sha256 does not start with "
            f"{sha256_prefix}. Delete it. {where_to_get}"
        )
