import itertools

import pytest
import torch

from gradleak.data import Dataset
from p2p.clock import PeerClock
from p2p.defences import parse_defence
from p2p.errors import DuplicateUpdate, UpdateRejected, VersionNotFound
from p2p.peer import Peer
from p2p.staleness import parse_staleness
from p2p.update import Update, UpdateHeader


def _peer(digits_data: Dataset, lenet: torch.nn.Module, pid: str = "p0", **kw: object) -> Peer:
    args: dict = {"batch_size": 2, "defence": parse_defence("none"), "lr": 0.1, "keep_versions": 3, "seed": 1}
    args.update(kw)
    return Peer(pid, lenet, digits_data.images[:100], digits_data.labels[:100], **args)


def test_local_update_is_the_true_gradient_and_carries_no_truth(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet)
    update, batch = peer.local_update(1)
    assert update.header.num_samples == 2 and update.header.model_version == 0
    x, y = torch.from_numpy(batch.images), torch.from_numpy(batch.labels)
    loss = torch.nn.functional.cross_entropy(lenet(x), y)
    expected = torch.autograd.grad(loss, list(lenet.parameters()))
    for got, want in zip(update.tensors.values(), expected):
        assert torch.allclose(got, want, atol=1e-6)
    # The public update has no field that could hold the batch.
    assert set(vars(update)) == {"header", "tensors"}
    assert list(update.tensors) == [n for n, _ in lenet.named_parameters()]


def test_apply_averages_by_samples_and_versions(digits_data, lenet) -> None:
    a = _peer(digits_data, lenet, "a", optimizer="sgd")
    before = {n: p.detach().clone() for n, p in lenet.named_parameters()}
    own, _ = a.local_update(1)
    other = Update(
        UpdateHeader("b/r1", "b", "b", 1, 0, 6),
        {k: torch.ones_like(v) for k, v in own.tensors.items()},
    )
    a.accept_update(other)
    assert len(a.apply_pending()) == 2
    for n, p in lenet.named_parameters():
        expected = before[n] - 0.1 * (2 * own.tensors[n] + 6 * torch.ones_like(p)) / 8
        assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert a.version == 1
    v, state = a.model_at(0)
    assert v == 0 and all(torch.equal(state[n], before[n]) for n in before)


def test_history_is_bounded(digits_data, lenet) -> None:
    a = _peer(digits_data, lenet)
    for r in range(1, 6):
        a.local_update(r)
        a.apply_pending()
    assert a.model_at(None)[0] == 5
    with pytest.raises(VersionNotFound, match="holds versions 3..5"):
        a.model_at(1)


def _bad(update: Update, **changes: object) -> Update:
    h = update.header
    return Update(UpdateHeader(**{**vars(h), **changes}), update.tensors)


def test_bad_updates_are_rejected_and_change_nothing(digits_data, lenet) -> None:
    a = _peer(digits_data, lenet, "a")
    good, _ = _peer(digits_data, lenet, "b").local_update(1)
    good = _bad(good, update_id="b/r1", origin="b", sender="b")
    t = good.tensors
    name0 = next(iter(t))
    cases = [
        Update(good.header, {**t, name0: torch.zeros(3)}),
        Update(good.header, {k: v for k, v in t.items() if k != name0}),
        Update(good.header, {**t, name0: torch.full_like(t[name0], float("nan"))}),
        Update(good.header, {**t, name0: t[name0].to(torch.int64)}),
        _bad(good, num_samples=0),
        _bad(good, round=0),
        _bad(good, mixing_weight=float("inf")),
    ]
    for bad in cases:
        with pytest.raises(UpdateRejected):
            a.accept_update(bad)
    assert len(a.apply_pending()) == 0  # nothing was filed
    with pytest.raises(UpdateRejected, match="sent_at"):
        a.accept_update(_bad(good, sent_at=float("nan")))
    a.accept_update(_bad(good, round=2))
    with pytest.raises(DuplicateUpdate):
        a.accept_update(_bad(good, round=2))


