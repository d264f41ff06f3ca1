"""A ``GraphModule`` as the ``graph`` JSON of the file and the tensors stored beside it.

``encode_graph`` refuses what ``decode`` would refuse (a call outside the allow-list, a
module whose Python code is the point, a name that is not an identifier), so the error
comes at ``save`` time, naming the node and the fix.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from slimgraph.errors import SerializationError, describe_node
from slimgraph.serialize.allow_list import (
    ATTRIBUTE_PATH,
    is_identifier,
    is_input_name,
    op_problem,
    public_attribute,
    python_function_names,
    safe_class_name,
    tensor_methods,
)
from slimgraph.serialize.guards import guard_inputs, is_guards
from slimgraph.serialize.values import (
    DTYPE_NAMES,
    SAFETENSORS_DTYPES,
    encode_meta,
    encode_value,
    qualified_name,
)


def encode_graph(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store, by name, and the JSON of everything else in ``gm``."""
    modules = _encode_modules(gm)
    stored, tensor_entries = _encode_tensors(gm, modules)
    graph = {
        "class_name": safe_class_name(type(gm).__name__), "training": gm.training,
        "codegen": _encode_codegen(gm),
        "nodes": [_encode_node(gm, node) for node in gm.graph.nodes],
        "modules": [entry for entry in modules.values() if entry],
        "tensors": tensor_entries,
        "meta": {k: v for k, v in gm.meta.items()
                 if k.startswith("slimgraph_") and k != "slimgraph_saved" and _is_plain_json(v)},
    }
    return stored, graph


