"""Structured pruning and layer dropping on the CPU: how much faster, and how far do embeddings move?

Two parts, every slimgraph variant built the way a user builds it (``slimgraph.optimize``, the
default pipeline followed by the pass):

- ``speed``: a BERT-base-sized Hugging Face ``BertModel`` (12 layers, hidden 768, 12 heads,
  FFN 3072, random weights) at batch 8 × 128 tokens: the eager model, the default pipeline,
  structured FFN pruning at 50% (``prune(kind=structured, target=ffn, ratio=0.5)``), 25% of the
  blocks dropped (``layer_drop(ratio=0.25, criterion=last)``) and the peer, Torch-Pruning, cutting
  the same FFN units (only ``intermediate.dense`` roots a group; ``output.dense`` follows through
  its dependency graph). Timings are medians of interleaved rounds (every variant once per round).
- ``quality``: the pretrained MiniLM (all-MiniLM-L6-v2) embeds real sentences from the standard
  library's docstrings (mean pooling, as in ``quant_quality.py``); each variant's embeddings are
  compared with the eager model's by cosine (mean, min), and timed at batch 8 × 64 tokens.
  Passes that read activations (wanda, taylor, angular, contiguous) calibrate on other sentences.
  2:4 and unstructured sparsity stay masked dense on the CPU (same bytes, dense matmuls): any
  speed difference of those rows is noise.

Parameters count every distinct floating-point parameter and buffer. "Removed" is relative to
the variant's own starting point: the default pipeline for slimgraph's pruned rows (its
``fold_constants`` already turns BERT's position-embedding table into a smaller buffer), the eager
model for the others. Each structured row's removal is checked against the one predicted from
the shapes alone: ``kept = ⌈d_ff · (1 − ratio) / round_to⌉ · round_to`` units per layer, each
unit one row and bias entry of ``intermediate.dense`` and one column of ``output.dense``; a
dropped block removes all of its parameters.

    .venv/bin/python benchmarks/prune_drop_cpu.py [--runs 10] [--sentences 256] [--parts speed quality]
    .venv/bin/python benchmarks/prune_drop_cpu.py --quick   # small BERT, few sentences: a smoke test

Writes benchmarks/results/prune_drop_cpu.json (``--quick`` writes only with ``--out``; a part run
alone with ``--parts`` replaces only its own entry) and prints Markdown tables for the README.
Each part records the machine's load average before and after it: rerun the speed part on a
quiet machine before trusting its timings.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from quant_cpu import interleaved_medians  # benchmarks/ is on sys.path when a script here runs
from quant_quality import embed
from torch import nn

import slimgraph
from slimgraph import models
from slimgraph.passes import DEFAULT_PIPELINE

RESULTS = Path(__file__).parent / "results" / "prune_drop_cpu.json"
ROUND_TO = 8
TARGET_SPEEDUP = 1.3
BERT_BASE = {
    "layers": 12,
    "hidden": 768,
    "heads": 12,
    "intermediate": 3072,
    "batch": 8,
    "tokens": 128,
}
BERT_QUICK = {
    "layers": 4,
    "hidden": 256,
    "heads": 4,
    "intermediate": 1024,
    "batch": 8,
    "tokens": 32,
}

EAGER, DEFAULT = "original (eager)", "slimgraph default"
SPEED_FFN_RATIO, SPEED_DROP_RATIO = 0.5, 0.25
SPEED_FFN = f"prune FFN {SPEED_FFN_RATIO:.0%}"
SPEED_DROP = f"layer_drop {SPEED_DROP_RATIO:.0%} (last)"
SPEED_PEER = f"Torch-Pruning FFN {SPEED_FFN_RATIO:.0%}"
SPEED_PIPELINES = {
    SPEED_FFN: f"prune(kind=structured, target=ffn, ratio={SPEED_FFN_RATIO}, round_to={ROUND_TO})",
    SPEED_DROP: f"layer_drop(ratio={SPEED_DROP_RATIO}, criterion=last)",
}

QUALITY_FFN_RATIO, QUALITY_BATCH, TOKENS = 0.25, 8, 64
QUALITY_PEER = f"Torch-Pruning FFN {QUALITY_FFN_RATIO:.0%}"
FFN_CRITERIA, DROP_COUNTS = ("l2", "wanda", "taylor"), (1, 2)
DROP_CRITERIA = ("angular", "contiguous", "last")
MASKED = {
    "2:4 magnitude": "prune(kind=2:4, criterion=magnitude)",
    "2:4 wanda": "prune(kind=2:4, criterion=wanda)",
    "unstructured 50% magnitude": "prune(sparsity=0.5, criterion=magnitude)",
    "unstructured 50% wanda": "prune(sparsity=0.5, criterion=wanda)",
}
QUALITY_FFN = {
    f"FFN {QUALITY_FFN_RATIO:.0%} {criterion}": f"prune(kind=structured, target=ffn, "
    f"ratio={QUALITY_FFN_RATIO}, criterion={criterion}, round_to={ROUND_TO})"
    for criterion in FFN_CRITERIA
}
QUALITY_DROP = {
    (f"drop {count} {criterion}", count): f"layer_drop(count={count}, criterion={criterion})"
    for count in DROP_COUNTS
    for criterion in DROP_CRITERIA
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed rounds, after 2 warm-up ones")
    parser.add_argument("--sentences", type=int, default=256, help="scored MiniLM sentences")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument(
        "--parts", nargs="+", default=["speed", "quality"], choices=["speed", "quality"]
    )
    parser.add_argument("--quick", action="store_true", help="small BERT, 64 sentences, 3 rounds")
    parser.add_argument("--out", type=Path, default=None, help=f"result file (default {RESULTS})")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.sentences, args.calibration = 3, 64, 32
    out = args.out or (None if args.quick else RESULTS)
    result: dict[str, Any] = json.loads(out.read_text()) if out and out.exists() else {}
    result |= {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_pruning": importlib.metadata.version("torch-pruning"),
    }
    for part in args.parts:  # a part run on its own replaces only its own results
        load_before = os.getloadavg()
        if part == "speed":
            result[part] = speed(BERT_QUICK if args.quick else BERT_BASE, args.runs)
        else:
            result[part] = quality(args.sentences, args.calibration, args.runs)
        result[part] |= {
            "runs": args.runs,
            "load_average_before": _rounded(load_before),
            "load_average_after": _rounded(os.getloadavg()),
        }
        print(
            f"load average (1, 5, 15 min) before {result[part]['load_average_before']}, "
            f"after {result[part]['load_average_after']}\n"
        )
    if out is None:
        print("--quick: nothing written (pass --out PATH to keep the numbers)")
        return
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


# ---- speed: BERT-base ----------------------------------------------------------------------------


def speed(shape: dict[str, int], runs: int) -> dict[str, Any]:
    """Time every variant of one BERT side by side; check the pruned parameter counts."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
    )
    model = BertModel(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (shape["batch"], shape["tokens"]))
    variants, pipelines = {EAGER: model}, {DEFAULT: None, **SPEED_PIPELINES}
    for name, pipeline in pipelines.items():
        print(f"building {name} …", flush=True)
        variants[name] = optimize(model, pipeline, example_inputs=(input_ids,))
    print(f"building {SPEED_PEER} …", flush=True)
    variants[SPEED_PEER] = torch_pruning_ffn(
        model, {"input_ids": input_ids[:1, :16]}, SPEED_FFN_RATIO
    )
    ffn = ffn_params_removed(
        shape["hidden"], shape["intermediate"], SPEED_FFN_RATIO, shape["layers"]
    )
    dropped = math.floor(SPEED_DROP_RATIO * shape["layers"] + 0.5)
    expected = {
        SPEED_FFN: ffn,
        SPEED_DROP: dropped * parameter_count(model.encoder.layer[0]),
        SPEED_PEER: ffn,
    }
    print(f"timing {len(variants)} variants, {runs} interleaved rounds …", flush=True)
    times = interleaved_medians(
        {name: (module, input_ids) for name, module in variants.items()}, runs, settle=0
    )
    rows = []
    for name, module in variants.items():
        speedup = times[EAGER] / times[name]
        target = TARGET_SPEEDUP if name in SPEED_PIPELINES else None
        rows.append(
            {
                "variant": name,
                "pipeline": pipeline_text(pipelines[name]) if name in pipelines else "-",
                "ms": round(times[name], 2),
                "speedup": round(speedup, 3),
                "speedup_vs_default": round(times[DEFAULT] / times[name], 3),
                **parameter_columns(name, module, variants, expected.get(name)),
                "target_speedup": target,
                "target_met": None if target is None else speedup >= target,
            }
        )
    print_speed_table(rows, shape)
    return {"model": "BertModel (random weights)", **shape, "round_to": ROUND_TO, "rows": rows}


