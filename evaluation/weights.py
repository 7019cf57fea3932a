"""Finding, checking and loading pytorch-fid's Inception weights, without PyTorch.

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (release
"fid_weights"; the name carries the first 8 hex digits of the file's sha256, torch hub's
convention). They are read either from the path in `config.eval.inception_path`, or from
the cache directory, where a missing file is downloaded once and its hash checked.

The `.pth` is read directly by `pretrained.pth` (no torch). `.npz` files written by
`python -m evaluation.convert_weights` (same tensors and names, plus a manifest with the
source hash and a digest of the content) are accepted as well.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from evaluation import inception
from pretrained import fetch, pth
from pretrained.fetch import (  # noqa: F401  (re-exported: the FID weights' API)
    DEFAULT_CACHE_DIR,
    WeightsError,
    check_hash,
    content_digest,
    sha256_file,
)

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"

NPZ_FORMAT = "immiscible_cm/inception_state_dict/v1"
_MANIFEST_KEY = "__manifest__"


def _where_to_get(target: Path | None = None) -> str:
    put = f"put it at {target}" if target else "put it in the cache directory"
    return (
        f"Get {FID_WEIGHTS_NAME} (pytorch-fid's release 'fid_weights': {FID_WEIGHTS_URL}) and "
        f"{put}, or point --config.eval.inception_path at it (the .pth, or an .npz made from "
        "it by `python -m evaluation.convert_weights --pth FILE --out FILE.npz`)."
    )


def download_weights(
    cache_dir: str = DEFAULT_CACHE_DIR,
    url: str = FID_WEIGHTS_URL,
    name: str = FID_WEIGHTS_NAME,
    sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX,
) -> Path:
    """pytorch-fid's weights in `cache_dir`, downloaded once (see `pretrained.fetch`)."""
    target = Path(cache_dir).expanduser() / name
    return fetch.download_weights(cache_dir, url, name, sha256_prefix, "pytorch-fid's weights",
                                  _where_to_get(target))


def write_npz(
    path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], source_sha256: str
) -> str:
    """Writes a state dict and its manifest to `path` (.npz); returns the file's sha256."""
    arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    manifest = {
        "format": NPZ_FORMAT,
        "source": FID_WEIGHTS_NAME,
        "source_sha256": source_sha256,
        "content_sha256": content_digest(arrays),
        "num_tensors": len(arrays),
    }
    with open(path, "wb") as f:
        np.savez(f, **arrays, **{_MANIFEST_KEY: np.array(json.dumps(manifest))})
    return sha256_file(path)


def _read_npz(path: Path, sha256_prefix: str | None) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip / npy errors of every kind mean the same here
        raise WeightsError(
            f"cannot read {path} ({type(e).__name__}: {e}). {_where_to_get()}"
        ) from e
    if _MANIFEST_KEY not in arrays:
        raise WeightsError(
            f"{path} has no manifest: it was not written by evaluation.convert_weights. "
            + _where_to_get()
        )
    manifest = json.loads(str(arrays.pop(_MANIFEST_KEY)))
    if manifest.get("format") != NPZ_FORMAT:
        raise WeightsError(f"{path}: unknown format {manifest.get('format')!r}")
    if content_digest(arrays) != manifest.get("content_sha256"):
        raise WeightsError(f"{path} is corrupt (content digest mismatch). {_where_to_get()}")
    if sha256_prefix and not str(manifest.get("source_sha256", "")).startswith(sha256_prefix):
        raise WeightsError(
            f"{path} was converted from a file whose sha256 does not start with "
            f"{sha256_prefix}: not pytorch-fid's weights. {_where_to_get()}"
        )
    return arrays


def read_weights(
    path: str | os.PathLike, sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX
) -> dict[str, np.ndarray]:
    """The state dict (torch names -> numpy) of a checked `.pth` or converted `.npz` file.

    Args:
      path: the weights file.
      sha256_prefix: what the `.pth`'s sha256 (or, for an `.npz`, its source's) must start
        with; None skips the check (other weights, tests).

    Raises:
      WeightsError: missing, corrupt, or not the expected weights; says where to get them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"Inception weights not found at {path}. {_where_to_get(path)}")
    if path.suffix == ".npz":
        return _read_npz(path, sha256_prefix)
    check_hash(path, sha256_prefix, "pytorch-fid's weights", _where_to_get(path))
    try:
        return pth.read_state_dict(str(path))
    except pth.PthFormatError as e:
        raise WeightsError(f"cannot read {path}: {e}. {_where_to_get(path)}") from e


def resolve_path(inception_path: str = "", cache_dir: str = DEFAULT_CACHE_DIR) -> Path:
    """`inception_path` if given, else the weights file's place in `cache_dir`."""
    if inception_path:
        return Path(inception_path).expanduser()
    return Path(cache_dir).expanduser() / FID_WEIGHTS_NAME


def load_inception_variables(
    inception_path: str = "",
    cache_dir: str = DEFAULT_CACHE_DIR,
    download: bool = True,
    sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX,
) -> inception.Variables:
    """Flax variables of the FID Inception, from `config.eval.inception_path` or the cache.

    Converted once per process (cached by path, size and modification time).

    Args:
      inception_path: a `.pth` or converted `.npz`; '' uses `cache_dir`.
      cache_dir: where the downloaded `.pth` lives.
      download: fetch the `.pth` into `cache_dir` when missing there.
      sha256_prefix: expected hash prefix (see `read_weights`).

    Raises:
      WeightsError: as `read_weights`, or when the download fails.
    """
    path = resolve_path(inception_path, cache_dir)
    if not inception_path and download and not path.exists():
        download_weights(cache_dir, sha256_prefix=sha256_prefix)
    if not path.is_file():
        raise WeightsError(f"Inception weights not found at {path}. {_where_to_get(path)}")
    stat = path.stat()
    return _load_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256_prefix)


@functools.lru_cache(maxsize=2)
def _load_cached(
    path: str, size: int, mtime_ns: int, sha256_prefix: str | None
) -> inception.Variables:
    del size, mtime_ns  # only part of the cache key
    state_dict = read_weights(path, sha256_prefix)
    try:
        return inception.params_from_torch(state_dict)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path} is not the FID Inception's state dict: {e}") from e
