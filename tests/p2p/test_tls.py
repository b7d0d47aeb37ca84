"""Mutual TLS on the gossip transport, on 127.0.0.1 only.

What these tests establish, and what they do not:

- TLS defends against a *network eavesdropper*: a man in the middle who records the
  TCP bytes between two peers reads the gradient (and the update's metadata) over
  plaintext, and nothing of it over TLS.
- TLS does *not* defend against a *malicious peer*: the receiving peer terminates TLS
  itself and gets the exact plaintext update, which is all a gradient-inversion
  attack (DLG, iDLG, Inverting Gradients) needs. Only the defences applied to the
  gradient before it is sent (pruning, noise, quantisation) act against that peer.
- Mutual TLS admits only peers holding a certificate from the run's CA, so an
  outsider cannot join the gossip; a malicious *member* holds a valid certificate.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import NameOID

from p2p import codec
from p2p.errors import TransportError, VersionNotFound
from p2p.tls import TlsError, TlsMaterial, load_tls, make_test_pki, write_tls
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update, UpdateHeader

PUSH_PATH = f"/{codec.SERVICE_NAME}/PushUpdate"
# A recognisable gradient: 1,000 float32 values 0..999, and model weights 0.5..999.5.
GRADIENT = torch.arange(1000, dtype=torch.float32)
WEIGHTS = torch.arange(1000, dtype=torch.float32) + 0.5
SECRET_ID = "upd-alice-r7-9f3c2e"


class Handler:
    """Records accepted updates; serves one model version holding WEIGHTS."""

    def __init__(self) -> None:
        self.accepted: list[tuple[Update, int]] = []

    def accept_update(self, update: Update, wire_bytes: int, caller: object = None) -> None:
        self.accepted.append((update, wire_bytes))

    def model_at(self, version: int | None, caller: object = None) -> tuple[int, dict[str, torch.Tensor]]:
        if version not in (None, 3):
            raise VersionNotFound(f"version {version} not held")
        return 3, {"fc.weight": WEIGHTS.reshape(10, 100), "fc.bias": torch.ones(10)}


def gradient_update(update_id: str = SECRET_ID) -> Update:
    """An update whose dense tensor is the recognisable GRADIENT pattern."""
    header = UpdateHeader(update_id, "peer-alice", "peer-alice", 7, 3, 32, "none", 0.5)
    return Update(header, {"fc.weight": GRADIENT.reshape(10, 100), "fc.bias": -torch.ones(10)})


def le_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw little-endian float32 bytes, as the codec puts them on the wire."""
    return tensor.numpy().astype("<f4").tobytes()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def pki() -> dict[str, TlsMaterial]:
    """One run's PKI: a CA and two members."""
    _, materials = make_test_pki(peers=["server", "client"])
    return materials


@pytest.fixture(scope="module")
def foreign() -> dict[str, TlsMaterial]:
    """Another CA's member: an outsider to the run."""
    _, materials = make_test_pki(peers=["outsider"])
    return materials


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def tls_server(handler: Handler, pki: dict[str, TlsMaterial]) -> Iterator[GossipServer]:
    srv = GossipServer(handler, "server", tls=pki["server"])
    srv.start()
    yield srv
    srv.stop(grace=0)


# -- the encrypted transport works ------------------------------------------------------


def test_tls_push_and_get_model_roundtrip_exactly(
    tls_server: GossipServer, handler: Handler, pki: dict[str, TlsMaterial]
) -> None:
    assert tls_server.secure
    update = gradient_update()
    with GossipClient(tls_server.address, tls=pki["client"], timeout_s=5.0) as c:
        sent = c.push_update(update, sparse="never")
        version, state = c.get_model()
        assert c.health() == "SERVING"
    [(got, wire_bytes)] = handler.accepted
    assert got.header == update.header
    assert_same(got.tensors, update.tensors)
    assert wire_bytes == sent > len(le_bytes(GRADIENT))
    assert version == 3
    assert_same(state, handler.model_at(None)[1])


# -- who is refused -----------------------------------------------------------------------


def test_plaintext_client_is_refused_within_the_deadline_and_tls_still_served(
    tls_server: GossipServer, handler: Handler, pki: dict[str, TlsMaterial]
) -> None:
    start = time.monotonic()
    with (
        GossipClient(tls_server.address, timeout_s=2.0) as plain,
        pytest.raises(TransportError) as err,
    ):
        plain.push_update(gradient_update())
    assert err.value.code == "UNAVAILABLE"
    assert "requires TLS" in err.value.details  # says why, not only "Socket closed"
    assert time.monotonic() - start < 2.5
    assert handler.accepted == []
    with GossipClient(tls_server.address, tls=pki["client"], timeout_s=5.0) as c:
        c.push_update(gradient_update("after-refusal"))
    assert [u.header.update_id for u, _ in handler.accepted] == ["after-refusal"]


