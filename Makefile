# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test quality format cycles gpu-wheels gpu-check-cpu

$(STAMP): pyproject.toml
	# torch first: the pinned CPU wheel satisfies the `train` extra, so nothing pulls CUDA builds.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[train,export,serve,dev]"
	# the ImageNet-C corruptions without their opencv-python pin (pyproject.toml says why)
	$(PIP) install -q --no-deps "imagecorruptions-imaug>=1.1.5"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m endostream demo

test: $(STAMP)
	$(PYTHON) -m pytest -q -ra

quality: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMP)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# Import cycles among the first-party modules (standard library only; the test suite runs it too, in
# tests/scripts/test_check_import_cycles.py).
cycles:
	$(PYTHON) scripts/check_import_cycles.py

# Wheels the GPU machine lacks (the service's web stack, ~3 MB) into .whl/, for a device run of scripts/gpu-check.
gpu-wheels:
	scripts/fetch-gpu-wheels

# The GPU check's steps at small sizes on this machine (what CI runs through tests/endostream/test_gpu_check.py).
gpu-check-cpu: $(STAMP)
	scripts/gpu-check --cpu endostream-work/gpu-check-cpu
