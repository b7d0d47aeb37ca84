"""Each attack's own typed parameters (a frozen dataclass per attack) and how they are read.

An attack class names its parameter type in `params_type`; a run config sets them as
`attack.params: {name: {field: value}}`, and `create_attack(name, config, params)`
checks such a mapping against that type here (unknown field, wrong type: ValueError
naming the attack and the field).

Some parameters are the attack's view of an AttackConfig field (dlg's `lr` is
AttackConfig.lr, ig's `lr` is AttackConfig.ig_lr): they are declared with api.shared,
take their default from the config the attack is created with, and a value set for
one attack overrides the config for that attack only. The others (analytic's CG
tolerance, spear's search settings) exist on the parameter type alone.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Kept free of attacker.api (which imports this module): configs are typed Any here.
AttackConfig = Any
CONFIG_KEY = "config"  # field metadata: the AttackConfig field a shared parameter stands for


@dataclass(frozen=True)
class NoParams:
    """The parameter type of an attack that has none of its own."""


def shared_fields(params_type: type) -> dict[str, str]:
    """Parameter name -> the AttackConfig field it stands for, for the shared parameters."""
    return {f.name: f.metadata[CONFIG_KEY] for f in dataclasses.fields(params_type)
            if CONFIG_KEY in f.metadata}


def from_config(params_type: type, config: AttackConfig) -> Any:
    """The parameters an attack has under `config` when none are set for it."""
    return params_type(**{name: getattr(config, key) for name, key in shared_fields(params_type).items()})


def apply_shared(config: AttackConfig, params: Any) -> AttackConfig:
    """`config` with the shared parameters' values (ValueError from AttackConfig if one is bad)."""
    changes = {key: getattr(params, name) for name, key in shared_fields(type(params)).items()}
    if all(getattr(config, key) == value for key, value in changes.items()):
        return config
    return dataclasses.replace(config, **changes)


def parse_params(name: str, params_type: type, raw: Mapping[str, Any], config: AttackConfig) -> Any:
    """Attack `name`'s parameters: `config`'s, with the fields of `raw` set.

    Raises:
        ValueError: a field `params_type` lacks, a value of the wrong type, or one the
            parameter type or AttackConfig refuses; the message names attack and field.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"attack.params.{name} must be a mapping of fields, got {raw!r}")  # noqa: TRY004 (a config error, caught as one)
    hints = typing.get_type_hints(params_type)
    known = sorted(hints)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            have = ", ".join(known) if known else "none"
            raise ValueError(f"attack '{name}' has no parameter '{key}' (known: {have})")
        values[key] = _typed(f"attack.params.{name}.{key}", hints[key], value)
    try:
        params = dataclasses.replace(from_config(params_type, config), **values)
        apply_shared(config, params)  # the shared ones are checked where they are defined
    except ValueError as exc:
        raise ValueError(f"attack.params.{name}: {exc}") from None
    return params


def _typed(where: str, annotation: Any, value: Any) -> Any:
    """`value` as `annotation` (an int for a float field becomes a float); ValueError if it is not."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{where} may not be none")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            number = _number(value)
            if number is not None:
                return number
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join(_WORDS.get(o, getattr(o, "__name__", str(o))) for o in options)
    raise ValueError(f"{where} must be {wanted}, got {value!r}")


_WORDS = {float: "a number", int: "an integer", str: "a string", bool: "true or false", type(None): "none"}


def _number(value: Any) -> float | None:
    # YAML reads 1e-4 (no dot) as a string: a numeric string is taken for the number.
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) or value.strip().lower() in ("inf", "-inf") else None
    return None


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


def describe(params_type: type) -> dict[str, Any]:
    """Field -> default of a parameter type (what `attack.params.NAME` may set)."""
    return {f.name: f.default for f in dataclasses.fields(params_type)}
