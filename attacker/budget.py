"""A per-reconstruction time budget the attacks' loops check (AttackConfig.time_budget_s).

An attack opens `time_budget(seconds)` around its work; its loops call `expired()`
between steps and stop with their best-so-far answer once it is true; at the end the
attack reports stats["stop_reason"] = "time_budget" when `exhausted()`. The budget
lives in a context variable, so it is per thread and needs no parameter threaded
through every solver. Nested budgets keep the earlier deadline and share the flag.
`expired(share)` asks whether `share` of the budget is spent, so a first phase can
leave the rest to a second one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

TIME_BUDGET = "time_budget"  # the stop_reason of a reconstruction cut short by its budget


@dataclass
class _Budget:
    start: float
    seconds: float
    hit: bool = False


_CURRENT: ContextVar[_Budget | None] = ContextVar("attack_time_budget", default=None)


@contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Run the body under a budget of `seconds` (None: no budget of its own)."""
    outer = _CURRENT.get()
    if seconds is None:
        yield
        return
    now = time.perf_counter()
    if outer is not None and outer.start + outer.seconds <= now + seconds:
        yield  # the enclosing budget ends first: keep it
        return
    token = _CURRENT.set(_Budget(now, seconds))
    try:
        yield
    finally:
        inner = _CURRENT.get()
        _CURRENT.reset(token)
        if outer is not None and inner is not None and inner.hit:
            outer.hit = True


def expired(share: float = 1.0) -> bool:
    """Whether `share` of the current budget is spent (False without a budget)."""
    budget = _CURRENT.get()
    if budget is None:
        return False
    if time.perf_counter() - budget.start >= share * budget.seconds:
        budget.hit = True
        return True
    return False


def exhausted() -> bool:
    """Whether a loop under the current budget stopped for it."""
    budget = _CURRENT.get()
    return budget is not None and budget.hit
