"""Turn a blocking call that reports through a callback into an iterator of its reports.

Training runs and ReST^EM rounds report progress through callbacks (``on_step``, ``emit``), while
gRPC servicers and the SEAL pipeline stream events as generators. :func:`stream_callbacks` runs
the call on a worker thread and yields each report as it happens; the call's return value is the
generator's return value and its exception is re-raised in the consumer's thread.

>>> def count(emit):
...     for i in range(3):
...         emit(i)
...     return "done"
>>> stream = stream_callbacks(count)
>>> list(stream)
[0, 1, 2]
>>> def result_of(gen):
...     value = yield from gen
...     return value
>>> items = []
>>> try:
...     gen = result_of(stream_callbacks(count))
...     while True:
...         items.append(next(gen))
... except StopIteration as stop:
...     items.append(stop.value)
>>> items
[0, 1, 2, 'done']
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_FINISHED = object()


def stream_callbacks(
    work: Callable[[Callable[[T], None]], R],
    *,
    name: str = "seal-worker",
    on_finish: Callable[[], None] | None = None,
) -> Generator[T, None, R]:
    """Run ``work(emit)`` on a thread; yield every value it emits; return what it returns.

    ``on_finish`` runs on the worker when ``work`` ends, however it ends — before the consumer
    sees the end: a client that goes away closes this generator at once, while the worker only
    stops at its next check, so a lock it holds must be released by the worker, not here."""
    reports: queue.Queue[Any] = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work(reports.put)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            outcome["error"] = exc
        finally:
            if on_finish is not None:
                on_finish()
            reports.put(_FINISHED)

    worker = threading.Thread(target=run, name=name, daemon=True)
    try:
        worker.start()
    except BaseException:
        if on_finish is not None:
            on_finish()
        raise
    while (report := reports.get()) is not _FINISHED:
        yield report
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
