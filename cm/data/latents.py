"""Latent stores: a dataset encoded once by an autoencoder, the dataset of latent training.

A store is a folder:
  manifest.json   what it holds and from what: the autoencoder's digest (sha256 of its
                  weights) and scaling factor, the dataset's identity (its config fields,
                  its size, a digest of its first and last rows), the posterior choice, the
                  latent shape, whether flipped images were encoded too, and, once
                  evaluation measured it, the autoencoder's reconstruction distance;
  chunks/         the latents in chunks of `chunk` images, written as they are encoded
                  (`latents_00000.npy`, `flipped_00000.npy`), so a killed encoding resumes
                  at the first missing chunk;
  labels.npy      the dataset's labels, if it has any.
Latents are stored scaled (`scaling_factor * mean`, or a posterior sample drawn with a
fixed seed), float32 `[N, h, w, c]`: what the network is trained on.
"""

import dataclasses
import glob
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cm.data.sources import DatasetError

MANIFEST = "manifest.json"
VERSION = 1
# The data fields that decide which images a store encodes (others: batching, streaming).
DATA_FIELDS = ("name", "path", "split", "image_size", "num_channels", "crop", "value_range")
POSTERIORS = ("mean", "sample")


class StoreMismatchError(DatasetError):
    """The store was encoded from another autoencoder or other data; the message says what."""


def data_identity(data_cfg: Any, images: np.ndarray | None = None) -> dict:
    """The dataset's identity: its defining config fields, and (given the images) their
    count and a digest of the first and last 64 rows (cheap, and catches another file)."""
    fields = {k: data_cfg[k] for k in DATA_FIELDS}
    if images is None:
        return {"fields": fields}
    h = hashlib.sha256()
    for rows in (images[:64], images[-64:]):
        h.update(np.ascontiguousarray(np.asarray(rows)).tobytes())
    return {"fields": fields, "count": int(len(images)), "rows_sha256": h.hexdigest()}


@dataclasses.dataclass(frozen=True)
class Store:
    """An opened latent store: its latents (and flipped latents), labels and manifest."""

    latents: np.ndarray  # float32 [N, h, w, c], scaled
    flipped: np.ndarray | None  # the latents of the mirrored images, or None
    labels: np.ndarray | None
    manifest: dict


def _chunk_path(folder: str, kind: str, i: int) -> str:
    return os.path.join(folder, "chunks", f"{kind}_{i:05d}.npy")


def _save(path: str, a: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, a)
    os.replace(tmp, path)


def encode_store(folder: str, images: np.ndarray, labels: np.ndarray | None,
                 encode: Callable[[np.ndarray, int], np.ndarray], manifest: dict,
                 chunk: int, flips: bool, log: Callable[[str], None] = print) -> dict:
    """Encodes `images` (uint8 [N, H, W, C]) into the store at `folder`, resuming.

    Args:
      encode: (uint8 images [n, H, W, C], first row index) -> scaled latents [n, h, w, c];
        the row index keys a posterior sample's noise, so a resumed chunk is the same.
      manifest: what the store is (autoencoder, data identity, posterior...); an existing
        store with another manifest is refused, not overwritten.
      chunk: images per chunk file.
      flips: also encode the horizontally mirrored images.

    Returns:
      The manifest written.
    """
    os.makedirs(os.path.join(folder, "chunks"), exist_ok=True)
    path = os.path.join(folder, MANIFEST)
    manifest = {**manifest, "version": VERSION, "count": int(len(images)), "chunk": chunk,
                "flips": bool(flips), "complete": False}
    if os.path.exists(path):
        old = json.load(open(path))
        same = {k: old.get(k) for k in manifest if k != "complete"}
        if same != {k: v for k, v in manifest.items() if k != "complete"}:
            diff = [k for k in manifest if k != "complete" and old.get(k) != manifest[k]]
            raise StoreMismatchError(
                f"{folder} holds a latent store of other settings ({', '.join(diff)} differ); "
                "use another latent.store folder or delete this one")
        manifest = {**old, "complete": False}
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    n_chunks = -(-len(images) // chunk)
    t0, done = time.perf_counter(), 0
    for i in range(n_chunks):
        kinds = ("latents", "flipped") if flips else ("latents",)
        if all(os.path.exists(_chunk_path(folder, k, i)) for k in kinds):
            continue
        lo, hi = i * chunk, min((i + 1) * chunk, len(images))
        block = np.asarray(images[lo:hi])
        _save(_chunk_path(folder, "latents", i), np.asarray(encode(block, lo), np.float32))
        if flips:
            _save(_chunk_path(folder, "flipped", i),
                  np.asarray(encode(block[:, :, ::-1], lo + len(images)), np.float32))
        done += hi - lo
        rate = done / max(time.perf_counter() - t0, 1e-9)
        log(f"encoded chunk {i + 1}/{n_chunks} ({hi}/{len(images)} images, {rate:.0f} img/s, "
            f"{(len(images) - hi) / max(rate, 1e-9) / 60:.1f} min left)")
    if labels is not None:
        _save(os.path.join(folder, "labels.npy"), np.asarray(labels, np.int32))
    manifest["complete"] = True
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return manifest


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    return json.load(open(path)) if os.path.exists(path) else None


def update_manifest(folder: str, **values: Any) -> None:
    """Adds `values` (e.g. the reconstruction distance) to a store's manifest."""
    manifest = read_manifest(folder)
    manifest.update(values)
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def open_store(folder: str, autoencoder_digest: str | None, data_cfg: Any) -> Store:
    """The store at `folder`, checked against the run's autoencoder and data.

    Args:
      autoencoder_digest: the run's autoencoder's sha256 (None: not checked).
      data_cfg: the run's `data` section (its identity fields must match).

    Raises:
      DatasetError: no store, or an unfinished one (run --mode encode).
      StoreMismatchError: another autoencoder or other data.
    """
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        state = "no latent store" if manifest is None else "an unfinished latent store"
        raise DatasetError(f"{folder} holds {state}: encode the dataset first with "
                           "--mode encode (same config and workdir); it resumes where it stopped")
    if autoencoder_digest is not None and manifest["autoencoder_sha256"] != autoencoder_digest:
        raise StoreMismatchError(
            f"the latent store {folder} was encoded by another autoencoder (sha256 "
            f"{manifest['autoencoder_sha256'][:12]}..., this run's is "
            f"{autoencoder_digest[:12]}...); encode again into another latent.store")
    want = data_identity(data_cfg)["fields"]
    have = manifest["data"]["fields"]
    if have != want:
        diff = sorted(k for k in want if have.get(k) != want[k])
        raise StoreMismatchError(
            f"the latent store {folder} holds other data (data.{diff[0]}: store "
            f"{have.get(diff[0])!r}, run {want[diff[0]]!r}); encode this data into another "
            "latent.store")
    n = -(-manifest["count"] // manifest["chunk"])

    def load(kind: str) -> np.ndarray:
        paths = sorted(glob.glob(os.path.join(folder, "chunks", f"{kind}_*.npy")))
        if len(paths) != n:
            raise DatasetError(f"{folder}: {len(paths)} of {n} {kind} chunks; run --mode "
                               "encode again to finish it")
        return np.concatenate([np.load(p) for p in paths])

    latents = load("latents")
    flipped = load("flipped") if manifest["flips"] else None
    label_path = os.path.join(folder, "labels.npy")
    labels = np.load(label_path) if os.path.exists(label_path) else None
    return Store(latents, flipped, labels, manifest)
