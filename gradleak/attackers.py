"""The colluding malicious peers of a run, as the driver sees them: names and one pooled status.

Each malicious peer is its own Ray actor with its own scheduler, attacks and transcript
(gradleak/runtime/malicious_node.py). summary.json's `attacker` section is the pool of
their statuses (`pool_status`): counts summed, coverage over the updates the pool could
attack, and each attacker's own status under `per_attacker`. With one attacker the
section is that attacker's status as before (plus `ids` and `per_attacker`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradleak.runtime.malicious import COLLUDER, FROM_COLLUDER

_SUMMED = ("received", "attacked", "pending", "in_flight", "captured", "dropped", "reconstructions",
           "failed", "models_received")


def attacker_name(aid: str, count: int) -> str:
    """How progress lines and the fault record name one attacker."""
    return "the attacker (mallory)" if count == 1 else f"the attacker ({aid})"


def _add(into: dict[str, int], more: Mapping[str, Any] | None) -> None:
    for k, v in (more or {}).items():
        into[k] = into.get(k, 0) + int(v)


def pool_status(statuses: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The pooled `attacker` section of summary.json from each attacker's status (by id).

    coverage: attacked / (received - updates left to another colluder - the colluders' own
    updates), i.e. the share of what the pool could attack that it attacked (one attacker:
    its own coverage).
    latency_p50_s / latency_p95_s: the worst of the attackers' (quantiles do not add up).
    device: one name if all agree, else the list; lost: any attacker lost.
    """
    if not statuses:
        return {"ids": [], "per_attacker": {}}
    rows = list(statuses.values())
    if len(rows) == 1:
        aid, only = next(iter(statuses.items()))
        return {**only, "ids": [aid], "per_attacker": {aid: dict(only)}}
    out: dict[str, Any] = {k: sum(int(r.get(k) or 0) for r in rows) for k in _SUMMED}
    evicted: dict[str, int] = {}
    chosen: dict[str, int] = {}
    for r in rows:
        _add(evicted, r.get("evicted"))
        _add(chosen, r.get("chosen"))
    out["evicted"], out["chosen"] = evicted, chosen
    attackable = out["received"] - evicted.get(COLLUDER, 0) - evicted.get(FROM_COLLUDER, 0)
    out["coverage"] = out["attacked"] / attackable if attackable > 0 else 0.0
    for q in ("latency_p50_s", "latency_p95_s"):
        values = [float(r[q]) for r in rows if r.get(q) is not None]
        out[q] = max(values) if values else None
    devices = sorted({str(r.get("device")) for r in rows if r.get("device") is not None})
    out["device"] = devices[0] if len(devices) == 1 else devices or None
    out["idle"] = all(bool(r.get("idle", True)) for r in rows)
    out["queue"] = sum(int(r.get("queue") or 0) for r in rows)
    if any(r.get("lost") for r in rows):
        out["lost"] = True
    out["ids"] = list(statuses)
    out["per_attacker"] = {aid: dict(r) for aid, r in statuses.items()}
    return out


__all__ = ["COLLUDER", "FROM_COLLUDER", "attacker_name", "pool_status"]
