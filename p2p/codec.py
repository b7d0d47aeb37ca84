"""Codec between updates / model weights and the protobuf frames of the gossip protocol.

This is the only module outside p2p/proto that imports the generated messages; the
rest of the code sees `Update` and tensors. Decoding is strict because the sender may
be malicious: every field is checked against every other one before any memory the
sender asked for is allocated, and every violation raises `MalformedMessage`.

Copies of a tensor's bytes (the transport's path: `update_to_wire` / `parse_update_frame`):

- send, DENSE: 1 (the payload slice joined behind a hand-built frame prefix, in
  `_chunk_frame`); the tensor itself is viewed, not copied. Before: 3 or more (`tobytes`,
  into the pb.Chunk, out of SerializeToString). gRPC then copies each frame once into its
  own buffer (not counted: the Python API takes only `bytes`).
- send, SPARSE: each kept value and index is written once, into the payload, then joined
  once as above. The dense tensor is read twice (`count_nonzero` to decide, `nonzero` for
  the index); "auto" reads it once and copies nothing for a tensor that stays DENSE.
  Before: every tensor went through `nonzero`, then a gather, an index cast and a concat.
- receive, DENSE: 1 (the chunk's payload, a view into the bytes gRPC hands over, copied
  into the tensor's preallocated buffer, which the decoded tensor then is). Before: 2 or
  more (ParseFromString, `chunk.data`, the copy into the buffer).
- receive, SPARSE: the payload copy above, then the index and the values copied once each
  (O(k)) and scattered into the dense zeros the receiver needs anyway (O(numel)).

Protobuf `Message` frames (`update_to_frames`, `parse_*` of a header) stay the format's
reference: `update_to_wire` writes the same bytes, and `_fast_chunk` reads only the
layout protobuf writes, handing anything else to protobuf.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from p2p.errors import MalformedMessage
from p2p.proto import gossip_pb2 as pb
from p2p.update import Update, UpdateHeader

if sys.byteorder != "little":  # payloads are copied as host bytes, which must be LE
    raise ImportError("p2p.codec supports little-endian hosts only")

# Message types, re-exported so the transport can name them without importing pb.
UpdateFrame = pb.UpdateFrame
ModelFrame = pb.ModelFrame
PushAck = pb.PushAck
BulkOffer = pb.BulkOffer
BulkResult = pb.BulkResult
ModelOffer = pb.ModelOffer
ModelRequest = pb.ModelRequest
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Gossip"].full_name

_TO_WIRE: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int8: pb.DTYPE_INT8,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.uint8: pb.DTYPE_UINT8,
}
_FROM_WIRE: dict[int, torch.dtype] = {wire: dtype for dtype, wire in _TO_WIRE.items()}
# Integer dtype of the same width, to compare and select elements by bit pattern.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_M = TypeVar("_M", bound=Message)
_F = TypeVar("_F", pb.UpdateFrame, pb.ModelFrame)
_SPARSE_MODES = ("auto", "never", "always")
_MAX_NDIM = 64  # far deeper than any real parameter; bounds the work per spec
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 256 << 20
# Without a schema the header is still bounded: far more tensors than any model here
# has, names and header strings far longer than any real one.
MAX_TENSORS = 4096
MAX_NAME_BYTES = 256
MAX_TEXT_BYTES = 256  # update_id, origin, sender, defence
# What an update's tensors may be: floating gradients, or int64 ring elements when masked.
UPDATE_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64}
)
# The most wire bytes one element can cost: an 8-byte value plus an 8-byte sparse index.
_MAX_WIRE_PER_ELEMENT = 16
_MARGIN_BYTES = 64 << 10
# A schema: the receiver's parameters, {name: shape}; updates must match it exactly.
Schema = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class _Spec:
    """A validated TensorSpec: everything needed to allocate and fill one tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sparse: bool
    nnz: int
    byte_length: int

    @property
    def numel(self) -> int:
        """Number of elements of the decoded (dense) tensor."""
        return math.prod(self.shape)

    @property
    def index_size(self) -> int:
        """Bytes per sparse flat index: uint32 while every index fits, else int64."""
        return 4 if self.numel <= 1 << 32 else 8


