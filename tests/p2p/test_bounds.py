"""Bounded work and state on the transport (issue 11, item 3): each finding replayed
with raw gRPC / HTTP/2 frames against a real GossipServer on 127.0.0.1.

Each attack must now get a precise status while the server keeps serving: a health
check SERVING within 1 s and an honest push accepted during the attack, and nothing
the attack sent reaching the handler. Memory is read from a victim server in a child
process (its RSS, and its peak since a reset)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from bounds_tools import (
    LENET,
    MODEL_PATH,
    PUSH_PATH,
    RawStream,
    SchemaHandler,
    Victim,
    code_of,
    frames_of,
    honest_update,
    open_stalled,
    pki,
    secure_channel,
    wait_until,
)
from test_codec import MALFORMATIONS, good_frames

from p2p import codec
from p2p.errors import MalformedMessage, TransportError, UpdateRejected
from p2p.guard import Limits
from p2p.tls import TlsMaterial
from p2p.transport import GossipClient, GossipServer

FAST = Limits(idle_s=1.0, total_s=5.0)
MiB = 1 << 20


@pytest.fixture
def handler() -> SchemaHandler:
    return SchemaHandler(LENET)


def serve(handler: SchemaHandler, limits: Limits = FAST, tls: TlsMaterial | None = None) -> GossipServer:
    server = GossipServer(handler, "victim", limits=limits, tls=tls)
    server.start()
    return server


def assert_serving(address: str, tls: TlsMaterial | None = None) -> None:
    """Health answers SERVING within 1 s and an honest push is accepted."""
    with GossipClient(address, timeout_s=1.0, tls=tls) as client:
        start = time.monotonic()
        assert client.health() == "SERVING"
        assert time.monotonic() - start < 1.0
    with GossipClient(address, timeout_s=5.0, tls=tls) as client:
        client.push_update(honest_update(f"honest-{time.monotonic_ns()}"))


# ------------------------------------------------------------------ stalled streams


def test_stalled_pushes_are_cut_at_the_idle_limit_while_the_server_serves(handler: SchemaHandler) -> None:
    # Finding: 4 streams that send a header then stall took the peer offline for good.
    server = serve(handler)
    release = threading.Event()
    header = frames_of(honest_update("stalled"))[:1]
    try:
        with grpc.insecure_channel(server.address) as channel:
            stalled = open_stalled(channel, 4, release, first=header)
            time.sleep(0.2)
            assert_serving(server.address)
            start = time.monotonic()
            results = [code_of(f, timeout=5) for f in stalled]
            waited = time.monotonic() - start
    finally:
        release.set()
        server.stop(0)
    assert {code for code, _ in results} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert all("idle limit" in details for _, details in results)
    assert waited < FAST.idle_s + 1.0
    assert len(handler.accepted) == 1 and handler.accepted[0].startswith("honest")


def test_trickled_bytes_are_cut_at_the_idle_limit(handler: SchemaHandler) -> None:
    # Finding: one byte every 2 s kept a stream (and its thread) forever. Bytes that
    # never complete a message are no progress: the idle limit counts frames.
    server = serve(handler)
    port = int(server.address.rsplit(":", 1)[1])
    streams = [RawStream(port) for _ in range(4)]
    try:
        for s in streams:
            s.send(b"\x00" + (100).to_bytes(4, "big"))  # a 100-byte message follows...
        start = time.monotonic()
        assert_serving(server.address)
        while not all(s.poll() for s in streams) and time.monotonic() - start < 4.0:
            for s in streams:
                if not s.ended:
                    s.send(b"\x08")  # ...one byte at a time
            time.sleep(0.3)
        waited = time.monotonic() - start
    finally:
        for s in streams:
            s.close()
        server.stop(0)
    assert all(s.ended for s in streams)
    assert waited < FAST.idle_s + 1.5
    assert len(handler.accepted) == 1


def test_frames_sent_just_under_the_idle_limit_hit_the_total_limit(handler: SchemaHandler) -> None:
    server = serve(handler, Limits(idle_s=1.0, total_s=2.0))
    frames = frames_of(honest_update("slow-drip"), chunk_bytes=1024)

    def drip() -> Iterator[bytes]:
        for raw in frames:
            yield raw
            time.sleep(0.3)

    try:
        with grpc.insecure_channel(server.address) as channel:
            start = time.monotonic()
            code, details = code_of(channel.stream_unary(PUSH_PATH).future(drip(), timeout=30), 10)
            waited = time.monotonic() - start
    finally:
        server.stop(0)
    assert len(frames) * 0.3 > 4.0  # would have taken twice the limit
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "limit per call" in details
    assert waited < 3.5
    assert handler.accepted == []


def test_stalled_model_pulls_and_health_checks_are_cut(handler: SchemaHandler) -> None:
    # Their requests are read under the same limits, not by gRPC before any limit runs.
    server = serve(handler, Limits(idle_s=1.0, health_s=0.5))
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            pulls = open_stalled(channel, 3, release, path=MODEL_PATH)
            checks = open_stalled(channel, 3, release, path="/grpc.health.v1.Health/Check")
            time.sleep(0.1)
            assert_serving(server.address)
            results = [code_of(f, timeout=5) for f in pulls + checks]
    finally:
        release.set()
        server.stop(0)
    assert {code for code, _ in results} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert all(d.startswith(("GetModel", "Check")) for _, d in results)


# ------------------------------------------------------------------ caps


def test_calls_over_the_server_cap_are_refused_at_once(handler: SchemaHandler) -> None:
    server = serve(handler, Limits(max_calls=3, idle_s=30.0, total_s=60.0))
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stalled = open_stalled(channel, 3, release)
            assert wait_until(lambda: server.calls_in_progress == 3, 2.0)
            start = time.monotonic()
            with GossipClient(server.address, timeout_s=5.0) as client:
                with pytest.raises(Exception) as push:
                    client.push_update(honest_update("over-cap"))
                with pytest.raises(Exception) as pull:
                    client.get_model()
                refused_in = time.monotonic() - start
                assert client.health() == "SERVING"  # its own budget
            release.set()
            [code_of(f, timeout=5) for f in stalled]
            assert wait_until(lambda: server.calls_in_progress == 0, 2.0)
            with GossipClient(server.address, timeout_s=5.0) as client:
                client.push_update(honest_update("after"))  # the slots came back
    finally:
        release.set()
        server.stop(0)
    for err in (push, pull):
        assert getattr(err.value, "code", None) == "RESOURCE_EXHAUSTED", err.value
        assert "server's limit" in str(err.value)
    assert refused_in < 0.5
    assert handler.accepted == ["after"]


def test_per_caller_cap_leaves_room_for_other_members_under_tls(handler: SchemaHandler) -> None:
    # Over plaintext every loopback peer is one caller (its host); mutual TLS names them.
    tls = pki(["victim", "mallory", "peer-1"])
    server = serve(handler, Limits(max_calls=16, max_calls_per_caller=4, idle_s=30.0), tls["victim"])
    release = threading.Event()
    try:
        with secure_channel(server.address, tls["mallory"]) as channel:
            calls = open_stalled(channel, 6, release)
            time.sleep(0.5)
            refused = [code_of(f, timeout=0.1) for f in calls if f.done()]
            assert_serving(server.address, tls["peer-1"])
            assert server.calls_in_progress == 4
    finally:
        release.set()
        server.stop(0)
    assert [code for code, _ in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert all("of this caller" in d for _, d in refused)
    caller = handler.callers[-1]
    assert caller is not None and caller.peer_id == "peer-1"


# ------------------------------------------------------------------ work before checks


def test_schema_bounds_the_update_size_and_frames(handler: SchemaHandler) -> None:
    numel = sum(torch.Size(s).numel() for s in LENET.values())
    server = GossipServer(handler, "victim")
    assert server.max_update_bytes == 16 * numel + (64 << 10) < MiB  # not 256 MiB for 38 KB
    # The live runs' updates pass at every chunk size the config allows.
    server.start()
    try:
        for chunk_bytes in (1024, 4096, MiB):
            with GossipClient(server.address, chunk_bytes=chunk_bytes) as client:
                for sparse in ("never", "always"):
                    client.push_update(honest_update(f"ok-{chunk_bytes}-{sparse}"), sparse=sparse)
    finally:
        server.stop(0)
    assert len(handler.accepted) == 6


SCHEMA_CASES = {
    "one tensor too few": (lambda h: h.tensors.pop(), "declares 7 tensors, the model has 8"),
    "unknown name": (lambda h: setattr(h.tensors[0], "name", "x" * 5000), "not a parameter"),
    "wrong shape": (lambda h: h.tensors[1].shape.append(2), "shape"),
    "int8 values": (lambda h: setattr(h.tensors[0], "dtype", codec.pb.DTYPE_INT8), "byte_length|dtype"),
    "long update_id": (lambda h: setattr(h, "update_id", "u" * 300), "update_id longer"),
    "long defence": (lambda h: setattr(h, "defence", "d" * 300), "defence longer"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_frames_off_the_schema_are_refused(case: str) -> None:
    mutate, message = SCHEMA_CASES[case]
    frames = list(codec.update_to_frames(honest_update("off-schema"), sparse="never"))
    mutate(frames[0].header)
    with pytest.raises(MalformedMessage, match=message):
        codec.update_from_frames(frames, schema=LENET, dtypes=codec.UPDATE_DTYPES)


def test_int8_tensor_of_the_right_size_is_refused_by_dtype() -> None:
    update = honest_update("int8")
    update.tensors["features.0.bias"] = torch.ones(12, dtype=torch.int8)
    frames = list(codec.update_to_frames(update, sparse="never"))
    with pytest.raises(MalformedMessage, match="not allowed"):
        codec.update_from_frames(frames, schema=LENET, dtypes=codec.UPDATE_DTYPES)


def test_small_chunks_and_too_many_frames_are_refused() -> None:
    frames = list(codec.update_to_frames(honest_update("tiny"), chunk_bytes=16))
    with pytest.raises(MalformedMessage, match="below the minimum 1024"):
        codec.update_from_frames(frames, schema=LENET, min_chunk_bytes=1024)
    with pytest.raises(MalformedMessage, match="more than 100 frames"):
        codec.update_from_frames(frames, schema=LENET, max_frames=100)
    derived = codec.max_update_frames(LENET, 1024)
    ok = list(codec.update_to_frames(honest_update("ok"), chunk_bytes=1024, sparse="always"))
    assert len(ok) <= derived
    codec.update_from_frames(ok, schema=LENET, min_chunk_bytes=1024, max_frames=derived)


@pytest.mark.parametrize("case", list(MALFORMATIONS))
def test_every_known_malformation_is_still_refused_with_a_schema(case: str) -> None:
    # The ~30 malformed frames of test_codec, decoded the way a server with a schema does.
    mutate, _ = MALFORMATIONS[case]
    schema = {"w": (8,), "b": (6,)}
    frames = mutate(good_frames())
    with pytest.raises(MalformedMessage):
        codec.update_from_frames(
            frames, schema=schema, dtypes=codec.UPDATE_DTYPES, max_frames=64, min_chunk_bytes=8
        )


def test_error_details_are_truncated() -> None:
    # Finding: details echoed a 4 MB attacker-chosen name. Without a schema the name
    # length is refused; the details stay short either way.
    class NoSchema(SchemaHandler):
        schema = None  # type: ignore[assignment]

        def accept_update(self, update: object, wire_bytes: int, caller: object = None) -> None:
            raise UpdateRejected("x" * MiB)  # a handler quoting what it got, at length

    handler = NoSchema(LENET)
    server = GossipServer(handler, "victim", max_message_bytes=8 * MiB)
    server.start()
    frame = codec.UpdateFrame()
    frame.header.update_id = "long-name"
    spec = frame.header.tensors.add()
    spec.name, spec.dtype, spec.layout = "n" * (3 * MiB), codec.pb.DTYPE_FLOAT32, codec.pb.LAYOUT_DENSE
    try:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 * MiB)]) as ch:
            code, details = code_of(ch.stream_unary(PUSH_PATH).future(iter([frame.SerializeToString()]),
                                                                      timeout=10), 10)
        with GossipClient(server.address) as client, pytest.raises(TransportError) as rejected:
            client.push_update(honest_update("quoted"))
    finally:
        server.stop(0)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 256 bytes" in details and len(details) < 600
    assert rejected.value.code == "INVALID_ARGUMENT" and len(rejected.value.details) < 600
    assert handler.accepted == []


# ------------------------------------------------------------------ memory, in a victim process


@pytest.fixture(scope="module")
def pki_materials() -> dict[str, TlsMaterial]:
    return pki(["victim", "mallory", "peer-1"])


@pytest.fixture(scope="module")
def victim(pki_materials: dict[str, TlsMaterial]) -> Iterator[Victim]:
    v = Victim(pki_materials["victim"], {"idle_s": 2.0, "total_s": 10.0})
    yield v
    v.stop()


def _push_raw(address: str, tls: TlsMaterial, payloads: list[bytes]) -> tuple[grpc.StatusCode, str, float]:
    with secure_channel(address, tls) as channel:
        start = time.monotonic()
        code, details = code_of(channel.stream_unary(PUSH_PATH).future(iter(payloads), timeout=30), 30)
        return code, details, time.monotonic() - start


def test_200_stalled_streams_are_refused_or_cut_with_bounded_memory(
    victim: Victim, pki_materials: dict[str, TlsMaterial]
) -> None:
    # Finding: 200 stalled streams held the peer offline and cost 72 MB.
    release = threading.Event()
    header = frames_of(honest_update("stall-200"))[:1]
    before = victim.rss()
    try:
        with secure_channel(victim.address, pki_materials["mallory"]) as channel:
            calls = open_stalled(channel, 200, release, first=header)
            assert wait_until(lambda: sum(f.done() for f in calls) >= 192, 5.0)
            grown = victim.rss() - before
            assert_serving(victim.address, pki_materials["peer-1"])
            early = [code_of(f, timeout=0.1) for f in calls if f.done()]
            late = [code_of(f, timeout=5) for f in calls if not f.done()]
    finally:
        release.set()
    assert {c for c, _ in early} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(late) <= 8 and {c for c, _ in late} <= {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert grown < 20 * MiB, f"RSS grew {grown / MiB:.1f} MiB"
    accepted = victim.ask("accepted")
    assert all(a.startswith("honest") for a in accepted)


def test_sparse_request_with_a_huge_shape_allocates_nothing(
    victim: Victim, pki_materials: dict[str, TlsMaterial]
) -> None:
    # Finding: 47 bytes (sparse, nnz 0, shape [64M]) made the peer zero-fill 256 MiB.
    lone = codec.UpdateFrame()
    lone.header.update_id = "zero-fill"
    spec = lone.header.tensors.add()
    spec.name, spec.dtype, spec.layout = "w", codec.pb.DTYPE_FLOAT32, codec.pb.LAYOUT_SPARSE
    spec.shape.append(64 << 20)
    # The same inside a header that names the model's tensors, so the shape check answers.
    named = codec.UpdateFrame()
    named.CopyFrom(next(codec.update_to_frames(honest_update("zero-fill-2"), sparse="always")))
    named.header.tensors[0].ClearField("shape")
    named.header.tensors[0].shape.append(64 << 20)
    named.header.tensors[0].nnz = 0
    named.header.tensors[0].byte_length = 0
    for frame, message in ((lone, "declares 1 tensors"), (named, "shape")):
        victim.reset_peak()
        base = victim.peak()
        code, details, took = _push_raw(victim.address, pki_materials["mallory"], [frame.SerializeToString()])
        assert code is grpc.StatusCode.INVALID_ARGUMENT and message in details
        assert took < 1.0
        assert victim.peak() - base < 16 * MiB
    assert len(lone.SerializeToString()) < 48
    assert "zero-fill" not in victim.ask("accepted")
    assert_serving(victim.address, pki_materials["peer-1"])


def test_header_of_300k_tensor_specs_is_refused_before_parsing(
    victim: Victim, pki_materials: dict[str, TlsMaterial]
) -> None:
    # Finding: 300k empty tensor specs cost 10 s of CPU and 490 MB.
    frame = codec.UpdateFrame()
    frame.header.update_id = "300k"
    for i in range(300_000):
        frame.header.tensors.add(name=str(i))
    raw = frame.SerializeToString()
    victim.reset_peak()
    base = victim.peak()
    code, details, took = _push_raw(victim.address, pki_materials["mallory"], [raw])
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "header frame of" in details
    assert took < 1.0
    assert victim.peak() - base < 16 * MiB + len(raw)  # the received frame itself
    assert_serving(victim.address, pki_materials["peer-1"])


def test_a_pulled_model_off_the_pullers_schema_is_refused() -> None:
    # The server a peer pulls from may be the malicious member: its weights are checked
    # against the puller's own schema from the header on, before any chunk is read.
    server = serve(SchemaHandler({"w": (1000,)}))
    try:
        for schema, message in (({"w": (4,)}, "shape"), ({"v": (1000,)}, "not a parameter")):
            with GossipClient(server.address, schema=schema) as client, pytest.raises(MalformedMessage, match=message):
                client.get_model()
        with GossipClient(server.address, schema={"w": (1000,)}) as client:
            assert client.get_model()[1]["w"].shape == (1000,)
    finally:
        server.stop(0)
