"""slimgraph.save / slimgraph.load: bit-exact round trips, and files that are refused without running them."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_flatten

import slimgraph
from slimgraph import models, serialize
from slimgraph.kernels import FORMATS
from slimgraph.passes.quantize import Quantize
from slimgraph.serialize import SerializationError, TorchVersionWarning

QUANTIZE = ["quantize(format=int8)", "quantize(format=int4, group_size=32)", "quantize(format=nf4, double_quant=true)"]


def round_trip(gm: fx.GraphModule, tmp_path: Path, *args, **kwargs) -> fx.GraphModule:
    """Save and load ``gm``; assert equal outputs (torch.equal) and an equal state dict, tensor by tensor."""
    loaded = slimgraph.load(slimgraph.save(gm, tmp_path / "model.safetensors"))
    assert_same_outputs(gm(*args, **kwargs), loaded(*args, **kwargs))
    assert_same_state(gm, loaded)
    return loaded


def assert_same_outputs(want, got) -> None:
    want_leaves, want_spec = tree_flatten(want)
    got_leaves, got_spec = tree_flatten(got)
    assert type(got) is type(want) and got_spec == want_spec
    for w, g in zip(want_leaves, got_leaves, strict=True):
        assert torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g


def assert_same_state(want: nn.Module, got: nn.Module) -> None:
    want_state, got_state = want.state_dict(keep_vars=True), got.state_dict(keep_vars=True)
    assert list(got_state) == list(want_state)
    for name, w in want_state.items():
        g = got_state[name]
        assert (g.dtype, g.shape, type(g), g.requires_grad) == (w.dtype, w.shape, type(w), w.requires_grad), name
        assert torch.equal(as_bytes(g), as_bytes(w)), name  # bytes, so NaNs compare too
    assert [n for n, _ in got.named_buffers()] == [n for n, _ in want.named_buffers()]


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def forge(path: Path, *, metadata=None, graph=None, tensors=None, sign: bool = True) -> None:
    """Rewrite a saved file; ``sign=True`` recomputes the checksum, as a deliberate attacker would."""
    with safe_open(path, framework="pt") as file:
        meta, stored = dict(file.metadata()), {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
    if graph is not None:
        decoded = json.loads(meta["graph"])
        graph(decoded)
        meta["graph"] = json.dumps(decoded)
    meta.update(metadata or {})
    if tensors is not None:
        tensors(stored)
    if sign:
        meta["sha256"] = serialize._digest(meta, stored)
    save_file(stored, path, meta)


def node_entry(graph: dict, op: str) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == op)


@pytest.fixture
def saved_mlp(mlp, tmp_path):
    model, args = mlp
    gm = slimgraph.optimize(model, "cleanup, quantize(format=int8, min_features=8)", args)
    return gm, args, slimgraph.save(gm, tmp_path / "mlp.safetensors")


# ---- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["mlp", "cnn"])
@pytest.mark.parametrize("passes", [slimgraph.DEFAULT_PIPELINE, *QUANTIZE])
def test_small_models_round_trip_bit_exact(request, fixture, passes, tmp_path):
    model, args = request.getfixturevalue(fixture)
    round_trip(slimgraph.optimize(model, passes, args), tmp_path, *args)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_registered_format_round_trips_bit_exact(fmt, tmp_path):
    """New formats are covered as they register: their packed dtypes (float8, raw e8m0 bytes…) included."""
    model, x = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval(), torch.randn(4, 64)
    optimized = slimgraph.optimize(model, [Quantize(format=fmt)], (x,))
    loaded = round_trip(optimized, tmp_path, x)
    applied = optimized.report.records[0].status == "applied"
    assert set(loaded.meta["slimgraph_saved"]["formats"].values()) == ({fmt} if applied else set())


@pytest.mark.parametrize("fmt", ["w8a8", "llm_int8"])
def test_smoothquant_models_round_trip_bit_exact(fmt, tmp_path):
    """SmoothQuant's float32 ``smooth`` buffer (1/s per input channel) is saved and read back with the int8 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    scale = torch.ones(64)
    scale[[3, 40]] = 30.0  # outlier channels, so the smoothing factors are far from 1
    calibration = [(torch.randn(4, 64) * scale,) for _ in range(3)]
    x = torch.randn(4, 64) * scale
    optimized = slimgraph.optimize(model, f"quantize(format={fmt}, smooth=0.5)", (x,), calibration=calibration,
                                   strict=True)
    loaded = round_trip(optimized, tmp_path, x)
    smooth = {path: b for path, b in loaded.named_buffers() if path.endswith(".smooth")}
    assert len(smooth) == 2 and all(b.dtype == torch.float32 and not torch.all(b == 1) for b in smooth.values())
    assert set(loaded.meta["slimgraph_saved"]["formats"].values()) == {fmt}


