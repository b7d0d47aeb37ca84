"""gRPC adapter of the gossip protocol: a thin server and client around p2p.codec.

No tensor maths here: the server parses frames, hands the decoded update to an
`UpdateHandler` and maps domain errors to status codes; the client encodes, sends
and maps RPC errors to `TransportError`.

Both ends run over plaintext by default, or over mutual TLS when given a
`p2p.tls.TlsMaterial`: the server then requires a client certificate issued by its
CA, and the client verifies the server's certificate against the same CA (and the
dialled host against the certificate's subject alternative names). TLS hides updates
from a network eavesdropper, not from the receiving peer, which decrypts them.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2p import bulk as bulk_lane
from p2p import codec
from p2p.errors import (
    DuplicateUpdate,
    MalformedMessage,
    PermissionDenied,
    ResourceExhausted,
    TransportError,
    Unauthenticated,
    UpdateRejected,
    VersionNotFound,
)
from p2p.guard import Admission, Limits, StreamExpired, Ticket, Watchdog
from p2p.identity import Caller, caller_of, is_loopback_host
from p2p.update import Update

if TYPE_CHECKING:  # only attributes are read, so plaintext needs no cryptography import
    from p2p.tls import TlsMaterial

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# Domain error -> status code; the first matching class wins. Anything else is INTERNAL.
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (MalformedMessage, grpc.StatusCode.INVALID_ARGUMENT),
    (UpdateRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (DuplicateUpdate, grpc.StatusCode.ALREADY_EXISTS),
    (VersionNotFound, grpc.StatusCode.NOT_FOUND),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
_HEALTH_SERVICES = ("", codec.SERVICE_NAME)
_HEALTH_NAME = "grpc.health.v1.Health"
_MAX_DETAILS = 512  # error details echo attacker-chosen names: keep them short
# Updates of at least this many payload bytes take the bulk lane (p2p.bulk) where the
# receiver has one: below it, gRPC's per-push costs are small beside the payload's.
BULK_MIN_BYTES = 4 << 20


class UpdateHandler(Protocol):
    """The peer logic behind a GossipServer."""

    def accept_update(self, update: Update, wire_bytes: int, caller: Caller | None = None) -> None:
        """Take a decoded update from caller; raise a GossipError (UpdateRejected,
        DuplicateUpdate, PermissionDenied, ...) to refuse it."""

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """Return (version, weights) at version, or the latest for None, to caller.

        The weights are streamed after this returns, so they must not change in place
        meanwhile: return a retained snapshot, not the live parameters.

        Raises:
            VersionNotFound: when that version is not (or no longer) held.
        """

    def schema(self) -> dict[str, tuple[int, ...]] | None:
        """The model's parameters, {name: shape}, which every update must match.

        The server checks each update's header against it before anything is
        allocated, and derives its size and frame limits from it. None (or a handler
        without this method, as in older tests) leaves structural checks only.
        """


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options that raise gRPC's 4 MiB default message limits."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _status_of(exc: Exception) -> grpc.StatusCode:
    """Map a raised exception to the status code the peer gets."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _guarded(context: grpc.ServicerContext, what: str, fn: Callable[[], _T]) -> _T:
    """Run fn; on failure abort the RPC with the mapped status and a clear message."""
    try:
        return fn()
    except Exception as exc:  # every failure must become a status, never a crash
        code = _status_of(exc)
        # The client cancelled, its deadline passed, or the watchdog ended the call.
        if isinstance(exc, StreamExpired) or not context.is_active():
            code, details = grpc.StatusCode.CANCELLED, f"{what}: the call ended early"
        elif code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", what)
            details = f"{what}: internal error ({type(exc).__name__})"
        else:
            details = f"{what}: {type(exc).__name__}: {exc}"
    context.abort(code, _clip(details))
    raise AssertionError("unreachable: context.abort raises")


def _clip(details: str) -> str:
    """Error details no longer than _MAX_DETAILS characters."""
    if len(details) <= _MAX_DETAILS:
        return details
    return f"{details[:_MAX_DETAILS]}... ({len(details)} characters)"


def _schema_of(handler: UpdateHandler) -> codec.Schema | None:
    """The handler's {name: shape}, or None for a handler without a schema."""
    get = getattr(handler, "schema", None)
    schema = get() if get is not None else None
    if schema is None:
        return None
    return {name: tuple(shape) for name, shape in schema.items()}


