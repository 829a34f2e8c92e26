# NanoGrid developer entry points. `make demo` and `make test` are the README's two commands.
# Installs come from the lock files requirements.txt and requirements-test.txt (exact versions, hashes checked; uv,
# which installs the first, from requirements-uv.txt); `make lock` moves the pins on purpose. `pip install nanogrid`
# users get pyproject.toml's ranges instead.
VENV ?= .venv
PYTHON ?= python3
PIP = $(VENV)/bin/pip install -q --disable-pip-version-check
# The grid's own uv (pinned in requirements.txt too) installs the runtime lock: wheels fetched side by side and linked
# from its cache, where pip takes them one at a time (72 wheels: 18-21 s with pip, 2-5 s with uv and its bootstrap;
# benchmarks/bench_demo.py). Where uv fails (e.g. an index that only pip.conf names), pip does the install.
UV_PIP = $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python
install = @echo "$(UV_PIP) $(1)"; $(UV_PIP) $(1) || { echo "uv could not install it: pip does" >&2; $(PIP) $(1); }
# Not --quiet: it hides the warnings that --strict counts.
MKDOCS = NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

.PHONY: setup setup-test demo lab test test-fast bench lint lock docs

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# uv alone, by pip, from a lock file of its own (the same pin and hashes as requirements.txt's).
$(VENV)/bin/uv: | $(VENV)/bin/python
	$(PIP) --require-hashes -r requirements-uv.txt

# What the grid and the demo need, nothing more. No bytecode yet: the demo's first run compiles what it imports
# (0.8 s), where compiling every package first takes 3 s.
$(VENV)/.installed-runtime: requirements.txt pyproject.toml | $(VENV)/bin/uv
	$(call install,--require-hashes -r requirements.txt)
	$(call install,--no-deps --no-build-isolation -e .)
	touch $@

# The same, compiled to bytecode as pip alone did: the tests' many processes import these packages.
$(VENV)/.installed: $(VENV)/.installed-runtime
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib
	touch $@

# The test stack on top (JupyterLab, Playwright, moto, checkov, ...).
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PIP) --require-hashes -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed-runtime
	$(VENV)/bin/nanogrid demo

# The embedded grid and JupyterLab on the tutorial notebooks, installed from the lock files; stopping JupyterLab
# (Ctrl-C) stops the grid. Options pass on: make lab GRID_ARGS="--sandbox process" LAB_ARGS="--no-browser --port 8899"
lab: setup-test
	@$(VENV)/bin/nanogrid up $(GRID_ARGS) & grid=$$!; trap 'kill $$grid 2>/dev/null' EXIT INT TERM; \
	until $(VENV)/bin/nanogrid status >/dev/null 2>&1; do kill -0 $$grid 2>/dev/null || exit 1; sleep 0.5; done; \
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .  # the whole tree as `ruff format` writes it (line length 100)
	$(VENV)/bin/mypy  # every package, the sandbox bootstrap included (pyproject.toml [tool.mypy])
	$(MKDOCS)

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a broken link or a page left out of the nav.
# docs/hooks.py writes the HTTP reference from the controller's OpenAPI schema, on a throwaway grid in a temp dir.
docs: setup-test
	$(MKDOCS)

test: lint
	$(VENV)/bin/python -m pytest -q -p nbval --nbval-lax tests notebooks

# The inner loop: tests that start no grid, server or container.
test-fast: setup-test
	$(VENV)/bin/python -m pytest -q -m "not integration" -p no:cacheprovider

# Re-resolve the pins (needs uv: `pip install uv`); review and commit the diff.
lock: setup
	$(VENV)/bin/python -m uv --version >/dev/null 2>&1 || $(PIP) uv
	$(VENV)/bin/python -m uv pip compile pyproject.toml requirements-build.in --extra grid --extra aws --extra test --python-version 3.11 \
		--universal --generate-hashes -q -o requirements-test.txt
	$(VENV)/bin/python -m uv pip compile pyproject.toml requirements-build.in --extra grid --extra aws --python-version 3.11 \
		--universal --generate-hashes -q -c requirements-test.txt -o requirements.txt
	echo uv | $(VENV)/bin/python -m uv pip compile - --python-version 3.11 \
		--universal --generate-hashes -q -c requirements.txt -o requirements-uv.txt

# Ray and Dask, measured beside NanoGrid, live in a venv of their own: Ray needs newer packages than the lock files pin.
bench: setup-test
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q --disable-pip-version-check ray==2.60.0 "dask[distributed]==2026.8.0"
	$(VENV)/bin/python benchmarks/bench_embedded.py --peers-python .venv-peers/bin/python
	$(VENV)/bin/python nanogrid_runtimes/build.py
	$(VENV)/bin/python -m benchmarks.bench_docker
