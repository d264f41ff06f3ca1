"""Capture an ``nn.Module`` to a ``GraphModule`` whose weights are ``get_attr`` constants.

Strategy: ``torch.export`` (non-strict) first, because it keeps real weights,
ATen ops and ``nn_module_stack``/``stack_trace`` metadata. Models export cannot
handle fall back to ``torch.fx.symbolic_trace`` with torch.nn modules traced
through (so their weights become ``get_attr`` too). When both fail,
``CaptureError`` names the construct, the user's source line and what to try.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import slimgraph
from slimgraph.errors import CaptureError


def capture(
    model: nn.Module,
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
) -> fx.GraphModule:
    """Trace ``model`` to a ``GraphModule`` that computes the same outputs.

    Example::

        gm = capture(model, (torch.randn(2, 16),))
        torch.testing.assert_close(gm(x), model(x))

    ``dynamic_shapes`` is passed to ``torch.export`` (``{"x": {0: Dim("batch")}}``);
    the names of the ``Dim`` objects become the symbol names of the cost model.
    ``leaf_modules`` are kept as ``call_module`` nodes by the fallback tracer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() expects an nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    try:
        gm = _capture_with_export(model, args, kwargs, dynamic_shapes)
    except Exception as export_error:  # noqa: BLE001 - any failure sends us to the fallback
        try:
            gm = _capture_with_symbolic_trace(model, args, kwargs, tuple(leaf_modules))
        except Exception as trace_error:  # noqa: BLE001
            raise _capture_error(model, export_error, trace_error) from export_error
        gm.meta["slimgraph_capture"] = {"strategy": "symbolic_trace", "export_error": _first_line(export_error)}
    return gm


def _capture_with_export(model, args, kwargs, dynamic_shapes) -> fx.GraphModule:
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    # A plain GraphModule over the unlifted graph: export's module carries forward hooks
    # (an input-structure check the graph's own guards repeat, and module-input bookkeeping
    # for models taking nn.Module arguments) that cost ~75 µs a call, a batch-1 layer's time.
    unlifted = program.module()
    takes_modules = any(isinstance(leaf, nn.Module) for leaf in torch.utils._pytree.tree_leaves((args, kwargs)))
    gm = unlifted if takes_modules else fx.GraphModule(unlifted, unlifted.graph)
    gm.range_constraints = unlifted.range_constraints  # the dynamic sizes' bounds, which save stores
    if isinstance(getattr(gm, "_guards_fn", None), nn.Module):
        first_input = next((n.target for n in gm.graph.nodes if n.op == "placeholder"), "x")
        gm._guards_fn = ExplainedGuards(gm._guards_fn, first_input)
    gm.meta["slimgraph_capture"] = {"strategy": "export"}
    gm.meta["slimgraph_symbols"] = _symbol_names(gm, dynamic_shapes)
    return gm


def _capture_with_symbolic_trace(model, args, kwargs, leaf_modules) -> fx.GraphModule:
    tracer = _InliningTracer(leaf_modules)
    defaults = _unsupplied_defaults(model, args, kwargs)
    graph = tracer.trace(model, concrete_args=defaults)
    parameters = inspect.signature(model.forward).parameters
    for node in graph.find_nodes(op="placeholder"):
        name = node.target.removesuffix("_1")  # fx renames specialised inputs; keep gm(mask=None) working
        if name in defaults and node.target not in parameters:
            node.target = name
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _record_placeholder_values(gm, args, kwargs)
    return gm


class ExplainedGuards(nn.Module):
    """export's input guards, with a failure that says how to accept other sizes."""

    _is_impure = True  # its checks are the point: dead-code elimination must keep the call

    def __init__(self, guards: nn.Module, first_input: str):
        super().__init__()
        self.guards = guards
        self.first_input = first_input
        self.check = _undecorated_check(guards)

    def forward(self, *args: Any) -> None:
        try:
            # Dynamo must trace the module itself (it re-derives the guards from it); eager
            # calls skip the Dynamo-config patch around export's check: 13 → 4 µs a call.
            (self.guards if torch.compiler.is_compiling() else self.check)(*args)
        except AssertionError as error:
            raise AssertionError(
                f"{error}: the graph was captured for the example inputs' sizes. To run other sizes, "
                f"capture with dynamic_shapes, e.g. "
                f"dynamic_shapes={{'{self.first_input}': {{0: torch.export.Dim('batch')}}}}"
            ) from None


