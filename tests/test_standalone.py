"""`gradleak peer` refuses bad input with one line and exit 2, before it loads data or binds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradleak.cli import main
from gradleak.standalone import PeerError, parse_listen, parse_shard
from p2p.tls import make_test_pki, write_tls


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors leave through SystemExit
        return int(exc.code or 0)


@pytest.fixture
def roster(tmp_path: Path) -> Path:
    path = tmp_path / "roster.json"
    path.write_text(json.dumps({"peers": [{"id": "a", "address": "127.0.0.1:5001"},
                                          {"id": "b", "address": "10.0.0.2:5002"}]}))
    return path


@pytest.mark.parametrize(("extra", "needle"), [
    (["--peer-id", "c", "--listen", "127.0.0.1:5001"], "peer c is not on the roster"),
    (["--peer-id", "a", "--listen", "127.0.0.1"], "bad --listen '127.0.0.1'"),
    (["--peer-id", "a", "--listen", "127.0.0.1:99999"], "bad --listen"),
    (["--peer-id", "a", "--listen", "::1:5001"], "IPv6 host goes in brackets"),
    (["--peer-id", "a", "--listen", "[nohost]:5001"], "not an IPv6 address"),
    (["--peer-id", "a", "--listen", "127.0.0.1:6000"], "differ in port"),
    (["--peer-id", "b", "--listen", "10.0.0.2:5002"], "not a loopback address"),
    (["--peer-id", "b", "--listen", "10.0.0.2:5002", "--insecure", "--tls-dir", "x"], "exclude each other"),
    (["--peer-id", "b", "--listen", "10.0.0.2:5002", "--tls-dir", "/nonexistent"], "ca.pem: missing"),
    (["--peer-id", "a", "--listen", "127.0.0.1:5001", "--shard", "2/2"], "bad --shard"),
    (["--peer-id", "a", "--listen", "127.0.0.1:5001", "--fanout", "0"], "fanout must be >= 1"),
    (["--peer-id", "a", "--listen", "127.0.0.1:5001", "--batch-size", "x"], "bad value for --batch-size"),
    (["--peer-id", "a", "--listen", "127.0.0.1:5001", "--role", "spy"], "invalid choice: 'spy'"),
    (["--peer-id", "bad id", "--listen", "127.0.0.1:5001"], "bad peer id"),
])
def test_bad_peer_input_is_one_line_and_exit_2(roster: Path, tmp_path: Path, extra: list[str], needle: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["peer", "--roster", str(roster), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_or_malformed_roster_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["peer", "--peer-id", "a", "--listen", "127.0.0.1:5001", "--roster", str(tmp_path / "no.json")]) == 2
    assert "cannot read roster" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"peers": [{"id": "a"}]}')
    assert run_cli(["peer", "--peer-id", "a", "--listen", "127.0.0.1:5001", "--roster", str(bad)]) == 2
    assert "must have exactly 'id' and 'address'" in capsys.readouterr().err


def test_listen_shard_and_loopback_parsing() -> None:
    assert parse_listen("[::1]:7000") == ("::1", 7000)
    assert parse_listen("localhost:7000") == ("localhost", 7000)
    assert parse_listen("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_shard(None, (1, 3)) == (1, 3)
    assert parse_shard("0/4", (1, 3)) == (0, 4)
    for bad in ("1", "-1/3", "3/3", "a/b"):
        with pytest.raises(PeerError):
            parse_shard(bad, (0, 1))


def test_a_certificate_naming_another_peer_is_refused(roster: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _ca, material = make_test_pki(hosts=("10.0.0.2",), peers=["a", "b"])
    tls = write_tls(tmp_path / "tls", material["a"])  # a's certificate, b's roster entry
    code = run_cli(["peer", "--roster", str(roster), "--peer-id", "b", "--listen", "10.0.0.2:5002",
                    "--tls-dir", str(tls), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "names peer 'a', not b" in err and len(err.splitlines()) == 1, err
