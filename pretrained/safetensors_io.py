"""Folders of safetensors weights in Hugging Face's layout, local or fetched once from the hub.

A model is read from a folder holding a few named files (diffusers' `save_pretrained`
layout: `config.json` + `diffusion_pytorch_model.safetensors`). A source that is not an
existing folder but looks like a hub id ('org/name', or 'org/name/subfolder' inside a
pipeline repo) is fetched once with `huggingface_hub` into a cache folder; the files'
sha256 are recorded in `sha256.json` beside them and checked at every later use (as
`pretrained.fetch` does for single files). Without network or without huggingface_hub the
error says which files to copy into which folder. Tensors are read with safetensors'
NumPy API: no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pretrained.fetch import WeightsError, sha256_file

RECORD_NAME = "sha256.json"
HUB_URL = "https://huggingface.co"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")


def split_hub_id(source: str) -> tuple[str, str]:
    """'org/name[/sub/folder]' -> ('org/name', 'sub/folder' or '')."""
    parts = source.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def where_to_get(
    source: str, folder: Path, files: Sequence[str], revision: str | None = None
) -> str:
    """What to do by hand: which files to copy from the hub into which folder."""
    repo, sub = split_hub_id(source)
    tree = f"{HUB_URL}/{repo}/tree/{revision or 'main'}" + (f"/{sub}" if sub else "")
    return (f"Copy {' and '.join(files)} from {tree} (hub id {source!r}) into the folder "
            f"{folder}, or pass the path of a folder holding those files.")


def _download(source: str, folder: Path, files: Sequence[str], revision: str | None) -> None:
    """Fetches the missing `files` of hub id `source`; each is renamed into place whole."""
    from huggingface_hub import hf_hub_download  # optional dependency

    repo, sub = split_hub_id(source)
    for name in files:
        if (folder / name).is_file():
            continue
        tmp = tempfile.mkdtemp(dir=folder, prefix=".download-")
        try:
            path = hf_hub_download(repo, name, subfolder=sub or None, revision=revision,
                                   local_dir=tmp)
            os.replace(path, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_folder(
    source: str,
    files: Sequence[str],
    cache_dir: str,
    download: bool = True,
    revision: str | None = None,
) -> tuple[Path, str]:
    """The folder holding `files`, and what to tell the user if they are wrong.

    An existing folder is used as is. A hub id is looked up in
    `cache_dir/<org>--<name>[--sub]`, fetched there first if absent (when `download`); a
    `sha256.json` recording the files' hashes is written once they are all present
    (fetched, or copied there by hand as the error message says).

    Raises:
      WeightsError: `source` is neither a folder nor a hub id, or fetching failed (no
        huggingface_hub, no network, unknown repo); says which files to copy where.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path, f"Expected the files {' and '.join(files)} in {path}."
    if path.exists() or not _HUB_ID.fullmatch(source):
        raise WeightsError(f"{source!r} is neither a folder (holding {' and '.join(files)}) "
                           "nor a hub id such as 'stabilityai/sd-vae-ft-mse'")
    folder = Path(cache_dir).expanduser() / source.replace("/", "--")
    hint = where_to_get(source, folder, files, revision)
    if not all((folder / name).is_file() for name in files):
        folder.mkdir(parents=True, exist_ok=True)  # where the message says to copy them
        if not download:
            raise WeightsError(f"{source!r} is not in the cache and download=False. {hint}")
        try:
            _download(source, folder, files, revision)
        except ImportError as e:
            raise WeightsError(f"cannot fetch {source!r}: huggingface_hub is not installed. "
                               f"{hint}") from e
        except Exception as e:  # offline, unknown repo, HTTP errors: all mean the same here
            raise WeightsError(f"cannot fetch {source!r} ({type(e).__name__}: {e}). "
                               f"{hint}") from e
    if not (folder / RECORD_NAME).is_file():
        hashes = {name: sha256_file(folder / name) for name in files}
        record = {"source": source, "revision": revision, "files": hashes}
        (folder / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return folder, hint


def check_files(folder: Path, files: Sequence[str], hint: str) -> dict[str, str]:
    """The files' sha256, checked against `sha256.json` where the folder has one.

    Raises:
      WeightsError: a file is missing, or its hash is not the recorded one.
    """
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"{folder} lacks {' and '.join(missing)}. {hint}")
    hashes = {name: sha256_file(folder / name) for name in files}
    record = folder / RECORD_NAME
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())["files"]
            if not isinstance(recorded, dict):
                raise TypeError("'files' is not a mapping of file names to hashes")
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{record} is unreadable ({e}): delete it. {hint}") from e
        for name, digest in hashes.items():
            if recorded.get(name) != digest:
                raise WeightsError(
                    f"{folder / name} has sha256 {digest[:16]}..., not the "
                    f"{str(recorded.get(name))[:16]}... recorded in {record}: it is corrupt or "
                    f"was replaced. Delete the folder to fetch it again. {hint}")
    return hashes


def read_safetensors(path: Path, hint: str) -> Mapping[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (F16 / F32 / ...; not BF16).

    Raises:
      WeightsError: safetensors is not installed, or the file is not readable by it.
    """
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise WeightsError(f"reading {path} needs safetensors (pip install "
                           "safetensors==0.8.0)") from e
    try:
        return load_file(path)
    except Exception as e:  # safetensors' header / dtype errors are of several kinds
        raise WeightsError(f"cannot read {path} ({type(e).__name__}: {e}). {hint}") from e
