"""Aggregation integrity and inbox bounds (issue 11, items 3 and 4) against a real server.

A real Peer behind a GossipServer on 127.0.0.1; the attacks are pushed as a member
would, with GossipClient. Each poisoning finding now gets its status and leaves the
peer's inbox and weights as they were; the inbox keeps its bounds under a flood.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from p2p.defences import parse_defence
from p2p.errors import ResourceExhausted, TransportError, UpdateRejected
from p2p.peer import InboxLimits, Peer
from p2p.secagg import create_group
from p2p.staleness import parse_staleness
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader


def _peer(digits_data, lenet, pid: str = "a", **kw: object) -> Peer:
    args: dict = {"batch_size": 2, "defence": parse_defence("none"), "lr": 0.1, "keep_versions": 4, "seed": 1,
                  "optimizer": "sgd", "max_samples": 8, "inbox": InboxLimits(max_round=300)}
    args.update(kw)
    return Peer(pid, lenet, digits_data.images[:100], digits_data.labels[:100], **args)


def _update(peer: Peer, origin: str = "b", round_: int = 1, fill: float | None = None, **header: object) -> Update:
    """A well-formed update for `peer`'s model (small random values, or all `fill`)."""
    g = torch.Generator().manual_seed(round_)
    tensors = {n: (torch.full(p.shape, fill) if fill is not None else 0.01 * torch.randn(p.shape, generator=g))
               for n, p in peer.model.named_parameters()}
    fields = {"update_id": f"{origin}/r{round_}", "origin": origin, "sender": origin, "round": round_,
              "model_version": 0, "num_samples": 2, **header}
    return Update(UpdateHeader(**fields), tensors)  # type: ignore[arg-type]


