"""Triton Python-backend model: a base causal LM that serves generation through PEFT LoRA adapters.

The supervisor copies this file to ``<repository>/<model>/1/model.py``. It runs inside Triton's
Python stub, where only torch, transformers, peft, numpy and ``triton_python_backend_utils`` can be
relied upon (NVIDIA's image has no ``seal``), so it is self-contained: the serving-state schema is
re-read here rather than imported from ``seal.serving.triton.state``.

Hot swap: the instance keeps every version named by the serving-state JSON loaded in one
``PeftModel`` (one named adapter per version) and checks the file's stat signature at the start of
every ``execute``. Triton calls ``execute`` of one instance serially, so a routing change lands
between two batches: a request is either served wholly by the old routing or wholly by the new
one, and none is failed or dropped because of a swap. New adapters are loaded and validated before
the routing changes; when that fails the instance keeps its previous routing and reports why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import traceback
from collections import defaultdict
from typing import Any

import numpy as np

try:  # present only inside Triton's stub; the pure helpers below are importable without it
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised in the stub only
    pb_utils = None

BASE_VERSION = "base"
SCHEMA_VERSION = 1


class StateError(ValueError):
    pass


def parse_state(text: str) -> dict[str, Any]:
    """Validate the serving-state JSON written by ``seal.serving.triton.state`` (same schema)."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"serving state is not valid JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise StateError("serving state must be a JSON object of a supported schema")
    adapters = body.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise StateError("serving state 'adapters' must map version -> directory")
    adapters = {str(k): str(v) for k, v in adapters.items()}
    if BASE_VERSION in adapters or "" in adapters:
        raise StateError(f"{BASE_VERSION!r} and '' are reserved, not adapter versions")
    state = {
        "generation": int(body.get("generation", 0)),
        "promoted": body.get("promoted"),
        "canary": body.get("canary"),
        "canary_fraction": float(body.get("canary_fraction", 0.0) or 0.0),
        "adapters": adapters,
    }
    for role in ("promoted", "canary"):
        if state[role] is not None and state[role] not in adapters:
            raise StateError(f"{role} version {state[role]!r} has no adapter directory")
    fraction = state["canary_fraction"]
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise StateError(f"canary_fraction must be within [0, 1], got {fraction}")
    return state


def canary_bucket(routing_key: str) -> float:
    """Stable position in [0, 1) for a routing key: the same user stays on the same side of a
    canary split across requests, instances and restarts (``hash()`` is salted per process)."""
    digest = hashlib.sha256(routing_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_version(requested: str, routing: dict[str, Any], draw: float) -> str:
    """Version that serves one prompt. ``draw`` in [0, 1) decides canary membership."""
    if requested:
        return requested
    canary = routing.get("canary")
    if canary is not None and draw < routing.get("canary_fraction", 0.0):
        return canary
    return routing.get("promoted") or BASE_VERSION


def peft_name(version: str, path: str) -> str:
    """PEFT adapter names become module keys (no dots allowed); the path is part of the name so a
    version re-pointed at another directory is loaded beside the old one, never over it."""
    return "v" + hashlib.sha1(f"{version}\0{path}".encode()).hexdigest()[:16]


def _error_code(name: str):
    error = pb_utils.TritonError
    return getattr(error, name, None)


def _triton_error(message: str, code: str = "INTERNAL"):
    value = _error_code(code)
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message, value)


def _cancel_check(request):
    """``request.is_cancelled`` where this python backend has it (Triton 23.10 and later)."""
    return getattr(request, "is_cancelled", None) or (lambda: False)


def _rows_cancelled(checks: list[Any], on_stopped: Any):
    """A transformers stopping criterion with one flag per row: a row whose request was cancelled
    is finished (padded from then on), so a client's deadline frees the instance within one token
    instead of after max_new_tokens. Each request is asked once per token; ``on_stopped(n)`` is
    told how many rows it newly stopped."""
    import torch
    from transformers import StoppingCriteria

    stopped: set[int] = set()

    class RowsCancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            answers: dict[int, bool] = {}
            flags = [answers.setdefault(id(check), bool(check())) for check in checks]
            newly = {row for row, flag in enumerate(flags) if flag} - stopped
            if newly:
                stopped.update(newly)
                on_stopped(len(newly))
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return RowsCancelled()