class _GossipServicer:
    """Translates RPCs into handler calls; requests arrive as raw bytes.

    Every call is admitted (or refused at once) before it reads anything, and watched
    until its last frame; only a complete, checked update reaches the handler.
    """

    def __init__(
        self, handler: UpdateHandler, peer_id: str, chunk_bytes: int, limits: Limits,
        watchdog: Watchdog, max_update_bytes: int | None, bulk: bool = False,
    ) -> None:
        self._handler = handler
        self.bulk = bulk
        self.lane: bulk_lane.BulkLane | None = None  # set by GossipServer.start
        self.tickets: bulk_lane.Tickets | None = None
        self._peer_id = peer_id
        self._chunk_bytes = chunk_bytes
        self._limits = limits
        self._watchdog = watchdog
        self._admission = Admission(limits.max_calls, limits.max_calls_per_caller, "gossip")
        self._schema = _schema_of(handler)
        self._dtypes = codec.UPDATE_DTYPES if self._schema is not None else None
        if max_update_bytes is not None:
            self._max_update_bytes = max_update_bytes
        elif self._schema is not None:
            self._max_update_bytes = codec.max_update_bytes(self._schema)
        else:
            self._max_update_bytes = codec.DEFAULT_MAX_BYTES
        self._max_frames = limits.max_frames
        if self._max_frames is None and self._schema is not None:
            self._max_frames = codec.max_update_frames(self._schema, limits.min_chunk_bytes)
        self._max_header_bytes = codec.max_header_bytes(self._schema)

    @property
    def max_update_bytes(self) -> int:
        return self._max_update_bytes

    @property
    def in_progress(self) -> int:
        return self._admission.in_progress

    def open_lane(self, host: str, port: int, tls: TlsMaterial | None) -> bulk_lane.BulkLane:
        """Bind the bulk lane; its grants share this servicer's call caps."""
        self.tickets = bulk_lane.Tickets(self._admission, self._limits.idle_s)
        self.lane = bulk_lane.BulkLane(
            host, port, tls, self._limits, self.tickets, self._handler.accept_update,
            lambda exc: _status_of(exc).name,
        )
        return self.lane

    def _watch(self, context: grpc.ServicerContext, what: str) -> AbstractContextManager[Ticket]:
        return self._watchdog.watch(context, what, self._limits.idle_s, self._limits.total_s)

    def push_update(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Decode the streamed update, then (and only then) hand it to the handler."""
        received = [0]
        caller = caller_of(context)

        def frames(ticket: Ticket) -> Iterator[codec.UpdateFrame | codec.RawChunk]:
            first = True
            for raw in requests:
                ticket.touch()
                received[0] += len(raw)
                if first:
                    self._check_header_size(raw)
                first = False
                yield codec.parse_update_frame(raw)
            ticket.touch()  # a cancelled call also ends the stream: never use what it sent

        def run() -> str:
            # The handler's work counts against the caps too, not only the frames'.
            with self._admission.admit(caller.key):
                with self._watch(context, "PushUpdate") as ticket:
                    update = codec.update_from_frames(
                        frames(ticket), max_bytes=self._max_update_bytes, schema=self._schema,
                        dtypes=self._dtypes, max_frames=self._max_frames,
                        min_chunk_bytes=self._limits.min_chunk_bytes,
                    )
                ticket.touch()  # raises if the watchdog won the race to the end of the stream
                self._handler.accept_update(update, received[0], caller)
            return update.header.update_id

        update_id = _guarded(context, "PushUpdate", run)
        return codec.push_ack(update_id, received[0]).SerializeToString()

    def _check_header_size(self, raw: bytes) -> None:
        if len(raw) > self._max_header_bytes:
            raise MalformedMessage(f"header frame of {len(raw)} bytes, limit {self._max_header_bytes} for this model")

    def _serving_lane(self) -> tuple[bulk_lane.BulkLane, bulk_lane.Tickets]:
        if self.lane is None or self.tickets is None:
            raise ResourceExhausted("the bulk lane is not serving")
        return self.lane, self.tickets

    def offer_bulk(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Check an update's header frame and grant a bulk lane for its payload (p2p.bulk)."""
        caller = caller_of(context)

        def run() -> codec.BulkOffer:
            lane, tickets = self._serving_lane()
            with self._admission.admit(caller.key), self._watch(context, "OfferBulk") as ticket:
                raw = _one_request(requests, ticket)
            self._check_header_size(raw)
            frame = codec.parse_update_frame(raw)
            if isinstance(frame, codec.RawChunk):
                raise MalformedMessage("OfferBulk takes a header frame, got a chunk")
            pending = codec.check_update_header(
                frame, max_bytes=self._max_update_bytes, schema=self._schema, dtypes=self._dtypes
            )
            return codec.BulkOffer(ticket=tickets.grant(caller, pending, len(raw)), port=lane.port)

        return _guarded(context, "OfferBulk", run).SerializeToString()

    def offer_model(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """GetModel's header and a bulk lane ticket for its payloads (p2p.bulk)."""
        caller = caller_of(context)

        def run() -> codec.ModelOffer:
            lane, tickets = self._serving_lane()
            with self._admission.admit(caller.key), self._watch(context, "OfferModel") as ticket:
                request = _one_request(requests, ticket)
                version, state = self._handler.model_at(codec.parse_model_request(request), caller)
            header, payloads = codec.model_to_bulk(self._peer_id, version, state)
            # The grant keeps the snapshot's tensors until the pull or the ttl (model_at's contract).
            granted = tickets.grant(caller, None, 0, payloads)
            return codec.ModelOffer(header=header, ticket=granted, port=lane.port)

        return _guarded(context, "OfferModel", run).SerializeToString()

    def get_model(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Stream the handler's weights at the requested version.

        The request is read as a stream (the wire is the same for one message), so a
        caller that never sends it holds an admitted, watched call, not a bare thread.
        """
        caller = caller_of(context)
        _guarded(context, "GetModel", lambda: self._admission.acquire(caller.key))
        try:
            with self._watch(context, "GetModel") as ticket:

                def run() -> Iterator[bytes]:
                    request = _one_request(requests, ticket)
                    version, state = self._handler.model_at(codec.parse_model_request(request), caller)
                    frames = codec.model_to_wire(
                        self._peer_id, version, state, chunk_bytes=self._chunk_bytes
                    )
                    # The header frame encodes every tensor, so anything that can fail fails
                    # here, inside the guard; the chunks after it are plain slices.
                    first = next(frames)
                    return itertools.chain((first,), frames)

                for frame in _guarded(context, "GetModel", run):
                    ticket.touch()  # a reader that stops reading stalls here: watched too
                    yield frame
        finally:
            self._admission.release(caller.key)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Register both RPCs without deserializers, so bad bytes map to INVALID_ARGUMENT.

        Both read their requests as streams: a unary request is read by gRPC in a
        server thread before any handler code runs, where no limit could reach it.
        """
        methods = {
            "PushUpdate": grpc.stream_unary_rpc_method_handler(self.push_update),
            "GetModel": grpc.stream_stream_rpc_method_handler(self.get_model),
        }
        if self.bulk:  # else OfferBulk answers UNIMPLEMENTED and senders stream
            methods["OfferBulk"] = grpc.stream_unary_rpc_method_handler(self.offer_bulk)
            methods["OfferModel"] = grpc.stream_unary_rpc_method_handler(self.offer_model)
        return grpc.method_handlers_generic_handler(codec.SERVICE_NAME, methods)


def _one_request(requests: Iterator[bytes], ticket: Ticket) -> bytes:
    """The single request message of a call read as a stream."""
    first = next(requests, None)
    ticket.touch()
    if first is None:
        raise MalformedMessage("the call sent no request message")
    if next(requests, None) is not None:
        raise MalformedMessage("the call sent more than one request message")
    ticket.touch()
    return first


class _Health:
    """The standard health service's Check, on a budget of its own.

    Read as a stream and watched like the gossip calls, so that stalled checks cannot
    hold its threads; Watch (a stream that lasts as long as the client likes) is not
    offered and answers UNIMPLEMENTED.
    """

    def __init__(self, limits: Limits, watchdog: Watchdog) -> None:
        self._limits = limits
        self._watchdog = watchdog
        self._admission = Admission(limits.max_health_calls, limits.max_health_calls, "health")
        self._lock = threading.Lock()
        self._status: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {}

    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        with self._lock:
            self._status[service] = status

    def check(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        def run() -> health_pb2.HealthCheckResponse.ServingStatus | None:
            limit = self._limits.health_s
            with self._admission.admit(""), self._watchdog.watch(context, "Check", limit, limit) as t:
                raw = _one_request(requests, t)
            request = codec.parse_health_request(raw)
            with self._lock:
                return self._status.get(request.service)

        status = _guarded(context, "Check", run)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "Check: unknown service")
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            _HEALTH_NAME, {"Check": grpc.stream_unary_rpc_method_handler(self.check)}
        )


class GossipServer:
    """A peer's gRPC endpoint: PushUpdate, GetModel and the standard health Check.

    What one caller can make it do is bounded by limits (p2p.guard.Limits: concurrent
    calls in all and per caller, idle and total time per call, chunk sizes and frame
    counts); an update is checked against the handler's schema() when it has one, and
    max_update_bytes is derived from that schema unless given. Every call runs in a
    thread of its own, sized so that health checks and honest calls still get one
    while the caps are full; past twice that, gRPC itself refuses calls.
    """

    def __init__(
        self,
        handler: UpdateHandler,
        peer_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = 8 << 20,
        max_update_bytes: int | None = None,
        chunk_bytes: int = 1 << 20,
        tls: TlsMaterial | None = None,
        insecure: bool = False,
        limits: Limits | None = None,
        bulk: bool = True,
        bulk_port: int = 0,
    ) -> None:
        if tls is None and not insecure and not is_loopback_host(host):
            # Refused before anything binds: plaintext lets anyone who reaches it read and forge updates.
            raise ValueError(f"plaintext gossip on non-loopback address {host}: give TLS material, or insecure=True")
        self._host = host
        self._port = port
        self._tls = tls
        self.limits = limits or Limits()
        workers = self.limits.workers
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gossip"),
            options=_size_options(max_message_bytes),
            maximum_concurrent_rpcs=2 * workers,  # a bound on calls queued for a thread
        )
        self._watchdog = Watchdog()
        self._servicer = _GossipServicer(
            handler, peer_id, chunk_bytes, self.limits, self._watchdog, max_update_bytes, bulk
        )
        self._bulk_port = bulk_port
        self._lane: bulk_lane.BulkLane | None = None
        self._health = _Health(self.limits, self._watchdog)
        self._server.add_generic_rpc_handlers(
            (self._servicer.generic_handler(), self._health.generic_handler())
        )

    @property
    def max_update_bytes(self) -> int:
        """The largest update this server takes (derived from the schema unless given)."""
        return self._servicer.max_update_bytes

    @property
    def calls_in_progress(self) -> int:
        """Gossip calls admitted and not yet done."""
        return self._servicer.in_progress

    def start(self) -> int:
        """Bind, start serving and return the bound port.

        Raises:
            OSError: when the address cannot be bound.
        """
        target = f"{_host_literal(self._host)}:{self._port}"
        try:
            if self._tls is None:
                bound = self._server.add_insecure_port(target)
            else:
                bound = self._server.add_secure_port(target, _server_credentials(self._tls))
        except RuntimeError as exc:  # grpcio raises RuntimeError on a failed bind
            raise OSError(f"cannot bind {self._host}:{self._port}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot bind {self._host}:{self._port}")
        self._port = bound
        if self._servicer.bulk:
            self._lane = self._servicer.open_lane(self._host, self._bulk_port, self._tls)
            self._lane.start()
        self._watchdog.start()
        self._server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return bound

    @property
    def bulk_port(self) -> int | None:
        """The bulk lane's port after start (None when it is off)."""
        return self._lane.port if self._lane is not None else None

    @property
    def bulk_received(self) -> int:
        """Updates that arrived over the bulk lane."""
        return self._lane.received if self._lane is not None else 0

    @property
    def bulk_served(self) -> int:
        """Model pulls answered over the bulk lane."""
        return self._lane.served if self._lane is not None else 0

    @property
    def secure(self) -> bool:
        """True when the server accepts only mutual-TLS connections."""
        return self._tls is not None

    @property
    def address(self) -> str:
        """The "host:port" clients dial (port is the bound one after start)."""
        return f"{_host_literal(self._host)}:{self._port}"

    def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING, then stop, letting in-flight RPCs finish within grace."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace).wait()
        if self._lane is not None:
            self._lane.stop(grace)
        self._watchdog.stop()

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Set the same status for the whole server and the gossip service."""
        for service in _HEALTH_SERVICES:
            self._health.set(service, status)


def _server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """Server credentials that require and verify a client certificate from tls's CA."""
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
    )


