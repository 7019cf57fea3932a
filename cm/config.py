"""The run's config, built and checked in one call: `build(config) -> Config`.

A `Config` holds the typed views of the eight sections (`cm.runtime.views`), the
objective's spec (`cm.objectives`), and the lines saying what the objective filled in.
Every mode starts here; every problem is one `ConfigError` naming the field. `build`
is idempotent (a `Config` passes through), so a mode called with a config that
`main.py` already built does not check it again.

Sampler fields follow the objective: with `--config.cm.loss=ddpm` on a config written
for consistency training, `sample.solver`, `sample.steps` and `eval.samplers` left at
base's values take DDPM's defaults (and the log says so); a value the file set that
the objective cannot use is an error.
"""

import dataclasses
from typing import Any

import jax
from absl import logging

from cm import objectives, pairing
from cm.objectives import Objective
from cm.runtime.views import (
    SECTIONS,
    AssignmentConfig,
    CMConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LatentConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainingConfig,
    view,
)
from configs import base

__all__ = ["Config", "ConfigError", "base_views", "build", "for_training"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The checked config: one typed view per section, and the objective's spec."""

    data: DataConfig
    model: ModelConfig
    cm: CMConfig
    assignment: AssignmentConfig
    optim: OptimConfig
    training: TrainingConfig
    sample: SampleConfig
    latent: LatentConfig
    eval: EvalConfig
    objective: Objective = dataclasses.field(compare=False)
    notes: tuple[str, ...] = ()  # what `build` filled in or found unused (logged)
    trainable: bool = False  # the device-dependent training checks passed

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The sections as plain dicts (what `config.json` holds), resolved values included."""
        out = {name: getattr(self, name).to_dict() for name in SECTIONS}
        for extra in ("total_steps", "lpips_dtype"):  # other sections' values
            out["cm"].pop(extra)
        return out

    @property
    def net_shape(self) -> tuple[int, int, int]:
        """(H, W, C) the network sees: the images, or their latents in latent training."""
        d, lt = self.data, self.latent
        if lt.enabled:
            return (d.image_size // lt.factor, d.image_size // lt.factor, lt.channels)
        return (d.image_size, d.image_size, d.num_channels)

    def log_notes(self) -> None:
        for line in self.notes:
            logging.info("config: %s", line)


def _views(config: Any) -> dict[str, Any]:
    out = {}
    for name, cls in SECTIONS.items():
        try:
            section = config[name]
        except (KeyError, AttributeError):
            raise ConfigError(f"the config has no {name!r} section") from None
        if cls is CMConfig:
            out[name] = view(cls, section, total_steps=config["training"]["n_iters"],
                             lpips_dtype=config["model"]["dtype"])
        else:
            out[name] = view(cls, section)
    return out


_BASE = None


def base_views() -> dict[str, Any]:
    """The views of `configs/base.py`'s sections (what "left at base's value" compares to)."""
    global _BASE
    if _BASE is None:
        _BASE = _views(base.get_config())
    return _BASE


def _unused_fields(cm: CMConfig, objective: Objective) -> list[str]:
    """The `cm` fields set away from base's values that the objective does not read."""
    base_cm = base_views()["cm"]
    skip = set(objective.reads) | {"loss", "total_steps", "lpips_dtype"}
    return [f"cm.{k}={getattr(cm, k)!r} is not read by cm.loss={objective.name}"
            for k in cm.keys() if k not in skip and getattr(cm, k) != getattr(base_cm, k)]


def build(config: Any) -> Config:
    """Builds and checks the config (a `ConfigDict`, a mapping of sections, or a `Config`).

    Raises:
      ConfigError: the first problem found, naming the field.
    """
    if isinstance(config, Config):
        return config
    try:
        v = _views(config)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. a string steps
        raise ConfigError(f"config: {e}") from e
    objective = objectives.get(v["cm"].loss)
    objective.check(v["cm"])
    b = base_views()
    v["sample"], v["eval"], notes = objective.sampling.resolve(
        v["cm"], v["sample"], v["eval"], b["sample"], b["eval"])
    cm, sample, training = v["cm"], v["sample"], v["training"]
    objective.sampling.for_grid(cm, sample)  # the solver, its steps and options fit
    objective.sampling.check_eval(cm, v["eval"])
    notes += _unused_fields(cm, objective)
    if cm.metric == "lpips" and not objective.reads_metric:
        notes.append(f"cm.metric=lpips is ignored: cm.loss={objective.name} has its own loss")
    if v["latent"].enabled and v["data"].image_size % v["latent"].factor:
        raise ConfigError(f"data.image_size={v['data'].image_size} is not a multiple of "
                          f"latent.factor={v['latent'].factor}")
    if v["latent"].enabled and sample.clip_denoised:
        # Latents (unit variance after the scaling factor) are not bounded to [-1, 1]:
        # clipping x0 estimates there would cut about a third of their values.
        v["sample"] = sample = sample.replace(clip_denoised=False)
        notes.append("sample.clip_denoised=False: latents are not bounded to [-1, 1] "
                     "(the decoded images are clipped)")
    if objective.uses_lpips(cm) and v["latent"].enabled:
        raise ConfigError("cm.metric=lpips compares images, not latents: use pseudo_huber "
                          "for latent training")
    if objective.uses_lpips(cm):
        if v["data"].num_channels != 3:
            raise ConfigError(f"cm.metric=lpips needs RGB images; data.num_channels="
                              f"{v['data'].num_channels}")
        if not cm.lpips_resize and v["data"].image_size < 16:
            raise ConfigError("cm.metric=lpips with cm.lpips_resize=0 needs images of at "
                              f"least 16x16 (VGG16 pools 4 times), got {v['data'].image_size}")
    if not 0 <= sample.ema_index < len(training.ema_rates):
        raise ConfigError(f"sample.ema_index={sample.ema_index} but there are "
                          f"{len(training.ema_rates)} EMA rates")
    if v["assignment"].within_class and v["model"].num_classes <= 0:
        raise ConfigError("assignment.within_class needs a class-conditional model "
                          "(model.num_classes > 0)")
    pairing.check(v["assignment"])
    return Config(**v, objective=objective, notes=tuple(notes))


def for_training(config: Any) -> Config:
    """`build`, and the checks that depend on this machine's devices and processes.

    Raises:
      ConfigError: e.g. a global batch that does not split over the devices.
    """
    cfg = build(config)
    if cfg.trainable:
        return cfg
    t, a = cfg.training, cfg.assignment
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        raise ConfigError(f"training.batch_size={t.batch_size} must be a positive multiple "
                          f"of the {n_dev} devices")
    if t.batch_size % (n_dev * t.microbatch):
        raise ConfigError(f"training.microbatch={t.microbatch}: each of the {n_dev} devices' "
                          f"{t.batch_size // n_dev} rows must split into {t.microbatch} equal "
                          "microbatches")
    on_host = a.where == "host"
    s0, s1, c = cfg.net_shape
    pairing.check_knn_memory(  # rows paired at once: the host's, or a device's
        a, t.batch_size // (jax.process_count() if on_host else n_dev), s0 * s1 * c)
    return dataclasses.replace(cfg, trainable=True)
