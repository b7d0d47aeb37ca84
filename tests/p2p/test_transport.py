"""The gRPC transport against a real server on 127.0.0.1 (in-process and across processes)."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2p import codec
from p2p.errors import DuplicateUpdate, TransportError, UpdateRejected, VersionNotFound
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader

PUSH_PATH = f"/{codec.SERVICE_NAME}/PushUpdate"


class RecordingHandler:
    """Records accepted updates and holds two model versions."""

    def __init__(self) -> None:
        self.accepted: list[tuple[Update, int]] = []
        self.models = {
            1: {"w": torch.zeros(2, 3), "b": torch.tensor([1.0, -0.0])},
            2: {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
        }
        self.release = threading.Event()  # unblocks the update id "slow"

    def accept_update(self, update: Update, wire_bytes: int, caller: object = None) -> None:
        """Refuse on purpose for some ids, otherwise record."""
        update_id = update.header.update_id
        if update_id == "slow":
            self.release.wait(10)
        if update_id == "boom":
            raise RuntimeError("handler bug")
        if update.header.num_samples <= 0:
            raise UpdateRejected("num_samples must be positive")
        if any(u.header.update_id == update_id for u, _ in self.accepted):
            raise DuplicateUpdate(f"update {update_id!r} already accepted")
        self.accepted.append((update, wire_bytes))

    def model_at(self, version: int | None, caller: object = None) -> tuple[int, dict[str, torch.Tensor]]:
        """The requested version, or the latest."""
        version = max(self.models) if version is None else version
        if version not in self.models:
            raise VersionNotFound(f"version {version} not held")
        return version, self.models[version]


def make_update(update_id: str = "u-1", num_samples: int = 8, numel: int = 10) -> Update:
    """A small update with a sparse-friendly and a dense tensor."""
    pruned = torch.zeros(numel)
    pruned[::3] = torch.arange(len(pruned[::3]), dtype=torch.float32) + 1
    header = UpdateHeader(update_id, "peer-a", "peer-a", 1, 2, num_samples, "prune:0.5", 0.5)
    return Update(header, {"w": pruned, "b": torch.randn(numel, dtype=torch.float16)})


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes and values (bitwise via equal on same dtype)."""
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name], tensor), name


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def server(handler: RecordingHandler) -> Iterator[GossipServer]:
    srv = GossipServer(handler, "peer-b", port=0)
    srv.start()
    yield srv
    handler.release.set()
    srv.stop(grace=0)


@pytest.fixture
def client(server: GossipServer) -> Iterator[GossipClient]:
    with GossipClient(server.address, timeout_s=5.0) as c:
        yield c


def test_push_roundtrip_reaches_handler_exactly(
    client: GossipClient, handler: RecordingHandler
) -> None:
    update = make_update()
    sent = client.push_update(update)
    [(got, wire_bytes)] = handler.accepted
    assert got.header == update.header
    assert_same_tensors(got.tensors, update.tensors)
    assert wire_bytes == sent > 0


def test_push_beyond_grpc_default_message_limit(
    client: GossipClient, handler: RecordingHandler
) -> None:
    update = make_update("big", numel=1_600_000)  # ~6 MiB float32 + 3 MiB float16
    sent = client.push_update(update, sparse="never")
    assert sent > 6 << 20
    assert_same_tensors(handler.accepted[0][0].tensors, update.tensors)


def test_single_frames_above_4_mib_pass_when_both_ends_allow_them(
    handler: RecordingHandler,
) -> None:
    # One 6 MiB chunk per frame: only passes if both ends raised gRPC's 4 MiB limits.
    handler.models[3] = {"w": torch.randn(1_600_000)}
    srv = GossipServer(handler, "peer-b", chunk_bytes=7 << 20)
    srv.start()
    try:
        with GossipClient(srv.address, chunk_bytes=7 << 20, bulk_min_bytes=None) as c:  # the gRPC stream
            c.push_update(make_update("one-frame", numel=1_600_000), sparse="never")
            version, state = c.get_model()
    finally:
        srv.stop(grace=0)
    assert version == 3
    assert torch.equal(state["w"], handler.models[3]["w"])
    assert handler.accepted[0][0].header.update_id == "one-frame"


def test_frame_above_the_server_limit_is_refused(handler: RecordingHandler) -> None:
    srv = GossipServer(handler, "peer-b", max_message_bytes=1 << 20)
    srv.start()
    try:
        with (
            GossipClient(srv.address, chunk_bytes=2 << 20, bulk_min_bytes=None) as c,
            pytest.raises(TransportError) as err,
        ):
            c.push_update(make_update("too-big-frame", numel=1_000_000), sparse="never")
    finally:
        srv.stop(grace=0)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert handler.accepted == []


def test_get_model_latest_and_by_version(client: GossipClient, handler: RecordingHandler) -> None:
    version, state = client.get_model()
    assert version == 2
    assert_same_tensors(state, handler.models[2])
    version, state = client.get_model(1)
    assert version == 1
    assert_same_tensors(state, handler.models[1])
    assert torch.signbit(state["b"][1])


