"""Active model-gossip strategies of the malicious node: the state override (attacker/active.py).

`state-override` sets every neighbour's next model to the run's x0 (the attacker's own
initial weights, which every peer starts from); `crafted` to attack-friendly weights: on a ReLU
MLP the imprint of attacker/imprint.py (its gradient reads out a whole batch), else a fresh
DLG-uniform init (seeded from the run). At each step's last round the strategy reads the round's
messages already received (the driver lets the attacker send last: a rushing member),
computes the override per victim and records what it sent, whether it was exact (the
victim's whole neighbourhood observed) or estimated, and the detection scores the victim
could compute, as run record rows of kind "override". When the victim's next half-step
arrives it records the norm of the gradient read from it ("override_read") and queues that
gradient for the live attacks like a received gradient update, taken at theta* (the
evaluator scores it under the victim's step id). The transcript holds both messages.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from attacker.active import detection_scores, override_message, recover_gradient
from attacker.imprint import brightness_thresholds, imprint_weights, is_relu_mlp
from gradleak.core.graphs import build_graph, mixing_weights
from gradleak.core.models import init_dlg_uniform
from p2p.update import Update

log = logging.getLogger(__name__)


def _flat(tensors: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([tensors[n].detach().cpu().to(torch.float64).numpy().ravel() for n in names])


class StateOverride:
    """The ModelStrategy of a malicious node that overrides its neighbours toward `target`."""

    def __init__(self, node: Any, target: dict[str, torch.Tensor], label: str) -> None:
        spec = node.spec
        self.node, self.label, self.me = node, label, spec.peer_id
        self.names = list(target)
        self.shapes = {n: tuple(t.shape) for n, t in target.items()}
        self.target = _flat(target, self.names)
        graph = build_graph(spec.topology, sorted(spec.members), spec.run_seed)
        self.rows = {v: mixing_weights(graph, v, spec.mixing) for v in graph[spec.peer_id]}
        self.last = spec.mix_rounds - 1
        self.lr = float(spec.lr)
        self.sent: dict[tuple[str, int], bool] = {}  # (victim, step) -> exact
        self._at_target: set[tuple[str, int]] = set()  # (victim, model version) taken at theta*

    def __call__(self, neighbour: str, step: int, mix_round: int, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if mix_round != self.last or neighbour not in self.rows:
            return z
        row = self.rows[neighbour]
        got = self.node.exchange.gossip.held(step, mix_round)
        held = {p: _flat(t, self.names) for p, t in got.items() if p in row}
        if neighbour not in held:  # the victim's message is not in: nothing to cancel against
            self.node.log_row({"kind": "override", "strategy": self.label, "victim": neighbour, "step": step,
                               "mix_round": mix_round, "sent": False, "reason": "victim message missing"})
            return z
        ov = override_message(row=row, victim=neighbour, attacker=self.me, target=self.target, held=held)
        seen = {p: m for p, m in held.items() if p != neighbour}
        scores = detection_scores(held[neighbour], {self.me: ov.message, **seen})[self.me]
        self.sent[(neighbour, step)] = ov.exact
        self.node.log_row({
            "kind": "override", "strategy": self.label, "victim": neighbour, "step": step, "mix_round": mix_round,
            "sent": True, "target": self.label, "exact": ov.exact, "estimated": list(ov.estimated),
            "l2": scores.l2, "l2_ratio": _num(scores.l2_ratio), "cosine": _num(scores.cosine),
            "detection_complete": ov.exact,  # the scores over the neighbours the attacker sees
        })
        out, at = {}, 0
        for n in self.names:
            size = int(np.prod(self.shapes[n]))
            out[n] = torch.from_numpy(ov.message[at:at + size].reshape(self.shapes[n])).to(z[n].dtype)
            at += size
        return out

    def received(self, update: Update) -> None:
        """A victim's half-step after an override: the gradient it took at the target."""
        h = update.header
        if h.kind != "model" or h.mix_round != 0 or (h.origin, h.round - 1) not in self.sent:
            return
        g = recover_gradient(self.target, _flat(update.tensors, self.names), self.lr)
        exact = self.sent[(h.origin, h.round - 1)]
        self.node.log_row({"kind": "override_read", "strategy": self.label, "victim": h.origin, "step": h.round,
                           "exact": exact, "grad_norm": float(np.linalg.norm(g))})
        # To the attack queue as the gradient it is, taken at theta* (weights_for serves them):
        # the evaluator scores it against the batch the victim filed under its step's id.
        tensors, at = {}, 0
        for n in self.names:
            size = int(np.prod(self.shapes[n]))
            tensors[n] = torch.from_numpy(g[at:at + size].reshape(self.shapes[n]).astype(np.float32))
            at += size
        self._at_target.add((h.origin, h.model_version))
        header = dataclasses.replace(h, update_id=f"{h.origin}/r{h.round}", kind="gradient", mix_round=0,
                                     mixing_weight=1.0)
        self.node.malicious.capture(Update(header, tensors))

    def weights_for(self, sender: str, version: int) -> dict[str, torch.Tensor] | None:
        """theta* for a gradient read back from `sender` at `version`, else None (pull as usual)."""
        if (sender, version) not in self._at_target:
            return None
        out, at = {}, 0
        for n in self.names:
            size = int(np.prod(self.shapes[n]))
            out[n] = torch.from_numpy(self.target[at:at + size].reshape(self.shapes[n]).astype(np.float32))
            at += size
        return out


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def initial_target(node: Any) -> dict[str, torch.Tensor]:
    """x0: the weights every peer of the run starts from (the node's own, before any step)."""
    return {n: p.detach().cpu().clone() for n, p in node.peer.model.named_parameters()}


def crafted_target(node: Any) -> dict[str, torch.Tensor]:
    """Attack-friendly weights: on a ReLU MLP the imprint (attacker/imprint.py, thresholds from
    the attacker's own shard), which reads out whole batches; else a fresh DLG-uniform init."""
    model = node.build_model()
    if is_relu_mlp(model):
        width = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).weight.shape[0]
        own = torch.as_tensor(np.asarray(node.spec.shard_images, dtype=np.float32))
        return imprint_weights(model, brightness_thresholds(own, width), seed=node.spec.model_seed)
    model = init_dlg_uniform(model, torch.Generator().manual_seed(node.spec.model_seed + 1))
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


# strategy name -> (the malicious node -> its ModelStrategy); "honest" is MODEL_STRATEGIES'
ACTIVE_STRATEGIES: dict[str, Callable[[Any], StateOverride]] = {
    "state-override": lambda node: StateOverride(node, initial_target(node), "x0"),
    "crafted": lambda node: StateOverride(node, crafted_target(node), "crafted"),
}
