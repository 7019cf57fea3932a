"""The table of training objectives: `cm.loss` name -> its `Objective` spec.

Each objective is one module with one spec (`spec.Objective`): its loss (noise `z` an
argument), the `cm` fields it reads and those a resume must keep, its target network
and curriculum, its frozen inputs, its samplers, its init rule. Everything else asks
the spec; nothing outside this package compares `cm.loss` with a string
(tests/test_objectives_table.py). Adding an objective is a module and a line below.
"""

from cm.objectives import cd, ct, ddpm, edm, fm, ict
from cm.objectives.spec import (
    SAMPLER_FIELDS,
    Objective,
    SampleOptions,
    Sampler,
    Sampling,
    Solver,
    SolverSampling,
)
from cm.runtime.views import ConfigError

REGISTRY: dict[str, Objective] = {o.name: o for o in (
    ct.OBJECTIVE,
    ict.OBJECTIVE,
    cd.OBJECTIVE,
    edm.OBJECTIVE,
    ddpm.OBJECTIVE,
    fm.OBJECTIVE,
)}

# Fields that decide the shapes of the saved state: a change means the checkpoints
# cannot be restored into the new run (cm.loss: whether a target network is kept).
SHAPE_FIELDS = ("model", "data.image_size", "data.num_channels", "cm.loss",
                "training.ema_rates", "optim.optimizer", "optim.grad_clip",
                "optim.weight_decay")


def get(name: str) -> Objective:
    """The objective `cm.loss=name`, or a ConfigError naming the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"cm.loss must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def guarded_fields(saved: dict, training: bool = True) -> tuple[str, ...]:
    """The flattened fields a new config must share with the saved run `saved` (a dict
    of sections): the shape fields, and the `cm` fields its objective says a relaunch
    must keep (what the parameters compute; when `training`, the objective itself)."""
    cm = saved.get("cm", {})
    objective = REGISTRY.get(cm.get("loss", "ct"))
    fields = () if objective is None else objective.resume_fields(
        cm.get("metric", "pseudo_huber"), training)
    return SHAPE_FIELDS + tuple(f"cm.{f}" for f in fields)


__all__ = ["REGISTRY", "SAMPLER_FIELDS", "SHAPE_FIELDS", "Objective", "Sampler",
           "SampleOptions", "Sampling", "Solver", "SolverSampling", "get", "guarded_fields"]