def test_hf_models_round_trip_bit_exact(hf_model, tmp_path):
    _, model, inputs = hf_model
    round_trip(slimgraph.optimize(model, example_kwargs=inputs), tmp_path, **inputs)


# One file with every format: block 0 in int8, block 1 in int4, the rest (block 2, BERT's pooler) in nf4.
MIXED_FORMATS = [Quantize(format="int8", include=r"\.0\."), Quantize(format="int4", group_size=32, include=r"\.1\."),
                 Quantize(format="nf4", double_quant=True)]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hf_models_quantized_to_every_format_round_trip_bit_exact(name, tmp_path):
    model, inputs = getattr(models, name)(layers=3), {"input_ids": torch.randint(0, 128, (2, 12))}
    optimized = slimgraph.optimize(model, ["cleanup", "fold_constants", *MIXED_FORMATS], example_kwargs=inputs)
    loaded = round_trip(optimized, tmp_path, **inputs)
    saved = loaded.meta["slimgraph_saved"]
    assert saved["pipeline"] == optimized.report.pipeline
    applied = {p.format for p, r in zip(MIXED_FORMATS, optimized.report.records[2:], strict=True)
               if r.status == "applied"}  # a pass another change broke is rolled back, not our concern here
    assert set(saved["formats"].values()) == applied
    assert [r["status"] for r in saved["report"]] == [r.status for r in optimized.report.records]


@pytest.mark.slow
def test_pretrained_minilm_round_trips_on_real_sentences(minilm, tmp_path):
    model, batch = minilm
    optimized = slimgraph.optimize(model, "cleanup, fold_constants, quantize(format=int8)", example_kwargs=batch)
    round_trip(optimized, tmp_path, **batch)


def test_dynamic_shapes_run_at_new_sizes_after_load(tmp_path):
    model, inputs = models.gpt2(), {"input_ids": torch.randint(0, 128, (2, 12))}
    dynamic = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=256)}}
    optimized = slimgraph.optimize(model, "cleanup, quantize(format=int4, group_size=32)",
                                   example_kwargs=inputs, dynamic_shapes=dynamic)
    loaded = round_trip(optimized, tmp_path, **inputs)
    other = {"input_ids": torch.randint(0, 128, (3, 20))}
    assert_same_outputs(optimized(**other), loaded(**other))
    assert loaded.meta["slimgraph_symbols"] == optimized.meta["slimgraph_symbols"]
    with pytest.raises(AssertionError, match=r"Guard failed: input_ids.size\(\)\[1\] <= 256"):
        loaded(input_ids=torch.randint(0, 128, (2, 300)))


def test_static_input_guards_survive_the_round_trip(saved_mlp):
    _, _, path = saved_mlp
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[0\] == 4: the graph was captured "
                       r"for the example inputs' sizes.*dynamic_shapes="):
        slimgraph.load(path)(torch.randn(3, 16))


class Gain:
    """A plain Python input: torch.export rejects it, so capture falls back to symbolic_trace."""

    def __init__(self, value: float):
        self.value = value


class WithGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, gain):
        return torch.relu(self.lin(x)) * gain.value


def test_symbolic_trace_graphs_round_trip(tmp_path):
    model, args = WithGain(), (torch.randn(2, 4), Gain(3.0))
    optimized = slimgraph.optimize(model, "cleanup", args)
    assert optimized.meta["slimgraph_capture"]["strategy"] == "symbolic_trace"
    round_trip(optimized, tmp_path, *args)


class Constants(nn.Module):
    """Arguments of every kind the graph encodes: slices, ellipsis, dtypes, devices, layouts, infinities."""

    def forward(self, x):
        y = x[..., 1:3].to(torch.float64).contiguous(memory_format=torch.contiguous_format)
        zeros = torch.zeros(2, layout=torch.strided, device="cpu", dtype=torch.float64)
        return {"masked": y.masked_fill(y > 0, float("-inf")).clamp(max=float("inf")) + zeros.sum(),
                "nan": torch.nan_to_num(y, nan=float("nan"), posinf=-0.0)}


def test_arguments_of_every_kind_round_trip(tmp_path):
    gm, x = fx.symbolic_trace(Constants()), torch.randn(2, 4)
    loaded = round_trip(gm, tmp_path, x)
    assert loaded.code == gm.code


def test_tensor_attributes_of_every_kind_keep_their_identity(saved_mlp, tmp_path):
    """Tied weights stay one tensor; non-persistent buffers, constants and raw-byte dtypes come back."""
    gm, args, _ = saved_mlp
    shared = gm.get_buffer("net_0_int8_0.qweight")
    tied = nn.Module()
    tied.register_buffer("same", shared)
    tied.weight = nn.Parameter(torch.randn(3, 5).t())  # not contiguous
    gm.add_submodule("tied", tied)
    gm.register_buffer("scratch", torch.arange(6.0).reshape(2, 3)[:, 1], persistent=False)
    gm.table = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)
    gm.scales_e8m0 = torch.tensor([1.0, 4.0, 0.25]).to(torch.float8_e8m0fnu)  # safetensors lacks it: raw bytes

    loaded = round_trip(gm, tmp_path, *args)

    assert loaded.get_submodule("tied").same is loaded.get_buffer("net_0_int8_0.qweight")
    assert "scratch" not in loaded.state_dict() and torch.equal(loaded.scratch, gm.scratch)
    assert loaded.tied.weight.requires_grad and isinstance(loaded.tied.weight, nn.Parameter)
    for name in ("table", "scales_e8m0"):
        got, want = getattr(loaded, name), getattr(gm, name)
        assert got.dtype == want.dtype and torch.equal(as_bytes(got), as_bytes(want))


