"""Frozen config dataclasses filled from Flower's kebab-case run config, each value parsed by its type.

A run or node config arrives as TOML values or as text (``--run-config 'key=value'``, a
SuperNode's ``--node-config``). Casting with the field's type is wrong for booleans:
``bool("false")`` is True, so an operator who writes ``'false'`` would turn a setting on.
:func:`parse_value` reads a boolean only from ``true``/``false`` (any case), a TOML boolean,
or 0/1, and refuses anything else in one line naming the key.
"""

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

Config = TypeVar("Config")

_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_bool(key: str, value: Any) -> bool:
    """``value`` of ``key`` as a boolean: True/False, 1/0, or the text true/false/1/0 in any case.

    Raises
    ------
    ValueError
        Naming ``key``, if the value is anything else ("yes", "off", 2, "").
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{key} must be true or false, got '{value}'.")


def parse_value(key: str, kind: type, value: Any) -> Any:
    """``value`` of ``key`` as ``kind`` (bool, int, float or str).

    Raises
    ------
    ValueError
        Naming ``key`` and the value, if it is not of that kind (a float for an int, say).
    """
    if kind is bool:
        return parse_bool(key, value)
    if kind is str:
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got '{value}'.")
    try:
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {'a whole number' if kind is int else 'a number'}, got '{value}'.") from None


def from_kebab_case(cls: type[Config], values: Mapping[str, Any], reader: str) -> Config:
    """Build ``cls`` from ``values``: field ``dp_epsilon`` reads key ``dp-epsilon``, parsed by its type.

    Raises
    ------
    KeyError
        If a field has no key, naming the key and ``reader`` (who needed it).
    ValueError
        If a value is not of its field's type (:func:`parse_value`).
    """
    kwargs = {}
    for field in fields(cls):
        key = field.name.replace("_", "-")
        if key not in values:
            raise KeyError(f"The run config has no '{key}' (needed by the {reader}).")
        kwargs[field.name] = parse_value(key, field.type, values[key])
    return cls(**kwargs)
