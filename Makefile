# Two commands do everything: `make demo` (the whole pipeline on the embedded default) and
# `make test`. Both create or reuse the virtualenv in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP ?= $(VENV)/.installed
# The pinned torch first, with the torchvision built against it (timm, onnx2torch and the
# test zoos need torchvision; its wheels load only beside the torch release they were built for).
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The ONNX Runtime build, one of the extras cpu or gpu (never both): `make ORT=gpu` for onnxruntime-gpu.
ORT ?= cpu

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[$(ORT),dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/structadmm run

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest $(ARGS) || [ $$? -eq 5 ]

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(ARGS) || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) benchmarks/digits_default.py

clean:
	rm -rf $(VENV) runs .pytest_cache
