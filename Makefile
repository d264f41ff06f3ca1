# Two commands: `make demo` and `make test`. Both create .venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/slimgraph optimize minilm

test: $(STAMP) lint system-deps
	$(PY) -m pytest -q -n 2 --durations=15

# Headless Chromium + its driver (the dump tool's HTML view is tested in a real browser)
# and Graphviz's `dot` (DOT/SVG views), from Debian's packages.
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v dot >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver graphviz >/dev/null; }

lint: $(STAMP)
	$(VENV)/bin/ruff check slimgraph tests benchmarks scripts

bench: $(STAMP) system-deps
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/pipeline_overhead.py
	$(PY) benchmarks/dump_scale.py
	$(PY) benchmarks/quant_cpu.py
	$(PY) benchmarks/quant_quality.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/prune_drop_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