def _undecorated_check(guards: nn.Module) -> Callable[..., None]:
    """export's generated check function (``def _(*args)``), unwrapped from the
    ``dont_skip_tracing`` decorator on its ``forward``; ``guards`` itself if it is not there."""
    cells = getattr(guards.forward, "__closure__", None) or ()
    functions = [c.cell_contents for c in cells if inspect.isfunction(c.cell_contents)]
    return functions[0] if len(functions) == 1 and functions[0].__name__ == "_" else guards


class _InliningTracer(fx.Tracer):
    """Traces through torch.nn modules so their parameters become ``get_attr`` nodes."""

    def __init__(self, leaf_modules: tuple[type[nn.Module], ...]):
        super().__init__()
        self.leaf_types = leaf_modules
        self.record_stack_traces = True  # errors and reports name the user's source line

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) if self.leaf_types else False


def _unsupplied_defaults(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Optional ``forward`` parameters the caller did not pass, bound to their defaults.

    Left as proxies, ``if mask is None:`` would see a proxy and trace the wrong branch.
    """
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in bound.signature.parameters.items()
            if name not in bound.arguments and isinstance(p.default, _SCALAR_DEFAULTS)}


_SCALAR_DEFAULTS = (type(None), bool, int, float, str)


def _record_placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Give placeholders fake ``val`` metadata so shape propagation can start from them.

    Shapes are static: only ``torch.export`` with ``dynamic_shapes`` makes sizes symbolic.
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = args[index] if index < len(args) else kwargs.get(node.target, _default(node))
        if isinstance(value, torch.Tensor):
            value = mode.from_tensor(value, static_shapes=True)
        node.meta["val"] = value


def _default(placeholder: fx.Node) -> Any:
    return placeholder.args[0] if placeholder.args else None


def _symbol_names(gm: fx.GraphModule, dynamic_shapes: Any) -> dict[str, str]:
    """Map export's symbols (``s0``) to the user's ``Dim`` names (``batch``).

    Handles the two common spellings of ``dynamic_shapes``: a dict keyed by
    argument name, or a tuple in positional order.
    """
    if not dynamic_shapes:
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(dynamic_shapes, Mapping):
        specs = [(p, dynamic_shapes.get(p.target)) for p in placeholders]
    else:
        specs = list(zip(placeholders, dynamic_shapes, strict=False))
    names = {}
    for node, spec in specs:
        value = node.meta.get("val")
        if not isinstance(spec, Mapping) or not isinstance(value, torch.Tensor):
            continue
        for dim, dim_spec in spec.items():
            size = value.shape[dim]
            if isinstance(size, torch.SymInt) and getattr(dim_spec, "__name__", None):
                names[str(size.node.expr)] = dim_spec.__name__
    return names


_HINTS = (
    ("data-dependent", "the model branches on a tensor's value; rewrite it with torch.where / torch.cond, "
     "or pass leaf_modules=(TheModule,) so the fallback tracer keeps that module opaque"),
    ("constraint", "a dimension you marked dynamic was specialised; fix dynamic_shapes (use Dim.AUTO) "
     "or make it static"),
    ("control flow", "symbolic_trace cannot follow Python control flow on tensors; pass "
     "leaf_modules=(TheModule,) to keep the module opaque, or make the branch static"),
    ("proxy", "a traced value was used as a Python value (len(), bool(), range()); pass "
     "leaf_modules=(TheModule,) or compute that value outside forward()"),
)


def _capture_error(model: nn.Module, export_error: Exception, trace_error: Exception) -> CaptureError:
    line = _user_frame(export_error) or _user_frame(trace_error) or "unknown location"
    text = f"{_first_line(export_error)} {_first_line(trace_error)}".lower()
    hint = next((h for key, h in _HINTS if key in text),
                "pass dynamic_shapes if sizes vary, or leaf_modules=(TheModule,) for a module "
                "that cannot be traced")
    return CaptureError(
        f"could not capture {type(model).__name__}: neither torch.export nor symbolic_trace succeeded.\n"
        f"  failing construct at {line}\n"
        f"  torch.export: {type(export_error).__name__}: {_first_line(export_error)}\n"
        f"  symbolic_trace: {type(trace_error).__name__}: {_first_line(trace_error)}\n"
        f"  what to try: {hint}"
    )


def _user_frame(error: Exception) -> str:
    """``file.py:12 `code``` for the innermost traceback frame outside torch and slimgraph."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not _is_library_file(f.filename)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: `{(frame.line or '').strip()}`"


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(package.__file__)) + os.sep
                      for package in (torch, slimgraph))


def _is_library_file(filename: str) -> bool:
    """Inside the torch or slimgraph packages (a user's checkout may itself be named ``slimgraph``)."""
    return os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
