# Two commands do everything: `make demo` (the whole pipeline on the embedded default) and
# `make test`. Both create or reuse the virtualenv in .venv; so does `make docs`, which builds the
# docs site strictly into site/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP ?= $(VENV)/.installed
DOCS_STAMP ?= $(VENV)/.installed-docs
# The pinned torch first, with the torchvision built against it (timm, onnx2torch and the
# test zoos need torchvision; its wheels load only beside the torch release they were built for).
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The ONNX Runtime build, one of the extras cpu or gpu (never both): `make ORT=gpu` for onnxruntime-gpu.
ORT ?= cpu

# `make test-min`: the fast suite in its own virtualenv with every dependency at the lowest version
# pyproject.toml allows (tools/floors.py turns each >=X into ==X; their dependencies resolve as pip
# chooses). transformers is left out: it is only a test zoo, and its own requirements are above our
# floors (5.23 needs safetensors>=0.8), so the tests that need it skip.
VENV_MIN ?= .venv-min
PY_MIN := $(VENV_MIN)/bin/python
STAMP_MIN ?= $(VENV_MIN)/.installed

.PHONY: demo test test-slow test-min bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[$(ORT),dev]"
	touch $(STAMP)

# The docs tools (the `docs` extra: mkdocs, its material theme, mkdocstrings), on top of the above.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[$(ORT),dev,docs]"
	touch $(DOCS_STAMP)

$(STAMP_MIN): pyproject.toml tools/floors.py
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install --quiet --upgrade pip
	$(PY_MIN) tools/floors.py $(ORT) dev --without transformers > $(VENV_MIN)/floors.txt
	$(PY_MIN) -m pip install --quiet --only-binary=:all: -r $(VENV_MIN)/floors.txt
	$(PY_MIN) -m pip install --quiet --no-deps -e .
	touch $(STAMP_MIN)

demo: $(STAMP)
	$(VENV)/bin/structadmm run

# A run that collects no test fails (pytest's exit status 5): it proves nothing.
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(ARGS)

# --strict: a broken link or anchor, a page missing from the nav or a docstring mkdocstrings cannot
# read fails the build. NO_MKDOCS_2_WARNING silences the theme's notice about its successor.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The installed versions are printed first, so a log shows what the run tested.
test-min: $(STAMP_MIN)
	$(PY_MIN) -m pip freeze --exclude-editable
	$(PY_MIN) -m pytest -m 'not slow' $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/digits_default.py

clean:
	rm -rf $(VENV) $(VENV_MIN) runs .pytest_cache site
