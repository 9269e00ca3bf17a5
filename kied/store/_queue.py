"""Callbacks that arrive while one is being written, queued and written together."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from kied.errors import StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kied.store._base import CallbackRecord

__all__ = ["CallbackQueue"]

_Item = TypeVar("_Item")


@dataclass(slots=True, eq=False)
class _Queued(Generic[_Item]):
    item: _Item
    # Set when the callback is written or failed, or when its task must write the batch.
    wake: trio.Event = field(default_factory=trio.Event)
    record: CallbackRecord | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.record is not None or self.error is not None


def _shared_error(exc: BaseException) -> StoreUnavailableError:
    # One exception object must not be raised in several tasks (tracebacks would mix).
    error = StoreUnavailableError(f"the callback's batch failed: {exc}")
    error.__cause__ = exc
    return error


class CallbackQueue(ABC, Generic[_Item]):
    """A store's callback writes, batched: one writer at a time, the others queued.

    A callback that arrives while none is being written is written at once, by its own
    task. One that arrives while another is being written waits in the queue; when the
    write ends, the task of the oldest queued callback takes up to ``max_batch`` of them,
    in arrival order, and writes them in one :meth:`_write_callback_batch` call. Each
    task gets its own callback's record or error.

    - A queued callback whose task is cancelled leaves the queue and is not written,
      also when the cancellation comes just as its task is handed the next batch: the
      batch is handed on.
    - A writer cancelled before its batch was written (nothing was) puts the others
      back at the head of the queue and hands them on.
    - A batch that fails as a whole (the store closed, the database went away) fails
      each of its callbacks.
    """

    def __init__(self) -> None:
        # Callbacks waiting to be written, and whether a task is writing them (or has
        # been handed the job of writing the next batch).
        self._callbacks: list[_Queued[_Item]] = []
        self._writing_callbacks = False

    @abstractmethod
    async def _write_callback_batch(
        self, batch: list[_Item]
    ) -> Sequence[CallbackRecord | Exception]:
        """Write ``batch``; one record, or the error of that callback alone, per item.

        Raises ``trio.Cancelled`` only when nothing was written, and any other error
        when the batch failed as a whole.
        """

    async def _queue_callback(self, item: _Item, *, max_batch: int) -> CallbackRecord:
        """Write ``item`` alone or in a batch of at most ``max_batch``; its record."""
        queued = _Queued(item)
        self._callbacks.append(queued)
        if self._writing_callbacks:
            try:
                await queued.wake.wait()
            except BaseException:
                if queued in self._callbacks:  # not taken by a write: drop it
                    self._callbacks.remove(queued)
                    if queued.wake.is_set():  # handed the writing just as it was cancelled
                        self._hand_off_callbacks()
                raise
            if not queued.finished:  # handed the writing: write the next batch
                await self._write_callbacks(queued, max_batch)
        else:
            self._writing_callbacks = True
            await self._write_callbacks(queued, max_batch)
        if queued.error is not None:
            raise queued.error
        assert queued.record is not None
        return queued.record

    async def _write_callbacks(self, own: _Queued[_Item], max_batch: int) -> None:
        # Called only by the one task that holds ``_writing_callbacks``.
        # The caller's own callback is the oldest queued, so it is always in the batch.
        batch = self._callbacks[:max_batch]
        del self._callbacks[:max_batch]
        try:
            results = await self._write_callback_batch([c.item for c in batch])
        except trio.Cancelled:
            # Nothing was written: the others go back to the head of the queue.
            self._callbacks[:0] = [c for c in batch if c is not own]
            raise
        except BaseException as exc:
            for c in batch:
                c.error = exc if c is own else _shared_error(exc)
                c.wake.set()
            raise
        else:
            for c, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    c.error = result
                else:
                    c.record = result
                c.wake.set()
        finally:
            self._hand_off_callbacks()

    def _hand_off_callbacks(self) -> None:
        # The writer is done: the task of the oldest queued callback writes the next batch.
        if self._callbacks:
            self._callbacks[0].wake.set()
        else:
            self._writing_callbacks = False
