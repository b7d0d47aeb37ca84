"""Fuzz and soak: 10,000 generated hostile messages against a real `gradleak peer` process.

The target serves gossip under mutual TLS to a roster of three honest members (h1-h3,
whose updates the test sends with their own certificates) and one malicious member
(mallory), from whose certificate every broken message comes (tests/integration/fuzz.py:
malformed frames, wrong schemas, extreme numbers, spoofed identities, replays). Beside
the stream: stalled and trickling streams held open the whole time, and bursts of
concurrent calls. Asserted throughout and at the end:

- every broken message gets a non-OK status other than INTERNAL/UNKNOWN (no crash path);
- every honest push succeeds, bursts and stalls included;
- health answers SERVING within 1 s at every probe;
- the peer's accepted count equals the honest pushes' (no rejected message changed its
  state), its model stays finite, and its RSS grows less than 50 MB.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2p.proto import gossip_pb2 as pb
from p2p.tls import TlsMaterial, make_test_pki, write_tls
from p2p.transport import GossipClient

from .fuzz import PUSH, Message, Traffic
from .peers import free_ports, make_roster, peer_command, start_peer, wait_until

pytestmark = pytest.mark.integration

MESSAGES = 10_000
ROUNDS = 20_000  # the target's own steps; also the highest round it accepts from anyone
CRASH = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _channel(address: str, tls: TlsMaterial) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem, private_key=tls.key_pem,
                                         certificate_chain=tls.cert_pem)
    return grpc.secure_channel(address, creds)


def _push(channel: grpc.Channel, frames: Iterator[bytes] | list[bytes], timeout: float = 10.0) -> grpc.StatusCode:
    try:
        channel.stream_unary(PUSH)(iter(frames), timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


class Soak:
    """Holds the channels and the tallies; every check failure is kept, not raised in a thread."""

    def __init__(self, address: str, material: dict[str, TlsMaterial], honest: list[str]) -> None:
        self.address = address
        self.channels = {p: _channel(address, material[p]) for p in [*honest, "mallory"]}
        self.codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.problems: list[str] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.health_probes = 0

    def send(self, msg: Message) -> None:
        channel = self.channels[msg.origin] if msg.expect == "accept" else self.channels["mallory"]
        code = _push(channel, msg.frames)
        with self.lock:
            self.codes[msg.kind][code.name] += 1
            if code is grpc.StatusCode.OK:
                self.accepted += 1
            if msg.expect == "accept" and code is not grpc.StatusCode.OK:
                self.problems.append(f"honest push from {msg.origin} got {code.name}")
            elif code in CRASH or (msg.expect == "reject" and code is grpc.StatusCode.OK):
                self.problems.append(f"{msg.kind} got {code.name}")

    def stalled(self, header: bytes, trickle: bool) -> None:
        """Keep one stream open: a header, then nothing (or a tiny chunk every 2 s), until cut."""
        def frames() -> Iterator[bytes]:
            yield header
            k = 0
            while not self.stop.is_set():
                if self.stop.wait(2.0 if trickle else 0.5):
                    return
                if trickle:
                    yield pb.UpdateFrame(chunk=pb.Chunk(tensor_index=0, offset=k, data=b"\x00")).SerializeToString()
                    k += 1
        while not self.stop.is_set():
            code = _push(self.channels["mallory"], frames(), timeout=60)
            with self.lock:
                self.codes["stalled" if not trickle else "trickle"][code.name] += 1
                if code is grpc.StatusCode.OK or code in CRASH:
                    self.problems.append(f"a {'trickling' if trickle else 'stalled'} stream got {code.name}")

    def watch_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels["h1"])
        while not self.stop.wait(0.5):
            t0 = time.monotonic()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                ok = status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as exc:
                ok, status = False, exc.code().name
            with self.lock:
                self.health_probes += 1
                if not ok or time.monotonic() - t0 > 1.0:
                    self.problems.append(f"health: {status} after {time.monotonic() - t0:.2f} s")


def test_ten_thousand_hostile_messages_leave_the_peer_serving_and_unchanged(tmp_path: Path) -> None:
    honest = ["h1", "h2", "h3"]
    ids = ["target", *honest, "mallory"]
    ports = free_ports(len(ids))
    roster = make_roster(tmp_path / "roster.json", {i: f"127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True)})
    _ca, material = make_test_pki(hosts=("127.0.0.1",), peers=ids)
    out = tmp_path / "out"
    tls_dir = write_tls(tmp_path / "tls", material["target"])
    # Only the target runs: the others' addresses never answer, so its own sends fail fast.
    peer = start_peer(peer_command("target", f"127.0.0.1:{ports[0]}", roster, out, "--tls-dir", str(tls_dir),
                                   "--wait", "0", "--rounds", str(ROUNDS), "--period", "0.05", "--limit", "600"),
                      "target", out)
    address = f"127.0.0.1:{ports[0]}"
    soak = Soak(address, material, honest)
    threads: list[threading.Thread] = []
    try:
        peer.wait_serving()
        wait_until(lambda: peer.status_path.exists(), 30, "the target's status file")
        with GossipClient(address, tls=material["h1"], timeout_s=5) as client:
            _v, state = client.get_model()
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        traffic = Traffic(shapes, "target", honest, seed=11, max_round=ROUNDS, attacker="mallory")
        stream = traffic.stream(MESSAGES, honest_every=10)
        for _ in range(200):  # warm-up: the RSS baseline is taken with every code path loaded
            soak.send(next(stream))
        rss0 = _rss_mb(peer.proc.pid)
        header = traffic.honest().frames[0]  # a valid header whose chunks never come
        threads = [threading.Thread(target=soak.watch_health, daemon=True)]
        threads += [threading.Thread(target=soak.stalled, args=(header, k % 2 == 1), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            for k, msg in enumerate(stream, start=200):
                soak.send(msg)
                if k % 1000 == 0:  # a burst: 24 broken calls at once, and an honest push from each member
                    burst = [next(stream) for _ in range(24)] + [traffic.honest() for _ in honest]
                    list(pool.map(soak.send, burst))
                assert time.monotonic() - t0 < 300, "the soak ran past its time bound"
        seconds = time.monotonic() - t0
        rss1 = _rss_mb(peer.proc.pid)
        with GossipClient(address, tls=material["h2"], timeout_s=5) as client:
            _v, state = client.get_model()
        # The status file is rewritten every second: wait for one written after the last push.
        done = time.time()
        wait_until(lambda: peer.status()["updated_at"] > done + 0.1, 10, "a fresh status file")
        received = peer.status()["received"]
    finally:
        soak.stop.set()
        for t in threads:
            t.join(5)
        peer.stop()
    sent = sum(sum(c.values()) for c in soak.codes.values())
    print(f"\n{sent} calls in {seconds:.0f} s; RSS {rss0:.0f} -> {rss1:.0f} MB; "
          f"{soak.health_probes} health probes")
    for kind, codes in sorted(soak.codes.items()):
        print(f"  {kind:<20} {dict(codes)}")
    assert not soak.problems, soak.problems[:20]
    assert sent >= MESSAGES and soak.health_probes >= 10
    assert soak.codes["honest"]["OK"] >= MESSAGES // 10
    assert received == soak.accepted, "a refused message changed the peer's count of accepted updates"
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    assert all(math.isfinite(float(t.abs().max())) for t in state.values())
    assert rss1 - rss0 < 50, f"RSS grew {rss1 - rss0:.0f} MB"
