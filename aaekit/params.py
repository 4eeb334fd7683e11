"""Declared parameters: what a recipe key may hold, checked before anything is built."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()

_PLURAL_WORDS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


@dataclass(frozen=True)
class Param:
    """One parameter of a component or of the recipe's core tables.

    ``type`` is bool, int, float, str or list (with ``item`` the type of list items); a tuple of these
    accepts any of them. ``min``/``max`` bound numbers (and list items); ``choices`` bounds strings.
    """

    type: Any
    default: Any = REQUIRED
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    item: Any = None
    min_len: int | None = None
    # A rule beyond type and bounds: called with the coerced value, returns a problem (the text after
    # "expected ...", e.g. 'a fraction in (0, 1]') or None.
    check: Callable[[Any], str | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        words = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)
        if list in types and self.item is not None:
            words = words.replace(
                "a list", f"a list of {_PLURAL_WORDS.get(self.item, self.item.__name__ + 's')}"
            )
        if self.choices:
            words = "one of " + ", ".join(repr(c) for c in self.choices)
        bounds = []
        if self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        return words + (" " + " and ".join(bounds) if bounds else "")

    def resolve(self, value: Any) -> tuple[Any, str | None]:
        """Return (value coerced to the declared type, problem or None)."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        value = unwrap_override(value, types)
        coerced = _coerce(value, types)
        if coerced is _BAD:
            return value, f"expected {self.describe()}, got {_show(value)}"
        if isinstance(coerced, list):
            if self.min_len is not None and len(coerced) < self.min_len:
                return value, f"expected at least {self.min_len} item(s), got {_show(value)}"
            if self.item is not None:
                items = [_coerce(v, (self.item,)) for v in coerced]
                if any(v is _BAD for v in items):
                    return value, f"expected {self.describe()}, got {_show(value)}"
                coerced = items
            for v in coerced:
                problem = self._bounds(v)
                if problem:
                    return value, problem
            return coerced, None
        if self.choices is not None and coerced not in self.choices:
            hint = did_you_mean(str(coerced), [str(c) for c in self.choices])
            return value, f"expected {self.describe()}, got {_show(value)}{hint}"
        problem = self._bounds(coerced) or (self.check(coerced) if self.check is not None else None)
        return coerced, problem

    def _bounds(self, v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        # nan passes every comparison, inf every lower bound
        if isinstance(v, float) and not math.isfinite(v):
            return f"expected a finite number ({self.describe()}), got {_show(v)}"
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            return f"expected {self.describe()}, got {_show(v)}"
        return None


_BAD = object()


def _coerce(value: Any, types: tuple) -> Any:
    for t in types:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if not (int in types and isinstance(value, int)) else value
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, list):
            return list(value)
    return _BAD


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    return str(value)


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class ParamSet:
    """Named Params, e.g. the keys of one recipe table."""

    params: dict[str, Param] = field(default_factory=dict)

    def check(self, values: dict, where: str) -> tuple[dict, list[str]]:
        """Check ``values`` against the declared params; fill defaults. ``where`` prefixes each key."""
        problems: list[str] = []
        resolved: dict = {}
        for key, value in values.items():
            param = self.params.get(key)
            if param is None:
                known = ", ".join(sorted(self.params)) or "none"
                problems.append(
                    f"{where}{key}: unknown key{did_you_mean(key, self.params)}; known keys here: {known}"
                )
                continue
            coerced, problem = param.resolve(value)
            if problem:
                problems.append(f"{where}{key}: {problem}")
            else:
                resolved[key] = coerced
        for key, param in self.params.items():
            if key not in values:
                if param.required:
                    problems.append(
                        f"{where}{key}: missing; expected {param.describe()}. {param.help}".rstrip()
                    )
                else:
                    resolved[key] = param.default
        return resolved, problems


class RawOverride(str):
    """A command-line override ``key=value``: typed like the recipe once the declared type is known."""

    def __new__(cls, raw: str, parsed: Any):
        obj = super().__new__(cls, raw)
        obj.parsed = parsed
        return obj


def unwrap_override(value: Any, types: tuple) -> Any:
    if not isinstance(value, RawOverride):
        return value
    if isinstance(value.parsed, str):  # quoted on the command line ("gaussian") or unparsable as TOML
        return value.parsed
    if str in types and _coerce(value.parsed, tuple(t for t in types if t is not str)) is _BAD:
        return str(value)
    return value.parsed
