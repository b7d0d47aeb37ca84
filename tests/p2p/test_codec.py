"""Round trips and strict decoding of the protobuf codec."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import codec
from p2p.errors import MalformedMessage
from p2p.update import Update, UpdateHeader

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers, so -0.0 and NaN payloads compare exactly."""
    return t.reshape(-1).view(_INT_OF_WIDTH[t.element_size()])


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same dtypes, shapes and bits."""
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


def make_update(tensors: dict[str, torch.Tensor], update_id: str = "u-1") -> Update:
    """An update with a fixed, non-default header."""
    header = UpdateHeader(
        update_id=update_id,
        origin="peer-a",
        sender="peer-b",
        round=7,
        model_version=3,
        num_samples=16,
        defence="prune:0.9",
        mixing_weight=0.25,
    )
    return Update(header=header, tensors=tensors)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of uniformly random bit patterns (NaNs, infinities and -0.0 included)."""
    numel = int(np.prod(shape, dtype=np.int64))
    raw = np.random.default_rng(seed).bytes(numel * dtype.itemsize)
    flat = torch.empty(len(raw), dtype=torch.uint8)
    flat.numpy()[:] = np.frombuffer(raw, np.uint8)
    return flat.view(dtype).reshape(shape)


def roundtrip(update: Update, **kwargs: object) -> Update:
    """Encode and decode with warnings turned into errors, through both paths: protobuf
    messages, and the bytes the transport sends (hand-built, parsed without a copy),
    which must be the same bytes and decode to the same update."""
    frames = list(codec.update_to_frames(update, **kwargs))  # type: ignore[arg-type]
    wire = list(codec.update_to_wire(update, **kwargs))  # type: ignore[arg-type]
    assert wire == [f.SerializeToString() for f in frames]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = codec.update_from_frames(codec.parse_update_frame(w) for w in wire)
        slow = codec.update_from_frames(frames)
    assert fast.header == slow.header
    assert_bit_exact(fast.tensors, slow.tensors)
    return fast


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("sparse", ["never", "always", "auto"])
def test_dense_and_sparse_roundtrip_is_bit_exact(dtype: torch.dtype, sparse: str) -> None:
    tensor = random_bits((5, 3), dtype, seed=1)
    tensor.view(-1)[::2] = 0  # half zeros, so sparse has something to drop
    update = make_update({"w": tensor, "b": random_bits((4,), dtype, seed=2)})
    got = roundtrip(update, sparse=sparse)
    assert got.header == update.header
    assert_bit_exact(got.tensors, update.tensors)


def test_negative_zero_survives_sparse() -> None:
    tensor = torch.tensor([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5])
    got = roundtrip(make_update({"w": tensor}), sparse="always")
    assert torch.signbit(got.tensors["w"][1])
    assert_bit_exact(got.tensors, {"w": tensor})


@pytest.mark.parametrize("sparse", ["never", "always"])
def test_zero_dim_and_empty_tensors(sparse: str) -> None:
    tensors = {
        "scalar": torch.tensor(-1.5, dtype=torch.float16),
        "zero_scalar": torch.tensor(0, dtype=torch.int8),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
    }
    got = roundtrip(make_update(tensors), sparse=sparse)
    assert_bit_exact(got.tensors, tensors)
    assert got.tensors["scalar"].dim() == 0


def test_empty_tensors_with_zero_strides_encode() -> None:
    # torch.from_numpy gives empty tensors stride 0, which a plain view(uint8) refuses.
    tensors = {"a": torch.from_numpy(np.zeros(0, np.float32)), "b": torch.zeros(0, 3)[:, ::2]}
    for sparse in ("never", "always"):
        assert_bit_exact(roundtrip(make_update(tensors), sparse=sparse).tensors, tensors)