def print_speed_table(rows: list[dict[str, Any]], shape: dict[str, int]) -> None:
    print(
        f"\nBERT ({shape['layers']} layers, hidden {shape['hidden']}, FFN {shape['intermediate']}), "
        f"batch {shape['batch']} × {shape['tokens']} tokens, {torch.get_num_threads()} threads\n"
    )
    print("| variant | ms | vs original | parameters | removed | target |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        target = "-"
        if row["target_speedup"] is not None:
            target = f"≥ {row['target_speedup']}× {'met' if row['target_met'] else 'not met'}"
        print(
            f"| {row['variant']} | {row['ms']:.1f} | {row['speedup']:.2f}× | {row['params']:,} | "
            f"{removed_cell(row)} | {target} |"
        )


# ---- quality: MiniLM -----------------------------------------------------------------------------


def quality(sentences: int, calibration_sentences: int, runs: int) -> dict[str, Any]:
    """Cosine of every variant's MiniLM embeddings to the eager model's; parameters; batch-8 latency."""
    model, tokenizer = models.minilm()
    texts = models.sentences(sentences + calibration_sentences)
    batches = [
        dict(
            tokenizer(
                texts[i : i + QUALITY_BATCH],
                padding="max_length",
                truncation=True,
                max_length=TOKENS,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), QUALITY_BATCH)
    ]
    batches = [b for b in batches if b["input_ids"].shape[0] == QUALITY_BATCH]  # one captured shape
    split = len(batches) - calibration_sentences // QUALITY_BATCH
    scored, calibration = batches[:split], batches[split:]
    config = model.config
    ffn = ffn_params_removed(
        config.hidden_size, config.intermediate_size, QUALITY_FFN_RATIO, config.num_hidden_layers
    )
    block = parameter_count(model.encoder.layer[0])
    expected = {name: ffn for name in QUALITY_FFN} | {name: n * block for name, n in QUALITY_DROP}
    expected[QUALITY_PEER] = ffn
    pipelines = {
        DEFAULT: None,
        **MASKED,
        **QUALITY_FFN,
        **{name: p for (name, _), p in QUALITY_DROP.items()},
    }
    variants: dict[str, nn.Module] = {EAGER: model}
    rows = {EAGER: {"pipeline": "-", "status": "eager"}}
    for name, pipeline in pipelines.items():
        rows[name] = {"pipeline": pipeline_text(pipeline)}
        start = time.perf_counter()
        try:
            variants[name] = optimize(
                model, pipeline, example_kwargs=scored[0], calibration=calibration
            )
        except Exception as error:  # a pass that fails is a result to report, not a reason to stop
            rows[name] |= {"status": "error", "error": f"{type(error).__name__}: {error}"}
            print(f"{name}: {rows[name]['error']}", flush=True)
            continue
        rows[name] |= {"status": "applied", "build_s": round(time.perf_counter() - start, 1)}
        stats = variants[name].report.records[-1].result.stats
        if name in MASKED:
            rows[name]["weights_zeroed"] = sum(layer["params_removed"] for layer in stats["layers"])
        if "blocks" in stats:
            rows[name]["dropped_blocks"] = [b["index"] for b in stats["blocks"] if b["dropped"]]
    variants[QUALITY_PEER] = torch_pruning_ffn(model, scored[0], QUALITY_FFN_RATIO)
    rows[QUALITY_PEER] = {
        "pipeline": "torch_pruning BasePruner, GroupMagnitudeImportance(p=2)",
        "status": "applied",
    }
    reference = embed(model, scored)
    times = interleaved_medians(
        {name: (kwargs_call(m), scored[0]) for name, m in variants.items()}, runs, settle=0
    )
    for name, module in variants.items():
        cosine = torch.nn.functional.cosine_similarity(embed(module, scored), reference)
        rows[name] |= {
            "cosine_mean": round(cosine.mean().item(), 5),
            "cosine_min": round(cosine.min().item(), 5),
            **parameter_columns(name, module, variants, expected.get(name)),
            "ms": round(times[name], 2),
            "speedup": round(times[EAGER] / times[name], 3),
        }
        print(json.dumps({"variant": name, **rows[name]}), flush=True)
    table = [{"variant": name, **row} for name, row in rows.items()]
    print_quality_table(table, len(scored) * QUALITY_BATCH, len(calibration) * QUALITY_BATCH)
    return {
        "model": "all-MiniLM-L6-v2",
        "sentences": len(scored) * QUALITY_BATCH,
        "calibration_sentences": len(calibration) * QUALITY_BATCH,
        "batch": QUALITY_BATCH,
        "tokens": TOKENS,
        "rows": table,
    }


def print_quality_table(rows: list[dict[str, Any]], sentences: int, calibration: int) -> None:
    print(
        f"\nMiniLM, {sentences} scored sentences ({calibration} others for calibration), latency at "
        f"batch {QUALITY_BATCH} × {TOKENS} tokens, {torch.get_num_threads()} threads\n"
    )
    print(
        "| variant | cosine mean | cosine min | parameters | removed | zeroed | ms | vs original |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["status"] == "error":
            print(f"| {row['variant']} | error: {row['error'][:100]} | | | | | | |")
            continue
        zeroed = f"{row['weights_zeroed']:,}" if "weights_zeroed" in row else "-"
        if "dropped_blocks" in row:
            row = row | {"variant": f"{row['variant']} ({row['dropped_blocks']})"}
        print(
            f"| {row['variant']} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} | "
            f"{row['params']:,} | {removed_cell(row)} | {zeroed} | {row['ms']:.1f} | "
            f"{row['speedup']:.2f}× |"
        )


# ---- shared --------------------------------------------------------------------------------------


def optimize(model: nn.Module, pipeline: str | None, **kwargs: Any) -> nn.Module:
    """The default pipeline followed by ``pipeline``; ``strict=True``: a failing pass raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimgraph.optimize(model, pipeline_text(pipeline), strict=True, **kwargs)


def pipeline_text(pipeline: str | None) -> str:
    return DEFAULT_PIPELINE if pipeline is None else f"{DEFAULT_PIPELINE}, {pipeline}"


def torch_pruning_ffn(
    model: nn.Module, example_kwargs: dict[str, torch.Tensor], ratio: float
) -> nn.Module:
    """Torch-Pruning's ``BasePruner`` on a copy, with only ``intermediate.dense`` layers as roots.

    Every other linear is ignored, so the only groups are the FFN units (``intermediate.dense``'s
    rows and bias, ``output.dense``'s columns), ranked by its default group L2 magnitude.
    """
    import torch_pruning as tp

    peer = copy.deepcopy(model)
    ignored = [
        module
        for name, module in peer.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("intermediate.dense")
    ]
    pruner = tp.pruner.BasePruner(
        peer,
        example_kwargs,
        tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=ROUND_TO,
        output_transform=lambda outputs: outputs.last_hidden_state,
    )
    pruner.step()
    return peer.eval()


def ffn_params_removed(hidden: int, intermediate: int, ratio: float, layers: int) -> int:
    """Elements sliced away: per removed unit a row and bias entry of fc1, a column of fc2."""
    kept = math.ceil(intermediate * (1 - ratio) / ROUND_TO) * ROUND_TO
    return layers * (intermediate - kept) * (2 * hidden + 1)


def parameter_columns(
    name: str, module: nn.Module, variants: dict[str, nn.Module], expected_removed: int | None
) -> dict[str, Any]:
    """Parameters, those removed from the variant's starting point, and the check of the prediction."""
    baseline = EAGER if name in (EAGER, DEFAULT, SPEED_PEER, QUALITY_PEER) else DEFAULT
    params = parameter_count(module)
    columns = {
        "params": params,
        "params_removed": parameter_count(variants[baseline]) - params,
        "removed_from": baseline,
    }
    if expected_removed is not None:
        columns["params_removed_predicted"] = expected_removed
        columns["prediction_exact"] = expected_removed == columns["params_removed"]
    return columns


def removed_cell(row: dict[str, Any]) -> str:
    cell = f"{row['params_removed']:,}"
    if "prediction_exact" in row:
        ok = row["prediction_exact"]
        cell += " (= predicted)" if ok else f" ✗ predicted {row['params_removed_predicted']:,}"
    return cell


def parameter_count(module: nn.Module) -> int:
    """Elements of the distinct floating-point parameters and buffers of ``module``."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    return sum(t.numel() for t in tensors.values())


def _rounded(load: tuple[float, ...]) -> list[float]:
    return [round(x, 2) for x in load]


def kwargs_call(module: nn.Module) -> Callable[[dict[str, torch.Tensor]], Any]:
    """``f(batch) = module(**batch)``: ``interleaved_medians`` passes one input."""
    return lambda batch: module(**batch)


if __name__ == "__main__":
    main()
