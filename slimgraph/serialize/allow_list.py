"""What a saved graph may call and name; ``save`` and ``load`` check the same rules.

A loaded graph runs whatever its nodes call, so nothing is resolved by importing the
name the file gives. Operators resolve only when this process has already registered
them in ``torch.ops`` (``aten``, ``prims``, ``slimgraph``…) and none of their arguments
names a file; other calls resolve from a fixed table of ``operator`` functions,
``getattr``, torch's symbolic-size functions and the torch functions that are spellings
of ATen operators. Names that torch.fx pastes into generated source must be identifiers.
"""

from __future__ import annotations

import functools
import importlib
import keyword
import operator
import pkgutil
import re
import types
from collections.abc import Callable
from typing import Any

import torch

ATTRIBUTE_PATH = re.compile(r"\w+(\.\w+)*", re.ASCII)
_IDENTIFIER_PATTERN = re.compile(r"(?!\d)\w+", re.ASCII)
# Operators with a string argument naming a file (aten::save, aten::from_file): a graph could read
# or overwrite any file with them.
_FILE_ARGUMENTS = {"filename", "file", "path", "filepath"}
_OPERATOR_FUNCTIONS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos",
                       "abs", "invert", "not_", "and_", "or_", "xor", "lshift", "rshift", "eq", "ne", "lt",
                       "le", "gt", "ge", "getitem", "is_", "is_not", "contains")
_SIZE_FUNCTIONS = ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt")
# Tensor methods that take Python callables or reach outside the tensor.
_UNSAFE_METHODS = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
                   "backward", "share_memory_", "pin_memory", "record_stream"}


def op_problem(namespace: str, name: str, overload: str | None) -> str | None:
    """Why ``namespace::name.overload`` may not be called by a loaded graph, or ``None``."""
    spelled = f"{namespace}::{name}" + (f".{overload}" if overload else "")
    if not all(_IDENTIFIER_PATTERN.fullmatch(part) for part in (namespace, name, overload or "default")):
        return f"{spelled!r} is not an operator name"
    schemas = _schemas(namespace, name)
    if not schemas and namespace == "slimgraph":
        _import_kernel_modules()
        schemas = _schemas(namespace, name)
    if overload is not None:
        schemas = [schema for schema in schemas if (schema.overload_name or "default") == overload]
    if not schemas or hasattr(type(torch.ops), namespace):
        return (f"operator {spelled} is not registered in this process: upgrade slimgraph and torch to "
                "the versions that saved the file, or import the library that defines the operator first")
    if any(a.name in _FILE_ARGUMENTS and "str" in str(a.type) for schema in schemas for a in schema.arguments):
        return f"operator {spelled} reads or writes files, which a saved graph may not do"
    return None


def arguments_problem(op: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why ``op(*args, **kwargs)`` does not fit ``op``'s schema (count and names only), or ``None``.

    A file saved before an operator's signature changed would otherwise load and fail, or
    worse compute, with its arguments shifted.
    """
    parameters = op._schema.arguments
    names = [p.name for p in parameters]
    given = set(names[: len(args)]) | set(kwargs)
    missing = [p.name for p in parameters if p.name not in given and not p.has_default_value()]
    unknown = sorted(set(kwargs) - set(names))
    if len(args) > len(parameters) or missing or unknown:
        return (f"its {len(args)} arguments{' and keywords ' + str(unknown) if unknown else ''} do not fit "
                f"this process's schema {op._schema}")
    return None


@functools.cache
def python_functions() -> dict[str, Callable[..., Any]]:
    """Name → function for every non-operator call a saved graph may make.

    ``operator`` functions and ``getattr`` (symbolic sizes, tuple outputs, ``x.shape``);
    torch's symbolic-size functions; and the torch functions ``symbolic_trace`` records
    (``torch.relu``, ``F.linear``, ``torch.einsum``…), admitted only when implemented in C
    or in ``torch.functional`` / ``torch.nn.functional`` and named like an ATen operator
    that touches no file.
    """
    table: dict[str, Callable[..., Any]] = {f"operator.{n}": getattr(operator, n) for n in _OPERATOR_FUNCTIONS}
    table["builtins.getattr"] = getattr
    table.update({f"torch.{n}": getattr(torch, n) for n in _SIZE_FUNCTIONS if hasattr(torch, n)})
    aten = {s.name.removeprefix("aten::") for s in torch._C._jit_get_all_schemas() if s.name.startswith("aten::")}
    for module in (torch, torch.nn.functional, torch._C._nn, torch.special, torch.linalg, torch.fft):
        for name in sorted(aten & set(dir(module))):
            function = getattr(module, name)
            in_c = isinstance(function, types.BuiltinFunctionType)
            in_functional = getattr(function, "__module__", None) in ("torch.functional", "torch.nn.functional")
            if not name.startswith("_") and (in_c or in_functional) and op_problem("aten", name, None) is None:
                table.setdefault(f"{module.__name__}.{name}", function)
    return table


@functools.cache
def python_function_names() -> dict[int, str]:
    """``id(function)`` → the name ``python_functions`` gives it (the first, when it has several)."""
    names: dict[int, str] = {}
    for name, function in python_functions().items():
        names.setdefault(id(function), name)
    return names


@functools.cache
def tensor_methods() -> frozenset[str]:
    """The ``torch.Tensor`` methods a ``call_method`` node may call."""
    return frozenset(name for name in dir(torch.Tensor) if not name.startswith("_")
                     and callable(getattr(torch.Tensor, name)) and name not in _UNSAFE_METHODS)


def is_identifier(name: Any) -> bool:
    return isinstance(name, str) and bool(_IDENTIFIER_PATTERN.fullmatch(name)) and not keyword.iskeyword(name)


def is_input_name(name: str) -> bool:
    """``x``, ``*args`` or ``**kwargs``: how fx spells a placeholder's target."""
    return is_identifier(name[2:] if name.startswith("**") else name[1:] if name.startswith("*") else name)


def public_attribute(name: Any) -> bool:
    return is_identifier(name) and not name.startswith("_")


def safe_class_name(name: str) -> str:
    """The class name of a rebuilt ``GraphModule``: fx pastes it into generated source."""
    return name if is_identifier(name) else "GraphModule"


def _schemas(namespace: str, name: str) -> list[Any]:
    return list(torch._C._jit_get_schemas_for_operator(f"{namespace}::{name}"))


@functools.cache
def _import_kernel_modules() -> None:
    """Register every ``slimgraph::`` operator: import each module of our own kernels package."""
    import slimgraph.kernels as kernels

    for module in pkgutil.iter_modules(kernels.__path__):
        try:
            importlib.import_module(f"{kernels.__name__}.{module.name}")
        except ImportError:  # an optional dependency of one format; its ops stay unknown
            continue
