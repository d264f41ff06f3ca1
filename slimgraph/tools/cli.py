"""The ``slimgraph`` command line.

    slimgraph optimize [MODEL] [--passes TEXT] [--sentences N] [--tolerance X]
    slimgraph dump [MODEL] [--passes TEXT] [--out DIR] [--format text,dot,html] [--only-changed]

MODEL is ``minilm`` (the bundled pretrained sentence encoder, the default) or
``package.module:factory``, a function returning ``(model, example_inputs)``
where example_inputs is an args tuple or a kwargs dict. ``dump`` also takes the
path of a ``.pt2`` file saved by ``torch.export.save``; it runs on the program's
own example inputs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from slimgraph.errors import SlimgraphError
from slimgraph.passes import DEFAULT_PIPELINE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimgraph", description="Make PyTorch models smaller and faster.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("optimize", help="optimize a model and print what each pass did")
    run.add_argument("model", nargs="?", default="minilm",
                     help="'minilm' (bundled, default) or 'package.module:factory'")
    _add_pipeline_arguments(run)
    dump = commands.add_parser("dump", help="optimize a model and write what each pass did to the graph")
    dump.add_argument("model", nargs="?", default="minilm",
                      help="'minilm' (bundled, default), 'package.module:factory' or a torch.export .pt2 file")
    _add_pipeline_arguments(dump)
    dump.add_argument("--out", default="slimgraph_dump", help="output directory (default: ./slimgraph_dump)")
    dump.add_argument("--format", default="text",
                      help=f"comma-separated views to write: {', '.join(DUMP_FORMATS)} (default: text)")
    dump.add_argument("--only-changed", action="store_true", help="text view: only the passes that applied")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    try:
        return dump_command(args, console) if args.command == "dump" else optimize_command(args, console)
    except (SlimgraphError, ValueError, ImportError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        return 2


def _add_pipeline_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pipeline text (default: '{DEFAULT_PIPELINE}')")
    command.add_argument("--sentences", type=int, default=8, help="real sentences to run MiniLM on (default 8)")
    command.add_argument("--tolerance", type=float, default=None,
                         help="roll back any pass whose relative output error exceeds this")


def _split_inputs(inputs: tuple | list | dict) -> tuple[tuple, dict]:
    """Example inputs as ``(args, kwargs)``: a dict is keyword arguments, a sequence positional ones."""
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def optimize_command(args: argparse.Namespace, console: Console) -> int:
    import slimgraph
    from slimgraph.passes.manager import Pipeline

    pipeline = Pipeline.coerce(args.passes)  # fail on a bad pipeline before loading anything
    model, inputs, summarize = load_model_spec(args.model, args.sentences)
    example_args, example_kwargs = _split_inputs(inputs)
    optimized = slimgraph.optimize(model, pipeline, example_args, example_kwargs=example_kwargs,
                                   tolerance=args.tolerance)
    console.print(optimized.report.table(title=f"slimgraph optimize {args.model}: {pipeline}"))
    eager_ms, optimized_ms = _latency_ms([model, optimized], example_args, example_kwargs)
    console.print(f"eager latency {eager_ms:.2f} ms → optimized {optimized_ms:.2f} ms "
                  f"({eager_ms / optimized_ms:.2f}×; median of 20 interleaved runs, "
                  f"{torch.get_num_threads()} threads)")
    if summarize is not None:
        console.print(summarize(model, optimized))
    return 0


DUMP_FORMATS = ("text", "dot", "html")


def dump_command(args: argparse.Namespace, console: Console) -> int:
    """Optimize with a trace in ``--out``, then render each requested view of it there."""
    import slimgraph
    from slimgraph.passes.manager import Pipeline
    from slimgraph.tools.dump import load_trace

    formats = _dump_formats(args.format)
    pipeline = Pipeline.coerce(args.passes)
    out = _writable_dir(Path(args.out))
    if args.model.endswith(".pt2") or Path(args.model).is_file():
        model, example_args, example_kwargs = load_exported_program(args.model)
    else:
        model, inputs, _ = load_model_spec(args.model, args.sentences)
        example_args, example_kwargs = _split_inputs(inputs)
    slimgraph.optimize(model, pipeline, example_args, example_kwargs=example_kwargs,
                       tolerance=args.tolerance, dump_dir=out)
    trace = load_trace(out / "trace.jsonl")
    written = [out / "trace.jsonl"]
    if "text" in formats:
        from slimgraph.tools.dump.text import render_text

        text = render_text(trace, only_changed=args.only_changed)
        (out / "dump.txt").write_text(text)
        print(text, end="")
        written.append(out / "dump.txt")
    if "dot" in formats:
        written += _write_dot_files(trace, out / "dot", console)
    if "html" in formats:
        from slimgraph.tools.dump.html import write_html

        write_html(trace, out / "dump.html")
        written.append(out / "dump.html")
    console.print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written[:6])}"
                  + (", ..." if len(written) > 6 else ""), highlight=False, markup=False)
    return 0


def load_exported_program(path: str) -> tuple[nn.Module, tuple, dict]:
    """``(module, args, kwargs)`` of a program saved by ``torch.export.save``."""
    if not Path(path).is_file():
        raise ValueError(f"model '{path}': no such file; MODEL is 'minilm', 'package.module:factory' "
                         "or a .pt2 file saved with torch.export.save(torch.export.export(model, args), path)")
    try:
        program = torch.export.load(path)
    except Exception as error:  # torch raises many kinds here (zip, pickle, version) for a non-program
        raise ValueError(f"model '{path}' is not a torch.export program ({type(error).__name__}: {error}); "
                         "save one with torch.export.save(torch.export.export(model, args), path)") from error
    if program.example_inputs is None:
        raise ValueError(f"model '{path}' was saved without example inputs, which the dump runs on; "
                         "export it again with torch.export.export(model, args) and save that program")
    args, kwargs = program.example_inputs
    return program.module(), tuple(args), dict(kwargs)


def _dump_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in DUMP_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown --format {', '.join(repr(f) for f in unknown) or repr(text)}; "
                         f"choose from {', '.join(DUMP_FORMATS)}, comma-separated (e.g. --format text,dot)")
    return formats


def _writable_dir(out: Path) -> Path:
    """``out``, created; a clear error up front rather than after the model has run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".slimgraph_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write the dump to '{out}' ({error.strerror or error}); "
                         "pass --out with a directory you can write to") from error
    return out


