"""The offline text attack: sentences of a corpus file, their gradients, token-wise recovery.

Sentences of equal length are grouped into batches (length is public, like batch
size); each batch's gradient is defended and attacked, then scored by token accuracy
and exact-sentence rate. The evaluation side holds the truth, as in gradleak/offline.py.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacker.text import TextAttackConfig, TextObservation, create_text_attack
from attacker.text_metrics import score_text
from gradleak.core.text import Corpus, create_text_model, load_corpus, text_gradients
from p2p.defences import parse_defence


@dataclass(frozen=True)
class TextOfflineConfig:
    corpus: str  # one sentence per line
    out: str
    model: str = "transformer"
    attack: str = "dlg-text"
    batch_size: int = 1
    defence: str = "none"
    max_iters: int = 30
    seed: int = 0
    threads: int = 1
    num_batches: int | None = None


def batches_by_length(corpus: Corpus, batch_size: int) -> list[list[int]]:
    """Consecutive groups of `batch_size` sentence indices of equal length, in corpus order."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(corpus.sentences):
        by_len[len(s)].append(i)
    groups = [idx[k:k + batch_size] for idx in by_len.values() for k in range(0, len(idx), batch_size)]
    return sorted((g for g in groups if len(g) == batch_size), key=lambda g: g[0])


def run_text_offline(cfg: TextOfflineConfig) -> dict[str, Any]:
    """Attack each equal-length batch of the corpus; write result.json."""
    corpus = load_corpus(cfg.corpus)
    attack = create_text_attack(cfg.attack, TextAttackConfig(max_iters=cfg.max_iters, seed=cfg.seed))
    defence = parse_defence(cfg.defence)
    model = create_text_model(cfg.model, vocab_size=corpus.vocab_size, max_len=corpus.max_len, seed=cfg.seed)
    torch.set_num_threads(cfg.threads)
    groups = batches_by_length(corpus, cfg.batch_size)
    if not groups:
        raise ValueError(f"no {cfg.batch_size} sentences of equal length in {cfg.corpus}")
    groups = groups[: cfg.num_batches] if cfg.num_batches else groups
    noise = torch.Generator().manual_seed(cfg.seed)
    names = [n for n, _ in model.named_parameters()]
    results = []
    for idx in groups:
        ids = torch.stack([corpus.encode(corpus.sentences[i]) for i in idx])  # (B, T)
        grads = dict(zip(names, text_gradients(model, ids)))
        defended = defence.apply(grads, noise)
        obs = TextObservation(gradients=tuple(defended[n].float() for n in names),
                              batch_size=len(idx), seq_len=ids.shape[1])
        start = time.perf_counter()
        rec = attack.reconstruct(model, obs)
        seconds = time.perf_counter() - start
        s = score_text(rec.tokens, ids)
        results.append({
            "indices": idx, "token_accuracy": s["token_accuracy"],
            "exact_sentence_rate": s["exact_sentence_rate"],
            "truth": [corpus.decode(t) for t in ids],
            "reconstruction": [corpus.decode(t) for t in rec.tokens],
            "iterations": int(rec.stats.get("iterations", 0)), "seconds": round(seconds, 4),
        })
    result = {"attack": cfg.attack, "model": cfg.model, "batch_size": cfg.batch_size,
              "defence": defence.name, "attacks": results}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
