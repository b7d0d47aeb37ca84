"""An in-process replay of model gossip written apart from p2p.model_gossip: the protocol, pinned.

The peers' data, seeds and initial weights come from the run's own specs (plumbing); the
protocol itself is redone here in float64 with the mixing matrix as a matrix: for every
local step, h_i = x_i - lr * g_i(x_i) on the batch peer i's seeded stream draws, then R
times z <- W z, then x = float32(z). A live run's weights must match it to float32
precision, or the attacker's gossip algebra would solve the wrong equations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gradleak.config import RunConfig
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.core.models import create_model, init_model
from gradleak.data import load_dataset, split
from gradleak.runtime.peer_node import PeerSpec
from gradleak.specs import peer_spec


def run_specs(cfg: RunConfig) -> list[PeerSpec]:
    """The run's peer specs as the runner builds them (honest peers first, the attacker last)."""
    data = load_dataset(cfg.data.dataset, image_size=cfg.data.image_size, limit=cfg.data.limit, seed=cfg.seed)
    shards, test = split(data, cfg.peers.honest + 1, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    ids = [f"peer-{i}" for i in range(cfg.peers.honest)] + ["mallory"]
    return [peer_spec(cfg, i, ids[i], role="malicious" if i == cfg.peers.honest else "honest", shard=shard,
                      test=test, data=data, members=tuple(ids), host="127.0.0.1")
            for i, shard in enumerate(shards)]


@dataclass
class Replay:
    weights: dict[str, dict[str, np.ndarray]]  # peer -> final float32 weights by name
    spread_before: list[float]  # per step: mean pairwise L2 of the honest half-steps h
    spread_after: list[float]  # ... and of the honest models after the R averaging rounds


def _spread(vectors: list[np.ndarray]) -> float:
    d = [np.linalg.norm(a - b) for i, a in enumerate(vectors) for b in vectors[i + 1:]]
    return float(np.mean(d))


def replay(cfg: RunConfig, specs: list[PeerSpec], steps: int) -> Replay:
    order = sorted(s.peer_id for s in specs)
    gc = cfg.gossip
    w = mixing_matrix(build_graph(gc.topology, order, cfg.seed), order, gc.mixing)
    by_id = {s.peer_id: s for s in specs}
    specs = [by_id[p] for p in order]
    honest = [i for i, s in enumerate(specs) if s.role == "honest"]
    c, hw, _ = specs[0].input_shape
    model = create_model(specs[0].model, in_channels=c, num_classes=specs[0].num_classes, image_size=hw)
    init_model(model, specs[0].init, specs[0].model_seed)
    names = [n for n, _ in model.named_parameters()]
    x = [[p.detach().to(torch.float64).numpy().copy() for _, p in model.named_parameters()] for _ in specs]
    rngs = [np.random.default_rng(s.seed) for s in specs]
    before, after = [], []
    for _step in range(steps):
        h = []
        for i, s in enumerate(specs):
            with torch.no_grad():
                for p, v in zip(model.parameters(), x[i]):
                    p.copy_(torch.from_numpy(v).float())
            idx = rngs[i].choice(len(s.shard_labels), size=s.batch_size, replace=False)
            loss = F.cross_entropy(model(torch.from_numpy(s.shard_images[idx])), torch.from_numpy(s.shard_labels[idx]))
            grads = torch.autograd.grad(loss, list(model.parameters()))
            h.append([v - s.lr * g.detach().to(torch.float64).numpy() for v, g in zip(x[i], grads)])
        before.append(_spread([np.concatenate([t.ravel() for t in h[i]]) for i in honest]))
        z = h
        for _r in range(gc.mix_rounds):
            z = [[sum(w[i, j] * z[j][k] for j in range(len(specs)) if w[i, j]) for k in range(len(names))]
                 for i in range(len(specs))]
        x = [[t.astype(np.float32).astype(np.float64) for t in zi] for zi in z]
        after.append(_spread([np.concatenate([t.ravel() for t in x[i]]) for i in honest]))
    weights = {s.peer_id: {n: x[i][k].astype(np.float32) for k, n in enumerate(names)} for i, s in enumerate(specs)}
    return Replay(weights, before, after)
