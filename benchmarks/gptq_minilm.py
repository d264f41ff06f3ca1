"""Does GPTQ with Hessians from the fp32 model (one calibration run) match sequential GPTQ on MiniLM?

A graph pass can run the calibration data once through the *original* model and
collect every linear's ``H = Σ xᵀx`` at once ("non-sequential"). The GPTQ paper
instead quantizes layer by layer and collects each layer's Hessian from the
already-quantized layers before it ("sequential"). This script fake-quantizes the
pretrained MiniLM's ``nn.Linear`` weights (not the pooler) with ``gptq_pack`` +
``dequantize`` and compares the sentence embeddings with fp32 ones by cosine:

- ``rtn``: round to nearest, the formats' own packers;
- ``gptq``: non-sequential, H over every token of the padded batches, padding
  included (what a pass that sees only the graph's inputs gathers);
- ``gptq-real``: non-sequential, H over the real tokens only (attention mask 1);
- ``gptq-seq``: sequential per transformer layer, real tokens only.

Calibration: sentences 128..255 of ``models.sentences(256)``, evaluation 0..127;
batches of 32 padded to 64 tokens, mean pooling over the attention mask.

    .venv/bin/python benchmarks/gptq_minilm.py [--formats nf4 int4-g32 ...] [--methods rtn gptq ...]

Writes benchmarks/results/gptq_minilm.json and prints a Markdown table. Rows of earlier
runs for other (format, method) pairs are kept, so one format can be re-run on its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from quant_quality import embed  # benchmarks/ is on sys.path when a script here runs
from torch import nn

from slimgraph import models
from slimgraph.kernels import FORMATS, QuantFormat
from slimgraph.kernels.gptq import DEFAULT_DAMP, gptq_pack

RESULTS = Path(__file__).parent / "results" / "gptq_minilm.json"
BATCH, TOKENS, SENTENCES = 32, 64, 256
FORMAT_OPTIONS = {
    "nf4": ("nf4", {}),
    "int4-g32": ("int4", {"group_size": 32}),
    "int4-g128": ("int4", {"group_size": 128}),
    "fp4-mx": ("fp4", {"variant": "mx"}),
    "fp4-nv": ("fp4", {"variant": "nv"}),
    "higgs-p1-g128": ("higgs", {"bits": 4, "p": 1, "group_size": 128}),  # GPTQ in the rotated basis
}
METHODS = ("rtn", "gptq", "gptq-real", "gptq-seq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMAT_OPTIONS), choices=list(FORMAT_OPTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = models.minilm()
    texts = models.sentences(SENTENCES)
    batches = [dict(tokenizer(texts[i:i + BATCH], padding="max_length", truncation=True, max_length=TOKENS,
                              return_tensors="pt")) for i in range(0, SENTENCES, BATCH)]
    evaluation, calibration = batches[: len(batches) // 2], batches[len(batches) // 2:]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "pooler" not in name}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    reference = embed(model, evaluation)
    hessians = {}
    if {"gptq", "gptq-real"} & set(args.methods):
        hessians = {real: collect_hessians(model, linears, calibration, real_tokens_only=real)
                    for real in (False, True)}
    rows = []
    for label in args.formats:
        name, options = FORMAT_OPTIONS[label]
        fmt, options = FORMATS[name], FORMATS[name].make_options(**options)
        for method in args.methods:
            start = time.perf_counter()
            if method == "rtn":
                quantize(linears, original, rtn(fmt, options))
            elif method == "gptq-seq":
                quantize_sequentially(model, linears, original, calibration, fmt, options)
            else:
                quantize(linears, original, gptq(fmt, options, hessians[method == "gptq-real"]))
            cosine = F.cosine_similarity(embed(model, evaluation), reference)
            rows.append({"format": label, "method": method, "cosine_mean": round(cosine.mean().item(), 5),
                         "cosine_min": round(cosine.min().item(), 5),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
        restore(linears, original)
    print_table(rows, args.methods)
    rows = merged_with_earlier_rows(rows)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": "all-MiniLM-L6-v2", "calibration_sentences": len(calibration) * BATCH,
        "evaluation_sentences": len(evaluation) * BATCH, "tokens": TOKENS, "damp": DEFAULT_DAMP, "block_size": 128,
        "act_order": True,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def merged_with_earlier_rows(rows: list[dict]) -> list[dict]:
    """The saved rows with this run's replacing those of the same (format, method), in format order."""
    earlier = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    key = lambda row: (row["format"], row["method"])  # noqa: E731
    merged = {key(row): row for row in earlier} | {key(row): row for row in rows}
    order = {label: index for index, label in enumerate(FORMAT_OPTIONS)}
    return sorted(merged.values(), key=lambda row: (order.get(row["format"], len(order)), METHODS.index(row["method"])))


def collect_hessians(model: nn.Module, linears: dict[str, nn.Linear], batches: list[dict],
                     real_tokens_only: bool) -> dict[str, torch.Tensor]:
    """``Σ xᵀx`` (float64) of each linear's inputs over the batches' tokens."""
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    current_mask: list[torch.Tensor] = []

    def hook(name: str) -> Callable:
        def accumulate(module: nn.Module, inputs: tuple) -> None:
            tokens = inputs[0].reshape(-1, module.in_features)
            if real_tokens_only:
                tokens = tokens[current_mask[0].reshape(-1).bool()]
            tokens = tokens.double()
            hessians[name] += tokens.T @ tokens
        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current_mask[:] = [batch["attention_mask"]]
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


FakeQuantize = Callable[[str, torch.Tensor], torch.Tensor]  # (layer name, fp32 weight) -> dequantized weight


def rtn(fmt: QuantFormat, options: Any) -> FakeQuantize:
    return lambda _, weight: fmt.dequantize(fmt.pack(weight, options))


def gptq(fmt: QuantFormat, options: Any, hessians: dict[str, torch.Tensor]) -> FakeQuantize:
    return lambda layer, weight: fmt.dequantize(gptq_pack(fmt, weight, hessians[layer], options, layer=layer))


def quantize(linears: dict[str, nn.Linear], original: dict[str, torch.Tensor], fake_quantize: FakeQuantize) -> None:
    for name, module in linears.items():
        module.weight.data = fake_quantize(name, original[name])


def quantize_sequentially(model: nn.Module, linears: dict[str, nn.Linear], original: dict[str, torch.Tensor],
                          batches: list[dict], fmt: QuantFormat, options: Any) -> None:
    """GPTQ one transformer layer at a time, each with Hessians from the model with the layers before quantized."""
    restore(linears, original)
    for index in range(len(model.encoder.layer)):
        prefix = f"encoder.layer.{index}."
        layer_linears = {name: m for name, m in linears.items() if name.startswith(prefix)}
        quantize(layer_linears, original,
                 gptq(fmt, options, collect_hessians(model, layer_linears, batches, real_tokens_only=True)))


def restore(linears: dict[str, nn.Linear], original: dict[str, torch.Tensor]) -> None:
    for name, module in linears.items():
        module.weight.data = original[name].clone()


def print_table(rows: list[dict], methods: list[str]) -> None:
    print("\n| format | " + " | ".join(f"{m} mean / min" for m in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for label in dict.fromkeys(row["format"] for row in rows):
        cells = {row["method"]: f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f}"
                 for row in rows if row["format"] == label}
        print(f"| {label} | " + " | ".join(cells.get(m, "") for m in methods) + " |")


if __name__ == "__main__":
    main()