def max_update_bytes(schema: Schema) -> int:
    """The largest update a receiver with this schema must take: every element at the
    widest allowed dtype (8 bytes) plus a sparse index (up to 8 bytes), and a margin."""
    return _MAX_WIRE_PER_ELEMENT * sum(math.prod(shape) for shape in schema.values()) + _MARGIN_BYTES


def max_header_bytes(schema: Schema | None) -> int:
    """The largest serialized header frame worth parsing for this schema (or any, for None).

    Per spec: tags and varints (about 48 bytes), the name, 10 bytes per dimension; plus
    the header's own strings (each at most MAX_TEXT_BYTES) and numbers.
    """
    fixed = 4 * (MAX_TEXT_BYTES + 4) + 1024
    if schema is None:
        return fixed + MAX_TENSORS * (48 + MAX_NAME_BYTES + 10 * _MAX_NDIM)
    return fixed + sum(48 + len(n.encode()) + 10 * len(shape) for n, shape in schema.items())


def max_update_frames(schema: Schema, min_chunk_bytes: int) -> int:
    """The most frames an update for this schema needs when every chunk but a tensor's
    last carries at least min_chunk_bytes: the header plus each tensor's chunks."""
    step = max(1, min_chunk_bytes)
    return 1 + sum(
        -(-_MAX_WIRE_PER_ELEMENT * math.prod(shape) // step) for shape in schema.values()
    )


def _clip(text: str, limit: int = 64) -> str:
    """An attacker-sized string shortened for an error message."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


# ----------------------------------------------------------------------- encoding


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """Reinterpret a contiguous 1-d tensor as integers of the same width."""
    return flat.view(_BITS[flat.element_size()])


def _as_bytes(flat: torch.Tensor) -> np.ndarray:
    """Return the raw bytes of a contiguous 1-d tensor as a uint8 array, without a copy."""
    return flat.view(torch.uint8).numpy()


def _encode_tensor(
    name: str, tensor: torch.Tensor, sparse: str
) -> tuple[pb.TensorSpec, np.ndarray]:
    """Encode one tensor into its spec and its payload bytes (see gossip.proto)."""
    if tensor.dtype not in _TO_WIRE:
        known = ", ".join(str(d) for d in _TO_WIRE)
        raise ValueError(f"tensor {name!r} has unsupported dtype {tensor.dtype}; known: {known}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:  # empty tensors may carry stride 0, which view(dtype) refuses
        flat = torch.empty(0, dtype=tensor.dtype)
    size = flat.element_size()
    spec = pb.TensorSpec(name=name, dtype=_TO_WIRE[tensor.dtype], shape=list(tensor.shape))
    index_size = 4 if flat.numel() <= 1 << 32 else 8
    # Select by bit pattern, not by value, so -0.0 survives the sparse encoding. "auto"
    # first counts (a reduction, no allocation) and builds the index only when it pays.
    bits = _bits(flat)
    go_sparse = sparse == "always" or (sparse == "auto" and _sparse_pays(bits, index_size + size, size))
    if go_sparse:
        index = torch.nonzero(bits).reshape(-1).numpy()
        nnz, split = index.size, index.size * index_size
        # One buffer of nnz * (index + value) bytes, filled in place: cost scales with k.
        payload = np.empty(nnz * (index_size + size), dtype=np.uint8)
        payload[:split].view(np.uint32 if index_size == 4 else np.int64)[:] = index
        values = payload[split:].view(_NP_BITS[size])
        np.take(bits.numpy(), index, out=values)
        spec.layout = pb.LAYOUT_SPARSE
        spec.nnz = nnz
    else:
        payload = _as_bytes(flat)
        spec.layout = pb.LAYOUT_DENSE
    spec.byte_length = payload.size
    return spec, payload


_SAMPLE = 4096  # elements of a large tensor looked at before counting all of them


def _sparse_pays(bits: torch.Tensor, pair_bytes: int, value_bytes: int) -> bool:
    """True when the tensor's nonzeros as (index, value) pairs take fewer bytes than dense.

    A large tensor is first judged on an evenly strided sample; only when the sample's
    share of nonzeros is within 0.5-1.5x the break-even share is everything counted
    (a dense ResNet-18 update: 8.5 ms of counting saved per push). A tensor whose
    nonzeros happen to line up with the stride can be sent in the larger layout: that
    costs bytes, never correctness.
    """
    n = bits.numel()
    even = n * value_bytes / pair_bytes  # nonzeros at which both layouts are the same size
    if n >= 16 * _SAMPLE:
        sample = bits[:: n // _SAMPLE]
        share = int(torch.count_nonzero(sample)) / sample.numel()
        if share > 1.5 * value_bytes / pair_bytes:
            return False
        if share < 0.5 * value_bytes / pair_bytes:
            return True
    return int(torch.count_nonzero(bits)) < even


def _encode_tensors(
    tensors: Mapping[str, torch.Tensor], sparse: str
) -> tuple[list[pb.TensorSpec], list[np.ndarray]]:
    """Encode every tensor; return the specs and payloads in the mapping's order."""
    if sparse not in _SPARSE_MODES:
        raise ValueError(f"sparse must be one of {_SPARSE_MODES}, got {sparse!r}")
    encoded = [_encode_tensor(name, t, sparse) for name, t in tensors.items()]
    return [spec for spec, _ in encoded], [payload for _, payload in encoded]


def _chunks(payloads: list[np.ndarray], chunk_bytes: int) -> Iterator[pb.Chunk]:
    """Split each payload into chunks of at most chunk_bytes, in tensor order."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for index, payload in enumerate(payloads):
        for offset in range(0, payload.size, chunk_bytes):
            data = payload[offset : offset + chunk_bytes].tobytes()
            yield pb.Chunk(tensor_index=index, offset=offset, data=data)


# The header fields that travel as they are, in both directions (tensors aside).
_HEADER_FIELDS = ("update_id", "origin", "sender", "round", "model_version", "num_samples", "defence",
                  "mixing_weight", "sent_at", "kind", "mix_round")
KINDS = ("gradient", "model")  # what an update's tensors are (p2p.update.UpdateHeader.kind)
MAX_MIX_ROUNDS = 1024  # averaging rounds per local step a model message may name (mix_round < this)


def _update_header(update: Update, specs: list[pb.TensorSpec]) -> pb.UpdateHeader:
    """The protobuf header of update, declaring specs."""
    h = update.header
    return pb.UpdateHeader(**{f: getattr(h, f) for f in _HEADER_FIELDS}, tensors=specs)


def update_to_frames(
    update: Update, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, sparse: str = "auto"
) -> Iterator[pb.UpdateFrame]:
    """Encode an update as a header frame followed by chunk frames.

    Args:
        update: the update to send.
        chunk_bytes: the most payload bytes in one chunk frame.
        sparse: "auto" sends a tensor SPARSE when that is smaller on the wire,
            "never" / "always" force DENSE / SPARSE.

    Raises:
        ValueError: on an unsupported dtype or option.
    """
    specs, payloads = _encode_tensors(update.tensors, sparse)
    header = _update_header(update, specs)
    yield pb.UpdateFrame(header=header)
    for chunk in _chunks(payloads, chunk_bytes):
        yield pb.UpdateFrame(chunk=chunk)


def model_to_frames(
    peer_id: str,
    version: int,
    state: Mapping[str, torch.Tensor],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.ModelFrame]:
    """Encode model weights (DENSE) as a header frame followed by chunk frames."""
    specs, payloads = _encode_tensors(state, "never")
    yield pb.ModelFrame(
        header=pb.ModelHeader(peer_id=peer_id, model_version=version, tensors=specs)
    )
    for chunk in _chunks(payloads, chunk_bytes):
        yield pb.ModelFrame(chunk=chunk)


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _chunk_frame(index: int, offset: int, data: memoryview) -> bytes:
    """A serialized UpdateFrame/ModelFrame {chunk: {tensor_index, offset, data}}, built by
    hand: a few prefix bytes and the payload slice joined once (the payload's only copy
    on the way to gRPC). Byte-identical to protobuf's own serialization of the message:
    fields in number order, zeros omitted (proto3), canonical varints."""
    inner = bytearray()
    if index:
        inner += b"\x08" + _varint(index)
    if offset:
        inner += b"\x10" + _varint(offset)
    inner += b"\x1a" + _varint(len(data))
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


def _chunk_frames(payloads: list[np.ndarray], chunk_bytes: int) -> Iterator[bytes]:
    """Serialized chunk frames of each payload, at most chunk_bytes of payload each."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for index, payload in enumerate(payloads):
        view = payload.data  # a memoryview of the payload: slices of it copy nothing
        for offset in range(0, payload.size, chunk_bytes):
            yield _chunk_frame(index, offset, view[offset : offset + chunk_bytes])


def update_to_wire(
    update: Update, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, sparse: str = "auto"
) -> Iterator[bytes]:
    """update_to_frames, serialized: the same bytes, with one copy of the payload fewer
    than SerializeToString on each frame (see _chunk_frame)."""
    header, payloads = update_to_bulk(update, sparse=sparse)
    yield from wire_frames(header, payloads, chunk_bytes)


def wire_frames(header: bytes, payloads: list[np.ndarray], chunk_bytes: int) -> Iterator[bytes]:
    """The serialized frames of an update encoded by `update_to_bulk`."""
    yield header
    yield from _chunk_frames(payloads, chunk_bytes)


def update_to_bulk(update: Update, *, sparse: str = "auto") -> tuple[bytes, list[np.ndarray]]:
    """An update as its serialized header frame and its tensors' payloads (views where
    dense: nothing is copied), for a payload sent outside gRPC messages (p2p.bulk)."""
    specs, payloads = _encode_tensors(update.tensors, sparse)
    return pb.UpdateFrame(header=_update_header(update, specs)).SerializeToString(), payloads


def model_to_bulk(
    peer_id: str, version: int, state: Mapping[str, torch.Tensor]
) -> tuple[pb.ModelHeader, list[np.ndarray]]:
    """Model weights as their header and dense payloads (views: nothing copied), for a
    pull over the bulk lane (p2p.bulk)."""
    specs, payloads = _encode_tensors(state, "never")
    return pb.ModelHeader(peer_id=peer_id, model_version=version, tensors=specs), payloads


def model_to_wire(
    peer_id: str,
    version: int,
    state: Mapping[str, torch.Tensor],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """model_to_frames, serialized (see update_to_wire)."""
    specs, payloads = _encode_tensors(state, "never")
    header = pb.ModelHeader(peer_id=peer_id, model_version=version, tensors=specs)
    yield pb.ModelFrame(header=header).SerializeToString()
    yield from _chunk_frames(payloads, chunk_bytes)


def push_ack(update_id: str, bytes_received: int) -> pb.PushAck:
    """Build the receipt of an accepted update."""
    return pb.PushAck(update_id=update_id, bytes_received=bytes_received)


def model_request(version: int | None) -> pb.ModelRequest:
    """Build a model request; None asks for the latest version."""
    return pb.ModelRequest() if version is None else pb.ModelRequest(version=version)


# ----------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class RawChunk:
    """A chunk frame read straight from its serialized bytes: data is a view into them."""

    tensor_index: int
    offset: int
    data: memoryview


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at pos and the position after it; (-1, pos) if not a valid uint64."""
    value, shift = 0, 0
    for i in range(pos, min(pos + 10, len(view))):
        byte = view[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, i + 1) if value < 1 << 64 else (-1, pos)
        shift += 7
    return -1, pos


def _fast_chunk(data: bytes) -> RawChunk | None:
    """Read a chunk frame in the layout protobuf (and _chunk_frame) writes it, without
    copying its payload; None for any other layout, which protobuf then parses.

    Accepted, and nothing else: field 2 (chunk) once, spanning the rest of the frame;
    inside it optional tensor_index (1, < 2**32), optional offset (2), in that order,
    then data (3) spanning the rest. Protobuf reads exactly these bytes as the same
    values, so this changes speed, never meaning.
    """
    view = memoryview(data)
    if len(view) < 2 or view[0] != 0x12:
        return None
    size, pos = _read_varint(view, 1)
    if size != len(view) - pos:
        return None
    index = offset = 0
    if pos < len(view) and view[pos] == 0x08:
        index, pos = _read_varint(view, pos + 1)
        if not 0 <= index < 1 << 32:
            return None
    if pos < len(view) and view[pos] == 0x10:
        offset, pos = _read_varint(view, pos + 1)
        if offset < 0:
            return None
    if pos >= len(view) or view[pos] != 0x1A:
        return None
    size, pos = _read_varint(view, pos + 1)
    if size != len(view) - pos:
        return None
    return RawChunk(index, offset, view[pos:])


def parse_update_frame(data: bytes) -> pb.UpdateFrame | RawChunk:
    """Parse one serialized UpdateFrame (a chunk frame as a RawChunk, without copying
    its payload); raise MalformedMessage on bad bytes."""
    return _fast_chunk(data) or _parse(pb.UpdateFrame, data)


def parse_model_frame(data: bytes) -> pb.ModelFrame | RawChunk:
    """Parse one serialized ModelFrame, as parse_update_frame does."""
    return _fast_chunk(data) or _parse(pb.ModelFrame, data)


def parse_model_request(data: bytes) -> int | None:
    """Parse a serialized ModelRequest; return the version asked for, None for latest."""
    request = _parse(pb.ModelRequest, data)
    return request.version if request.HasField("version") else None


def parse_health_request(data: bytes) -> health_pb2.HealthCheckRequest:
    """Parse a serialized health HealthCheckRequest; raise MalformedMessage on bad bytes."""
    return _parse(health_pb2.HealthCheckRequest, data)


def _parse(cls: type[_M], data: bytes) -> _M:
    """Parse bytes as a message of cls, mapping protobuf errors to MalformedMessage."""
    message = cls()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedMessage(f"cannot parse {cls.__name__}: {exc}") from exc
    return message


def _check_spec(spec: pb.TensorSpec, dense_only: bool) -> _Spec:
    """Validate one TensorSpec against itself and return its decoded form."""
    where = f"tensor {_clip(spec.name)!r}"
    if len(spec.name.encode()) > MAX_NAME_BYTES:
        raise MalformedMessage(f"{where}: name longer than {MAX_NAME_BYTES} bytes")
    if spec.dtype not in _FROM_WIRE:
        raise MalformedMessage(f"{where}: unknown or unspecified dtype {spec.dtype}")
    if spec.layout not in (pb.LAYOUT_DENSE, pb.LAYOUT_SPARSE):
        raise MalformedMessage(f"{where}: unknown layout {spec.layout}")
    sparse = spec.layout == pb.LAYOUT_SPARSE
    if sparse and dense_only:
        raise MalformedMessage(f"{where}: SPARSE layout is not allowed here")
    if len(spec.shape) > _MAX_NDIM or any(d < 0 for d in spec.shape):
        raise MalformedMessage(f"{where}: invalid shape {list(spec.shape)}")
    out = _Spec(
        spec.name, _FROM_WIRE[spec.dtype], tuple(spec.shape), sparse, spec.nnz, spec.byte_length
    )
    item = out.dtype.itemsize
    if sparse and out.nnz > out.numel:
        raise MalformedMessage(f"{where}: nnz {out.nnz} exceeds numel {out.numel}")
    if not sparse and out.nnz:
        raise MalformedMessage(f"{where}: nnz must be 0 for a DENSE tensor")
    expected = out.nnz * (out.index_size + item) if sparse else out.numel * item
    if out.byte_length != expected:
        raise MalformedMessage(
            f"{where}: byte_length {out.byte_length} != {expected} implied by dtype, "
            f"shape, layout and nnz"
        )
    return out


def _check_specs(
    raw: Sequence[pb.TensorSpec],
    max_bytes: int,
    dense_only: bool,
    schema: Schema | None = None,
    dtypes: frozenset[torch.dtype] | None = None,
) -> list[_Spec]:
    """Validate every spec, the uniqueness of names and the size limit; with a schema,
    also the count, names and shapes against it, and the dtypes against dtypes.

    Counts come first, so a header of a million specs costs one comparison.
    """
    if schema is not None and len(raw) != len(schema):
        raise MalformedMessage(f"header declares {len(raw)} tensors, the model has {len(schema)}")
    if len(raw) > MAX_TENSORS:
        raise MalformedMessage(f"header declares {len(raw)} tensors, limit {MAX_TENSORS}")
    specs = []
    for s in raw:
        if schema is not None and s.name not in schema:
            raise MalformedMessage(f"tensor {_clip(s.name)!r} is not a parameter of the model")
        spec = _check_spec(s, dense_only)
        if schema is not None and spec.shape != tuple(schema[spec.name]):
            raise MalformedMessage(
                f"tensor {spec.name!r} has shape {list(spec.shape)[:8]}, the model's is "
                f"{list(schema[spec.name])}"
            )
        if dtypes is not None and spec.dtype not in dtypes:
            raise MalformedMessage(f"tensor {spec.name!r}: dtype {spec.dtype} is not allowed here")
        specs.append(spec)
    names = [s.name for s in specs]
    if any(not n for n in names):
        raise MalformedMessage("tensor names must be non-empty")
    if len(set(names)) != len(names):
        raise MalformedMessage("tensor names must be unique")
    # Both the wire bytes and the dense memory they decode into are bounded.
    wire = sum(s.byte_length for s in specs)
    dense = sum(s.numel * s.dtype.itemsize for s in specs)
    if max(wire, dense) > max_bytes:
        raise MalformedMessage(
            f"message too large: {wire} payload bytes, {dense} decoded bytes, limit {max_bytes}"
        )
    return specs


class _Assembler:
    """Collects chunks into preallocated per-tensor buffers, strictly in order."""

    def __init__(self, specs: list[_Spec], min_chunk_bytes: int = 0) -> None:
        self.specs = specs
        self.min_chunk_bytes = min_chunk_bytes
        # torch owns this memory, so decoded tensors are writable and need no copy.
        self.buffers = [torch.empty(s.byte_length, dtype=torch.uint8) for s in specs]
        self.filled = [0] * len(specs)

    def add(self, chunk: pb.Chunk | RawChunk) -> None:
        """Append one chunk; it must extend its tensor's payload contiguously."""
        i = chunk.tensor_index
        if i >= len(self.specs):
            raise MalformedMessage(f"chunk for undeclared tensor index {i}")
        name, size = self.specs[i].name, len(chunk.data)
        if size == 0:
            raise MalformedMessage(f"empty chunk for tensor {name!r}")
        if chunk.offset != self.filled[i]:
            raise MalformedMessage(
                f"chunk for tensor {name!r} at offset {chunk.offset}, expected {self.filled[i]}"
            )
        end = self.filled[i] + size
        if end > self.specs[i].byte_length:
            raise MalformedMessage(
                f"tensor {name!r} payload exceeds byte_length {self.specs[i].byte_length}"
            )
        # Tiny chunks multiply the per-frame work; only a tensor's last may be short.
        if size < self.min_chunk_bytes and end != self.specs[i].byte_length:
            raise MalformedMessage(
                f"chunk of {size} bytes for tensor {name!r}: below the minimum "
                f"{self.min_chunk_bytes}, and not the tensor's last"
            )
        self.buffers[i].numpy()[self.filled[i] : end] = np.frombuffer(chunk.data, np.uint8)
        self.filled[i] = end

    def complete(self) -> list[torch.Tensor]:
        """The buffers, once every payload is complete."""
        for spec, filled in zip(self.specs, self.filled, strict=True):
            if filled != spec.byte_length:
                raise MalformedMessage(
                    f"tensor {spec.name!r} truncated: {filled} of {spec.byte_length} bytes"
                )
        return self.buffers

    def tensors(self) -> dict[str, torch.Tensor]:
        """Check every payload is complete and decode it."""
        buffers = self.complete()
        return {s.name: _decode(s, b) for s, b in zip(self.specs, buffers, strict=True)}


def _decode(spec: _Spec, payload: torch.Tensor) -> torch.Tensor:
    """Decode a complete payload into a dense tensor of spec's dtype and shape."""
    if not spec.sparse:
        return payload.view(spec.dtype).reshape(spec.shape)
    split = spec.nnz * spec.index_size
    index_dtype = "<u4" if spec.index_size == 4 else "<i8"
    index = torch.from_numpy(payload.numpy()[:split].view(index_dtype).astype(np.int64))
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= spec.numel):
        raise MalformedMessage(f"tensor {spec.name!r}: sparse index out of range")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise MalformedMessage(f"tensor {spec.name!r}: sparse indices not strictly increasing")
    # Values follow indices at an offset that may be unaligned for the dtype: copy.
    values = payload[split:].clone().view(spec.dtype)
    dense = torch.zeros(spec.numel, dtype=spec.dtype)
    dense[index] = values
    return dense.reshape(spec.shape)


def _first(frames: Iterator[_F | RawChunk]) -> _F:
    """Return the first frame, which must carry the header."""
    first = next(frames, None)
    if first is None or isinstance(first, RawChunk) or first.WhichOneof("kind") != "header":
        raise MalformedMessage("stream must start with a header frame")
    return first


def _read_chunks(
    frames: Iterator[pb.UpdateFrame | RawChunk] | Iterator[pb.ModelFrame | RawChunk],
    specs: Sequence[pb.TensorSpec],
    max_bytes: int,
    dense_only: bool,
    *,
    schema: Schema | None = None,
    dtypes: frozenset[torch.dtype] | None = None,
    max_frames: int | None = None,
    min_chunk_bytes: int = 0,
) -> dict[str, torch.Tensor]:
    """Validate the declared specs, then read the remaining (chunk) frames into tensors."""
    assembler = _Assembler(_check_specs(specs, max_bytes, dense_only, schema, dtypes), min_chunk_bytes)
    _fill(assembler, frames, max_frames)
    return assembler.tensors()


def _fill(
    assembler: _Assembler,
    frames: Iterator[pb.UpdateFrame | RawChunk] | Iterator[pb.ModelFrame | RawChunk],
    max_frames: int | None,
) -> None:
    """Add every remaining (chunk) frame to assembler; the header is frame 1."""
    count = 1
    for frame in frames:
        count += 1
        if max_frames is not None and count > max_frames:
            raise MalformedMessage(f"more than {max_frames} frames in one message")
        if isinstance(frame, RawChunk):
            assembler.add(frame)
            continue
        kind = frame.WhichOneof("kind")
        if kind != "chunk":
            raise MalformedMessage(f"expected a chunk frame, got {kind or 'an empty frame'}")
        assembler.add(frame.chunk)


def update_from_frames(
    frames: Iterable[pb.UpdateFrame | RawChunk],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    schema: Schema | None = None,
    dtypes: frozenset[torch.dtype] | None = None,
    max_frames: int | None = None,
    min_chunk_bytes: int = 0,
) -> Update:
    """Decode an update from its frames, strictly.

    Sparse tensors come back dense (zeros elsewhere) in their dtype. Everything the
    header declares is checked before any tensor memory is allocated.

    Args:
        max_bytes: the most payload bytes, and the most decoded bytes.
        schema: the receiver's {name: shape}; the tensors must be exactly these.
        dtypes: the dtypes allowed (UPDATE_DTYPES for a peer); None allows any known.
        max_frames: the most frames, header included; None for no count limit.
        min_chunk_bytes: the least payload of a chunk that does not end its tensor.

    Raises:
        MalformedMessage: on any violation of the format in gossip.proto or of the
            limits above.
    """
    it = iter(frames)
    pending = check_update_header(_first(it), max_bytes=max_bytes, schema=schema, dtypes=dtypes)
    assembler = _Assembler(pending.specs, min_chunk_bytes)
    _fill(assembler, it, max_frames)
    return pending.finish(assembler.complete())


@dataclass(frozen=True)
class PendingUpdate:
    """An update whose header passed every check, its payload not yet read.

    `buffers()` allocates the payload's memory (only now: a header costs nothing to
    refuse); `finish` decodes the filled buffers into the update.
    """

    header: UpdateHeader
    specs: list[_Spec]

    @property
    def payload_bytes(self) -> int:
        """Bytes of payload the header declares, over all tensors."""
        return sum(s.byte_length for s in self.specs)

    def buffers(self) -> list[torch.Tensor]:
        """One empty uint8 buffer per tensor, of its declared byte_length."""
        return [torch.empty(s.byte_length, dtype=torch.uint8) for s in self.specs]

    def finish(self, buffers: Sequence[torch.Tensor]) -> Update:
        """Decode complete buffers (as from `buffers()`) into the update.

        Raises:
            MalformedMessage: on a bad sparse index, or NaN/inf in a model message.
        """
        tensors = {s.name: _decode(s, b) for s, b in zip(self.specs, buffers, strict=True)}
        if self.header.kind == "model":
            for name, t in tensors.items():
                if not bool(torch.isfinite(t).all()):
                    raise MalformedMessage(f"model tensor {_clip(name)!r} holds NaN or infinite values")
        return Update(header=self.header, tensors=tensors)


def check_update_header(
    frame: pb.UpdateFrame,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    schema: Schema | None = None,
    dtypes: frozenset[torch.dtype] | None = None,
) -> PendingUpdate:
    """Check a header frame as `update_from_frames` does before it reads any chunk.

    Raises:
        MalformedMessage: when the frame is no header or breaks the format or limits.
    """
    if frame.WhichOneof("kind") != "header":
        raise MalformedMessage("stream must start with a header frame")
    h = frame.header
    if not h.update_id:  # the evaluator joins ground truth on it
        raise MalformedMessage("update_id must be non-empty")
    for field in ("update_id", "origin", "sender", "defence"):
        if len(getattr(h, field).encode()) > MAX_TEXT_BYTES:
            raise MalformedMessage(f"header {field} longer than {MAX_TEXT_BYTES} bytes")
    kind = h.kind or "gradient"  # senders before model gossip leave it empty
    _check_kind(kind, h.mix_round, h.tensors)
    specs = _check_specs(h.tensors, max_bytes, False, schema, dtypes)
    header = UpdateHeader(**{**{f: getattr(h, f) for f in _HEADER_FIELDS}, "kind": kind})
    return PendingUpdate(header, specs)


def _check_kind(kind: str, mix_round: int, specs: Sequence[pb.TensorSpec]) -> None:
    """The header's kind and mix_round (before any tensor is allocated).

    A model message is a whole model state: floating tensors only (a gradient may be a
    masked int64 update); its names and shapes are the schema's, which `_read_chunks` checks.
    """
    if kind not in KINDS:
        raise MalformedMessage(f"header kind must be one of {', '.join(KINDS)}, got {_clip(kind)!r}")
    if mix_round >= MAX_MIX_ROUNDS or (kind == "gradient" and mix_round != 0):
        raise MalformedMessage(f"mix_round must be 0 for a gradient and < {MAX_MIX_ROUNDS} for a model, "
                               f"got {mix_round}")
    if kind == "model":
        bad = [s.name for s in specs if s.dtype not in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16,
                                                        pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64)]
        if bad:
            raise MalformedMessage(f"model tensor {_clip(bad[0])!r} is not floating point")