def _encode_node(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    where = lambda: describe_node(node)  # noqa: E731 - built only when an error needs it
    target = node.target
    if node.op == "call_function":
        target = _encode_call_target(node)
    elif node.op == "call_module" and not is_guards(module := gm.get_submodule(target)):
        _refuse(f"{where()} calls module '{target}' ({type(module).__name__}), whose Python code "
                "cannot be saved as data. Capture the model with torch.export (slimgraph.optimize "
                "does) without keeping it as a leaf module, so its operators are traced into the graph")
    elif node.op == "call_method" and target not in tensor_methods():
        _refuse(f"{where()} calls method '{target}', which is not a public torch.Tensor method "
                "that load() may call. Capture the model with torch.export (slimgraph.optimize does)")
    elif node.op == "get_attr" and not isinstance(value := _attribute(gm, target), torch.Tensor):
        _refuse(f"{where()} reads '{target}', a {type(value).__name__}, not a "
                "tensor: only graphs whose attributes are tensors can be saved")
    _check_names(node, where)
    return {"op": node.op, "name": node.name, "target": target,
            "args": [encode_value(a, where) for a in node.args],
            "kwargs": {k: encode_value(v, where) for k, v in node.kwargs.items()},
            "meta": encode_meta(node.meta)}


def _encode_call_target(node: fx.Node) -> dict[str, Any]:
    target = node.target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
        namespace, name = packet._qualified_op_name.split("::")
        overload = target._overloadname if isinstance(target, torch._ops.OpOverload) else None
        problem = op_problem(namespace, name, overload)
        if problem:
            _refuse(f"{describe_node(node)}: {problem}")
        return {"op": f"{namespace}::{name}", "overload": overload}
    name = python_function_names().get(id(target))
    if name is None:
        kind = "control-flow operator" if isinstance(target, torch._ops.HigherOrderOperator) else "function"
        _refuse(f"{describe_node(node)} calls the {kind} {qualified_name(target)}, which load() does "
                "not resolve: saved graphs call torch operators (torch.ops.*), operator.* and the torch "
                "functions that are spellings of ATen operators. Capture the model with torch.export "
                "(slimgraph.optimize does) so it is traced into ATen operators, or make the function "
                "a custom operator with torch.library.custom_op")
    if target is getattr and not public_attribute(node.args[1] if len(node.args) > 1 else None):
        _refuse(f"{describe_node(node)} reads attribute {node.args[1:2]!r}; only public attributes "
                "(no leading underscore) can be read by a saved graph")
    return {"python": name}


def _check_names(node: fx.Node, where: Callable[[], str]) -> None:
    """Names that torch.fx pastes into generated source must be plain identifiers."""
    if not is_identifier(node.name):
        _refuse(f"{where()}: node name '{node.name}' is not a Python identifier")
    if node.op == "placeholder" and not is_input_name(node.target):
        _refuse(f"{where()}: input name '{node.target}' is not a Python identifier")
    if node.op in ("get_attr", "call_module") and not ATTRIBUTE_PATH.fullmatch(node.target):
        _refuse(f"{where()}: attribute path '{node.target}' has characters other than letters, "
                "digits, '_' and '.'; rename the module or tensor")
    for key in node.kwargs:
        if not is_identifier(key):
            _refuse(f"{where()}: keyword '{key}' is not a Python identifier")


def _encode_codegen(gm: fx.GraphModule) -> dict[str, Any]:
    codegen = gm.graph._codegen
    if type(codegen) is fx.graph.CodeGen:
        return {"kind": "plain"}
    if type(codegen) is not _PyTreeCodeGen:
        _refuse(f"the graph uses a custom code generator ({type(codegen).__name__}), which cannot be saved")
    info = codegen.pytree_info
    with warnings.catch_warnings():  # torch's own deprecation of LeafSpec, not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        try:
            specs = [None if s is None else pytree.treespec_dumps(s) for s in (info.in_spec, info.out_spec)]
        except (NotImplementedError, TypeError, KeyError) as error:
            raise SerializationError(
                f"cannot save the model's input/output structure ({error}). Outputs of a custom class "
                "need torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)") from error
    for name in info.orig_args:
        if not is_identifier(name):
            _refuse(f"forward input '{name}' is not a Python identifier")
    return {"kind": "pytree", "inputs": list(info.orig_args), "in_spec": specs[0], "out_spec": specs[1]}


def _encode_modules(gm: fx.GraphModule) -> dict[str, dict[str, Any] | None]:
    """Each submodule by qualified name: a plain container, an alias of another, or input guards.

    The root maps to ``None`` (it is the GraphModule itself); submodules inside guards or
    aliases are left out (they come with their owner).
    """
    entries: dict[str, dict[str, Any] | None] = {"": None}
    first_name: dict[int, str] = {id(gm): ""}
    skipped: list[str] = []
    for name, module in gm.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if not ATTRIBUTE_PATH.fullmatch(name):
            _refuse(f"module '{name}' has characters other than letters, digits, '_' and '.' in its name")
        if id(module) in first_name:
            entries[name] = {"name": name, "alias_of": first_name[id(module)]}
            skipped.append(name)
        elif is_guards(module):
            entries[name] = {"name": name, "kind": "input_guards", "inputs": guard_inputs(gm, name)}
            skipped.append(name)
        else:
            first_name[id(module)] = name
            entries[name] = {"name": name, "kind": "module", "type": qualified_name(type(module)),
                             "training": module.training}
    return entries


def _encode_tensors(gm: fx.GraphModule, modules: dict[str, dict[str, Any] | None]
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The tensors to store, by name, and one entry per tensor attribute in registration order."""
    stored: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    first_name: dict[int, str] = {}
    storages: set[int] = set()
    for prefix, entry in modules.items():
        if entry is not None and entry.get("kind") != "module":
            continue
        for local, tensor, kind in _local_tensors(gm.get_submodule(prefix)):
            name = f"{prefix}.{local}" if prefix else local
            item: dict[str, Any] = {"name": name, "kind": kind}
            if kind == "parameter":
                item["requires_grad"] = tensor.requires_grad
            if kind == "buffer":
                item["persistent"] = local not in gm.get_submodule(prefix)._non_persistent_buffers_set
            if id(tensor) in first_name:
                item["alias_of"] = first_name[id(tensor)]
            else:
                first_name[id(tensor)] = name
                stored[name], item["stored_as_bytes"] = _storable(name, tensor, storages)
                item.update(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))
            entries.append(item)
    return stored, entries


def _local_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    found = [(n, t, "parameter") for n, t in module._parameters.items() if t is not None]
    found += [(n, t, "buffer") for n, t in module._buffers.items() if t is not None]
    found += [(n, t, "constant") for n, t in vars(module).items() if isinstance(t, torch.Tensor)]
    return found


def _storable(name: str, tensor: torch.Tensor, storages: set[int]) -> tuple[torch.Tensor, bool]:
    """The dense CPU tensor safetensors writes, and whether it holds raw bytes of another dtype."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided:
        _refuse(f"tensor '{name}' is a {type(tensor).__name__} with layout {tensor.layout}; only "
                "dense tensors can be saved")
    if tensor.is_meta:
        _refuse(f"tensor '{name}' is on the meta device and has no data to save")
    if tensor.dtype not in DTYPE_NAMES:
        _refuse(f"tensor '{name}' has dtype {tensor.dtype}, which cannot be saved")
    value = tensor.detach().cpu()
    shared = value.numel() > 0 and value.untyped_storage().data_ptr() in storages
    if shared or not value.is_contiguous():  # safetensors refuses shared memory and strided views
        value = value.clone(memory_format=torch.contiguous_format)
    if value.numel() > 0:
        storages.add(value.untyped_storage().data_ptr())
    if value.dtype in SAFETENSORS_DTYPES:
        return value, False
    return value.reshape(-1).view(torch.uint8), True


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value


def _is_plain_json(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def _refuse(problem: str) -> NoReturn:
    raise SerializationError(f"cannot save: {problem}")