def test_get_model_missing_version_is_not_found(client: GossipClient) -> None:
    with pytest.raises(TransportError) as err:
        client.get_model(99)
    assert err.value.code == "NOT_FOUND"
    assert "99" in err.value.details


def push_raw(address: str, payloads: list[bytes]) -> grpc.RpcError:
    """Send raw frame bytes as a PushUpdate stream and return the RPC error."""
    with grpc.insecure_channel(address) as channel:
        push = channel.stream_unary(PUSH_PATH)
        with pytest.raises(grpc.RpcError) as err:
            push(iter(payloads), timeout=5.0)
    return err.value


def wrong_byte_length() -> list[bytes]:
    """Frames of a valid update whose first tensor declares 4 bytes too many."""
    frames = list(codec.update_to_frames(make_update("bad"), sparse="never"))
    frames[0].header.tensors[0].byte_length += 4
    return [f.SerializeToString() for f in frames]


@pytest.mark.parametrize(
    "payloads",
    [[b"\xff\xff\xff\xff"], wrong_byte_length()],
    ids=["garbage-bytes", "wrong-byte-length"],
)
def test_malformed_stream_is_invalid_argument_and_changes_nothing(
    server: GossipServer, client: GossipClient, handler: RecordingHandler, payloads: list[bytes]
) -> None:
    error: Any = push_raw(server.address, payloads)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "MalformedMessage" in error.details()
    assert handler.accepted == []
    client.push_update(make_update("after"))  # the server keeps serving
    assert [u.header.update_id for u, _ in handler.accepted] == ["after"]


def test_handler_rejection_is_invalid_argument(
    client: GossipClient, handler: RecordingHandler
) -> None:
    with pytest.raises(TransportError) as err:
        client.push_update(make_update(num_samples=0))
    assert err.value.code == "INVALID_ARGUMENT"
    assert "num_samples must be positive" in err.value.details
    assert handler.accepted == []


def test_duplicate_update_is_already_exists(
    client: GossipClient, handler: RecordingHandler
) -> None:
    client.push_update(make_update("dup"))
    with pytest.raises(TransportError) as err:
        client.push_update(make_update("dup"))
    assert err.value.code == "ALREADY_EXISTS"
    assert len(handler.accepted) == 1


def test_unexpected_handler_error_is_internal_and_server_survives(
    client: GossipClient, handler: RecordingHandler
) -> None:
    with pytest.raises(TransportError) as err:
        client.push_update(make_update("boom"))
    assert err.value.code == "INTERNAL"
    assert "handler bug" not in err.value.details  # internals stay in the server log
    client.push_update(make_update("fine"))
    assert len(handler.accepted) == 1


def test_push_has_a_deadline(server: GossipServer) -> None:
    with GossipClient(server.address, timeout_s=0.3) as c:
        start = time.monotonic()
        with pytest.raises(TransportError) as err:
            c.push_update(make_update("slow"))
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - start < 3.0


def test_health_is_serving_while_up(server: GossipServer, client: GossipClient) -> None:
    assert client.health() == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        whole = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5.0
        )
    assert whole.status == health_pb2.HealthCheckResponse.SERVING


def test_stopped_server_is_unavailable(handler: RecordingHandler) -> None:
    srv = GossipServer(handler, "peer-b")
    srv.start()
    with GossipClient(srv.address, timeout_s=2.0) as c:
        assert c.health() == "SERVING"
        srv.stop(grace=0)
        with pytest.raises(TransportError) as err:
            c.health()
    assert err.value.code == "UNAVAILABLE"


def free_port() -> int:
    """A port that was free a moment ago and has nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_closed_port_is_unavailable_within_the_deadline() -> None:
    start = time.monotonic()
    with (
        GossipClient(f"127.0.0.1:{free_port()}", timeout_s=2.0) as c,
        pytest.raises(TransportError) as err,
    ):
        c.push_update(make_update())
    assert err.value.code == "UNAVAILABLE"
    assert time.monotonic() - start < 2.5


def _serve_in_child(ports: Any, received: Any, stop: Any) -> None:
    """Child process: serve a handler that reports what it accepts to the parent."""

    class Reporting(RecordingHandler):
        def accept_update(self, update: Update, wire_bytes: int, caller: object = None) -> None:
            received.put((update.header.update_id, wire_bytes, update.tensors["w"].tolist()))

    server = GossipServer(Reporting(), "child-peer")
    ports.put(server.start())
    stop.wait(60)
    server.stop(grace=0)


@pytest.mark.integration
def test_push_and_pull_between_processes() -> None:
    ctx = mp.get_context("spawn")  # never fork a process that may run gRPC threads
    ports, received, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve_in_child, args=(ports, received, stop), daemon=True)
    child.start()
    try:
        port = ports.get(timeout=60)
        update = make_update("cross-process")
        with GossipClient(f"127.0.0.1:{port}", timeout_s=10.0) as c:
            sent = c.push_update(update)
            version, state = c.get_model()
        assert received.get(timeout=10) == ("cross-process", sent, update.tensors["w"].tolist())
        assert version == 2
        assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))
    finally:
        stop.set()
        child.join(timeout=20)
        if child.is_alive():
            child.terminate()
    assert child.exitcode == 0
