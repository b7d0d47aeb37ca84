"""Text leakage: the corpus and LM victim, the bag-of-words signal, and DLG on sentences."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from attacker.text import (
    TEXT_ATTACKS,
    TextAttackConfig,
    TextObservation,
    bag_of_words,
    create_text_attack,
)
from attacker.text_metrics import exact_sentence_rate, match_sentences, score_text, token_accuracy
from gradleak.core.text import (
    BOS_ID,
    SPECIALS,
    TEXT_MODELS,
    UNK_ID,
    Corpus,
    CorpusError,
    create_text_model,
    load_corpus,
    text_gradients,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
BUDGET = TextAttackConfig(max_iters=30, seed=0)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(CORPUS)


@pytest.fixture(scope="module")
def lm(corpus: Corpus) -> nn.Module:
    return create_text_model(
        "transformer", vocab_size=corpus.vocab_size, max_len=corpus.max_len, seed=0
    )


def observe(model: nn.Module, ids: torch.Tensor) -> TextObservation:
    """What a malicious peer receives from an honest peer training on sentences `ids`."""
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    return TextObservation(text_gradients(model, ids), batch_size=ids.shape[0], seq_len=ids.shape[1])


# --------------------------------------------------------------------------- corpus


def test_encode_decode_round_trip(corpus: Corpus) -> None:
    ids = corpus.encode("Please close the window, it's windy.")
    assert corpus.decode(ids) == "please close the window , it's windy ."
    assert ids.dtype == torch.int64 and UNK_ID not in ids.tolist()
    for sentence in corpus.sentences:
        assert tuple(corpus.decode(corpus.encode(sentence)).split()) == sentence
    assert corpus.encode("The zebra sang.").tolist()[1] == UNK_ID


def test_vocabulary_is_deterministic_with_specials_first(corpus: Corpus, tmp_path: Path) -> None:
    assert corpus.vocab[: len(SPECIALS)] == SPECIALS
    # "." and "the" occur 28 times each, more than any other token; ties go alphabetically
    assert corpus.vocab[len(SPECIALS) : len(SPECIALS) + 2] == (".", "the")
    assert len(corpus.sentences) == 30 and load_corpus(CORPUS).vocab == corpus.vocab
    rare = load_corpus(CORPUS, min_count=2, max_len=4)
    assert "zebra" not in rare.vocab and "morning" not in rare.vocab  # seen once
    assert rare.max_len == 4 and all(len(s) <= 4 for s in rare.sentences)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no sentence"), (b"\n  \n\t\n", "no sentence"), (b"abc\x00\x01", "binary"),
     (b"caf\xe9 au lait\n", "not UTF-8")],
)
def test_bad_corpus_files_raise_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(path)


def test_missing_corpus_file_raises(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt")


# --------------------------------------------------------------------------- model


def test_model_is_seeded_and_accepts_soft_inputs(corpus: Corpus, lm: nn.Module) -> None:
    again = create_text_model("transformer", vocab_size=corpus.vocab_size, max_len=corpus.max_len)
    other = create_text_model(
        "transformer", vocab_size=corpus.vocab_size, max_len=corpus.max_len, seed=1
    )
    first = [p.detach() for p in lm.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, again.parameters(), strict=True))
    assert not torch.equal(first[0], next(other.parameters()))
    ids = corpus.encode(corpus.sentences[0])[None]  # (1, T)
    one_hot = torch.nn.functional.one_hot(ids, corpus.vocab_size).float()  # (1, T, V)
    soft = lm(embeds=one_hot @ lm.token_embedding.weight)
    assert soft.shape == (1, ids.shape[1] + 1, corpus.vocab_size)
    torch.testing.assert_close(soft, lm(ids))


def test_unknown_names_raise_listing_known_ones() -> None:
    with pytest.raises(ValueError, match="known: transformer"):
        create_text_model("lstm", vocab_size=10, max_len=5)
    with pytest.raises(ValueError, match="known: analytic-text, dlg-text"):
        create_text_attack("tag")
    assert {"transformer"} <= set(TEXT_MODELS) and {"dlg-text", "analytic-text"} <= set(TEXT_ATTACKS)


# --------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("index", [0, 7, 14])
def test_bag_of_words_is_exact(corpus: Corpus, lm: nn.Module, index: int) -> None:
    ids = corpus.encode(corpus.sentences[index])
    assert bag_of_words(lm, observe(lm, ids)).tolist() == sorted(set(ids.tolist()))


def test_bag_of_words_of_a_batch_is_the_union(corpus: Corpus, lm: nn.Module) -> None:
    ids = torch.stack([corpus.encode(corpus.sentences[i]) for i in (4, 6)])  # both 8 tokens
    assert bag_of_words(lm, observe(lm, ids)).tolist() == sorted(set(ids.flatten().tolist()))
    assert BOS_ID not in bag_of_words(lm, observe(lm, ids)).tolist()


@pytest.mark.parametrize("index", [0, 7, 15])  # 7 tokens each
def test_dlg_text_recovers_a_sentence(corpus: Corpus, lm: nn.Module, index: int) -> None:
    ids = corpus.encode(corpus.sentences[index])
    recon = create_text_attack("dlg-text", BUDGET).reconstruct(lm, observe(lm, ids))
    assert recon.tokens.shape == (1, ids.numel())
    assert token_accuracy(recon.tokens, ids) >= 0.9
    assert recon.stats["stop_reason"] == "converged"
    assert recon.stats["grad_distance"] < BUDGET.rel_tol
    assert recon.stats["bag_size"] == len(set(ids.tolist()))


def test_dlg_text_restarts_while_the_best_start_stays_above_tolerance(corpus: Corpus, lm: nn.Module) -> None:
    # A start above restart_tol (one stuck in a wrong word order: seed 0 on sentence 8
    # was, on an earlier torch build; none is on 2.14.1, so a tolerance of 0 stands in)
    # must be followed by fresh seeded starts, and the best of them is kept.
    ids = corpus.encode(corpus.sentences[8])
    short = TextAttackConfig(max_iters=2, seed=0, restarts=0, restart_tol=0.0)
    single = create_text_attack("dlg-text", short).reconstruct(lm, observe(lm, ids))
    assert single.stats["grad_distance"] > short.restart_tol and single.stats["starts"] == 1
    several = create_text_attack("dlg-text", dataclasses.replace(short, restarts=3))
    recon = several.reconstruct(lm, observe(lm, ids))
    assert recon.stats["starts"] == 4  # every start ends above a tolerance of 0
    assert recon.stats["grad_distance"] <= single.stats["grad_distance"]
    assert several.reconstruct(lm, observe(lm, ids)).tokens.tolist() == recon.tokens.tolist()


def test_dlg_text_recovers_a_batch_of_two(corpus: Corpus, lm: nn.Module) -> None:
    ids = torch.stack([corpus.encode(corpus.sentences[i]) for i in (4, 6)])
    recon = create_text_attack("dlg-text", BUDGET).reconstruct(lm, observe(lm, ids))
    assert score_text(recon.tokens, ids)["token_accuracy"] >= 0.9


def test_attack_leaves_the_model_untouched(corpus: Corpus, lm: nn.Module) -> None:
    before = [p.detach().clone() for p in lm.parameters()]
    create_text_attack("dlg-text", TextAttackConfig(max_iters=2, restarts=0)).reconstruct(
        lm, observe(lm, corpus.encode(corpus.sentences[1]))
    )
    assert all(p.grad is None for p in lm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters(), strict=True))


def test_analytic_text_reads_the_order_from_position_gradients(
    corpus: Corpus, lm: nn.Module
) -> None:
    attack = create_text_attack("analytic-text")
    for sentence in corpus.sentences[:10]:
        ids = corpus.encode(sentence)
        assert attack.reconstruct(lm, observe(lm, ids)).tokens[0].tolist() == ids.tolist()
    repeated = corpus.encode("the cat and the dog and the fox .")  # repeated tokens
    assert attack.reconstruct(lm, observe(lm, repeated)).tokens[0].tolist() == repeated.tolist()
    batch = torch.stack([corpus.encode(corpus.sentences[i]) for i in (4, 6)])
    with pytest.raises(ValueError, match="one sentence"):
        attack.reconstruct(lm, observe(lm, batch))


# --------------------------------------------------------------------------- metrics


def test_text_metrics_on_hand_made_cases() -> None:
    true = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    assert token_accuracy(true, true) == 1.0 and exact_sentence_rate(true, true) == 1.0
    pred = torch.tensor([[5, 6, 7, 0], [9, 10, 11, 12]])
    assert token_accuracy(pred, true) == pytest.approx(7 / 8)
    assert exact_sentence_rate(pred, true) == 0.5
    assert token_accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    swapped = pred.flip(0)  # a batch comes back in any order
    assert match_sentences(swapped, true).tolist() == [1, 0]
    scored = score_text(swapped, true)
    assert scored["token_accuracy"] == pytest.approx(7 / 8)
    assert scored["exact_sentence_rate"] == 0.5
    assert scored["sentence_accuracy"] == [0.75, 1.0]
    with pytest.raises(ValueError, match="equal"):
        token_accuracy(true, true[:, :3])
