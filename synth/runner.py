"""Runs tasks through a (cached) teacher: concurrency, resampling, the journal, progress."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from synth.generators.base import Outcome, Task
from synth.journal import TaskJournal
from synth.progress import JobCounts
from synth.records import Reject
from synth.teachers.base import ChatRequest, ChatResponse, Teacher, TeacherError

#: parse(task, request sent, response, final) -> Outcome
ParseFn = Callable[[Task, ChatRequest, ChatResponse, bool], Outcome]


class Runner:
    """Keeps `concurrency` batches of up to `batch_size` requests in flight, streaming over the tasks."""

    def __init__(self, teacher: Teacher, journal: TaskJournal, counts: JobCounts, *, max_resamples: int = 1):
        self.teacher = teacher
        self.journal = journal
        self.counts = counts
        self.max_resamples = max_resamples
        self.stopping = False
        #: The first error writing the journal (disk full, ...): the run stops, nothing more is journaled.
        self.write_error: OSError | None = None
        self._queue: asyncio.Queue | None = None
        self._workers = 0

    def stop(self) -> None:
        """Start nothing new, but let the requests in flight arrive and be journaled: they are paid for."""
        self.stopping = True
        if self._queue is not None:
            # Unstarted tasks are dropped (the next run does them); this also unblocks the producer.
            while not self._queue.empty():
                self._queue.get_nowait()
            # The producer may have queued its end marks already, and they just went: one per worker again.
            for _ in range(self._workers):
                self._queue.put_nowait(None)

    async def run(self, tasks: Iterable[Task], parse: ParseFn) -> None:
        """Process every task not already in the journal; returns when all are written."""
        recovered, seen = set(self.journal.done), set()
        workers = max(1, self.teacher.concurrency)
        # A bounded window keeps memory flat however many tasks there are.
        queue: asyncio.Queue = asyncio.Queue(maxsize=workers * self.teacher.batch_size * 2)
        self._queue, self._workers = queue, workers

        async def produce() -> None:
            for task in tasks:
                if self.stopping:
                    break
                if task.id in seen:
                    self.counts.duplicates += 1  # the same input twice is the same work: do it once
                    continue
                seen.add(task.id)
                if task.id in recovered:
                    self.counts.skipped += 1
                    continue
                await queue.put(task)
            # After stop() these may wait for a worker to take an end mark, never for long.
            for _ in range(workers):
                await queue.put(None)

        async def work() -> None:
            finished = False
            while not finished:
                first = await queue.get()
                if first is None or self.stopping:
                    return
                batch = [first]
                while len(batch) < self.teacher.batch_size:
                    try:
                        nxt = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if nxt is None:
                        finished = True
                        break
                    batch.append(nxt)
                results = await self.teacher.generate([t.request for t in batch])
                for task, result in zip(batch, results):
                    await self._finish(task, result, parse)

        producer = asyncio.create_task(produce())
        try:
            await asyncio.gather(producer, *(work() for _ in range(workers)))
        finally:
            producer.cancel()

    async def _finish(self, task: Task, result: ChatResponse | TeacherError, parse: ParseFn) -> None:
        records, rejects = [], []
        request = task.request
        for attempt in range(self.max_resamples + 1):
            if isinstance(result, TeacherError):
                rejects.append(Reject(task=task.id, reason=result.reason, input=_dump(task.input), error=True, retryable=result.retryable))
                break
            # A greedy request would only get the same reply again: its first answer is final.
            final = attempt == self.max_resamples or request.params.temperature == 0
            outcome = parse(task, request, result, final)
            records.extend(outcome.records)
            rejects.extend(outcome.rejects)
            if not outcome.resample:
                break
            # Fresh samples get new indices (new cache keys); the bad ones stay cached, unused.
            offset = request.sample_offset + request.params.n
            request = request.model_copy(
                update={"params": request.params.model_copy(update={"n": outcome.resample}), "sample_offset": offset}
            )
            (result,) = await self.teacher.generate([request])
        if self._journal(task.id, records, rejects):
            self.counts.failed += 1
            self.counts.first_error = self.counts.first_error or rejects[0].reason
        self.counts.done += 1
        self.counts.records += len(records)
        self.counts.rejects += len(rejects)


    def _journal(self, task: str, records: list, rejects: list[Reject]) -> bool:
        """Journal a finished task (True: a teacher failure). After a write error, stop starting requests
        and journal nothing more: the answers in flight are paid for, and the cache keeps them."""
        if self.write_error is not None:
            return False
        try:
            return self.journal.add(task, records, rejects)
        except OSError as exc:
            self.write_error = exc
            self.stop()
            return False


def _dump(value):
    return value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value
