"""How close does a PushUpdate come to the wire? gRPC gossip against raw loopback TCP, same run.

One process, loopback only. For each update (dense float32 of LeNet size and of ResNet-18
size, and ResNet-18 sparse top-k at 1% and 10%) over plaintext and mutual TLS: one-way
push throughput (MB/s of the dense update) and latency (p50 of a push, ack included), bytes
on the wire, and, for sparse updates, wire bytes per kept value. The baseline is a raw TCP
socket moving the same number of dense bytes (sendall, recv_into a buffer, 8-byte ack).
Where the time goes: "enc ms" and "dec ms" are the codec alone on the same update (frames
to bytes, bytes to a checked update), without gRPC; the rest of a push is gRPC's.

    .venv/bin/python benchmarks/transport.py              # all cases, ~1 minute
    .venv/bin/python benchmarks/transport.py --quick      # fewer repetitions
    .venv/bin/python benchmarks/transport.py --chunk-kib 4096   # bigger chunk frames

Rows marked "(bulk)" send the payload over the receiver's bulk lane (p2p.bulk: the header
checked over gRPC, then the bytes over one TCP or TLS connection straight into the
tensors), as peers do for updates of 4 MiB or more; the other PushUpdate rows force the
gRPC stream. "raw TLS socket" is the baseline's transfer over one mutual-TLS connection
(Python's ssl), the floor of a TLS lane.

"GetModel" rows pull weights of the update's size (plaintext), over the stream and over
the lane (OfferModel: the header and a ticket over gRPC, the bytes over the lane).

Rows marked "(bare)" are gRPC Python alone on the same bytes (a raw-bytes client stream in
chunks of the same size, no codec, no protobuf, no checks): the ceiling any codec on top of
grpcio can reach on this machine; the indented "(bare)" rows after it are other uses of
grpcio on the same bytes (one unary message, 4 and 16 MiB messages, two concurrent streams
on two channels, four concurrent unary calls). Rows marked "(2 procs)" put the receiver in a child
process, as peers are deployed (benchmarks/transport_procs.py), against a raw TCP
baseline across the same two processes: sender and receiver then overlap on two cores.

Rows marked "(warm heap)" come last, in the same run: the dense ResNet-18 push again after
p2p.memory.retain_freed_memory (as every peer with a model of 1 MiB or more sets it), so
freed frame and tensor buffers are reused instead of faulted in again. It is process-wide
and only rises, hence last; `--no-warm` skips those rows.

Target (issue 12): the 45 MB dense update at least 50% of raw TCP's throughput; sparse
bytes on the wire proportional to k.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import torch
from transport_procs import push_two_processes, tcp_pushes, tcp_two_processes

from gradleak.core.models import create_model
from p2p import codec
from p2p.memory import retain_freed_memory
from p2p.tls import make_test_pki
from p2p.transport import BULK_MIN_BYTES, GossipClient, GossipServer
from p2p.update import Update, UpdateHeader


class Sink:
    """A handler that only counts: the cost measured is the transport's, not the peer's."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor] | None = None) -> None:
        self.shapes = shapes
        self.count = 0
        self.weights = weights  # what model pulls get

    def schema(self) -> dict[str, tuple[int, ...]]:
        return self.shapes

    def accept_update(self, update: Update, wire_bytes: int, caller: object = None) -> None:
        self.count += 1

    def model_at(self, version: int | None, caller: object = None) -> tuple[int, dict[str, torch.Tensor]]:
        if self.weights is None:
            raise NotImplementedError
        return 1, self.weights


def model_update(model: str, image_size: int, in_channels: int, keep: float | None) -> Update:
    """A gradient-shaped float32 update of model; with keep, all but the largest keep share zeroed."""
    net = create_model(model, in_channels=in_channels, num_classes=10, image_size=image_size)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in net.named_parameters():
        t = torch.randn(p.shape, generator=g)
        if keep is not None:
            flat = t.reshape(-1)
            k = max(1, int(flat.numel() * keep))
            cut = flat.abs().kthvalue(flat.numel() - k + 1).values
            t = torch.where(t.abs() >= cut, t, torch.zeros(()))
        tensors[name] = t
    return Update(UpdateHeader("u", "h1", "h1", 1, 0, 1), tensors)


