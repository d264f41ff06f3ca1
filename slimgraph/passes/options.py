"""Option values of passes: type checks, conversions from pipeline text, and formatting back.

Options are dataclass fields with ordinary annotations (``int``, ``float``, ``bool``,
``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``). These functions are
all the type system the pipeline grammar needs.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal


def literal(text: str) -> Any:
    """A bare word of pipeline text as a Python value: ``true``, ``none``, ``12``, ``1e-3`` or the word."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def convert(value: Any, hint: Any) -> Any:
    """Convert a parsed literal to the declared option type where the conversion is lossless."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:  # `none` for `str | None` is None, not the string "None"
            return value
        for member in args:
            converted = convert(value, member)
            if conforms(converted, member):
                return converted
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and not isinstance(value, str):
        return str(value)
    if origin is tuple and isinstance(value, list):
        member = args[0] if args else Any
        return tuple(convert(v, member) for v in value)
    return value


def conforms(value: Any, hint: Any) -> bool:
    """``value`` is acceptable for an option annotated ``hint`` (bools are not ints here)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, member) for member in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(v, args[0]) for v in value) if args else True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def describe_type(hint: Any) -> str:
    """``hint`` in words for error messages: ``one of 'int4', 'nf4'``, ``an int or None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is tuple:
        return f"a list of {getattr(args[0], '__name__', None) or describe_type(args[0])}" if args else "a list"
    if hint is type(None):
        return "None"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def format_value(value: Any) -> str:
    """``value`` as pipeline text that ``literal``/``convert`` read back to the same value."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and (not re.fullmatch(r"[\w.+\-]+", value) or literal(value) != value):
        quote = '"' if "'" in value else "'"  # quoted, so "none", "true" and "12" read back as strings;
        return f"{quote}{value}{quote}"      # as-is, not repr(): the grammar has no escapes
    return str(value)