def test_non_contiguous_tensors_roundtrip() -> None:
    tensors = {"t": torch.arange(12.0).reshape(3, 4).t(), "s": torch.arange(10)[::3]}
    assert_bit_exact(roundtrip(make_update(tensors), sparse="never").tensors, tensors)


def test_decoded_tensors_own_writable_memory() -> None:
    update = make_update({"w": torch.arange(6, dtype=torch.float32), "s": torch.eye(4)})
    got = roundtrip(update, sparse="auto")
    for tensor in got.tensors.values():
        tensor.add_(1)  # would warn or fail on a read-only buffer
    assert got.tensors["w"][0].item() == 1.0


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(0, 6), max_size=3).map(tuple),
    density=st.floats(0.0, 1.0),
    sparse=st.sampled_from(["auto", "never", "always"]),
    chunk_bytes=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_property(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    density: float,
    sparse: str,
    chunk_bytes: int,
    seed: int,
) -> None:
    tensor = random_bits(shape, dtype, seed)
    keep = torch.from_numpy(np.random.default_rng(seed + 1).random(tensor.numel()) < density)
    bits(tensor)[~keep] = 0
    update = make_update({"t": tensor, "u": random_bits((2,), dtype, seed + 2)})
    frames = list(codec.update_to_frames(update, chunk_bytes=chunk_bytes, sparse=sparse))
    assert all(len(f.chunk.data) <= chunk_bytes for f in frames[1:])
    assert_bit_exact(codec.update_from_frames(frames).tensors, update.tensors)


def wire_size(update: Update, sparse: str) -> int:
    """Total serialized bytes of the update's frames."""
    return sum(f.ByteSize() for f in codec.update_to_frames(update, sparse=sparse))


def test_auto_sparse_is_smaller_on_the_wire_for_pruned_tensors() -> None:
    pruned = torch.zeros(10_000)
    pruned[::100] = 1.0
    update = make_update({"w": pruned})
    header = next(codec.update_to_frames(update, sparse="auto")).header
    assert header.tensors[0].layout == codec.pb.LAYOUT_SPARSE
    assert wire_size(update, "auto") < wire_size(update, "never") // 5


def test_auto_keeps_dense_tensors_dense() -> None:
    update = make_update({"w": torch.randn(1000) + 10.0})
    header = next(codec.update_to_frames(update, sparse="auto")).header
    assert header.tensors[0].layout == codec.pb.LAYOUT_DENSE
    assert wire_size(update, "auto") < wire_size(update, "always")


def test_large_update_is_split_into_bounded_chunks() -> None:
    chunk_bytes = 1 << 20
    update = make_update({"w": torch.randn(2_000_000)})  # 8 MB, twice gRPC's 4 MiB default
    frames = list(codec.update_to_frames(update, chunk_bytes=chunk_bytes))
    assert len(frames) == 1 + 8  # ceil(8_000_000 / 2**20)
    assert all(len(f.chunk.data) <= chunk_bytes for f in frames[1:])
    assert all(f.ByteSize() < chunk_bytes + 64 for f in frames)
    assert_bit_exact(codec.update_from_frames(frames).tensors, update.tensors)


def test_model_roundtrip_is_dense_and_bit_exact() -> None:
    state = {"w": random_bits((3, 4), torch.bfloat16, 5), "b": torch.zeros(4)}
    frames = list(codec.model_to_frames("peer-a", 12, state, chunk_bytes=5))
    assert all(spec.layout == codec.pb.LAYOUT_DENSE for spec in frames[0].header.tensors)
    peer, version, got = codec.model_from_frames(frames)
    assert (peer, version) == ("peer-a", 12)
    assert_bit_exact(got, state)


def test_unsupported_dtype_is_refused_on_encode() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        list(codec.update_to_frames(make_update({"c": torch.zeros(2, dtype=torch.complex64)})))


# ------------------------------------------------------------------ malformations

Frames = list[codec.UpdateFrame]


