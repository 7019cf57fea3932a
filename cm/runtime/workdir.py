"""The workdir as the resume key: its saved config and compatibility checks.

`config.json` records the config of a run's latest launch; `config_changes.jsonl` the
fields each relaunch changed, with the step it resumed at. A launch that would misread
the saved state (another shape or parameterisation) or train it towards another
objective fails before anything is written.
"""

import json
import os
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from configs import base

# guarded(saved config dict, training) -> the flattened fields a relaunch must keep
# (`cm.objectives.guarded_fields`: the state's shapes and what the objective says).
GuardedFn = Callable[[dict, bool], tuple[str, ...]]


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


def config_to_dict(config: Any) -> dict:
    """A config (a `ConfigDict`, or `cm.config.Config` with its resolved values) as a
    JSON-ready dict of sections."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config.to_dict()))


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
    merged = config_to_dict(base.get_config())
    _merge(merged, saved)
    return merged


def check_compatible(workdir: str, config: Any, guarded: GuardedFn,
                     training: bool = True) -> list[str]:
    """Raises if `workdir` holds a run that `config` would misread or train differently.

    Refused: a change of the fields `guarded(saved, training)` names: another state
    shape, another meaning of the saved parameters (e.g. cm.sigma_data, the DDPM beta
    schedule) and, when `training`, another objective (e.g. cm.metric, the curriculum).

    Returns:
      The other fields that differ from the saved config (logged by the caller).
    """
    old = saved_dict(workdir)
    if old is None:
        return []
    new = config_to_dict(config)
    bad = diff(old, new, guarded(old, training))
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


def record_changes(workdir: str, step: int, saved: dict, config: Any) -> None:
    """Appends the fields a relaunch changed, and the step it resumed at, to
    `config_changes.jsonl` (config.json then holds the new values)."""
    line = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changed": changes(saved, config_to_dict(config))}
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def write_config(workdir: str, config: Any) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = config_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, config_path(workdir))
