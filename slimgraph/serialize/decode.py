"""The ``graph`` JSON of a file, checked field by field and rebuilt as a ``GraphModule``.

The JSON comes from a file anyone may have written, so every field is checked before
use: its type, that each name torch.fx pastes into generated source is an identifier,
that each call target is on the allow-list, that each tensor matches what the graph
records. Any problem is a ``SerializationError`` naming the field.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from slimgraph.errors import SerializationError
from slimgraph.serialize.allow_list import (
    ATTRIBUTE_PATH,
    arguments_problem,
    is_identifier,
    is_input_name,
    op_problem,
    public_attribute,
    python_functions,
    safe_class_name,
    tensor_methods,
)
from slimgraph.serialize.guards import is_guard_spec, rebuild_guards
from slimgraph.serialize.values import DTYPES, NOT_A_CONSTANT, decode_constant, decode_meta

_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def decode_graph(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The ``GraphModule`` of a file whose format and checksum ``load`` has checked."""
    return _Loader(path, metadata, tensors).build()


class _Loader:
    """Turns validated metadata and tensors into a GraphModule; every problem is a SerializationError."""

    def __init__(self, path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]):
        self.path, self.metadata, self.file_tensors = path, metadata, tensors
        self.graph_json = self.parse(metadata["graph"], dict, "graph")
        self.tensors: dict[str, torch.Tensor] = {}
        self.guards: dict[str, list[Any]] = {}

    def build(self) -> fx.GraphModule:
        graph_json = self.graph_json
        class_name = safe_class_name(self.field(graph_json, "class_name", str, "graph"))
        gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name)
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
            self.check(ATTRIBUTE_PATH.fullmatch(name) is not None, f"module name {name!r} is not a dotted path")
            parent, _, local = name.rpartition(".")
            owner = self.submodule(gm, parent)
            self.check(local not in owner._modules, f"module '{name}' is listed twice")
            if "alias_of" in entry:
                owner.add_module(local, self.submodule(gm, self.field(entry, "alias_of", str, name)))
            elif entry.get("kind") == "input_guards":
                owner.add_module(local, rebuild_guards(self.guard_inputs(entry, name)))
            else:
                self.check(entry.get("kind") == "module", f"module '{name}' has unknown kind {entry.get('kind')!r}")
                owner.add_module(local, nn.Module())
                owner._modules[local].training = self.field(entry, "training", bool, name)

    def guard_inputs(self, entry: dict[str, Any], where: str) -> list[dict[str, Any] | None]:
        inputs = self.field(entry, "inputs", list, where)
        for spec in inputs:
            self.check(is_guard_spec(spec), f"module '{where}' has malformed input guards {spec!r}")
        self.guards[where] = inputs
        return inputs

    def add_tensors(self, gm: fx.GraphModule, entries: list[Any]) -> None:
        for entry in entries:
            name = self.field(entry, "name", str, "tensor")
            self.check(ATTRIBUTE_PATH.fullmatch(name) is not None and name not in self.tensors,
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
        self.check(dtype_name in DTYPES and all(type(s) is int and s >= 0 for s in shape),
                   f"tensor '{name}' records dtype {dtype_name!r} and shape {shape}, which are not valid")
        tensor = self.file_tensors.get(name)
        if tensor is None:
            raise self.error(f"the graph reads tensor '{name}', which the file does not contain")
        dtype = DTYPES[dtype_name]
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
        self.check(all(is_identifier(n) for n in inputs),
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
            with warnings.catch_warnings():  # torch's own deprecation of LeafSpec, not ours to act on
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
            self.check(all(is_identifier(k) for k in keys),
                       f"keyword inputs {keys} are not all Python identifiers")

    def add_nodes(self, graph: fx.Graph, entries: list[Any]) -> None:
        env: dict[str, fx.Node] = {}
        for index, entry in enumerate(entries):
            self.check(isinstance(entry, dict), f"node {index} is not an object")
            name, op = self.field(entry, "name", str, f"node {index}"), entry.get("op")
            self.check(is_identifier(name) and name not in env,
                       f"node name {name!r} is not an identifier or is used twice")
            self.check(op in _NODE_OPS, f"node '{name}' has unknown op {op!r}")
            self.check(op != "output" or entry.get("target") == "output", "the output node has another target")
            self.check((op == "output") == (index == len(entries) - 1), "the output node must come last, once")
            target = self.target(name, op, entry.get("target"))
            args = [self.decode(a, env, name) for a in self.field(entry, "args", list, name)]
            kwargs = self.field(entry, "kwargs", dict, name)
            self.check(all(is_identifier(k) for k in kwargs), f"node '{name}' has a keyword that is not an identifier")
            kwargs = {k: self.decode(v, env, name) for k, v in kwargs.items()}
            if target is getattr:
                self.check(len(args) >= 2 and public_attribute(args[1]),
                           f"node '{name}' reads a private attribute {args[1:2]!r}")
            if isinstance(target, torch._ops.OpOverload) and (problem := arguments_problem(target, args, kwargs)):
                raise self.error(f"node '{name}' calls {target}: {problem}; the file was saved by slimgraph "
                                 f"{self.metadata['slimgraph_version']}, whose operator took other arguments: "
                                 "optimize and save the model again with this version")
            if problem := retired_encoding(target, args, kwargs, int(self.metadata["format_version"])):
                raise self.error(f"node '{name}' {problem}")
            node = graph.create_node(op, target, tuple(args), kwargs, name=name)
            self.check(node.name == name, f"node name '{name}' clashes with a Python name")
            meta = entry.get("meta")
            self.check(isinstance(meta, dict), f"node '{name}' has malformed metadata")
            node.meta.update(decode_meta(meta))
            env[name] = node
        self.check(bool(entries), "the graph has no nodes")

    def target(self, name: str, op: str, target: Any) -> Any:
        if op == "call_function":
            self.check(isinstance(target, dict), f"node '{name}' has a malformed target {target!r}")
            return self.call_target(name, target)
        self.check(isinstance(target, str), f"node '{name}' has a malformed target {target!r}")
        if op == "placeholder":
            self.check(is_input_name(target), f"input {target!r} is not an identifier")
        elif op == "get_attr":
            self.check(target in self.tensors, f"node '{name}' reads '{target}', which the file does not contain")
        elif op == "call_module":
            self.check(target in self.guards, f"node '{name}' calls module '{target}', which is not input guards")
        elif op == "call_method":
            self.check(target in tensor_methods(), f"node '{name}' calls method {target!r}, which is not allowed")
        return target

    def call_target(self, name: str, target: dict[str, Any]) -> Callable[..., Any]:
        if "python" in target:
            function = python_functions().get(target["python"])
            self.check(function is not None, f"node '{name}' calls {target['python']!r}, which is not "
                       "one of the functions a saved graph may call")
            return function
        qualified, overload = target.get("op"), target.get("overload")
        self.check(isinstance(qualified, str) and qualified.count("::") == 1 and
                   (overload is None or isinstance(overload, str)), f"node '{name}' has a malformed target {target!r}")
        namespace, op_name = qualified.split("::")
        problem = op_problem(namespace, op_name, overload)
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
        constant = decode_constant(tag, payload)
        self.check(constant is not NOT_A_CONSTANT, f"node '{where}' has an unknown value {value!r}")
        return constant

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


def retired_encoding(target: Any, args: list, kwargs: dict, version: int) -> str | None:
    """Why a node from a file of format ``version`` would compute something else today, or ``None``.

    v3: HIGGS 4-bit p=2 codes index the sign-symmetric 2-D grid whose magnitudes share their
    first coordinate in pairs (``kernels/grids.py``). v1 and v2 files' codes index the grids
    before it (unconstrained; sign-symmetric only), which are not shipped any more.
    """
    if version >= 3 or target is not torch.ops.slimgraph.linear_higgs.default:
        return None
    bound = dict(zip([a.name for a in target._schema.arguments], args, strict=False)) | kwargs
    if (bound.get("bits"), bound.get("p")) != (4, 2):
        return None
    return (f"is a 4-bit HIGGS layer with p=2 from a format v{version} file: its codes index a 2-D grid "
            "that format v3 replaced; quantize and save the model again")