def _weights(peer: Peer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peer.model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture
def served(digits_data, lenet) -> Iterator[tuple[Peer, GossipClient]]:
    peer = _peer(digits_data, lenet)
    server = GossipServer(peer, "a", port=0)
    server.start()
    client = GossipClient(server.address, timeout_s=5)
    yield peer, client
    client.close()
    server.stop(grace=0)


def _status(client: GossipClient, update: Update) -> str:
    try:
        client.push_update(update)
    except TransportError as exc:
        return exc.code
    return "OK"


def test_each_poisoning_finding_is_refused_with_its_status_and_changes_nothing(served) -> None:
    peer, client = served
    before = _weights(peer)
    findings = {
        "finite values of 3e38": _update(peer, fill=3e38),
        "mixing_weight 1e308": _update(peer, mixing_weight=1e308),
        "mixing_weight 1.5": _update(peer, mixing_weight=1.5),
        "num_samples 2^63": _update(peer, num_samples=2**63),
        "num_samples above the largest batch": _update(peer, num_samples=9),
        # finite, in range, but 1% over the default L2 bound of 1e4
        "norm over the bound": _update(peer, fill=1.01e4 / math.sqrt(sum(t.numel() for t in before.values()))),
    }
    for what, update in findings.items():
        assert _status(client, update) == "INVALID_ARGUMENT", what
        assert peer.pending() == 0, what
    assert peer.apply_pending() == [] and _same(_weights(peer), before)  # nothing was filed
    # The same origin and ids are still free: an honest update of the same step is taken and applied.
    assert _status(client, _update(peer)) == "OK"
    assert len(peer.apply_pending()) == 1
    after = _weights(peer)
    assert not _same(after, before) and all(bool(torch.isfinite(t).all()) for t in after.values())
    assert peer.aggregate_stats["refused_steps"] == 0


def test_a_round_beyond_the_run_is_refused_and_an_old_one_outside_the_window(served) -> None:
    peer, client = served
    assert _status(client, _update(peer, round_=10**9)) == "INVALID_ARGUMENT"
    assert _status(client, _update(peer, round_=301)) == "INVALID_ARGUMENT"
    assert peer.pending() == 0
    assert _status(client, _update(peer, round_=300)) == "OK"  # the run's last step
    assert _status(client, _update(peer, round_=300 - 64)) == "OK"  # at the window's edge
    assert _status(client, _update(peer, round_=300 - 65)) == "RESOURCE_EXHAUSTED"
    assert _status(client, _update(peer, origin="c", round_=1)) == "OK"  # other origins have their own
    assert peer.pending() == 3


def test_late_updates_inside_the_window_are_kept_and_weighed_by_staleness(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet, staleness=parse_staleness("poly:1"))
    for _ in range(5):
        peer.apply_pending()  # the receiver moves on to version 5
    peer.accept_update(_update(peer, round_=10))
    peer.accept_update(_update(peer, round_=3))  # late, taken at version 0, inside the window
    rows = {a.header.round: a for a in peer.apply_pending()}
    assert rows[3].lag == 5 and rows[3].weight == pytest.approx(2 / 6)


def test_per_origin_and_total_caps_give_resource_exhausted(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet, inbox=InboxLimits(max_round=300, max_pending_per_origin=3, max_pending=5))
    server = GossipServer(peer, "a", port=0)
    server.start()
    try:
        with GossipClient(server.address, timeout_s=5) as client:
            codes = [_status(client, _update(peer, "b", r)) for r in range(1, 6)]
            assert codes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
            assert [_status(client, _update(peer, "c", r)) for r in (1, 2, 3)] == ["OK", "OK", "RESOURCE_EXHAUSTED"]
            assert peer.pending() == 5
            assert len(peer.apply_pending()) == 5
            assert _status(client, _update(peer, "b", 4)) == "OK"  # room again after the apply
    finally:
        server.stop(grace=0)


def test_masked_steps_waiting_for_their_group_are_bounded(digits_data, lenet) -> None:
    group = create_group(["a", "b", "c"], seed=1)
    peer = _peer(digits_data, lenet, secagg=group["a"], secagg_wait=100,
                 inbox=InboxLimits(max_round=300, max_masked_steps=2))
    masked = []
    for r in (1, 2, 3):
        plain = _update(peer, "b", r)
        masked.append(Update(UpdateHeader(**{**vars(plain.header), "defence": group["b"].name}),
                             group["b"].mask(plain.tensors, r, weight=2)))
    peer.accept_update(masked[0])
    peer.accept_update(masked[1])
    with pytest.raises(ResourceExhausted, match="masked updates of 2 steps"):
        peer.accept_update(masked[2])
    assert peer.pending() == 2


def test_the_inbox_stays_bounded_under_a_flood_of_ten_thousand_updates(digits_data, lenet) -> None:
    limits = InboxLimits(max_round=300, max_pending_per_origin=4, max_pending=64, max_origins=128)
    peer = _peer(digits_data, lenet, inbox=limits)
    one = _update(peer).nbytes()
    taken = refused = 0
    for i in range(10_000):  # 500 origins x 20 steps, each update its own tensors
        origin, step = f"flood{i % 500}", 1 + i // 500
        try:
            peer.accept_update(_update(peer, origin, step, fill=0.001))
            taken += 1
        except ResourceExhausted:
            refused += 1
    held = peer._pending + [x for group in peer._masked.values() for x in group]
    assert taken == 64 and refused == 10_000 - 64 and peer.pending() == 64
    assert sum(u.nbytes() for u, _t in held) == 64 * one  # ~2.4 MB, not 10^4 x 38 KB
    assert len(peer._newest) <= limits.max_origins and len(peer._seen) == taken  # refused ids are not kept
    before = _weights(peer)
    assert len(peer.apply_pending()) == 64 and peer.pending() == 0
    assert not _same(_weights(peer), before)


def test_a_step_over_the_norm_bound_is_refused_counted_and_changes_nothing(digits_data, lenet) -> None:
    # The own update is never validated on receipt: with a tiny bound its aggregate is over it.
    peer = _peer(digits_data, lenet, max_update_norm=1e-3)
    before = _weights(peer)
    peer.local_update(1)
    assert len(peer.apply_pending()) == 1
    assert peer.last_refusal == "over_norm" and peer.last_norm is not None and peer.last_norm > 1e-3
    assert peer.aggregate_stats == {"refused_steps": 1, "not_finite": 0, "over_norm": 1}
    assert _same(_weights(peer), before) and peer.version == 1  # the version still advances
    assert _same(peer.model_at(1)[1], peer.model_at(0)[1])


def test_a_non_finite_aggregate_is_refused(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet, max_update_norm=float("inf"))
    before = _weights(peer)
    peer._step({n: torch.full(t.shape, float("inf"), dtype=torch.float64) for n, t in before.items()})
    assert peer.last_refusal == "not_finite" and peer.aggregate_stats["not_finite"] == 1
    assert _same(_weights(peer), before)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="inbox limits"):
        InboxLimits(max_pending=0)
    with pytest.raises(ValueError, match="inbox limits"):
        InboxLimits(max_round=0)


def test_a_neighbours_model_with_huge_finite_weights_is_not_mixed_in(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet)
    v0, own = peer.model_at(None)
    with pytest.raises(UpdateRejected, match="over the bound"):
        peer.mix({n: torch.full_like(t, 3e38) for n, t in own.items()}, 0.5)
    assert peer.version == v0 and _same(_weights(peer), own)
    assert peer.mix({n: t + 0.01 for n, t in own.items()}, 0.5) == v0 + 1  # an honest neighbour still mixes
