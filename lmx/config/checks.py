"""The one-sentence errors every config section raises -- `ConfigError` names the field and
its valid range (`Invalid config: `train.steps` is 0; it must be a positive integer.`) --
and `_section_from_dict`, which builds a validated section from a plain dict."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints


class ConfigError(ValueError):
  """An invalid configuration value; the message names the field and the valid range."""


def _fail(field: str, msg: str) -> None:
  raise ConfigError(f"Invalid config: `{field}` {msg}.")


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    _fail(field, f"is {value!r}; it must be one of {', '.join(map(repr, allowed))}")


def _positive(field: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(field, f"is {value!r}; it must be a positive integer")


def _nonneg_float(field: str, value: Any) -> None:
  if not isinstance(value, (int, float)) or value < 0:
    _fail(field, f"is {value!r}; it must be a number >= 0")


def _section_from_dict(name: str, cls: type, values: dict[str, Any]):
  hints = get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    _fail(f"{name}.{unknown[0]}", f"is not a known key; valid keys of `{name}` are "
          f"{', '.join(sorted(known))}")
  out = {}
  for k, v in values.items():
    t = hints[k]
    if dataclasses.is_dataclass(t) and isinstance(t, type):  # a nested section (model.moe)
      if isinstance(v, t):
        out[k] = v
        continue
      if not isinstance(v, dict):
        _fail(f"{name}.{k}", f"is {v!r}; it must be a section of settings")
      out[k] = _section_from_dict(f"{name}.{k}", t, v)
      continue
    if t is float and isinstance(v, int) and not isinstance(v, bool):
      v = float(v)
    if t is int and isinstance(v, float) and v.is_integer():
      v = int(v)
    if t in (int, float, str, bool) and not isinstance(v, t):
      _fail(f"{name}.{k}", f"is {v!r} of type {type(v).__name__}; it must be a {t.__name__}")
    if t is int and isinstance(v, bool):
      _fail(f"{name}.{k}", f"is {v!r}; it must be an int")
    out[k] = v
  return cls(**out).validate()
