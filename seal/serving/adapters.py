"""LoRA adapters loaded by name into one PEFT model over a base model, at most ``capacity`` at once.

Used by the student's in-process backend (many versions, named per request) and by the teacher's
transformers engine (one policy, replaced in place). PEFT's active adapter is state of the model
shared by every caller, so one lock covers loading, switching and the generation that runs on the
switched model: ``use`` holds it for the whole ``with`` block.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from os import PathLike
from typing import Any


def adapter_key(adapter_id: str) -> str:
    """A PEFT adapter name for ``adapter_id``: PEFT turns names into module attribute keys, where
    '@' and '.' are not allowed. Versions differ in their digits, so distinct ids stay distinct."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", adapter_id)


class PeftAdapterCache:
    """A base model that gains a ``PeftModel`` wrapper on the first load.

    PEFT injects LoRA layers into the model it wraps, so the base given here is modified in
    place: it must not also be the model a trainer copies from (keep a separate training base).
    When the last adapter leaves, the LoRA layers are taken out again (``unload``) and the plain
    base model answers, as before the first load.
    """

    def __init__(self, base_model: Any, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 adapter, got {capacity}")
        self.capacity = capacity
        self._base = base_model
        self._peft: Any = None
        # Least recently used first; each key -> the directory it was loaded from.
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self.lock = threading.RLock()

    @property
    def loaded(self) -> tuple[str, ...]:
        """Resident adapters, least recently used first."""
        with self.lock:
            return tuple(self._loaded)

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return key in self._loaded

    def load(
        self,
        key: str,
        path: str | PathLike[str],
        *,
        check: Callable[[], None] | None = None,
        reload: bool = False,
    ) -> None:
        """Make ``key`` the active adapter, loading it from ``path`` unless it is resident.

        ``check`` runs before a load (not for a resident adapter), e.g. verifying the weights
        against their recorded checksums; when it raises, nothing changes. ``reload`` loads
        ``path`` again even when ``key`` is resident (the same version stored again). Beyond
        ``capacity`` the least recently used adapter is dropped."""
        with self.lock:
            if key in self._loaded and not reload:
                self._loaded.move_to_end(key)
                self._peft.set_adapter(key)
                return
            if check is not None:
                check()
            self._drop(key)
            self._load(key, str(path))
            self._loaded[key] = str(path)
            self._peft.set_adapter(key)
            while len(self._loaded) > self.capacity:
                self._drop(next(iter(self._loaded)))

    def forget(self, key: str) -> bool:
        """Drop ``key`` if resident; True when it was."""
        with self.lock:
            if key not in self._loaded:
                return False
            self._drop(key)
            return True

    @contextlib.contextmanager
    def use(
        self,
        key: str | None,
        path: str | PathLike[str] | None = None,
        *,
        check: Callable[[], None] | None = None,
    ) -> Iterator[Any]:
        """Hold the lock and yield the model answering with adapter ``key`` (loaded from ``path``
        if it is not resident, see ``load``), or with no adapter at all when ``key`` is None."""
        with self.lock:
            if key is None:
                if self._peft is None:
                    yield self._base
                else:
                    with self._peft.disable_adapter():
                        yield self._peft
                return
            if key not in self._loaded and path is None:
                raise KeyError(f"adapter {key!r} is not loaded and no directory was given to load it from")
            self.load(key, path if path is not None else self._loaded[key], check=check)
            yield self._peft

    @contextlib.contextmanager
    def use_many(
        self, adapters: Sequence[tuple[str, str | PathLike[str] | None, Callable[[], None] | None]]
    ) -> Iterator[Any]:
        """Hold the lock and yield the model with every adapter of ``adapters`` (``(key, path,
        check)`` as ``use`` takes them) resident at once: the model a mixed batch runs on, each
        row naming its adapter (``adapter_names=``, ``"__base__"`` for adapters off). At most
        ``capacity`` distinct keys, since loading one more would evict one of the batch; none at
        all yields the plain base model, as ``use(None)`` does."""
        with self.lock:
            keys = list(dict.fromkeys(key for key, _, _ in adapters))
            if len(keys) > self.capacity:
                raise ValueError(
                    f"{len(keys)} adapters in one mixed batch, above the {self.capacity} this cache keeps loaded"
                )
            if not keys:
                with self.use(None) as model:
                    yield model
                return
            for key, path, check in adapters:
                if key not in self._loaded and path is None:
                    raise KeyError(f"adapter {key!r} is not loaded and no directory was given to load it from")
                # Loaded in turn, each the most recently used: none of the batch is evicted by another.
                self.load(key, path if path is not None else self._loaded[key], check=check)
            yield self._peft

    def _load(self, key: str, path: str) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, path, adapter_name=key)
            self._peft.eval()
            return
        try:
            self._peft.load_adapter(path, adapter_name=key)
        except BaseException:
            # A failed load can leave the adapter half-registered; the old ones must answer on.
            if key in self._peft.peft_config:
                self._remove(key)
            raise
        self._peft.eval()

    def _drop(self, key: str) -> None:
        if self._loaded.pop(key, None) is None:
            return
        self._remove(key)

    def _remove(self, key: str) -> None:
        others = [name for name in self._peft.peft_config if name != key]
        if not others:
            # The last adapter: take the LoRA layers out, so the base answers as it did before.
            self._base = self._peft.unload()
            self._peft = None
            return
        if key in self._peft.active_adapters:
            # PEFT would keep naming a deleted active adapter; point it at a live one first.
            self._peft.set_adapter(others[-1])
        self._peft.delete_adapter(key)
