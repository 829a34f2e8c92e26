# NanoGrid developer entry points. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup demo test bench lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/nanogrid demo

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/pip install -q -e ".[test,bench]"
	$(VENV)/bin/python benchmarks/bench_embedded.py
	$(VENV)/bin/python runtimes/build.py
	$(VENV)/bin/python -m benchmarks.bench_docker
