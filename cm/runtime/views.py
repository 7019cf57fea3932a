"""Typed, frozen views of the nine config sections, with their defaults read from base.

`configs/base.py` is the only place a default lives: each view's field defaults are
read from `base.get_config()` when this module is imported, and a field that is in one
and not the other is an error naming it. A view checks what its own section can check
(`__post_init__`, a `ConfigError` naming the field); checks that need several sections,
the objective or the devices are `cm.config.build`'s.

    view(TrainingConfig, config.training)   # a ConfigDict section, or a mapping
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import assignment
from configs import base

T = TypeVar("T")


class ConfigError(ValueError):
    """The config cannot run; the message names the field and what it must be."""


def _freeze(value: Any) -> Any:
    """Lists (JSON, ConfigDict) become tuples, so that views are hashable and compare."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


class _Section:
    """Mapping access (`view["nf"]`, `dict(view)`) beside attribute access."""

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self.keys() else default

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in self.keys())}

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def section(name: str, extra: Mapping[str, tuple[str, str]] | None = None):
    """Makes a frozen dataclass of `name`'s fields with the defaults of `configs/base.py`.

    Args:
      name: the config section (`data`, `model`, ...).
      extra: fields from outside the section: {field: (section, key)} of base, for
        values a view needs from another section (e.g. `cm.total_steps` from
        `training.n_iters`).
    """
    extra = dict(extra or {})

    def wrap(cls):
        defaults = base.get_config()
        own = defaults[name]
        annotated = set(cls.__annotations__)
        missing = sorted(set(own.keys()) - annotated)
        unknown = sorted(annotated - set(own.keys()) - set(extra))
        if missing or unknown:
            raise TypeError(f"{cls.__name__} and configs/base.py's {name!r} section disagree: "
                            f"fields only in base {missing}, only in the view {unknown}")
        for field in cls.__annotations__:
            sec, key = extra.get(field, (name, field))
            setattr(cls, field, _freeze(defaults[sec][key]))
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.section = name
        return cls

    return wrap


def view(cls: type[T], section_values: Mapping[str, Any], **extra: Any) -> T:
    """`cls(**section, **extra)`, refusing unknown and missing fields by name.

    Args:
      cls: a view (or any dataclass) whose fields are the section's keys plus `extra`'s.
      section_values: a config section (a `ConfigDict`, a view, or a plain mapping).
      extra: values from outside the section (e.g. `total_steps` from `training`).
    """
    if dataclasses.is_dataclass(section_values):
        values = {f.name: getattr(section_values, f.name)
                  for f in dataclasses.fields(section_values)}
    else:
        values = {k: section_values[k] for k in section_values.keys()}
    values = {k: _freeze(v) for k, v in {**values, **extra}.items()}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
    if unknown:  # missing ones take the defaults (a workdir saved before they existed)
        raise ConfigError(f"config section {getattr(cls, 'section', cls.__name__)!r}: unknown "
                          f"field(s) {unknown}")
    if missing and not hasattr(cls, "section"):
        raise ConfigError(f"config section for {cls.__name__}: missing {missing}")
    return cls(**values)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(section_name: str, field: str, value: Any, allowed: tuple) -> None:
    _need(value in allowed, f"{section_name}.{field} must be one of {allowed}, got {value!r}")


@section("data")
class DataConfig(_Section):
    name: str
    path: str
    data_dir: str
    download: bool
    split: str
    image_size: int
    num_channels: int
    random_flip: bool
    crop: int
    stream: str
    max_memory_gb: float
    value_range: str