def model_from_frames(
    frames: Iterable[pb.ModelFrame | RawChunk],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    schema: Schema | None = None,
) -> tuple[str, int, dict[str, torch.Tensor]]:
    """Decode model weights from their frames; return (peer_id, version, state).

    With a schema, the weights must be exactly its names and shapes (checked before
    any allocation), so a hostile server cannot make a puller allocate more.

    Raises:
        MalformedMessage: on any format violation, a SPARSE tensor, over max_bytes, or
            off the schema.
    """
    it = iter(frames)
    h = _first(it).header
    state = _read_chunks(it, h.tensors, max_bytes, dense_only=True, schema=schema)
    return h.peer_id, h.model_version, state


def check_model_header(
    header: pb.ModelHeader, *, max_bytes: int = DEFAULT_MAX_BYTES, schema: Schema | None = None
) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]]]:
    """Check a pulled model's header as `model_from_frames` does; return empty buffers for
    its payloads and the function that decodes them once filled.

    Raises:
        MalformedMessage: on a SPARSE tensor, over max_bytes, or off the schema.
    """
    specs = _check_specs(header.tensors, max_bytes, True, schema)
    buffers = [torch.empty(s.byte_length, dtype=torch.uint8) for s in specs]

    def decode(filled: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s.name: _decode(s, b) for s, b in zip(specs, filled, strict=True)}

    return buffers, decode