def good_frames(sparse: str = "never") -> Frames:
    """Valid frames of a two-tensor update, small chunks, to be broken by a test."""
    pruned = torch.tensor([0.0, 0.0, 5.0, 0.0, 7.0, 0.0, 0.0, 0.0])
    update = make_update({"w": pruned, "b": torch.arange(6, dtype=torch.float32)})
    return list(codec.update_to_frames(update, chunk_bytes=8, sparse=sparse))


def sparse_indices(indices: list[int]) -> Frames:
    """Replace the indices of the sparse tensor "w" (nnz 2, one 16-byte payload)."""
    frames = good_frames(sparse="always")
    values = b"".join(f.chunk.data for f in frames[1:] if f.chunk.tensor_index == 0)[8:]
    rest = [f for f in frames[1:] if f.chunk.tensor_index != 0]
    first = frames[1]
    first.chunk.offset, first.chunk.data = 0, np.array(indices, "<u4").tobytes() + values
    return [frames[0], first, *rest]


def set_spec(field: str, value: object, index: int = 0) -> Callable[[Frames], Frames]:
    """A mutation that sets one field of one TensorSpec in the header."""

    def mutate(frames: Frames) -> Frames:
        spec = frames[0].header.tensors[index]
        if field == "shape":
            del spec.shape[:]
            spec.shape.extend(value)  # type: ignore[call-overload]
        else:
            setattr(spec, field, value)
        return frames

    return mutate


def set_chunk(field: str, value: object, index: int = 1) -> Callable[[Frames], Frames]:
    """A mutation that sets one field of one chunk frame."""

    def mutate(frames: Frames) -> Frames:
        setattr(frames[index].chunk, field, value)
        return frames

    return mutate


MALFORMATIONS: dict[str, tuple[Callable[[Frames], Frames], str]] = {
    "empty stream": (lambda f: [], "header"),
    "missing header": (lambda f: f[1:], "header"),
    "second header": (lambda f: [f[0], f[0], *f[1:]], "chunk frame"),
    "empty frame": (lambda f: [*f, codec.UpdateFrame()], "empty frame"),
    "chunk for unknown tensor": (set_chunk("tensor_index", 7), "undeclared"),
    "chunk at wrong offset": (set_chunk("offset", 3, index=2), "offset"),
    "empty chunk": (set_chunk("data", b""), "empty chunk"),
    "truncated payload": (lambda f: f[:-1], "truncated"),
    "payload past byte_length": (lambda f: [*f, f[-1]], "offset|exceeds"),
    "wrong byte_length": (set_spec("byte_length", 36), "byte_length"),
    "unspecified dtype": (set_spec("dtype", 0), "dtype"),
    "unknown dtype": (set_spec("dtype", 99), "dtype"),
    "unknown layout": (set_spec("layout", 5), "layout"),
    "negative shape": (set_spec("shape", [-8]), "shape"),
    "shape and bytes disagree": (set_spec("shape", [4]), "byte_length"),
    "nnz on a dense tensor": (set_spec("nnz", 1), "nnz"),
    "empty name": (set_spec("name", ""), "non-empty"),
    "duplicate name": (set_spec("name", "b"), "unique"),
    "index out of range": (lambda f: sparse_indices([2, 8]), "out of range"),
    "duplicate index": (lambda f: sparse_indices([4, 4]), "increasing"),
    "decreasing index": (lambda f: sparse_indices([4, 2]), "increasing"),
    "nnz above numel": (
        lambda f: set_spec("byte_length", 72)(set_spec("nnz", 9)(good_frames("always"))),
        "nnz",
    ),
    "empty update_id": (lambda f: [_no_id(f[0]), *f[1:]], "update_id"),
}


def _no_id(frame: codec.UpdateFrame) -> codec.UpdateFrame:
    frame.header.update_id = ""
    return frame


