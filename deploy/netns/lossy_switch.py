"""A userspace Ethernet switch with delay and loss, for kernels without netem (sch_netem).

    python lossy_switch.py --delay-ms 20 --loss-pct 10 --seed 0 --ready FILE NS [NS ...]

For each named network namespace it creates a TAP device `eth0` inside it and then
forwards every frame between them like a learning switch: each frame forwarded is
dropped with probability loss-pct/100 (seeded) or delivered delay-ms later. So each hop
loses and delays packets as netem on the sender's link would, and TCP sees real loss.
It writes FILE once the devices exist, counts frames on SIGTERM/SIGINT into FILE.stats
(JSON), and exits 0. Linux only, needs CAP_NET_ADMIN; no dependency beyond the stdlib.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready", required=True, help="file written once every device exists")
    p.add_argument("namespaces", nargs="+")
    args = p.parse_args()
    if not (0 <= args.loss_pct < 100 and 0 <= args.delay_ms <= 10_000):
        print("lossy_switch: loss-pct must be in [0, 100) and delay-ms in [0, 10000]", file=sys.stderr)
        return 2
    home = f"/proc/{os.getpid()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY)  # to come back to after each namespace
    ports: list[int] = []
    for ns in args.namespaces:
        setns(f"/run/netns/{ns}")
        ports.append(open_tap("eth0"))  # the device lives where it was made; the fd stays ours
        setns(f"/proc/self/fd/{home_fd}")
    os.close(home_fd)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    Path(args.ready).write_text("ready\n")

    rng = random.Random(args.seed)
    loss, delay = args.loss_pct / 100.0, args.delay_ms / 1000.0
    where: dict[bytes, int] = {}  # learned MAC -> port
    queue: list[tuple[float, int, int, bytes]] = []  # (due, order, port, frame)
    order = 0
    counts = {"frames_in": 0, "forwarded": 0, "dropped": 0, "delivered": 0}
    while not stopping:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.5
        try:
            readable, _, _ = select.select(ports, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for i, fd in enumerate(ports):
            if fd not in readable:
                continue
            try:
                frame = os.read(fd, 65536)
            except BlockingIOError:
                continue
            counts["frames_in"] += 1
            dst, src = frame[0:6], frame[6:12]
            where[src] = i
            out = [where[dst]] if dst in where else [j for j in range(len(ports)) if j != i]
            for j in out:
                if j == i:
                    continue
                counts["forwarded"] += 1
                if rng.random() < loss:
                    counts["dropped"] += 1
                    continue
                heapq.heappush(queue, (now + delay, order, j, frame))
                order += 1
        while queue and queue[0][0] <= time.monotonic():
            _due, _o, j, frame = heapq.heappop(queue)
            try:
                os.write(ports[j], frame)
                counts["delivered"] += 1
            except OSError:  # the device is down or its queue is full: a loss the kernel chose
                counts["dropped"] += 1
    Path(args.ready + ".stats").write_text(json.dumps(counts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
