"""Optional experiment tracking with Weights & Biases (`training.wandb=PROJECT`).

Off by default, and `wandb` is imported only when a project is set. The run is named
after the workdir and its id is a digest of the workdir's absolute path, so a relaunch
(a resume) and `--mode eval` of the same workdir log into the same W&B run
(`resume="allow"`). What goes there: the config, every `metrics.jsonl` row (at its
step), every sample grid, and every `eval.jsonl` row (on its own axis, `eval/step`,
since evaluation runs after training and W&B's step only grows). Offline use:
`WANDB_MODE=offline`, then `wandb sync <workdir>/wandb/offline-run-*`.
"""

import hashlib
import os
from typing import Any

from absl import logging


def run_id(workdir: str) -> str:
    """The W&B run id of a workdir: stable across relaunches on any host."""
    return hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]


class Tracker:
    """A W&B run for one workdir (only process 0 makes one)."""

    def __init__(self, project: str, workdir: str, config: dict[str, Any]):
        try:
            import wandb  # only when asked for
        except ImportError as e:
            raise ImportError("training.wandb is set but wandb is not installed: pip install "
                              "wandb (or leave training.wandb empty)") from e
        self._wandb = wandb
        self.run = wandb.init(project=project, name=os.path.basename(os.path.abspath(workdir)),
                              id=run_id(workdir), resume="allow", dir=workdir, config=config)
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        logging.info("W&B run %s (project %s, id %s)", self.run.name, project, self.run.id)

    def metrics(self, step: int, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def grid(self, step: int, path: str) -> None:
        self.run.log({"samples": self._wandb.Image(path)}, step=step)

    def eval_row(self, row: dict[str, Any]) -> None:
        """One `eval.jsonl` row: its metric under `eval/<sampler>/<metric>`, with IS and
        network calls, at `eval/step` = the checkpoint's step."""
        prefix = f"eval/{row['sampler']}"
        values = {"eval/step": row["step"], f"{prefix}/{row['metric']}": row[row["metric"]],
                  f"{prefix}/nfe": row.get("nfe")}
        if row.get("is") is not None:
            values[f"{prefix}/is"] = row["is"]
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()


def tracker(project: str, workdir: str, config: dict[str, Any]) -> Tracker | None:
    """A `Tracker`, or None when no project is set."""
    return Tracker(project, workdir, config) if project else None
