"""How close do quantized MiniLM sentence embeddings stay to the fp32 model, format by format?

The bundled pretrained MiniLM (all-MiniLM-L6-v2) embeds real English sentences
from the standard library's docstrings, mean-pooled and normalised as
sentence-transformers does; each format's embeddings are compared with the fp32
model's by cosine similarity (mean, 1st percentile, min over all sentences).
Passes that need data (``method=gptq``, ``budget_bits``, ``smooth``) calibrate on 128
other sentences, never on the ones they are scored on.

    .venv/bin/python benchmarks/quant_quality.py [--sentences 256] [--formats int8 nf4 ...]

Writes benchmarks/results/quant_quality.json and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import slimgraph
from slimgraph import models

RESULTS = Path(__file__).parent / "results" / "quant_quality.json"
BATCH, TOKENS, CALIBRATION_SENTENCES = 32, 64, 128
FORMATS = {
    "int8": "quantize(format=int8)",
    "w8a8": "quantize(format=w8a8)",
    "llm_int8": "quantize(format=llm_int8)",
    "w8a8 smooth": "quantize(format=w8a8, smooth=0.5)",
    "llm_int8 smooth": "quantize(format=llm_int8, smooth=0.5)",
    "fp8": "quantize(format=fp8)",
    "int4": "quantize(format=int4, group_size=32)",
    "nf4": "quantize(format=nf4)",
    "fp4-mx": "quantize(format=fp4, variant=mx)",
    "fp4-nv": "quantize(format=fp4, variant=nv)",
    "higgs-p1": "quantize(format=higgs, bits=4, p=1, group_size=128)",
    "higgs-p2": "quantize(format=higgs, bits=4, p=2, group_size=128)",
    "nf4+lorc": "quantize(format=nf4+lorc, rank=32)",
    "higgs-p2 3-bit": "quantize(format=higgs, bits=3, p=2, group_size=128)",
    "int4 + gptq": "quantize(format=int4, group_size=32, method=gptq)",
    "int4 g128 + gptq": "quantize(format=int4, group_size=128, method=gptq)",
    "nf4 + gptq": "quantize(format=nf4, method=gptq)",
    "fp4-mx + gptq": "quantize(format=fp4, variant=mx, method=gptq)",
    "fp4-nv + gptq": "quantize(format=fp4, variant=nv, method=gptq)",
    "fp8 + gptq": "quantize(format=fp8, method=gptq)",
    "higgs-p1 + gptq": "quantize(format=higgs, bits=4, p=1, group_size=128, method=gptq)",
    "higgs-p2 + gptq": "quantize(format=higgs, bits=4, p=2, group_size=128, method=gptq)",
    "budget 5 bits": "quantize(budget_bits=5, formats=[int8, 'int4(group_size=32)', nf4])",
}
EIGHT_BIT = {"int8", "w8a8", "llm_int8", "w8a8 smooth", "llm_int8 smooth", "fp8", "fp8 + gptq"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args()
    model, tokenizer = models.minilm()
    texts = models.sentences(args.sentences + CALIBRATION_SENTENCES)
    batches = [dict(tokenizer(texts[i:i + BATCH], padding="max_length", truncation=True, max_length=TOKENS,
                              return_tensors="pt")) for i in range(0, len(texts), BATCH)]
    batches = [b for b in batches if b["input_ids"].shape[0] == BATCH]  # one captured shape
    batches, calibration = batches[:-CALIBRATION_SENTENCES // BATCH], batches[-CALIBRATION_SENTENCES // BATCH:]
    reference = embed(model, batches)
    rows = []
    for name in args.formats:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = slimgraph.optimize(model, f"cleanup, {FORMATS[name]}", example_kwargs=batches[0],
                                           calibration=calibration)
        record = optimized.report.records[-1]
        cosine = torch.nn.functional.cosine_similarity(embed(optimized, batches), reference)
        rows.append({
            "format": name, "pipeline": FORMATS[name], "status": record.status,
            "bits_per_weight": round(record.result.stats.get("bits_per_weight", 0.0), 3) if record.result else None,
            "param_mb": round(record.param_bytes_after / 1e6, 2),
            "cosine_mean": round(cosine.mean().item(), 5),
            "cosine_p1": round(cosine.quantile(0.01).item(), 5),
            "cosine_min": round(cosine.min().item(), 5),
            "target": 0.999 if name in EIGHT_BIT else None if "3-bit" in name else 0.98,
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    rows = merged_with_earlier_rows(rows)
    print_table(rows, sentences=len(batches) * BATCH, fp32_mb=sum(p.numel() * 4 for p in model.parameters()) / 1e6)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "sentences": len(batches) * BATCH,
                                   "tokens": TOKENS, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def merged_with_earlier_rows(rows: list[dict]) -> list[dict]:
    """Rows of an earlier run for formats not measured now are kept, in FORMATS order."""
    earlier = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    by_format = {row["format"]: row for row in earlier} | {row["format"]: row for row in rows}
    return [by_format[name] for name in FORMATS if name in by_format]


def embed(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled sentence embeddings (padding masked out), as sentence-transformers computes them."""
    outputs = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            outputs.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(outputs)


def print_table(rows: list[dict], sentences: int, fp32_mb: float) -> None:
    print(f"\nMiniLM, {sentences} sentences, fp32 parameters {fp32_mb:.1f} MB\n")
    print("| format | bits/weight (quantized layers) | params MB | cosine mean | cosine p1 | cosine min | target |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['format']} | {row['bits_per_weight']} | {row['param_mb']} | {row['cosine_mean']:.4f} | "
              f"{row['cosine_p1']:.4f} | {row['cosine_min']:.4f} | "
              f"{'-' if row['target'] is None else '≥ ' + str(row['target'])} |")


if __name__ == "__main__":
    main()