@pytest.mark.parametrize("case", list(MALFORMATIONS))
def test_malformed_frames_raise(case: str) -> None:
    mutate, message = MALFORMATIONS[case]
    frames = mutate(good_frames())
    with pytest.raises(MalformedMessage, match=message):
        codec.update_from_frames(frames)


@pytest.mark.parametrize("case", list(MALFORMATIONS))
def test_malformed_frames_raise_through_the_bytes_path(case: str) -> None:
    # The same breakages as serialized frames, parsed the way the server parses them
    # (chunk frames by the copy-free reader): refused the same way.
    mutate, message = MALFORMATIONS[case]
    wire = [f.SerializeToString() for f in mutate(good_frames())]
    with pytest.raises(MalformedMessage, match=message):
        codec.update_from_frames(codec.parse_update_frame(w) for w in wire)


def chunk_bytes_of(*fields: tuple[int, bytes]) -> bytes:
    """A serialized UpdateFrame whose chunk holds these (tag byte, encoded field) parts."""
    inner = b"".join(bytes([tag]) + body for tag, body in fields)
    return b"\x12" + codec._varint(len(inner)) + inner


def test_chunk_frames_are_read_without_protobuf_and_view_the_frame() -> None:
    wire = list(codec.update_to_wire(make_update({"w": torch.arange(300.0)}), chunk_bytes=512))
    chunks = [codec.parse_update_frame(w) for w in wire[1:]]
    assert all(isinstance(c, codec.RawChunk) for c in chunks)
    assert [(c.tensor_index, c.offset, len(c.data)) for c in chunks] == [(0, 0, 512), (0, 512, 512), (0, 1024, 176)]
    assert chunks[1].data.obj is wire[2]  # a view into the received bytes, not a copy


@pytest.mark.parametrize(
    "frame",
    [
        # data before offset: protobuf reads the fields in any order
        chunk_bytes_of((0x1A, b"\x02ab"), (0x10, b"\x05")),
        # data twice: protobuf keeps the last
        chunk_bytes_of((0x1A, b"\x02zz"), (0x1A, b"\x02ab"), (0x10, b"\x05")),
        # an unknown field after data
        chunk_bytes_of((0x10, b"\x05"), (0x1A, b"\x02ab"), (0x20, b"\x01")),
        # overlong varint for the offset, then tensor_index last
        chunk_bytes_of((0x10, b"\x85\x00"), (0x1A, b"\x02ab"), (0x08, b"\x00")),
    ],
)
def test_other_chunk_layouts_mean_what_protobuf_says(frame: bytes) -> None:
    got = codec.parse_update_frame(frame)
    want = codec.UpdateFrame.FromString(frame)
    chunk = got if isinstance(got, codec.RawChunk) else got.chunk
    assert (chunk.tensor_index, chunk.offset, bytes(chunk.data)) == (
        want.chunk.tensor_index, want.chunk.offset, want.chunk.data
    ) == (0, 5, b"ab")


@pytest.mark.parametrize(
    "frame",
    [
        chunk_bytes_of((0x1A, b"\x05ab")),  # data shorter than its length
        chunk_bytes_of((0x1A, b"\x02ab"))[:-1],  # frame cut short
        b"\x12\x05" + b"\x1a\x02ab",  # chunk length past the frame
        b"\x12\x04\x10\xff\xff\xff",  # offset varint never ends
    ],
)
def test_truncated_chunk_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(MalformedMessage, match="cannot parse"):
        codec.parse_update_frame(frame)


def test_stream_starting_with_a_chunk_is_refused_on_the_bytes_path() -> None:
    wire = list(codec.update_to_wire(make_update({"w": torch.ones(4)})))
    with pytest.raises(MalformedMessage, match="header"):
        codec.update_from_frames(codec.parse_update_frame(w) for w in wire[1:])