def tcp_baseline(nbytes: int, reps: int, tls: bool = False) -> list[float]:
    """Seconds per one-way transfer of nbytes over a raw loopback socket, ack included; with
    tls, over one mutual-TLS connection (Python's ssl with the bulk lane's contexts)."""
    from p2p.bulk import client_context, server_context

    materials = make_test_pki(peers=("sink", "h1"))[1] if tls else {}
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    buf = bytearray(nbytes)

    def serve() -> None:
        conn, _ = srv.accept()
        if tls:
            conn = server_context(materials["sink"]).wrap_socket(conn, server_side=True)
        view = memoryview(buf)
        with conn:
            for _ in range(reps):
                got = 0
                while got < nbytes:
                    got += conn.recv_into(view[got:], nbytes - got)
                conn.sendall(b"ack-ack!")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    wrap = client_context(materials["h1"]) if tls else None
    times = tcp_pushes(port, nbytes, reps, wrap)
    t.join()
    srv.close()
    return times


def codec_times(update: Update, chunk_bytes: int, reps: int) -> tuple[float, float]:
    """p50 seconds to encode update to frame bytes, and to decode those bytes (schema-checked)."""
    schema = {n: tuple(t.shape) for n, t in update.tensors.items()}
    enc, dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        wire = list(codec.update_to_wire(update, chunk_bytes=chunk_bytes))
        t1 = time.perf_counter()
        codec.update_from_frames((codec.parse_update_frame(w) for w in wire), schema=schema,
                                 dtypes=codec.UPDATE_DTYPES, max_bytes=1 << 30)
        dec.append(time.perf_counter() - t1)
        enc.append(t1 - t0)
    return p50(enc), p50(dec)


def grpc_push(update: Update, tls: bool, reps: int, chunk_bytes: int, bulk: bool = False) -> tuple[list[float], int]:
    """Seconds per push of update and the bytes one push puts on the wire; with bulk, the
    payload takes the receiver's bulk lane (p2p.bulk), else the gRPC stream."""
    shapes = {n: tuple(t.shape) for n, t in update.tensors.items()}
    materials = make_test_pki(peers=("sink", "h1"))[1] if tls else {}
    size = sum(t.numel() * 4 for t in update.tensors.values())
    server = GossipServer(Sink(shapes), "sink", tls=materials.get("sink"), max_update_bytes=2 * size + (1 << 20))
    port = server.start()
    times, sent = [], 0
    try:
        lane = 0 if bulk else None
        with GossipClient(f"127.0.0.1:{port}", tls=materials.get("h1"), timeout_s=60, chunk_bytes=chunk_bytes,
                          bulk_min_bytes=lane) as client:
            for k in range(reps + 1):
                u = Update(UpdateHeader(f"u{k}", "h1", "h1", k + 1, 0, 1), update.tensors)
                t0 = time.perf_counter()
                sent = client.push_update(u)
                if k:  # the first push also pays for the connection and the handshake
                    times.append(time.perf_counter() - t0)
    finally:
        server.stop(0)
    return times, sent


def model_pulls(update: Update, reps: int, chunk_bytes: int, bulk: bool) -> list[float]:
    """Seconds per GetModel of weights the size of update (plaintext); with bulk over the
    holder's bulk lane (OfferModel), else the gRPC stream."""
    shapes = {n: tuple(t.shape) for n, t in update.tensors.items()}
    server = GossipServer(Sink(shapes, dict(update.tensors)), "sink")
    port = server.start()
    times = []
    try:
        with GossipClient(f"127.0.0.1:{port}", timeout_s=60, chunk_bytes=chunk_bytes, schema=shapes,
                          max_model_bytes=1 << 30, bulk_min_bytes=0 if bulk else None) as client:
            for k in range(reps + 1):
                t0 = time.perf_counter()
                client.get_model()
                if k:
                    times.append(time.perf_counter() - t0)
    finally:
        server.stop(0)
    return times


def bare_grpc(nbytes: int, chunk_bytes: int, reps: int) -> list[float]:
    """Seconds per client-streamed push of nbytes as raw bytes messages: gRPC Python's own
    ceiling here, with no codec, no protobuf and no checks (the server only counts bytes)."""
    import grpc

    def consume(chunks: Iterator[bytes], _ctx: object) -> bytes:
        return str(sum(len(c) for c in chunks)).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(consume)})
    limit = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler], options=limit)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    payload = os.urandom(nbytes)
    chunks = [payload[i:i + chunk_bytes] for i in range(0, nbytes, chunk_bytes)]  # made once, outside the clock
    times = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=limit) as ch:
            push = ch.stream_unary("/bench.Sink/Push")
            for _ in range(reps):
                t0 = time.perf_counter()
                assert int(push(iter(chunks))) == nbytes
                times.append(time.perf_counter() - t0)
    finally:
        server.stop(None)
    return times