@settings(max_examples=8, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=4), batch=st.integers(1, 3),
       activation=st.sampled_from([nn.ReLU, nn.GELU, nn.Tanh, nn.Identity]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_random_mlps_round_trip_bit_exact(tmp_path_factory, widths, batch, activation, dtype):
    layers = [m for a, b in zip(widths, widths[1:], strict=False) for m in (nn.Linear(a, b), activation())]
    model, x = nn.Sequential(*layers).to(dtype).eval(), torch.randn(batch, widths[0], dtype=dtype)
    gm = slimgraph.capture(model, (x,))
    round_trip(gm, tmp_path_factory.mktemp("mlp"), x)


# ---- the file -------------------------------------------------------------------------------------

def test_file_is_plain_safetensors_with_json_metadata(saved_mlp):
    gm, _, path = saved_mlp
    with safe_open(path, framework="pt") as file:
        meta, names = file.metadata(), set(file.keys())  # noqa: SIM118
    assert names == set(gm.state_dict())
    assert meta["format"] == "slimgraph.graph" and meta["format_version"] == "3"
    assert meta["slimgraph_version"] == slimgraph.__version__ and meta["torch_version"] == torch.__version__
    assert meta["pipeline"] == gm.report.pipeline
    assert json.loads(meta["formats"]) == {"net.0": "int8", "net.3": "int8"}
    assert [p["pass"] for p in json.loads(meta["report"])] == [r.pass_text for r in gm.report.records]
    graph = json.loads(meta["graph"])
    linear = next(n for n in graph["nodes"] if n["op"] == "call_function" and "slimgraph" in n["target"]["op"])
    assert linear["target"] == {"op": "slimgraph::linear_int8", "overload": "default"}
    assert linear["meta"]["nn_module_stack"] and "stack_trace" in linear["meta"]
    assert {"name": "_guards_fn", "kind": "input_guards",
            "inputs": [{"name": "x", "dims": [4, 16]}]} in graph["modules"]
    assert len(meta["sha256"]) == 64
    assert os.listdir(path.parent) == [path.name]  # written beside and renamed: no partial file left


# ---- refused at save ------------------------------------------------------------------------------

def scale_by_two(x):
    return x * 2


fx.wrap("scale_by_two")


class CallsPython(nn.Module):
    def forward(self, x):
        return scale_by_two(x) + 1


def test_python_function_is_refused_at_save_with_node_target_module_and_fix(tmp_path):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = CallsPython()

        def forward(self, x):
            return self.block(x)

    gm = fx.symbolic_trace(Outer())
    path = tmp_path / "model.safetensors"
    with pytest.raises(SerializationError, match=r"node 'scale_by_two' .* in module 'block' calls the function "
                       r"\S*scale_by_two.*torch.export.*torch.library.custom_op"):
        slimgraph.save(gm, path)
    assert not path.exists()


def test_leaf_module_call_is_refused_at_save(tmp_path):
    gm = slimgraph.capture(WithGain(), (torch.randn(2, 4), Gain(1.0)), leaf_modules=(nn.Linear,))
    with pytest.raises(SerializationError, match=r"calls module 'lin' \(Linear\).*torch.export"):
        slimgraph.save(gm, tmp_path / "model.safetensors")


def test_file_operator_is_refused_at_save(tmp_path):
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch.ops.aten.save.default, (x, "/tmp/stolen"))
    graph.output(x)
    with pytest.raises(SerializationError, match=r"aten::save.default reads or writes files"):
        slimgraph.save(fx.GraphModule(nn.Module(), graph), tmp_path / "model.safetensors")


def test_save_rejects_what_is_not_a_graph_module(mlp, tmp_path):
    model, _ = mlp
    with pytest.raises(TypeError, match=r"expects the torch.fx.GraphModule .* got MLP: optimize the model first"):
        slimgraph.save(model, tmp_path / "model.safetensors")


# ---- refused at load ------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999])
def test_truncated_file_is_refused(saved_mlp, keep):
    _, _, path = saved_mlp
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SerializationError, match="is truncated or not a slimgraph file"):
        slimgraph.load(path)


def test_tampered_tensor_byte_is_detected(saved_mlp):
    _, _, path = saved_mlp
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(SerializationError, match=r"has been modified since it was saved \(checksum mismatch\)"):
        slimgraph.load(path)


def test_tampered_json_is_detected(saved_mlp):
    _, _, path = saved_mlp
    forge(path, graph=lambda g: node_entry(g, "call_function").update(
        target={"op": "aten::sigmoid", "overload": "default"}), sign=False)
    with pytest.raises(SerializationError, match=r"modified since it was saved \(checksum mismatch\)"):
        slimgraph.load(path)


def test_newer_format_version_asks_for_an_upgrade(saved_mlp):
    _, _, path = saved_mlp
    forge(path, metadata={"format_version": "4", "slimgraph_version": "9.0.0"}, sign=False)
    with pytest.raises(SerializationError, match=r"saved by slimgraph 9.0.0 with format v4; this slimgraph "
                       rf"\({slimgraph.__version__}\) reads v3: upgrade slimgraph"):
        slimgraph.load(path)


