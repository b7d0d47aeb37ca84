"""The malicious peer's transcript: bit-exact round trip, the byte budget, strict reading."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from gradleak.runtime.transcript import (
    META_FILE,
    TRANSCRIPT_DIR,
    UPDATES_FILE,
    WEIGHTS_FILE,
    TranscriptError,
    TranscriptReader,
    TranscriptWriter,
)
from p2p.update import Update, UpdateHeader


def _writer(tmp_path: Path, max_bytes: int = 64 << 20) -> TranscriptWriter:
    return TranscriptWriter(tmp_path, max_bytes=max_bytes, model="lenet", input_shape=(1, 16, 16),
                            num_classes=10, attack_config={"seed": 3})


def _update(lenet, i: int, *, dtype=torch.float32, prune: float = 0.0) -> Update:
    g = torch.Generator().manual_seed(i)
    tensors = {}
    for n, p in lenet.named_parameters():
        t = torch.randn(p.shape, generator=g)
        if prune:
            t[torch.rand(p.shape, generator=g) < prune] = 0.0
        tensors[n] = t.to(dtype)
    first = next(iter(tensors))
    tensors[first].view(-1)[0] = -0.0  # the bit pattern must survive (sparse selects by bits)
    header = UpdateHeader(f"h/r{i}", "h", "s", i, i - 1, 2, "prune:0.9" if prune else "none", 0.5, 1e9 + i)
    return Update(header, tensors)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_round_trip_is_bit_exact_dense_sparse_fp16(tmp_path: Path, lenet) -> None:
    w = _writer(tmp_path)
    sent = [_update(lenet, 1), _update(lenet, 2, prune=0.95), _update(lenet, 3, dtype=torch.float16),
            _update(lenet, 4, dtype=torch.float16, prune=0.9)]
    for k, u in enumerate(sent):
        assert w.add_update(u, received_at=100.0 + k)
    state = {k: v.clone() for k, v in lenet.state_dict().items()}
    assert w.add_weights("s", 0, state, fetched_at=5.0)
    assert w.add_weights("s", 0, state)  # the same (sender, version) is written once
    w.close()
    meta = json.loads((tmp_path / TRANSCRIPT_DIR / META_FILE).read_text())
    assert meta["updates"] == 4 and meta["weights"] == 1 and meta["truncated"] == 0
    assert meta["model"] == "lenet" and meta["input_shape"] == [1, 16, 16] and meta["num_classes"] == 10
    assert meta["bytes"] == sum(f.stat().st_size for f in (tmp_path / TRANSCRIPT_DIR).glob("*.bin"))

    r = TranscriptReader(tmp_path)
    got = list(r.updates())
    assert [g.received_at for g in got] == [100.0, 101.0, 102.0, 103.0]
    for g, u in zip(got, sent, strict=True):
        assert g.update.header == u.header
        assert list(g.update.tensors) == list(u.tensors)
        assert all(_bits_equal(g.update.tensors[n], u.tensors[n]) for n in u.tensors)
    assert r.weight_keys() == [("s", 0)]
    back = r.weights("s", 0)
    assert back is not None and all(_bits_equal(back[k], state[k]) for k in state)
    assert r.weights("s", 7) is None and r.meta["attack_config"] == {"seed": 3}
    # the pruned update is stored sparse: far smaller than the dense one
    sizes = [e.frames for e in r._updates]
    assert sum(map(len, sizes[1])) < sum(map(len, sizes[0])) / 4


def test_the_byte_budget_refuses_and_counts(tmp_path: Path, lenet) -> None:
    one = _writer(tmp_path / "probe")
    one.add_update(_update(lenet, 1))
    per_update = one.bytes - 16  # two 8-byte magics
    one.close()
    w = _writer(tmp_path, max_bytes=16 + 2 * per_update + per_update // 2)
    results = [w.add_update(_update(lenet, i)) for i in range(1, 5)]
    assert results == [True, True, False, False]
    assert not w.add_weights("s", 0, lenet.state_dict())
    w.close()
    meta = json.loads((tmp_path / TRANSCRIPT_DIR / META_FILE).read_text())
    assert (meta["updates"], meta["refused_updates"], meta["refused_weights"], meta["truncated"]) == (2, 2, 1, 3)
    assert meta["bytes"] <= meta["budget_bytes"]
    assert [u.update.header.update_id for u in TranscriptReader(tmp_path).updates()] == ["h/r1", "h/r2"]


def test_concurrent_writers_leave_a_valid_file(tmp_path: Path, lenet) -> None:
    w = _writer(tmp_path)
    ups = [_update(lenet, i) for i in range(1, 17)]
    threads = [threading.Thread(target=w.add_update, args=(u,)) for u in ups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # nothing closed: what a crash would leave is readable as it is
    ids = sorted(u.update.header.update_id for u in TranscriptReader(tmp_path).updates())
    assert ids == sorted(u.header.update_id for u in ups)
    w.close()


def _written(tmp_path: Path, lenet) -> Path:
    w = _writer(tmp_path)
    w.add_update(_update(lenet, 1))
    w.add_update(_update(lenet, 2))
    w.add_weights("s", 0, lenet.state_dict())
    w.close()
    return tmp_path / TRANSCRIPT_DIR


def test_a_truncated_file_names_the_file_and_offset(tmp_path: Path, lenet) -> None:
    d = _written(tmp_path, lenet)
    data = (d / UPDATES_FILE).read_bytes()
    first_len = int.from_bytes(data[8:12], "little") + 8
    second = 8 + first_len
    (d / UPDATES_FILE).write_bytes(data[:-10])
    with pytest.raises(TranscriptError, match=rf"updates\.bin: truncated .* at offset {second}$"):
        TranscriptReader(tmp_path)


def test_a_flipped_byte_is_a_checksum_error_not_garbage(tmp_path: Path, lenet) -> None:
    d = _written(tmp_path, lenet)
    data = bytearray((d / WEIGHTS_FILE).read_bytes())
    data[200] ^= 0x01
    (d / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(TranscriptError, match=r"weights\.bin: checksum mismatch .* at offset 8$"):
        TranscriptReader(tmp_path)


@pytest.mark.parametrize("damage", ["magic", "meta", "no_meta", "version", "no_dir"])
def test_other_damage_is_a_clear_error(tmp_path: Path, lenet, damage: str) -> None:
    d = _written(tmp_path, lenet)
    if damage == "magic":
        (d / UPDATES_FILE).write_bytes(b"PICKLE!!" + (d / UPDATES_FILE).read_bytes()[8:])
    elif damage == "meta":
        (d / META_FILE).write_text("{not json")
    elif damage == "no_meta":
        (d / META_FILE).unlink()
    elif damage == "version":
        meta = json.loads((d / META_FILE).read_text())
        (d / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(TranscriptError) as err:
        TranscriptReader(tmp_path / "elsewhere" if damage == "no_dir" else tmp_path)
    assert "\n" not in str(err.value) and ("transcript" in str(err.value))


def test_the_writer_pulls_weights_of_updates_nobody_attacked(tmp_path: Path, lenet) -> None:
    asked: list[tuple[str, int]] = []

    def pull(sender: str, version: int):
        asked.append((sender, version))
        if version == 2:
            raise RuntimeError("version gone")
        return lenet.state_dict()

    w = TranscriptWriter(tmp_path, max_bytes=64 << 20, model="lenet", input_shape=(1, 16, 16),
                         num_classes=10, pull=pull)
    w.add_weights("s", 0, lenet.state_dict())  # the attacker pulled this one itself
    for i in (1, 2, 3, 4):  # versions 0, 1, 2, 3
        w.add_update(_update(lenet, i))
    w.close()
    assert sorted(asked) == [("s", 1), ("s", 2), ("s", 3)]
    r = TranscriptReader(tmp_path)
    assert r.weight_keys() == [("s", 0), ("s", 1), ("s", 3)]
    assert r.meta["weights_unpulled"] == 1 and r.meta["weights"] == 3


def test_model_messages_received_and_sent_are_kept_with_their_receiver(tmp_path: Path, lenet) -> None:
    import dataclasses

    w = _writer(tmp_path)
    w._pull = lambda s, v: {}  # as if pulling: a model message must queue no pull of weights
    got = _update(lenet, 1)
    got = Update(dataclasses.replace(got.header, defence="none", kind="model", mix_round=1), got.tensors)
    mine = Update(dataclasses.replace(got.header, update_id="m/r1/m1", origin="m", sender="m"),
                  {n: t + 1 for n, t in got.tensors.items()})
    assert w.add_update(got) and w.add_sent(mine, "h", "sent") and w.add_sent(mine, "k", "dropped")
    with pytest.raises(ValueError, match="status"):
        w.add_sent(mine, "h", "lost")
    assert w._pending.empty()
    w.close()
    r = TranscriptReader(tmp_path)
    [back] = [u.update for u in r.updates()]
    assert back.header == got.header
    sent = list(r.sent())
    assert [(s.receiver, s.status) for s in sent] == [("h", "sent"), ("k", "dropped")]
    assert sent[0].update.header == mine.header
    assert all(_bits_equal(sent[0].update.tensors[n], t) for n, t in mine.tensors.items())
    assert json.loads((tmp_path / "transcript" / "meta.json").read_text())["sent"] == 2
