"""Values from text (YAML recipes, ``section.key=value`` overrides, command-line flags) converted to
the types their schema declares and checked against its declared ranges, before any work.

One mechanism for every schema: a dataclass's own annotations give the type (a tto config, the
recipe's ``DatasetSection``, ``transformers.TrainingArguments``), and a class-level table gives the
ranges (``bounds``: {field: Bound}; a tto config's ``positive_fields`` are ``> 0``). The type check
itself is huggingface_hub's strict-dataclass ``type_validator`` (what Transformers' own configs
use); it only checks, so a value is first converted the way text is meant:

* YAML 1.1 reads ``3e-3`` (no dot) as a string: a declared float takes a string that parses as
  one; an int becomes a float;
* a declared int takes an integral float or a string that parses as one (``1e3`` -> 1000);
* a declared bool takes the words true/false/yes/no/on/off (overrides keep words as text);
* a declared str takes an int (``run_name: 7``), not a float (``1.10`` would become ``1.1``).

Anything else is one line naming the key, the value and the expected type (:class:`TypedError`).
"""

from __future__ import annotations

import argparse
import math
import sys
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from huggingface_hub.dataclasses import type_validator

#: words a bool field accepts as text (case-insensitive)
BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


#: longest value representation a message shows (a pasted document is cut, not echoed)
SHOWN_CHARS = 60


def shown(value) -> str:
    """repr(value), cut to SHOWN_CHARS."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class TypedError(ValueError):
    """A value that does not have, or cannot be converted to, its declared type or range."""


@dataclass(frozen=True)
class Bound:
    """A numeric field's valid interval; an open end excludes its value, None is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below  # NaN holds no bound

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


#: the usual ranges
POSITIVE = Bound(low=0, low_open=True)
AT_LEAST_1 = Bound(low=1)
NON_NEGATIVE = Bound(low=0)
#: seeds numpy accepts
SEED = Bound(low=0, high=2**32 - 1)


def type_name(annotation) -> str:
    """'int', 'float | None', 'list[str]', 'IntervalStrategy | str', ... for messages."""
    members = _members(annotation)
    if len(members) > 1:
        return " | ".join(type_name(m) for m in members)
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return "None" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _members(annotation) -> tuple:
    """The alternatives of a union (the annotation itself otherwise)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _matches(value, annotation) -> bool:
    try:
        type_validator("value", value, annotation)
    except TypeError:
        return False
    return True


def _to_scalar(value, target: type):
    """`value` as `target` (float, int, bool, str) the way text means it, or None when it is not one."""
    if isinstance(value, bool):
        return None  # a YAML boolean is never a number or a text
    if target is float and isinstance(value, (int, str)):
        try:
            return float(value)
        except (ValueError, OverflowError):
            return None
    if target is int and isinstance(value, (float, str)):
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                value = _to_scalar(value, float)  # "1e3"
        return int(value) if isinstance(value, float) and math.isfinite(value) and value == int(value) else None
    if target is bool and isinstance(value, str):
        return BOOL_WORDS.get(value.strip().lower())
    if target is str and isinstance(value, int):
        return str(value)
    return None


def convert(key: str, value, annotation):
    """`value` as `annotation` (recursing into lists and dicts), or TypedError naming `key`."""
    if annotation is Any or _nested(annotation) or _matches(value, annotation) and not _non_finite(value):
        return value
    for member in _members(annotation):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if origin is list and isinstance(value, list) and args:
            try:
                return [convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
            except TypedError:
                continue
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            try:
                return {k: convert(f"{key}.{k}", v, args[1]) for k, v in value.items()}
            except TypedError:
                continue
        if member in (float, int, bool, str):
            converted = _to_scalar(value, member)
            if converted is not None and not _non_finite(converted):
                return converted
    finite = " finite" if _non_finite(value) and float in _members(annotation) else ""
    hint = " (YAML reads yes/no/on/off as booleans: quote the word)" if isinstance(value, bool) else ""
    raise TypedError(f"{key}={shown(value)}: expected{finite} {type_name(annotation)}{hint}")


def _nested(annotation) -> bool:
    """Whether `annotation` holds a dataclass (a nested section, converted by its own schema when built)."""
    return is_dataclass(annotation) or any(_nested(a) for a in typing.get_args(annotation))


def _non_finite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_bound(key: str, value, bound: Bound | None, given=None) -> None:
    """TypedError unless a numeric `value` lies in `bound` (None and non-numbers are not checked);
    the message shows `given`, the value as written, when there is one."""
    if bound is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not bound.holds(value):
        raise TypedError(f"{key}={shown(value if given is None else given)}: must be {bound}")


def annotations(cls) -> dict[str, Any]:
    """Every dataclass field of `cls` with its annotation, resolved in the module of the class that
    declares it (an annotation that cannot be resolved there is not checked: Any)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        namespace = vars(sys.modules[klass.__module__])
        for name, ann in vars(klass).get("__annotations__", {}).items():
            try:
                hints[name] = eval(ann, namespace) if isinstance(ann, str) else ann  # the annotation text of a field
            except Exception:  # noqa: BLE001 (e.g. a name imported only for type checkers)
                hints[name] = Any
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


def bounds(cls) -> dict[str, Bound]:
    """The ranges `cls` declares: its ``bounds`` table, and ``positive_fields`` (> 0) of tto configs."""
    return {**{name: POSITIVE for name in getattr(cls, "positive_fields", ())}, **getattr(cls, "bounds", {})}


def convert_fields(cls, values: dict, section: str, extra_bounds: dict[str, Bound] | None = None) -> dict:
    """`values` (a mapping of `cls`'s field names) converted and range-checked; keys that are not
    fields of `cls` are returned unchanged (the caller reports unknown keys)."""
    declared = annotations(cls)
    ranges = {**bounds(cls), **(extra_bounds or {})}
    out = {}
    for key, value in values.items():
        if key in declared:
            given, value = value, convert(f"{section}.{key}", value, declared[key])
            check_bound(f"{section}.{key}", value, ranges.get(key), given)
        out[key] = value
    return out


def flag(kind: type, bound: Bound | None = None):
    """An argparse ``type=`` converting a flag's text to `kind` with the same rules, and checking `bound`."""

    def parse(text: str):
        try:
            value = convert("value", text, kind)
            check_bound("value", value, bound)
        except TypedError:
            raise argparse.ArgumentTypeError(f"{shown(text)}: expected {type_name(kind)}"
                                             + (f" {bound}" if bound else "")) from None
        return value

    parse.__name__ = type_name(kind)  # argparse names the type in its messages
    return parse
