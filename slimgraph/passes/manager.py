"""Passes, pipelines and the pass registry.

A pass is a frozen dataclass whose fields are its options::

    @register_pass
    @dataclass(frozen=True)
    class Cleanup(Pass):
        name: ClassVar[str] = "cleanup"
        preserves: ClassVar[tuple[str, ...]] = ("shapes",)
        remove_dropout: bool = True

        def run(self, gm, ctx) -> PassResult: ...

Options are type-checked on construction. A pipeline is a list of passes with a
text form that round-trips: ``Pipeline.parse("cleanup, quantize(format=int4, group_size=128)")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from slimgraph.errors import PipelineError
from slimgraph.ir.analyses import ANALYSES, AnalysisManager
from slimgraph.passes.options import conforms, convert, describe_type, format_value, literal

PASS_REGISTRY: dict[str, type[Pass]] = {}


@dataclass
class PassResult:
    """What a pass did. ``bytes_saved``/``flops_saved`` are filled in by the pipeline, measured."""

    matched: int = 0
    rewritten: int = 0
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    bytes_saved: int = 0
    flops_saved: int = 0

    @property
    def changed(self) -> bool:
        return self.rewritten > 0


@dataclass
class PassContext:
    """What a pass may read besides the graph: inputs, calibration data, analyses."""

    analyses: AnalysisManager
    example_inputs: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)
    tolerance: float | None = None
    reference_outputs: Any = None

    def analysis(self, name: str) -> Any:
        return self.analyses.get(name)


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses; their fields are the options."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if isinstance(value, list):  # Python callers write lists; options hold tuples (hashable)
                value = convert(value, hints[option.name])
                object.__setattr__(self, option.name, value)
            if not conforms(value, hints[option.name]):
                raise PipelineError(
                    f"pass '{self.name}': option {option.name}={value!r} must be "
                    f"{describe_type(hints[option.name])}"
                )
        self.validate()

    def validate(self) -> None:
        """Range checks beyond types; raise ``PipelineError`` naming the option."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        changed = {k: v for k, v in self.options().items()
                   if v != _default_of(type(self), k)}
        if not changed:
            return self.name
        return f"{self.name}({', '.join(f'{k}={format_value(v)}' for k, v in changed.items())})"


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by ``cls.name`` in pipelines."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty `name` class attribute")
    unknown = [a for a in (*cls.requires, *cls.preserves) if a not in ANALYSES]
    if unknown:
        raise TypeError(f"{cls.__qualname__} names unknown analyses {unknown}; known: {sorted(ANALYSES)}")
    existing = PASS_REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}; "
                        "choose another name")
    PASS_REGISTRY[cls.name] = cls
    return cls