@pytest.mark.parametrize("version", [1, 2])
def test_older_files_load_unless_a_layer_indexes_a_retired_pair_grid(tmp_path, version):
    model, args = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (torch.randn(2, 64),)
    for options, loads in [("bits=4, p=1", True), ("bits=3, p=2", True), ("bits=4, p=2", False)]:
        gm = slimgraph.optimize(model, f"quantize(format=higgs, {options}, group_size=64)", args)
        assert torch.ops.slimgraph.linear_higgs.default in [n.target for n in gm.graph.nodes]
        path = slimgraph.save(gm, tmp_path / "higgs.safetensors")
        forge(path, metadata={"format_version": str(version)})
        if loads:
            torch.testing.assert_close(slimgraph.load(path)(*args), gm(*args), rtol=0, atol=0)
            continue
        with pytest.raises(SerializationError, match=rf"node '.*' is a 4-bit HIGGS layer with p=2 from a format "
                           rf"v{version} file: its codes index a 2-D grid that format v3 replaced; quantize and "
                           r"save the model again"):
            slimgraph.load(path)


def test_other_torch_version_loads_with_a_warning_naming_both(saved_mlp):
    gm, args, path = saved_mlp
    forge(path, metadata={"torch_version": "1.13.1"})
    with pytest.warns(TorchVersionWarning, match=rf"saved with torch 1.13.1 and is loaded with torch {re.escape(torch.__version__)}"):
        loaded = slimgraph.load(path)
    assert torch.equal(loaded(*args), gm(*args))


