"""Dynamic batching: requests arriving together share one forward pass in a worker thread."""

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eanet.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    images: torch.Tensor  # [n, 3, S, S]
    future: asyncio.Future


class Batcher:
    """Group concurrent requests into forward passes of up to `max_batch` images.

    `submit` puts a job on an asyncio queue and awaits its future. One runner task takes the
    first job, then waits up to `max_wait_ms` for more until `max_batch` images are together
    (a job that would overflow waits for the next pass; a single job larger than `max_batch`
    is split), runs `forward` in a single worker thread and hands each job its rows. While a
    pass runs, new jobs queue up and form the next one.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ConfigError(
                f"a Batcher needs max_batch >= 1 and max_wait_ms >= 0, not {max_batch} and "
                f"{max_wait_ms}"
            )
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches_run = 0  # forward passes
        self.images_served = 0
        self.largest_batch = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eanet-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, images: torch.Tensor) -> torch.Tensor:
        """Run `forward` on `images` [n, ...] together with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._task is None or self._task.done():
            self._start(loop)
        assert self._queue is not None
        future = loop.create_future()
        self._queue.put_nowait(_Job(images, future))
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # a new event loop (tests): the old queue belongs to the old
            self._loop, self._queue = loop, asyncio.Queue()
        self._task = loop.create_task(self._run(), name="eanet-batcher")

    async def close(self) -> None:
        """Stop the runner task and the worker thread."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        assert self._queue is not None
        carry: _Job | None = None
        while True:
            jobs = [carry or await self._queue.get()]
            carry = None
            try:
                carry = await self._collect(jobs)
                await self._run_jobs([j for j in jobs if not j.future.done()])
            except asyncio.CancelledError:
                waiting = [*jobs, carry] if carry is not None else jobs
                self._fail(waiting, RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # never let one batch kill the runner
                log.exception("batcher: unexpected error")
                self._fail(jobs, exc)

    async def _collect(self, jobs: list[_Job]) -> _Job | None:
        """Add queued jobs to `jobs` until max_batch or the deadline; return an overflow job."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        count = len(jobs[0].images)
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if count + len(job.images) > self.max_batch:
                return job
            jobs.append(job)
            count += len(job.images)
        return None

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        if not jobs:  # every client went away
            return
        loop = asyncio.get_running_loop()
        x = torch.cat([j.images for j in jobs])
        outputs = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start : start + self.max_batch]
            outputs.append(await loop.run_in_executor(self._executor, self.forward, chunk))
            self.batches_run += 1
            self.images_served += len(chunk)
            self.largest_batch = max(self.largest_batch, len(chunk))
        out = torch.cat(outputs)
        offset = 0
        for job in jobs:
            n = len(job.images)
            if not job.future.done():
                job.future.set_result(out[offset : offset + n])
            offset += n

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def stats(self) -> dict:
        return {
            "batches_run": self.batches_run,
            "images_served": self.images_served,
            "largest_batch": self.largest_batch,
            "queued_requests": self._queue.qsize() if self._queue is not None else 0,
        }
