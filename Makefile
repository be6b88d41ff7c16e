# make serve / make test create or refresh .venv first (only when pyproject.toml changed).
PY := .venv/bin/python
SHARED_WEIGHTS := $(abspath ../shared/weights)
ifeq ($(origin RLPIPS_WEIGHTS_DIR), undefined)
ifneq ($(wildcard $(SHARED_WEIGHTS)),)
export RLPIPS_WEIGHTS_DIR := $(SHARED_WEIGHTS)
endif
endif
SHARED_IMAGES := $(abspath ../shared/images/imagenet-sample)
PROJECTION := model_store/files/r-lpips-alex-linf-synth.bank-projection.safetensors
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test lint fmt serve bench clean gpu-bundle gpu-check screenshot lock projection

.venv/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench,eval]'
	$(PY) -m pip install -q -e clients/python
	touch $@

venv: .venv/.installed

# the default model's bank projection (docs/BANK.md): 5 MB fitted from ../shared's training images
# (~30 s, bit-identical on this machine type; the manifest pins its sha256), kept out of git
projection: venv
	@if [ -f $(PROJECTION) ]; then :; \
	elif [ -d $(SHARED_IMAGES) ]; then \
	  .venv/bin/rlpips evaluate bank-projection r-lpips-alex-linf-synth --images $(SHARED_IMAGES) --threads 2; \
	else echo "no $(SHARED_IMAGES): new banks use cell means (docs/BANK.md)"; fi

lint: venv
	.venv/bin/ruff check app tests benchmarks clients
	.venv/bin/ruff format --check app tests benchmarks clients
	.venv/bin/mypy
	.venv/bin/mypy --strict clients/python/rlpips_client

fmt: venv
	.venv/bin/ruff format app tests benchmarks clients
	.venv/bin/ruff check --fix app tests benchmarks clients

test: lint projection
	$(PY) -m pytest -q

# constraints.txt (the Docker images' pinned runtime dependencies) from .venv's resolved versions:
# change pyproject.toml, `make venv` (or pip install -U in .venv), then `make lock` and commit the file
lock: venv
	$(PY) deploy/lock.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

serve: venv projection
	.venv/bin/rlpips serve --host $(HOST) --port $(PORT)

# the README's picture of /ui, taken by the browser test (needs Debian's chromium)
screenshot: venv
	RLPIPS_UI_SCREENSHOT=$(abspath docs/ui.jpg) $(PY) -m pytest -q tests/e2e/test_browser.py -k shows

# issue 7's CPU tables and plot (about 25 minutes on 2 cores; run on an otherwise idle machine)
bench: venv
	$(PY) -m benchmarks.run --resolution 64 --concurrency 1,8,32 --duration 10 --warmup 3 --repeats 3 --torch-threads 1 --json docs/benchmarks/cpu-64.json
	$(PY) -m benchmarks.run --resolution 256 --concurrency 1,8,32 --duration 10 --warmup 3 --repeats 3 --torch-threads 1 --json docs/benchmarks/cpu-256.json
	$(PY) -m benchmarks.plot docs/benchmarks/cpu-64.json docs/benchmarks/cpu-256.json --out docs/benchmarks/throughput.png

# The device check (issue 15): make gpu-bundle here (wheels for the device's Python 3.12, weights, golden
# pairs, sample images into .gpu/), then on the bare GPU machine: make gpu-check OUT=/path/to/results
gpu-bundle: venv
	$(PY) -m benchmarks.gpu_check bundle --dest .gpu

OUT ?= gpu-results
gpu-check:
	python3 -m benchmarks.gpu_check run --bundle .gpu --out $(OUT)

clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache
