"""Model gossip's averaging (p2p.model_gossip), its routing in Peer, and the header fields on the wire."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from p2p import codec
from p2p.defences import parse_defence
from p2p.errors import (
    DuplicateUpdate,
    MalformedMessage,
    PermissionDenied,
    ResourceExhausted,
    UpdateRejected,
)
from p2p.model_gossip import ModelGossip
from p2p.peer import Peer
from p2p.update import Update, UpdateHeader

SHAPES = {"w": (2, 3), "b": (3,)}
ROW = {"a": 0.5, "b": 0.3, "c": 0.2}  # row a of W: neighbours b and c


def state(value: float) -> dict[str, torch.Tensor]:
    return {n: torch.full(s, value, dtype=torch.float32) for n, s in SHAPES.items()}


def message(origin: str, step: int, r: int, tensors: dict[str, torch.Tensor], weight: float | None = None,
            **extra: object) -> Update:
    h = UpdateHeader(update_id=f"{origin}/r{step}/m{r}", origin=origin, sender=origin, round=step,
                     model_version=step - 1, num_samples=2, mixing_weight=ROW[origin] if weight is None else weight,
                     kind="model", mix_round=r)
    return Update(dataclasses.replace(h, **extra), tensors)  # type: ignore[arg-type]


def gossip(lockstep: bool = True, **kw: object) -> ModelGossip:
    g = ModelGossip("a", ROW, mix_rounds=2, lockstep=lockstep, shapes=SHAPES, max_round=10, **kw)  # type: ignore[arg-type]
    g.start(1, state(1.0))
    return g


def test_weights_are_applied_in_float64_and_rounded_to_float32() -> None:
    g = gossip()
    g.accept(message("b", 1, 0, state(2.0)), 0.0)
    g.accept(message("c", 1, 0, state(4.0)), 0.0)
    rows = g.average()
    want = np.float32(0.5 * 1.0 + 0.3 * 2.0 + 0.2 * 4.0)
    assert all(bool((t == torch.tensor(want)).all()) for t in g.current().values())
    assert [(r.sender, r.weight, r.lag) for r in rows] == [("b", 0.3, 0), ("c", 0.2, 0)]
    # Round 1 uses round-1 messages only.
    g.accept(message("b", 1, 1, state(0.0)), 0.0)
    g.average()
    assert torch.allclose(g.current()["w"], torch.tensor((0.5 + 0.2) * float(want) + 0.3 * 0.0))


def test_a_missing_neighbour_gives_its_weight_to_self() -> None:
    g = gossip()
    g.accept(message("b", 1, 0, state(2.0)), 0.0)
    rows = g.average()
    assert torch.allclose(g.current()["b"], torch.tensor((0.5 + 0.2) * 1.0 + 0.3 * 2.0))
    missing = [r for r in rows if r.lag is None]
    assert [(r.sender, r.weight) for r in missing] == [("c", 0.0)]
    assert g.stats["missing"] == 1 and g.stats["used"] == 1


def test_lockstep_discards_late_messages_and_async_takes_the_newest_with_its_lag() -> None:
    sync = gossip()
    sync.start(2, state(1.0))  # step 2; b's step-1 model arrives late
    sync.accept(message("b", 1, 1, state(9.0)), 0.0)
    sync.average()
    assert torch.allclose(sync.current()["w"], torch.tensor(1.0)) and sync.stats["late"] == 1
    late = gossip(lockstep=False)
    late.start(3, state(1.0))
    late.accept(message("b", 1, 1, state(5.0)), 0.0)
    late.accept(message("b", 2, 0, state(3.0)), 0.0)  # the newest of b's
    rows = late.average()
    assert torch.allclose(late.current()["w"], torch.tensor(0.7 * 1.0 + 0.3 * 3.0))
    assert [r.lag for r in rows] == [2, None]  # (3 - 2) * 2 + (0 - 0) mix rounds behind; c missing
    assert late.pending() == 0  # superseded ones are gone too


@pytest.mark.parametrize("case", ["weight", "stranger", "nan", "shape", "names", "step", "mix_round",
                                  "gradient", "far", "duplicate", "full"])
def test_bad_model_messages_are_refused_and_change_nothing(case: str) -> None:
    g = gossip(max_norm=100.0, max_pending_per_origin=1)
    g.accept(message("c", 1, 1, state(1.0)), 0.0)  # already held: the duplicate / full cases
    bad_state = state(2.0)
    if case == "nan":
        bad_state["w"][0, 0] = float("nan")
    elif case == "shape":
        bad_state["w"] = torch.zeros(3, 2)
    elif case == "names":
        bad_state["extra"] = torch.zeros(1)
    elif case == "far":
        bad_state = state(1e3)
    origin, step, r, extra = "b", 1, 0, {}
    weight = {"weight": 0.25}.get(case)
    if case == "stranger":
        origin = "z"
    if case == "step":
        step = 11
    if case == "mix_round":
        r = 2
    if case == "gradient":
        extra = {"kind": "gradient", "mix_round": 0}
    if case in ("duplicate", "full"):
        origin, r = "c", 1 if case == "duplicate" else 0
    upd = (message(origin, step, r, bad_state, weight, **extra) if origin != "z" else
           Update(dataclasses.replace(message("b", 1, 0, bad_state).header, origin="z", sender="z"), bad_state))
    before = (g.pending(), dict(g.stats))
    errors = {"stranger": PermissionDenied, "duplicate": DuplicateUpdate, "full": ResourceExhausted}
    with pytest.raises(errors.get(case, UpdateRejected)):
        g.accept(upd, 0.0)
    assert (g.pending(), g.stats) == before
    g.average()  # round 0: nobody's round-0 model is in, so z stays
    assert torch.equal(g.current()["w"], state(1.0)["w"])


def _peer(models: ModelGossip | None, digits_data) -> Peer:
    from gradleak.core.models import create_model

    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    return Peer("a", model, digits_data.images[:20], digits_data.labels[:20], batch_size=2,
                defence=parse_defence("none"), lr=0.1, keep_versions=4, seed=0, optimizer="sgd", models=models)


def test_peer_routes_model_messages_and_refuses_the_other_kind(digits_data) -> None:
    plain = _peer(None, digits_data)
    shapes = plain.schema()
    g = ModelGossip("a", ROW, mix_rounds=1, lockstep=True, shapes=shapes)
    peer = _peer(g, digits_data)
    x0 = {n: p.detach().clone() for n, p in peer.model.named_parameters()}
    h, _batch = peer.half_step()
    # h = x - lr * g; the model itself stays at x until the averaging rounds end
    assert all(torch.equal(p, x0[n]) for n, p in peer.model.named_parameters())
    assert any(not torch.equal(h[n], x0[n]) for n in x0)
    g.start(1, h)
    theirs = {n: t + 1.0 for n, t in h.items()}
    peer.accept_update(message("b", 1, 0, theirs))
    assert g.pending() == 1 and peer.pending() == 0
    gradient = Update(UpdateHeader("b/r1", "b", "b", 1, 0, 2), {n: torch.zeros(s) for n, s in shapes.items()})
    with pytest.raises(UpdateRejected, match="gossips models"):
        peer.accept_update(gradient)
    with pytest.raises(UpdateRejected, match="gossips gradients"):
        plain.accept_update(message("b", 1, 0, theirs))
    assert plain.pending() == 0
    g.average()
    assert peer.set_weights(g.current()) == 1
    _v, kept = peer.model_at(1)
    # b's weight 0.3, c missing: z = 0.7 h + 0.3 (h + 1)
    assert all(torch.allclose(kept[n], h[n] + 0.3, atol=1e-6) for n in h)


def test_codec_carries_kind_and_mix_round() -> None:
    upd = message("b", 3, 1, state(0.5))
    back = codec.update_from_frames(codec.update_to_frames(upd), schema=SHAPES)
    assert back.header == upd.header and back.header.kind == "model" and back.header.mix_round == 1
    old = Update(UpdateHeader("g/r1", "g", "g", 1, 0, 1), state(0.0))  # a gradient keeps the defaults
    assert codec.update_from_frames(codec.update_to_frames(old)).header == old.header


@pytest.mark.parametrize("case", ["kind", "mix_round", "gradient_round", "nan", "int", "names"])
def test_codec_refuses_bad_model_headers(case: str) -> None:
    tensors = state(0.5)
    header = message("b", 3, 1, tensors).header
    if case == "kind":
        header = dataclasses.replace(header, kind="weights")
    elif case == "mix_round":
        header = dataclasses.replace(header, mix_round=1024)
    elif case == "gradient_round":
        header = dataclasses.replace(header, kind="gradient", mix_round=2)
    elif case == "nan":
        tensors["b"][1] = float("inf")
    elif case == "int":
        tensors["b"] = torch.zeros(3, dtype=torch.int64)
    elif case == "names":
        tensors = {"w": tensors["w"]}
    with pytest.raises(MalformedMessage):
        codec.update_from_frames(codec.update_to_frames(Update(header, tensors)), schema=SHAPES)


def test_float64_gossip_keeps_every_round_exact_in_float64() -> None:
    g = ModelGossip("a", ROW, mix_rounds=2, lockstep=True, shapes=SHAPES, max_round=10, dtype=torch.float64)
    g.start(1, state(1.0))  # a float32 half-step, averaged and sent as float64
    third = {n: torch.full(s, 1 / 3, dtype=torch.float64) for n, s in SHAPES.items()}
    g.accept(message("b", 1, 0, third), 0.0)
    g.accept(message("c", 1, 0, state(4.0)), 0.0)
    g.average()
    want = 0.5 * 1.0 + 0.3 * (1 / 3) + 0.2 * 4.0
    z = g.current()
    assert all(t.dtype == torch.float64 for t in z.values())
    assert all(bool((t == torch.tensor(want, dtype=torch.float64)).all()) for t in z.values())
    assert float(z["w"][0, 0]) != float(np.float32(want))  # float32 would have rounded it


def test_an_unknown_gossip_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        ModelGossip("a", ROW, mix_rounds=1, lockstep=True, shapes=SHAPES, dtype=torch.float16)
