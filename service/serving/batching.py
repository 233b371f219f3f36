"""Dynamic micro-batching: concurrent requests for one model and operation run as one call.

As Triton's dynamic batcher does, a :class:`Batcher` (one per model and operation) gathers
requests and hands them to ``run`` together, so that onnxruntime does one call for all of them.
Requests are prepared (validated, preprocessed) before they join, so a bad one fails alone and
never reaches a batch. A batch runs as soon as

- it holds ``max_batch_size`` rows (a request larger than that runs alone, never split), or
- its first request has waited ``max_delay`` seconds, or
- no other request is on its way: every request of this model and operation that the server has
  started to prepare has joined. So a request that arrives alone waits for nothing, and requests
  that arrive together (in one pass of the event loop) run together.

One batch per batcher runs at a time, in a worker thread; while it runs, the next one gathers,
which is what makes batches grow under load. ``run`` gets the jobs of a batch and returns one
result per job, in order; each request's ``convert`` (the service builds its answer there) runs
on its result in the same thread. If ``run`` raises, every request of that batch fails with
:class:`BatchFailed`; if a ``convert`` raises, only its request fails. Everything but ``run`` and
``convert`` happens on the event loop thread, so the batcher's state needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.model.errors import BatchFailed

log = logging.getLogger("recmix.service")

J = TypeVar("J")  # a prepared request (its job)
R = TypeVar("R")  # what ``run`` gives for one job
T = TypeVar("T")  # a request's answer, made from its result by its ``convert``

# (rows in the batch, seconds each of its requests waited)
OnDispatch = Callable[[int, Sequence[float]], None]


@dataclass(eq=False)
class _Waiting:
    job: Any
    rows: int
    convert: Callable[[Any], Any]
    future: asyncio.Future[Any]
    joined: float


class Batcher(Generic[J, R]):
    """Gathers prepared requests and runs them in batches; see the module's notes."""

    def __init__(
        self,
        name: str,
        run: Callable[[list[J]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay: float,
        executor: Executor,
        on_dispatch: OnDispatch | None = None,
    ) -> None:
        if max_batch_size < 1 or max_delay <= 0:
            raise ValueError("a batcher needs max_batch_size >= 1 and max_delay > 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self._run = run
        self._executor = executor
        self._on_dispatch = on_dispatch
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._preparing = 0  # requests being prepared: on their way to this batcher
        self._running = False
        self._check_pending = False
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, prepare: Awaitable[tuple[J, int]], convert: Callable[[R], T]) -> T:
        """Prepare a request (its job and rows), run it in a batch, and convert its result."""
        loop = asyncio.get_running_loop()
        self._preparing += 1
        try:
            job, rows = await prepare
        finally:
            self._preparing -= 1
            # whether it joins or failed, the batch it would have joined may now be complete
            self._schedule_check(loop)
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append(_Waiting(job, rows, convert, future, time.perf_counter()))
        self._queued_rows += rows
        return await future

    # ------------------------------------------------------------ on the event loop

    def _schedule_check(self, loop: asyncio.AbstractEventLoop) -> None:
        # after the callbacks ready now: requests that arrived with this one join first
        if not self._check_pending:
            self._check_pending = True
            loop.call_soon(self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._check_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running or not self._queue:
            return
        waited = time.perf_counter() - self._queue[0].joined
        if (
            self._queued_rows >= self.max_batch_size
            or self._preparing == 0
            or waited >= self.max_delay
        ):
            self._dispatch(loop)
        else:
            self._timer = loop.call_later(self.max_delay - waited, self._check, loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch: list[_Waiting] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_size):
            waiting = self._queue.popleft()
            self._queued_rows -= waiting.rows
            if waiting.future.done():  # cancelled while it waited (client gone)
                continue
            batch.append(waiting)
            rows += waiting.rows
        if not batch:
            return
        started = time.perf_counter()
        if self._on_dispatch is not None:
            self._on_dispatch(rows, [started - w.joined for w in batch])
        self._running = True
        done = loop.run_in_executor(self._executor, self._execute, batch)
        done.add_done_callback(lambda finished: self._deliver(loop, batch, finished))

    def _deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Waiting],
        finished: asyncio.Future[list[tuple[bool, Any]]],
    ) -> None:
        self._running = False
        if finished.cancelled() or finished.exception() is not None:
            # the executor itself failed (shut down): no result for anyone in the batch
            outcomes = _all_failed(len(batch))
        else:
            outcomes = finished.result()
        for waiting, (ok, value) in zip(batch, outcomes, strict=True):
            if waiting.future.done():
                continue
            if ok:
                waiting.future.set_result(value)
            else:
                waiting.future.set_exception(value)
        if self._queue:
            self._schedule_check(loop)

    # ------------------------------------------------------------ in a worker thread

    def _execute(self, batch: list[_Waiting]) -> list[tuple[bool, Any]]:
        try:
            results = self._run([w.job for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} jobs")
        except Exception:
            log.exception("%s: a batched run of %d requests failed", self.name, len(batch))
            return _all_failed(len(batch))
        outcomes: list[tuple[bool, Any]] = []
        for waiting, result in zip(batch, results, strict=True):
            try:
                outcomes.append((True, waiting.convert(result)))
            except Exception as exc:  # this request's answer only
                outcomes.append((False, exc))
        return outcomes

    def fail_waiting(self, error: Exception) -> None:
        """Fail every request still queued (the service is stopping); call on the event loop."""
        while self._queue:
            waiting = self._queue.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(error)
        self._queued_rows = 0


def _all_failed(size: int) -> list[tuple[bool, Any]]:
    message = (
        f"the batched inference run this request was part of ({size} requests) failed; "
        "no result was computed for it: retry the request"
    )
    return [(False, BatchFailed(message)) for _ in range(size)]
