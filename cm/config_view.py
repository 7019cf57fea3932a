"""Typed, frozen views of one config section: `view(CMConfig, config.cm, total_steps=...)`.

A view is built from the section itself, so a field lives in `configs/base.py` (its
value and comment) and in the dataclass (its type and checks); a field that is in one
and not the other is an error naming it, instead of a silently ignored setting.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def view(cls: type[T], section: Mapping[str, Any], **extra: Any) -> T:
    """`cls(**section, **extra)`, refusing unknown and missing fields by name.

    Args:
      cls: a dataclass whose fields are exactly the section's keys plus `extra`'s.
      section: a config section (`config.cm`, a `ConfigDict`, or a plain mapping).
      extra: values from outside the section (e.g. `total_steps` from `training`).
    """
    values = {**dict(section), **extra}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
    if unknown or missing:
        parts = [f"unknown {unknown}" if unknown else "", f"missing {missing}" if missing else ""]
        raise ValueError(f"config section for {cls.__name__}: "
                         + "; ".join(p for p in parts if p))
    return cls(**values)
