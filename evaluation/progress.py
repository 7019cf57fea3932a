"""The files of a resumable evaluation: per-round progress and the results `eval.jsonl`.

`Progress` keeps the finished rounds of one (checkpoint, sampler) in `<workdir>/eval/`
(running feature statistics and per-round logits, each file written atomically);
`read_results` / `append_row` read and extend `<workdir>/eval.jsonl`. Only process 0
writes; with several hosts the workdir must be on a shared filesystem, as for orbax.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from evaluation import fid

EVAL_DIR = "eval"  # progress directories, under the workdir
RESULTS = "eval.jsonl"


def _atomic(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


class Progress:
    """The finished rounds of one (checkpoint, sampler): running statistics and logits.

    `stats.npz` is the `fid.RunningStats` of every finished round; `logits_RRRRR.npy`
    holds one round's logits (for the IS). A round's logits are written before the
    statistics that count it, each file atomically, so a crash anywhere leaves a state
    from which that round is simply redone. The directory name carries a digest of
    everything the rounds depend on, so changed settings never mix with old rounds.

    Args:
      root: the folder of all progress directories (`<workdir>/eval`).
      name: readable part of the directory name, e.g. `step00005000_1step_fid`.
      spec: what the rounds depend on (step, sampler, times, n, batch, seed, ...),
        JSON-serialisable; saved beside the statistics as `spec.json`.
      dim: feature dimension.
      batch: samples per round; the last round keeps only the first `n % batch`.
      n: samples in all.
    """

    def __init__(self, root: str, name: str, spec: dict, dim: int, batch: int, n: int):
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        self.dir = os.path.join(root, f"{name}_{digest}")
        self.spec, self.dim, self.batch, self.n = spec, dim, batch, n
        self.n_rounds = -(-n // batch)

    def _stats_path(self) -> str:
        return os.path.join(self.dir, "stats.npz")

    def _logits_path(self, r: int) -> str:
        return os.path.join(self.dir, f"logits_{r:05d}.npy")

    def load(self) -> tuple[fid.RunningStats, int]:
        """The statistics so far and the number of finished rounds."""
        if not os.path.exists(self._stats_path()):
            return fid.RunningStats(self.dim), 0
        stats = fid.RunningStats.load(self._stats_path())
        done = self.n_rounds if stats.n >= self.n else stats.n // self.batch
        if stats.dim != self.dim or stats.n != min(done * self.batch, self.n):
            raise ValueError(f"{self.dir}: progress of {stats.n} features of dimension "
                             f"{stats.dim} does not fit rounds of {self.batch}; delete it")
        return stats, done

    def _nfe_path(self, r: int) -> str:
        return os.path.join(self.dir, f"nfe_{r:05d}.json")

    def save(self, r: int, stats: fid.RunningStats, logits: np.ndarray | None,
             nfe: float | None = None) -> None:
        """Records round `r` as finished (only on process 0); `nfe`: its network calls per
        image, for an adaptive sampler."""
        if jax.process_index() != 0:
            return
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
            _atomic(os.path.join(self.dir, "spec.json"),
                    lambda p: _write_text(p, json.dumps(self.spec, indent=2, sort_keys=True)))
        if logits is not None:
            _atomic(self._logits_path(r), lambda p: _save_npy(p, logits))
        if nfe is not None:
            _atomic(self._nfe_path(r), lambda p: _write_text(p, json.dumps(nfe)))
        _atomic(self._stats_path(), stats.save)

    def mean_nfe(self) -> float:
        """The mean network calls per image over the rounds (weighted by their samples)."""
        counts = [min(self.batch, self.n - r * self.batch) for r in range(self.n_rounds)]
        calls = []
        for r in range(self.n_rounds):
            with open(self._nfe_path(r)) as f:
                calls.append(float(json.load(f)))
        return float(np.average(calls, weights=counts))

    def logits(self) -> np.ndarray | None:
        """All rounds' logits [n, K], or None when the features have none."""
        paths = [self._logits_path(r) for r in range(self.n_rounds)]
        present = [os.path.exists(p) for p in paths]
        if not any(present):
            return None
        if not all(present):
            missing = [r for r, ok in enumerate(present) if not ok]
            raise FileNotFoundError(f"{self.dir}: logits of rounds {missing} are missing; "
                                    "delete the directory to redo these rounds")
        return np.concatenate([np.load(p) for p in paths])

    def remove(self) -> None:
        """Deletes the directory once its row is written (process 0)."""
        if jax.process_index() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _save_npy(path: str, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, a)


# ----------------------------------------------------------------------------------------
# Results file.


def row_key(row: dict) -> tuple:
    """What makes two result rows the same evaluation: step, sampler, n, metric, times,
    (DDIM samplers) eta and (multistep consistency samplers) the clip of each step."""
    return (row.get("step"), row.get("sampler"), row.get("n"), row.get("metric"),
            tuple(row.get("ts") or ()), row.get("eta"), row.get("clip_denoised"))


def read_results(run_dir: str) -> list[dict]:
    """The rows of `<run_dir>/eval.jsonl` (a torn last line, from a crash, is ignored)."""
    path = os.path.join(run_dir, RESULTS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("%s: ignoring a malformed line %r", path, line[:80])
    return rows


def append_row(run_dir: str, row: dict) -> None:
    """Appends one JSON line to `<run_dir>/eval.jsonl`, flushed to disk (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(run_dir, RESULTS)
    with open(path, "a+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # start on a fresh line even after a torn write
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def progress_dirs(run_dir: str) -> list[str]:
    """The unfinished (step, sampler) progress directories of a workdir."""
    return sorted(glob.glob(os.path.join(run_dir, EVAL_DIR, "step*")))