def _host_literal(host: str) -> str:
    """Bracket an IPv6 literal so that it can be followed by ":port"."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class GossipClient:
    """Talks to one peer's GossipServer; every call has a deadline.

    With tls, the channel presents tls's certificate and accepts only a server whose
    certificate is issued by tls's CA for the dialled host, or for server_name when
    given (for dialling an address the certificate does not name, e.g. via a proxy).
    With schema (the puller's own {name: shape}), a pulled model must be exactly those
    tensors, checked before anything is allocated: the server may be the attacker.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        max_message_bytes: int = 8 << 20,
        chunk_bytes: int = 1 << 20,
        max_model_bytes: int = 256 << 20,
        tls: TlsMaterial | None = None,
        server_name: str | None = None,
        schema: codec.Schema | None = None,
        bulk_min_bytes: int | None = BULK_MIN_BYTES,
    ) -> None:
        if server_name is not None and tls is None:
            raise ValueError("server_name needs tls: a plaintext channel verifies no name")
        if bulk_min_bytes is not None and bulk_min_bytes < 0:
            raise ValueError(f"bulk_min_bytes must be >= 0 or None, got {bulk_min_bytes}")
        # The bulk lane (p2p.bulk) carries payloads of at least bulk_min_bytes, where the
        # receiver offers one and the dialled address names a host it can be reached on.
        self._bulk_min_bytes = bulk_min_bytes
        self._bulk_host = _host_of(address)
        self._server_name = server_name
        self._bulk_context = None if tls is None or bulk_min_bytes is None else bulk_lane.client_context(tls)
        self._timeout_s = timeout_s
        self._chunk_bytes = chunk_bytes
        self._max_model_bytes = max_model_bytes
        self._schema = schema
        options: list[tuple[str, int | str]] = [*_size_options(max_message_bytes)]
        if tls is None:
            self._hint = f"plaintext channel to {address}; a peer that requires TLS closes it"
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca_pem,
                private_key=tls.key_pem,
                certificate_chain=tls.cert_pem,
            )
            self._hint = (
                f"mutual TLS to {address}: a handshake fails unless both certificates come "
                "from the same CA and the server's names the dialled host"
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        # Frames go out and come in as bytes: the codec serializes and parses chunk
        # frames itself, with fewer copies than protobuf (see p2p.codec).
        service = f"/{codec.SERVICE_NAME}"
        self._push = self._channel.stream_unary(
            f"{service}/PushUpdate", request_serializer=None,
            response_deserializer=codec.PushAck.FromString, _registered_method=True,
        )
        self._offer_bulk = self._channel.unary_unary(
            f"{service}/OfferBulk", request_serializer=None,
            response_deserializer=codec.BulkOffer.FromString, _registered_method=True,
        )
        self._offer_model = self._channel.unary_unary(
            f"{service}/OfferModel", request_serializer=codec.ModelRequest.SerializeToString,
            response_deserializer=codec.ModelOffer.FromString, _registered_method=True,
        )
        self._pull_bulk_ok = True  # cleared when the holder has no lane for pulls
        self._get_model = self._channel.unary_stream(
            f"{service}/GetModel", request_serializer=codec.ModelRequest.SerializeToString,
            response_deserializer=None, _registered_method=True,
        )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def push_update(self, update: Update, *, sparse: str = "auto") -> int:
        """Send an update and return the bytes sent (sum of the frames' serialized sizes).

        Raises:
            TransportError: when the RPC fails or the receipt does not match.
        """
        sent = [0]
        wire: Iterator[bytes] | None = None
        size = bulk_lane.dense_bytes(update.tensors)
        if self._bulk_min_bytes is not None and self._bulk_host is not None and size >= self._bulk_min_bytes:
            header, payloads = codec.update_to_bulk(update, sparse=sparse)
            if sum(p.size for p in payloads) >= self._bulk_min_bytes:
                done = self._push_bulk(update.header.update_id, header, payloads)
                if done is not None:
                    return done
            wire = codec.wire_frames(header, payloads, self._chunk_bytes)

        def frames() -> Iterator[bytes]:
            source = wire or codec.update_to_wire(update, chunk_bytes=self._chunk_bytes, sparse=sparse)
            for frame in source:
                sent[0] += len(frame)
                yield frame

        ack = _call(lambda: self._push(frames(), timeout=self._timeout_s), self._hint)
        if ack.update_id != update.header.update_id or ack.bytes_received != sent[0]:
            raise TransportError(
                "DATA_LOSS",
                f"receipt {ack.update_id!r}/{ack.bytes_received} bytes does not match "
                f"{update.header.update_id!r}/{sent[0]} bytes sent",
            )
        return sent[0]

    def _push_bulk(self, update_id: str, header: bytes, payloads: list[np.ndarray]) -> int | None:
        """Send over the receiver's bulk lane; None when it has none (then it is not asked again).

        Raises:
            TransportError: when the receiver refuses the update or the lane breaks.
        """
        host = self._bulk_host
        assert host is not None  # push_update checks it
        try:
            offer = _call(lambda: self._offer_bulk(header, timeout=self._timeout_s), self._hint)
            ack = bulk_lane.send(host, offer, payloads, timeout_s=self._timeout_s,
                                 context=self._bulk_context, server_name=self._server_name)
        except bulk_lane.LaneUnreachable as exc:
            log.warning("%s; pushing over gRPC streams from now on", exc.details)
            self._bulk_min_bytes = None
            return None
        except TransportError as exc:
            if exc.code != "UNIMPLEMENTED":
                raise
            self._bulk_min_bytes = None  # an older or bulk-less receiver
            return None
        sent = len(header) + sum(p.size for p in payloads)
        if ack.update_id != update_id or ack.bytes_received != sent:
            raise TransportError(
                "DATA_LOSS",
                f"receipt {ack.update_id!r}/{ack.bytes_received} bytes does not match {update_id!r}/{sent} bytes sent",
            )
        return sent

    def _pulls_by_lane(self) -> bool:
        """Whether a pull should try the lane: a model of at least bulk_min_bytes (float32
        by the schema; without one its size is unknown) from a holder that may have one."""
        if self._bulk_min_bytes is None or self._bulk_host is None or self._schema is None or not self._pull_bulk_ok:
            return False
        return 4 * sum(math.prod(shape) for shape in self._schema.values()) >= self._bulk_min_bytes

    def _pull_bulk(self, version: int | None) -> tuple[int, dict[str, torch.Tensor]] | None:
        """A pull over the holder's lane; None when it has none (it is not asked again)."""
        host = self._bulk_host
        assert host is not None
        try:
            offer = _call(lambda: self._offer_model(codec.model_request(version), timeout=self._timeout_s), self._hint)
        except TransportError as exc:
            if exc.code != "UNIMPLEMENTED":
                raise
            self._pull_bulk_ok = False
            return None
        buffers, decode = codec.check_model_header(offer.header, max_bytes=self._max_model_bytes, schema=self._schema)
        try:
            bulk_lane.pull(host, offer.ticket, offer.port, buffers, timeout_s=self._timeout_s,
                           context=self._bulk_context, server_name=self._server_name)
        except bulk_lane.LaneUnreachable as exc:
            log.warning("%s; pulling over gRPC streams from now on", exc.details)
            self._pull_bulk_ok = False
            return None
        return offer.header.model_version, decode(buffers)

    def get_model(self, version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """Fetch the peer's weights at version (None: latest); return (version, state).

        Raises:
            TransportError: when the RPC fails (NOT_FOUND for a version not held).
            MalformedMessage: when the peer's frames do not decode.
        """

        if self._pulls_by_lane():
            pulled = self._pull_bulk(version)
            if pulled is not None:
                return pulled

        def fetch() -> tuple[str, int, dict[str, torch.Tensor]]:
            raw = self._get_model(codec.model_request(version), timeout=self._timeout_s)
            frames = (codec.parse_model_frame(r) for r in raw)
            return codec.model_from_frames(frames, max_bytes=self._max_model_bytes, schema=self._schema)

        _, got, state = _call(fetch, self._hint)
        return got, state

    def health(self) -> str:
        """Return the gossip service's health status name, e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=codec.SERVICE_NAME)
        response = _call(lambda: self._health.Check(request, timeout=self._timeout_s), self._hint)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> Self:
        """Return the client itself; it is closed on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the channel."""
        self.close()


def _host_of(address: str) -> str | None:
    """The host of a "host:port" or "[v6]:port" address; None for other target forms."""
    if "/" in address:  # a gRPC target URI (dns:///, unix:, ...): no host to dial directly
        return None
    if address.startswith("["):
        end = address.find("]")
        return address[1:end] if end > 1 else None
    host, sep, port = address.rpartition(":")
    return host if sep and host and ":" not in host and port.isdigit() else None


def _call(fn: Callable[[], _T], unavailable_hint: str = "") -> _T:
    """Run an RPC, raising its failure as TransportError(code name, details).

    unavailable_hint is appended to the details of an UNAVAILABLE failure only: gRPC
    reports a refused TLS handshake as a bare "Socket closed".
    """
    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        if code is grpc.StatusCode.UNAVAILABLE and unavailable_hint:
            details = f"{details} ({unavailable_hint})"
        raise TransportError(code.name, details) from exc
