# make serve / make test create or refresh .venv first (only when pyproject.toml changed).
PY := .venv/bin/python
SHARED_WEIGHTS := $(abspath ../shared/weights)
ifeq ($(origin RLPIPS_WEIGHTS_DIR), undefined)
ifneq ($(wildcard $(SHARED_WEIGHTS)),)
export RLPIPS_WEIGHTS_DIR := $(SHARED_WEIGHTS)
endif
endif
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test lint fmt serve bench clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

venv: .venv/.installed

lint: venv
	.venv/bin/ruff check app tests benchmarks
	.venv/bin/ruff format --check app tests benchmarks
	.venv/bin/mypy

fmt: venv
	.venv/bin/ruff format app tests benchmarks
	.venv/bin/ruff check --fix app tests benchmarks

test: lint
	$(PY) -m pytest -q

serve: venv
	.venv/bin/rlpips serve --host $(HOST) --port $(PORT)

clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache
