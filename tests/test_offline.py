"""`gradleak attack`: the documented result.json, folder input, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradleak.cli import main


@pytest.fixture
def npz(tmp_path: Path, digits_data) -> Path:
    path = tmp_path / "digits.npz"
    np.savez(path, images=digits_data.images[:4], labels=digits_data.labels[:4])
    return path


def test_npz_batch1_writes_the_documented_result(npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["attack", "--images", str(npz), "--attack", "idlg", "--max-iters", "100",
                 "--num-batches", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert {k: result[k] for k in ("attack", "model", "batch_size", "defence")} == {
        "attack": "idlg", "model": "lenet", "batch_size": 1, "defence": "none"}
    assert [a["indices"] for a in result["attacks"]] == [[0], [1]]
    for a in result["attacks"]:
        assert set(a) == {"indices", "psnr", "ssim", "label_accuracy", "iterations", "seconds",
                          "time_to_target_seconds"}
        assert a["psnr"][0] >= 30 and a["label_accuracy"] == 1.0
        assert 0 < a["time_to_target_seconds"] <= a["seconds"]
    assert (out / "grid.png").stat().st_size > 0


def test_analytic_attacks_a_batch_of_four(npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["attack", "--images", str(npz), "--attack", "analytic", "--batch-size", "4",
                 "--max-iters", "60", "--out", str(out)]) == 0
    (batch,) = json.loads((out / "result.json").read_text())["attacks"]
    assert batch["indices"] == [0, 1, 2, 3] and batch["label_accuracy"] == 1.0
    assert np.mean(batch["psnr"]) >= 24  # measured 26.3 (one image 17.9); DLG: ~5-10 dB


def test_defence_is_applied_and_named(npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["attack", "--images", str(npz), "--defence", "gauss:1e-1", "--max-iters", "20",
                 "--num-batches", "1", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["defence"] == "gauss:0.1"
    assert result["attacks"][0]["psnr"][0] < 30  # heavy noise defends against iDLG
    assert result["attacks"][0]["time_to_target_seconds"] is None


def test_folder_of_pngs(tmp_path: Path, digits_data) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((digits_data.images[i, 0] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main(["attack", "--images", str(folder), "--max-iters", "100", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["attacks"]) == 2 and result["attacks"][0]["psnr"][0] >= 30


def _bad_npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("make, extra, needle", [
    (lambda t: str(t / "missing.npz"), [], "images not found"),
    (lambda t: _bad_npz(t, images=np.zeros((2, 16, 16), np.float32), labels=np.zeros(2, int)), [], "N x C x H x W"),
    (lambda t: _bad_npz(t, images=np.full((2, 1, 16, 16), 2.0, np.float32), labels=np.zeros(2, int)), [], "[0, 1]"),
    (lambda t: _bad_npz(t, images=np.zeros((2, 1, 16, 16), np.float32)), [], "lacks array(s) ['labels']"),
    (lambda t: _bad_npz(t, images=np.zeros((2, 1, 16, 16), np.float32), labels=np.zeros(2, int)),
     ["--attack", "nope"], "unknown attack 'nope'"),
    (lambda t: _bad_npz(t, images=np.zeros((2, 1, 16, 16), np.float32), labels=np.zeros(2, int)),
     ["--model", "vgg"], "unknown model 'vgg'"),
    (lambda t: _bad_npz(t, images=np.zeros((2, 1, 16, 16), np.float32), labels=np.zeros(2, int)),
     ["--batch-size", "4"], "cannot fill one batch"),
    (lambda t: _bad_npz(t, images=np.zeros((2, 1, 16, 16), np.float32), labels=np.zeros(2, int)),
     ["--defence", "prune:2"], "prune ratio"),
])
def test_bad_input_one_line_nonzero_nothing_written(make, extra, needle, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["attack", "--images", make(tmp_path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (out / "result.json").exists()


CORPUS = Path(__file__).parent / "data" / "corpus.txt"


def test_text_corpus_recovers_sentences(tmp_path: Path) -> None:
    out = tmp_path / "text"
    assert main(["attack", "--corpus", str(CORPUS), "--num-batches", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["attack"] == "dlg-text" and result["model"] == "transformer"
    for a in result["attacks"]:
        assert a["token_accuracy"] >= 0.9
        assert a["truth"] and len(a["reconstruction"]) == len(a["truth"])


def test_text_batches_group_equal_lengths(tmp_path: Path) -> None:
    from gradleak.core.text import load_corpus
    from gradleak.offline_text import batches_by_length

    corpus = load_corpus(CORPUS)
    groups = batches_by_length(corpus, 2)
    assert groups and all(len({len(corpus.sentences[i]) for i in g}) == 1 for g in groups)


@pytest.mark.parametrize("extra, needle", [
    (["--corpus", "/nonexistent.txt"], "corpus file not found"),
    (["--corpus", str(CORPUS), "--attack", "nope"], "unknown text attack 'nope'"),
    (["--corpus", str(CORPUS), "--batch-size", "500"], "no 500 sentences of equal length"),
])
def test_text_bad_input(extra: list[str], needle: str, tmp_path: Path, capsys) -> None:
    assert main(["attack", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
