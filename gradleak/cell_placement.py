"""Where a sweep's cells run: each cell's peer hosts and attacker on nodes, by a policy.

Pure logic on the free resources of each node, so unit tests need no Ray; the sweep's
scheduler keeps the ledger (what its running cells hold) and pins each actor of a cell to
the node chosen here.

One cell: its honest peer host processes go onto one node when they fit there together
(their gossip stays inside the node, and the cell's timing does not depend on the links
between nodes); only when no node holds them all are they split, filling nodes in the
policy's order. Honest peers never go on a node marked with `attack.resource`. The
attacker goes on a marked node when `attack.resource` is set, else beside its peers when
it fits there, else wherever the policy says.

Policies (`gradleak sweep --cell-placement`):
- spread: each new cell onto the node running the fewest cells (then the one with the most
  free CPUs), so parallel cells land on different nodes and do not share cores.
- pack: each new cell onto the node with the least room that still holds it (best fit), so
  cells fill one node before the next and whole nodes stay free for other work.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gradleak.config import RunConfig

POLICIES = ("spread", "pack")
EPS = 1e-9

Resources = dict[str, float]
Free = Mapping[str, Mapping[str, float]]  # node id -> resource name -> free amount


@dataclass(frozen=True)
class CellDemand:
    """What one cell's actors ask Ray for (the evaluator asks for nothing)."""

    hosts: tuple[Resources, ...]  # each honest host process, in order
    attacker: Resources
    attacker_resource: str | None = None  # the marker of attacker nodes, if any

    def total(self) -> Resources:
        out: Resources = {}
        for need in (*self.hosts, self.attacker):
            for k, v in need.items():
                out[k] = out.get(k, 0.0) + v
        return out


@dataclass(frozen=True)
class CellNodes:
    """Where one cell runs: the node of each honest host process and of the attacker."""

    per_process: int  # honest peers per host process (the last host may hold fewer)
    hosts: tuple[str, ...]
    attacker: str

    def all(self) -> set[str]:
        return {*self.hosts, self.attacker}


def cell_demand(cfg: RunConfig, per_process: int) -> CellDemand:
    """The demand of the cell run by `cfg` with `per_process` honest peers to a host process."""
    pc, ac = cfg.peers, cfg.attack
    sizes = [min(per_process, pc.honest - k) for k in range(0, pc.honest, per_process)]
    hosts = tuple({"CPU": pc.num_cpus, "GPU": pc.num_gpus * n} for n in sizes)
    # the attacker's CPU share is a peer's; colluders (attack.count) all go to the attacker's node
    attacker = {"CPU": pc.num_cpus * ac.count, "GPU": ac.num_gpus * ac.count}
    if ac.resource:
        attacker[ac.resource] = 1.0
    return CellDemand(hosts, attacker, ac.resource)


def fits(room: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(room.get(k, 0.0) + EPS >= v for k, v in need.items() if v > 0)


def take(free: dict[str, Resources], node: str, need: Mapping[str, float], sign: float = 1.0) -> None:
    """Subtract `need` from a node's free resources (sign -1 gives them back)."""
    room = free[node]
    for k, v in need.items():
        if v:
            room[k] = room.get(k, 0.0) - sign * v


def place(free: Free, demand: CellDemand, *, policy: str, per_process: int,
          cells_on: Mapping[str, int] | None = None) -> CellNodes | None:
    """Nodes for one cell given what is free now, or None when it does not fit now.

    cells_on: how many running cells each node holds (spread's first criterion).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown cell placement '{policy}' (known: {', '.join(POLICIES)})")
    room = {n: dict(r) for n, r in free.items()}
    busy = cells_on or {}
    marker = demand.attacker_resource
    marked = [n for n in sorted(room) if marker and marker in room[n]]
    peer_nodes = [n for n in sorted(room) if n not in marked]

    def order(nodes: list[str], need: Mapping[str, float]) -> list[str]:
        key: Callable[[str], tuple[float, ...]]
        if policy == "spread":
            def key(n: str) -> tuple[float, ...]:
                return (busy.get(n, 0), -room[n].get("CPU", 0.0))
        else:
            def key(n: str) -> tuple[float, ...]:
                return (room[n].get("CPU", 0.0) - need.get("CPU", 0.0),)
        return sorted((n for n in nodes if fits(room[n], need)), key=key)  # stable: ties by id

    if not marker:  # the whole cell on one node when one holds it
        whole = order(peer_nodes, demand.total())
        if whole:
            return CellNodes(per_process, (whole[0],) * len(demand.hosts), whole[0])
    hosts = _place_hosts(room, demand, peer_nodes, order)
    if hosts is None:
        return None
    if marker:
        candidates = order(marked, demand.attacker)
    else:
        beside = hosts[0] if hosts and fits(room[hosts[0]], demand.attacker) else None
        candidates = [beside] if beside else order(sorted(room), demand.attacker)
    if not candidates:
        return None
    return CellNodes(per_process, tuple(hosts), candidates[0])


def _place_hosts(room: dict[str, Resources], demand: CellDemand, nodes: list[str],
                 order: Callable[[list[str], Mapping[str, float]], list[str]]) -> list[str] | None:
    """One node for every host if one holds them all, else first fit in the policy's order."""
    together: Resources = {}
    for need in demand.hosts:
        for k, v in need.items():
            together[k] = together.get(k, 0.0) + v
    one = order(nodes, together)
    if one:
        for need in demand.hosts:
            take(room, one[0], need)
        return [one[0]] * len(demand.hosts)
    preferred = order(nodes, demand.hosts[0]) if demand.hosts else []
    out = []
    for need in demand.hosts:
        node = next((n for n in preferred if fits(room[n], need)), None)
        if node is None:
            return None
        take(room, node, need)
        out.append(node)
    return out


class Ledger:
    """What is free on each node while a sweep's cells run, and how many cells each node holds."""

    def __init__(self, nodes: Free) -> None:
        self.free = {n: dict(r) for n, r in nodes.items()}
        self.cells_on: Counter[str] = Counter()

    def place(self, demand: CellDemand, *, policy: str, per_process: int) -> CellNodes | None:
        return place(self.free, demand, policy=policy, per_process=per_process, cells_on=self.cells_on)

    def hold(self, nodes: CellNodes, demand: CellDemand, sign: int = 1) -> None:
        """Book a cell's resources on its nodes (sign 1), or give them back (-1)."""
        for node, host in zip(nodes.hosts, demand.hosts, strict=True):
            take(self.free, node, host, sign)
        take(self.free, nodes.attacker, demand.attacker, sign)
        for node in nodes.all():
            self.cells_on[node] += sign


def describe(demand: CellDemand) -> str:
    """One cell's demand in words, for the error when the empty cluster cannot hold it."""
    h = demand.hosts
    host = f"{h[0]['CPU']:g} CPU" + (f", {h[0]['GPU']:g} GPU" if h and h[0]["GPU"] else "") if h else ""
    a = demand.attacker
    attacker = f"{a['CPU']:g} CPU" + (f", {a['GPU']:g} GPU" if a["GPU"] else "")
    if demand.attacker_resource:
        attacker += f" and the resource '{demand.attacker_resource}'"
    where = f" on nodes without '{demand.attacker_resource}'" if demand.attacker_resource else ""
    peers = "1 peer process of " + host if len(h) == 1 else f"{len(h)} peer processes of {host} each"
    return f"{peers}{where} + an attacker of {attacker}"
