"""Colluders' transcripts pooled into one knowledge system (gradleak.runtime.gossip_leak), in-process.

gradleak.gossip_sim runs a line with two attackers and holds the truth; each attacker's
messages go to its own transcript as a live malicious peer writes them, and the pooled
system must determine every node either attacker determines alone, and more.
"""

from __future__ import annotations

import numpy as np
import torch

from attacker.gossip_attack import unflatten
from gradleak.core.colluders import attacker_ids, honest_ids
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.data import load_dataset
from gradleak.gossip_sim import sgd_update, simulate
from gradleak.runtime.gossip_leak import (
    GossipPublic,
    determined_nodes,
    run_gossip_attack,
    shared_model,
    solve_transcripts,
)
from gradleak.runtime.transcript import TranscriptReader, TranscriptWriter, transcript_path
from p2p.update import Update, UpdateHeader

LR = 0.1
HONEST = 8


def _transcripts(tmp_path, public: GossipPublic) -> tuple[dict[str, TranscriptReader], dict]:
    data = load_dataset("digits", seed=0)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    model, x0, names = shared_model(public, (1, 16, 16), 10)
    members = list(public.members)

    def batch(node: str, step: int):
        i = (37 * members.index(node) + step) % len(labels)
        return images[i:i + 1], labels[i:i + 1]

    graph = build_graph("line", members, 0)
    w = mixing_matrix(graph, members)
    _view, truth = simulate(graph, members, w, list(public.attackers), x0, steps=public.steps,
                            rounds=public.mix_rounds, local_update=sgd_update(model, batch, LR))

    def update(sender: str, s: int, r: int, flat: np.ndarray) -> Update:
        header = UpdateHeader(update_id=f"{sender}/r{s}/m{r}", origin=sender, sender=sender, round=s,
                              model_version=s - 1, num_samples=1, mixing_weight=0.5, kind="model", mix_round=r)
        return Update(header, dict(zip(names, unflatten(model, flat), strict=True)))

    readers = {}
    for a in public.attackers:  # what each live colluder writes to RUN_DIR/transcript/<id>/
        writer = TranscriptWriter(tmp_path, max_bytes=64 << 20, model="lenet", input_shape=(1, 16, 16),
                                  num_classes=10, subdir=a)
        for s in range(1, public.steps + 1):
            for r in range(public.mix_rounds):
                for j in graph[a]:
                    writer.add_update(update(j, s, r, truth.states[(j, s, r)]))
                    writer.add_sent(update(a, s, r, truth.states[(a, s, r)]), j, "sent")
        writer.close()
        readers[a] = TranscriptReader(transcript_path(tmp_path, a))
    return readers, {"x0": x0, "names": names, "truth": truth}


def test_pooled_colluders_determine_more_than_either_alone(tmp_path) -> None:
    bad = tuple(attacker_ids(HONEST, 2))
    assert bad == ("mallory", "peer-3.mallory")
    ids = honest_ids(HONEST)
    public = GossipPublic(tuple(sorted([*ids, *bad])), bad, "line", 0, "metropolis", 2, 1, LR, "lenet",
                          "sigmoid", 0, "rounds", {p: 1 for p in ids})
    readers, run = _transcripts(tmp_path, public)
    x0, names, truth = run["x0"], run["names"], run["truth"]
    alone = {a: set(determined_nodes(solve_transcripts({a: r}, public, x0, names)[1], public))
             for a, r in readers.items()}
    _k, pooled, _i = solve_transcripts(readers, public, x0, names)
    both = set(determined_nodes(pooled, public))
    assert alone["mallory"] == {"peer-0", "peer-1"}  # R = 2 hops from the end of the line
    assert both >= alone["mallory"] | alone["peer-3.mallory"]
    assert len(both) > max(len(v) for v in alone.values())
    for key, value in pooled.estimates.items():  # what is determined is the truth's lr * g
        scale = np.abs(truth.updates[key]).max()
        np.testing.assert_allclose(value, truth.updates[key], atol=1e-3 * scale, err_msg=str(key))
    # the attack's report states the attacker set and what each determined alone
    report = run_gossip_attack(readers, public, lambda *_a: None, budget_s=0.0)
    assert report["attackers"] == list(bad) and report["determined_nodes"] == len(both)
    assert report["determined_alone"] == {a: len(v) for a, v in alone.items()}
    assert set(report["nodes"]) == set(ids)  # the colluders are no victims
