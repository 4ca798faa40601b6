"""Serving requests one after another on the engine's own thread, in arrival order.

Owns: the bounded request queue (``QueueFull`` when it is full), the single thread that drives the
engine (ZeroMQ sockets and the weight scheduler belong to one thread), cancellation of a request
whose client has gone (its KV slots are freed on every rank), and jobs that must run on that thread
between decode steps (worker statistics for /metrics). Does not know: HTTP, JSON, tokenisation
details beyond asking the engine.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tpi.engine import Engine, GenerationResult
from tpi.sampling import SamplingParams

log = logging.getLogger("tpi.serving")


class QueueFull(RuntimeError):
    """The wait queue is full; the caller should answer 429 and ask the client to retry."""


class Cancelled(Exception):
    """The client went away; raised inside generation to stop it."""


@dataclass
class Job:
    """One generation request and the way its events reach the caller."""

    ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop: list[str]
    ignore_eos: bool
    emit: Callable[[dict[str, Any]], None]  # called on the engine thread: token / done / error events
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


class EngineThread:
    """Owns the thread that runs the engine. `submit` queues a job (arrival order) or raises
    QueueFull; `call` runs a function on the engine thread at the next safe point."""

    def __init__(self, engine: Engine, queue_size: int = 16):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size}: expected at least 1")
        self.engine, self.queue_size = engine, queue_size
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="tpi-engine", daemon=True)
        self.running: Job | None = None
        self.completed = 0
        self.cancelled = 0
        self.failed = 0

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def close(self) -> None:
        """Fail the waiting jobs, stop the running one, and end the thread."""
        with self._cv:
            self._stopping = True
            waiting, self._jobs = list(self._jobs), deque()
            if self.running is not None:
                self.running.cancelled.set()
            self._cv.notify_all()
        for job in waiting:
            job.emit({"event": "error", "error": RuntimeError("the server is shutting down")})
        self._thread.join(30)

    def submit(self, job: Job) -> Job:
        with self._cv:
            if len(self._jobs) >= self.queue_size:
                raise QueueFull(f"{self.queue_size} requests are already waiting")
            job.id = next(self._ids)
            self._jobs.append(job)
            self._cv.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it still waits, stop it at its next token if it runs."""
        job.cancelled.set()
        with self._cv:
            if job in self._jobs:
                self._jobs.remove(job)
                self.cancelled += 1

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread (between decode steps, or when idle); returns a Future."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._service_calls()
            with self._cv:
                if self._stopping:
                    return
                if not self._jobs:
                    self._cv.wait(0.05)  # also wakes for calls, which do not notify
                    idle = True
                else:
                    idle = False
                    job = self._jobs.popleft()
                    self.running = job
            if idle:
                self._poll_idle()
                continue
            self._generate(job)

    def _poll_idle(self) -> None:
        """No request: the master's socket still needs a listener (joins, rejoins, lost workers)."""
        try:
            self.engine.comm.poll_idle(0.0)
        except Exception as e:  # never let the listener end the engine thread
            log.warning("while idle: %s", e)

    def _service_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)

    def _generate(self, job: Job) -> None:

        def on_token(new: list[int], text: str) -> None:
            if job.cancelled.is_set():
                raise Cancelled()
            job.emit({"event": "token", "ids": new, "text": text})
            self._service_calls()  # between steps the sockets are idle: answer pending jobs

        try:
            res: GenerationResult = self.engine.generate(job.ids, job.max_new_tokens, job.params, job.stop,
                                                         on_token, ignore_eos=job.ignore_eos)
            self.completed += 1
            job.emit({"event": "done", "result": res})
        except Cancelled:
            self.cancelled += 1
            log.info("request %d cancelled by its client", job.id)
        except Exception as e:
            self.failed += 1
            log.warning("request %d failed: %s", job.id, e)
            job.emit({"event": "error", "error": e})
        finally:
            self.running = None