def _write_dot_files(trace: Any, out: Path, console: Console) -> list[Path]:
    from slimgraph.tools.dump.dot import GraphvizMissingError, write_dot

    try:
        return write_dot(trace, out)
    except GraphvizMissingError as error:
        console.print(f"warning: {error}", highlight=False, markup=False)
        return error.written


def load_model_spec(spec: str, sentences: int = 8) -> tuple[nn.Module, Any, Callable | None]:
    """``(model, example_inputs, summarize)`` for a MODEL argument; see the module docstring."""
    if spec == "minilm":
        return _minilm(sentences)
    if ":" not in spec:
        raise ValueError(f"model '{spec}' is neither 'minilm' nor 'package.module:factory' "
                         "(e.g. 'mypkg.models:build' returning (model, example_inputs))")
    module_name, _, factory_name = spec.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m`: modules next to the user resolve
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"model '{spec}': cannot import module '{module_name}' ({error})") from error
    except AttributeError as error:
        raise ValueError(f"model '{spec}': module '{module_name}' has no function '{factory_name}'") from error
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)
            and isinstance(result[1], tuple | list | dict)):
        raise ValueError(f"model '{spec}': the factory must return (nn.Module, example_inputs) with "
                         f"example_inputs an args tuple or kwargs dict; got {type(result).__name__}")
    return result[0].eval(), result[1], None


def _minilm(count: int):
    from slimgraph import models

    model, tokenizer = models.minilm()
    batch = dict(tokenizer(models.sentences(count), padding=True, return_tensors="pt"))

    def summarize(original: nn.Module, optimized: nn.Module) -> str:
        with torch.no_grad():
            want = _mean_pool(original(**batch).last_hidden_state, batch["attention_mask"])
            got = _mean_pool(optimized(**batch).last_hidden_state, batch["attention_mask"])
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        return (f"sentence embeddings on {count} real sentences: cosine similarity to the original "
                f"min {cosine.min().item():.6f}, mean {cosine.mean().item():.6f}")

    return model, batch, summarize


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def _latency_ms(modules: list[nn.Module], args: tuple, kwargs: dict, runs: int = 20) -> list[float]:
    """Median latency of each module, runs interleaved so machine noise hits all alike."""
    times: list[list[float]] = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(runs + 1):
            for module, samples in zip(modules, times, strict=True):
                start = time.perf_counter()
                module(*args, **kwargs)
                samples.append(time.perf_counter() - start)
    return [sorted(samples[1:])[runs // 2] * 1e3 for samples in times]


if __name__ == "__main__":
    sys.exit(main())
