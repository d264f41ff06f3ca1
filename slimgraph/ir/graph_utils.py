"""Graph housekeeping shared by passes: dead code and unused attributes."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn


def eliminate_dead_code(gm: fx.GraphModule) -> tuple[int, int]:
    """Remove unused pure nodes, then attributes no node refers to.

    Returns ``(nodes_removed, tensors_freed)``. Impure nodes (in-place ops,
    export's ``_guards_fn`` input checks, asserts) stay.
    """
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes), delete_unused_attributes(gm)


def delete_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters, buffers, tensor attributes and submodules the graph no longer uses.

    Unused submodules go first, so a module that is detached whole (on a ``symbolic_trace``
    graph it can be the caller's own) never has tensors deleted from it.
    """
    before = len(list(_tensor_attribute_names(gm)))
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in list(_tensor_attribute_names(gm)):
        if not any(prefix in used for prefix in _dotted_prefixes(name)):
            owner_path, _, attribute = name.rpartition(".")
            delattr(gm.get_submodule(owner_path) if owner_path else gm, attribute)
    return before - len(list(_tensor_attribute_names(gm)))


def _dotted_prefixes(name: str) -> list[str]:
    """``"a.b.c"`` → ``["a", "a.b", "a.b.c"]``: a tensor is used when it or a module holding it is."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _tensor_attribute_names(gm: fx.GraphModule):
    for prefix, module in gm.named_modules():
        dotted = f"{prefix}." if prefix else ""
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                yield dotted + name
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                yield dotted + name


def unique_attribute_name(gm: fx.GraphModule, stem: str) -> str:
    """A fresh attribute name on ``gm`` starting with ``stem``."""
    index = 0
    while hasattr(gm, f"{stem}{index}"):
        index += 1
    return f"{stem}{index}"
