"""The update a peer gossips: public header + named gradient (or, in model gossip, weight) tensors.

This is everything that travels on the wire. Ground truth (the batch the gradient
came from) is deliberately absent: it goes to the evaluator, never into an Update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class UpdateHeader:
    """Public metadata of one gossiped update."""

    update_id: str  # globally unique; the evaluator joins ground truth on it
    origin: str  # peer that computed the gradient
    sender: str  # peer that sent this message (== origin for direct gossip)
    round: int  # the origin's local step that computed the gradient (a round in lock-step mode)
    model_version: int  # version of the origin's weights the gradient was taken at
    num_samples: int  # size of the private batch behind the gradient
    defence: str = "none"  # canonical name of the defence chain applied before sending
    mixing_weight: float = 1.0  # weight the receiver gives it when aggregating
    sent_at: float = 0.0  # sender's wall clock when it sent the update, Unix seconds (0: unknown)
    # "gradient": tensors are a gradient; "model": the sender's full model state at averaging
    # round `mix_round` of its local step `round` (model gossip, p2p.model_gossip).
    kind: str = "gradient"
    mix_round: int = 0


@dataclass(frozen=True)
class Update:
    """A header plus gradient tensors keyed by parameter name, in model order."""

    header: UpdateHeader
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Dense size of the tensors in bytes (before any sparse encoding)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
