# rwkv2rknn developer entry points. `make setup` builds .venv; every other target uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# rknn-toolkit2 2.5.0 pins (see shared/docs/rknn-toolkit2.md); torch is only imported by the toolkit.
TORCH := torch==2.13.0
RKNN := rknn-toolkit2==2.5.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup test test-fast demo bench lint clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt --upgrade "pip>=23" wheel
	# CPU torch first, so nothing below can pull a CUDA build.
	$(PIP) install -c constraints.txt $(TORCH)
	# The toolkit declares pins that would drag in other builds; its real needs are listed below.
	$(PIP) install -c constraints.txt --no-deps $(RKNN)
	$(PIP) install -c constraints.txt numpy onnx protobuf setuptools \
	    psutil ruamel.yaml scipy tqdm fast-histogram opencv-python-headless
	$(PIP) install -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -c "import rknn.api, onnxruntime, onnx_graphsurgeon, rwkv2rknn" 
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	bash examples/quickstart.sh

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check rwkv2rknn passes tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo-out
