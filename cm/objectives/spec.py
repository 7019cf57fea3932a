"""What an objective is: one `Objective` spec that the rest of the project asks.

The trainer, the workdir guard, sampling, evaluation and `training.init_from` never ask
which `cm.loss` a run has; they ask its spec: its loss (the noise `z` an argument), the
`cm` fields it reads and the ones a resume must not change, whether it keeps a target
network and how that decays, its curriculum N(k), the frozen inputs its step needs, its
samplers by name, and how a new run is seeded.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cm.runtime.views import CMConfig, ConfigError, EvalConfig, SampleConfig

PyTree = Any
# apply_fn(params, x_in [B,H,W,C], t_cond [B], labels [B] | None, train, dropout_key) -> [B,H,W,C]
ApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array | None, bool, jax.Array | None],
                   jax.Array]
# loss(apply_fn, cfg, params, target_params, x, z, step, example_keys, dropout_key, labels,
#      **frozen) -> (mean loss over the shard, aux metrics); `z` is the (paired) noise.
LossFn = Callable[..., tuple[jax.Array, dict]]
# sample(apply_fn, params, cfg, key, shape, labels) -> samples (jittable), not clipped at
# the end: `cm.sampling.make_sampler` clips images to [-1, 1] and decodes latents unclipped.
SampleFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Per-call options of the samplers; each family reads the ones it knows."""

    eta: float = 0.0  # DDIM: 0 = deterministic
    skip: str = "uniform"  # DDPM samplers: sub-sequence of timesteps
    two_step_t: float = 0.821  # consistency 2step: the intermediate time
    clip_denoised: bool = True  # multistep consistency, DDIM/DDPM: clip x0 to [-1, 1]

    @classmethod
    def of_sample(cls, s: SampleConfig) -> "SampleOptions":
        return cls(eta=s.eta, skip=s.skip, clip_denoised=s.clip_denoised)

    @classmethod
    def of_eval(cls, ev: EvalConfig, s: SampleConfig | None = None) -> "SampleOptions":
        clip = s.clip_denoised if s is not None else True
        return cls(eta=ev.eta, skip=ev.skip, two_step_t=ev.two_step_t, clip_denoised=clip)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One concrete sampler: its name, the times it visits (descending, recorded in
    evaluation rows), its network calls per image, its eta where it reads one, and the
    jittable function that draws the samples (images, or latents in latent training)."""

    name: str
    times: tuple[float, ...]
    nfe: int | None  # None: counted per batch (adaptive samplers)
    eta: float | None = None
    tag: str = ""  # file-name tag of `--mode sample`
    sample: SampleFn = dataclasses.field(default=None, compare=False, repr=False)
    # Its clip of the x0 estimates where it has one to record: multistep consistency
    # sampling always, DDIM/DDPM when off (latent runs); None otherwise.
    clip_denoised: bool | None = None

    @property
    def key(self) -> tuple:
        """What makes two samplers the same program (built once per key)."""
        return (self.name, self.times, self.eta, self.tag, self.clip_denoised)


# The fields of the `sample` and `eval` sections an objective fills with its own defaults
# when the config leaves them at base's value and that value does not fit it.
SAMPLER_FIELDS = ("sample.solver", "sample.steps", "eval.samplers")


class Sampling:
    """An objective's samplers by name, its defaults, and which fields it reads."""

    kind = ""  # for messages: "consistency samplers", "ODE solvers", ...
    examples = ""  # e.g. '"heun18","euler50"'

    def named(self, cfg: CMConfig, name: str, options: SampleOptions) -> Sampler:
        raise NotImplementedError

    def for_grid(self, cfg: CMConfig, s: SampleConfig) -> Sampler:
        """The sampler of the training grids."""
        raise NotImplementedError

    def for_sample_mode(self, cfg: CMConfig, s: SampleConfig) -> Sampler:
        """The sampler of `--mode sample` (the `sample` section)."""
        raise NotImplementedError

    def usable(self, field: str, value: Any) -> bool:
        """Whether the objective can use `value` for one of `SAMPLER_FIELDS`."""
        raise NotImplementedError

    def default(self, field: str, s: SampleConfig, cfg: CMConfig) -> Any:
        """The objective's value for one of `SAMPLER_FIELDS`, None for a field it does not
        read (`s`: the resolved sample section, for the eval default that follows it)."""
        raise NotImplementedError

    def resolve(self, cfg: CMConfig, s: SampleConfig, ev: EvalConfig, base_s: SampleConfig,
                base_ev: EvalConfig) -> tuple[SampleConfig, EvalConfig, list[str]]:
        """Fills the `SAMPLER_FIELDS` the objective cannot use with its defaults.

        A field left at base's value that does not fit the objective takes the objective's
        default; a field set to something else that does not fit is a ConfigError; a
        field the objective does not read at all (a solver for consistency sampling) is
        only noted when set. `sample.steps` left at base's value follows a replaced
        `sample.solver`. Returns the sections and one line per change or unread field.

        Args:
          cfg: the run's `cm` section (its `loss` names the objective in messages).
          s, ev: the run's `sample` and `eval` sections; base_s, base_ev: base's.
        """
        notes, replaced = [], set()
        sections = {"sample": s, "eval": ev}
        bases = {"sample": base_s, "eval": base_ev}
        for field in SAMPLER_FIELDS:
            sec, key = field.split(".")
            value, base_value = getattr(sections[sec], key), getattr(bases[sec], key)
            follows = field == "sample.steps" and "sample.solver" in replaced
            if self.usable(field, value) and not (follows and value == base_value):
                continue
            default = self.default(field, sections["sample"], cfg)
            if default is None:  # not read by this objective
                if value != base_value:
                    notes.append(f"{field}={value!r} is not read by cm.loss={cfg.loss} "
                                 f"({self.kind})")
                continue
            if value != base_value:
                if field == "eval.samplers":
                    self.check_eval(cfg, sections["eval"])  # names the first that does not fit
                raise ConfigError(
                    f"{field}={value!r} does not fit cm.loss={cfg.loss!r}, whose samplers are "
                    f"{self.kind} (e.g. {self.examples}); leave it unset for the objective's "
                    "default")
            sections[sec] = sections[sec].replace(**{key: default})
            replaced.add(field)
            notes.append(f"{field}={default!r}: cm.loss={cfg.loss}'s default, in place of "
                         f"base's {value!r}")
        return sections["sample"], sections["eval"], notes

    def check_eval(self, cfg: CMConfig, ev: EvalConfig) -> None:
        """Raises ConfigError unless every `eval.samplers` name is one of ours."""
        options = SampleOptions.of_eval(ev)
        if not ev.samplers:
            raise ConfigError(f"eval.samplers is empty; {self.kind}, e.g. "
                              f"--config.eval.samplers='({self.examples})'")
        for name in ev.samplers:
            self.named(cfg, name, options)


