"""Bounds on the work one caller can make a gossip server do.

A member may send anything, including nothing: a stream that opens and then stalls
holds a server thread for as long as it stays open. Two parts bound that:

- `Admission` counts the calls in progress, in all and per caller (`Caller.key`), and
  refuses one over either cap at once (RESOURCE_EXHAUSTED) instead of queueing it.
- `Watchdog` gives every admitted call an idle limit (time without a frame) and a
  total limit; a call over either is cancelled with DEADLINE_EXCEEDED and a message
  that says which limit, so the caller learns why and the thread is freed.

The sync gRPC server offers no per-stream deadline of its own, and a handler blocked
reading its request stream cannot time out, hence the watchdog thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from p2p.errors import ResourceExhausted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one GossipServer allows; the defaults suit the live runs (a LeNet update of
    tens of KB pushed every 0.1-0.5 s to a few neighbours, client timeout 10 s).

    Attributes:
        max_calls: gossip calls (pushes and model pulls) in progress at once.
        max_calls_per_caller: of those, from one caller (peer id under mutual TLS,
            host over plaintext, where every loopback peer shares one host).
        max_health_calls: health checks in progress at once (their own budget, so a
            saturated gossip service still answers them).
        idle_s: the longest wait for the next frame of a gossip call.
        total_s: the longest a gossip call may take to arrive (a push's frames, a
            pull's request and response); a bit above the client's 10 s timeout.
        health_s: idle and total limit of a health check, which is one small message.
        min_chunk_bytes: the least payload of a chunk that does not end its tensor
            (the runs' chunk_bytes is at least 1 KiB).
        max_frames: the most frames of one update; None derives it from the model's
            schema and min_chunk_bytes (no count limit for a handler without one).
    """

    max_calls: int = 32
    max_calls_per_caller: int = 8
    max_health_calls: int = 8
    idle_s: float = 5.0
    total_s: float = 15.0
    health_s: float = 1.0
    min_chunk_bytes: int = 1024
    max_frames: int | None = None

    def __post_init__(self) -> None:
        counts = (self.max_calls, self.max_calls_per_caller, self.max_health_calls)
        if min(counts) < 1:
            raise ValueError(f"call caps must be >= 1, got {counts}")
        if min(self.idle_s, self.total_s, self.health_s) <= 0:
            raise ValueError("idle_s, total_s and health_s must be positive")
        if self.min_chunk_bytes < 0:
            raise ValueError(f"min_chunk_bytes must be >= 0, got {self.min_chunk_bytes}")
        if self.max_frames is not None and self.max_frames < 2:
            raise ValueError(f"max_frames must be >= 2 (a header and a chunk) or None, got {self.max_frames}")

    @property
    def workers(self) -> int:
        """Server threads: every admitted call, every health check, and a few spare
        for answering refusals while both budgets are full."""
        return self.max_calls + self.max_health_calls + 4


class Admission:
    """Counts calls in progress by caller key; refuses those over a cap immediately."""

    def __init__(self, max_total: int, max_per_key: int, what: str) -> None:
        self._max_total = max_total
        self._max_per_key = max_per_key
        self._what = what
        self._lock = threading.Lock()
        self._total = 0
        self._by_key: dict[str, int] = {}

    @contextmanager
    def admit(self, key: str) -> Iterator[None]:
        """Hold one slot for key while the block runs.

        Raises:
            ResourceExhausted: when the server or this caller is at its cap.
        """
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def acquire(self, key: str) -> None:
        """Take one slot for key (release it with `release`).

        Raises:
            ResourceExhausted: when the server or this caller is at its cap.
        """
        with self._lock:
            mine = self._by_key.get(key, 0)
            if self._total >= self._max_total:
                raise ResourceExhausted(f"{self._max_total} {self._what} calls in progress, the server's limit")
            if mine >= self._max_per_key:
                raise ResourceExhausted(
                    f"{mine} {self._what} calls of this caller in progress, limit {self._max_per_key}"
                )
            self._total += 1
            self._by_key[key] = mine + 1

    def release(self, key: str) -> None:
        """Give back a slot taken by `acquire`."""
        with self._lock:
            self._total -= 1
            left = self._by_key[key] - 1
            if left:
                self._by_key[key] = left
            else:
                del self._by_key[key]  # the map holds only callers with calls open

    @property
    def in_progress(self) -> int:
        with self._lock:
            return self._total


class StreamExpired(Exception):
    """Raised in a handler whose call the watchdog cancelled; the caller already has
    its status, so nothing more is sent and nothing the call carried is used."""


class Ticket:
    """One watched call: when it began, when it last made progress."""

    __slots__ = ("context", "expired", "idle_s", "last", "started", "total_s", "what")

    def __init__(self, context: Any, what: str, idle_s: float, total_s: float) -> None:
        self.context = context
        self.what = what
        self.idle_s = idle_s
        self.total_s = total_s
        self.started = self.last = time.monotonic()
        self.expired: str | None = None  # the reason, once cancelled

    def touch(self) -> None:
        """Record progress (a frame in or out); raise if the call was already cancelled."""
        if self.expired is not None:
            raise StreamExpired(self.expired)
        self.last = time.monotonic()


class Watchdog:
    """A thread that cancels watched calls over their idle or total limit."""

    def __init__(self, tick_s: float = 0.05) -> None:
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._tickets: set[Ticket] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gossip-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    @contextmanager
    def watch(self, context: Any, what: str, idle_s: float, total_s: float) -> Iterator[Ticket]:
        """Watch the call of context while the block runs."""
        ticket = Ticket(context, what, idle_s, total_s)
        with self._lock:
            self._tickets.add(ticket)
        try:
            yield ticket
        finally:
            with self._lock:
                self._tickets.discard(ticket)

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                due = [(t, _overdue(t, now)) for t in self._tickets]
                due = [(t, why) for t, why in due if why is not None]
                for t, why in due:
                    t.expired = why  # set first: the woken handler must see it
                    self._tickets.discard(t)
            for t, why in due:
                cancel_with_status(t.context, grpc.StatusCode.DEADLINE_EXCEEDED, f"{t.what}: {why}")


def _overdue(t: Ticket, now: float) -> str | None:
    """Why t is over a limit, or None."""
    if now - t.last > t.idle_s:
        return f"no frame for {t.idle_s:g} s (the server's idle limit)"
    if now - t.started > t.total_s:
        return f"not done within {t.total_s:g} s (the server's limit per call)"
    return None


def cancel_with_status(context: Any, code: grpc.StatusCode, details: str) -> None:
    """End a call from outside its handler, sending code and details to the client.

    The public `context.cancel()` would send a bare CANCELLED; the core call underneath
    takes a status (grpc_call_cancel_with_status). Should a grpcio version lack that
    path, the public cancel still frees the call.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except (AttributeError, TypeError) as exc:
        log.debug("cancelling with a status failed (%s); plain cancel", exc)
        context.cancel()


__all__ = ["Admission", "Limits", "StreamExpired", "Ticket", "Watchdog", "cancel_with_status"]