def raw_push(address: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    """Push a valid update over a hand-built secure channel; return the status code."""
    frames = [f.SerializeToString() for f in codec.update_to_frames(gradient_update())]
    with grpc.secure_channel(address, credentials) as channel:
        try:
            channel.stream_unary(PUSH_PATH)(iter(frames), timeout=3.0)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_client_with_another_cas_certificate_is_refused(
    tls_server: GossipServer,
    handler: Handler,
    pki: dict[str, TlsMaterial],
    foreign: dict[str, TlsMaterial],
) -> None:
    # An outsider with its own PKI, through the normal client.
    with (
        GossipClient(tls_server.address, tls=foreign["outsider"], timeout_s=3.0) as c,
        pytest.raises(TransportError) as err,
    ):
        c.push_update(gradient_update())
    assert err.value.code == "UNAVAILABLE"
    # An outsider that trusts the run's CA (so only the server's check of the client
    # certificate can refuse it), and a client that presents no certificate at all.
    ca = pki["server"].ca_pem
    outsider = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=foreign["outsider"].key_pem,
        certificate_chain=foreign["outsider"].cert_pem,
    )
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    assert raw_push(tls_server.address, outsider) is grpc.StatusCode.UNAVAILABLE
    assert raw_push(tls_server.address, anonymous) is grpc.StatusCode.UNAVAILABLE
    assert handler.accepted == []
    # Control: the same hand-built channel with a member's certificate gets through.
    member = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pki["client"].key_pem,
        certificate_chain=pki["client"].cert_pem,
    )
    assert raw_push(tls_server.address, member) is grpc.StatusCode.OK
    assert len(handler.accepted) == 1


def test_client_refuses_a_server_from_another_ca(
    handler: Handler, pki: dict[str, TlsMaterial], foreign: dict[str, TlsMaterial]
) -> None:
    impostor = GossipServer(handler, "impostor", tls=foreign["outsider"])
    impostor.start()
    try:
        with (
            GossipClient(impostor.address, tls=pki["client"], timeout_s=3.0) as c,
            pytest.raises(TransportError) as err,
        ):
            c.push_update(gradient_update())
    finally:
        impostor.stop(grace=0)
    assert err.value.code == "UNAVAILABLE"
    assert handler.accepted == []  # the gradient never reached the impostor


def test_server_certificate_must_name_the_dialled_host(handler: Handler) -> None:
    _, named = make_test_pki(hosts=["peer-b.gossip.internal"], peers=["server", "client"])
    srv = GossipServer(handler, "server", tls=named["server"])
    srv.start()
    try:
        with (
            GossipClient(srv.address, tls=named["client"], timeout_s=3.0) as c,
            pytest.raises(TransportError) as err,
        ):
            c.health()
        assert err.value.code == "UNAVAILABLE"
        with GossipClient(
            srv.address, tls=named["client"], server_name="peer-b.gossip.internal"
        ) as c:
            assert c.health() == "SERVING"
    finally:
        srv.stop(grace=0)


def test_server_name_without_tls_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="server_name needs tls"):
        GossipClient("127.0.0.1:1", server_name="peer-b")


# -- what TLS protects, and what it does not ---------------------------------------------


class RecordingProxy:
    """A man in the middle on 127.0.0.1: forwards TCP to upstream and records the bytes.

    One thread multiplexes every connection; it stops when the context exits or after
    max_s seconds, and closes all its sockets either way.
    """

    def __init__(self, upstream_port: int, max_s: float = 30.0) -> None:
        self.to_server = bytearray()
        self.to_client = bytearray()
        self._upstream = ("127.0.0.1", upstream_port)
        self._max_s = max_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eavesdropper", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        assert not self._thread.is_alive(), "the proxy thread did not stop"

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, data=None)
        deadline = time.monotonic() + self._max_s
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.05):
                    if key.data is None:
                        self._accept(sel)
                    elif sel.get_map().get(key.fd) is key:  # not dropped earlier in this batch
                        self._pump(sel, key.fileobj, *key.data)  # type: ignore[arg-type]
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(self._upstream, timeout=5.0)
        client.settimeout(5.0)  # bounded sendall; recv only runs when data is ready
        sel.register(client, selectors.EVENT_READ, data=(server, self.to_server))
        sel.register(server, selectors.EVENT_READ, data=(client, self.to_client))

    @staticmethod
    def _pump(
        sel: selectors.BaseSelector, src: socket.socket, dst: socket.socket, record: bytearray
    ) -> None:
        try:
            data = src.recv(65536)
            if data:
                record.extend(data)
                dst.sendall(data)
                return
        except OSError:
            pass
        for sock in (src, dst):  # one side closed or failed: drop the pair
            sel.unregister(sock)
            sock.close()


def eavesdrop(server: GossipServer, tls: TlsMaterial | None) -> tuple[bytes, bytes]:
    """Push GRADIENT and pull WEIGHTS through a recording proxy; return both directions."""
    port = int(server.address.rsplit(":", 1)[1])
    # The certificate names 127.0.0.1, the proxy's host too, so it verifies as is.
    with (
        RecordingProxy(port) as proxy,
        GossipClient(f"127.0.0.1:{proxy.port}", tls=tls, timeout_s=5.0) as c,
    ):
        c.push_update(gradient_update(), sparse="never")
        c.get_model()
    return bytes(proxy.to_server), bytes(proxy.to_client)


