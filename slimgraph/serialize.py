"""``save`` / ``load``: an optimized ``GraphModule`` as one ``.safetensors`` file.

Example::

    fast = slimgraph.optimize(model, "cleanup, quantize(format=int4, group_size=32)", (x,))
    slimgraph.save(fast, "model.safetensors")
    same = slimgraph.load("model.safetensors")
    assert torch.equal(same(x), fast(x))

The file is a plain safetensors file: every parameter, buffer and tensor constant is
a tensor keyed by its qualified name (``h_0_attn_c_attn_int4_0.qweight``); the
safetensors metadata (str → str) holds:

- ``format`` (``slimgraph.graph``), ``format_version`` (``1``), ``slimgraph_version``,
  ``torch_version``: what wrote the file;
- ``pipeline``: the pipeline text of ``model.report`` (``""`` when there is none);
  ``report``: JSON, one ``{"pass", "status", "notes", "reason"}`` per pass;
  ``formats``: JSON, the weight format of each rewritten layer (``{"h.0.attn.c_attn": "int4"}``);
- ``graph``: JSON with the nodes (op, name, target, args, kwargs and the metadata the
  dump tool reads), the pytree input/output specs, the module hierarchy, the tensors
  (parameter, buffer or constant; dtype, shape, aliases) and the input-size guards;
- ``sha256``: a digest of all of the above and of every tensor's dtype, shape and bytes.

Loading executes nothing the file names. There is no pickle and no ``torch.load``, no
import of a module the file names, no ``eval``. Call targets resolve only from an
allow-list: operators already registered in ``torch.ops`` (``aten``, ``prims``,
``slimgraph``…, minus operators that read or write files), ``operator`` functions,
``getattr`` of public attributes, public ``Tensor`` methods and the torch functions
that ``symbolic_trace`` graphs call, which are spellings of ATen operators. Every
name that torch.fx pastes into generated source (inputs, attribute paths, keywords)
must be a plain identifier. ``save`` checks the same rules, so a graph that ``load``
would refuse is refused when it is saved, with the node and the fix in the message.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import keyword
import math
import operator
import os
import pkgutil
import re
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.export._unlift import GuardsFn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

import slimgraph
from slimgraph.errors import SlimgraphError, describe_node
from slimgraph.ir.capture import _ExplainedGuards
from slimgraph.ir.nodes import module_path

FORMAT_NAME = "slimgraph.graph"
FORMAT_VERSION = 1


class SerializationError(SlimgraphError):
    """A graph cannot be saved, or a file cannot be loaded (damaged, tampered, unsupported)."""


class TorchVersionWarning(UserWarning):
    """The file was saved with another torch major.minor version than the running one."""


def save(model: fx.GraphModule, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (graph, weights, provenance) to one ``.safetensors`` file; return its path.

    Example::

        fast = slimgraph.optimize(model, "quantize(format=nf4, double_quant=true)", (x,))
        slimgraph.save(fast, "model.safetensors")  # PosixPath('model.safetensors')

    A node that ``load`` could not rebuild safely (a call to a Python function, a user
    module kept opaque, a control-flow operator) raises ``SerializationError`` naming the
    node, its target, its module path and what to do; nothing is written then. The file
    is written next to ``path`` and renamed into place, so a crash leaves no half file.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"save() expects the torch.fx.GraphModule that slimgraph.optimize() returns, got "
            f"{type(model).__name__}: optimize the model first, or save plain weights with "
            "safetensors.torch.save_file(model.state_dict(), path)")
    path = Path(path)
    modules = _encode_modules(model)
    stored, tensor_entries = _encode_tensors(model, modules)
    graph = {
        "class_name": _class_name(model), "training": model.training,
        "codegen": _encode_codegen(model),
        "nodes": [_encode_node(model, node) for node in model.graph.nodes],
        "modules": [entry for entry in modules.values() if entry],
        "tensors": tensor_entries,
        "meta": {k: v for k, v in model.meta.items()
                 if k.startswith("slimgraph_") and k != "slimgraph_saved" and _is_plain_json(v)},
    }
    pipeline, passes = _provenance(model)
    metadata = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "slimgraph_version": slimgraph.__version__, "torch_version": torch.__version__,
        "pipeline": pipeline, "report": _dumps(passes), "formats": _dumps(_layer_formats(model)),
        "graph": _dumps(graph),
    }
    metadata["sha256"] = _digest(metadata, stored)
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file(stored, partial, metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike[str]) -> fx.GraphModule:
    """Rebuild the ``GraphModule`` that ``save`` wrote; its outputs equal the saved model's bit for bit.

    Example::

        model = slimgraph.load("model.safetensors")
        model.meta["slimgraph_saved"]["pipeline"]  # 'quantize(format=nf4, double_quant=true)'

    Nothing the file names is run or imported. A damaged or truncated file, one written
    in a newer format, one modified since it was saved (checksum), a graph that calls an
    operator this process lacks or a function outside the allow-list, a tensor the graph
    needs but the file lacks: each raises ``SerializationError`` saying which and what
    to do. A file from another torch major.minor version loads with a ``TorchVersionWarning``.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    _check_format(path, metadata)
    if _digest(metadata, tensors) != metadata.get("sha256"):
        raise SerializationError(
            f"{path} has been modified since it was saved (checksum mismatch): its tensors or its "
            "graph differ from what slimgraph wrote. Save the model again from its source.")
    _warn_on_torch_version(path, metadata["torch_version"])
    try:
        return _Loader(path, metadata, tensors).build()
    except RecursionError:
        raise SerializationError(f"cannot load {path}: its graph is nested too deeply") from None


