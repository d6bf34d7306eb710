"""One model, many clients: requests wait in a bounded queue and run one at a time, in order.

A worker thread owns the model (and its KV caches); request handlers never touch it. Each job
streams its events back through a callback the handler supplies (thread-safe), so concurrent
clients each get exactly their own text, never another's. A full queue is refused at once
(the server answers 429) instead of growing without bound; a job whose client went away is
dropped, or stopped at its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atoll.model import Transformer
from atoll.rundir.tokenizer import TextTokenizer
from atoll.serve.textgen import SamplingParams, complete

log = logging.getLogger(__name__)

Event = tuple[Any, ...]
"""("delta", choice, text) | ("done", choice, finish_reason, completion_tokens) | ("error", message) | ("end",)"""


class EngineBusy(Exception):
    """The queue is full; the client should retry later."""


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Job:
    """One request: its choices run one after another; `emit` receives the events."""

    choices: list[Choice]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Runs jobs on one worker thread. `submit` never blocks; `close` stops the worker."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, *, max_queue: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name="atoll-engine", daemon=True)
        self._thread.start()
        self.completed = 0

    def submit(self, job: Job) -> None:
        """Queue `job`. Raises EngineBusy when `max_queue` jobs are already waiting."""
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise EngineBusy from None

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def close(self, *, timeout_seconds: float = 10.0) -> None:
        """Let the running job finish, drop the queued ones, stop the worker."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(("error", "the server is shutting down"))
                job.emit(("end",))
        self._jobs.put(None)
        self._thread.join(timeout=timeout_seconds)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except Exception as exc:  # a bug in one request must not stop the server; the client gets a 500
                log.exception("generation failed")
                job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                job.emit(("end",))
                self.completed += 1

    def _run(self, job: Job) -> None:
        for choice in job.choices:
            if job.cancelled.is_set():
                return
            completion = complete(
                self.model, self.tokenizer, choice.prompt_ids, choice.params, cancelled=job.cancelled.is_set
            )
            for piece in completion:
                job.emit(("delta", choice.index, piece))
            job.emit(("done", choice.index, completion.finish_reason, completion.num_tokens))
