"""Continuous batching: one thread drives the engine; HTTP handlers submit rows and read their tokens.

    handlers (asyncio)                     scheduler thread
    ------------------                     ----------------
    submit(rows) -> waiting deque   --->   admit waiting rows while the batch has free slots
                                           engine.add_request(...)   (joins the batch at the next step)
                                           engine.step()             (prefill new rows + one decode step)
    await queue.get()  <--- call_soon_threadsafe(events of this step, grouped per event loop)
    cancel(row) (client gone)       --->   engine.cancel(rid): its slot is free at the next step

A row's first text and its end are handed over at once; tokens in between at most every
`stream_interval_s` (50 ms), so one socket write carries several tokens when steps are fast.

New requests join the running batch between decode steps and finished rows leave it, so a long
generation never blocks a short one behind it. The waiting queue is bounded (`max_queue` rows):
`submit` raises `QueueFull` (HTTP 429) instead of letting latency grow without limit.

Only this thread touches the engine, so the engine needs no locks. A request with n choices is n
rows sharing one asyncio queue; each item is (row index, TokenEvent) or (row index, exception).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Optional

from chatstack.serve.metrics import ServerMetrics

log = logging.getLogger("chatstack.serve")


class QueueFull(Exception):
    """The waiting queue has no room for the request's rows."""


@dataclass(eq=False)
class Row:
    """One engine request: a prompt and its sampling params; its tokens go to `queue` tagged with `index`."""

    prompt_ids: list[int]
    params: Any
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int = 0
    rid: Optional[int] = None  # the engine's request id once admitted
    submitted: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None
    n_tokens: int = 0
    cancelled: bool = False
    done: bool = False
    shown: bool = False  # some text has been handed to the client
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache
    embeds: Any = None  # image embeddings at prompt positions (Engine.add_request), or None


class Scheduler:
    def __init__(
        self,
        engine,
        max_queue: int = 256,
        max_batch_size: Optional[int] = None,
        metrics: Optional[ServerMetrics] = None,
        idle_wait_s: float = 0.5,
        stream_interval_s: float = 0.05,
    ):
        self.engine = engine
        engine_max = getattr(engine, "max_batch_size", None) or 32
        self.max_batch_size = min(max_batch_size or engine_max, engine_max)
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.idle_wait_s = idle_wait_s
        self.stream_interval_s = stream_interval_s
        self._out: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)  # events not handed over yet
        self._last_flush = 0.0
        self._cv = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._cancels: list[Row] = []
        self._running: dict[int, Row] = {}  # rid -> row; only the scheduler thread touches it
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0

    # ------------------------------------------------------------------ called from the event loop

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatstack-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(
        self, prompt_ids: list[int], params_list: list, queue: Optional[asyncio.Queue] = None, embeds=None
    ) -> list[Row]:
        """Queue one row per params (all or none); their events arrive on one shared asyncio queue.
        embeds: the prompt's image embeddings (positions, values), shared by the rows."""
        loop = asyncio.get_running_loop()
        queue = queue if queue is not None else asyncio.Queue()
        rows = [Row(list(prompt_ids), p, queue, loop, index=i, embeds=embeds) for i, p in enumerate(params_list)]
        with self._cv:
            if self._stopping:
                raise RuntimeError("scheduler stopped")
            if len(self._waiting) + len(rows) > self.max_queue:
                self.metrics.rejected.inc(len(rows))
                raise QueueFull(f"{len(self._waiting)} rows are waiting (limit {self.max_queue}); retry later")
            self._waiting.extend(rows)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify_all()
        return rows

    def cancel(self, rows: list[Row]) -> None:
        """Free the rows' batch slots (a client went away). Safe to call on finished rows."""
        with self._cv:
            for row in rows:
                if not row.done and not row.cancelled:
                    row.cancelled = True
                    self._cancels.append(row)
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancels or self._running):
                    self._cv.wait(self.idle_wait_s)
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.max_batch_size:
                    row = self._waiting.popleft()
                    if not row.cancelled:
                        admit.append(row)
                self.metrics.queue_depth.set(len(self._waiting))
            try:
                self._tick(cancels, admit)
            except Exception as e:  # never let the loop die: fail the rows in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
        self._fail_all(RuntimeError("server shutting down"))

    def _tick(self, cancels: list[Row], admit: list[Row]) -> None:
        for row in cancels:
            if row.rid is not None and self._running.pop(row.rid, None) is not None:
                self.engine.cancel(row.rid)
                row.done = True
                self.metrics.cancelled.inc()
        for row in admit:
            try:
                extra = {} if row.embeds is None else {"embeds": row.embeds}
                row.rid = self.engine.add_request(row.prompt_ids, row.params, **extra)
            except Exception as e:  # bad prompt/params for this row only
                row.done = True
                self._deliver({row.loop: [(row, e)]})
                continue
            self._running[row.rid] = row
            self.metrics.prompt_tokens.inc(len(row.prompt_ids))
        self.metrics.running.set(len(self._running))
        if not self._running:
            return
        self.metrics.batch.observe(len(self._running))
        t0 = time.perf_counter()
        events = self.engine.step()
        self.steps += 1
        now = time.perf_counter()
        self.metrics.step_time.observe(now - t0)
        out = self._out
        urgent, n_tokens = False, 0
        for ev in events:
            row = self._running.get(ev.request_id)
            if row is None:  # cancelled in the meantime
                continue
            if ev.cached_tokens:
                row.cached_tokens = ev.cached_tokens
            if ev.token_id is not None:
                row.n_tokens += 1
                n_tokens += 1
                if row.first_token is None:
                    row.first_token = now
                    self.metrics.ttft.observe(now - row.submitted)
            if ev.text and not row.shown:  # a row's first visible text goes out at once (time to first token)
                row.shown = urgent = True
            if ev.finished:
                row.done = urgent = True
                del self._running[ev.request_id]
                self.metrics.latency.observe(now - row.submitted)
            out[row.loop].append((row, ev))
        self.metrics.generation_tokens.inc(n_tokens)
        self.metrics.running.set(len(self._running))
        # Later tokens are handed over at most every stream_interval_s: each hand-over costs the HTTP side
        # a wake-up and a socket write per client, and several tokens per write leave more CPU to the engine.
        if urgent or now - self._last_flush >= self.stream_interval_s:
            self._flush(now)

    def _flush(self, now: float) -> None:
        out, self._out = self._out, defaultdict(list)
        self._last_flush = now
        if out:
            self._deliver(out)

    def _fail_all(self, err: Exception) -> None:
        self._flush(time.perf_counter())  # tokens already made go out before the error
        out: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        rows = list(self._running.values())
        with self._cv:
            rows += list(self._waiting)
            self._waiting.clear()
        for row in rows:
            if row.rid is not None:
                try:
                    self.engine.cancel(row.rid)
                except Exception:
                    pass
            row.done = True
            out[row.loop].append((row, err))
        self._running.clear()
        self._deliver(out)

    @staticmethod
    def _deliver(out: dict) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass


def _put_all(items) -> None:
    for row, ev in items:
        row.queue.put_nowait((row.index, ev))
