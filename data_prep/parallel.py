"""Ordered, bounded map over worker processes (or in-process for one worker).

Tasks are submitted lazily, at most a few per worker ahead of the consumer, so a reader
feeding the pool never loads the whole input into memory. Results come back in task order,
which keeps the output independent of the number of workers.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WorkerPool:
    def __init__(self, workers: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
        else:
            # fork: workers inherit the already imported streaming/transformers (seconds of
            # import each otherwise) and the initializer's arguments without pickling.
            self._executor = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=initializer, initargs=initargs
            )

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        if self._executor is None:
            yield from map(fn, tasks)
            return
        pending: deque[Future[R]] = deque()
        try:
            for task in tasks:
                pending.append(self._executor.submit(fn, task))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
