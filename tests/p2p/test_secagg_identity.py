"""Secure aggregation bound to identity, over real gRPC on 127.0.0.1.

Finding: an outsider claiming a member's origin took its masked slot, the real member
was refused, and the sum "unmasked" into garbage that was counted as an unmasked round.
Now the outsider is refused, and a sum that unmasks out of range is counted as corrupt
and applied nowhere, whoever sent it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from bounds_tools import push_status

from p2p.defences import parse_defence
from p2p.membership import Membership
from p2p.peer import Peer
from p2p.secagg import create_group
from p2p.tls import TlsMaterial, make_test_pki
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader

MEMBERS = ("a", "b", "c")


def params(peer: Peer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in peer.model.parameters()]


def unchanged(peer: Peer, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(peer.model.parameters(), before))


@pytest.fixture(scope="module")
def pki() -> dict[str, TlsMaterial]:
    return make_test_pki(peers=[*MEMBERS, "outsider"])[1]


def peers(digits_data, lenet, *, masked: bool, tls: bool) -> dict[str, Peer]:
    """One peer per member; the same seeds give masked and plain twins the same gradients."""
    group = create_group(MEMBERS, seed=3) if masked else {}
    return {
        pid: Peer(pid, copy.deepcopy(lenet), digits_data.images[:200], digits_data.labels[:200],
                  batch_size=2 + i, defence=parse_defence("none"), lr=0.1, keep_versions=2, seed=10 + i,
                  optimizer="sgd", secagg=group.get(pid), membership=Membership(pid, MEMBERS, authenticate=tls))
        for i, pid in enumerate(MEMBERS)
    }


@pytest.fixture
def served(request) -> Iterator[GossipServer]:
    """Serve the given peer a (TLS material or None) on 127.0.0.1; stop it afterwards."""
    servers: list[GossipServer] = []

    def serve(peer: Peer, tls: TlsMaterial | None) -> GossipServer:
        server = GossipServer(peer, peer.peer_id, tls=tls)
        server.start()
        servers.append(server)
        return server

    yield serve  # type: ignore[misc]
    for s in servers:
        s.stop(grace=0)


def copy_as(update: Update, **changes: object) -> Update:
    return Update(UpdateHeader(**{**vars(update.header), **changes}), update.tensors)


def test_an_outsider_cannot_take_a_members_masked_slot_and_the_sum_is_exact(
    digits_data, lenet, pki, served
) -> None:
    masked, plain = peers(digits_data, lenet, masked=True, tls=True), peers(digits_data, lenet, masked=False, tls=False)
    server = served(masked["a"], pki["a"])
    sent = {pid: p.local_update(1)[0] for pid, p in masked.items()}
    truth = {pid: p.local_update(1)[0] for pid, p in plain.items()}
    before = (masked["a"].pending(), params(masked["a"]))
    # The outsider has a certificate from the run's CA; c is a member of the group itself.
    assert push_status(server, pki["outsider"], sent["b"]) == "PERMISSION_DENIED"
    assert push_status(server, pki["c"], copy_as(sent["b"], update_id="b/r1-squat")) == "PERMISSION_DENIED"
    assert masked["a"].pending() == before[0] and unchanged(masked["a"], before[1])
    for pid in ("b", "c"):  # the real members are accepted
        assert push_status(server, pki[pid], sent[pid]) == "OK"
    with GossipClient(server.address, tls=pki["b"], timeout_s=1.0) as client:
        assert client.health() == "SERVING"
    for pid in ("b", "c"):
        plain["a"].accept_update(truth[pid])
    assert len(masked["a"].apply_pending()) == 3 and len(plain["a"].apply_pending()) == 3
    assert masked["a"].secagg_stats["unmasked_rounds"] == 1 and masked["a"].secagg_stats["corrupt_rounds"] == 0
    for (name, got), (_, want) in zip(masked["a"].model.named_parameters(), plain["a"].model.named_parameters()):
        assert torch.allclose(got, want, rtol=0, atol=1e-6), name  # fixed point 2**-24 vs float32


def test_a_sum_that_unmasks_out_of_range_is_corrupt_not_unmasked(digits_data, lenet, pki, served) -> None:
    """A member wraps the int64 ring on one entry: its own slot, authenticated, still refused."""
    masked = peers(digits_data, lenet, masked=True, tls=True)
    server = served(masked["a"], pki["a"])
    sent = {pid: p.local_update(1)[0] for pid, p in masked.items()}
    name = next(iter(sent["b"].tensors))
    wrapped = {**sent["b"].tensors, name: sent["b"].tensors[name].clone()}
    wrapped[name].view(-1)[0] += 2**62  # int64 arithmetic wraps around the ring
    before = params(masked["a"])
    assert push_status(server, pki["b"], Update(sent["b"].header, wrapped)) == "OK"
    assert push_status(server, pki["c"], sent["c"]) == "OK"
    assert masked["a"].apply_pending() == []
    assert masked["a"].secagg_stats == {"unmasked_rounds": 0, "dropped_rounds": 0, "dropped_updates": 0,
                                        "corrupt_rounds": 1, "corrupt_updates": 3}
    assert unchanged(masked["a"], before)


def test_over_plaintext_a_squatted_slot_gives_a_corrupt_round_not_garbage(digits_data, lenet, served) -> None:
    """Plaintext authenticates nobody: the squatter takes b's slot, but its garbage is never applied."""
    masked = peers(digits_data, lenet, masked=True, tls=False)
    server = served(masked["a"], None)
    sent = {pid: p.local_update(1)[0] for pid, p in masked.items()}
    gen = torch.Generator().manual_seed(7)
    garbage = {n: torch.randint(-2**62, 2**62, t.shape, dtype=torch.int64, generator=gen)
               for n, t in sent["b"].tensors.items()}
    before = params(masked["a"])
    assert push_status(server, None, Update(sent["b"].header, garbage)) == "OK"
    assert push_status(server, None, sent["b"]) == "ALREADY_EXISTS"  # the limit of plaintext
    assert push_status(server, None, sent["c"]) == "OK"
    assert masked["a"].apply_pending() == []
    stats = masked["a"].secagg_stats
    assert stats["corrupt_rounds"] == 1 and stats["unmasked_rounds"] == 0
    assert unchanged(masked["a"], before)
    # The next step's whole, honest group unmasks as usual.
    sent = {pid: p.local_update(2)[0] for pid, p in masked.items()}
    for pid in ("b", "c"):
        assert push_status(server, None, sent[pid]) == "OK"
    assert len(masked["a"].apply_pending()) == 3 and stats["unmasked_rounds"] == 1


def test_a_member_cannot_mask_values_beyond_the_bound() -> None:
    group = create_group(MEMBERS, seed=0, value_bound=10.0)
    with pytest.raises(ValueError, match="beyond the secure-aggregation bound"):
        group["a"].mask({"w": torch.tensor([1.0, -11.0])}, 1)
    assert group["a"].mask({"w": torch.tensor([1.0, -10.0])}, 1)["w"].dtype == torch.int64
