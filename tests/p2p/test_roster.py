"""Roster files: members and addresses round-trip; every malformed entry is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p.roster import Roster, RosterError, load_roster, parse_roster, write_roster


def test_round_trip(tmp_path: Path) -> None:
    r = Roster({"h0": "127.0.0.1:5001", "m": "[::1]:5002"})
    back = load_roster(write_roster(tmp_path / "roster.json", r))
    assert back == r and "h0" in back and "x" not in back and back.address("m") == "[::1]:5002"


@pytest.mark.parametrize(("text", "says"), [
    ("{", "not JSON"),
    ('{"peers": []}', "want"),
    ('{"peers": [{"id": "a"}]}', "exactly"),
    ('{"peers": [{"id": "a b", "address": "h:1"}]}', "bad peer id"),
    ('{"peers": [{"id": "a", "address": "h"}]}', "bad address"),
    ('{"peers": [{"id": "a", "address": "h:0"}]}', "port 1-65535"),
    ('{"peers": [{"id": "a", "address": "h:1"}, {"id": "a", "address": "h:2"}]}', "twice"),
])
def test_malformed_roster_is_refused_with_its_reason(text: str, says: str) -> None:
    with pytest.raises(RosterError, match=says):
        parse_roster(text)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="cannot read roster .*nope.json"):
        load_roster(tmp_path / "nope.json")
