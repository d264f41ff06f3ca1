"""``save`` / ``load``: an optimized ``GraphModule`` as one ``.safetensors`` file.

Example::

    fast = slimgraph.optimize(model, "cleanup, quantize(format=int4, group_size=32)", (x,))
    slimgraph.save(fast, "model.safetensors")
    same = slimgraph.load("model.safetensors")
    assert torch.equal(same(x), fast(x))

The file is a plain safetensors file: every parameter, buffer and tensor constant is
a tensor keyed by its qualified name (``h_0_attn_c_attn_int4_0.qweight``); the
safetensors metadata (str → str) holds:

- ``format`` (``slimgraph.graph``), ``format_version`` (``3``), ``slimgraph_version``,
  ``torch_version``: what wrote the file. v2 and v3 each changed one meaning: the grid
  that HIGGS 4-bit p=2 codes index (sign-symmetric, then with shared first coordinates
  too), so ``load`` refuses such layers in v1 and v2 files;
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

The modules: this one writes and checks the file; ``encode`` turns the ``graph``
entry into JSON and ``decode`` back; ``values`` spells node arguments in JSON;
``allow_list`` says what a saved graph may call and name; ``guards`` keeps the
input-size guards as data.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import slimgraph
from slimgraph.errors import SerializationError
from slimgraph.ir.nodes import module_path
from slimgraph.serialize.decode import decode_graph
from slimgraph.serialize.encode import encode_graph

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SerializationError", "TorchVersionWarning", "load", "save"]

FORMAT_NAME = "slimgraph.graph"
FORMAT_VERSION = 3
_REQUIRED_METADATA = ("format_version", "slimgraph_version", "torch_version", "pipeline", "report", "formats",
                      "graph", "sha256")


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
    stored, graph = encode_graph(model)
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
        return decode_graph(path, metadata, tensors)
    except RecursionError:
        raise SerializationError(f"cannot load {path}: its graph is nested too deeply") from None


# ---- save: the metadata around the graph ---------------------------------------------------------

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
            name = node.target._opname
            formats[module_path(node) or node.name] = name.split("_", 1)[1] if name.startswith(("linear_", "conv_")) else name
    return formats


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


# ---- load: read the file and check what wrote it -------------------------------------------------

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