def make_pass(name: str, **options: Any) -> Pass:
    """Instantiate a registered pass, with a helpful error for unknown names and options."""
    if name not in PASS_REGISTRY:
        raise PipelineError(f"unknown pass '{name}'. {choices_hint('passes', name, PASS_REGISTRY)}")
    cls = PASS_REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    for option in options:
        if option not in valid:
            raise PipelineError(f"pass '{name}' has no option '{option}'. {choices_hint('options', option, valid)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in options
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PipelineError(f"pass '{name}' needs option(s) {', '.join(missing)}, e.g. "
                            f"'{name}({missing[0]}=...)'")
    return cls(**options)


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes. ``str(pipeline)`` gives the text form ``parse`` reads."""

    passes: tuple[Pass, ...]

    @classmethod
    def coerce(cls, spec: Pipeline | str | Pass | Iterable[Pass | str]) -> Pipeline:
        """Accept a Pipeline, its text form, one pass, or a list of passes and pass texts."""
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, str):
            return cls.parse(spec)
        if isinstance(spec, Pass):
            return cls((spec,))
        passes: list[Pass] = []
        for item in spec:
            passes.extend(cls.coerce(item).passes)
        return cls(tuple(passes))

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Parse ``"cleanup, quantize(format=int4, group_size=128)"``.

        Values are numbers, ``true``/``false``/``none``, bare words, quoted strings,
        or ``[a, b]`` lists; each is converted to the option's declared type.
        """
        return cls(tuple(_Parser(text).pipeline()))

    def __str__(self) -> str:
        return ", ".join(str(p) for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)


# ---- the text grammar ---------------------------------------------------------------------------
#   pipeline := pass ("," pass)*        pass := NAME ["(" [option ("," option)*] ")"]
#   option := NAME "=" value            value := NUMBER | WORD | STRING | "[" [value ("," value)*] "]"

_TOKEN = re.compile(r"\s*(?:(?P<string>'[^']*'|\"[^\"]*\")|(?P<punct>[(),=\[\]])|(?P<word>[^\s(),=\[\]'\"]+))")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            if not match:
                self._fail(position, "unexpected character")
            kind = match.lastgroup
            self.tokens.append((kind, match[kind], match.start(kind)))
            position = match.end()
        self.index = 0

    def pipeline(self) -> list[Pass]:
        if not self.tokens:
            raise PipelineError("empty pipeline: name at least one pass, e.g. 'cleanup'")
        passes = [self._pass()]
        while self._accept(","):
            passes.append(self._pass())
        if self.index < len(self.tokens):
            self._fail(self.tokens[self.index][2], "expected ',' between passes")
        return passes

    def _pass(self) -> Pass:
        name, position = self._expect_word("a pass name")
        options: dict[str, Any] = {}
        if self._accept("("):
            while not self._accept(")"):
                if options:
                    self._expect(",")
                option, option_position = self._expect_word("an option name")
                if option in options:
                    self._fail(option_position, f"option '{option}' is given twice")
                self._expect("=")
                options[option] = self._value()
        if name not in PASS_REGISTRY:
            self._fail(position, f"unknown pass '{name}'. {choices_hint('passes', name, PASS_REGISTRY)}")
        hints = typing.get_type_hints(PASS_REGISTRY[name])
        return make_pass(name, **{k: convert(v, hints.get(k, Any)) for k, v in options.items()})

    def _value(self) -> Any:
        if self._accept("["):
            items = []
            while not self._accept("]"):
                if items:
                    self._expect(",")
                items.append(self._value())
            return items
        kind, text, position = self._next("a value")
        if kind == "string":
            return text[1:-1]
        if kind != "word":
            self._fail(position, f"expected a value, found '{text}'")
        return literal(text)

    def _next(self, wanted: str) -> tuple[str, str, int]:
        if self.index >= len(self.tokens):
            self._fail(len(self.text), f"expected {wanted}, found the end of the text")
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _accept(self, punct: str) -> bool:
        if self.index < len(self.tokens) and self.tokens[self.index][:2] == ("punct", punct):
            self.index += 1
            return True
        return False

    def _expect(self, punct: str) -> None:
        kind, text, position = self._next(f"'{punct}'")
        if (kind, text) != ("punct", punct):
            self._fail(position, f"expected '{punct}', found '{text}'")

    def _expect_word(self, wanted: str) -> tuple[str, int]:
        kind, text, position = self._next(wanted)
        if kind != "word":
            self._fail(position, f"expected {wanted}, found '{text}'")
        return text, position

    def _fail(self, position: int, message: str) -> typing.NoReturn:
        raise PipelineError(f"{message}\n  {self.text}\n  {' ' * position}^")


def _default_of(cls: type[Pass], option: str) -> Any:
    spec = next(f for f in dataclasses.fields(cls) if f.name == option)
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def choices_hint(kind: str, wrong: str, valid: Sequence[str] | dict) -> str:
    """``Valid <kind>: a, b. Did you mean 'a'?`` for an error about ``wrong``."""
    names = sorted(valid)
    close = difflib.get_close_matches(wrong, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Valid {kind}: {', '.join(names)}.{hint}"
