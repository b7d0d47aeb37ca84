"""Generated hostile gossip traffic for the fuzz and soak suite (test code, not the product).

Every message is a list of raw PushUpdate frames (bytes) built from one valid update of
the target's model, then broken in one way: garbage bytes, a header that lies about its
tensors, chunks that overrun or stop short, numbers at the edges of their types, identities
that are not the sender's, replays. Each carries what the peer must do with it:

- "reject": refused at the door with a non-OK status, and the peer's state unchanged;
- "accept": an honest update, which must succeed while everything else goes on;
- "poison": well-formed and finite but extreme; the peer may take it, but its model must
  stay finite (aggregation integrity).

Kinds that cost the sender time (stalled and trickling streams, bursts of concurrent
calls) are driven by the runner in the test, not built here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from p2p import codec
from p2p.proto import gossip_pb2 as pb
from p2p.update import Update, UpdateHeader

PUSH = f"/{codec.SERVICE_NAME}/PushUpdate"
MODEL = f"/{codec.SERVICE_NAME}/GetModel"


@dataclass
class Message:
    kind: str
    frames: list[bytes]
    expect: str  # "reject" | "accept" | "poison"
    origin: str = ""
    round: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class Traffic:
    """A seeded generator of messages against a peer whose model has `shapes`.

    Honest updates come from `origins` (members other than the target), with rounds
    that only go up per origin, so "one update per origin per step" never refuses them.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], target_id: str, origins: list[str],
                 seed: int = 0, max_round: int = 1_000_000, attacker: str | None = None) -> None:
        self.shapes = shapes
        self.target = target_id
        self.origins = origins
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_round = max_round
        self.attacker = attacker  # broken messages come from this member (else from the origins)
        self._round = dict.fromkeys([*origins, *([attacker] if attacker else [])], 0)
        self._n = 0
        self.last_accepted: Message | None = None
        self.mutations: list[Callable[[], Message]] = [
            self.garbage, self.bad_dtype, self.bad_shape, self.unknown_name, self.missing_name,
            self.duplicate_name, self.empty_name, self.byte_length_lie, self.truncated, self.overrun,
            self.bad_index, self.bad_offset, self.empty_chunk, self.chunk_first, self.two_headers,
            self.empty_update_id, self.huge_sparse, self.sparse_out_of_range, self.sparse_unsorted,
            self.nnz_over_numel, self.many_specs, self.deep_shape, self.nan_values, self.inf_values,
            self.zero_samples, self.zero_round, self.bad_mixing, self.bad_sent_at, self.spoof_origin,
            self.impersonate, self.self_origin, self.replay, self.long_strings,
            self.huge_values, self.huge_samples, self.huge_mixing, self.far_round,
        ]

    # -- building blocks --------------------------------------------------------------
    def _next(self, origin: str | None = None) -> tuple[str, int]:
        origin = origin or self.rng.choice(self.origins)
        self._round[origin] += 1
        return origin, self._round[origin]

    def _bad(self) -> tuple[str, int]:
        return self._next(self.attacker)

    def _update(self, origin: str, round_: int, scale: float = 1e-3, **header: object) -> Update:
        self._n += 1
        tensors = {n: torch.randn(s, generator=self.gen) * scale for n, s in self.shapes.items()}
        fields: dict[str, object] = {"update_id": f"fuzz-{self._n}-{self.rng.getrandbits(32):08x}",
                                         "origin": origin, "sender": origin, "round": round_, "model_version": 0,
                                         "num_samples": 1, "defence": "none", "mixing_weight": 1.0, "sent_at": 0.0}
        fields.update(header)
        return Update(UpdateHeader(**fields), tensors)  # type: ignore[arg-type]

    def _frames(self, update: Update, chunk_bytes: int = 1 << 14) -> list[pb.UpdateFrame]:
        return list(codec.update_to_frames(update, chunk_bytes=chunk_bytes, sparse="never"))

    def _valid_frames(self) -> tuple[list[pb.UpdateFrame], str, int]:
        origin, round_ = self._bad()
        return self._frames(self._update(origin, round_)), origin, round_

    @staticmethod
    def _raw(frames: list[pb.UpdateFrame]) -> list[bytes]:
        return [f.SerializeToString() for f in frames]

    def _reject(self, kind: str, frames: list[pb.UpdateFrame] | list[bytes]) -> Message:
        raw = frames if frames and isinstance(frames[0], bytes) else self._raw(frames)  # type: ignore[arg-type]
        return Message(kind, raw, "reject")  # type: ignore[arg-type]

    def _header_broken(self, kind: str, edit: Callable[[pb.UpdateHeader], None]) -> Message:
        frames, _o, _r = self._valid_frames()
        edit(frames[0].header)
        return self._reject(kind, frames)

    # -- the honest update --------------------------------------------------------------
    def honest(self) -> Message:
        origin, round_ = self._next()
        msg = Message("honest", self._raw(self._frames(self._update(origin, round_))), "accept", origin, round_)
        self.last_accepted = msg
        return msg

    # -- one broken message per kind --------------------------------------------------
    def garbage(self) -> Message:
        n = self.rng.randint(1, 3)
        return self._reject("garbage", [self.rng.randbytes(self.rng.randint(1, 300)) for _ in range(n)])

    def bad_dtype(self) -> Message:
        return self._header_broken("bad_dtype", lambda h: setattr(h.tensors[0], "dtype", self.rng.choice([0, 99])))

    def bad_shape(self) -> Message:
        def edit(h: pb.UpdateHeader) -> None:
            s = h.tensors[self.rng.randrange(len(h.tensors))]
            s.shape[0] = s.shape[0] + 1
            s.byte_length = 4
            for d in s.shape:
                s.byte_length *= d
        return self._header_broken("bad_shape", edit)

    def unknown_name(self) -> Message:
        return self._header_broken("unknown_name", lambda h: setattr(h.tensors[0], "name", "evil.weight"))

    def missing_name(self) -> Message:
        origin, round_ = self._bad()
        u = self._update(origin, round_)
        first = next(iter(u.tensors))
        return self._reject("missing_name", self._frames(Update(u.header, {k: v for k, v in u.tensors.items()
                                                                            if k != first})))

    def duplicate_name(self) -> Message:
        return self._header_broken("duplicate_name", lambda h: setattr(h.tensors[1], "name", h.tensors[0].name))

    def empty_name(self) -> Message:
        return self._header_broken("empty_name", lambda h: setattr(h.tensors[0], "name", ""))

    def byte_length_lie(self) -> Message:
        return self._header_broken("byte_length_lie", lambda h: setattr(
            h.tensors[0], "byte_length", h.tensors[0].byte_length + self.rng.choice([-4, 4, 1])))

    def truncated(self) -> Message:
        frames, _o, _r = self._valid_frames()
        return self._reject("truncated", frames[:-1])

    def overrun(self) -> Message:
        frames, _o, _r = self._valid_frames()
        last = pb.UpdateFrame()
        last.CopyFrom(frames[-1])
        last.chunk.offset += len(last.chunk.data)
        return self._reject("overrun", [*frames, last])

    def bad_index(self) -> Message:
        frames, _o, _r = self._valid_frames()
        frames[1].chunk.tensor_index = self.rng.choice([len(self.shapes), 2**32 - 1])
        return self._reject("bad_index", frames)

    def bad_offset(self) -> Message:
        frames, _o, _r = self._valid_frames()
        frames[1].chunk.offset += self.rng.choice([1, 2**40])
        return self._reject("bad_offset", frames)

    def empty_chunk(self) -> Message:
        frames, _o, _r = self._valid_frames()
        empty = pb.UpdateFrame(chunk=pb.Chunk(tensor_index=0, offset=0, data=b""))
        return self._reject("empty_chunk", [frames[0], empty, *frames[1:]])

    def chunk_first(self) -> Message:
        frames, _o, _r = self._valid_frames()
        return self._reject("chunk_first", frames[1:] + frames[:1])

    def two_headers(self) -> Message:
        frames, _o, _r = self._valid_frames()
        return self._reject("two_headers", [frames[0], *frames])

    def empty_update_id(self) -> Message:
        return self._header_broken("empty_update_id", lambda h: setattr(h, "update_id", ""))

    def huge_sparse(self) -> Message:
        # The 47-byte request: a sparse tensor of 64M elements with nothing stored.
        def edit(h: pb.UpdateHeader) -> None:
            s = h.tensors[0]
            del s.shape[:]
            s.shape.append(64 << 20)
            s.layout, s.nnz, s.byte_length = pb.LAYOUT_SPARSE, 0, 0
        frames, _o, _r = self._valid_frames()
        edit(frames[0].header)
        return self._reject("huge_sparse", [f for f in frames if f.WhichOneof("kind") == "header"
                                            or f.chunk.tensor_index != 0])

    def sparse_out_of_range(self) -> Message:
        origin, round_ = self._bad()
        u = self._update(origin, round_)
        return self._sparse_index_edit("sparse_out_of_range", u, lambda idx: idx.__setitem__(-1, 10**9))

    def sparse_unsorted(self) -> Message:
        origin, round_ = self._bad()
        u = self._update(origin, round_)
        return self._sparse_index_edit("sparse_unsorted", u, lambda idx: idx.reverse())

    def _sparse_index_edit(self, kind: str, u: Update, edit: Callable[[list[int]], None]) -> Message:
        # One sparse tensor of a few stored values, its index list edited.
        name, shape = next(iter(self.shapes.items()))
        numel = 1
        for d in shape:
            numel *= d
        idx = sorted(self.rng.sample(range(numel), 3))
        edit(idx)
        index_bytes = b"".join(int(i).to_bytes(4, "little", signed=False) if 0 <= i < 2**32
                               else (2**32 - 1).to_bytes(4, "little") for i in idx)
        values = torch.ones(3, dtype=torch.float32).numpy().tobytes()
        frames = self._frames(u)
        h = frames[0].header
        spec = h.tensors[0]
        assert spec.name == name
        spec.layout, spec.nnz, spec.byte_length = pb.LAYOUT_SPARSE, 3, len(index_bytes) + len(values)
        rest = [f for f in frames[1:] if f.chunk.tensor_index != 0]
        chunk = pb.UpdateFrame(chunk=pb.Chunk(tensor_index=0, offset=0, data=index_bytes + values))
        return self._reject(kind, [frames[0], chunk, *rest])

    def nnz_over_numel(self) -> Message:
        def edit(h: pb.UpdateHeader) -> None:
            s = h.tensors[0]
            s.layout, s.nnz = pb.LAYOUT_SPARSE, 10**12
            s.byte_length = s.nnz * 8
        return self._header_broken("nnz_over_numel", edit)

    def many_specs(self) -> Message:
        # Cheaper than the 300k of the finding, same point: specs beyond the model's count.
        def edit(h: pb.UpdateHeader) -> None:
            for k in range(self.rng.choice([100, 3000])):
                h.tensors.add(name=f"x{k}", dtype=pb.DTYPE_FLOAT32)
        return self._header_broken("many_specs", edit)

    def deep_shape(self) -> Message:
        def edit(h: pb.UpdateHeader) -> None:
            s = h.tensors[0]
            del s.shape[:]
            s.shape.extend([1] * 100)
            s.byte_length = 4
        return self._header_broken("deep_shape", edit)

    def _values(self, kind: str, value: float) -> Message:
        origin, round_ = self._bad()
        u = self._update(origin, round_)
        name = self.rng.choice(list(u.tensors))
        t = u.tensors[name].clone()
        t.view(-1)[self.rng.randrange(t.numel())] = value
        return Message(kind, self._raw(self._frames(Update(u.header, {**u.tensors, name: t}))), "reject")

    def nan_values(self) -> Message:
        return self._values("nan_values", float("nan"))

    def inf_values(self) -> Message:
        return self._values("inf_values", float(self.rng.choice(["inf", "-inf"])))

    def zero_samples(self) -> Message:
        return self._header_broken("zero_samples", lambda h: setattr(h, "num_samples", 0))

    def zero_round(self) -> Message:
        return self._header_broken("zero_round", lambda h: setattr(h, "round", 0))

    def bad_mixing(self) -> Message:
        return self._header_broken("bad_mixing", lambda h: setattr(
            h, "mixing_weight", self.rng.choice([0.0, -1.0, float("nan"), float("inf")])))

    def bad_sent_at(self) -> Message:
        return self._header_broken("bad_sent_at", lambda h: setattr(
            h, "sent_at", self.rng.choice([float("nan"), -1.0, float("inf")])))

    def spoof_origin(self) -> Message:
        # Plaintext: the sender claims another member computed it.
        origin, round_ = self._bad()
        other = self.rng.choice([o for o in self.origins if o != origin] or ["nobody"])
        u = self._update(origin, round_, sender=other)
        return self._reject("spoof_origin", self._frames(u))

    def impersonate(self) -> Message:
        # Under mutual TLS: the attacker's certificate sends as an honest member.
        other = self.rng.choice(self.origins)
        u = self._update(other, self.rng.randint(1, self.max_round))
        return self._reject("impersonate", self._frames(u))

    def self_origin(self) -> Message:
        u = self._update(self.target, self.rng.randint(1, 1000))
        return self._reject("self_origin", self._frames(u))

    def replay(self) -> Message:
        if self.last_accepted is None:
            return self.garbage()
        return Message("replay", list(self.last_accepted.frames), "reject")

    def long_strings(self) -> Message:
        return self._header_broken("long_strings", lambda h: setattr(h, "defence", "d" * 200_000))

    # -- extreme but well-formed: may be taken, must not poison -------------------------
    def huge_values(self) -> Message:
        origin, round_ = self._bad()
        u = self._update(origin, round_)
        u = Update(u.header, {n: torch.full_like(t, 3e38) for n, t in u.tensors.items()})
        return Message("huge_values", self._raw(self._frames(u)), "poison", origin, round_)

    def huge_samples(self) -> Message:
        return self._header_broken("huge_samples", lambda h: setattr(h, "num_samples", 2**63))

    def huge_mixing(self) -> Message:
        return self._header_broken("huge_mixing", lambda h: setattr(h, "mixing_weight", 1e308))

    def far_round(self) -> Message:
        return self._header_broken("far_round", lambda h: setattr(h, "round", 10**9))

    # -- the stream -----------------------------------------------------------------------
    def stream(self, n: int, honest_every: int = 10) -> Iterator[Message]:
        """n messages: an honest one every honest_every, the rest drawn from every kind in turn."""
        order = list(self.mutations)
        for k in range(n):
            if k % honest_every == 0:
                yield self.honest()
            else:
                if k % len(order) == 0:
                    self.rng.shuffle(order)
                yield order[k % len(order)]()


__all__ = ["MODEL", "PUSH", "Message", "Traffic"]
