"""Stopping generation whose caller has gone: a cancellation scope the transport opens around a
call (``with stop_when(should_stop): ...``) and a hook on a model that ends its forward passes
once the scope says stop.

Why a scope rather than a parameter: the generation loops sit several layers below the servicer
(teacher: Adapt → run_adapt → the proposer → the policy engine; student: Generate → Student →
the serving backend → TransformersEngine), and none of those layers knows about deadlines. The
scope is a ContextVar, so it belongs to the thread (and context) serving that call alone: two
concurrent calls never stop each other. Transport-free: ``should_stop`` is any plain callable
(seal.rpc.deadline_checker builds one from a gRPC context)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_should_stop: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "seal_should_stop", default=None
)


class GenerationStopped(RuntimeError):
    """The caller's deadline passed or it went away while its generation ran."""

    code = "deadline_exceeded"


@contextmanager
def stop_when(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, generation on a hooked model (:func:`install_stop_hook`) raises
    :class:`GenerationStopped` at its next forward pass once ``should_stop()`` is true."""
    token = _should_stop.set(should_stop)
    try:
        yield
    finally:
        try:
            _should_stop.reset(token)
        except ValueError:  # a stream closed by the garbage collector in another context
            pass


def stop_requested() -> bool:
    """Whether the current call's scope says stop (False outside any scope)."""
    should_stop = _should_stop.get()
    return should_stop is not None and bool(should_stop())


def _before_forward(_module: Any, _args: Any) -> None:
    if stop_requested():
        raise GenerationStopped("generation stopped: the caller's deadline passed or it cancelled the call")


def install_stop_hook(model: Any) -> Any:
    """Make every forward pass of ``model`` (a transformers model, PEFT-wrapped or not) check the
    current scope first, so a generation loop ends within one token of its caller leaving. On the
    input embeddings because every forward pass calls them through ``__call__`` (PEFT calls the
    base model's ``forward`` directly, which would skip a hook on the model itself). Outside a
    scope the check is one ContextVar read. Returns the hook's handle (``.remove()``)."""
    return model.get_input_embeddings().register_forward_pre_hook(_before_forward)
