# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.imgprep-installed

.PHONY: venv demo test interop bench clean

venv: $(STAMP)

# pillow-simd compiles from source: it needs a C compiler, the Python headers and the libjpeg-turbo and
# zlib headers (Debian/Ubuntu: build-essential python3-dev libjpeg-dev zlib1g-dev).
$(STAMP): pyproject.toml scripts/ensure-pillow-simd.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,torch,dask,bench]'
	bash scripts/ensure-pillow-simd.sh $(BIN)/python
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/imgprep doctor
	$(BIN)/imgprep demo build/demo

# One test process per core (pytest-xdist); the slowest tests are listed at the end.
test: $(STAMP)
	@echo "make test: the whole suite, about 8 minutes on 2 idle cores (more on a busy machine); one module: $(BIN)/python -m pytest tests/test_lists.py"
	$(BIN)/python -m pytest -n auto --durations=5

# Interoperability with BVLC Caffe's own tools: IMGPREP_CAFFE_TOOLS=DIR names a folder holding
# convert_imageset and compute_image_mean (or a Caffe build folder with them in tools/).
interop: $(STAMP)
	@test -n "$$IMGPREP_CAFFE_TOOLS" || { echo "make interop: set IMGPREP_CAFFE_TOOLS=DIR, a folder with Caffe's convert_imageset and compute_image_mean"; exit 2; }
	$(BIN)/python -m pytest -q tests/test_interop.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_build.py
	$(BIN)/python benchmarks/bench_mean.py
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_dask.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_imagenet_scale.py

clean:
	rm -rf $(VENV) build *.egg-info
