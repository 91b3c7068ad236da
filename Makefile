# rwkv2rknn developer entry points. `make setup` builds .venv; every other target uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# rknn-toolkit2 2.5.0 pins (see shared/docs/rknn-toolkit2.md); torch is only imported by the toolkit.
TORCH := torch==2.13.0
RKNN := rknn-toolkit2==2.5.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

# Tools some tests drive (command:Debian package): headless chromium renders the report, tmux drives --chat.
SYSTEM_TOOLS := chromium:chromium tmux:tmux

.PHONY: setup system-tools test test-all demo bench lint clean

setup: $(VENV)/.setup-done system-tools

# Installs the missing SYSTEM_TOOLS with apt-get when we are root or sudo works without a password;
# otherwise says so in one line and carries on (their tests skip). Costs two `command -v` when done.
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v "$${t%%:*}" >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "note:$$missing not installed (needs apt-get as root); the tests that use them will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "note:$$missing not installed (no apt-get here); the tests that use them will skip"; exit 0; fi; \
	echo "installing$$missing with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true; \
	for p in $$missing; do \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$$p" >/dev/null 2>&1 \
	    || echo "note: apt-get could not install $$p; the tests that use it will skip"; \
	done

$(VENV)/.setup-done: pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt --upgrade "pip>=23" wheel
	# CPU torch first, so nothing below can pull a CUDA build.
	$(PIP) install -c constraints.txt $(TORCH)
	# The toolkit declares pins that would drag in other builds; its real needs are listed below.
	$(PIP) install -c constraints.txt --no-deps $(RKNN)
	$(PIP) install -c constraints.txt numpy onnx protobuf setuptools \
	    psutil ruamel.yaml scipy tqdm fast-histogram opencv-python-headless
	$(PIP) install -c constraints.txt -e ".[compile,board,dev,bench,serve]"
	@echo "note: pip's resolver warns that rknn-toolkit2 wants torch<=2.4 and opencv-python; that is expected:"
	@echo "      the toolkit runs with the CPU torch 2.13 and opencv-python-headless installed here."
	$(BIN)/python -c "import rknn.api, onnxruntime, onnx_graphsurgeon, rwkv2rknn" 
	touch $@

# The default run (CI's): everything but the tests marked slow (big shapes, long runs, extra builds).
test: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-all: setup
	$(BIN)/python -m pytest -q

demo: setup
	bash examples/quickstart.sh

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check rwkv2rknn passes tests benchmarks examples

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo-out
