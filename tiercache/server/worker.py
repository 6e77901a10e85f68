"""One engine, many requests: a FIFO of jobs run one at a time on a worker thread.

No web framework here (the HTTP side lives in app.py): a job is token ids plus sampling
settings; it hands text pieces to an asyncio queue and stops between tokens when cancelled.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .. import api
from ..errors import TiercacheError


@dataclass
class Sampling:
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """A piece of the answer; the last one carries finish_reason and the usage counts."""
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_status: int = 500  # 400 for a request the engine refuses (TiercacheError)


class Job:
    def __init__(self, ids: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop):
        self.ids, self.sampling, self.loop = ids, sampling, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, event: Event) -> None:
        """From the worker thread: hand an event to the request's event loop."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = [s for s in stops if s], ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to send now, whether a stop string was met)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class SessionPool:
    """KV caches kept between requests, at most `size`. A request whose prompt extends a kept
    conversation takes that session and prefills only its new tokens; another takes a fresh
    session while there is room, else the one sharing the longest prefix (the least recently
    used among equals)."""

    def __init__(self, engine, size: int):
        self.engine, self.size, self.sessions = engine, max(1, size), []

    def take(self, ids: list[int]):
        """-> (session, how many of `ids` its cache already holds)."""
        best, best_n = None, -1
        for s in self.sessions:  # oldest first, so ties go to the least recently used
            n = shared_prefix(s.tokens, ids)
            if n > best_n:
                best, best_n = s, n
        extends = best is not None and best_n >= len(best.tokens) - 1
        if best is None or (not extends and len(self.sessions) < self.size):
            best, best_n = self.engine.new_session(), 0
        else:
            self.drop(best)
        self.sessions.append(best)  # most recently used last
        return best, best_n

    def drop(self, session) -> None:
        self.sessions = [s for s in self.sessions if s is not session]


def shared_prefix(cached: list[int], ids: list[int]) -> int:
    """Positions of `ids` a session holding `cached` reuses (Session.reuse_prefix's rule:
    at least one position is always recomputed)."""
    n, limit = 0, min(len(ids) - 1, len(cached))
    while n < limit and cached[n] == ids[n]:
        n += 1
    return n


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Worker:
    """Runs jobs in arrival order on one thread; at most `max_queue` wait behind the running one."""

    def __init__(self, engine, tokenizer, max_queue: int = 64, sessions: int = 1,
                 start: bool = True):
        self.engine, self.tok, self.max_queue = engine, tokenizer, max_queue
        self.pool = SessionPool(engine, sessions)
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.running: Job | None = None
        self.counters = dict(requests=0, completed=0, cancelled=0, rejected=0, errors=0,
                             prompt_tokens=0, cached_tokens=0, completion_tokens=0)
        self.last: dict = {}   # the last finished job's speeds and the engine's stats
        self.job_seconds = 1.0  # a moving average, for Retry-After
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="tiercache-worker", daemon=True)
        if start:
            self.thread.start()

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull with a Retry-After estimate."""
        with self.cond:
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                self.counters["rejected"] += 1
                ahead = len(self.waiting) + 1
                raise QueueFull(max(1, math.ceil(ahead * self.job_seconds)))
            self.counters["requests"] += 1
            self.waiting.append(job)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for job in self.waiting:
                job.cancel()
            self.cond.notify()

    def queue_depth(self) -> int:
        """Requests waiting whose clients are still there."""
        return sum(not j.cancelled.is_set() for j in list(self.waiting))

    def _drop_cancelled(self) -> None:
        """Let go of waiting jobs whose clients left: they hold no place in the queue."""
        live = [j for j in self.waiting if not j.cancelled.is_set()]
        self.counters["cancelled"] += len(self.waiting) - len(live)
        self.waiting = deque(live)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                job = self.running = self.waiting.popleft()
            t0 = time.perf_counter()
            self._run_safely(job)
            self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.perf_counter() - t0)
            self.running = None

    def _run_safely(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left while it waited
            self._count(cancelled=1)
            return
        session, cached = self.pool.take(job.ids)
        try:
            self._run(job, session, cached)
        except Exception as e:  # a failed request must not take the server down
            self.pool.drop(session)  # its caches may have stopped part-way through a layer
            self._count(errors=1)
            if isinstance(e, TiercacheError):  # the engine's one-line refusal, for the client
                job.put(Event("", "error", error=str(e), error_status=400))
                return
            job.put(Event("", "error", error=f"{type(e).__name__}: {e}"))
            log_failure(e)

    def _run(self, job: Job, session, cached: int) -> None:
        s = job.sampling
        stop, n, last, final = StopMatcher(s.stop), 0, None, None
        for r in api.stream_generate(self.engine, self.tok, job.ids, max_tokens=s.max_tokens,
                                     temp=s.temp, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                                     session=session):
            n, last = n + 1, r
            if job.cancelled.is_set():
                break
            text, hit = stop.feed(r.text)
            if hit or r.finish_reason:
                final = Event(text + ("" if hit else stop.flush()),
                              "stop" if hit else r.finish_reason, len(job.ids), n, cached)
                break
            if text:
                job.put(Event(text))
        self._account(job, n, cached, last, final is not None)
        if final is not None:  # after the counters: a client that saw its end sees them too
            job.put(final)

    def _count(self, **add: int) -> None:
        with self.cond:  # the event loop's thread counts too (requests, rejected, cancelled)
            for k, v in add.items():
                self.counters[k] += v

    def _account(self, job: Job, n: int, cached: int, last, finished: bool) -> None:
        self._count(**{"completed" if finished else "cancelled": 1},
                    prompt_tokens=len(job.ids), cached_tokens=cached, completion_tokens=n)
        if last is not None:
            self.last = {"prompt_tokens": len(job.ids), "cached_tokens": cached,
                         "completion_tokens": n, "prefill_tok_s": last.prompt_tps,
                         "decode_tok_s": last.generation_tps,
                         "peak_memory_bytes": last.peak_memory,
                         "peak_memory_method": last.peak_memory_method,
                         "engine": _engine_stats(self.engine)}


def _engine_stats(engine) -> dict:
    """The tiered engine's cache and store counters, without its per-region detail."""
    s = engine.stats() if hasattr(engine, "stats") else {}
    keep = ("cache_hit_rate", "store_bytes_read", "store_bytes_per_token", "mode", "compute",
            "read_ahead_hits", "demand_reads")
    out = {k: s[k] for k in keep if k in s}
    if "mode" in out:
        out["mode"] = api.mode_name(out["mode"])
    return out


def log_failure(e: Exception) -> None:
    """The traceback goes to the server's log, never to the client."""
    import logging
    logging.getLogger("tiercache.server").error("request failed", exc_info=e)
