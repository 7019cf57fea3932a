"""Diffusion samplers by name, '<solver><steps>', for the diffusion losses (EDM and DDPM).

`heun18` and `euler50` sample EDM runs (`cm/edm.py`, Karras times); `ddim50` and
`ddpm1000` sample DDPM runs (`cm/ddpm.py`, integer timesteps). Each solver knows the
loss whose models it samples, its network calls for a number of steps and the times it
visits; `--mode sample`, `--mode eval` and the training grids all build samplers here.
"""

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from cm import consistency, ddpm, edm


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-call sampling options (only DDPM's solvers read them)."""

    eta: float = 0.0  # ddim: 0 = deterministic
    skip: str = "uniform"  # ddim / ddpm: sub-sequence of timesteps


@dataclasses.dataclass(frozen=True)
class Solver:
    """A diffusion sampler family.

    Attributes:
      loss: the `cm.loss` whose models it samples.
      network_calls: network evaluations per image for a number of steps.
      times: (cfg, steps, options) -> the times it visits, descending (recorded in rows).
      sample: (apply_fn, params, cfg, key, shape, labels, steps, options) -> images in
        [-1, 1] (jittable).
    """

    loss: str
    network_calls: Callable[[int], int]
    times: Callable[[consistency.CMConfig, int, Options], np.ndarray]
    sample: Callable


def _karras(cfg, steps, options):
    return edm.karras_steps(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)


def _timesteps(cfg, steps, options):
    return ddpm.timesteps(cfg.num_timesteps, steps, options.skip)[::-1].astype(np.float64)


def _edm(solver):
    def sample(apply_fn, params, cfg, key, shape, labels, steps, options):
        return edm.ode_sample(apply_fn, params, cfg, key, shape, steps, solver, labels)

    return sample


def _ddim(apply_fn, params, cfg, key, shape, labels, steps, options):
    return ddpm.ddim_sample(apply_fn, params, cfg, key, shape, steps, options.eta,
                            options.skip, labels)


def _ancestral(apply_fn, params, cfg, key, shape, labels, steps, options):
    return ddpm.ancestral_sample(apply_fn, params, cfg, key, shape, steps, options.skip,
                                 labels)


SOLVERS: dict[str, Solver] = {
    "heun": Solver("edm", lambda s: 2 * s - 1, _karras, _edm("heun")),  # last step Euler
    "euler": Solver("edm", lambda s: s, _karras, _edm("euler")),
    "ddim": Solver("ddpm", lambda s: s, _timesteps, _ddim),
    "ddpm": Solver("ddpm", lambda s: s, _timesteps, _ancestral),
}
DIFFUSION_LOSSES = tuple(sorted({s.loss for s in SOLVERS.values()}))
_NAME = re.compile(rf"^({'|'.join(SOLVERS)})([1-9]\d*)$")


def parse(name: str) -> tuple[str, int] | None:
    """('heun', 18) for 'heun18', ('ddim', 50) for 'ddim50'; None for other names."""
    m = _NAME.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def solvers_of(loss: str) -> tuple[str, ...]:
    """The solver names that sample models trained with `loss`."""
    return tuple(n for n, s in SOLVERS.items() if s.loss == loss)


def check(cfg: consistency.CMConfig, solver: str, steps: int, options: Options) -> None:
    """Raises ValueError when the solver, steps or options do not fit the run `cfg`."""
    if solver not in SOLVERS or SOLVERS[solver].loss != cfg.loss:
        raise ValueError(f"sampler {solver!r} does not sample cm.loss={cfg.loss!r} models; "
                         f"use one of {solvers_of(cfg.loss)}")
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    if cfg.loss == "ddpm":
        ddpm.schedule_of(cfg)  # raises on a bad schedule
        ddpm.timesteps(cfg.num_timesteps, steps, options.skip)  # steps <= T, skip known
        if not 0.0 <= options.eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {options.eta}")


def make_sample_fn(cfg: consistency.CMConfig, solver: str, steps: int,
                   options: Options = Options()):
    """`sample_fn(apply_fn, params, cfg, key, shape, labels)` for `sampling.make_sampler`."""
    check(cfg, solver, steps, options)
    fn = SOLVERS[solver].sample

    def sample_fn(apply_fn, params, cfg, key, shape, labels):
        return fn(apply_fn, params, cfg, key, shape, labels, steps, options)

    return sample_fn


def times(cfg: consistency.CMConfig, solver: str, steps: int,
          options: Options = Options()) -> np.ndarray:
    """The descending times the sampler visits (Karras sigmas ending with 0, or timesteps)."""
    return SOLVERS[solver].times(cfg, steps, options)


def network_calls(solver: str, steps: int) -> int:
    return SOLVERS[solver].network_calls(steps)