def test_same_torch_minor_version_loads_silently(saved_mlp):
    _, _, path = saved_mlp
    major, minor = torch.__version__.split(".")[:2]
    forge(path, metadata={"torch_version": f"{major}.{minor}.99"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchVersionWarning)
        slimgraph.load(path)


def test_unknown_operator_names_op_node_and_saving_versions(saved_mlp):
    _, _, path = saved_mlp
    forge(path, metadata={"slimgraph_version": "0.9.0"}, graph=lambda g: next(
        n for n in g["nodes"] if n["name"] == "linear_int8_default")["target"].update(op="slimgraph::linear_fp3"))
    with pytest.raises(SerializationError, match=r"node 'linear_int8_default': operator slimgraph::linear_fp3.default "
                       r"is not registered.*saved by slimgraph 0.9.0 with torch"):
        slimgraph.load(path)


@pytest.mark.parametrize("edit", ["one argument fewer", "one argument more", "unknown keyword"])
def test_arguments_that_no_longer_fit_the_operator_name_node_schema_and_fix(saved_mlp, edit):
    """A file saved before an operator's signature changed (linear_w8a8 gained ``smooth``) must not
    load with its arguments shifted."""
    _, _, path = saved_mlp

    def change(graph):
        node = next(n for n in graph["nodes"] if n["name"] == "linear_int8_default")
        if edit == "one argument fewer":
            node["args"] = node["args"][:-1]
        elif edit == "one argument more":
            node["args"] = [*node["args"], None]
        else:
            node["kwargs"] = {"smooth": None}

    forge(path, metadata={"slimgraph_version": "0.9.0"}, graph=change)
    with pytest.raises(SerializationError, match=r"node 'linear_int8_default' calls slimgraph.linear_int8.default: "
                       r"its \d arguments.* do not fit this process's schema slimgraph::linear_int8\(Tensor x.*saved "
                       r"by slimgraph 0.9.0, whose operator took other arguments: optimize and save the model again"):
        slimgraph.load(path)


# A forged file carries a valid checksum (anyone can compute one): the allow-list is what keeps it inert.
MARKER = "slimgraph_serialize_test_marker"

FORGERIES = {
    "python function": (lambda g: node_entry(g, "call_function").update(target={"python": "os.system"}),
                        r"calls 'os.system', which is not one of the functions"),
    "file operator": (lambda g: node_entry(g, "call_function").update(
        target={"op": "aten::save", "overload": None}), r"aten::save reads or writes files"),
    "attribute path": (lambda g: node_entry(g, "get_attr").update(
        target=f'x")or __import__("os").system("touch {MARKER}'), r"reads .*which the file does not contain"),
    "input name": (lambda g: node_entry(g, "placeholder").update(
        target=f"x=__import__('os').system('touch {MARKER}')"), r"is not an identifier"),
    "keyword": (lambda g: node_entry(g, "call_function").update(
        kwargs={f"x=__import__('os').system('touch {MARKER}'),y": 1}), r"keyword that is not an identifier"),
    "method": (lambda g: node_entry(g, "call_function").update(op="call_method", target="__reduce_ex__"),
               r"calls method '__reduce_ex__', which is not allowed"),
    "private attribute": (lambda g: node_entry(g, "call_function").update(
        target={"python": "builtins.getattr"}, args=[{"node": "x"}, "__class__"]), r"private attribute"),
    "value": (lambda g: node_entry(g, "call_function").update(args=[{"pickle": "gASV"}]), r"unknown value"),
    "pytree type": (lambda g: g["codegen"].update(in_spec=g["codegen"]["in_spec"].replace(
        "builtins.tuple", "evil.Payload")), r"uses the types .*evil.Payload.*import the library"),
    "forward inputs": (lambda g: g["codegen"].update(inputs=["input):\n import os#"]), r"not all Python identifiers"),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_graph_with_a_valid_checksum_is_refused(saved_mlp, forgery, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, path = saved_mlp
    change, message = FORGERIES[forgery]
    forge(path, graph=change)
    with pytest.raises(SerializationError, match=message):
        slimgraph.load(path)
    assert not (tmp_path / MARKER).exists()


def test_missing_tensor_and_wrong_dtype_are_named(saved_mlp):
    gm, _, path = saved_mlp
    forge(path, tensors=lambda t: t.pop("net_0_int8_0.scales"))
    with pytest.raises(SerializationError, match=r"reads tensor 'net_0_int8_0.scales', which the file does not contain"):
        slimgraph.load(path)
    slimgraph.save(gm, path)
    forge(path, tensors=lambda t: t.update({"net_0_int8_0.scales": t["net_0_int8_0.scales"].half()}))
    with pytest.raises(SerializationError, match=r"'net_0_int8_0.scales' is torch.float16 \[32\] in the file but "
                       r"the graph records torch.float32 \[32\]"):
        slimgraph.load(path)


class WritesMarker:
    """Unpickling this runs ``open(path, "w")``: the proof that a file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_and_torch_save_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    for name, write in [("model.pkl", lambda p: p.write_bytes(pickle.dumps(WritesMarker(str(marker))))),
                        ("model.pt", lambda p: torch.save({"x": WritesMarker(str(marker))}, p))]:
        path = tmp_path / name
        write(path)
        with pytest.raises(SerializationError, match=r"truncated or not a slimgraph file.*never unpickles"):
            slimgraph.load(path)
        assert not marker.exists()


def test_plain_safetensors_weights_are_not_a_graph(mlp, tmp_path):
    model, _ = mlp
    save_file(model.state_dict(), tmp_path / "weights.safetensors", {"format": "pt"})
    with pytest.raises(SerializationError, match=r"with format 'pt', not a saved slimgraph graph.*load_file"):
        slimgraph.load(tmp_path / "weights.safetensors")


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        slimgraph.load(tmp_path / "absent.safetensors")
    with pytest.raises(SerializationError, match="is a directory"):
        slimgraph.load(tmp_path)


def test_load_never_unpickles(saved_mlp, monkeypatch):
    gm, args, path = saved_mlp

    def refuse(*_, **__):
        raise AssertionError("load() unpickled something")

    for owner, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    assert torch.equal(slimgraph.load(path)(*args), gm(*args))
