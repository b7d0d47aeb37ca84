"""`gradleak peer` as real processes: three peers learn over real gRPC (mutual TLS from
files), and a peer attacked from outside with raw frames refuses them and keeps serving."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from p2p import codec
from p2p.tls import make_test_pki, write_tls
from p2p.transport import GossipClient

from .peers import free_ports, make_roster, peer_command, run_to_done, start_peer, wait_until

pytestmark = pytest.mark.integration

ROUNDS = 80
FAST = ["--rounds", str(ROUNDS), "--period", "0.05", "--batch-size", "8", "--limit", "1000"]


def test_three_peer_processes_gossip_over_tls_learn_and_stop_cleanly(tmp_path: Path) -> None:
    ids = ["h0", "h1", "h2"]
    ports = free_ports(3)
    roster = make_roster(tmp_path / "roster.json", {i: f"127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True)})
    _ca, material = make_test_pki(hosts=("127.0.0.1",), peers=ids)
    out = tmp_path / "out"
    peers = []
    for i, port in zip(ids, ports, strict=True):
        tls_dir = write_tls(tmp_path / "tls" / i, material[i])
        cmd = peer_command(i, f"127.0.0.1:{port}", roster, out, "--tls-dir", str(tls_dir), *FAST)
        peers.append(start_peer(cmd, i, out))
    codes = run_to_done(peers, 120)
    assert codes == [0, 0, 0], [p.output()[-1000:] for p in peers]
    assert not any(p.group_alive() for p in peers), "a peer left a process behind"
    for p in peers:
        s = p.status()
        others = set(ids) - {p.peer_id}
        assert s["state"] == "stopped" and s["tls"] is True
        assert s["steps"] == ROUNDS and s["error"] is None
        assert s["sent"] == 2 * ROUNDS and s["failed"] == 0  # fanout 2: both others, every step
        assert set(s["received_from"]) == others and min(s["received_from"].values()) > ROUNDS // 2
        assert s["received"] == sum(s["received_from"].values())
        assert s["mixes"].get("mixed", 0) > 0
        assert s["accuracy"] > 0.3, s["accuracy_log"]  # 10 classes: chance is 0.1
        assert s["accuracy"] > s["accuracy_log"][0]["accuracy"]  # it learned during the run
        assert " serving gossip on 127.0.0.1:" in p.output() and "(mutual TLS)" in p.output()


def test_a_peer_attacked_with_raw_frames_refuses_them_and_keeps_serving(tmp_path: Path) -> None:
    # One real peer; the roster's other member never comes up, so its sends fail and are counted.
    port, ghost = free_ports(2)
    roster = make_roster(tmp_path / "roster.json", {"target": f"127.0.0.1:{port}", "ghost": f"127.0.0.1:{ghost}"})
    out = tmp_path / "out"
    peer = start_peer(peer_command("target", f"127.0.0.1:{port}", roster, out, "--wait", "0", "--rounds", "2",
                                   "--period", "0.05", "--limit", "500"), "target", out)
    try:
        peer.wait_serving()
        wait_until(lambda: peer.status()["state"] == "done", 60, "the peer's two steps")
        push = f"/{codec.SERVICE_NAME}/PushUpdate"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(push)  # raw bytes, no serializer: what an attacker sends
            for frames in ([b"\xff\x00garbage"], [b"\x12\x03abc"], []):
                with pytest.raises(grpc.RpcError) as err:
                    call(iter(frames), timeout=5)
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        with GossipClient(f"127.0.0.1:{port}", timeout_s=1.0) as client:
            assert client.health() == "SERVING"
            version, state = client.get_model()  # an honest pull still works
        assert version == 2 and state
        wait_until(lambda: peer.status()["updated_at"] > peer.status()["started_at"] + 1, 10, "a fresh status")
        status = peer.status()
        assert status["received"] == 0  # nothing the attacker sent was accepted
        assert status["sent"] == 0 and status["failed"] == 2  # the ghost's two sends
        assert set(status["send_failures"]) == {"UNAVAILABLE"}
        code = peer.stop(signal.SIGINT)
    finally:
        if peer.proc.poll() is None:
            peer.stop(signal.SIGKILL)
    assert code == 130, peer.output()[-1000:]
    assert not peer.group_alive()
    assert peer.status()["state"] == "stopped"