@dataclasses.dataclass(frozen=True)
class Solver:
    """A family of numerical samplers '<name><steps>' (e.g. heun18, ddim50).

    Attributes:
      network_calls: network evaluations per image for a number of steps.
      times: (cfg, steps, options) -> the times it visits, descending (recorded in rows).
      sample: (apply_fn, params, cfg, key, shape, labels, steps, options) -> images.
      check: (cfg, steps, options) -> None, raising ValueError on what does not fit.
      reads_eta: whether `eta` is part of what it computes (recorded in rows).
      reads_clip: whether it clips its x0 estimates per `clip_denoised` (recorded in rows
        when off; on, the default, rows keep no field, as before it was an option).
      tag: (name, steps, options) -> the `--mode sample` file-name tag.
    """

    network_calls: Callable[[int], int]
    times: Callable[[CMConfig, int, SampleOptions], np.ndarray]
    sample: Callable
    check: Callable[[CMConfig, int, SampleOptions], None] = lambda cfg, steps, options: None
    reads_eta: bool = False
    reads_clip: bool = False
    tag: Callable[[str, int, SampleOptions], str] = lambda name, steps, options: (
        f"{name}{steps}")


class SolverSampling(Sampling):
    """Samplers named '<solver><steps>' (diffusion and flow models)."""

    def __init__(self, solvers: dict[str, Solver], default_solver: str, default_steps: int,
                 kind: str, examples: str, config_file: str,
                 max_steps: Callable[[CMConfig], int] = lambda cfg: 1 << 30):
        self.solvers, self.default_solver, self.default_steps = solvers, default_solver, \
            default_steps
        self.max_steps = max_steps
        self.kind, self.examples, self.config_file = kind, examples, config_file
        self._pattern = re.compile(rf"^({'|'.join(solvers)})([1-9]\d*)$")

    def parse(self, name: str) -> tuple[str, int] | None:
        m = self._pattern.match(str(name))
        return (m.group(1), int(m.group(2))) if m else None

    def _build(self, cfg: CMConfig, solver: str, steps: int, options: SampleOptions,
               name: str) -> Sampler:
        if solver not in self.solvers:
            raise ConfigError(f"sampler {solver!r} does not sample cm.loss={cfg.loss!r} models; "
                              f"use one of {tuple(self.solvers)}")
        if steps < 1:
            raise ConfigError(f"sampling steps must be >= 1, got {steps}")
        spec = self.solvers[solver]
        try:
            spec.check(cfg, steps, options)
        except ValueError as e:
            raise ConfigError(str(e)) from e

        def sample(apply_fn, params, cfg, key, shape, labels):
            return spec.sample(apply_fn, params, cfg, key, shape, labels, steps, options)

        times = tuple(float(t) for t in spec.times(cfg, steps, options))
        return Sampler(name, times, spec.network_calls(steps),
                       options.eta if spec.reads_eta else None,
                       spec.tag(solver, steps, options), sample,
                       False if spec.reads_clip and not options.clip_denoised else None)

    def named(self, cfg, name, options):
        parsed = self.parse(name)
        if parsed is None:
            raise ConfigError(
                f"eval.samplers: {name!r} is not a sampler of cm.loss={cfg.loss!r} models, "
                f"whose samplers are {self.kind} named '<solver><steps>' with solver "
                f"{' or '.join(self.solvers)}, e.g. --config {self.config_file} "
                f"--config.eval.samplers='({self.examples})'")
        return self._build(cfg, *parsed, options, name)

    def for_grid(self, cfg, s):
        return self._build(cfg, s.solver, s.steps, SampleOptions.of_sample(s),
                           f"{s.solver}{s.steps}")

    for_sample_mode = for_grid

    def usable(self, field, value):
        if field == "sample.solver":
            return value in self.solvers
        if field == "sample.steps":
            return True  # any count >= 1 (the solver checks its own bounds)
        return bool(value) and all(self.parse(n) for n in value)

    def default(self, field, s, cfg):
        if field == "sample.solver":
            return self.default_solver
        if field == "sample.steps":
            return min(self.default_steps, self.max_steps(cfg))
        return (f"{s.solver}{s.steps}",)  # eval: the run's own sampler


