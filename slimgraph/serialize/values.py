"""What a node holds, in JSON: its arguments, and the metadata the dump tool reads.

Arguments are JSON where JSON suffices; what it lacks is a one-key tagged object:
``{"node": "linear_1"}``, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``,
``{"slice": [start, stop, step]}``, ``{"float": "inf"}``, ``{"dtype": "float16"}``,
``{"layout": ...}``, ``{"memory_format": ...}``, ``{"device": "cuda:0"}``,
``{"ellipsis": null}``. Tensors are never arguments: they are attributes, stored
in the safetensors part of the file under the dtype names of ``DTYPES``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from slimgraph.errors import SerializationError

NOT_A_CONSTANT = object()
_DEVICE = re.compile(r"[a-z_]+(:\d+)?")
_TEXT_META = ("stack_trace", "slimgraph_replaces")


def encode_value(value: Any, where: Callable[[], str]) -> Any:
    """JSON for an FX argument: node references and torch constants become one-key tagged objects."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str | int) for k in value):
        return {"dict": [[k, encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    for tag, table in _CONSTANT_TABLES.items():
        if isinstance(value, _CONSTANT_TYPES[tag]) and value in table.values():
            return {tag: next(name for name, v in table.items() if v == value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": None}
    raise SerializationError(f"{where()} has an argument {value!r} of type {type(value).__name__}, which "
                             "cannot be saved (tensors must be attributes, read with get_attr)")


def decode_constant(tag: str, payload: Any) -> Any:
    """The constant of a tagged object other than node, tuple, dict and slice, or ``NOT_A_CONSTANT``."""
    if tag in _CONSTANT_TABLES:
        return _CONSTANT_TABLES[tag].get(payload, NOT_A_CONSTANT) if isinstance(payload, str) else NOT_A_CONSTANT
    if tag == "float" and payload in ("inf", "-inf", "nan"):
        return float(payload)
    if tag == "device" and isinstance(payload, str) and _DEVICE.fullmatch(payload):
        try:
            return torch.device(payload)
        except RuntimeError:
            return NOT_A_CONSTANT
    if tag == "ellipsis" and payload is None:
        return Ellipsis
    return NOT_A_CONSTANT


def encode_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata the dump tool and the analyses read; fake tensors are not saved."""
    kept = {key: meta[key] for key in _TEXT_META if isinstance(meta.get(key), str)}
    if isinstance(meta.get("torch_fn"), tuple) and all(isinstance(s, str) for s in meta["torch_fn"]):
        kept["torch_fn"] = list(meta["torch_fn"])
    stack = meta.get("nn_module_stack")
    if isinstance(stack, dict):
        kept["nn_module_stack"] = [[str(key), str(entry[0]), _type_name(entry[1])] for key, entry in stack.items()
                                   if isinstance(entry, tuple) and len(entry) == 2]
    return kept


def decode_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``encode_meta`` undone; entries of another shape are dropped."""
    kept = {key: meta[key] for key in _TEXT_META if isinstance(meta.get(key), str)}
    if _is_list_of(meta.get("torch_fn"), str):
        kept["torch_fn"] = tuple(meta["torch_fn"])
    stack = meta.get("nn_module_stack")
    if isinstance(stack, list) and all(_is_list_of(e, str) and len(e) == 3 for e in stack):
        kept["nn_module_stack"] = {key: (path, kind) for key, path, kind in stack}
    return kept


def qualified_name(value: Any) -> str:
    """``module.QualName`` of a class or function, for the file and for messages."""
    module = getattr(value, "__module__", None) or ""
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or repr(value)
    return f"{module}.{name}" if module else name


def _type_name(kind: Any) -> str:
    return kind if isinstance(kind, str) else qualified_name(kind)


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _torch_constants(kind: type) -> dict[str, Any]:
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


DTYPES: dict[str, torch.dtype] = _torch_constants(torch.dtype)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# What safetensors stores natively; other dtypes (float8_e8m0fnu, float4_e2m1fn_x2…) go as raw bytes.
SAFETENSORS_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
                      torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
                      torch.complex64}
_CONSTANT_TYPES = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_CONSTANT_TABLES = {tag: _torch_constants(kind) for tag, kind in _CONSTANT_TYPES.items()}