# ---- save: the graph as JSON ----------------------------------------------------------------------

def _encode_node(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    where = lambda: describe_node(node)  # noqa: E731 - built only when an error needs it
    target = node.target
    if node.op == "call_function":
        target = _encode_call_target(node)
    elif node.op == "call_module" and not _is_guards(gm.get_submodule(target)):
        module = gm.get_submodule(target)
        _refuse(f"{where()} calls module '{target}' ({type(module).__name__}), whose Python code "
                "cannot be saved as data. Capture the model with torch.export (slimgraph.optimize "
                "does) without keeping it as a leaf module, so its operators are traced into the graph")
    elif node.op == "call_method" and target not in _tensor_methods():
        _refuse(f"{where()} calls method '{target}', which is not a public torch.Tensor method "
                "that load() may call. Capture the model with torch.export (slimgraph.optimize does)")
    elif node.op == "get_attr" and not isinstance(_attribute(gm, target), torch.Tensor):
        _refuse(f"{where()} reads '{target}', a {type(_attribute(gm, target)).__name__}, not a "
                "tensor: only graphs whose attributes are tensors can be saved")
    _check_names(node, where)
    return {"op": node.op, "name": node.name, "target": target,
            "args": [_encode_value(a, where) for a in node.args],
            "kwargs": {k: _encode_value(v, where) for k, v in node.kwargs.items()},
            "meta": _encode_meta(node.meta)}


def _encode_call_target(node: fx.Node) -> dict[str, Any]:
    target = node.target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
        namespace, name = packet._qualified_op_name.split("::")
        overload = target._overloadname if isinstance(target, torch._ops.OpOverload) else None
        problem = _op_problem(namespace, name, overload)
        if problem:
            _refuse(f"{describe_node(node)}: {problem}")
        return {"op": f"{namespace}::{name}", "overload": overload}
    name = _python_function_names().get(id(target))
    if name is None:
        kind = "control-flow operator" if isinstance(target, torch._ops.HigherOrderOperator) else "function"
        _refuse(f"{describe_node(node)} calls the {kind} {_qualified_name(target)}, which load() does "
                "not resolve: saved graphs call torch operators (torch.ops.*), operator.* and the torch "
                "functions that are spellings of ATen operators. Capture the model with torch.export "
                "(slimgraph.optimize does) so it is traced into ATen operators, or make the function "
                "a custom operator with torch.library.custom_op")
    if target is getattr and not _public_attribute(node.args[1] if len(node.args) > 1 else None):
        _refuse(f"{describe_node(node)} reads attribute {node.args[1:2]!r}; only public attributes "
                "(no leading underscore) can be read by a saved graph")
    return {"python": name}


def _check_names(node: fx.Node, where: Callable[[], str]) -> None:
    """Names that torch.fx pastes into generated source must be plain identifiers."""
    if not _is_identifier(node.name):
        _refuse(f"{where()}: node name '{node.name}' is not a Python identifier")
    if node.op == "placeholder" and not _is_input_name(node.target):
        _refuse(f"{where()}: input name '{node.target}' is not a Python identifier")
    if node.op in ("get_attr", "call_module") and not _ATTRIBUTE_PATH.fullmatch(node.target):
        _refuse(f"{where()}: attribute path '{node.target}' has characters other than letters, "
                "digits, '_' and '.'; rename the module or tensor")
    for key in node.kwargs:
        if not _is_identifier(key):
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
        if not _is_identifier(name):
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
        if not _ATTRIBUTE_PATH.fullmatch(name):
            _refuse(f"module '{name}' has characters other than letters, digits, '_' and '.' in its name")
        if id(module) in first_name:
            entries[name] = {"name": name, "alias_of": first_name[id(module)]}
            skipped.append(name)
        elif _is_guards(module):
            entries[name] = {"name": name, "kind": "input_guards", "inputs": _guard_inputs(gm, name)}
            skipped.append(name)
        else:
            first_name[id(module)] = name
            entries[name] = {"name": name, "kind": "module", "type": _qualified_name(type(module)),
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
                item.update(dtype=_DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))
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
    if tensor.dtype not in _DTYPE_NAMES:
        _refuse(f"tensor '{name}' has dtype {tensor.dtype}, which cannot be saved")
    value = tensor.detach().cpu()
    shared = value.numel() > 0 and value.untyped_storage().data_ptr() in storages
    if shared or not value.is_contiguous():  # safetensors refuses shared memory and strided views
        value = value.clone(memory_format=torch.contiguous_format)
    if value.numel() > 0:
        storages.add(value.untyped_storage().data_ptr())
    if value.dtype in _SAFETENSORS_DTYPES:
        return value, False
    return value.reshape(-1).view(torch.uint8), True


def _provenance(gm: fx.GraphModule) -> tuple[str, list[dict[str, Any]]]:
    report = getattr(gm, "report", None)
    if report is not None:
        return report.pipeline, [{"pass": r.pass_text, "status": r.status, "notes": [str(n) for n in r.result.notes],
                                  "reason": str(r.reason)} for r in report.records]
    saved = gm.meta.get("slimgraph_saved", {})  # a loaded model saved again keeps its history
    return saved.get("pipeline", ""), saved.get("report", [])


def _layer_formats(gm: fx.GraphModule) -> dict[str, str]:
    formats = {}
    for node in gm.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "slimgraph":
            formats[module_path(node) or node.name] = node.target._opname.removeprefix("linear_")
    return formats


def _encode_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata the dump tool and the analyses read; fake tensors are not saved."""
    kept: dict[str, Any] = {}
    for key in ("stack_trace", "slimgraph_replaces"):
        if isinstance(meta.get(key), str):
            kept[key] = meta[key]
    if isinstance(meta.get("torch_fn"), tuple) and all(isinstance(s, str) for s in meta["torch_fn"]):
        kept["torch_fn"] = list(meta["torch_fn"])
    stack = meta.get("nn_module_stack")
    if isinstance(stack, dict):
        kept["nn_module_stack"] = [[str(key), str(entry[0]), _type_name(entry[1])] for key, entry in stack.items()
                                   if isinstance(entry, tuple) and len(entry) == 2]
    return kept


# ---- load: validate, then build -------------------------------------------------------------------

def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise SerializationError(f"{path} is a directory; give the .safetensors file slimgraph.save() wrote")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            # Cloned into torch's 64-byte-aligned allocations: safetensors' buffers sit at any 8-byte
            # offset, and BLAS kernels choose their summation order by alignment (last-bit differences).
            tensors = {name: file.get_tensor(name).clone() for name in file.keys()}  # noqa: SIM118 - not a dict
    except SafetensorError as error:
        raise SerializationError(f"{path} is truncated or not a slimgraph file: {error}{_looks_like(path)}") from None
    return metadata, tensors


def _looks_like(path: Path) -> str:
    with path.open("rb") as file:
        start = file.read(4)
    if start.startswith(b"PK\x03\x04") or start[:1] == b"\x80":
        return (" (it looks like a torch.save/pickle file; load() never unpickles, because unpickling "
                "can run any code)")
    return ""


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT_NAME:
        found = f"format {metadata['format']!r}" if "format" in metadata else "no slimgraph metadata"
        raise SerializationError(
            f"{path} is a safetensors file with {found}, not a saved slimgraph graph: "
            "read plain weights with safetensors.torch.load_file")
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise SerializationError(f"{path} is damaged: its metadata lacks {', '.join(missing)}")
    version = metadata["format_version"]
    if not version.isdigit() or int(version) < 1:
        raise SerializationError(f"{path} is damaged: format_version {version!r} is not a version number")
    if int(version) > FORMAT_VERSION:
        raise SerializationError(
            f"{path} was saved by slimgraph {metadata['slimgraph_version']} with format v{version}; this "
            f"slimgraph ({slimgraph.__version__}) reads v{FORMAT_VERSION}: upgrade slimgraph")


def _warn_on_torch_version(path: Path, saved: str) -> None:
    if _major_minor(saved) != _major_minor(torch.__version__):
        warnings.warn(f"{path} was saved with torch {saved} and is loaded with torch {torch.__version__}; "
                      "operators may have changed between these versions: check the outputs, or save the "
                      "model again with this torch", TorchVersionWarning, stacklevel=3)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


class _Loader:
    """Turns validated metadata and tensors into a GraphModule; every problem is a SerializationError."""

    def __init__(self, path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]):
        self.path, self.metadata, self.file_tensors = path, metadata, tensors
        self.graph_json = self.parse(metadata["graph"], dict, "graph")
        self.tensors: dict[str, torch.Tensor] = {}
        self.guards: dict[str, list[Any]] = {}

    def build(self) -> fx.GraphModule:
        graph_json = self.graph_json
        class_name = self.field(graph_json, "class_name", str, "graph")
        gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name if _is_identifier(class_name) else "GraphModule")
        self.add_modules(gm, self.field(graph_json, "modules", list, "graph"))
        self.add_tensors(gm, self.field(graph_json, "tensors", list, "graph"))
        graph = fx.Graph()
        codegen = self.codegen(self.field(graph_json, "codegen", dict, "graph"))
        if codegen is not None:
            graph.set_codegen(codegen)
        self.add_nodes(graph, self.field(graph_json, "nodes", list, "graph"))
        gm.graph = graph  # recompiles
        try:
            graph.lint()
        except RuntimeError as error:
            raise self.error(f"the graph is not well formed: {error}") from None
        gm.training = self.field(graph_json, "training", bool, "graph")
        gm.meta.update(self.field(graph_json, "meta", dict, "graph"))
        gm.meta["slimgraph_saved"] = {
            "path": str(self.path), "slimgraph_version": self.metadata["slimgraph_version"],
            "torch_version": self.metadata["torch_version"], "pipeline": self.metadata["pipeline"],
            "report": self.parse(self.metadata["report"], list, "report"),
            "formats": self.parse(self.metadata["formats"], dict, "formats"),
        }
        return gm

    def add_modules(self, gm: fx.GraphModule, entries: list[Any]) -> None:
        for entry in entries:
            name = self.field(entry, "name", str, "module")
            self.check(_ATTRIBUTE_PATH.fullmatch(name) is not None, f"module name {name!r} is not a dotted path")
            parent, _, local = name.rpartition(".")
            owner = self.submodule(gm, parent)
            self.check(local not in owner._modules, f"module '{name}' is listed twice")
            if "alias_of" in entry:
                owner.add_module(local, self.submodule(gm, self.field(entry, "alias_of", str, name)))
            elif entry.get("kind") == "input_guards":
                inputs = self.field(entry, "inputs", list, name)
                owner.add_module(local, _ExplainedGuards(SavedInputGuards(self.guard_inputs(inputs, name)),
                                                         _first_input(inputs)))
            else:
                self.check(entry.get("kind") == "module", f"module '{name}' has unknown kind {entry.get('kind')!r}")
                owner.add_module(local, nn.Module())
                owner._modules[local].training = self.field(entry, "training", bool, name)

    def add_tensors(self, gm: fx.GraphModule, entries: list[Any]) -> None:
        for entry in entries:
            name = self.field(entry, "name", str, "tensor")
            self.check(_ATTRIBUTE_PATH.fullmatch(name) is not None and name not in self.tensors,
                       f"tensor name {name!r} is not a dotted path or is listed twice")
            owner_name, _, local = name.rpartition(".")
            owner = self.submodule(gm, owner_name)
            tensor = (self.tensors.get(self.field(entry, "alias_of", str, name)) if "alias_of" in entry
                      else self.file_tensor(name, entry))
            self.check(tensor is not None, f"tensor '{name}' aliases a tensor listed after it or not at all")
            kind = entry.get("kind")
            if kind == "parameter":
                if not isinstance(tensor, nn.Parameter):
                    tensor = nn.Parameter(tensor, requires_grad=self.field(entry, "requires_grad", bool, name))
                owner.register_parameter(local, tensor)
            elif kind == "buffer":
                owner.register_buffer(local, tensor, persistent=self.field(entry, "persistent", bool, name))
            else:
                self.check(kind == "constant", f"tensor '{name}' has unknown kind {kind!r}")
                setattr(owner, local, tensor)
            self.tensors[name] = tensor
        unused = sorted(set(self.file_tensors) - set(self.tensors))
        self.check(not unused, f"the file holds tensors the graph does not list: {', '.join(unused[:5])}")

    def file_tensor(self, name: str, entry: dict[str, Any]) -> torch.Tensor:
        dtype_name, shape = self.field(entry, "dtype", str, name), self.field(entry, "shape", list, name)
        self.check(dtype_name in _DTYPES and all(type(s) is int and s >= 0 for s in shape),
                   f"tensor '{name}' records dtype {dtype_name!r} and shape {shape}, which are not valid")
        tensor = self.file_tensors.get(name)
        if tensor is None:
            raise self.error(f"the graph reads tensor '{name}', which the file does not contain")
        dtype = _DTYPES[dtype_name]
        if self.field(entry, "stored_as_bytes", bool, name):
            nbytes = math.prod(shape) * dtype.itemsize
            self.check(tensor.dtype == torch.uint8 and tensor.shape == (nbytes,),
                       f"tensor '{name}' should be {nbytes} raw bytes, the file has {tensor.dtype} {list(tensor.shape)}")
            return tensor.view(dtype).reshape(shape)
        self.check(tensor.dtype == dtype and list(tensor.shape) == shape,
                   f"tensor '{name}' is {tensor.dtype} {list(tensor.shape)} in the file but the graph records "
                   f"{dtype} {shape}")
        return tensor

    def codegen(self, entry: dict[str, Any]) -> fx.graph.CodeGen | None:
        if entry.get("kind") == "plain":
            return None
        self.check(entry.get("kind") == "pytree", f"unknown code generator {entry.get('kind')!r}")
        inputs = self.field(entry, "inputs", list, "codegen")
        self.check(all(_is_identifier(n) for n in inputs),
                   f"forward inputs {inputs} are not all Python identifiers")
        specs = []
        for key in ("in_spec", "out_spec"):
            text = entry.get(key)
            self.check(text is None or isinstance(text, str), f"codegen {key} is not a string")
            specs.append(None if text is None else self.treespec(text, key))
        if specs[0] is not None:
            self.check_keyword_inputs(specs[0])
        return _PyTreeCodeGen(_PyTreeInfo(inputs, specs[0], specs[1]))

    def treespec(self, text: str, key: str) -> pytree.TreeSpec:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return pytree.treespec_loads(text)
        except (KeyError, NotImplementedError, ValueError, TypeError, json.JSONDecodeError) as error:
            types_named = ", ".join(sorted(set(re.findall(r'"type": "([\w.]+)"', text)))) or "?"
            raise self.error(f"cannot rebuild the model's {key} ({type(error).__name__}: {error}). It uses "
                             f"the types {types_named}: import the library that defines them (for "
                             "example transformers) before load()") from None

    def check_keyword_inputs(self, in_spec: pytree.TreeSpec) -> None:
        """torch.fx pastes the keyword-argument names of ``in_spec`` into the generated ``forward``."""
        if in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(1).type is dict:
            keys = in_spec.child(1).context
            self.check(all(_is_identifier(k) for k in keys),
                       f"keyword inputs {keys} are not all Python identifiers")

    def add_nodes(self, graph: fx.Graph, entries: list[Any]) -> None:
        env: dict[str, fx.Node] = {}
        for index, entry in enumerate(entries):
            self.check(isinstance(entry, dict), f"node {index} is not an object")
            name, op = self.field(entry, "name", str, f"node {index}"), entry.get("op")
            self.check(_is_identifier(name) and name not in env,
                       f"node name {name!r} is not an identifier or is used twice")
            self.check(op in _NODE_OPS, f"node '{name}' has unknown op {op!r}")
            self.check(op != "output" or entry.get("target") == "output", "the output node has another target")
            self.check((op == "output") == (index == len(entries) - 1), "the output node must come last, once")
            target = self.target(name, op, entry.get("target"))
            args = [self.decode(a, env, name) for a in self.field(entry, "args", list, name)]
            kwargs = self.field(entry, "kwargs", dict, name)
            self.check(all(_is_identifier(k) for k in kwargs), f"node '{name}' has a keyword that is not an identifier")
            kwargs = {k: self.decode(v, env, name) for k, v in kwargs.items()}
            if target is getattr:
                self.check(len(args) >= 2 and _public_attribute(args[1]),
                           f"node '{name}' reads a private attribute {args[1:2]!r}")
            node = graph.create_node(op, target, tuple(args), kwargs, name=name)
            self.check(node.name == name, f"node name '{name}' clashes with a Python name")
            node.meta.update(self.meta(entry.get("meta"), name))
            env[name] = node
        self.check(bool(entries), "the graph has no nodes")

    def target(self, name: str, op: str, target: Any) -> Any:
        if op == "call_function":
            self.check(isinstance(target, dict), f"node '{name}' has a malformed target {target!r}")
            return self.call_target(name, target)
        self.check(isinstance(target, str), f"node '{name}' has a malformed target {target!r}")
        if op == "placeholder":
            self.check(_is_input_name(target), f"input {target!r} is not an identifier")
        elif op == "get_attr":
            self.check(target in self.tensors, f"node '{name}' reads '{target}', which the file does not contain")
        elif op == "call_module":
            self.check(target in self.guards, f"node '{name}' calls module '{target}', which is not input guards")
        elif op == "call_method":
            self.check(target in _tensor_methods(), f"node '{name}' calls method {target!r}, which is not allowed")
        return target

    def call_target(self, name: str, target: dict[str, Any]) -> Callable[..., Any]:
        if "python" in target:
            function = _python_functions().get(target["python"])
            self.check(function is not None, f"node '{name}' calls {target['python']!r}, which is not "
                       "one of the functions a saved graph may call")
            return function
        qualified, overload = target.get("op"), target.get("overload")
        self.check(isinstance(qualified, str) and qualified.count("::") == 1 and
                   (overload is None or isinstance(overload, str)), f"node '{name}' has a malformed target {target!r}")
        namespace, op_name = qualified.split("::")
        problem = _op_problem(namespace, op_name, overload)
        if problem:
            raise self.error(f"node '{name}': {problem} (the file was saved by slimgraph "
                             f"{self.metadata['slimgraph_version']} with torch {self.metadata['torch_version']})")
        try:
            packet = getattr(getattr(torch.ops, namespace), op_name)
            return packet if overload is None else getattr(packet, overload)
        except (AttributeError, RuntimeError) as error:  # a TorchScript-only builtin has a schema, no op
            raise self.error(f"node '{name}' calls {qualified}, which torch.ops cannot call ({error})") from None

    def decode(self, value: Any, env: dict[str, fx.Node], where: str) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list):
            return [self.decode(v, env, where) for v in value]
        self.check(isinstance(value, dict) and len(value) == 1, f"node '{where}' has a malformed value {value!r}")
        (tag, payload), = value.items()
        if tag == "node":
            self.check(payload in env, f"node '{where}' uses {payload!r} before it is defined")
            return env[payload]
        if tag == "tuple":
            return tuple(self.decode(self.expect(payload, list, where), env, where))
        if tag == "dict":
            pairs = self.decode(self.expect(payload, list, where), env, where)
            self.check(all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str | int) for p in pairs),
                       f"node '{where}' has a malformed dict")
            return dict(pairs)
        if tag == "slice":
            self.check(isinstance(payload, list) and len(payload) == 3, f"node '{where}' has a malformed slice")
            return slice(*self.decode(payload, env, where))
        constant = _decode_constant(tag, payload)
        self.check(constant is not _NOT_A_CONSTANT, f"node '{where}' has an unknown value {value!r}")
        return constant

    def meta(self, meta: Any, where: str) -> dict[str, Any]:
        self.check(isinstance(meta, dict), f"node '{where}' has malformed metadata")
        kept = {key: meta[key] for key in ("stack_trace", "slimgraph_replaces") if isinstance(meta.get(key), str)}
        if _is_list_of(meta.get("torch_fn"), str):
            kept["torch_fn"] = tuple(meta["torch_fn"])
        stack = meta.get("nn_module_stack")
        if isinstance(stack, list) and all(_is_list_of(e, str) and len(e) == 3 for e in stack):
            kept["nn_module_stack"] = {key: (path, kind) for key, path, kind in stack}
        return kept

    def guard_inputs(self, inputs: list[Any], where: str) -> list[dict[str, Any] | None]:
        for spec in inputs:
            ok = spec is None or (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                                  and isinstance(spec.get("dims"), list)
                                  and all(_is_dim(d) for d in spec["dims"]))
            self.check(ok, f"module '{where}' has malformed input guards {spec!r}")
        self.guards[where] = inputs
        return inputs

    def submodule(self, gm: fx.GraphModule, name: str) -> nn.Module:
        try:
            return gm.get_submodule(name)
        except AttributeError:
            raise self.error(f"'{name}' is used before it is listed as a module") from None

    def parse(self, text: str, kind: type, key: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise self.error(f"its {key} metadata is not valid JSON ({error})") from None
        return self.expect(value, kind, key)

    def field(self, entry: Any, key: str, kind: type, where: str) -> Any:
        self.check(isinstance(entry, dict) and key in entry, f"{where} lacks '{key}'")
        return self.expect(entry[key], kind, f"{where} {key}")

    def expect(self, value: Any, kind: type, where: str) -> Any:
        self.check(isinstance(value, kind), f"{where} should be a {kind.__name__}, not {type(value).__name__}")
        return value

    def check(self, condition: bool, problem: str) -> None:
        if not condition:
            raise self.error(problem)

    def error(self, problem: str) -> SerializationError:
        return SerializationError(f"cannot load {self.path}: {problem}")


# ---- values: JSON with tagged objects for what JSON lacks ------------------------------------------

_NOT_A_CONSTANT = object()


def _encode_value(value: Any, where: Callable[[], str]) -> Any:
    """JSON for an FX argument: node references and torch constants become one-key tagged objects."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [_encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str | int) for k in value):
        return {"dict": [[k, _encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    for tag, table in _CONSTANT_TABLES.items():
        if isinstance(value, _CONSTANT_TYPES[tag]) and value in table.values():
            return {tag: next(name for name, v in table.items() if v == value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": None}
    raise SerializationError(f"{where()} has an argument {value!r} of type {type(value).__name__}, which "
                             "cannot be saved (tensors must be attributes, read with get_attr)")


def _decode_constant(tag: str, payload: Any) -> Any:
    if tag in _CONSTANT_TABLES:
        return _CONSTANT_TABLES[tag].get(payload, _NOT_A_CONSTANT) if isinstance(payload, str) else _NOT_A_CONSTANT
    if tag == "float" and payload in ("inf", "-inf", "nan"):
        return float(payload)
    if tag == "device" and isinstance(payload, str) and _DEVICE.fullmatch(payload):
        try:
            return torch.device(payload)
        except RuntimeError:
            return _NOT_A_CONSTANT
    if tag == "ellipsis" and payload is None:
        return Ellipsis
    return _NOT_A_CONSTANT


def _torch_constants(kind: type) -> dict[str, Any]:
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


_DTYPES: dict[str, torch.dtype] = _torch_constants(torch.dtype)
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_CONSTANT_TYPES = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_CONSTANT_TABLES = {tag: _torch_constants(kind) for tag, kind in _CONSTANT_TYPES.items()}
# What safetensors stores natively; other dtypes (float8_e8m0fnu, float4_e2m1fn_x2…) go as raw bytes.
_SAFETENSORS_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                       torch.int16, torch.int8, torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
                       torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
                       torch.complex64}


# ---- targets: what a saved graph may call ---------------------------------------------------------

_IDENTIFIER_PATTERN = re.compile(r"(?!\d)\w+", re.ASCII)
_ATTRIBUTE_PATH = re.compile(r"\w+(\.\w+)*", re.ASCII)
_DEVICE = re.compile(r"[a-z_]+(:\d+)?")
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_REQUIRED_METADATA = ("format_version", "slimgraph_version", "torch_version", "pipeline", "report", "formats",
                      "graph", "sha256")
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


def _op_problem(namespace: str, name: str, overload: str | None) -> str | None:
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


@functools.cache
def _python_functions() -> dict[str, Callable[..., Any]]:
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
            if not name.startswith("_") and (in_c or in_functional) and _op_problem("aten", name, None) is None:
                table.setdefault(f"{module.__name__}.{name}", function)
    return table


@functools.cache
def _python_function_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, function in _python_functions().items():
        names.setdefault(id(function), name)
    return names


@functools.cache
def _tensor_methods() -> frozenset[str]:
    return frozenset(name for name in dir(torch.Tensor) if not name.startswith("_")
                     and callable(getattr(torch.Tensor, name)) and name not in _UNSAFE_METHODS)


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and bool(_IDENTIFIER_PATTERN.fullmatch(name)) and not keyword.iskeyword(name)


def _is_input_name(name: str) -> bool:
    """``x``, ``*args`` or ``**kwargs``: how fx spells a placeholder's target."""
    return _is_identifier(name[2:] if name.startswith("**") else name[1:] if name.startswith("*") else name)


def _public_attribute(name: Any) -> bool:
    return _is_identifier(name) and not name.startswith("_")


# ---- input guards ---------------------------------------------------------------------------------

class SavedInputGuards(nn.Module):
    """export's input-size checks, rebuilt from data: each dimension is a size, a range or free.

    ``inputs`` has one entry per guarded input, ``{"name": "input_ids", "dims": [2, {"symbol":
    "s70", "min": 0, "max": 256}]}`` (``None``: not checked). Inputs that share a symbol
    must have equal sizes there. Failures read like export's: ``Guard failed: x.size()[0] == 2``.
    """

    _is_impure = True  # its checks are the point: dead-code elimination must keep the call

    def __init__(self, inputs: list[dict[str, Any] | None]):
        super().__init__()
        self.inputs = inputs

    def forward(self, *args: Any) -> None:
        seen: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for spec, value in zip(self.inputs, args, strict=False):
            if spec is None or not isinstance(value, torch.Tensor):
                continue
            name, dims = spec["name"], spec["dims"]
            _guard(value.dim() == len(dims), f"{name}.dim() == {len(dims)}")
            for index, (dim, size) in enumerate(zip(dims, value.shape, strict=True)):
                where = f"{name}.size()[{index}]"
                if isinstance(dim, int):
                    _guard(size == dim, f"{where} == {dim}")
                elif isinstance(dim, dict):
                    _guard(size >= dim["min"], f"{dim['min']} <= {where}")
                    _guard(dim["max"] is None or size <= dim["max"], f"{where} <= {dim['max']}")
                    symbol = dim["symbol"]
                    _guard(sizes.setdefault(symbol, size) == size, f"{where} == {seen.get(symbol)}")
                    seen.setdefault(symbol, where)


def _guard(condition: bool, text: str) -> None:
    if not condition:
        raise AssertionError(f"Guard failed: {text}")


def _is_guards(module: nn.Module) -> bool:
    inner = module.guards if isinstance(module, _ExplainedGuards) else module
    return isinstance(inner, GuardsFn | SavedInputGuards)


def _guard_inputs(gm: fx.GraphModule, name: str) -> list[dict[str, Any] | None]:
    """The guards of module ``name``, from its call's input shapes and the export range constraints."""
    module = gm.get_submodule(name)
    inner = module.guards if isinstance(module, _ExplainedGuards) else module
    if isinstance(inner, SavedInputGuards):
        return inner.inputs
    call = next(iter(gm.graph.find_nodes(op="call_module", target=name)), None)
    ranges = {str(symbol): r for symbol, r in (getattr(gm, "range_constraints", None) or {}).items()}
    inputs = []
    for arg in call.args if call is not None else ():
        value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if not isinstance(value, torch.Tensor) or arg.op != "placeholder":
            inputs.append(None)
            continue
        inputs.append({"name": arg.target, "dims": [_guard_dim(size, ranges) for size in value.shape]})
    return inputs


def _guard_dim(size: int | torch.SymInt, ranges: dict[str, Any]) -> int | dict[str, Any] | None:
    if isinstance(size, int):
        return size
    expr = size.node.expr
    if not expr.is_Symbol:
        return None  # a derived size (s0 * 2): the graph's own asserts check it
    bounds = ranges.get(str(expr))
    low, high = (bounds.lower, bounds.upper) if bounds is not None else (0, None)
    return {"symbol": str(expr), "min": int(low) if isinstance(low, int | sympy.Integer) else 0,
            "max": int(high) if isinstance(high, int | sympy.Integer) else None}


def _is_dim(dim: Any) -> bool:
    if dim is None or type(dim) is int:
        return True
    return (isinstance(dim, dict) and isinstance(dim.get("symbol"), str) and type(dim.get("min")) is int
            and (dim.get("max") is None or type(dim.get("max")) is int))


def _first_input(inputs: list[Any]) -> str:
    return next((spec["name"] for spec in inputs if spec is not None), "x")


# ---- checksum and small helpers -------------------------------------------------------------------

def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata (but the digest) and of each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _refuse(problem: str) -> None:
    raise SerializationError(f"cannot save: {problem}")


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value


def _is_plain_json(value: Any) -> bool:
    try:
        return json.loads(_dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _qualified_name(value: Any) -> str:
    module = getattr(value, "__module__", None) or ""
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or repr(value)
    return f"{module}.{name}" if module else name


def _type_name(kind: Any) -> str:
    return kind if isinstance(kind, str) else _qualified_name(kind)


def _class_name(gm: fx.GraphModule) -> str:
    name = type(gm).__name__
    return name if _is_identifier(name) else "GraphModule"
