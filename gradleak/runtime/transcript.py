"""The malicious peer's transcript: every update it received and every set of weights it pulled.

Layout of RUN_DIR/transcript/:

- ``updates.bin``: the file magic ``GLTRUPD1``, then one entry per accepted update.
- ``weights.bin``: the file magic ``GLTRWTS1``, then one entry per (sender, version) pulled.
- ``sent.bin``: the file magic ``GLTRSNT1``, then one entry per model message the malicious
  peer itself sent in model gossip (the gossip algebra needs its own values): frame 0 is
  UTF-8 JSON ``{"receiver": ..., "status": "sent" | "dropped" | "failed"}``, the rest the
  message's UpdateFrames. Absent in transcripts written before model gossip.
- ``meta.json``: format version, model name, input shape, classes, the attack config,
  the counts, bytes and the number of refused entries (rewritten after every entry).

Model gossip: a received model message (header kind "model") is an update entry like any
other; its tensors are the sender's model, so no weights are pulled for it.

One entry, all integers little-endian::

    u32 body_length | body | u32 crc32(body)
    body = f64 wall_time | u32 frame_count | frame_count x (u32 frame_length | frame)

where each frame is the codec's own serialized ``UpdateFrame`` (updates) or ``ModelFrame``
(weights), as `p2p.codec.update_to_frames` / `model_to_frames` produce them: the header
frame first, then the chunks. The wall time is when the update was received (or the weights
pulled). The sender and version of a weights entry are in its ModelFrame header. No pickle
anywhere: reading back goes through the codec's strict decoder, and the CRC and the length
prefixes catch a truncated or corrupted file before any frame is parsed.

The update is re-encoded from the decoded one, not copied from the socket, so its chunking
may differ from the sender's; its tensors decode bit for bit to what the peer accepted
(sparse where the codec finds that smaller, -0.0 and fp16 kept as they are).

Weights: the attacker pulls a sender's weights only for the updates it attacks, and under
load it attacks few of those it receives. With a `pull` function the writer also pulls, on a
thread of its own, the weights of every update it kept whose (sender, version) it does not
hold yet, so that every update in the transcript can be replayed; a failed pull (the sender
gone, or past its kept versions) is counted as ``weights_unpulled``.

The byte budget: an entry that would take the transcript (both files) past ``max_bytes`` is
refused and counted, and so is every later one; nothing written is ever rewritten. That
keeps the files append-only (a crash leaves a valid prefix, nothing half-rewritten), and it
keeps the earliest updates together with the weights they were attacked at, which rotating
out the oldest would break. The price: a run longer than the budget has no transcript of its
end; `meta.json` says how many entries were refused.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from google.protobuf.message import DecodeError

from p2p import codec
from p2p.errors import MalformedMessage
from p2p.update import Update

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TRANSCRIPT_DIR = "transcript"
UPDATES_FILE = "updates.bin"
WEIGHTS_FILE = "weights.bin"
SENT_FILE = "sent.bin"
META_FILE = "meta.json"
_MAGIC = {UPDATES_FILE: b"GLTRUPD1", WEIGHTS_FILE: b"GLTRWTS1", SENT_FILE: b"GLTRSNT1"}
SENT_STATUSES = ("sent", "dropped", "failed")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_MAX_FRAMES = 1 << 20  # far more chunks than any real entry; bounds a corrupt count
# The most bytes one frame may claim: the codec's chunks are at most 4 MiB (config) and a
# header frame lists the specs of one model's parameters.
_MAX_FRAME_BYTES = 64 << 20
_CHUNK_BYTES = 1 << 20
_PULL_QUEUE = 1024  # pending weight pulls; beyond it, counted as weights_unpulled
Pull = Callable[[str, int], Mapping[str, torch.Tensor]]


class TranscriptError(ValueError):
    """Raised when a transcript is missing, truncated or corrupt; the message names the file
    and the byte offset of the entry that could not be read."""


# ------------------------------------------------------------------------ writing


def _entry(wall_time: float, frames: list[bytes]) -> bytes:
    parts = [_F64.pack(wall_time), _U32.pack(len(frames))]
    for f in frames:
        parts += [_U32.pack(len(f)), f]
    body = b"".join(parts)
    return _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(body))


class TranscriptWriter:
    """Appends received updates and pulled weights to RUN_DIR/transcript/, thread-safe.

    gRPC threads call `add_update`, the attack worker `add_weights`; one lock orders the
    writes. Each entry goes to the file in one write and is flushed at once, so a crash of
    the process loses nothing that was added (an OS crash may lose what the OS had not yet
    written back; there is no fsync per entry).
    """

    def __init__(
        self, run_dir: str | Path, *, max_bytes: int, model: str, input_shape: tuple[int, ...],
        num_classes: int, attack_config: Mapping[str, Any] | None = None,
        attack_params: Mapping[str, Mapping[str, Any]] | None = None,
        chunk_bytes: int = _CHUNK_BYTES, pull: Pull | None = None, subdir: str | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"transcript max_bytes must be >= 1, got {max_bytes}")
        # subdir: one of several colluders' transcripts, RUN_DIR/transcript/<subdir>/
        self.dir = transcript_path(run_dir, subdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._chunk = chunk_bytes
        self._lock = threading.Lock()
        self._meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "model": model,
            "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes),
            "attack_config": dict(attack_config or {}), "budget_bytes": max_bytes,
            "attack_params": {k: dict(v) for k, v in (attack_params or {}).items()},
        }
        self.counts = {"updates": 0, "weights": 0, "sent": 0, "refused_updates": 0, "refused_weights": 0,
                       "refused_sent": 0, "weights_unpulled": 0}
        self._weights_seen: set[tuple[str, int]] = set()
        self._files: dict[str, BinaryIO] = {}
        self.bytes = 0
        for name, magic in _MAGIC.items():
            f = open(self.dir / name, "wb")  # noqa: SIM115 - kept open for the run
            f.write(magic)
            f.flush()
            self._files[name] = f
            self.bytes += len(magic)
        self._closed = False
        self._write_meta()
        self._pull = pull
        self._pending: queue.Queue[tuple[str, int] | None] = queue.Queue(maxsize=_PULL_QUEUE)
        self._puller: threading.Thread | None = None
        if pull is not None:
            self._puller = threading.Thread(target=self._pull_loop, name="transcript-pull", daemon=True)
            self._puller.start()

    def add_update(self, update: Update, received_at: float | None = None) -> bool:
        """Append one accepted update; False when the budget refused it (and counted it)."""
        frames = [f.SerializeToString()
                  for f in codec.update_to_frames(update, chunk_bytes=self._chunk, sparse="auto")]
        entry = _entry(time.time() if received_at is None else received_at, frames)
        kept = self._append(UPDATES_FILE, entry, "updates")
        h = update.header
        if kept and h.kind == "gradient" and self._pull is not None and not self.has_weights(h.sender, h.model_version):
            try:
                self._pending.put_nowait((h.sender, int(h.model_version)))
            except queue.Full:
                self._count("weights_unpulled")
        return kept

    def add_sent(self, update: Update, receiver: str, status: str, sent_at: float | None = None) -> bool:
        """Append a model message this peer sent (or dropped, or failed to send) to `receiver`."""
        if status not in SENT_STATUSES:
            raise ValueError(f"status must be one of {SENT_STATUSES}, got {status!r}")
        frames = [json.dumps({"receiver": receiver, "status": status}).encode()]
        frames += [f.SerializeToString() for f in codec.update_to_frames(update, chunk_bytes=self._chunk,
                                                                           sparse="never")]
        entry = _entry(update.header.sent_at if sent_at is None else sent_at, frames)
        return self._append(SENT_FILE, entry, "sent")

    def has_weights(self, sender: str, version: int) -> bool:
        with self._lock:
            return (sender, int(version)) in self._weights_seen

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _pull_loop(self) -> None:
        assert self._pull is not None
        while (key := self._pending.get()) is not None:
            if self.has_weights(*key):
                continue
            try:
                state = self._pull(*key)
            except Exception as exc:  # noqa: BLE001 - a failed pull must not stop the thread
                log.info("transcript: no weights of %s at version %d: %s", key[0], key[1], exc)
                self._count("weights_unpulled")
                continue
            self.add_weights(key[0], key[1], state)

    def add_weights(self, sender: str, version: int, state: Mapping[str, torch.Tensor],
                    fetched_at: float | None = None) -> bool:
        """Append the weights pulled from `sender` at `version`, once per (sender, version).

        Returns True when they are in the transcript (now or already), False when refused.
        """
        key = (sender, int(version))
        with self._lock:
            if key in self._weights_seen:
                return True
        frames = [f.SerializeToString()
                  for f in codec.model_to_frames(sender, int(version), state, chunk_bytes=self._chunk)]
        entry = _entry(time.time() if fetched_at is None else fetched_at, frames)
        return self._append(WEIGHTS_FILE, entry, "weights", key)

    def _append(self, name: str, entry: bytes, kind: str, key: tuple[str, int] | None = None) -> bool:
        with self._lock:
            if self._closed:
                return False
            if key is not None and key in self._weights_seen:
                return True  # another thread wrote the same weights meanwhile
            if self.bytes + len(entry) > self.max_bytes:
                self.counts[f"refused_{kind}"] += 1
                self._write_meta()
                return False
            f = self._files[name]
            f.write(entry)
            f.flush()
            self.bytes += len(entry)
            self.counts[kind] += 1
            if key is not None:
                self._weights_seen.add(key)
            self._write_meta()
            return True

    def _write_meta(self) -> None:
        meta = {**self._meta, **self.counts, "bytes": self.bytes,
                "truncated": self.counts["refused_updates"] + self.counts["refused_weights"]
                + self.counts["refused_sent"]}
        tmp = self.dir / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, self.dir / META_FILE)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "bytes": self.bytes}

    def close(self, timeout: float = 5.0) -> None:
        """Finish the pending pulls (up to `timeout` seconds), then close the files."""
        if self._puller is not None:
            try:
                self._pending.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._puller.join(timeout)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for f in self._files.values():
                f.close()
            self._write_meta()


# ------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Entry:
    """One transcript entry: where it starts, its wall time and its serialized frames."""

    offset: int
    wall_time: float
    frames: tuple[bytes, ...]


@dataclass(frozen=True)
class ReceivedUpdate:
    """An update as the malicious peer accepted it, and when."""

    update: Update
    received_at: float
    offset: int


@dataclass(frozen=True)
class SentModel:
    """A model message the malicious peer sent (status sent), dropped or failed to send."""

    update: Update
    receiver: str
    status: str
    sent_at: float
    offset: int


def _scan(path: Path) -> Iterator[Entry]:
    """Every entry of one transcript file, checked for length and CRC before it is returned."""
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TranscriptError(f"cannot read transcript file {path}: {exc.strerror or exc}") from None
    magic = _MAGIC[name]
    if data[: len(magic)] != magic:
        raise TranscriptError(f"{path}: not a transcript file (bad magic at offset 0)")
    pos, end = len(magic), len(data)
    while pos < end:
        start = pos

        def bad(what: str, at: int = start) -> TranscriptError:
            return TranscriptError(f"{path}: {what} in the entry at offset {at}")

        if end - pos < _U32.size:
            raise bad("truncated length prefix")
        (length,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        if length < _F64.size + _U32.size or end - pos < length + _U32.size:
            raise bad(f"truncated or bad entry (length {length}, {end - pos} bytes left)")
        body = memoryview(data)[pos : pos + length]
        (crc,) = _U32.unpack_from(data, pos + length)
        if zlib.crc32(body) != crc:
            raise bad("checksum mismatch (corrupt data)")
        (wall,) = _F64.unpack_from(body, 0)
        (count,) = _U32.unpack_from(body, _F64.size)
        if count < 1 or count > _MAX_FRAMES:
            raise bad(f"bad frame count {count}")
        q = _F64.size + _U32.size
        frames = []
        for _ in range(count):
            if length - q < _U32.size:
                raise bad("frame list overruns the entry")
            (flen,) = _U32.unpack_from(body, q)
            q += _U32.size
            if flen > _MAX_FRAME_BYTES or length - q < flen:
                raise bad(f"frame of {flen} bytes overruns the entry")
            frames.append(bytes(body[q : q + flen]))
            q += flen
        if q != length:
            raise bad(f"{length - q} stray bytes after the frames")
        pos += length + _U32.size
        yield Entry(start, wall, tuple(frames))


def transcript_path(run_dir: str | Path, subdir: str | None = None) -> Path:
    """RUN_DIR/transcript, or RUN_DIR/transcript/<subdir> for one of several colluders."""
    return Path(run_dir) / TRANSCRIPT_DIR / (subdir or "")


class TranscriptReader:
    """Strict reader of RUN_DIR/transcript/ (or the transcript folder itself).

    Opening reads meta.json and checks both files entry by entry (lengths and CRCs), so a
    truncated or corrupt transcript fails here, with the file and offset, before anything
    is attacked. Frames are decoded with the codec's strict decoder, never with pickle.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = codec.DEFAULT_MAX_BYTES) -> None:
        p = Path(path)
        self.dir = p if (p / META_FILE).exists() or p.name == TRANSCRIPT_DIR else p / TRANSCRIPT_DIR
        if not self.dir.is_dir():
            raise TranscriptError(f"no transcript in {p} (expected {self.dir})")
        self._max_bytes = max_bytes
        meta_path = self.dir / META_FILE
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise TranscriptError(f"{meta_path} is missing") from None
        except (OSError, ValueError) as exc:
            raise TranscriptError(f"{meta_path} is not readable JSON: {exc}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format_version") != FORMAT_VERSION:
            got = self.meta.get("format_version") if isinstance(self.meta, dict) else None
            raise TranscriptError(f"{meta_path}: format_version {got!r}, this reader knows {FORMAT_VERSION}")
        for key in ("model", "input_shape", "num_classes"):
            if key not in self.meta:
                raise TranscriptError(f"{meta_path} lacks '{key}'")
        self._updates = list(_scan(self.dir / UPDATES_FILE))
        self._sent = list(_scan(self.dir / SENT_FILE)) if (self.dir / SENT_FILE).exists() else []
        self._weights: dict[tuple[str, int], Entry] = {}
        for e in _scan(self.dir / WEIGHTS_FILE):
            header = self._model_header(e)
            self._weights[(header.peer_id, int(header.model_version))] = e

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = (int(d) for d in self.meta["input_shape"])
        return c, h, w

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return len(self._updates)

    def weight_keys(self) -> list[tuple[str, int]]:
        return sorted(self._weights)

    def updates(self) -> Iterator[ReceivedUpdate]:
        """Every update in the order received, decoded strictly."""
        path = self.dir / UPDATES_FILE
        for e in self._updates:
            try:
                frames = [codec.parse_update_frame(f) for f in e.frames]
                update = codec.update_from_frames(frames, max_bytes=self._max_bytes)
            except MalformedMessage as exc:
                raise TranscriptError(f"{path}: {exc} in the entry at offset {e.offset}") from None
            yield ReceivedUpdate(update, e.wall_time, e.offset)

    def sent(self) -> Iterator[SentModel]:
        """Every model message the malicious peer sent, in order, decoded strictly."""
        path = self.dir / SENT_FILE
        for e in self._sent:
            try:
                info = json.loads(e.frames[0].decode())
                receiver, status = str(info["receiver"]), str(info["status"])
                frames = [codec.parse_update_frame(f) for f in e.frames[1:]]
                update = codec.update_from_frames(frames, max_bytes=self._max_bytes)
            except (MalformedMessage, ValueError, KeyError, TypeError) as exc:
                raise TranscriptError(f"{path}: {exc} in the entry at offset {e.offset}") from None
            yield SentModel(update, receiver, status, e.wall_time, e.offset)

    def weights(self, sender: str, version: int) -> dict[str, torch.Tensor] | None:
        """The weights pulled from `sender` at `version`, or None when they were not pulled."""
        e = self._weights.get((sender, int(version)))
        if e is None:
            return None
        try:
            frames = [_parse_model_frame(f) for f in e.frames]
            _peer, _v, state = codec.model_from_frames(frames, max_bytes=self._max_bytes)
        except MalformedMessage as exc:
            raise TranscriptError(f"{self.dir / WEIGHTS_FILE}: {exc} in the entry at offset {e.offset}") from None
        return state

    def _model_header(self, e: Entry) -> Any:
        try:
            first = _parse_model_frame(e.frames[0])
        except MalformedMessage as exc:
            raise TranscriptError(f"{self.dir / WEIGHTS_FILE}: {exc} in the entry at offset {e.offset}") from None
        if first.WhichOneof("kind") != "header":
            raise TranscriptError(
                f"{self.dir / WEIGHTS_FILE}: entry at offset {e.offset} does not start with a header frame")
        return first.header


def _parse_model_frame(data: bytes) -> Any:
    frame = codec.ModelFrame()
    try:
        frame.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedMessage(f"cannot parse ModelFrame: {exc}") from None
    return frame
