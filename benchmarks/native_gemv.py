"""Do the native quantized kernels beat fp32 where it matters: batch 1 on a CPU?

Eight stacked Linear(2048, 2048) (no activation, so the chain is pure linears),
batch 1 and 64: fp32 eager ``F.linear`` next to every native kernel on the same
weights, median of 20 interleaved runs:

* int8 (per-row scales) and int4 (group 128, asymmetric, float16 scales);
* lut4: nf4 (float32 absmax, group 64), mxfp4 (e2m1, e8m0 scales, group 32), nvfp4
  (e2m1, float8_e4m3fn scales, group 16, per-tensor scale folded into the table);
* lut8: fp8 (float8_e4m3fn weights, per-row float32 scale);
* HIGGS p=1 / p=2 (4 bits, group 1024, float16 scales): ``hadamard_rotate`` of the
  activations then lut4 / lut8 (one byte per pair of weights), rotation included;
* w8a8: ``int8_dynamic_linear`` on the int8 weights, activations quantized per row.

The bandwidth bound of each is the bytes its weights occupy divided by the memcpy
bandwidth of a 256 MB tensor copy (read + write counted). ``hadamard_us`` is one
``hadamard_rotate`` of the layer input, alone.

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

from slimgraph.kernels import grids, native
from slimgraph.kernels.nf4 import NF4_CODE

RESULTS = Path(__file__).parent / "results" / "native_gemv.json"
LAYERS, FEATURES, GROUP_SIZE = 8, 2048, 128
# Group sizes of the table formats: data, not code.
GROUPS = {"nf4": 64, "mxfp4": 32, "nvfp4": 16, "higgs": 1024}
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


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
        "layers": LAYERS, "features": FEATURES, "group_size": GROUP_SIZE, "groups": GROUPS,
        "runs": args.runs,
        "memcpy_bandwidth_gbs": round(bandwidth_gbs, 2),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def make_layer() -> dict[str, torch.Tensor]:
    """One Linear(2048, 2048)'s weights in every format."""
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
        "packed": pack_nibbles(codes), "scales4": scales4, "zeros4": zeros4.to(torch.uint8),
        **quantize_nf4(weight), **quantize_mxfp4(weight), **quantize_nvfp4(weight),
        **quantize_fp8(weight), **quantize_higgs(weight),
    }


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    groups = weight.reshape(FEATURES, -1, GROUPS["nf4"])
    absmax = groups.abs().amax(dim=-1)
    codes = nearest_code(groups / absmax[..., None], NF4_CODE).reshape(FEATURES, FEATURES)
    return {"nf4_packed": pack_nibbles(codes), "nf4_scales": absmax}


def quantize_mxfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """OCP MX: the group's shared exponent is floor(log2(absmax)) minus e2m1's top exponent 2."""
    groups = weight.reshape(FEATURES, -1, GROUPS["mxfp4"])
    exponents = torch.floor(torch.log2(groups.abs().amax(dim=-1))) - 2
    scaled = groups / torch.exp2(exponents)[..., None]
    codes = nearest_code(scaled, E2M1).reshape(FEATURES, FEATURES)
    return {"mx_packed": pack_nibbles(codes), "mx_scales": (exponents + 127).to(torch.uint8)}


