"""The bulk lane (p2p.bulk): large payloads over a raw TCP/TLS connection, real server on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from p2p import bulk, codec
from p2p.errors import TransportError
from p2p.guard import Limits
from p2p.tls import TlsMaterial, make_test_pki
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader

OFFER_PATH = f"/{codec.SERVICE_NAME}/OfferBulk"
SHAPES = {"w": (3000,), "b": (7,)}


class Recorder:
    """Records accepted updates with their callers; refuses repeats of an id."""

    def __init__(self) -> None:
        self.accepted: list[tuple[Update, int, object]] = []
        g = torch.Generator().manual_seed(9)
        self.model = {"w": torch.randn(3000, generator=g), "b": torch.randn(7, generator=g)}

    def schema(self) -> dict[str, tuple[int, ...]]:
        return SHAPES

    def accept_update(self, update: Update, wire_bytes: int, caller: object = None) -> None:
        from p2p.errors import DuplicateUpdate

        if any(u.header.update_id == update.header.update_id for u, _, _ in self.accepted):
            raise DuplicateUpdate(f"update {update.header.update_id!r} already accepted")
        self.accepted.append((update, wire_bytes, caller))

    def model_at(self, version: int | None, caller: object = None) -> tuple[int, dict[str, torch.Tensor]]:
        from p2p.errors import VersionNotFound

        if version not in (None, 5):
            raise VersionNotFound(f"version {version} not held")
        return 5, self.model


def update(update_id: str, *, sparse_share: float = 1.0, kind: str = "gradient") -> Update:
    g = torch.Generator().manual_seed(len(update_id))
    w = torch.randn(3000, generator=g)
    if sparse_share < 1.0:
        w[torch.rand(3000, generator=g) > sparse_share] = 0.0
    header = UpdateHeader(update_id, "h1", "h1", 1, 0, 4, kind=kind)
    return Update(header, {"w": w, "b": torch.randn(7, generator=g)})


@pytest.fixture(scope="module")
def pki() -> dict[str, TlsMaterial]:
    return make_test_pki(peers=("sink", "h1", "h2"))[1]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def serve(recorder: Recorder, tls: TlsMaterial | None = None, **kw: object) -> GossipServer:
    srv = GossipServer(recorder, "sink", tls=tls, **kw)  # type: ignore[arg-type]
    srv.start()
    return srv


@pytest.fixture
def server(recorder: Recorder) -> Iterator[GossipServer]:
    srv = serve(recorder)
    yield srv
    srv.stop(grace=0)


def offer(srv: GossipServer, u: Update) -> codec.BulkOffer:
    """A grant asked for by hand over gRPC, as a sender's first step."""
    header, _ = codec.update_to_bulk(u, sparse="never")
    with grpc.insecure_channel(srv.address) as ch:
        call = ch.unary_unary(OFFER_PATH, request_serializer=None, response_deserializer=codec.BulkOffer.FromString)
        return call(header, timeout=5)


