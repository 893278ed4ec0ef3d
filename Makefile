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

.PHONY: demo test test-slow bench docs clean

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

demo: $(STAMP)
	$(VENV)/bin/structadmm run

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest $(ARGS) || [ $$? -eq 5 ]

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(ARGS) || [ $$? -eq 5 ]

# --strict: a broken link or anchor, a page missing from the nav or a docstring mkdocstrings cannot
# read fails the build. NO_MKDOCS_2_WARNING silences the theme's notice about its successor.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/digits_default.py

clean:
	rm -rf $(VENV) runs .pytest_cache site
