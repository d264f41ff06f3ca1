"""Weight quantization on the CPU, side by side: is every format faster than fp32 where it matters?

Two models, the way a user runs them (``slimgraph.optimize(model, "cleanup, fuse_activations,
quantize(...)")``; ``fp32-graph`` is that pipeline without ``quantize``, to show what the graph
rewrites alone are worth):
``stack``: 8 stacked ``Linear(2048, 2048)``; ``gpt2_mlp``: a GPT-2-medium MLP block
(``c_fc`` 1024→4096, GELU, ``c_proj`` 4096→1024, Hugging Face ``Conv1D``). Each runs
at batch 1 (decode) and 64 as fp32 eager, bf16 eager, every slimgraph format, and
torchao's ``Int8WeightOnlyConfig`` eager and under ``torch.compile`` (the peer).
Timings are medians over interleaved rounds; in each round every variant runs two
untimed calls and then the timed one, so each is timed in steady state. The
bandwidth bound of a variant is its weight bytes divided by the measured read
bandwidth of a large tensor copy: no weight-streaming kernel can beat it.

    .venv/bin/python benchmarks/quant_cpu.py [--runs 15] [--batches 1 64] [--models stack gpt2_mlp]

Writes benchmarks/results/quant_cpu.json and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from native_gemv import memcpy_bandwidth_gbs  # benchmarks/ is on sys.path when a script here runs
from torch import nn

import slimgraph
from slimgraph.kernels import native

RESULTS = Path(__file__).parent / "results" / "quant_cpu.json"
GRAPH_PASSES = "cleanup, fuse_activations"  # GPT-2's GELU: eight ops → one (~40 µs at batch 1)
FORMATS = {
    "fp32-graph": "",
    "int8": "quantize(format=int8)",
    "int4": "quantize(format=int4, group_size=128)",
    "nf4": "quantize(format=nf4)",
    "fp8": "quantize(format=fp8)",
    "fp4-mx": "quantize(format=fp4, variant=mx)",
    "fp4-nv": "quantize(format=fp4, variant=nv)",
    "higgs-p1": "quantize(format=higgs, bits=4, p=1, group_size=128)",
    "higgs-p2": "quantize(format=higgs, bits=4, p=2, group_size=128)",
    "w8a8": "quantize(format=w8a8)",
    "llm_int8": "quantize(format=llm_int8)",
}
TARGET_SPEEDUP_BATCH_1 = {"int8": 3.0, "int4": 4.0, "nf4": 4.0, "higgs-p1": 4.0, "higgs-p2": 4.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao peer")
    args = parser.parse_args()
    if native.load() is None:
        warnings.warn("native kernels unavailable: slimgraph formats run their torch reference", stacklevel=1)
    read_gbs = memcpy_bandwidth_gbs()
    rows = []
    for model_name in args.models:
        for batch in args.batches:
            rows += measure(model_name, batch, args, read_gbs)
    print_table(rows, read_gbs)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_avx2": bool(native.load() and native.load().built_with_avx2()),
        "read_bandwidth_gbs": round(read_gbs, 2),
        "runs": args.runs,
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def stack() -> nn.Module:
    return nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(8)))


def gpt2_mlp() -> nn.Module:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    return GPT2MLP(4096, GPT2Config(n_embd=1024, resid_pdrop=0.0))


MODELS: dict[str, Callable[[], nn.Module]] = {"stack": stack, "gpt2_mlp": gpt2_mlp}
IN_FEATURES = {"stack": 2048, "gpt2_mlp": 1024}


def measure(model_name: str, batch: int, args: argparse.Namespace, read_gbs: float) -> list[dict]:
    """Build every variant of one model at one batch size, then time them interleaved."""
    torch.manual_seed(0)
    model = MODELS[model_name]().eval()
    x = torch.randn(batch, IN_FEATURES[model_name])
    variants = {"fp32": (model, x, weight_bytes(model)),
                "bf16": (copy.deepcopy(model).bfloat16(), x.bfloat16(), weight_bytes(model) // 2)}
    errors = {}
    for name in args.formats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = ", ".join(filter(None, [GRAPH_PASSES, FORMATS[name]]))
            optimized = slimgraph.optimize(model, pipeline, (x,), strict=True)
        variants[name] = (optimized, x, weight_bytes(optimized))
    if not args.no_torchao:
        variants |= torchao_variants(model, x)
    with torch.no_grad():
        reference = model(x)
        for name, (module, inputs, _) in variants.items():
            output = module(inputs).float()
            errors[name] = ((output - reference).norm() / reference.norm()).item()
    times = interleaved_medians({name: (module, inputs) for name, (module, inputs, _) in variants.items()},
                                args.runs)
    rows = []
    for name, (_, _, nbytes) in variants.items():
        rows.append({
            "model": model_name, "batch": batch, "variant": name,
            "ms": round(times[name], 3),
            "speedup_vs_fp32": round(times["fp32"] / times[name], 2),
            "weight_mb": round(nbytes / 1e6, 2),
            "bound_ms": round(nbytes / read_gbs / 1e6, 3),
            "relative_error": float(f"{errors[name]:.3g}"),
            "target_speedup": TARGET_SPEEDUP_BATCH_1.get(name) if batch == 1 else None,
        })
        print(f"{model_name:>8} b{batch:<3} {name:>18} {times[name]:8.3f} ms "
              f"{times['fp32'] / times[name]:5.2f}x  err {errors[name]:.2e}", flush=True)
    return rows


def torchao_variants(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """torchao's int8 weight-only linear, eager and compiled with Inductor (its recommended use)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    peer = conv1d_as_linear(copy.deepcopy(model))
    quantize_(peer, Int8WeightOnlyConfig())
    nbytes = weight_bytes(model) // 4  # int8 codes; its per-channel scales are negligible
    compiled = torch.compile(copy.deepcopy(peer))
    with torch.no_grad():
        compiled(x)  # compile outside the timed loop
    return {"torchao-int8wo": (peer, x, nbytes), "torchao-int8wo-compiled": (compiled, x, nbytes)}


