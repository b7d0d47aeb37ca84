"""Peers on real links: `gradleak peer` processes in network namespaces joined by veth pairs
(deploy/netns/netns.sh), plain and with `tc netem` delay and loss, or through the script's
userspace switch that delays and drops frames the same way (for kernels without netem).

Needs root, `ip netns` and, for netem, a kernel with sch_netem (for the switch,
/dev/net/tun); each test is skipped with the reason where this machine does not permit it. Namespaces are removed
whatever happens. The figures of each run (sent, lost, received, the attacker's coverage)
are printed and written to <tmp>/netem.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2p.tls import make_test_pki, write_tls

from .peers import ROOT, PeerProcess, make_roster, peer_command, run_to_done, start_peer

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "deploy" / "netns" / "netns.sh"
PREFIX = f"glt{os.getpid() % 100000}"  # apart from any other run's namespaces
PORT = 50051
IDS = ["peer-0", "peer-1", "peer-2"]  # peer-0 is the attacker
ROUNDS = 30


def netns(*args: str, links: str = "veth", state: Path | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NETNS_PREFIX": PREFIX, "NETNS_LINKS": links, "PYTHON": sys.executable}
    if state is not None:
        env["NETNS_STATE"] = str(state)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env=env, check=check)


def why_not(links: str, netem: bool = False) -> str | None:
    """None where this machine can run the test, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    probe = netns("check", links=links, check=False)
    if probe.returncode == 0:
        return None
    reason = probe.stdout.strip() or probe.stderr.strip()
    if "netem" in reason and not netem:
        return None  # plain veth links still work
    return reason


def left_over() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-")]


def run_network(tmp_path: Path, delay_ms: float, loss_pct: float, links: str = "veth") -> dict[str, Any]:
    """Three peers in their own namespaces for ROUNDS steps; their status files and the figures."""
    out = tmp_path / "out"
    addrs = {p: f"10.77.0.{i + 1}" for i, p in enumerate(IDS)}
    roster = make_roster(tmp_path / "roster.json", {p: f"{a}:{PORT}" for p, a in addrs.items()})
    # Not loopback: plaintext would need --insecure, so the links run mutual TLS.
    _ca, material = make_test_pki(hosts=tuple(addrs.values()), peers=IDS)
    peers: list[PeerProcess] = []
    try:
        netns("up", str(len(IDS)), str(delay_ms), str(loss_pct), links=links, state=tmp_path)
        for i, p in enumerate(IDS):
            tls = write_tls(tmp_path / "tls" / p, material[p])
            cmd = peer_command(p, f"{addrs[p]}:{PORT}", roster, out, "--tls-dir", str(tls),
                               "--role", "malicious" if i == 0 else "honest", "--rounds", str(ROUNDS),
                               "--period", "0.1", "--batch-size", "1,8", "--limit", "800",
                               "--attack-budget", "0.5", "--max-iters", "20")
            peers.append(start_peer(cmd, p, out, prefix=["ip", "netns", "exec", f"{PREFIX}-p{i}"]))
        codes = run_to_done(peers, 60)
    finally:
        for p in peers:  # a start that failed half-way
            if p.proc.poll() is None:
                p.stop(signal.SIGKILL)
        netns("down", links=links, state=tmp_path, check=False)
    assert codes == [0] * len(IDS), [p.output()[-800:] for p in peers]
    assert not any(p.group_alive() for p in peers)
    assert left_over() == []
    status = {p.peer_id: p.status() for p in peers}
    attacker = status[IDS[0]]["attacker"]
    figures = {
        "links": links, "delay_ms": delay_ms, "loss_pct": loss_pct, "rounds": ROUNDS,
        "sent": sum(s["sent"] for s in status.values()),
        "lost": sum(s["failed"] for s in status.values()),  # sender side: not acknowledged
        "received": sum(s["received"] for s in status.values()),
        "send_failures": {p: s["send_failures"] for p, s in status.items()},
        "received_from": {p: s["received_from"] for p, s in status.items()},
        "mixes": {p: s["mixes"] for p, s in status.items()},
        "accuracy": {p: s["accuracy"] for p, s in status.items() if s["role"] == "honest"},
        "attacker": {k: attacker[k] for k in ("received", "attacked", "coverage", "evicted")},
    }
    frames = tmp_path / f"{PREFIX}-switch.ready.stats"  # the userspace switch's frame counts
    if frames.exists():
        figures["frames"] = json.loads(frames.read_text())
    (tmp_path / "netem.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return {"status": status, "figures": figures}


def check_flow(result: dict[str, Any]) -> None:
    status, f = result["status"], result["figures"]
    for p, s in status.items():
        assert s["steps"] == ROUNDS and s["error"] is None and s["tls"] is True
        # fanout 2 of 2 others: every step sends twice, delivered or counted as lost.
        assert s["sent"] + s["failed"] == 2 * ROUNDS, (p, s)
        assert set(s["received_from"]) == set(IDS) - {p}, (p, s["received_from"])
    # An acknowledged update was accepted; a lost acknowledgement may hide an accepted one.
    assert f["sent"] <= f["received"] <= f["sent"] + f["lost"], f
    a = status[IDS[0]]["attacker"]
    assert a["received"] == status[IDS[0]]["received"] > 0
    assert a["attacked"] > 0 and 0 < a["coverage"] <= 1


def test_peers_in_namespaces_gossip_over_veth_links(tmp_path: Path) -> None:
    reason = why_not("veth")
    if reason:
        pytest.skip(reason)
    result = run_network(tmp_path, 0, 0)
    check_flow(result)
    assert result["figures"]["lost"] == 0  # clean links lose nothing


def test_updates_flow_under_netem_delay_and_ten_percent_loss(tmp_path: Path) -> None:
    reason = why_not("veth", netem=True)
    if reason:
        pytest.skip(reason)
    result = run_network(tmp_path, 20, 10)
    check_flow(result)


def test_updates_flow_through_a_switch_with_delay_and_ten_percent_loss(tmp_path: Path) -> None:
    reason = why_not("switch")
    if reason:
        pytest.skip(reason)
    result = run_network(tmp_path, 20, 10, links="switch")
    check_flow(result)
    frames = result["figures"]["frames"]
    # The links really lost packets (seeded 10% of the frames forwarded), and gossip went on.
    assert 0.07 < frames["dropped"] / frames["forwarded"] < 0.13, frames
