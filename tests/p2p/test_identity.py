"""Identity bound to every update: real GossipServers over real mutual TLS on 127.0.0.1.

Each attack is one finding of issue 11, tried with a chosen certificate through the
normal client; each must get its precise status while the peer stays healthy, an
honest push still succeeds, and the peer's state is what it was before the attack.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from bounds_tools import push_status
from cryptography import x509

from gradleak.cli import build_parser, config_from_args
from gradleak.config import ConfigError
from p2p.defences import parse_defence
from p2p.errors import TransportError
from p2p.identity import Caller, cert_peer_id, peer_ids_in_cert
from p2p.membership import Membership
from p2p.peer import Peer
from p2p.tls import TlsMaterial, make_test_pki
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader

MEMBERS = ("a", "b", "c")


@pytest.fixture(scope="module")
def pki() -> dict[str, TlsMaterial]:
    """The run's CA: three members, an outsider it also vouches for, one nameless certificate."""
    _ca, material = make_test_pki(peers=[*MEMBERS, "outsider", "nameless"], unnamed=["nameless"])
    return material


class Recording:
    """The real Peer behind the server, keeping the caller of every accepted push."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.callers: list[Caller | None] = []

    def accept_update(self, update: Update, wire_bytes: int, caller: Caller | None = None) -> None:
        self.peer.accept_update(update, wire_bytes, caller)
        self.callers.append(caller)

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        return self.peer.model_at(version, caller)


def make_peer(digits_data, lenet, membership: Membership) -> Peer:
    return Peer("a", lenet, digits_data.images[:100], digits_data.labels[:100], batch_size=2,
                defence=parse_defence("none"), lr=0.1, keep_versions=3, seed=1, optimizer="sgd",
                membership=membership)


@pytest.fixture
def tls_peer(digits_data, lenet, pki) -> Iterator[tuple[Recording, GossipServer]]:
    handler = Recording(make_peer(digits_data, lenet, Membership("a", MEMBERS, authenticate=True)))
    server = GossipServer(handler, "a", tls=pki["a"])
    server.start()
    yield handler, server
    server.stop(grace=0)


def update_from(origin: str, step: int = 1, *, sender: str | None = None, update_id: str | None = None,
                shapes: dict[str, torch.Size] | None = None) -> Update:
    header = UpdateHeader(update_id or f"{origin}/r{step}", origin, sender or origin, step, 0, 2)
    return Update(header, {n: torch.full(s, 0.01) for n, s in (shapes or {}).items()})


def shapes_of(peer: Peer) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in peer.model.named_parameters()}


def state(peer: Peer) -> tuple:
    """Everything a refused message must leave as it was."""
    return (peer.version, peer.pending(), dict(peer.secagg_stats),
            [p.detach().clone() for p in peer.model.parameters()])


def same_state(peer: Peer, before: tuple) -> bool:
    now = state(peer)
    return now[:3] == before[:3] and all(torch.equal(x, y) for x, y in zip(now[3], before[3]))


def pull_status(server: GossipServer, tls: TlsMaterial | None) -> str:
    with GossipClient(server.address, tls=tls, timeout_s=5.0) as client:
        try:
            client.get_model()
        except TransportError as exc:
            return exc.code
    return "OK"


def assert_alive(server: GossipServer, tls: TlsMaterial | None, honest: Update) -> None:
    """Health within 1 s, then an honest member's push is accepted."""
    with GossipClient(server.address, tls=tls, timeout_s=1.0) as client:
        assert client.health() == "SERVING"
    assert push_status(server, tls, honest) == "OK"


# ------------------------------------------------------------------ certificates name peers


def test_every_certificate_names_its_peer_and_the_server_reads_it(tls_peer, pki) -> None:
    handler, server = tls_peer
    for pid in MEMBERS:
        cert = x509.load_pem_x509_certificate(pki[pid].cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"gradleak://peer/{pid}"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]  # hosts kept
        assert cert_peer_id(pki[pid].cert_pem) == pid
    assert peer_ids_in_cert(pki["nameless"].cert_pem) == [] and cert_peer_id(pki["nameless"].cert_pem) is None
    shapes = shapes_of(handler.peer)
    assert push_status(server, pki["b"], update_from("b", shapes=shapes)) == "OK"
    caller = handler.callers[-1]
    assert caller is not None and caller.peer_id == "b" and caller.address.startswith("ipv4:127.0.0.1:")


# ------------------------------------------------------------------ no identity (finding 2)


