"""The bulk lane: a large update's payload over one TCP (or TLS) connection, outside gRPC.

Why: grpcio's Python API takes and gives `bytes`, so every payload is copied into and
out of its messages on top of the codec's own copies, and in Python its streams reach
0.3-0.5 of a raw socket's throughput on this class of machine however they are driven
(docs/benchmarks.md, transport). A payload read with `recv_into` straight into the
tensors' memory and written from views of them is as fast as the raw socket.

What stays in gRPC is everything that decides whether a payload is taken:

1. The sender calls OfferBulk with the update's header frame. The receiver admits the
   call under the same caps as a push (the grant holds its slot until the payload is
   in or the grant expires), runs every header check PushUpdate runs, and answers
   BulkOffer(ticket, port): 16 random bytes bound to the caller, good for one update
   and the idle limit.
2. The sender connects to that port on the host it dialled (mutual TLS with the same
   certificates when the gossip is TLS), writes MAGIC, the ticket, then each tensor's
   payload in header order, exactly the declared bytes.
3. The receiver claims the ticket (once), checks that the connection's caller is the
   ticket's (the peer id of its certificate under TLS, its host over plaintext), reads
   the declared bytes into freshly allocated buffers within the idle and total limits,
   decodes them as PushUpdate's chunks would be, hands the update to the handler, and
   answers a BulkResult (4-byte big-endian length, then the message).

Anything else (another magic, an unknown, expired or reused ticket, a caller that is
not the ticket's, a short payload, a stall) ends the connection with a BulkResult that
says why, and nothing reaches the handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from p2p import codec
from p2p.errors import MalformedMessage, PermissionDenied, TransportError
from p2p.guard import Admission, Limits
from p2p.identity import Caller, cert_peer_id
from p2p.update import Update

if TYPE_CHECKING:
    from p2p.tls import TlsMaterial

log = logging.getLogger(__name__)

MAGIC = b"GLB1"  # gradleak bulk lane, version 1: a push
PULL_MAGIC = b"GLM1"  # the same lane, a model pull
TICKET_BYTES = 16
_RESULT_LIMIT = 4096  # a BulkResult is a code, a clipped message and a receipt
_SPARE_CONNECTIONS = 4  # connections beyond the call cap, so refusals can still be answered


@dataclass(frozen=True)
class Grant:
    """One ticket: who may send which payload, until when."""

    caller: Caller
    pending: codec.PendingUpdate | None  # a push: the update whose payload is to come
    header_bytes: int
    expires: float  # time.monotonic()
    payloads: Sequence[np.ndarray] = ()  # a pull: the weights' payloads to send

    @property
    def magic(self) -> bytes:
        return MAGIC if self.pending is not None else PULL_MAGIC


class Tickets:
    """Grants by ticket; each holds one admission slot of its caller until claimed or expired."""

    def __init__(self, admission: Admission, ttl_s: float) -> None:
        self._admission = admission
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._grants: dict[bytes, Grant] = {}

    def grant(self, caller: Caller, pending: codec.PendingUpdate | None, header_bytes: int,
              payloads: Sequence[np.ndarray] = ()) -> bytes:
        """A new ticket for caller's push (pending) or pull (payloads).

        Raises:
            ResourceExhausted: when the server or this caller is at its call cap.
        """
        self.expire()
        self._admission.acquire(caller.key)  # released by claim's finish or by expire
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._grants[ticket] = Grant(caller, pending, header_bytes, time.monotonic() + self._ttl_s, payloads)
        return ticket

    def claim(self, ticket: bytes, caller: Caller, magic: bytes = MAGIC) -> Grant:
        """Take the grant of ticket for caller; its slot is released by `done`.

        Raises:
            PermissionDenied: for an unknown, expired or used ticket, another caller's, or
                a push ticket opened as a pull (or the reverse).
        """
        with self._lock:
            grant = self._grants.get(ticket)
            if grant is None or grant.expires < time.monotonic() or grant.magic != magic:
                raise PermissionDenied("unknown, expired or already used bulk ticket")
            if grant.caller.key != caller.key:
                # Left in place: the ticket's own caller may still use it.
                raise PermissionDenied(f"bulk ticket granted to {grant.caller.key}, not to {caller.key}")
            del self._grants[ticket]
        return grant

    def done(self, grant: Grant) -> None:
        """Release a claimed grant's slot."""
        self._admission.release(grant.caller.key)

    def expire(self) -> int:
        """Drop the grants past their time, releasing their slots; return how many."""
        now = time.monotonic()
        with self._lock:
            old = [t for t, g in self._grants.items() if g.expires < now]
            dropped = [self._grants.pop(t) for t in old]
        for g in dropped:
            self._admission.release(g.caller.key)
        return len(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._grants)


