"""Does the dump tool's HTML view stay usable on a big graph?

The 48-layer GPT-2 config (hidden 256, 4 heads, random weights; batch 2 × 64 tokens)
through "cleanup, fold_constants" with dump_dir: the trace holds three graphs of
~2,500 nodes. Measures the trace and page sizes, the time to write the page, and
the time headless Chromium takes from navigation start to the page's "first pass
view rendered" marker (``window.slimgraphDumpRenderedMs``), median of 3 loads.
Targets: page < 15 MB, render < 5 s.

    .venv/bin/python benchmarks/dump_scale.py [--layers 48] [--loads 3]

Writes benchmarks/results/dump_scale.json. Needs /usr/bin/chromium and chromedriver.
``--screenshot docs/dump.png`` instead renders the demo pipeline on MiniLM (8 real
sentences), selects fold_constants, clicks a folded node and saves a 1600 × 1000 PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import slimgraph
from slimgraph import models
from slimgraph.tools.dump import load_trace
from slimgraph.tools.dump.html import write_html

RESULTS = Path(__file__).parent / "results" / "dump_scale.json"
PIPELINE = "cleanup, fold_constants"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--screenshot", type=Path, help="save the MiniLM demo view here and stop")
    args = parser.parse_args()
    if args.screenshot:
        with tempfile.TemporaryDirectory() as folder:
            screenshot_minilm(Path(folder), args.screenshot)
        print(f"wrote {args.screenshot}")
        return
    with tempfile.TemporaryDirectory() as folder:
        row = measure(args.layers, args.loads, Path(folder))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "pipeline": PIPELINE, "rows": [row]}, indent=2) + "\n")
    print_table(row)
    print(f"wrote {RESULTS}")


def measure(layers: int, loads: int, folder: Path) -> dict:
    model = models.gpt2(layers=layers, hidden=256, heads=4, vocab=1024)
    inputs = {"input_ids": torch.randint(0, 1024, (2, 64))}
    start = time.perf_counter()
    slimgraph.optimize(model, PIPELINE, example_kwargs=inputs, dump_dir=folder)
    optimize_s = time.perf_counter() - start
    trace = load_trace(folder / "trace.jsonl")
    start = time.perf_counter()
    page = write_html(trace, folder / "dump.html")
    write_s = time.perf_counter() - start
    render_ms = browser_render_ms(page, loads)
    return {
        "layers": layers,
        "graph_nodes": [len(trace.header["graph"]["nodes"])] + [len(p["graph"]["nodes"]) for p in trace.passes],
        "optimize_with_dump_s": round(optimize_s, 2),
        "trace_mb": round((folder / "trace.jsonl").stat().st_size / 1e6, 2),
        "html_mb": round(page.stat().st_size / 1e6, 2),
        "write_html_s": round(write_s, 3),
        "render_ms_median": round(statistics.median(render_ms)),
        "render_ms_each": [round(ms) for ms in render_ms],
        "targets": {"html_mb": 15, "render_ms": 5000},
    }


def browser_render_ms(page: Path, loads: int) -> list[float]:
    """Navigation start → the page's rendered marker, one fresh navigation per load."""
    with headless_chromium() as driver:
        times = []
        for _ in range(loads):
            driver.get("about:blank")
            times.append(load(driver, page))
        return times


def screenshot_minilm(folder: Path, png: Path) -> None:
    model, tokenizer = models.minilm()
    batch = dict(tokenizer(models.sentences(8), padding=True, return_tensors="pt"))
    slimgraph.optimize(model, PIPELINE, example_kwargs=batch, dump_dir=folder)
    page = write_html(load_trace(folder / "trace.jsonl"), folder / "dump.html")
    with headless_chromium() as driver:
        load(driver, page)
        driver.find_element("css selector", '#timeline li[data-pass="1"]').click()
        driver.find_element("css selector", '#after .node[data-node="_folded_0"]').click()
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))


def load(driver, page: Path) -> float:
    """Open ``page``; the ms from navigation start to its first pass view being rendered."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.resolve().as_uri())
    return WebDriverWait(driver, 60, poll_frequency=0.05).until(
        lambda d: d.execute_script("return window.slimgraphDumpRenderedMs"))


@contextlib.contextmanager
def headless_chromium() -> Iterator:
    """Debian's chromium with a throwaway profile and a 1600 × 1000 viewport."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    with tempfile.TemporaryDirectory() as profile:
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.binary_location = "/usr/bin/chromium"
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
            yield driver
        finally:
            driver.quit()


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def print_table(row: dict) -> None:
    cells = [("layers", row["layers"]), ("nodes per graph", row["graph_nodes"]),
             ("trace MB", row["trace_mb"]), ("html MB (target < 15)", row["html_mb"]),
             ("write_html s", row["write_html_s"]),
             ("render ms median (target < 5000)", row["render_ms_median"]),
             ("render ms each", row["render_ms_each"])]
    width = max(len(name) for name, _ in cells)
    for name, value in cells:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
