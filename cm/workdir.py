"""The workdir as the resume key: its saved config and compatibility checks.

`config.json` records the config a run was started with. A new run in a workdir that
holds a run of a different model shape fails before anything is written.
"""

import json
import os

import ml_collections

# Fields that decide the shapes of the saved state: a change means the checkpoints
# cannot be restored into the new run.
SHAPE_FIELDS = ("model", "data.image_size", "data.num_channels", "cm.loss",
                "training.ema_rates", "optim.optimizer", "optim.grad_clip",
                "optim.weight_decay")
# Fields that define the loss: changing them on resume would silently train a different
# objective from the same checkpoint (e.g. the CIFAR-10 configs' switch to LPIPS).
LOSS_FIELDS = ("cm.metric",)
LPIPS_FIELDS = ("cm.lpips_pool", "cm.lpips_resize")  # compared when the saved run used LPIPS


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
    """The config a run in `workdir` was started with."""
    path = config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
    with open(path) as f:
        d = json.load(f)

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    # Fields added to the project after the run was started take their defaults.
    from configs import base

    merged = config_to_dict(base.get_config())
    _merge(merged, d)
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


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """Raises if `workdir` holds a run whose state shapes or loss differ from `config`'s.

    Returns:
      The other (harmless) fields that differ from the saved config.
    """
    path = config_path(workdir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    new = config_to_dict(config)
    fields = SHAPE_FIELDS + LOSS_FIELDS
    if _flatten(old).get("cm.metric") == "lpips":
        fields += LPIPS_FIELDS
    bad = diff(old, new, fields)
    if bad:
        fo, fn = _flatten(old), _flatten(new)
        lines = [f"  {k}: saved {fo.get(k, '<missing>')!r}, now {fn.get(k, '<missing>')!r}"
                 for k in bad]
        raise IncompatibleWorkdirError(
            f"workdir {workdir!r} holds a run with a different model/state shape or loss; "
            "nothing was changed there. Use a new --workdir, or the saved values (e.g. "
            "--config.cm.metric=<saved>). Differences:\n"
            + "\n".join(lines))
    return diff(old, new)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = config_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, config_path(workdir))