def test_a_late_update_is_aggregated_with_its_staleness_weight(digits_data, lenet) -> None:
    """Two steps behind under poly:1 the update counts 1/3 of its samples, not zero."""
    a = _peer(digits_data, lenet, "a", optimizer="sgd", staleness=parse_staleness("poly:1"))
    for _ in range(2):
        a.apply_pending()  # a moves on to version 2 with nothing received
    before = {n: p.detach().clone() for n, p in lenet.named_parameters()}
    own, _ = a.local_update(3)
    late = Update(UpdateHeader("b/r1", "b", "b", 1, 0, 6),  # taken at version 0
                  {k: torch.ones_like(v) for k, v in own.tensors.items()})
    a.accept_update(late)
    applied = {x.header.update_id: x for x in a.apply_pending()}
    assert applied["b/r1"].lag == 2 and applied["b/r1"].weight == pytest.approx(6 / 3)
    assert applied["a/r3"].lag == 0 and applied["a/r3"].weight == 2
    for n, p in lenet.named_parameters():
        expected = before[n] - 0.1 * (2 * own.tensors[n] + 2 * torch.ones_like(p)) / 4
        assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_staleness_rules_parse_and_weigh() -> None:
    assert parse_staleness("poly:0.5")(3) == pytest.approx(0.5)
    assert parse_staleness("cutoff:2")(2) == 1.0 and parse_staleness("cutoff:2")(3) == 0.0
    assert parse_staleness("constant")(100) == 1.0
    assert parse_staleness("poly:1")(-4) == 1.0  # a lag never counts below 0
    for bad in ("fast", "poly", "poly:x", "cutoff:1.5", "poly:-1", "constant:1"):
        with pytest.raises(ValueError):
            parse_staleness(bad)


def test_peer_clock_jitters_around_its_period_and_catches_up() -> None:
    clock = PeerClock(0.5, 0.2, seed=3, start=100.0)
    due = [clock.next_due() for _ in range(200)]
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert due[0] == 100.0 and all(0.4 - 1e-9 <= g <= 0.6 + 1e-9 for g in gaps)
    assert abs(sum(gaps) / len(gaps) - 0.5) < 0.02 and len(set(gaps)) > 100
    again = PeerClock(0.5, 0.2, seed=3, start=100.0)
    assert [again.next_due() for _ in range(200)] == due  # seeded
    with pytest.raises(ValueError):
        PeerClock(0.5, 1.0, seed=0, start=0.0)


def test_training_learns_digits(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet, batch_size=8, lr=0.01)
    peer._images = torch.from_numpy(digits_data.images[:1200])
    peer._labels = torch.from_numpy(digits_data.labels[:1200])
    for r in range(1, 301):
        peer.local_update(r)
        peer.apply_pending()
    acc = peer.accuracy(digits_data.images[1400:], digits_data.labels[1400:])
    assert acc > 0.5, acc


@pytest.mark.gpu
def test_peer_on_cuda_sends_host_tensors_and_learns(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet, device="cuda", batch_size=8, lr=0.01)
    update, _batch = peer.local_update(1)
    assert all(t.device.type == "cpu" for t in update.tensors.values())
    peer.apply_pending()
    assert all(t.device.type == "cpu" for t in peer.model_at(None)[1].values())
    assert next(peer.model.parameters()).device.type == "cuda"


def test_unknown_device_is_refused() -> None:
    from gradleak.core.devices import resolve_device

    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def test_mix_averages_into_a_new_version_and_refuses_bad_models(digits_data, lenet) -> None:
    a = _peer(digits_data, lenet, "a")
    v0, before = a.model_at(None)
    other = {n: t + 1.0 for n, t in before.items()}
    for bad in ({**other, next(iter(other)): torch.full_like(before[next(iter(before))], float("nan"))},
                {k: v for k, v in list(other.items())[1:]}):
        with pytest.raises(UpdateRejected):
            a.mix(bad, 0.5)
        assert a.version == v0  # nothing changed
    assert a.mix(other, 0.5) == v0 + 1
    _v, now = a.model_at(None)
    off = {n: float((now[n] - before[n] - 0.5).abs().max()) for n in before}
    assert max(off.values()) < 1e-6, off
    assert all(torch.equal(a.model_at(v0)[1][n], before[n]) for n in before)  # a pull at v0 still works


def test_weight_history_respects_its_byte_bound(digits_data, lenet) -> None:
    # 3 versions' worth of bytes: the history never holds more, however many steps pass,
    # and the versions it dropped are NOT_FOUND while the newest ones are served.
    state_bytes = sum(t.numel() * t.element_size() for t in lenet.state_dict().values())
    peer = _peer(digits_data, lenet, keep_versions=100, keep_bytes=3 * state_bytes)
    for r in range(1, 9):
        peer.local_update(r)
        peer.apply_pending()
        held, nbytes = peer.history()
        assert held <= 3 and nbytes <= 3 * state_bytes
    assert peer.history() == (3, 3 * state_bytes)
    assert peer.model_at(peer.version - 2)[0] == peer.version - 2
    with pytest.raises(VersionNotFound):
        peer.model_at(peer.version - 3)


def test_a_model_larger_than_the_byte_bound_still_keeps_its_newest_version(digits_data, lenet) -> None:
    peer = _peer(digits_data, lenet, keep_bytes=1)
    peer.local_update(1)
    peer.apply_pending()
    assert peer.history()[0] == 1 and peer.model_at(None)[0] == peer.version
