"""Do the native int8/int4 kernels beat fp32 where it matters: batch 1 on a CPU?

Eight stacked Linear(2048, 2048) (no activation, so the chain is pure linears),
batch 1 and 64: fp32 eager ``F.linear`` next to ``native.int8_linear`` and
``native.int4_linear`` (group 128, asymmetric), median of 20 interleaved runs.
The bandwidth bound of each is the bytes its weights occupy divided by the
memcpy bandwidth of a 256 MB tensor copy (read + write counted).

    .venv/bin/python benchmarks/native_gemv.py [--runs 20] [--batches 1 64] [--threads N]

Writes benchmarks/results/native_gemv.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimgraph.kernels import native

RESULTS = Path(__file__).parent / "results" / "native_gemv.json"
LAYERS, FEATURES, GROUP_SIZE = 8, 2048, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = native.load()
    if kernels is None:
        raise SystemExit("native kernels unavailable; nothing to benchmark")
    torch.manual_seed(0)
    layers = [make_layer() for _ in range(LAYERS)]
    bandwidth_gbs = memcpy_bandwidth_gbs()
    rows = [measure(kernels, layers, batch, args.runs, bandwidth_gbs) for batch in args.batches]
    print_table(rows, bandwidth_gbs)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "avx2": kernels.built_with_avx2(),
        "layers": LAYERS, "features": FEATURES, "group_size": GROUP_SIZE, "runs": args.runs,
        "memcpy_bandwidth_gbs": round(bandwidth_gbs, 2),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def make_layer() -> dict[str, torch.Tensor]:
    """One Linear(2048, 2048)'s weights in all three formats."""
    weight = torch.randn(FEATURES, FEATURES) / FEATURES**0.5
    scales8 = weight.abs().amax(dim=1) / 127
    groups = weight.reshape(FEATURES, -1, GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales4 = ((high - low) / 15).half()
    zeros4 = torch.round(-low / scales4.float()).clamp(0, 15)
    codes = torch.round(groups / scales4.float()[..., None] + zeros4[..., None]).clamp(0, 15)
    codes = codes.reshape(FEATURES, FEATURES).to(torch.uint8)
    return {
        "weight": weight, "bias": torch.randn(FEATURES),
        "qweight": torch.round(weight / scales8[:, None]).to(torch.int8), "scales8": scales8,
        "packed": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales4": scales4,
        "zeros4": zeros4.to(torch.uint8),
    }


def measure(kernels, layers: list[dict], batch: int, runs: int, bandwidth_gbs: float) -> dict:
    variants = {
        "fp32": (lambda x, w: F.linear(x, w["weight"], w["bias"]), ("weight", "bias")),
        "int8": (lambda x, w: kernels.int8_linear(x, w["qweight"], w["scales8"], w["bias"]),
                 ("qweight", "scales8", "bias")),
        "int4": (lambda x, w: kernels.int4_linear(x, w["packed"], w["scales4"], w["zeros4"],
                                                  w["bias"], GROUP_SIZE),
                 ("packed", "scales4", "zeros4", "bias")),
    }
    x = torch.randn(batch, FEATURES)
    samples = {name: [] for name in variants}
    with torch.no_grad():
        for run in range(runs + 2):  # two warm-up rounds
            for name, (linear, _) in variants.items():
                start = time.perf_counter()
                y = x
                for layer in layers:
                    y = linear(y, layer)
                if run >= 2:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    row = {"batch": batch}
    for name, (_, buffers) in variants.items():
        weight_bytes = sum(layer[b].numel() * layer[b].element_size() for layer in layers
                           for b in buffers)
        row[f"{name}_ms"] = round(statistics.median(samples[name]), 3)
        row[f"{name}_bound_ms"] = round(weight_bytes / bandwidth_gbs / 1e6, 3)
        row[f"{name}_weight_mb"] = round(weight_bytes / 1e6, 2)
    row["int8_speedup"] = round(row["fp32_ms"] / row["int8_ms"], 2)
    row["int4_speedup"] = round(row["fp32_ms"] / row["int4_ms"], 2)
    return row


def memcpy_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a 256 MB ``copy_``, best of 5."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


def print_table(rows: list[dict], bandwidth_gbs: float) -> None:
    print(f"8 x Linear(2048, 2048), {torch.get_num_threads()} threads, "
          f"memcpy {bandwidth_gbs:.1f} GB/s")
    print(f"{'batch':>5} {'format':>6} {'MB':>7} {'ms':>8} {'bound ms':>9} {'vs fp32':>8}")
    for row in rows:
        for name in ("fp32", "int8", "int4"):
            speedup = row["fp32_ms"] / row[f"{name}_ms"]
            print(f"{row['batch']:>5} {name:>6} {row[f'{name}_weight_mb']:>7.1f} "
                  f"{row[f'{name}_ms']:>8.3f} {row[f'{name}_bound_ms']:>9.3f} {speedup:>7.2f}x")


if __name__ == "__main__":
    main()