def lane_result(port: int, data: bytes, *, close_after: bool = True) -> codec.BulkResult:
    """Write data to the lane and read its BulkResult."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if close_after:
            s.shutdown(socket.SHUT_WR)
        size = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        return codec.BulkResult.FromString(s.recv(size, socket.MSG_WAITALL))


def payload(u: Update) -> bytes:
    return b"".join(bytes(p) for p in codec.update_to_bulk(u, sparse="never")[1])


def wait_idle(srv: GossipServer) -> None:
    deadline = time.monotonic() + 5
    while srv.calls_in_progress and time.monotonic() < deadline:
        time.sleep(0.02)


def test_large_updates_take_the_lane_dense_and_sparse_and_arrive_exact(server: GossipServer, recorder: Recorder) -> None:
    dense, sparse = update("dense"), update("sparse", sparse_share=0.05)
    with GossipClient(server.address, bulk_min_bytes=1024) as c:
        sent = [c.push_update(dense), c.push_update(sparse)]
    assert server.bulk_received == 2
    for (got, wire, _), want, n in zip(recorder.accepted, (dense, sparse), sent, strict=True):
        assert got.header == want.header and wire == n
        for name in want.tensors:
            assert torch.equal(got.tensors[name], want.tensors[name])
    assert sent[1] < sent[0] / 5  # the sparse one went as (index, value) pairs
    assert server.calls_in_progress == 0


def test_small_updates_and_a_disabled_threshold_stay_on_the_stream(server: GossipServer, recorder: Recorder) -> None:
    with GossipClient(server.address) as c:  # default threshold 4 MiB: this update is 12 KB
        c.push_update(update("small"))
    with GossipClient(server.address, bulk_min_bytes=None) as c:
        c.push_update(update("off"))
    assert server.bulk_received == 0 and len(recorder.accepted) == 2


def test_mutual_tls_lane_names_the_certificate_s_peer(pki: dict[str, TlsMaterial], recorder: Recorder) -> None:
    srv = serve(recorder, pki["sink"])
    try:
        with GossipClient(srv.address, tls=pki["h1"], bulk_min_bytes=1024) as c:
            c.push_update(update("tls"))
    finally:
        srv.stop(grace=0)
    assert srv.bulk_received == 1
    assert recorder.accepted[0][2].peer_id == "h1"


def test_another_member_cannot_use_a_ticket_granted_to_h1(pki: dict[str, TlsMaterial], recorder: Recorder) -> None:
    import ssl

    srv = serve(recorder, pki["sink"])
    try:
        u = update("stolen")
        header, payloads = codec.update_to_bulk(u, sparse="never")
        creds = grpc.ssl_channel_credentials(pki["h1"].ca_pem, pki["h1"].key_pem, pki["h1"].cert_pem)
        with grpc.secure_channel(srv.address, creds) as ch:
            call = ch.unary_unary(OFFER_PATH, request_serializer=None, response_deserializer=codec.BulkOffer.FromString)
            grant = call(header, timeout=5)
        with pytest.raises(TransportError) as err:
            bulk.send("127.0.0.1", grant, payloads, timeout_s=5, context=bulk.client_context(pki["h2"]), server_name=None)
        assert err.value.code == "PERMISSION_DENIED" and "peer:h1" in err.value.details
        # The ticket is still h1's, and works for h1.
        ack = bulk.send("127.0.0.1", grant, payloads, timeout_s=5, context=bulk.client_context(pki["h1"]), server_name=None)
        assert ack.update_id == "stolen"
        # A plaintext connection to a TLS lane gets no answer.
        with pytest.raises((TransportError, ssl.SSLError, OSError)):
            bulk.send("127.0.0.1", grant, payloads, timeout_s=2, context=None, server_name=None)
    finally:
        srv.stop(grace=0)
    assert [u.header.update_id for u, _, _ in recorder.accepted] == ["stolen"]


@pytest.mark.parametrize(
    ("opening", "code"),
    [(b"XXXX" + bytes(16), "INVALID_ARGUMENT"), (bulk.MAGIC + bytes(16), "PERMISSION_DENIED"), (b"GL", "INVALID_ARGUMENT")],
)
def test_bad_openings_are_answered_and_change_nothing(server: GossipServer, recorder: Recorder, opening: bytes, code: str) -> None:
    result = lane_result(server.bulk_port or 0, opening)
    assert result.code == code and result.details
    assert recorder.accepted == [] and server.calls_in_progress == 0


def test_a_ticket_is_good_once(server: GossipServer, recorder: Recorder) -> None:
    u = update("once")
    grant = offer(server, u)
    assert server.calls_in_progress == 1  # the grant holds its caller's slot
    first = lane_result(grant.port, bulk.MAGIC + grant.ticket + payload(u))
    # The opening alone: the refusal comes before any payload is read (sending one would race the close).
    again = lane_result(grant.port, bulk.MAGIC + grant.ticket)
    assert first.code == "OK" and first.ack.update_id == "once"
    assert again.code == "PERMISSION_DENIED"
    assert len(recorder.accepted) == 1 and server.calls_in_progress == 0


def test_truncated_payload_is_refused_and_releases_the_slot(server: GossipServer, recorder: Recorder) -> None:
    u = update("short")
    grant = offer(server, u)
    result = lane_result(grant.port, bulk.MAGIC + grant.ticket + payload(u)[:-5])
    assert result.code == "INVALID_ARGUMENT" and "truncated" in result.details
    wait_idle(server)
    assert recorder.accepted == [] and server.calls_in_progress == 0


def test_stalled_payload_times_out(recorder: Recorder) -> None:
    srv = serve(recorder, limits=Limits(idle_s=0.3, total_s=1.0))
    try:
        u = update("stall")
        grant = offer(srv, u)
        result = lane_result(grant.port, bulk.MAGIC + grant.ticket + payload(u)[:100], close_after=False)
        assert result.code == "DEADLINE_EXCEEDED"
        wait_idle(srv)
        assert recorder.accepted == [] and srv.calls_in_progress == 0
    finally:
        srv.stop(grace=0)


def test_a_trickle_is_cut_at_the_total_limit(recorder: Recorder) -> None:
    srv = serve(recorder, limits=Limits(idle_s=0.4, total_s=0.8))
    try:
        u = update("trickle")
        grant = offer(srv, u)
        with socket.create_connection(("127.0.0.1", grant.port), timeout=10) as s:
            s.sendall(bulk.MAGIC + grant.ticket)
            t0 = time.monotonic()
            with pytest.raises(OSError):  # the receiver answers and closes while we still send
                for _ in range(40):  # one byte every 0.1 s: never idle, never done
                    s.sendall(b"x")
                    time.sleep(0.1)
            assert time.monotonic() - t0 < 3.0
        wait_idle(srv)
        assert recorder.accepted == [] and srv.calls_in_progress == 0
    finally:
        srv.stop(grace=0)


def test_unused_grants_expire_and_release_their_slots(recorder: Recorder) -> None:
    srv = serve(recorder, limits=Limits(idle_s=2.5, max_calls_per_caller=2))
    try:
        u = update("late")
        grants = [offer(srv, u), offer(srv, u)]
        with pytest.raises(grpc.RpcError) as err:  # both slots held by grants
            offer(srv, u)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert srv.calls_in_progress == 2
        time.sleep(2.5)  # the ttl; the accept loop expires grants every 0.5 s
        wait_idle(srv)
        assert srv.calls_in_progress == 0
        result = lane_result(grants[0].port, bulk.MAGIC + grants[0].ticket + payload(u))
        assert result.code == "PERMISSION_DENIED"
        offer(srv, u)  # a slot again
    finally:
        srv.stop(grace=0)
    assert recorder.accepted == []


def test_headers_are_checked_before_a_grant(server: GossipServer, recorder: Recorder) -> None:
    wrong = Update(UpdateHeader("shape", "h1", "h1", 1, 0, 4), {"w": torch.zeros(3001), "b": torch.zeros(7)})
    with GossipClient(server.address, bulk_min_bytes=1024) as c, pytest.raises(TransportError) as err:
        c.push_update(wrong)
    assert err.value.code == "INVALID_ARGUMENT" and "shape" in err.value.details
    assert server.calls_in_progress == 0 and recorder.accepted == []


def test_nan_model_message_and_a_repeat_are_refused_over_the_lane(server: GossipServer, recorder: Recorder) -> None:
    bad = update("nan", kind="model")
    bad.tensors["w"][5] = float("nan")
    with GossipClient(server.address, bulk_min_bytes=1024) as c:
        with pytest.raises(TransportError) as err:
            c.push_update(bad)
        assert err.value.code == "INVALID_ARGUMENT" and "NaN" in err.value.details
        c.push_update(update("twice"))
        with pytest.raises(TransportError) as err:
            c.push_update(update("twice"))
        assert err.value.code == "ALREADY_EXISTS"
    assert [u.header.update_id for u, _, _ in recorder.accepted] == ["twice"]
    assert server.bulk_received == 1


def test_a_receiver_without_a_lane_gets_the_stream(recorder: Recorder) -> None:
    srv = serve(recorder, bulk=False)
    try:
        with GossipClient(srv.address, bulk_min_bytes=1024) as c:
            c.push_update(update("a"))
            c.push_update(update("b"))
    finally:
        srv.stop(grace=0)
    assert srv.bulk_port is None
    assert [u.header.update_id for u, _, _ in recorder.accepted] == ["a", "b"]


def test_an_unreachable_lane_falls_back_to_the_stream(server: GossipServer, recorder: Recorder) -> None:
    server._lane.stop(grace=0)  # type: ignore[union-attr]  # the port offered no longer listens
    with GossipClient(server.address, bulk_min_bytes=1024) as c:
        c.push_update(update("fallback"))
    assert [u.header.update_id for u, _, _ in recorder.accepted] == ["fallback"]
    assert server.bulk_received == 0


def test_bad_client_flag_is_refused() -> None:
    with pytest.raises(ValueError, match="bulk_min_bytes"):
        GossipClient("127.0.0.1:1", bulk_min_bytes=-1)


def test_config_refuses_a_negative_threshold() -> None:
    from gradleak.config import ConfigError, GossipConfig

    with pytest.raises(ConfigError, match="bulk_min_bytes"):
        GossipConfig(bulk_min_bytes=-1).validate()
    GossipConfig(bulk_min_bytes=0).validate()  # 0: no lane


def test_model_pulls_take_the_lane_and_arrive_exact(pki: dict[str, TlsMaterial], recorder: Recorder) -> None:
    for tls in (None, pki["sink"]):
        srv = serve(recorder, tls)
        try:
            with GossipClient(srv.address, tls=pki["h1"] if tls else None, schema=SHAPES, bulk_min_bytes=1024) as c:
                version, state = c.get_model()
                assert c.get_model(5)[0] == 5
                with pytest.raises(TransportError) as err:
                    c.get_model(7)
                assert err.value.code == "NOT_FOUND"  # refused by OfferModel, as GetModel refuses it
        finally:
            srv.stop(grace=0)
        assert version == 5 and all(torch.equal(state[k], recorder.model[k]) for k in SHAPES)
        assert srv.bulk_served == 2 and srv.calls_in_progress == 0


def test_a_pull_ticket_is_good_once_and_only_as_a_pull(server: GossipServer) -> None:
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary(f"/{codec.SERVICE_NAME}/OfferModel", request_serializer=None,
                              response_deserializer=codec.ModelOffer.FromString)
        grant = call(b"", timeout=5)
    assert [s.name for s in grant.header.tensors] == ["w", "b"]
    assert lane_result(grant.port, bulk.MAGIC + grant.ticket).code == "PERMISSION_DENIED"  # a pull is no push
    buffers, decode = codec.check_model_header(grant.header, schema=SHAPES)
    bulk.pull("127.0.0.1", grant.ticket, grant.port, buffers, timeout_s=5, context=None, server_name=None)
    assert torch.equal(decode(buffers)["b"], server._servicer._handler.model["b"])  # type: ignore[attr-defined]
    with pytest.raises(TransportError) as err:
        bulk.pull("127.0.0.1", grant.ticket, grant.port, buffers, timeout_s=5, context=None, server_name=None)
    assert err.value.code == "PERMISSION_DENIED"
    wait_idle(server)
    assert server.calls_in_progress == 0


def test_an_offered_model_off_the_schema_is_refused_before_any_pull(server: GossipServer) -> None:
    from p2p.errors import MalformedMessage

    with (GossipClient(server.address, schema={"w": (3000,), "b": (8,)}, bulk_min_bytes=1024) as c,
          pytest.raises(MalformedMessage, match="shape")):
        c.get_model()
    assert server.bulk_served == 0


def test_pulls_from_a_holder_without_a_lane_use_the_stream(recorder: Recorder) -> None:
    srv = serve(recorder, bulk=False)
    try:
        with GossipClient(srv.address, schema=SHAPES, bulk_min_bytes=1024) as c:
            assert c.get_model()[0] == 5 and c.get_model()[0] == 5
    finally:
        srv.stop(grace=0)
