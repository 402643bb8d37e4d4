"""One generation at a time: requests wait in a FIFO queue served by one thread that owns the Runtime.

A Runtime must not be entered by two generations at once (one KV cache, one
expert cache, one set of stats), so the event loop never calls it: it puts a
`Job` on the queue and reads the job's events (text pieces, then one `Finish`
or an `ApiError`) from an asyncio queue that this thread fills. A job whose
client went away is cancelled: skipped if it is still waiting, stopped after
its next token if it is running.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..errors import OffloadError
from ..sampling import SamplingParams
from .errors import ApiError

# The runtime's finish reasons as the Finish record names them ("stop": EOS or a stop string).
REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "context"}
from .metrics import LastGeneration, Metrics

log = logging.getLogger("offload.server")


@dataclass(frozen=True)
class Finish:
    reason: str  # as GenerationResult.finish_reason: "stop" (EOS or a stop string), "length" or "context"
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One request's generation; `events` yields ("text", str) ..., then ("done", Finish) or ("error", ApiError)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, context: int):
        self.prompt_ids, self.params = prompt_ids, params
        self.room = context - len(prompt_ids)  # tokens the context leaves for the completion
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()  # jobs are made on the event loop, which reads their events
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Called from the event loop when the client has gone (harmless once the job has finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, value) -> None:
        """From the worker thread: hand an event to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (server shut down): nobody is listening
            pass


class Worker:
    """The thread that runs every generation, in arrival order."""

    def __init__(self, llm, metrics: Metrics, max_queue: int):
        self.llm, self.metrics, self.max_queue = llm, metrics, max_queue
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._closing = False
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._serve, name="offload-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self._waiting >= self.max_queue:
                raise ApiError(503, f"the server is busy: {self._waiting} requests are already waiting; "
                                    "retry later", code="overloaded")
            self._waiting += 1
        self.metrics.queued(+1)
        self._queue.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, stop the running one after its next token, fail the waiting ones, join."""
        with self._lock:
            self._closing = True
            current = self._current
        if current is not None:
            current.cancel()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                closing = self._closing
                self._current = None if closing or job.cancelled else job
            self.metrics.queued(-1)
            if closing:
                job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
            elif job.cancelled:
                self.metrics.finished("cancelled", 0.0)
            else:
                self._run(job)
                with self._lock:
                    self._current = None

    def _run(self, job: Job) -> None:
        p = job.params
        self.metrics.started()
        start = time.perf_counter()
        pieces = self.llm.stream(job.prompt_ids, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                 top_k=p.top_k, top_p=p.top_p, seed=p.seed, stop=list(p.stop))
        try:
            for piece in pieces:
                if job.cancelled:
                    break  # closing the stream below ends the decode loop: no further token is computed
                job.emit("text", piece)
        except OffloadError as exc:  # the request was checked before it was queued: the model failed
            log.error("generation failed: %s", exc)
            self.metrics.finished("error", time.perf_counter() - start)
            job.emit("error", ApiError(500, f"generation failed: {exc}", code="generation_failed"))
            return
        except Exception as exc:  # keep serving; the traceback goes to the log
            log.exception("generation failed")
            self.metrics.finished("error", time.perf_counter() - start)
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))
            return
        finally:
            pieces.close()  # records the run's stats in llm.stats.last, also when stopped early
        seconds = time.perf_counter() - start
        run = self.llm.stats.last
        finish = Finish(REASONS.get(run.finish_reason, "length"), len(job.prompt_ids), run.new_tokens)
        outcome = "cancelled" if job.cancelled else finish.reason
        self.metrics.finished(outcome, seconds, finish.prompt_tokens, finish.completion_tokens,
                              LastGeneration(run.tokens_per_second, run.time_to_first_token))
        if not job.cancelled:
            job.emit("done", finish)