class _RequestError(Exception):
    """A client mistake: reported to that request only, as INVALID_ARG."""


def _optional_input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = config.get("name", "seal_student")
        self.instance = args.get("model_instance_name", self.model_name)
        base_path = params.get("base_model", "")
        if not base_path or not os.path.isdir(base_path):
            raise RuntimeError(f"parameter base_model must name a model directory, got {base_path!r}")
        self.state_path = params.get("serving_state") or None
        # Whoever reaches the inference port can name adapter directories (control 'prepare', or
        # the state file); confining them to the registry keeps the server from reading elsewhere.
        root = params.get("adapter_root") or ""
        self.adapter_root = os.path.realpath(root) if root else None
        self.max_new_tokens_limit = int(params.get("max_new_tokens_limit", "1024") or 1024)
        self.gen_batch_size = max(1, int(params.get("gen_batch_size", "8") or 8))
        threads = int(params.get("torch_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        seed = int(params.get("seed", "0") or 0)
        torch.manual_seed(seed)
        self._rng = random.Random(seed)
        dtype = getattr(torch, params.get("dtype", "float32") or "float32")
        # Triton places a KIND_GPU instance on one device and says which; KIND_CPU runs on the host.
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
        else:
            self.device = torch.device("cpu")

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise RuntimeError("the tokenizer has neither a pad nor an eos token to pad batches with")
            # Safe: padded positions are masked out (same choice as seal.models).
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(self.device)
        self.base.eval()
        self.peft = None  # a PeftModel over self.base once the first adapter is loaded
        self.loaded: dict[str, tuple[str, str]] = {}  # version -> (path, peft adapter name)
        self.staged: dict[str, tuple[str, str]] = {}  # prepared ahead of a state write
        self.routing: dict[str, Any] = {"generation": 0, "promoted": None, "canary": None,
                                        "canary_fraction": 0.0, "adapters": {}}
        self.last_error = ""
        # Requests whose client left (deadline or cancel) while their rows were generated: those
        # rows stopped at their next token instead of running to max_new_tokens.
        self.cancelled_requests = 0
        self.rows_stopped_early = 0  # rows the cancellation ended mid-generation
        self._state_sig = None
        if self.state_path:
            # A published state that cannot be served fails the load: silently serving the base
            # model instead of the promoted adapter would hide a quality regression.
            self._refresh(force=True, raise_errors=True)

    # --- adapters ---------------------------------------------------------------------------

    def _load_adapter(self, version: str, path: str) -> str:
        """Load ``path`` as a named adapter (or reuse it); raise with a clear message, leaving the
        model as it was, when the directory is not a loadable LoRA adapter for this base."""
        name = peft_name(version, path)
        if self.peft is not None and name in self.peft.peft_config:
            return name
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights

        prefix = f"adapter {version!r} at {path}"
        if self.adapter_root and os.path.commonpath([self.adapter_root, os.path.realpath(path)]) != self.adapter_root:
            raise _RequestError(f"{prefix}: outside the adapter root {self.adapter_root}")
        if not os.path.isdir(path):
            raise _RequestError(f"{prefix}: no such directory")
        # Read and check everything before touching the model: a failed PEFT load can leave a
        # half-injected adapter behind.
        try:
            peft_config = PeftConfig.from_pretrained(path)
        except Exception as exc:
            raise _RequestError(f"{prefix}: unreadable adapter_config.json: {exc}") from exc
        try:
            weights = load_peft_weights(path, device="cpu")
        except Exception as exc:
            raise _RequestError(f"{prefix}: unreadable adapter weights: {exc}") from exc
        if not weights:
            raise _RequestError(f"{prefix}: adapter weights are empty")
        for key, tensor in weights.items():
            if tensor.is_floating_point() and not bool(self.torch.isfinite(tensor).all()):
                raise _RequestError(f"{prefix}: weight {key} has NaN/Inf values")
        del weights, peft_config
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name, is_trainable=False,
                                                      torch_device=str(self.device))
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=name, is_trainable=False, torch_device=str(self.device))
        except Exception as exc:
            self._discard(name)
            raise _RequestError(f"{prefix}: does not fit the base model: {exc}") from exc
        return name

    def _discard(self, name: str) -> None:
        if self.peft is None or name not in self.peft.peft_config:
            return
        if len(self.peft.peft_config) == 1:
            # PEFT cannot delete its last adapter; take the LoRA layers out of the base instead.
            self.base = self.peft.unload()
            self.peft = None
        else:
            if name in self.peft.active_adapters:
                other = next(n for n in self.peft.peft_config if n != name)
                self.peft.set_adapter(other)
            self.peft.delete_adapter(name)

    # --- serving state ----------------------------------------------------------------------

    def _signature(self):
        try:
            st = os.stat(self.state_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self, force: bool = False, raise_errors: bool = False) -> None:
        """Apply the state file when it changed since the last look (an ``os.stat`` otherwise)."""
        if not self.state_path:
            return
        sig = self._signature()
        if sig == self._state_sig and not force:
            return
        # Remembered even on failure: a broken publish is not retried on every request (each try
        # would re-read the adapter on the hot path), only when the file changes again or a
        # ``sync`` control request forces it.
        self._state_sig = sig
        try:
            if sig is None:
                return
            with open(self.state_path) as fh:
                state = parse_state(fh.read())
            if state["generation"] == self.routing["generation"] and not force:
                return
            self._apply(state)
            self.last_error = ""
        except Exception as exc:
            self.last_error = f"serving state generation not applied, still serving generation " \
                              f"{self.routing['generation']}: {exc}"
            print(f"[{self.instance}] {self.last_error}", flush=True)
            if raise_errors:
                raise RuntimeError(self.last_error) from exc

    def _apply(self, state: dict[str, Any]) -> None:
        names: dict[str, str] = {}
        kept = {n for _, n in self.loaded.values()} | {n for _, n in self.staged.values()}
        try:
            for version, path in state["adapters"].items():
                names[version] = self._load_adapter(version, path)
        except Exception:
            # All or nothing: adapters loaded for this state alone must not linger unreferenced.
            for name in set(names.values()) - kept:
                self._discard(name)
            raise
        loaded = {v: (state["adapters"][v], n) for v, n in names.items()}
        # The switch itself: one assignment, between two batches.
        previous_names = {n for _, n in self.loaded.values()} | {n for _, n in self.staged.values()}
        self.loaded, self.staged = loaded, {}
        self.routing = state
        for name in previous_names - set(names.values()):
            self._discard(name)

    # --- control requests ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "generation": self.routing["generation"],
            "promoted": self.routing["promoted"],
            "canary": self.routing["canary"],
            "canary_fraction": self.routing["canary_fraction"],
            "loaded": {v: p for v, (p, _) in self.loaded.items()},
            "staged": {v: p for v, (p, _) in self.staged.items()},
            "last_error": self.last_error,
            "cancelled_requests": self.cancelled_requests,
            "rows_stopped_early": self.rows_stopped_early,
            "pid": os.getpid(),
        }

    def _control(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.get("op")
        if op == "status":
            return self.status()
        if op == "prepare":
            # Load ahead of the state write, so a broken adapter is refused before any request
            # could be routed to it, and the later switch costs no load.
            adapters = command.get("adapters") or {}
            for version, path in adapters.items():
                if version in (BASE_VERSION, ""):
                    raise _RequestError(f"{version!r} is reserved")
                name = self._load_adapter(str(version), str(path))
                if self.loaded.get(version, (None, None))[1] != name:
                    self.staged[str(version)] = (str(path), name)
            return self.status()
        if op == "sync":
            self._refresh(force=True)
            expected = int(command.get("expect_generation", -1))
            if self.last_error:
                raise _RequestError(self.last_error)
            if expected >= 0 and self.routing["generation"] != expected:
                raise _RequestError(f"instance serves generation {self.routing['generation']}, "
                                    f"expected {expected}")
            return self.status()
        raise _RequestError(f"unknown control op {op!r}")

    # --- inference ------------------------------------------------------------------------------
    # Generation mirrors seal.models.TransformersEngine (chat template, stop ids, longest-first
    # batches of ``gen_batch_size``, per-batch seeding, top_k off when sampling), so that a
    # request answered here equals the student's in-process answer for the same prompts.

    def execute(self, requests):
        self._refresh()
        responses: list[Any] = [None] * len(requests)
        # Control requests first: a swap that arrives batched with prompts applies to all of them,
        # and no prompt is routed to a version that the same batch then unloads.
        for i, request in enumerate(requests):
            try:
                control = _optional_input(request, "control")
                if control is not None:
                    command = json.loads(_decode(control.reshape(-1)[0]) or "{}")
                    responses[i] = self._respond([json.dumps(self._control(command))], [0], [0], [""])
            except Exception as exc:
                responses[i] = self._error_response(exc)

        # One generate() call per (version, settings): prompts of the requests that the dynamic
        # batcher delivered together share batches, except seeded ones, which stay per request
        # so that a seed reproduces its answer whatever else was queued.
        groups: dict[tuple, list[tuple[int, int, list[int]]]] = defaultdict(list)
        rows: dict[int, int] = {}
        for i, request in enumerate(requests):
            if responses[i] is not None:
                continue
            try:
                parsed = self._parse(request)
            except Exception as exc:
                responses[i] = self._error_response(exc)
                continue
            rows[i] = len(parsed)
            for row, (key, ids) in enumerate(parsed):
                if key[-1] is not None:
                    key = key + (i,)
                groups[key].append((i, row, ids))

        # One check per request (its rows share it, so a batch asks each request once per token).
        checks = {i: _cancel_check(requests[i]) for i in rows}
        results: dict[int, dict[int, tuple[str, int, int, str]]] = defaultdict(dict)
        failed: dict[int, str] = {}
        for key, items in groups.items():
            version = key[0]
            try:
                outputs = self._generate([ids for _, _, ids in items], *key[:5],
                                         cancelled=[checks[i] for i, _, _ in items])
            except Exception as exc:
                traceback.print_exc()
                for i, _, _ in items:
                    failed[i] = f"generation failed for adapter {version!r}: {type(exc).__name__}: {exc}"
                continue
            for (i, row, ids), (text, count) in zip(items, outputs):
                results[i][row] = (text, len(ids), count, version)
        for i, count in rows.items():
            if checks[i]():
                # Nobody reads it; Triton still wants one response per request.
                self.cancelled_requests += 1
                responses[i] = pb_utils.InferenceResponse(error=_triton_error("the client cancelled", "CANCELLED"))
                continue
            if i in failed:
                responses[i] = pb_utils.InferenceResponse(error=_triton_error(failed[i]))
                continue
            ordered = [results[i][row] for row in range(count)]
            responses[i] = self._respond(*[[r[k] for r in ordered] for k in range(4)])
        return responses

    def _encode(self, prompt: str, chat: bool) -> list[int]:
        tok = self.tokenizer
        if chat:
            if not tok.chat_template:
                raise _RequestError("this tokenizer has no chat template; send chat=false")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt, add_special_tokens=True)["input_ids"]

    def _parse(self, request):
        prompts = _optional_input(request, "prompt")
        if prompts is None:
            raise _RequestError("input 'prompt' is required (or 'control')")
        prompts = [_decode(p) for p in prompts.reshape(-1)]
        n = len(prompts)

        def column(name, default, cast):
            values = _optional_input(request, name)
            if values is None:
                return [default] * n
            values = values.reshape(-1)
            if len(values) == 1:
                return [cast(values[0])] * n
            if len(values) != n:
                raise _RequestError(f"input {name!r} has {len(values)} values for {n} prompts")
            return [cast(v) for v in values]

        adapters = column("adapter", "", _decode)
        keys = column("routing_key", "", _decode)
        max_new = column("max_new_tokens", 64, int)
        temps = column("temperature", 0.0, float)
        top_ps = column("top_p", 1.0, float)
        seeds = column("seed", -1, int)
        chats = column("chat", False, bool)
        served = set(self.loaded) | {BASE_VERSION}
        context = getattr(self.base.config, "max_position_embeddings", None)
        items = []
        for row in range(n):
            if not 1 <= max_new[row] <= self.max_new_tokens_limit:
                raise _RequestError(f"max_new_tokens must be within [1, {self.max_new_tokens_limit}]")
            if not (math.isfinite(temps[row]) and 0.0 <= temps[row] <= 100.0):
                raise _RequestError("temperature must be within [0, 100] (0 = greedy)")
            if not 0.0 < top_ps[row] <= 1.0:
                raise _RequestError("top_p must be within (0, 1]")
            if adapters[row] and adapters[row] not in served:
                raise _RequestError(f"adapter version {adapters[row]!r} is not served; served: {sorted(served)}")
            ids = self._encode(prompts[row], chats[row])
            if not ids:
                raise _RequestError(f"prompt {row} is empty after tokenisation")
            if context and len(ids) + max_new[row] > context:
                raise _RequestError(f"prompt {row} has {len(ids)} tokens; with max_new_tokens={max_new[row]} "
                                    f"that exceeds the model's context of {context} tokens")
            draw = canary_bucket(keys[row]) if keys[row] else self._rng.random()
            version = choose_version(adapters[row], self.routing, draw)
            greedy = temps[row] == 0.0
            key = (version, max_new[row], temps[row], 1.0 if greedy else top_ps[row],
                   None if seeds[row] < 0 or greedy else seeds[row])
            items.append((key, ids))
        return items

    def _count_stopped(self, rows: int) -> None:
        self.rows_stopped_early += rows

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (self.base.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return sorted(ids)

    def _generate(self, encoded: list[list[int]], version: str, max_new: int, temperature: float,
                  top_p: float, seed: int | None, cancelled: list[Any] | None = None):
        """``cancelled[i]()`` says whether the client of prompt i left: its row stops at the next
        token (the rows of other requests in the same batch go on)."""
        from transformers import GenerationConfig, StoppingCriteriaList

        torch = self.torch
        tok = self.tokenizer
        stop_ids = self._stop_ids()
        pad_id = tok.pad_token_id
        if temperature == 0.0:
            config = GenerationConfig(do_sample=False, max_new_tokens=max_new)
        else:
            config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                      max_new_tokens=max_new)
        config.update(eos_token_id=stop_ids, pad_token_id=pad_id, num_beams=1, repetition_penalty=1.0,
                      no_repeat_ngram_size=0, min_new_tokens=0)
        if version == BASE_VERSION:
            model = self.peft if self.peft is not None else self.base
        else:
            if version not in self.loaded:
                raise _RequestError(f"adapter version {version!r} is no longer served")
            model = self.peft
            model.set_adapter(self.loaded[version][1])
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[Any] = [None] * len(encoded)
        for batch_number, start in enumerate(range(0, len(order), self.gen_batch_size)):
            batch = order[start:start + self.gen_batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = encoded[index]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode())
                if version == BASE_VERSION and self.peft is not None:
                    stack.enter_context(self.peft.disable_adapter())
                if seed is not None:
                    devices = [self.device] if self.device.type == "cuda" else []
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                    torch.manual_seed(seed * 1_000_003 + batch_number)
                stopping = StoppingCriteriaList([_rows_cancelled([cancelled[i] for i in batch], self._count_stopped)]) if cancelled else None
                output = model.generate(input_ids=input_ids.to(self.device),
                                        attention_mask=attention_mask.to(self.device), generation_config=config,
                                        stopping_criteria=stopping)
            for row, index in enumerate(batch):
                new_tokens = output[row, width:].tolist()
                completion = new_tokens
                for position, token in enumerate(new_tokens):
                    if token in stop_ids:
                        completion = new_tokens[:position + 1]
                        break
                results[index] = (tok.decode(completion, skip_special_tokens=True), len(completion))
        return results

    @staticmethod
    def _error_response(exc: Exception):
        if isinstance(exc, (_RequestError, json.JSONDecodeError)):
            return pb_utils.InferenceResponse(error=_triton_error(str(exc), "INVALID_ARG"))
        traceback.print_exc()  # a bug, not the client's fault: keep the trace in the server log
        return pb_utils.InferenceResponse(error=_triton_error(f"{type(exc).__name__}: {exc}"))

    @staticmethod
    def _respond(texts, prompt_counts, counts, versions):
        def strings(values):
            return np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(-1, 1)

        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text", strings(texts)),
            pb_utils.Tensor("prompt_tokens", np.array(prompt_counts, dtype=np.int32).reshape(-1, 1)),
            pb_utils.Tensor("completion_tokens", np.array(counts, dtype=np.int32).reshape(-1, 1)),
            pb_utils.Tensor("adapter_version", strings(versions)),
        ])

    def finalize(self) -> None:
        self.peft = None
        self.base = None
