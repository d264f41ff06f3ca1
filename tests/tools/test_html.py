"""The dump tool's HTML view: a self-contained page, checked in a real headless Chromium."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.tools.dump import load_trace
from slimgraph.tools.dump.html import page_data, render_html, write_html

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE_SOURCE = "model.py:7 `s = '</script><script>window.pwned = 1</script>'`"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.log_scale = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return self.drop(self.linear(x)) * self.log_scale.exp()  # exp of a weight: folded


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """cleanup removes the dropouts; fold_constants replaces each ``exp`` with a buffer."""
    folder = tmp_path_factory.mktemp("dump")
    slimgraph.optimize(TwoBlocks().eval(), "cleanup, fold_constants", (torch.randn(2, 8),), dump_dir=folder)
    return load_trace(folder / "trace.jsonl")


@pytest.fixture(scope="module")
def page(trace, tmp_path_factory):
    return write_html(trace, tmp_path_factory.mktemp("html") / "dump.html")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver; `make test` installs chromium")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1400,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def open_page(driver, path: Path):
    """Load ``path`` and wait for the first pass view; the console log starts empty."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.body.dataset.rendered === 'true'"))
    return driver


def highlighted(driver, side: str, mark: str) -> set[str]:
    rows = driver.find_elements("css selector", f"#{side} .node.{mark}")
    return {row.get_attribute("data-node") for row in rows}


def shown_nodes(driver, side: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(r => r.dataset.node)", f"#{side} .node")


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# ---- the file ---------------------------------------------------------------


def test_page_is_self_contained(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", text), "the page must not reference the network"
    assert not re.search(r"\b(src|href)\s*=", text), "no external scripts, styles or links"
    assert '<script type="application/json" id="trace-data">' in text


def test_graphs_are_stored_once_per_distinct_node(trace):
    data = page_data(trace)
    graphs = [trace.header["graph"]] + [p["graph"] for p in trace.passes]
    assert [[data["nodes"][i] for i in ids] for ids in data["graphs"]] == [g["nodes"] for g in graphs]
    assert len(data["nodes"]) < sum(len(g["nodes"]) for g in graphs)
    assert all("graph" not in p for p in data["passes"]) and "graph" not in data["header"]


def test_script_end_tag_in_a_source_line_cannot_end_the_data_block(trace):
    hostile = with_hostile_source(trace)
    text = render_html(hostile)
    assert text.count("</script>") == 2  # the data block's and the code block's own
    embedded = text.split('id="trace-data">')[1].split("</script>")[0]
    assert json.loads(embedded) == page_data(hostile)


def with_hostile_source(trace):
    hostile = copy.deepcopy(trace)
    for graph in [hostile.header["graph"]] + [p["graph"] for p in hostile.passes]:
        graph["nodes"][-2]["source"] = HOSTILE_SOURCE
    return hostile


# ---- in the browser ---------------------------------------------------------


def test_page_loads_without_console_errors(browser, page, trace):
    open_page(browser, page)
    assert severe(browser) == []
    assert browser.execute_script("return typeof window.slimgraphDumpRenderedMs") == "number"
    assert trace.header["model"] in browser.find_element("id", "meta").text


def test_timeline_shows_every_pass_and_selects_the_first(browser, page, trace):
    open_page(browser, page)
    items = browser.find_elements("css selector", "#timeline li.pass")
    assert [item.find_element("class name", "name").text for item in items] == ["0. cleanup", "1. fold_constants"]
    assert "selected" in items[0].get_attribute("class")
    assert all("status-applied" in item.get_attribute("class") for item in items)
    assert "removed 2 dropout" in items[0].text  # the pass's notes


def test_selected_pass_highlights_its_changes(browser, page, trace):
    open_page(browser, page)
    cleanup = trace.passes[0]
    assert highlighted(browser, "before", "removed") == set(cleanup["removed"]) != set()
    assert highlighted(browser, "after", "added") == set(cleanup["added"])
    totals = browser.find_element("id", "totals").text
    assert f"{cleanup['totals_before']['nodes']} → {cleanup['totals_after']['nodes']}" in totals


def test_clicking_another_pass_switches_the_view(browser, page, trace):
    open_page(browser, page)
    before_click = highlighted(browser, "before", "removed")
    browser.find_element("css selector", '#timeline li[data-pass="1"]').click()
    fold = trace.passes[1]
    assert highlighted(browser, "before", "removed") == set(fold["removed"]) != before_click
    assert highlighted(browser, "after", "added") == set(fold["added"]) != set()
    assert highlighted(browser, "after", "replaced") == {r["new"] for r in fold["replaced"]} != set()
    assert sorted(shown_nodes(browser, "after")) == sorted(n["name"] for n in trace.graph_after(1)["nodes"])


def test_clicking_a_node_shows_its_panel_with_the_source_line(browser, page, trace):
    open_page(browser, page)
    node = next(n for n in trace.graph_after(0)["nodes"] if n["source"] and n["module_path"])
    browser.find_element("css selector", f'#after .node[data-node="{node["name"]}"]').click()
    panel = browser.find_element("id", "node-panel").text
    assert node["name"] in panel and node["kernel"] in panel and node["module_path"] in panel
    assert browser.find_element("id", "node-source").text == node["source"]


def test_search_filters_by_module_name(browser, page, trace):
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, page)
    everything = shown_nodes(browser, "after")
    browser.find_element("id", "search").send_keys("blocks.1")
    WebDriverWait(browser, 5).until(lambda d: shown_nodes(d, "after") != everything)
    expected = {n["name"] for n in trace.graph_after(0)["nodes"]
                if "blocks.1" in n["module_path"] or "blocks.1" in n["name"]}
    assert set(shown_nodes(browser, "after")) == expected != set()


def test_module_tree_counts_nodes_and_filters_on_click(browser, page, trace):
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, page)
    tree = browser.find_element("id", "tree").text
    assert "blocks" in tree and "head" in tree and "Linear" in tree
    browser.find_element("css selector", '#tree [data-module="head"]').click()
    WebDriverWait(browser, 5).until(lambda d: d.find_element("id", "search").get_attribute("value") == "head")
    assert set(shown_nodes(browser, "before")) == {
        n["name"] for n in trace.graph_before(0)["nodes"] if "head" in n["module_path"] or "head" in n["name"]}


def test_script_end_tag_in_a_source_line_shows_as_text(browser, trace, tmp_path):
    page = write_html(with_hostile_source(trace), tmp_path / "dump.html")
    open_page(browser, page)
    name = trace.graph_after(0)["nodes"][-2]["name"]
    browser.find_element("css selector", f'#after .node[data-node="{name}"]').click()
    assert browser.find_element("id", "node-source").text == HOSTILE_SOURCE
    assert browser.execute_script("return window.pwned") is None
    assert severe(browser) == []