def quantize_nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4: float8_e4m3fn group scales under one float32 tensor scale (folded into the table)."""
    groups = weight.reshape(FEATURES, -1, GROUPS["nvfp4"])
    tensor_scale = weight.abs().max() / (448 * 6)
    scales = (groups.abs().amax(dim=-1) / 6 / tensor_scale).to(torch.float8_e4m3fn)
    scaled = groups / (scales.float() * tensor_scale)[..., None]
    codes = nearest_code(scaled, E2M1).reshape(FEATURES, FEATURES)
    return {"nv_packed": pack_nibbles(codes), "nv_scales": scales, "nv_lut": E2M1 * tensor_scale}


def quantize_fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    row_scales = weight.abs().amax(dim=1, keepdim=True) / 448
    codes = (weight / row_scales).to(torch.float8_e4m3fn).view(torch.uint8)
    return {"fp8_codes": codes, "fp8_scales": row_scales}


def quantize_higgs(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    group = GROUPS["higgs"]
    p1 = grids.quantize_groups(weight, group_size=group, bits=4, p=1, seed=0)
    p2 = grids.quantize_groups(weight, group_size=group, bits=4, p=2, seed=0)
    return {
        "higgs1_packed": pack_nibbles(p1.codes), "higgs1_scales": p1.scales,
        "higgs1_lut": grids.lloyd_max_grid(4).float(),
        "higgs2_codes": p2.codes, "higgs2_scales": p2.scales,
        "higgs2_lut": grids.vector_grid_2d(4), "higgs_signs": p1.signs,
    }


def nearest_code(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry, through the midpoints of the sorted table."""
    ordered, order = table.sort()
    return order[torch.bucketize(values, (ordered[1:] + ordered[:-1]) / 2)].to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def variants(kernels) -> dict[str, tuple]:
    """name -> (linear(x, layer), the layer buffers it reads)."""
    higgs = GROUPS["higgs"]

    def rotated(x, w):
        return kernels.hadamard_rotate(x, w["higgs_signs"])

    return {
        "fp32": (lambda x, w: F.linear(x, w["weight"], w["bias"]), ("weight", "bias")),
        "int8": (lambda x, w: kernels.int8_linear(x, w["qweight"], w["scales8"], w["bias"]),
                 ("qweight", "scales8", "bias")),
        "int4": (lambda x, w: kernels.int4_linear(x, w["packed"], w["scales4"], w["zeros4"],
                                                  w["bias"], GROUP_SIZE),
                 ("packed", "scales4", "zeros4", "bias")),
        "nf4": (lambda x, w: kernels.lut4_linear(x, w["nf4_packed"], NF4_CODE, w["nf4_scales"],
                                                 w["bias"], GROUPS["nf4"]),
                ("nf4_packed", "nf4_scales", "bias")),
        "mxfp4": (lambda x, w: kernels.lut4_linear(x, w["mx_packed"], E2M1, w["mx_scales"],
                                                   w["bias"], GROUPS["mxfp4"]),
                  ("mx_packed", "mx_scales", "bias")),
        "nvfp4": (lambda x, w: kernels.lut4_linear(x, w["nv_packed"], w["nv_lut"], w["nv_scales"],
                                                   w["bias"], GROUPS["nvfp4"]),
                  ("nv_packed", "nv_scales", "bias")),
        "fp8": (lambda x, w: kernels.lut8_linear(x, w["fp8_codes"], E4M3[:, None],
                                                 w["fp8_scales"], w["bias"], FEATURES),
                ("fp8_codes", "fp8_scales", "bias")),
        "higgs_p1": (lambda x, w: kernels.lut4_linear(rotated(x, w), w["higgs1_packed"],
                                                      w["higgs1_lut"], w["higgs1_scales"],
                                                      w["bias"], higgs),
                     ("higgs1_packed", "higgs1_scales", "bias")),
        "higgs_p2": (lambda x, w: kernels.lut8_linear(rotated(x, w), w["higgs2_codes"],
                                                      w["higgs2_lut"], w["higgs2_scales"],
                                                      w["bias"], higgs),
                     ("higgs2_codes", "higgs2_scales", "bias")),
        "w8a8": (lambda x, w: kernels.int8_dynamic_linear(x, w["qweight"], w["scales8"],
                                                          w["bias"]),
                 ("qweight", "scales8", "bias")),
    }


def measure(kernels, layers: list[dict], batch: int, runs: int, bandwidth_gbs: float) -> dict:
    linears = variants(kernels)
    x = torch.randn(batch, FEATURES)
    samples = {name: [] for name in linears}
    with torch.no_grad():
        for run in range(runs + 2):  # two warm-up rounds
            for name, (linear, _) in linears.items():
                start = time.perf_counter()
                y = x
                for layer in layers:
                    y = linear(y, layer)
                if run >= 2:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    row = {"batch": batch}
    for name, (_, buffers) in linears.items():
        weight_bytes = sum(layer[b].numel() * layer[b].element_size() for layer in layers
                           for b in buffers)
        row[f"{name}_ms"] = round(statistics.median(samples[name]), 3)
        row[f"{name}_bound_ms"] = round(weight_bytes / bandwidth_gbs / 1e6, 3)
        row[f"{name}_weight_mb"] = round(weight_bytes / 1e6, 2)
    for name in linears:
        if name != "fp32":
            row[f"{name}_speedup"] = round(row["fp32_ms"] / row[f"{name}_ms"], 2)
    row["hadamard_us"] = round(hadamard_us(kernels, x, layers[0]["higgs_signs"]), 2)
    return row


def hadamard_us(kernels, x: torch.Tensor, signs: torch.Tensor, calls: int = 200) -> float:
    """Median microseconds of one rotation, over 20 blocks of ``calls`` calls."""
    blocks = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(calls):
            kernels.hadamard_rotate(x, signs)
        blocks.append((time.perf_counter() - start) * 1e6 / calls)
    return statistics.median(blocks)


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
    print(f"{'batch':>5} {'format':>9} {'MB':>7} {'ms':>8} {'bound ms':>9} {'vs fp32':>8}")
    for row in rows:
        names = [key[: -len("_ms")] for key in row if key.endswith("_ms") and "_bound" not in key]
        for name in names:
            speedup = row["fp32_ms"] / row[f"{name}_ms"]
            print(f"{row['batch']:>5} {name:>9} {row[f'{name}_weight_mb']:>7.1f} "
                  f"{row[f'{name}_ms']:>8.3f} {row[f'{name}_bound_ms']:>9.3f} {speedup:>7.2f}x")
        print(f"{row['batch']:>5}  hadamard_rotate(x, g=1024): {row['hadamard_us']:.2f} us")


if __name__ == "__main__":
    main()