def conv1d_as_linear(module: nn.Module) -> nn.Module:
    """Hugging Face ``Conv1D`` (GPT-2) → the equivalent ``nn.Linear``: torchao only quantizes ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            linear = nn.Linear(*child.weight.shape)
            linear.weight.data, linear.bias.data = child.weight.detach().t().contiguous(), child.bias.detach()
            setattr(module, name, linear)
        else:
            conv1d_as_linear(child)
    return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer: what a batch-1 forward must stream from memory."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def interleaved_medians(variants: dict[str, tuple[nn.Module, torch.Tensor]], runs: int,
                        settle: int = 2) -> dict[str, float]:
    """Median milliseconds per variant over ``runs`` rounds; each round runs every variant.

    Within a round a variant runs ``settle`` untimed calls before the timed one, so what is
    timed is the model in steady state (as in a decode loop): an fp32 GEMV run just before
    a 4-bit model slowed the 4-bit call by up to 1.5x (thread pool and cache state), which
    says nothing about either. Rounds still spread drift over all variants alike. Everything
    runs under ``torch.inference_mode()``, as a deployed model should (``no_grad`` costs the
    same since the ops' AutogradCPU kernel is C++).
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for round_index in range(runs + 1):  # one warm-up round
            for name, (module, inputs) in variants.items():
                for _ in range(settle):
                    module(inputs)
                start = time.perf_counter()
                module(inputs)
                if round_index >= 1:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(rows: list[dict], read_gbs: float) -> None:
    print(f"\n{torch.get_num_threads()} threads, copy bandwidth {read_gbs:.1f} GB/s\n")
    print("| model | batch | variant | ms | vs fp32 | weights MB | bound ms | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['batch']} | {row['variant']} | {row['ms']:.2f} | "
              f"{row['speedup_vs_fp32']:.2f}× | {row['weight_mb']:.1f} | {row['bound_ms']:.2f} | "
              f"{row['relative_error']:.1e} |")


if __name__ == "__main__":
    main()
