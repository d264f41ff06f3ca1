"""Small, uniform accessors for FX node metadata.

Graphs reach us from ``torch.export``, Dynamo and ``symbolic_trace``; each writes
``nn_module_stack`` with its own spelling of module paths. These helpers give
one answer whatever the source.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx

_DYNAMO_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]\.?")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")
_CONTAINER_ATTR = re.compile(r"\._(?:modules|parameters|buffers)\.")
# One traceback frame; the source line is absent for code without a file (exec, ``python -c``).
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in \S+(?:\n(?![ \t]*File ")[ \t]*(.*))?')


def normalize_module_path(raw: str) -> str:
    """Turn any spelling of a module path into dotted form.

    >>> normalize_module_path("L['self'].encoder.layer[0]._modules['attention']")
    'encoder.layer.0.attention'
    """
    path = _DYNAMO_ROOT.sub("", raw)
    path = _INDEX.sub(r".\1", path)
    path = _CONTAINER_ATTR.sub(".", "." + path + ".").strip(".")
    return path.replace("..", ".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(module_path, module_type_name), ...]`` from outermost to innermost, root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = []
    for path, module_type in stack.values():
        path = normalize_module_path(path)
        if path:
            entries.append((path, _type_name(module_type)))
    if node.op == "call_module":
        # A module call sits inside its target's ancestors only: export's ``_guards_fn``
        # call carries the stack of whichever node follows it.
        target = str(node.target)
        entries = [(p, t) for p, t in entries if target == p or target.startswith(p + ".")]
        if not entries or entries[-1][0] != target:
            entries.append((target, ""))
    return entries


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module the node was traced in (``''`` for the root).

    A weight read (``get_attr encoder.layer.0.attention.self.query.weight``) belongs to
    the module that owns the weight.
    """
    stack = module_stack(node)
    if stack:
        return stack[-1][0]
    return str(node.target).rpartition(".")[0] if node.op == "get_attr" else ""


def user_source_line(node: fx.Node) -> str:
    """``file.py:42 `code``` for the user's line that created ``node``, or ``''``.

    The stack trace lists frames outermost first; the last frame outside torch
    itself is the line the user wrote.
    """
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    user_frames = [f for f in frames if "/torch/" not in f[0]]
    if not (user_frames or frames):
        return ""
    file, line, code = (user_frames or frames)[-1]
    location = f"{file.rsplit('/', 1)[-1]}:{line}"
    return f"{location} `{code.strip()}`" if code.strip() else location


def op_name(node: fx.Node) -> str:
    """Short readable name of what the node runs: ``aten.linear.default``, ``F.linear``, ``.view``."""
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(target)
        module = getattr(target, "__module__", None) or ""
        return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")
    return f"{node.op} {node.target}"


def has_value(node: fx.Node) -> bool:
    """Whether an example value was recorded (``val``, or Dynamo's ``example_value``); it may be None."""
    return "val" in node.meta or "example_value" in node.meta


def node_value(node: fx.Node) -> Any:
    """The (usually fake) example value recorded on ``node``, or ``None``."""
    value = node.meta.get("val")
    return node.meta.get("example_value") if value is None else value


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    """Resolve a dotted ``get_attr`` target on ``gm``."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _type_name(module_type: Any) -> str:
    if isinstance(module_type, type):
        return f"{module_type.__module__}.{module_type.__qualname__}"
    return str(module_type)


def mutates(node: fx.Node) -> bool:
    """An in-place op (schema, ``inplace=True`` module or kwarg, ``x.add_``, ``+=``, setitem)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if node.op == "call_module":
        return getattr(get_attr_value(node.graph.owning_module, target), "inplace", False) is True
    if node.kwargs.get("inplace") is True:  # Dynamo records nn.ReLU(inplace=True) as F.relu(x, inplace=True)
        return True
    name = target if node.op == "call_method" else getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):  # x.add_(y), torch.relu_(x)
        return True
    return target in (operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.setitem)
