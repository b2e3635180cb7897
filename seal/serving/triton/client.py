"""Client of the student model served by Triton: generate, adapter swap, health.

A thin layer over ``tritonclient.grpc`` (thread-safe for unary calls: one instance can be shared by
a servicer's worker threads). Swaps are published by writing the serving-state file that the
model's instances watch; see ``model_repository/model.py`` for why no server restart is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seal.serving.triton.model_repository import DEFAULT_MODEL_NAME
from seal.serving.triton.state import BASE_VERSION, ServingState, read_state, state_lock, write_state

if TYPE_CHECKING:
    from collections.abc import Callable

    from seal import models


_OUTPUTS = ("text", "prompt_tokens", "completion_tokens", "adapter_version")


class TritonClientError(RuntimeError):
    """Base class; ``code`` is the gRPC status name Triton answered with, when there was one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TritonUnavailable(TritonClientError):
    """The server or the model cannot be reached or is not ready."""


class TritonRequestRejected(TritonClientError):
    """The model refused the request (unknown adapter version, bad argument)."""


class AdapterSwapError(TritonClientError):
    """A swap was refused; the serving state was left as it was and the old routing serves on."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int  # includes the end-of-sequence token when one was generated
    adapter_version: str  # the version that served this prompt, or 'base'


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    model_ready: bool

    @property
    def ok(self) -> bool:
        return self.live and self.ready and self.model_ready


def _bytes_input(name: str, values: Sequence[str]):
    from tritonclient.grpc import InferInput

    array = np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(-1, 1)
    tensor = InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def _numeric_input(name: str, values: Sequence[Any], dtype: Any, triton_type: str):
    from tritonclient.grpc import InferInput

    array = np.asarray(values, dtype=dtype).reshape(-1, 1)
    tensor = InferInput(name, list(array.shape), triton_type)
    tensor.set_data_from_numpy(array)
    return tensor


# How often a request in flight looks at its caller's stop scope: the latency of a cancel.
_STOP_POLL_S = 0.05


class TritonStudentClient:
    def __init__(
        self,
        url: str,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        state_path: str | os.PathLike[str] | None = None,
        timeout_s: float = 60.0,
        swap_timeout_s: float = 300.0,
    ) -> None:
        from tritonclient.grpc import InferenceServerClient

        self.url = url
        self.model_name = model_name
        self._state_path = Path(state_path) if state_path else None
        self.timeout_s = timeout_s
        self.swap_timeout_s = swap_timeout_s
        self._client = InferenceServerClient(url=url)
        self._config: dict[str, Any] | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonStudentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- errors -----------------------------------------------------------------------------

    def _translate(self, exc: Exception, what: str) -> TritonClientError:
        from tritonclient.utils import InferenceServerException

        if not isinstance(exc, InferenceServerException):
            return TritonClientError(f"{what}: {type(exc).__name__}: {exc}")
        code = exc.status() or None
        message = exc.message() or str(exc)
        if code in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED") or "not ready" in message \
                or "unknown model" in message.lower():
            return TritonUnavailable(f"{what}: Triton at {self.url} unavailable: {message}", code)
        if code == "StatusCode.INVALID_ARGUMENT":
            return TritonRequestRejected(f"{what}: {message}", code)
        return TritonClientError(f"{what}: {message}", code)

    def _infer(self, inputs: list[Any], what: str, timeout_s: float, priority: int = 0):
        """One request, cancelled as soon as the current call's stop scope (seal.cancellation)
        says its caller has gone: Triton passes the cancellation to the model, whose rows stop at
        their next token, and this raises GenerationStopped. Without the cancel, a caller's
        deadline would leave Triton generating to max_new_tokens for nobody."""
        import threading

        from tritonclient.grpc import InferRequestedOutput

        from seal.cancellation import GenerationStopped, stop_requested

        outputs = [InferRequestedOutput(n) for n in _OUTPUTS]
        finished = threading.Event()
        outcome: dict[str, Any] = {}

        def on_done(result: Any, error: Exception | None) -> None:
            outcome["result"], outcome["error"] = result, error
            finished.set()

        try:
            call = self._client.async_infer(self.model_name, inputs, on_done, outputs=outputs,
                                            client_timeout=timeout_s, priority=priority)
        except Exception as exc:
            raise self._translate(exc, what) from exc
        while not finished.wait(_STOP_POLL_S):
            if stop_requested():
                call.cancel()
                raise GenerationStopped(f"{what}: stopped, the caller's deadline passed or it cancelled the call")
        if outcome["error"] is not None:
            raise self._translate(outcome["error"], what) from outcome["error"]
        return outcome["result"]

    # --- health -----------------------------------------------------------------------------

    def health(self) -> Health:
        """Never raises: an unreachable server is reported as not live."""
        try:
            live = self._client.is_server_live(client_timeout=self.timeout_s)
            ready = self._client.is_server_ready(client_timeout=self.timeout_s)
            model_ready = self._client.is_model_ready(self.model_name, client_timeout=self.timeout_s)
        except Exception:
            return Health(False, False, False)
        return Health(bool(live), bool(ready), bool(model_ready))

    def is_ready(self) -> bool:
        return self.health().ok

    # --- generation ---------------------------------------------------------------------------

    def _model_config(self) -> dict[str, Any]:
        if self._config is None:
            try:
                config = self._client.get_model_config(self.model_name, as_json=True,
                                                       client_timeout=self.timeout_s)
            except Exception as exc:
                raise self._translate(exc, "read model config") from exc
            self._config = config.get("config", config)
        return self._config

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        routing_keys: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[Generation]:
        """One generation per prompt, in order; same semantics as ``seal.models.TransformersEngine``.

        ``adapter``: None/'' lets the serving state route (promoted, or the canary for its share),
        'base' asks for no adapter, anything else names a version the state keeps loaded.
        ``routing_keys`` (one per prompt, e.g. a user id) make canary membership sticky. More
        prompts than the model's max_batch_size are sent as several requests."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if routing_keys is not None and len(routing_keys) != len(batch):
            raise ValueError(f"{len(routing_keys)} routing keys for {len(batch)} prompts")
        limit = int(self._model_config().get("max_batch_size", 0)) or len(batch) or 1
        results: list[Generation] = []
        for start in range(0, len(batch), limit):
            chunk = batch[start:start + limit]
            keys = None if routing_keys is None else list(routing_keys[start:start + limit])
            results += self._generate_chunk(chunk, adapter or "", max_new_tokens, temperature, top_p,
                                            seed, chat, keys, timeout_s or self.timeout_s)
        return results

    def _generate_chunk(self, batch, adapter, max_new_tokens, temperature, top_p, seed, chat, keys, timeout_s):
        n = len(batch)
        inputs = [
            _bytes_input("prompt", batch),
            _bytes_input("adapter", [adapter] * n),
            _numeric_input("max_new_tokens", [max_new_tokens] * n, np.int32, "INT32"),
            _numeric_input("temperature", [temperature] * n, np.float32, "FP32"),
            _numeric_input("top_p", [top_p] * n, np.float32, "FP32"),
            _numeric_input("seed", [-1 if seed is None else seed] * n, np.int64, "INT64"),
            _numeric_input("chat", [chat] * n, np.bool_, "BOOL"),
        ]
        if keys is not None:
            inputs.append(_bytes_input("routing_key", keys))
        result = self._infer(inputs, "generate", timeout_s)
        columns = [result.as_numpy(name).reshape(-1) for name in _OUTPUTS]
        return [
            Generation(text.decode("utf-8"), int(prompt_tokens), int(completion_tokens), version.decode("utf-8"))
            for text, prompt_tokens, completion_tokens, version in zip(*columns)
        ]

    # --- control ------------------------------------------------------------------------------

    def _control(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        inputs = [_bytes_input("control", [json.dumps(command)])]
        # Priority 1 (the config's highest): ahead of every queued prompt, see render_config.
        result = self._infer(inputs, f"control {command.get('op')}", timeout_s, priority=1)
        return json.loads(result.as_numpy("text").reshape(-1)[0].decode("utf-8"))

    def status(self) -> dict[str, Any]:
        """What the instance that answers serves: generation, roles, loaded versions, last error.
        With several instances, each applies a new state on its next request."""
        return self._control({"op": "status"}, self.timeout_s)

    @property
    def state_path(self) -> Path:
        if self._state_path is None:
            # The model's config names the file; this client must share its filesystem to swap.
            params = self._model_config().get("parameters", {})
            path = params.get("serving_state", {}).get("string_value")
            if not path:
                raise TritonClientError(f"model {self.model_name} has no serving_state parameter")
            self._state_path = Path(path)
        return self._state_path

    def current_state(self) -> ServingState:
        return read_state(self.state_path)

    def publish(self, state: ServingState, *, confirm: bool = True) -> dict[str, Any] | None:
        """Make ``state`` the served routing (for states built by hand; the transitions below are
        the usual way). See ``_publish_locked``."""
        with state_lock(self.state_path):
            return self._publish_locked(state, confirm)

    def _publish_locked(self, state: ServingState, confirm: bool) -> dict[str, Any] | None:
        """Load and validate new adapters in the serving instance first (a failure raises
        ``AdapterSwapError`` and nothing changes), then replace the state file atomically.

        From the write on, every ``execute`` that starts uses the new routing (each one checks the
        file first). ``confirm`` then waits until the instance has applied it, and surfaces an
        apply error (reverting the file); under saturation this costs one more running batch,
        since a control request cannot overtake the batch being executed. Returns the status of
        the instance that confirmed, or None."""
        current = read_state(self.state_path)
        if state.generation <= current.generation:
            raise AdapterSwapError(f"state generation {state.generation} is not newer than the "
                                   f"published {current.generation}; build it from current_state()")
        new = {v: p for v, p in state.adapters.items() if current.adapters.get(v) != p}
        if new:
            try:
                self._control({"op": "prepare", "adapters": new}, self.swap_timeout_s)
            except TritonClientError as exc:
                raise AdapterSwapError(f"swap to generation {state.generation} refused, still serving "
                                       f"generation {current.generation}: {exc}", exc.code) from exc
        write_state(self.state_path, state)
        if not confirm:
            return None
        try:
            return self._control({"op": "sync", "expect_generation": state.generation}, self.swap_timeout_s)
        except TritonClientError as exc:
            # The instance kept its previous routing; put the file back so that it and every
            # other instance agree with what is served.
            write_state(self.state_path, replace(current, generation=state.generation + 1, reason=f"revert: {exc}"))
            raise AdapterSwapError(f"generation {state.generation} failed to apply and was reverted: {exc}",
                                   exc.code) from exc

    def _transition(self, make, confirm: bool) -> ServingState:
        with state_lock(self.state_path):
            state = make(read_state(self.state_path))
            self._publish_locked(state, confirm)
            return state

    def promote(self, version: str, adapter_dir: str | os.PathLike[str], reason: str = "", *,
                confirm: bool = True) -> ServingState:
        """Serve ``version`` by default; the version it replaces stays loaded for ``rollback``."""
        return self._transition(lambda s: s.promote(version, adapter_dir, reason), confirm)

    def set_canary(self, version: str, adapter_dir: str | os.PathLike[str], fraction: float,
                   reason: str = "", *, confirm: bool = True) -> ServingState:
        return self._transition(lambda s: s.with_canary(version, adapter_dir, fraction, reason), confirm)

    def clear_canary(self, reason: str = "", *, confirm: bool = True) -> ServingState:
        return self._transition(lambda s: s.without_canary(reason), confirm)

    def rollback(self, reason: str = "", *, confirm: bool = True) -> ServingState:
        """Serve ``previous`` again: a routing change only, no adapter is loaded."""
        return self._transition(lambda s: s.rollback(reason), confirm)

    def serve_base(self, reason: str = "", *, confirm: bool = True) -> ServingState:
        return self._transition(lambda s: s.serve_base(reason), confirm)


class TritonGenerationEngine:
    """``seal.models.GenerationEngine`` answered by Triton: a drop-in for ``TransformersEngine``.

    ``adapter`` as in ``TritonStudentClient.generate``. Greedy answers equal the in-process
    engine's; seeded sampling equals it for calls of at most ``batch_size`` prompts (the engine
    seeds per batch of the whole call, Triton per request)."""

    def __init__(self, client: TritonStudentClient, *, adapter: str | None = None) -> None:
        self.client = client
        self.adapter = adapter

    def generate(self, prompts: Sequence[str], params: models.SamplingParams, *, chat: bool = True,
                 batch_size: int = 8, on_progress: Callable[[int, int], None] | None = None) -> list[models.Generation]:
        # At call time: this module is imported where only the client side is needed.
        from seal.models import Generation as EngineGeneration

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompts = list(prompts)
        results: list[models.Generation] = []
        for start in range(0, len(prompts), batch_size):
            answers = self.client.generate(
                prompts[start:start + batch_size], adapter=self.adapter, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, seed=params.seed, chat=chat,
            )
            results += [EngineGeneration(a.text, a.prompt_tokens, a.completion_tokens) for a in answers]
            if on_progress is not None:
                on_progress(len(results), len(prompts))
        return results


__all__ = [
    "BASE_VERSION",
    "AdapterSwapError",
    "Generation",
    "Health",
    "TritonClientError",
    "TritonGenerationEngine",
    "TritonRequestRejected",
    "TritonStudentClient",
    "TritonUnavailable",
]