def test_a_member_cannot_send_in_another_peers_name(tls_peer, pki) -> None:
    """b, with its own valid certificate, forges c's update, the receiver's own, and a relay."""
    handler, server = tls_peer
    shapes = shapes_of(handler.peer)
    before = state(handler.peer)
    forged = {
        "as c": update_from("c", shapes=shapes),  # c's real id: would have made c's update a duplicate
        "as the receiver": update_from("a", shapes=shapes),
        "relaying c": update_from("c", sender="b", shapes=shapes),
    }
    for what, update in forged.items():
        assert push_status(server, pki["b"], update) == "PERMISSION_DENIED", what
    assert same_state(handler.peer, before)
    # c's real update is accepted, not refused as ALREADY_EXISTS.
    assert push_status(server, pki["c"], update_from("c", shapes=shapes)) == "OK"
    assert_alive(server, pki["b"], update_from("b", shapes=shapes))
    assert handler.peer.pending() == 2


def test_callers_off_the_roster_or_without_a_name_are_refused(tls_peer, pki) -> None:
    """The CA vouches for both, but one is not a member and the other names no peer."""
    handler, server = tls_peer
    shapes = shapes_of(handler.peer)
    before = state(handler.peer)
    assert push_status(server, pki["outsider"], update_from("outsider", shapes=shapes)) == "PERMISSION_DENIED"
    assert push_status(server, pki["outsider"], update_from("b", shapes=shapes)) == "PERMISSION_DENIED"
    assert push_status(server, pki["nameless"], update_from("b", shapes=shapes)) == "UNAUTHENTICATED"
    # GetModel under TLS: members only.
    assert pull_status(server, pki["outsider"]) == "PERMISSION_DENIED"
    assert pull_status(server, pki["nameless"]) == "UNAUTHENTICATED"
    assert pull_status(server, pki["c"]) == "OK"
    # No certificate at all: the handshake itself refuses it.
    assert push_status(server, None, update_from("b", shapes=shapes)) == "UNAVAILABLE"
    assert same_state(handler.peer, before)
    assert_alive(server, pki["b"], update_from("b", shapes=shapes))


def test_one_update_per_origin_per_step(tls_peer, pki) -> None:
    """Finding: 20 updates of one origin with different ids in one round were all aggregated."""
    handler, server = tls_peer
    shapes = shapes_of(handler.peer)
    codes = [push_status(server, pki["b"], update_from("b", update_id=f"b/r1-{k}", shapes=shapes))
             for k in range(20)]
    assert codes == ["OK"] + ["ALREADY_EXISTS"] * 19
    assert handler.peer.pending() == 1
    assert push_status(server, pki["b"], update_from("b", 2, shapes=shapes)) == "OK"  # the next step is new
    assert_alive(server, pki["c"], update_from("c", shapes=shapes))
    applied = handler.peer.apply_pending()
    assert sorted(x.header.update_id for x in applied) == ["b/r1-0", "b/r2", "c/r1"]


# ------------------------------------------------------------------ plaintext


def test_plaintext_still_binds_origin_to_sender(digits_data, lenet) -> None:
    """No certificate, no identity; but no relays, no updates in the receiver's name, a roster."""
    peer = make_peer(digits_data, lenet, Membership("a", MEMBERS))
    server = GossipServer(peer, "a")
    server.start()
    try:
        shapes = shapes_of(peer)
        before = state(peer)
        for update in (update_from("c", sender="b", shapes=shapes), update_from("a", shapes=shapes),
                       update_from("z", shapes=shapes)):
            assert push_status(server, None, update) == "PERMISSION_DENIED", update.header
        assert same_state(peer, before)
        assert_alive(server, None, update_from("b", shapes=shapes))
    finally:
        server.stop(grace=0)


def test_plaintext_on_a_non_loopback_address_is_refused_unless_insecure(digits_data, lenet, pki) -> None:
    peer = make_peer(digits_data, lenet, Membership("a"))
    for host in ("0.0.0.0", "10.1.2.3", "peer-a.example", "::"):
        with pytest.raises(ValueError, match=f"plaintext gossip on non-loopback address {host}"):
            GossipServer(peer, "a", host=host)  # refused before anything is bound
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        GossipServer(peer, "a", host=host)
    GossipServer(peer, "a", host="0.0.0.0", insecure=True)  # the user said so
    GossipServer(peer, "a", host="0.0.0.0", tls=pki["a"])
    parser = build_parser()
    with pytest.raises(ConfigError) as err:
        config_from_args(parser.parse_args(["run", "--host", "10.1.2.3"]))
    assert "\n" not in str(err.value) and "--tls on" in str(err.value) and "--insecure" in str(err.value)
    assert config_from_args(parser.parse_args(["run", "--host", "10.1.2.3", "--insecure"])).gossip.insecure
    assert config_from_args(parser.parse_args(["run", "--host", "auto", "--tls", "on"])).gossip.tls
    assert not config_from_args(parser.parse_args(["run"])).gossip.insecure  # 127.0.0.1 needs nothing


def test_a_peer_whose_certificate_names_another_is_refused_at_start(pki) -> None:
    from p2p.membership import membership_for

    with pytest.raises(ValueError, match="certificate names 'b'"):
        membership_for("a", MEMBERS, pki["b"].cert_pem)
    assert membership_for("a", MEMBERS, pki["a"].cert_pem).authenticate
