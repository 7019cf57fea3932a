"""The workdir as the resume key: its saved config and compatibility checks.

`config.json` records the config of a run's latest launch; `config_changes.jsonl` the
fields each relaunch changed, with the step it resumed at. A launch that would misread
the saved state (another shape or parameterisation) or train it towards another
objective fails before anything is written.
"""

import json
import os
import time

import ml_collections

# Fields that decide the shapes of the saved state: a change means the checkpoints
# cannot be restored into the new run.
SHAPE_FIELDS = ("model", "data.image_size", "data.num_channels", "cm.loss",
                "training.ema_rates", "optim.optimizer", "optim.grad_clip",
                "optim.weight_decay")
# `cm` fields that decide what the saved parameters compute (the consistency function's
# boundary scalings, EDM's preconditioning, the DDPM noise level of each timestep), by the
# saved run's cm.loss. A change would misread the checkpoints: refused for training and
# for sampling.
MEANING_FIELDS = {"ct": ("sigma_min", "sigma_data"), "ict": ("sigma_min", "sigma_data"),
                  "cd": ("sigma_min", "sigma_data"), "edm": ("sigma_data",),
                  "ddpm": ("num_timesteps", "beta_schedule", "beta_start", "beta_end")}
# `cm` fields that define the training objective, by the saved cm.loss: a change on resume
# would silently train the same checkpoints towards another objective (e.g. the CIFAR-10
# configs' switch to LPIPS, or another curriculum or noise distribution).
OBJECTIVE_FIELDS = {
    "ct": ("metric", "sigma_max", "rho", "start_scales", "end_scales", "start_ema"),
    "ict": ("metric", "sigma_max", "rho", "start_scales", "end_scales", "p_mean", "p_std"),
    "cd": ("metric", "sigma_max", "rho", "end_scales", "start_ema"),
    "edm": ("p_mean", "p_std"),
    "ddpm": (),
}
METRIC_FIELDS = {"pseudo_huber": ("huber_c",), "lpips": ("lpips_pool", "lpips_resize")}


def guarded_fields(saved: dict, training: bool = True) -> tuple[str, ...]:
    """The flattened fields a new config must share with the saved run `saved`.

    The shape fields, and the `cm` fields that the saved run's loss reads: those that
    decide what its parameters compute, and, when `training`, those of its objective.
    """
    flat = _flatten(saved)
    loss, metric = flat.get("cm.loss", "ct"), flat.get("cm.metric", "pseudo_huber")
    cm_fields = MEANING_FIELDS.get(loss, ())
    if training:
        cm_fields += OBJECTIVE_FIELDS.get(loss, ())
        if loss in ("ct", "ict", "cd"):  # EDM's and DDPM's losses are l2 whatever the metric
            cm_fields += METRIC_FIELDS.get(metric, ())
    return SHAPE_FIELDS + tuple(f"cm.{f}" for f in cm_fields)


class IncompatibleWorkdirError(ValueError):
    pass


class WorkdirNotWritableError(OSError):
    """The workdir cannot be created or written to; the message says why."""


def make_writable(workdir: str) -> None:
    """Creates `workdir` if needed and checks that files can be written there."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        why = e.strerror or str(e)
        raise WorkdirNotWritableError(f"cannot write to --workdir {workdir!r}: {why}"
                                      + (f" ({e.filename})" if e.filename else "")) from e


def require_run(workdir: str) -> None:
    """Raises FileNotFoundError unless `workdir` holds a training run (its config.json)."""
    if not os.path.exists(config_path(workdir)):
        raise FileNotFoundError(f"no checkpoint in {workdir!r}: it holds no training run (no "
                                "config.json); check --workdir, or train first")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was started with (fields added since at defaults)."""
    merged = saved_dict(workdir)
    if merged is None:
        raise FileNotFoundError(f"{config_path(workdir)} not found: is {workdir!r} a "
                                "training workdir?")

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    return ml_collections.ConfigDict(tuples(merged))


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def diff(old: dict, new: dict, fields: tuple[str, ...] | None = None) -> list[str]:
    """Flattened keys whose values differ (restricted to `fields` prefixes if given)."""
    fo, fn = _flatten(old), _flatten(new)
    keys = sorted(set(fo) | set(fn))
    if fields is not None:
        keys = [k for k in keys if any(k == f or k.startswith(f + ".") for f in fields)]
    return [k for k in keys if fo.get(k, "<missing>") != fn.get(k, "<missing>")]


def saved_dict(workdir: str) -> dict | None:
    """The config saved in `workdir` as a dict, with fields added since at their defaults."""
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    from configs import base

    merged = config_to_dict(base.get_config())
    _merge(merged, saved)
    return merged


def check_compatible(workdir: str, config: ml_collections.ConfigDict,
                     training: bool = True) -> list[str]:
    """Raises if `workdir` holds a run that `config` would misread or train differently.

    Refused: another state shape, another meaning of the saved parameters (e.g.
    cm.sigma_data, the DDPM beta schedule) and, when `training`, another objective (e.g.
    cm.metric, the curriculum). See `guarded_fields`.

    Returns:
      The other fields that differ from the saved config (logged by the caller).
    """
    old = saved_dict(workdir)
    if old is None:
        return []
    new = config_to_dict(config)
    bad = diff(old, new, guarded_fields(old, training))
    if bad:
        fo, fn = _flatten(old), _flatten(new)
        lines = [f"  {k}: saved {fo.get(k, '<missing>')!r}, now {fn.get(k, '<missing>')!r}"
                 for k in bad]
        what = "model/state shape, parameterisation" + (" or loss" if training else "")
        raise IncompatibleWorkdirError(
            f"workdir {workdir!r} holds a run with a different {what}; nothing was changed "
            f"there. Use a new --workdir, or the saved values (e.g. --config.{bad[0]}="
            f"{fo.get(bad[0], '<missing>')}). Differences:\n" + "\n".join(lines))
    return diff(old, new)


def changes(old: dict, new: dict) -> dict[str, list]:
    """{flattened key: [saved value, new value]} of the fields that differ."""
    fo, fn = _flatten(old), _flatten(new)
    return {k: [fo.get(k), fn.get(k)] for k in diff(old, new)}


def record_changes(workdir: str, step: int, saved: dict, config: ml_collections.ConfigDict,
                   ) -> None:
    """Appends the fields a relaunch changed, and the step it resumed at, to
    `config_changes.jsonl` (config.json then holds the new values)."""
    line = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changed": changes(saved, config_to_dict(config))}
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = config_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, config_path(workdir))
