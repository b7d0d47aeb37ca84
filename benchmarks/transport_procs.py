"""The transport across two processes: the receiving peer in its own interpreter, as deployed.

`benchmarks/transport.py` runs sender and receiver in one process, so the codec's encode,
gRPC's two sides and the decode all take turns on one GIL. Peers run in separate
processes (separate Ray actors, separate machines), so this module measures the same
push with the receiving GossipServer (or, for the baseline, the receiving socket) in a
spawned child process: the two sides then overlap on the two cores, as they do in a run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import ssl
import time
from typing import Any

import torch

from p2p.memory import retain_freed_memory
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader


class _Sink:
    """Counts updates; the schema is the sender's (the server checks every frame against it)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def schema(self) -> dict[str, tuple[int, ...]]:
        return self.shapes

    def accept_update(self, update: Update, wire_bytes: int, caller: object = None) -> None:
        pass

    def model_at(self, version: int | None, caller: object = None) -> Any:
        raise NotImplementedError


def _serve_grpc(shapes: dict[str, tuple[int, ...]], max_bytes: int, ports: Any, stop: Any, retain: int) -> None:
    torch.set_num_threads(1)
    if retain:
        retain_freed_memory(retain)
    server = GossipServer(_Sink(shapes), "sink", max_update_bytes=max_bytes)
    ports.put(server.start())
    stop.wait()
    server.stop(0)


def _serve_tcp(nbytes: int, reps: int, ports: Any) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    ports.put(srv.getsockname()[1])
    view = memoryview(bytearray(nbytes))
    conn, _ = srv.accept()
    with conn:
        for _ in range(reps):
            got = 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
            conn.sendall(b"ack-ack!")
    srv.close()


def tcp_pushes(port: int, nbytes: int, reps: int, tls: ssl.SSLContext | None = None) -> list[float]:
    """Seconds per sendall of nbytes random bytes to 127.0.0.1:port and its 8-byte ack
    (over TLS with that client context)."""
    payload = os.urandom(nbytes)
    times = []
    c = socket.create_connection(("127.0.0.1", port))
    if tls is not None:
        c = tls.wrap_socket(c, server_hostname="127.0.0.1")
    with c:
        for _ in range(reps):
            t0 = time.perf_counter()
            c.sendall(payload)
            ack = b""
            while len(ack) < 8:  # an SSL socket takes no MSG_WAITALL
                ack += c.recv(8 - len(ack))
            times.append(time.perf_counter() - t0)
    return times


def tcp_two_processes(nbytes: int, reps: int) -> list[float]:
    """Seconds per one-way transfer of nbytes to a socket in a child process, ack included."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    child = ctx.Process(target=_serve_tcp, args=(nbytes, reps, ports), daemon=True)
    child.start()
    try:
        times = tcp_pushes(ports.get(timeout=60), nbytes, reps)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return times


def push_two_processes(update: Update, reps: int, chunk_bytes: int, retain: int = 0, bulk: bool = False) -> list[float]:
    """Seconds per PushUpdate of `update` to a GossipServer in a child process (plaintext);
    with retain, the child keeps that many bytes of freed memory warm (p2p.memory); with
    bulk, the payload takes the bulk lane (p2p.bulk), else the gRPC stream."""
    shapes = {n: tuple(t.shape) for n, t in update.tensors.items()}
    size = sum(t.numel() * t.element_size() for t in update.tensors.values())
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve_grpc, args=(shapes, 2 * size + (1 << 20), ports, stop, retain), daemon=True)
    child.start()
    times = []
    try:
        port = ports.get(timeout=120)
        lane = 0 if bulk else None
        with GossipClient(f"127.0.0.1:{port}", timeout_s=60, chunk_bytes=chunk_bytes, bulk_min_bytes=lane) as client:
            for k in range(reps + 1):
                u = Update(UpdateHeader(f"u{k}", "h1", "h1", k + 1, 0, 1), update.tensors)
                t0 = time.perf_counter()
                client.push_update(u)
                if k:  # the first push also pays for the connection
                    times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return times
