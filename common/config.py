"""Frozen config dataclasses filled from Flower's kebab-case run config."""

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

Config = TypeVar("Config")


def from_kebab_case(cls: type[Config], values: Mapping[str, Any], reader: str) -> Config:
    """Build ``cls`` from ``values``: field ``dp_epsilon`` reads key ``dp-epsilon``, cast to its type.

    Raises
    ------
    KeyError
        If a field has no key, naming the key and ``reader`` (who needed it).
    """
    kwargs = {}
    for field in fields(cls):
        key = field.name.replace("_", "-")
        if key not in values:
            raise KeyError(f"The run config has no '{key}' (needed by the {reader}).")
        kwargs[field.name] = field.type(values[key])
    return cls(**kwargs)