def test_model_bytes_roundtrip_through_the_copy_free_reader() -> None:
    state = {"w": random_bits((40, 3), torch.float32, seed=5), "n": torch.tensor(3)}
    wire = list(codec.model_to_wire("p", 4, state, chunk_bytes=64))
    assert wire == [f.SerializeToString() for f in codec.model_to_frames("p", 4, state, chunk_bytes=64)]
    peer, version, got = codec.model_from_frames(codec.parse_model_frame(w) for w in wire)
    assert (peer, version) == ("p", 4)
    assert_bit_exact(got, state)


def test_sparse_wire_bytes_grow_with_k_not_with_the_dense_size() -> None:
    # 8 bytes per kept float32 value (4 index + 4 value), whatever the dense size.
    def wire_bytes(numel: int, k: int) -> int:
        t = torch.zeros(numel)
        t[torch.arange(k) * (numel // k)] = 1.5
        return sum(len(w) for w in codec.update_to_wire(make_update({"w": t}), sparse="auto"))

    base = wire_bytes(100_000, 100)
    assert wire_bytes(100_000, 1100) - base == pytest.approx(8 * 1000, abs=16)
    assert abs(wire_bytes(10_000_000, 100) - base) <= 16


def test_sanity_unbroken_frames_decode() -> None:
    assert len(codec.update_from_frames(good_frames()).tensors) == 2
    assert len(codec.update_from_frames(good_frames("always")).tensors) == 2
    assert len(codec.update_from_frames(sparse_indices([2, 4])).tensors) == 2


def test_oversize_payload_is_refused_before_any_chunk_is_read() -> None:
    def frames() -> object:
        yield from good_frames()[:1]
        raise AssertionError("decoder read past the header of an oversize message")

    with pytest.raises(MalformedMessage, match="too large"):
        codec.update_from_frames(frames(), max_bytes=32)  # type: ignore[arg-type]


def test_sparse_tensor_with_huge_dense_shape_is_refused() -> None:
    # 8 payload bytes on the wire, but 8 GiB once decoded: the decoded size counts too.
    frames = good_frames("always")
    set_spec("shape", [2**31])(frames)
    with pytest.raises(MalformedMessage, match="too large"):
        codec.update_from_frames(frames)


def test_model_frames_refuse_sparse_layout() -> None:
    frames = list(codec.model_to_frames("p", 1, {"w": torch.zeros(4)}))
    frames[0].header.tensors[0].layout = codec.pb.LAYOUT_SPARSE
    with pytest.raises(MalformedMessage, match="SPARSE"):
        codec.model_from_frames(frames)


def test_garbage_bytes_raise_malformed() -> None:
    with pytest.raises(MalformedMessage, match="cannot parse"):
        codec.parse_update_frame(b"\xff\xff\xff\xff")


def test_every_header_field_travels() -> None:
    # A field added to UpdateHeader but not to the codec's list would silently arrive as its default.
    import dataclasses

    from p2p.codec import _HEADER_FIELDS
    from p2p.update import UpdateHeader

    assert set(_HEADER_FIELDS) == {f.name for f in dataclasses.fields(UpdateHeader)}


@pytest.mark.parametrize(("share", "layout"), [(1.0, "DENSE"), (0.6, "DENSE"), (0.45, "SPARSE"), (0.05, "SPARSE")])
def test_auto_layout_of_a_large_tensor_is_the_smaller_one(share: float, layout: str) -> None:
    # 200k elements: judged on a strided sample first, counted exactly near the break-even share (0.5).
    g = torch.Generator().manual_seed(3)
    t = torch.randn(200_000, generator=g)
    t[torch.rand(200_000, generator=g) >= share] = 0.0
    header, payloads = codec.update_to_bulk(make_update({"w": t}), sparse="auto")
    spec = codec.UpdateFrame.FromString(header).header.tensors[0]
    assert codec.pb.Layout.Name(spec.layout) == f"LAYOUT_{layout}"
    nnz = int((t != 0).sum())
    assert payloads[0].size == min(nnz * 8, t.numel() * 4)