# A received update goes to deliver(update, wire_bytes, caller) (the handler's accept_update);
# status_of names the gRPC status code of whatever it raises.
Deliver = Callable[[Update, int, Caller], None]
StatusOf = Callable[[Exception], str]


class BulkLane:
    """The receiving end: a listening socket and a thread per connection (bounded)."""

    def __init__(
        self, host: str, port: int, tls: TlsMaterial | None, limits: Limits, tickets: Tickets,
        deliver: Deliver, status_of: StatusOf,
    ) -> None:
        self._limits = limits
        self._tickets = tickets
        self._deliver = deliver
        self._status_of = status_of
        self._ssl = server_context(tls) if tls is not None else None
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host.strip("[]"), port))
        except OSError as exc:
            self._sock.close()
            raise OSError(f"cannot bind the bulk lane on {host}:{port}: {exc}") from exc
        self._sock.listen(64)
        self._sock.settimeout(0.5)  # the accept loop wakes to expire grants and to stop
        self.port: int = self._sock.getsockname()[1]
        self.received = 0  # updates delivered over the lane
        self.served = 0  # model pulls answered over the lane
        self._slots = threading.BoundedSemaphore(limits.max_calls + _SPARE_CONNECTIONS)
        self._stopped = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept_loop, name="bulk-accept", daemon=True)

    def start(self) -> None:
        self._accepter.start()

    def stop(self, grace: float = 1.0) -> None:
        """Stop accepting; connections in progress get up to grace seconds to finish."""
        self._stopped.set()
        self._accepter.join(timeout=2.0)
        self._sock.close()
        deadline = time.monotonic() + grace
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            self._tickets.expire()
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()  # over the cap: refused at once, as gRPC refuses calls past its queue
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr), name="bulk-conn", daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            conn.settimeout(self._limits.idle_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream: socket.socket = conn
            if self._ssl is not None:
                stream = self._ssl.wrap_socket(conn, server_side=True)
            self._dispatch(stream, _caller(stream, addr))
        except (OSError, ssl.SSLError) as exc:  # the sender went away or failed its handshake
            log.debug("bulk connection from %s ended: %s", addr, exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _dispatch(self, stream: socket.socket, caller: Caller) -> None:
        """Read the opening, claim its ticket, then take a push or serve a pull."""
        try:
            opening = _read_exact(stream, len(MAGIC) + TICKET_BYTES, time.monotonic() + self._limits.idle_s)
            magic = bytes(opening[: len(MAGIC)])
            if magic not in (MAGIC, PULL_MAGIC):
                raise MalformedMessage("not a bulk lane opening (bad magic)")
            grant = self._tickets.claim(bytes(opening[len(MAGIC):]), caller, magic)
        except Exception as exc:  # noqa: BLE001  # every refusal is answered, never a crash
            _reply(stream, self._code(exc), _details(exc), None)
            return
        if grant.pending is None:
            try:  # a pull: the answer first, then exactly the declared bytes
                _reply(stream, "OK", "", None)
                for p in grant.payloads:
                    stream.sendall(p.data.cast("B"))
                with self._lock:
                    self.served += 1
            finally:
                self._tickets.done(grant)
            return
        _reply(stream, *self._receive(stream, grant))

    def _receive(self, stream: socket.socket, grant: Grant) -> tuple[str, str, codec.PushAck | None]:
        """Read a push's payload and hand it over; return (code, details, receipt)."""
        assert grant.pending is not None
        try:
            deadline = time.monotonic() + self._limits.total_s
            buffers = grant.pending.buffers()
            for buf in buffers:
                _read_into(stream, buf.numpy(), deadline)
            update = grant.pending.finish(buffers)
            wire = grant.header_bytes + grant.pending.payload_bytes
            self._deliver(update, wire, grant.caller)
            with self._lock:
                self.received += 1
        except Exception as exc:  # noqa: BLE001  # every failure becomes an answer, never a crash
            return self._code(exc), _details(exc), None
        finally:
            self._tickets.done(grant)
        return "OK", "", codec.push_ack(update.header.update_id, wire)


    def _code(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError):
            return "DEADLINE_EXCEEDED"
        code = self._status_of(exc)
        if code == "INTERNAL":
            log.error("bulk receive failed", exc_info=exc)
        return code


def _details(exc: Exception) -> str:
    text = f"bulk: {type(exc).__name__}: {exc}"
    return text if len(text) <= 512 else text[:512] + "..."


def _caller(stream: socket.socket, addr: tuple[str, int]) -> Caller:
    """The connection's caller, named as gRPC names its peers ("ipv4:host:port")."""
    host, port = addr[0], addr[1]
    address = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    if isinstance(stream, ssl.SSLSocket):
        der = stream.getpeercert(binary_form=True)
        if der:
            return Caller(address, cert_peer_id(ssl.DER_cert_to_PEM_cert(der).encode()))
    return Caller(address)


def _read_exact(stream: socket.socket, n: int, deadline: float) -> bytearray:
    buf = bytearray(n)
    _read_into(stream, np.frombuffer(buf, dtype=np.uint8), deadline)
    return buf


def _read_into(stream: socket.socket, out: np.ndarray, deadline: float) -> None:
    """Fill out (a uint8 array) from stream; each read waits at most the socket's timeout.

    Raises:
        MalformedMessage: when the sender closes before out is full.
        TimeoutError: when a read stalls or the deadline passes.
    """
    view = memoryview(out.data).cast("B")
    got, n, reads = 0, len(view), 0
    while got < n:
        k = stream.recv_into(view[got:], min(n - got, 16 << 20))
        if k == 0:
            raise MalformedMessage(f"bulk payload truncated: {got} of {n} bytes")
        got += k
        reads += 1
        # A TLS read returns one 16 KiB record: the clock is read on short reads (a
        # trickle) and every 64th, not on each of a 45 MB payload's ~2,700 reads.
        if (k < 4096 or not reads % 64) and time.monotonic() > deadline:
            raise TimeoutError(f"bulk payload not in within the time limit ({got} of {n} bytes)")


def _reply(stream: socket.socket, code: str, details: str, ack: codec.PushAck | None) -> None:
    result = codec.BulkResult(code=code, details=details)
    if ack is not None:
        result.ack.CopyFrom(ack)
    body = result.SerializeToString()
    stream.sendall(struct.pack(">I", len(body)) + body)


# ----------------------------------------------------------------------- sending


class LaneUnreachable(TransportError):
    """The lane's port did not take a connection: nothing was sent, the stream may be used."""


def _connect(host: str, port: int, timeout_s: float, context: ssl.SSLContext | None,
             server_name: str | None) -> tuple[socket.socket, socket.socket]:
    """(raw socket, stream to use: the TLS one when context is given).

    Raises:
        LaneUnreachable: when the port takes no connection.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise LaneUnreachable("UNAVAILABLE", f"bulk lane {host}:{port} unreachable: {exc}") from exc
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = context.wrap_socket(raw, server_hostname=server_name or host) if context is not None else raw
    except ssl.SSLError as exc:
        raw.close()
        raise TransportError("UNAVAILABLE", f"bulk lane TLS failed: {exc}") from exc
    except OSError as exc:
        raw.close()
        raise TransportError("UNAVAILABLE", f"bulk lane broke: {exc}") from exc
    return raw, stream


def _check_offer(ticket: bytes, port: int) -> None:
    if len(ticket) != TICKET_BYTES or not 0 < port < 65536:
        raise TransportError("DATA_LOSS", f"bad bulk offer: ticket of {len(ticket)} bytes, port {port}")


def send(
    host: str, offer: codec.BulkOffer, payloads: Sequence[np.ndarray], *, timeout_s: float,
    context: ssl.SSLContext | None, server_name: str | None,
) -> codec.PushAck:
    """Send payloads over the lane offer grants; return the receiver's receipt.

    Raises:
        TransportError: UNAVAILABLE when the lane cannot be reached or breaks, else the
            receiver's status code name with its details.
    """
    _check_offer(offer.ticket, offer.port)
    deadline = time.monotonic() + timeout_s
    raw, stream = _connect(host, offer.port, timeout_s, context, server_name)
    try:
        try:
            stream.sendall(MAGIC + offer.ticket)
            for p in payloads:
                stream.sendall(p.data.cast("B"))
        except OSError as exc:  # the receiver refused and closed: its answer may be in
            try:
                result = _read_result(stream, deadline)
            except (OSError, TransportError):
                raise TransportError("UNAVAILABLE", f"bulk lane broke while sending: {exc}") from exc
        else:
            result = _read_result(stream, deadline)
    except OSError as exc:  # ssl.SSLError included
        raise TransportError("UNAVAILABLE", f"bulk lane broke: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            raw.close()
    if result.code != "OK":
        raise TransportError(result.code or "UNKNOWN", result.details)
    return result.ack


def pull(
    host: str, ticket: bytes, port: int, buffers: Sequence[torch.Tensor], *, timeout_s: float,
    context: ssl.SSLContext | None, server_name: str | None,
) -> None:
    """Fill buffers (uint8, as the offered header declares) from the lane's pull.

    Raises:
        LaneUnreachable: when the port takes no connection.
        TransportError: the holder's refusal, or UNAVAILABLE / DEADLINE_EXCEEDED when the
            lane breaks or stalls before every byte is in.
    """
    _check_offer(ticket, port)
    deadline = time.monotonic() + timeout_s
    raw, stream = _connect(host, port, timeout_s, context, server_name)
    try:
        stream.sendall(PULL_MAGIC + ticket)
        result = _read_result(stream, deadline)
        if result.code != "OK":
            raise TransportError(result.code or "UNKNOWN", result.details)
        for buf in buffers:
            _read_into(stream, buf.numpy(), deadline)
    except MalformedMessage as exc:  # the holder closed early
        raise TransportError("UNAVAILABLE", f"bulk pull: {exc}") from exc
    except TimeoutError as exc:
        raise TransportError("DEADLINE_EXCEEDED", f"bulk pull stalled: {exc}") from exc
    except OSError as exc:
        raise TransportError("UNAVAILABLE", f"bulk pull broke: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            raw.close()


def _read_result(stream: socket.socket, deadline: float) -> codec.BulkResult:
    stream.settimeout(max(0.01, deadline - time.monotonic()))
    (size,) = struct.unpack(">I", bytes(_read_exact_or_fail(stream, 4, deadline)))
    if size > _RESULT_LIMIT:
        raise TransportError("DATA_LOSS", f"bulk result of {size} bytes, limit {_RESULT_LIMIT}")
    body = bytes(_read_exact_or_fail(stream, size, deadline))
    try:
        return codec.BulkResult.FromString(body)
    except Exception as exc:  # protobuf's DecodeError, or anything a hostile receiver causes
        raise TransportError("DATA_LOSS", f"bulk result does not parse: {exc}") from exc


def _read_exact_or_fail(stream: socket.socket, n: int, deadline: float) -> bytearray:
    try:
        return _read_exact(stream, n, deadline)
    except MalformedMessage as exc:
        raise TransportError("UNAVAILABLE", f"bulk lane closed before its answer: {exc}") from exc


# ----------------------------------------------------------------------- TLS


def _with_files(tls: TlsMaterial, load: Callable[[str, str], None]) -> None:
    """Python's ssl loads a certificate chain from files only: a private directory that
    lives for the call."""
    with tempfile.TemporaryDirectory(prefix="gradleak-bulk-") as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert, tls.cert_pem), (key, tls.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        load(cert, key)


def server_context(tls: TlsMaterial) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _with_files(tls, lambda c, k: ctx.load_cert_chain(c, k))
    ctx.load_verify_locations(cadata=tls.ca_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual, as the gRPC server requires
    return ctx


def client_context(tls: TlsMaterial) -> ssl.SSLContext:
    """The sender's context: presents tls's certificate, verifies the receiver's and its name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=tls.ca_pem.decode())
    _with_files(tls, lambda c, k: ctx.load_cert_chain(c, k))
    return ctx


def dense_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of an update's tensors sent dense: what decides whether it takes the lane."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