def _zero_int(cfg: CMConfig, step) -> jax.Array:
    del cfg, step
    return jnp.zeros((), jnp.int32)


def _zero_float(cfg: CMConfig, step) -> jax.Array:
    del cfg, step
    return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective (`cm.loss=name`).

    Attributes:
      name: its `cm.loss` value.
      summary: one line for logs and docs.
      loss: the loss (`LossFn`), noise `z` an argument.
      sampling: its samplers by name and their defaults.
      reads: the `cm` fields it reads (others are logged as unused when set).
      meaning_fields: `cm` fields that decide what saved parameters compute (a change
        would misread the checkpoints: refused for training and sampling).
      objective_fields: `cm` fields that define the objective (refused on resume).
      metric_fields: by `cm.metric`, the fields of that metric (refused on resume) when
        the objective reads `cm.metric`; empty for losses with their own fixed metric.
      keeps_target: whether the state holds a target network (`target_params`).
      num_scales: (cfg, step) -> N(k), the curriculum (0 without one); jittable.
      target_decay: (cfg, step) -> mu(k), the target EMA's decay (0 without one).
      curriculum: how log lines name N(k) ('' when it never moves with n_iters).
      teacher: the `cm.loss` of the teacher run whose parameters the step needs
        (frozen input `teacher`, from `cm.teacher_workdir`); '' for none.
      seeds_from_teacher: a new run starts from the teacher unless
        `training.init_from` says otherwise.
      check: (cm section) -> None, raising ConfigError on fields that do not fit.
    """

    name: str
    summary: str
    loss: LossFn
    sampling: Sampling
    reads: tuple[str, ...]
    meaning_fields: tuple[str, ...]
    objective_fields: tuple[str, ...] = ()
    metric_fields: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    keeps_target: bool = False
    num_scales: Callable[[CMConfig, Any], jax.Array] = _zero_int
    target_decay: Callable[[CMConfig, Any], jax.Array] = _zero_float
    curriculum: str = ""
    teacher: str = ""
    seeds_from_teacher: bool = False
    check: Callable[[CMConfig], None] = lambda cfg: None

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher)

    @property
    def reads_metric(self) -> bool:
        return "metric" in self.reads

    def uses_lpips(self, cfg: CMConfig) -> bool:
        """Whether the loss needs the LPIPS network."""
        return self.reads_metric and cfg.metric == "lpips"

    def frozen_inputs(self, cfg: CMConfig) -> tuple[str, ...]:
        """Names of the step's frozen inputs besides `step_key`: `teacher`, `lpips`."""
        return (("teacher",) if self.needs_teacher else ()) + (
            ("lpips",) if self.uses_lpips(cfg) else ())

    def resume_fields(self, metric: str, training: bool) -> tuple[str, ...]:
        """The `cm` fields a relaunch must keep: the meaning fields, and, when it trains,
        the objective's and its metric's."""
        fields = self.meaning_fields
        if training:
            fields += self.objective_fields + self.metric_fields.get(metric, ())
        return fields

    def schedule_jumps(self, old: CMConfig, new: CMConfig, step: int) -> list[str]:
        """What a changed `training.n_iters` (`total_steps`) moves at resume step `step`:
        the curriculum N(k) and the target EMA mu(k), one line each that moves."""
        if not self.curriculum:
            return []
        jumps = []
        a, b = int(self.num_scales(old, step)), int(self.num_scales(new, step))
        if a != b:
            jumps.append(f"the {self.curriculum} N(k) goes from {a} to {b}")
        a, b = float(self.target_decay(old, step)), float(self.target_decay(new, step))
        if a != b:
            jumps.append(f"the target EMA mu(k) from {a:.6g} to {b:.6g}")
        return jumps
