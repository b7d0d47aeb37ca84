"""Honest models learn: in-process gossiping peers (no Ray) with the default recipe.

The gossip is `gradleak run`'s default network in miniature: digits at 16x16, four
honest peers at batch sizes 1, 2, 4, 8 plus a fifth member at batch 1, the sigmoid
LeNet, fanout 2 on a complete topology, neighbours' updates 0..3 rounds late, and every
`mix_every` rounds each peer averages its model with a neighbour's (as PeerNode does).
"""

from __future__ import annotations

import random

import pytest
import torch

from gradleak.config import GossipConfig, PeerConfig
from gradleak.core.models import create_model, init_model, init_sigmoid
from gradleak.data import load_dataset, split
from p2p.defences import parse_defence
from p2p.peer import Peer
from p2p.update import Update

BATCH_SIZES = (1, 2, 4, 8)


def _gossip(init: str, optimizer: str, lr: float, rounds: int, seed: int = 0, mix_every: int = 0,
            mix_weight: float = 0.5) -> dict[int, float]:
    """Honest held-out accuracy per batch size after `rounds` lagged gossip rounds."""
    torch.set_num_threads(1)
    data = load_dataset("digits", limit=4000, seed=seed)
    shards, test = split(data, len(BATCH_SIZES) + 1, test_fraction=0.2, seed=seed)
    sizes = [*BATCH_SIZES, 1]
    peers = []
    for i, shard in enumerate(shards):
        model = init_model(create_model("lenet", in_channels=1, num_classes=10, image_size=16), init, seed)
        peers.append(Peer(f"p{i}", model, shard.images, shard.labels, batch_size=sizes[i],
                          defence=parse_defence("none"), lr=lr, keep_versions=2,
                          seed=seed * 1000 + i + 1, optimizer=optimizer))
    rng = random.Random(seed)
    in_flight: list[tuple[int, int, Update]] = []
    for r in range(1, rounds + 1):
        if mix_every and r % mix_every == 0:
            states = [p.model_at(None)[1] for p in peers]
            for i, p in enumerate(peers):
                p.mix(states[rng.choice([k for k in range(len(peers)) if k != i])], mix_weight)
        for i, p in enumerate(peers):
            update, _ = p.local_update(r)
            for j in rng.sample([k for k in range(len(peers)) if k != i], 2):
                in_flight.append((r + rng.randint(0, 3), j, update))  # up to 3 rounds late
        for _due, j, update in [x for x in in_flight if x[0] == r]:
            peers[j].accept_update(update)
        in_flight = [x for x in in_flight if x[0] > r]
        for p in peers:
            p.apply_pending()
    return {b: p.accuracy(test.images, test.labels) for b, p in zip(BATCH_SIZES, peers)}


@pytest.fixture(scope="module")
def default_recipe() -> dict[int, float]:
    pc, gc = PeerConfig(), GossipConfig()
    return _gossip(pc.init, pc.optimizer, pc.lr, gc.rounds, mix_every=gc.mix_every, mix_weight=gc.mix_weight)


def test_default_recipe_learns_at_every_batch_size(default_recipe: dict[int, float]) -> None:
    assert min(default_recipe.values()) >= 0.85, default_recipe


def test_without_mixing_the_batch_1_peer_falls_behind() -> None:
    pc, gc = PeerConfig(), GossipConfig()
    acc = _gossip(pc.init, pc.optimizer, pc.lr, gc.rounds, mix_every=0)
    assert acc[1] < 0.85, acc


def test_old_dlg_recipe_fails_the_same_check() -> None:
    acc = _gossip("dlg", "adam", 0.005, 150)
    assert min(acc.values()) < 0.85, acc


def test_inits_are_seeded_and_leave_the_global_rng_alone() -> None:
    for name in ("sigmoid", "default", "dlg"):
        a, b = (create_model("lenet", in_channels=1, num_classes=10, image_size=16) for _ in range(2))
        state = torch.random.get_rng_state()  # building a model draws from it; the init must not
        init_model(a, name, 7)
        init_model(b, name, 7)
        assert torch.equal(state, torch.random.get_rng_state())
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="unknown init"):
        init_model(torch.nn.Linear(2, 2), "nope", 0)


def test_sigmoid_init_centres_layers_fed_by_sigmoids() -> None:
    model = init_sigmoid(create_model("lenet", in_channels=1, num_classes=10, image_size=16),
                         torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    biases = [layer.bias for layer in layers]
    assert all(b is not None for b in biases)
    first = biases[0]
    assert first is not None and not first.any()
    for layer, bias in zip(layers[1:], biases[1:]):
        w = layer.weight.detach().double().flatten(1)
        assert bias is not None and torch.allclose(bias.detach().double(), -0.5 * w.sum(1), atol=1e-5)