def pieces(raw: bytes, size: int = 16) -> list[bytes]:
    """Every aligned size-byte piece of raw (4 float32 values each)."""
    return [raw[i : i + size] for i in range(0, len(raw) - size + 1, size)]


def test_eavesdropper_reads_the_gradient_over_plaintext(handler: Handler) -> None:
    """Control for the TLS test below: the same recording does reveal plaintext."""
    srv = GossipServer(handler, "server")
    srv.start()
    try:
        upstream, downstream = eavesdrop(srv, tls=None)
    finally:
        srv.stop(grace=0)
    assert le_bytes(GRADIENT) in upstream  # the whole gradient, byte for byte
    assert SECRET_ID.encode() in upstream and b"peer-alice" in upstream
    assert le_bytes(WEIGHTS) in downstream
    assert handler.accepted[0][0].header.update_id == SECRET_ID


def test_tls_hides_the_gradient_and_its_metadata_from_an_eavesdropper(
    tls_server: GossipServer, handler: Handler, pki: dict[str, TlsMaterial]
) -> None:
    upstream, downstream = eavesdrop(tls_server, tls=pki["client"])
    assert len(upstream) > len(le_bytes(GRADIENT))  # the update did cross the proxy
    assert len(downstream) > len(le_bytes(WEIGHTS))
    assert not [p for p in pieces(le_bytes(GRADIENT)) if p in upstream]
    assert not [p for p in pieces(le_bytes(WEIGHTS)) if p in downstream]
    for secret in (SECRET_ID, "peer-alice", codec.SERVICE_NAME, "PushUpdate", "fc.weight"):
        assert secret.encode() not in upstream + downstream, secret
    assert_same(handler.accepted[0][0].tensors, gradient_update().tensors)


def test_tls_does_not_protect_against_the_receiving_peer(
    tls_server: GossipServer, handler: Handler, pki: dict[str, TlsMaterial]
) -> None:
    """A malicious peer is a TLS endpoint: it decrypts and gets the exact gradient.

    TLS defends the link against an eavesdropper, not the update against its
    recipient. The server's handler here stands for a malicious member of the gossip
    (a valid certificate from the run's CA): what it receives is bit-for-bit what the
    honest sender computed, i.e. everything a gradient-inversion attack needs.
    """
    with GossipClient(tls_server.address, tls=pki["client"], timeout_s=5.0) as honest:
        honest.push_update(gradient_update())
    [(seen, _)] = handler.accepted
    assert seen.header.update_id == SECRET_ID
    assert le_bytes(seen.tensors["fc.weight"].flatten()) == le_bytes(GRADIENT)


# -- the TLS material -----------------------------------------------------------------------


def test_test_pki_certificates_name_the_hosts_and_the_peer(pki: dict[str, TlsMaterial]) -> None:
    cert = x509.load_pem_x509_certificate(pki["client"].cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client"
    assert pki["client"].ca_pem == pki["server"].ca_pem
    assert "PRIVATE" not in repr(pki["client"])  # the key never shows in logs
    with pytest.raises(ValueError, match="unique"):
        make_test_pki(peers=["a", "a"])


def test_write_then_load_roundtrips_with_a_private_key_file(
    tmp_path: Path, pki: dict[str, TlsMaterial]
) -> None:
    write_tls(tmp_path / "client", pki["client"])
    assert load_tls(tmp_path / "client") == pki["client"]
    assert stat.S_IMODE(os.stat(tmp_path / "client" / "key.pem").st_mode) == 0o600


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda d, _: (d / "key.pem").unlink(), r"key\.pem: missing"),
        (lambda d, _: (d / "cert.pem").write_bytes(b"-----BEGIN CERT"), r"cert\.pem: not a PEM"),
        (lambda d, _: (d / "key.pem").write_text("garbage"), r"key\.pem: not a PEM private key"),
        (lambda d, m: (d / "key.pem").write_bytes(m["server"].key_pem), "does not match"),
        (lambda d, m: (d / "ca.pem").write_bytes(m["client"].cert_pem), "not a CA"),
    ],
    ids=["missing-key", "garbled-cert", "garbled-key", "wrong-key", "leaf-as-ca"],
)
def test_load_tls_names_the_bad_file(
    tmp_path: Path, pki: dict[str, TlsMaterial], spoil: object, message: str
) -> None:
    write_tls(tmp_path, pki["client"])
    spoil(tmp_path, pki)  # type: ignore[operator]
    with pytest.raises(TlsError, match=message):
        load_tls(tmp_path)


def test_material_from_another_ca_does_not_validate(
    pki: dict[str, TlsMaterial], foreign: dict[str, TlsMaterial]
) -> None:
    outsider = foreign["outsider"]
    with pytest.raises(TlsError, match="not issued by a CA"):
        TlsMaterial(pki["client"].ca_pem, outsider.cert_pem, outsider.key_pem)
