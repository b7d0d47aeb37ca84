"""Faults a run survives: the pure rules behind a lost peer's restart, and the loss log.

A peer host killed mid-run is re-created by the driver (gradleak.runner) and its peers
rejoin. Three rules keep the run's records consistent, and live here so that they can
be tested without Ray:

- `resume_step`: a rejoined peer continues after the last step it shipped (its update
  ids `<peer>/r<step>` never repeat, so no truth is filed twice and no reconstruction
  is scored against another batch), and skips the steps that fell due while it was
  down (it keeps the network's pace instead of racing through a backlog).
- `rejoin_version`: its first version takes the neighbour's version number (versions
  are the network's common clock: receivers weigh updates by version lag), but always
  above any version the dead incarnation put in an update, so that a pull for one of
  those gets NOT_FOUND, never the new incarnation's weights.
- `rejoin_sources`: whom it pulls the current model from: its live topology neighbours
  first, then any other live peer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from p2p.clock import PeerClock
from p2p.topology import neighbours


def resume_step(clock: PeerClock, after_step: int, now: float) -> int:
    """The first step a restarted peer runs.

    clock: a fresh clock of the run's schedule (step 1 due first), consumed here;
    after_step: the last step the dead incarnation shipped (0: none). Steps due more
    than one gap before `now` are skipped.
    """
    if after_step < 0:
        raise ValueError(f"after_step must be >= 0, got {after_step}")
    if clock.period_s == 0:  # back-to-back steps: none is ever "missed"
        return after_step + 1
    step = 1
    due = clock.next_due()
    while step <= after_step or due < now - clock.period_s:
        step += 1
        due = clock.next_due()
    return step


def rejoin_version(neighbour_version: int, shipped_version: int | None) -> int:
    """The version number a rejoined peer's adopted weights take (see the module docstring)."""
    if neighbour_version < 0 or (shipped_version is not None and shipped_version < 0):
        raise ValueError(f"versions must be >= 0, got {neighbour_version} / {shipped_version}")
    return neighbour_version if shipped_version is None else max(neighbour_version, shipped_version + 1)


def rejoin_sources(me: str, members: Sequence[str], live: Sequence[str], topology: str,
                   seed: int = 0) -> list[str]:
    """Live peers to pull the model from, in order: topology neighbours first, then the rest."""
    order = sorted(set(members) | {me})
    near = [p for p in neighbours(topology, me, order, seed) if p in live]
    return near + sorted(p for p in live if p not in near and p != me)


@dataclass
class Loss:
    """One lost peer host and what became of it (a row of summary.json's `faults`)."""

    host: int
    peers: list[str]
    reason: str
    lost_at: float  # when the driver saw it gone (Unix seconds)
    last_seen: dict[str, int]  # steps each peer had reported at the last poll before
    restarted_at: float | None = None  # the new host's servers answered
    rejoined_at: float | None = None  # its peers hold the network's model and run their loops
    rejoin: dict[str, dict[str, Any]] = field(default_factory=dict)  # per peer: source, version, first_step
    error: str | None = None  # why the restart failed, if it did


class FaultLog:
    """The run's lost hosts, restarts and lost actors; becomes summary.json's `faults`."""

    def __init__(self, max_restarts: int) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.max_restarts = max_restarts
        self.losses: list[Loss] = []
        self.lost_actor: str | None = None  # the attacker or evaluator, whose loss ends the run

    def lost(self, host: int, peers: Sequence[str], reason: str, last_seen: dict[str, int]) -> Loss:
        loss = Loss(host, list(peers), reason, time.time(), dict(last_seen))
        self.losses.append(loss)
        return loss

    @property
    def restarts(self) -> int:
        return sum(1 for x in self.losses if x.restarted_at is not None)

    def may_restart(self) -> bool:
        return self.restarts < self.max_restarts

    def to_dict(self, final_steps: dict[str, int]) -> dict[str, Any]:
        """The record: each loss with its delays, and per rejoined peer the steps it made after."""
        rows = []
        for x in self.losses:
            row = asdict(x)
            row["restart_s"] = None if x.restarted_at is None else round(x.restarted_at - x.lost_at, 3)
            row["rejoin_s"] = None if x.rejoined_at is None else round(x.rejoined_at - x.lost_at, 3)
            for pid, r in row["rejoin"].items():
                final = final_steps.get(pid)
                r["steps_after"] = None if final is None else max(0, final - r["first_step"] + 1)
            rows.append(row)
        return {"lost_hosts": rows, "restarts": self.restarts, "max_restarts": self.max_restarts,
                "lost_actor": self.lost_actor}
