"""How long does optimize() take, and how does it grow with depth?

GPT-2 configs with 12, 24 and 48 layers (hidden 256, 4 heads, random weights),
batch 2 × 64 tokens. For each: capture time (torch.export), pipeline time (the
passes plus verification and statistics after each), and forward latency of
the optimized module next to eager, interleaved in one run.

    .venv/bin/python benchmarks/pipeline_overhead.py [--layers 12 24 48]

Writes benchmarks/results/pipeline_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import slimgraph
from slimgraph import models

RESULTS = Path(__file__).parent / "results" / "pipeline_overhead.json"


def measure(layers: int, pipeline: str, repeats: int) -> dict:
    """One row; timings are the run with the median pipeline time out of ``repeats``."""
    model = models.gpt2(layers=layers, hidden=256, heads=4, vocab=1024)
    inputs = {"input_ids": torch.randint(0, 1024, (2, 64))}
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimized = slimgraph.optimize(model, pipeline, example_kwargs=inputs)
        runs.append((optimized.report.pipeline_seconds, time.perf_counter() - start, optimized))
    _, total, optimized = sorted(runs, key=lambda run: run[0])[repeats // 2]
    report = optimized.report
    eager_ms, optimized_ms = interleaved_latency_ms([model, optimized], inputs)
    return {
        "layers": layers,
        "nodes_before": report.records[0].nodes_before,
        "nodes_after": report.records[-1].nodes_after,
        "capture_s": round(report.capture_seconds, 4),
        "pipeline_s": round(report.pipeline_seconds, 4),
        "passes_s": round(sum(r.seconds for r in report.records), 4),
        "verify_s": round(sum(r.verify_seconds for r in report.records), 4),
        "optimize_total_s": round(total, 4),
        "per_pass_s": {r.pass_text: round(r.seconds, 4) for r in report.records},
        "eager_forward_ms": round(eager_ms, 3),
        "optimized_forward_ms": round(optimized_ms, 3),
        "speedup_vs_eager": round(eager_ms / optimized_ms, 3),
    }


def interleaved_latency_ms(modules, kwargs, runs: int = 15) -> list[float]:
    samples = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(runs + 1):
            for module, times in zip(modules, samples, strict=True):
                start = time.perf_counter()
                module(**kwargs)
                times.append(time.perf_counter() - start)
    return [sorted(times[1:])[runs // 2] * 1e3 for times in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--passes", default=slimgraph.DEFAULT_PIPELINE)
    parser.add_argument("--repeats", type=int, default=3, help="optimize() runs per config (median kept)")
    args = parser.parse_args()
    rows = [measure(layers, args.passes, args.repeats) for layers in args.layers]
    base = rows[0]
    for row in rows:
        row["pipeline_growth_vs_linear"] = round(
            (row["pipeline_s"] / base["pipeline_s"]) / (row["layers"] / base["layers"]), 3)
    result = {
        "benchmark": "pipeline_overhead",
        "pipeline": args.passes,
        "repeats": args.repeats,
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| layers | nodes | capture (s) | pipeline (s) | of which passes (s) | pipeline / linear | "
          "eager fwd (ms) | optimized fwd (ms) | speedup |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['nodes_before']} → {r['nodes_after']} | {r['capture_s']:.2f} | "
              f"{r['pipeline_s']:.3f} | {r['passes_s']:.3f} | {r['pipeline_growth_vs_linear']:.2f} | "
              f"{r['eager_forward_ms']:.1f} | {r['optimized_forward_ms']:.1f} | {r['speedup_vs_eager']:.2f}× |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