@section("model")
class ModelConfig(_Section):
    name: str
    nf: int
    ch_mult: tuple
    num_res_blocks: int
    attn_resolutions: tuple
    dropout: float
    resblock_type: str
    resamp_with_conv: bool
    fir: bool
    fir_kernel: tuple
    skip_rescale: bool
    init_scale: float
    embedding_type: str
    fourier_scale: float
    progressive: str
    progressive_input: str
    progressive_combine: str
    num_classes: int
    dtype: str
    remat: bool

    def __post_init__(self):
        _one_of("model", "dtype", self.dtype, ("float32", "bfloat16"))
        _need(self.num_classes >= 0, f"model.num_classes must be >= 0, got {self.num_classes}")
        _need(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")


METRICS = ("l2", "l1", "pseudo_huber", "lpips")


@section("cm", extra={"total_steps": ("training", "n_iters"),
                      "lpips_dtype": ("model", "dtype")})
class CMConfig(_Section):
    """The `cm` section, plus the training length and compute dtype it needs.

    `cm.loss` names an objective (`cm.objectives`); which of the other fields it reads
    is the objective's business (its spec lists them).
    """

    loss: str
    sigma_min: float
    sigma_max: float
    rho: float
    sigma_data: float
    metric: str
    lpips_vgg_path: str
    lpips_lin_path: str
    lpips_pool: str
    lpips_resize: int
    huber_c: float
    start_scales: int
    end_scales: int
    start_ema: float
    p_mean: float
    p_std: float
    teacher_workdir: str
    num_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    fm_time: str
    fm_logit_mean: float
    fm_logit_std: float
    fm_t_scale: float
    # From outside the `cm` section:
    total_steps: int  # training.n_iters, the curricula's length
    lpips_dtype: str  # model.dtype, the compute dtype

    def __post_init__(self):
        _one_of("cm", "metric", self.metric, METRICS)
        _need(0 < self.sigma_min < self.sigma_max, "need 0 < cm.sigma_min < cm.sigma_max")
        _need(2 <= self.start_scales <= self.end_scales,
              "need 2 <= cm.start_scales <= cm.end_scales")
        _one_of("cm", "lpips_pool", self.lpips_pool, ("max", "avg"))
        _need(not (self.lpips_resize < 0 or 0 < self.lpips_resize < 16),
              "cm.lpips_resize must be 0 (native size) or at least 16 (VGG16 pools 4 times), "
              f"got {self.lpips_resize}")

    @classmethod
    def from_config(cls, config) -> "CMConfig":
        return view(cls, config.cm, total_steps=config.training.n_iters,
                    lpips_dtype=config.model.dtype)


ASSIGNMENT_WHERE = ("host", "device")


@section("assignment")
class AssignmentConfig(_Section):
    method: str
    scope: str
    where: str
    cost: str
    dtype: str
    scale: float
    k: int
    solver: str
    within_class: bool
    resample: bool
    prefetch: int

    def __post_init__(self):
        _need(self.method in assignment.METHODS, f"unknown assignment.method {self.method!r}; "
              f"expected one of {sorted(assignment.METHODS)}")
        _one_of("assignment", "where", self.where, ASSIGNMENT_WHERE)
        _need(self.k >= 1, f"assignment.k must be >= 1, got {self.k}")
        _need(self.prefetch >= 1, f"assignment.prefetch must be >= 1, got {self.prefetch}")
        _need(not (self.where == "device" and self.scope != "device"),
              "assignment.where='device' assigns within each device's shard: it needs "
              "assignment.scope='device'")
        _need(not (self.within_class and self.method == "knn"),
              "assignment.within_class applies to permuting methods (linear), not knn (which "
              "pairs each image with its own candidates)")
        _need(not (self.resample and (self.where == "device" or self.method == "knn")),
              "assignment.resample draws pairs from a host pairing (linear or none), not "
              f"from knn or on the device path; got method={self.method!r}, "
              f"where={self.where!r}")
        _need(not (self.within_class and self.where == "device"),
              "assignment.within_class runs on the host path only (assignment.where='host')")


OPTIMIZERS = ("adam", "radam")
DECAYS = ("none", "cosine", "linear")


@section("optim")
class OptimConfig(_Section):
    optimizer: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    warmup: int
    decay: str
    final_lr: float
    grad_clip: float

    def __post_init__(self):
        _need(self.optimizer in OPTIMIZERS, f"unknown optim.optimizer {self.optimizer!r}; "
              f"expected one of {list(OPTIMIZERS)}")
        _one_of("optim", "decay", self.decay, DECAYS)
        _need(self.warmup >= 0, f"optim.warmup must be >= 0, got {self.warmup}")
        _need(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
_INTERVALS = ("n_iters", "log_every", "sample_every", "snapshot_every", "resume_every")


@section("training")
class TrainingConfig(_Section):
    seed: int
    batch_size: int
    n_iters: int
    ema_rates: tuple
    ema_halflife_kimg: float
    init_from: str
    init_step: int
    log_every: int
    sample_every: int
    snapshot_every: int
    keep_snapshots: int
    resume_every: int
    n_grid: int
    steps_per_call: int
    microbatch: int
    wandb: str
    transfer_guard: str

    def __post_init__(self):
        _need(self.batch_size > 0, f"training.batch_size={self.batch_size} must be positive")
        for name in _INTERVALS:
            _need(getattr(self, name) >= 0,
                  f"training.{name} must be >= 0, got {getattr(self, name)}")
        _need(self.log_every > 0, "training.log_every must be positive")
        k = self.steps_per_call
        _need(k >= 1, f"training.steps_per_call must be >= 1, got {k}")
        _need(self.microbatch >= 1, f"training.microbatch must be >= 1, got {self.microbatch}")
        uneven = [name for name in _INTERVALS if getattr(self, name) % k]
        _need(not uneven, f"training.steps_per_call={k}: logs, samples and checkpoints happen "
              f"between calls, so training.{uneven[0] if uneven else ''}="
              f"{getattr(self, uneven[0]) if uneven else ''} must be a multiple of {k}")
        _need(self.keep_snapshots >= 1, "training.keep_snapshots must be >= 1 (the newest "
              f"snapshot is always kept), got {self.keep_snapshots}")
        _one_of("training", "transfer_guard", self.transfer_guard, TRANSFER_GUARDS)
        _need(self.ema_halflife_kimg >= 0,
              f"training.ema_halflife_kimg must be >= 0, got {self.ema_halflife_kimg}")
        _need(bool(self.ema_rates) and all(0 <= r < 1 for r in self.ema_rates),
              f"training.ema_rates must be rates in [0, 1), got {self.ema_rates}")

    @property
    def rates(self) -> tuple[float, ...]:
        """The per-step rates of the evaluation EMAs.

        `ema_rates` as given, except that `ema_halflife_kimg > 0` sets the first rate the
        EDM way, from a half-life in images and the global batch:
        rate = 0.5 ** (batch / (1000 * halflife_kimg)); 500 kimg at batch 512 is 0.99929.
        """
        rates = tuple(float(r) for r in self.ema_rates)
        if self.ema_halflife_kimg > 0:
            rate = 0.5 ** (self.batch_size / (1000.0 * self.ema_halflife_kimg))
            rates = (rate,) + rates[1:]
        return rates


@section("sample")
class SampleConfig(_Section):
    ts: tuple
    ema_index: int
    n: int
    batch_size: int
    step: int
    solver: str
    steps: int
    eta: float
    skip: str
    label: int
    clip_denoised: bool

    def __post_init__(self):
        _need(self.n >= 1, f"sample.n must be >= 1, got {self.n}")
        _need(self.batch_size >= 1, f"sample.batch_size must be >= 1, got {self.batch_size}")
        _need(self.steps >= 1, f"sampling steps must be >= 1, got {self.steps}")


POSTERIORS = ("mean", "sample")


@section("latent")
class LatentConfig(_Section):
    autoencoder: str
    factor: int
    channels: int
    store: str
    posterior: str
    encode_batch: int
    ae_channels: tuple
    ae_layers: int
    ae_groups: int
    kl_weight: float

    def __post_init__(self):
        _one_of("latent", "posterior", self.posterior, POSTERIORS)
        _need(self.factor >= 1 and self.channels >= 1,
              "latent.factor and latent.channels must be positive")
        _need(self.encode_batch >= 1, "latent.encode_batch must be positive")
        _need(bool(self.ae_channels) and all(c % self.ae_groups == 0 for c in self.ae_channels),
              f"latent.ae_groups={self.ae_groups} must divide every latent.ae_channels "
              f"{self.ae_channels}")
        _need(self.kl_weight >= 0, "latent.kl_weight must be >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.autoencoder)


@section("eval")
class EvalConfig(_Section):
    n_samples: int
    batch_size: int
    samplers: tuple
    eta: float
    skip: str
    two_step_t: float
    steps: str
    inception_path: str
    stats_path: str
    cache_dir: str
    features: str
    fashion_weights: str

    def __post_init__(self):
        # '--config.eval.steps=1000' may arrive as an int.
        object.__setattr__(self, "steps", str(self.steps))
        _need(self.n_samples >= 2,
              f"eval.n_samples must be >= 2 (a covariance), got {self.n_samples}")
        _need(self.batch_size >= 1, f"eval.batch_size must be positive, got {self.batch_size}")


SECTIONS: dict[str, type] = {cls.section: cls for cls in (
    DataConfig, ModelConfig, CMConfig, AssignmentConfig, OptimConfig, TrainingConfig,
    SampleConfig, LatentConfig, EvalConfig)}