def bare_variants(nbytes: int, reps: int) -> list[tuple[str, list[float]]]:
    """Seconds per push of nbytes by other bare uses of grpcio (issue 12, item 3): one unary
    message, bigger stream messages, and the bytes striped over concurrent calls. The
    ceiling a different use of gRPC could give PushUpdate; none changes it by much."""
    import grpc

    def unary(req: bytes, _ctx: object) -> bytes:
        return str(len(req)).encode()

    def consume(chunks: Iterator[bytes], _ctx: object) -> bytes:
        return str(sum(len(c) for c in chunks)).encode()

    handler = grpc.method_handlers_generic_handler("bench.Sink", {
        "One": grpc.unary_unary_rpc_method_handler(unary),
        "Push": grpc.stream_unary_rpc_method_handler(consume)})
    limit = [("grpc.max_receive_message_length", 128 << 20), ("grpc.max_send_message_length", 128 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handler], options=limit)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    payload = os.urandom(nbytes)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=limit) for _ in range(2)]
    one = channels[0].unary_unary("/bench.Sink/One")
    push = [ch.stream_unary("/bench.Sink/Push") for ch in channels]

    def split(buf: bytes, size: int) -> list[bytes]:
        return [buf[i:i + size] for i in range(0, len(buf), size)]

    def striped(parts: list[list[bytes]], calls: list[Callable[..., object]]) -> Callable[[], int]:
        return lambda: sum(int(f.result()) for f in [c.future(iter(p)) for c, p in zip(calls, parts)])

    halves, quarters = split(payload, -(-nbytes // 2)), split(payload, -(-nbytes // 4))
    by4, by16 = split(payload, 4 << 20), split(payload, 16 << 20)  # made once, outside the clock
    variants: list[tuple[str, Callable[[], int]]] = [
        ("1 unary msg", lambda: int(one(payload))),
        ("stream 4 MiB", lambda: int(push[0](iter(by4)))),
        ("stream 16 MiB", lambda: int(push[0](iter(by16)))),
        ("2 streams/2 ch", striped([split(h, 1 << 20) for h in halves], push)),
        ("4 unary/1 ch", lambda: sum(int(f.result()) for f in [one.future(q) for q in quarters])),
    ]
    out = []
    try:
        for label, fn in variants:
            fn()  # the first call also pays for the connection
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                assert fn() == nbytes
                times.append(time.perf_counter() - t0)
            out.append((label, times))
    finally:
        for ch in channels:
            ch.close()
        server.stop(None)
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="payload KiB per chunk frame (< 8 MiB)")
    ap.add_argument("--only", default="", help="run only the cases whose label contains this")
    ap.add_argument("--one-process", action="store_true", help="skip the two-process rows")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-heap rows")
    args = ap.parse_args()
    chunk_bytes = args.chunk_kib << 10
    torch.set_num_threads(1)
    small_reps, big_reps = (50, 3) if args.quick else (200, 8)
    cases: list[tuple[str, Callable[[], Update], int]] = [
        ("lenet 16x16 dense", lambda: model_update("lenet", 16, 1, None), small_reps),
        ("resnet18 dense", lambda: model_update("resnet18", 32, 3, None), big_reps),
        ("resnet18 top-10%", lambda: model_update("resnet18", 32, 3, 0.10), big_reps),
        ("resnet18 top-1%", lambda: model_update("resnet18", 32, 3, 0.01), big_reps),
    ]
    print(f"load: os.getloadavg() = {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"chunk {args.chunk_kib} KiB")
    print(f"{'update':<20} {'link':<6} {'dense MB':>9} {'wire MB':>9} {'B/kept':>7} {'enc ms':>7} {'dec ms':>7} "
          f"{'p50 ms':>8} {'MB/s':>7} {'TCP MB/s':>9} {'vs TCP':>7}")
    for label, make, reps in cases:
        if args.only not in label:
            continue
        run_case(label, make(), reps, chunk_bytes, args.one_process)
    if not args.no_warm and args.only in "resnet18 dense":
        update = model_update("resnet18", 32, 3, None)
        dense = sum(t.numel() * 4 for t in update.tensors.values())
        print(f"warm heap: retain_freed_memory({4 * dense}) -> {retain_freed_memory(4 * dense)}")
        run_case("resnet18 dense (warm heap)", update, big_reps, chunk_bytes, args.one_process, retain=4 * dense)


def run_case(label: str, update: Update, reps: int, chunk_bytes: int, one_process: bool, retain: int = 0) -> None:
    """Print the rows of one update: codec, PushUpdate plain and TLS, and for dense ones bare gRPC
    and (unless one_process) the two-process push."""
    dense = sum(t.numel() * 4 for t in update.tensors.values())
    kept = sum(int((t != 0).sum()) for t in update.tensors.values())
    tcp = p50(tcp_baseline(dense, reps))
    enc, dec = codec_times(update, chunk_bytes, reps)
    lanes = (False, True) if dense >= BULK_MIN_BYTES else (False,)
    for bulk in lanes:
        for tls in (False, True):
            times, wire = grpc_push(update, tls, reps, chunk_bytes, bulk)
            t = p50(times)
            per_kept = f"{wire / kept:7.2f}" if "top" in label else f"{'-':>7}"
            name = label + (" (bulk)" if bulk else "")
            print(f"{name:<20} {'TLS' if tls else 'plain':<6} {dense / 1e6:9.3f} {wire / 1e6:9.3f} {per_kept} "
                  f"{enc * 1e3:7.1f} {dec * 1e3:7.1f} {t * 1e3:8.2f} {dense / t / 1e6:7.1f} "
                  f"{dense / tcp / 1e6:9.1f} {tcp / t:7.2f}")
    if "dense" in label and len(lanes) == 2:
        for bulk in lanes:
            t = p50(model_pulls(update, reps, chunk_bytes, bulk))
            name = "  GetModel" + (" (bulk)" if bulk else "")
            print(f"{name:<20} {'plain':<6} {dense / 1e6:9.3f} {dense / 1e6:9.3f} {'-':>7} {'-':>7} "
                  f"{'-':>7} {t * 1e3:8.2f} {dense / t / 1e6:7.1f} {dense / tcp / 1e6:9.1f} {tcp / t:7.2f}")
        tls_tcp = p50(tcp_baseline(dense, reps, tls=True))
        print(f"{'  raw TLS socket':<20} {'TLS':<6} {dense / 1e6:9.3f} {dense / 1e6:9.3f} {'-':>7} {'-':>7} "
              f"{'-':>7} {tls_tcp * 1e3:8.2f} {dense / tls_tcp / 1e6:7.1f} {dense / tcp / 1e6:9.1f} {tcp / tls_tcp:7.2f}")
    if "dense" in label:
        t = p50(bare_grpc(dense, chunk_bytes, reps))
        print(f"{label + ' (bare)':<20} {'plain':<6} {dense / 1e6:9.3f} {dense / 1e6:9.3f} {'-':>7} "
              f"{'-':>7} {'-':>7} {t * 1e3:8.2f} {dense / t / 1e6:7.1f} {dense / tcp / 1e6:9.1f} {tcp / t:7.2f}")
        for name, times in bare_variants(dense, reps):
            t = p50(times)
            print(f"{'  (bare) ' + name:<20} {'plain':<6} {dense / 1e6:9.3f} {dense / 1e6:9.3f} {'-':>7} "
                  f"{'-':>7} {'-':>7} {t * 1e3:8.2f} {dense / t / 1e6:7.1f} {dense / tcp / 1e6:9.1f} {tcp / t:7.2f}")
        if not one_process:
            tcp2 = p50(tcp_two_processes(dense, reps))
            for bulk in lanes:
                t = p50(push_two_processes(update, reps, chunk_bytes, retain, bulk))
                name = label + (" (2 procs, bulk)" if bulk else " (2 procs)")
                print(f"{name:<20} {'plain':<6} {dense / 1e6:9.3f} {wire / 1e6:9.3f} {'-':>7} "
                      f"{'-':>7} {'-':>7} {t * 1e3:8.2f} {dense / t / 1e6:7.1f} {dense / tcp2 / 1e6:9.1f} "
                      f"{tcp2 / t:7.2f}")


if __name__ == "__main__":
    main()
