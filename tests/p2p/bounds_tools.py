"""Tools of tests/p2p/test_bounds.py: a schema'd handler, stalled streams, a raw HTTP/2
stream, a PKI whose certificates name their peers, and a victim server in a child
process whose memory can be read from outside."""

from __future__ import annotations

import datetime as dt
import ipaddress
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2p import codec
from p2p.guard import Limits
from p2p.identity import PEER_URI_PREFIX, Caller
from p2p.tls import TlsMaterial
from p2p.transport import GossipServer
from p2p.update import Update, UpdateHeader

PUSH_PATH = f"/{codec.SERVICE_NAME}/PushUpdate"
MODEL_PATH = f"/{codec.SERVICE_NAME}/GetModel"
# The shapes of the 16x16 LeNet of the live runs (gradleak.core.models, 1 channel).
LENET = {
    "features.0.weight": (12, 1, 5, 5), "features.0.bias": (12,),
    "features.2.weight": (12, 12, 5, 5), "features.2.bias": (12,),
    "features.4.weight": (12, 12, 5, 5), "features.4.bias": (12,),
    "classifier.weight": (10, 192), "classifier.bias": (10,),
}


class SchemaHandler:
    """An UpdateHandler with a schema that records what it accepts."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.accepted: list[str] = []
        self.callers: list[Caller | None] = []
        self._lock = threading.Lock()

    def schema(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def accept_update(self, update: Update, wire_bytes: int, caller: Caller | None = None) -> None:
        with self._lock:
            self.accepted.append(update.header.update_id)
            self.callers.append(caller)

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        return 1, {n: torch.zeros(s) for n, s in self.shapes.items()}


def honest_update(update_id: str, shapes: dict[str, tuple[int, ...]] = LENET) -> Update:
    gen = torch.Generator().manual_seed(len(update_id))
    header = UpdateHeader(update_id, "peer-1", "peer-1", 1, 0, 4, "none", 1.0)
    return Update(header, {n: torch.randn(s, generator=gen) for n, s in shapes.items()})


def frames_of(update: Update, chunk_bytes: int = 1 << 20) -> list[bytes]:
    return [f.SerializeToString() for f in codec.update_to_frames(update, chunk_bytes=chunk_bytes)]


class Stall:
    """A request iterator that sends `first` and then nothing until released."""

    def __init__(self, first: list[bytes], release: threading.Event) -> None:
        self._first = list(first)
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._first
        self._release.wait(60)


def open_stalled(
    channel: grpc.Channel, n: int, release: threading.Event, first: list[bytes] | None = None,
    path: str = PUSH_PATH, timeout: float = 60.0,
) -> list[grpc.Future]:
    """n calls on channel that send `first` (default: nothing) and then stall."""
    if path == MODEL_PATH:
        call = channel.stream_stream(path)
        return [call(iter(Stall(first or [], release)), timeout=timeout) for _ in range(n)]
    push = channel.stream_unary(path)
    return [push.future(iter(Stall(first or [], release)), timeout=timeout) for _ in range(n)]


def code_of(future: Any, timeout: float) -> tuple[grpc.StatusCode, str]:
    """Wait for a call's end and return its status code and details."""
    try:
        if hasattr(future, "result"):
            future.result(timeout=timeout)
        else:
            list(future)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


# -------------------------------------------------------------- raw HTTP/2 stream


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    # HPACK literal header field without indexing, new name, no Huffman coding.
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


class RawStream:
    """One HTTP/2 stream to a plaintext gRPC server, written byte by byte if need be."""

    def __init__(self, port: int, path: str = PUSH_PATH) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                  (b":authority", f"127.0.0.1:{port}".encode()),
                  (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        self.sock.sendall(_frame(1, 0x4, 1, b"".join(_literal(k, v) for k, v in fields)))
        self._buffer = b""
        self.ended = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(_frame(0, 0, 1, data))

    def poll(self) -> bool:
        """Read what arrived; True once the server ended stream 1 (trailers or RST_STREAM)."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.ended = True
                    break
                self._buffer += chunk
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        while len(self._buffer) >= 9:
            size = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + size:
                break
            kind, flags = self._buffer[3], self._buffer[4]
            stream = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
            self._buffer = self._buffer[9 + size:]
            if kind == 4 and not flags & 1:  # the server's SETTINGS: acknowledge them
                self.sock.sendall(_frame(4, 1, 0, b""))
            if stream == 1 and (kind == 3 or (kind == 1 and flags & 1)):
                self.ended = True
        return self.ended

    def close(self) -> None:
        self.sock.close()


# -------------------------------------------------------------- PKI naming peers


def pki(peers: list[str]) -> dict[str, TlsMaterial]:
    """A CA and one certificate per peer naming it (gradleak://peer/<id>) for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bounds test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    out = {}
    for peer in peers:
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.UniformResourceIdentifier(PEER_URI_PREFIX + peer),
        ])
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(san, critical=False)
                .sign(ca_key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        out[peer] = TlsMaterial(ca_pem, cert.public_bytes(serialization.Encoding.PEM), key_pem)
    return out


def secure_channel(address: str, tls: TlsMaterial) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
    return grpc.secure_channel(address, creds)


# -------------------------------------------------------------- victim process


def _serve(shapes: dict[str, tuple[int, ...]], tls: TlsMaterial | None, limits: dict[str, Any],
           conn: Any) -> None:
    handler = SchemaHandler(shapes)
    server = GossipServer(handler, "victim", tls=tls, limits=Limits(**limits))
    conn.send(server.start())
    while True:
        command = conn.recv()
        if command == "accepted":
            conn.send(list(handler.accepted))
        elif command == "in_progress":
            conn.send(server.calls_in_progress)
        else:
            server.stop(0)
            conn.send(None)
            return


class Victim:
    """A GossipServer in a child process (spawned: never fork with gRPC threads)."""

    def __init__(self, tls: TlsMaterial | None, limits: dict[str, Any],
                 shapes: dict[str, tuple[int, ...]] = LENET) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(shapes, tls, limits, child_end), daemon=True)
        self.process.start()
        if not self._conn.poll(120):
            raise RuntimeError("the victim server did not start")
        self.port = self._conn.recv()
        self.address = f"127.0.0.1:{self.port}"

    def ask(self, command: str) -> Any:
        self._conn.send(command)
        return self._conn.recv()

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc status")

    def rss(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    def peak(self) -> int:
        return self._status("VmHWM")

    def stop(self) -> None:
        try:
            self.ask("stop")
        finally:
            self.process.join(10)
            if self.process.is_alive():
                os.kill(self.process.pid, 9)


def wait_until(predicate: Any, timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def push_status(server: GossipServer, tls: TlsMaterial | None, update: Update) -> str:
    """The status name a push of update gets from server ("OK" when accepted)."""
    from p2p.errors import TransportError
    from p2p.transport import GossipClient

    with GossipClient(server.address, tls=tls, timeout_s=5.0) as client:
        try:
            client.push_update(update)
        except TransportError as exc:
            return exc.code
    return "OK"
