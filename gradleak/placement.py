"""Will the network fit? Peers per process from what the cluster can host, or one line why not.

Pure logic on a summary of the cluster (CPUs, GPUs and custom resources per node), so
the check runs before any actor exists and unit tests need no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class FitError(ValueError):
    """Raised when the cluster cannot host the run; the message is one line naming the flag."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0
    resources: frozenset[str] = frozenset()  # custom resource names it declares


@dataclass(frozen=True)
class Plan:
    per_process: int  # honest peers per host process
    hosts: int  # honest host processes
    cpus: float  # CPUs the whole run asks for


def plan(
    nodes: list[Node], *, honest: int, per_process: int, host_cpus: float, attacker_cpus: float,
    attacker_gpus: float = 0.0, peer_gpus: float = 0.0, attacker_resource: str | None = None,
    attackers: int = 1,
) -> Plan:
    """Choose honest peers per process (per_process 0 = as few processes as fit) or raise FitError.

    attackers: malicious peers, each an actor asking attacker_cpus and attacker_gpus.
    """
    if attacker_resource is not None:
        marked = [n for n in nodes if attacker_resource in n.resources]
        if not marked:
            raise FitError(f"no node declares the resource '{attacker_resource}' the attacker must run on; "
                           "drop --attack-resource or start a node with it")
        peer_nodes = [n for n in nodes if attacker_resource not in n.resources]
        attacker_nodes = marked
    else:
        peer_nodes = attacker_nodes = nodes
    who = "the attacker" if attackers == 1 else f"each of the {attackers} attackers"
    if attacker_gpus > max((n.gpus for n in attacker_nodes), default=0.0):
        raise FitError(f"{who} asks for {attacker_gpus:g} GPU(s) but no node it may use has that "
                       f"many (the cluster has {sum(n.gpus for n in nodes):g}); lower --attack-gpus")
    if max((n.cpus for n in attacker_nodes), default=0.0) < attacker_cpus:
        raise FitError(f"no node the attacker may use has {attacker_cpus:g} CPUs; lower --peer-cpus")
    if attackers * attacker_gpus > sum(n.gpus for n in attacker_nodes) + 1e-9:
        raise FitError(f"{attackers} attackers at {attacker_gpus:g} GPU(s) each need "
                       f"{attackers * attacker_gpus:g} GPUs, the nodes they may use have "
                       f"{sum(n.gpus for n in attacker_nodes):g}; lower --malicious or --attack-gpus")
    if attacker_resource is not None and attackers * attacker_cpus > sum(n.cpus for n in attacker_nodes) + 1e-9:
        raise FitError(f"{attackers} attackers at {attacker_cpus:g} CPU each need {attackers * attacker_cpus:g} "
                       f"CPUs on the '{attacker_resource}' nodes, which have {sum(n.cpus for n in attacker_nodes):g}; "
                       "lower --malicious or --peer-cpus, or mark more nodes")
    attacker_cpus, attacker_gpus = attackers * attacker_cpus, attackers * attacker_gpus  # from here: all of them
    # The attacker's share comes off the honest peers' CPUs when they share nodes.
    cpus = sum(n.cpus for n in peer_nodes) - (attacker_cpus if attacker_resource is None else 0.0)
    gpus = sum(n.gpus for n in peer_nodes) - (attacker_gpus if attacker_resource is None else 0.0)
    if host_cpus > 0:
        room = math.floor(cpus / host_cpus + 1e-9)
    else:
        room = honest
    if peer_gpus > 0:
        room = min(room, math.floor(gpus / peer_gpus + 1e-9))
    if per_process == 0:
        if room < 1:
            raise FitError(f"not even one peer process fits: {cpus:g} CPUs left beside {_them(attackers)}, "
                           f"{host_cpus:g} asked per process; lower --peer-cpus or add nodes")
        hosts = min(honest, room)
        per = math.ceil(honest / hosts)
        hosts = math.ceil(honest / per)
    else:
        per = per_process
        hosts = math.ceil(honest / per)
        if hosts > room:
            need = math.ceil(honest / max(1, room)) if room > 0 else None
            fix = f"set --peers-per-process 0 (as many as fit) or >= {need}" if need else "add nodes"
            raise FitError(
                f"{honest} honest peers at {per} per process need {hosts} processes x {host_cpus:g} CPU "
                f"+ {_them(attackers, possessive=True)} {attacker_cpus:g} = {hosts * host_cpus + attacker_cpus:g} CPUs"
                + (f" and {hosts * peer_gpus:g} GPUs" if peer_gpus else "")
                + f", the cluster has {cpus + attacker_cpus:g} CPUs for them; {fix}, or lower --peer-cpus")
    return Plan(per, hosts, hosts * host_cpus + attacker_cpus)


def _them(attackers: int, possessive: bool = False) -> str:
    if attackers == 1:
        return "the attacker's" if possessive else "the attacker"
    return f"the {attackers} attackers" + ("'" if possessive else "")
