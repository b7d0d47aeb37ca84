"""Gradient inversion for text: recover a sentence's tokens from its LM gradient.

Pure torch. The attack sees the model (at the sender's version) and a
TextObservation (gradients + public metadata: batch size and sentence length) and
returns a TextReconstruction; ground truth reaches only text_metrics.py.

Two signals, both known from the literature on text leakage:
- Bag of words. The token-embedding gradient has a non-zero row exactly for each
  token that was input (an embedding lookup only routes gradient to the rows it
  read), so the set of tokens is read off, exactly, before any optimisation.
- Order. `dlg-text` finds it by DLG's gradient matching (Zhu et al. 2019): dummy
  soft one-hots over the bag of words, shifted to serve as their own LM targets
  (DLG's joint label optimisation), moved by L-BFGS to match the observed
  gradient. `analytic-text` reads it off directly for one sentence: with learned
  positional embeddings added to token embeddings, the position-embedding gradient
  row p is the loss gradient at input p, and each token's embedding-gradient row
  is the sum of those rows over the positions where it occurs - a linear system.

The victim protocol (gradleak.core.text): `model(embeds=...)` takes (B, T, d) token
embeddings, `model.token_embedding` / `model.position_embedding` are nn.Embedding,
and the loss is gradleak.core.text.language_model_loss.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.core.registry import Registry
from gradleak.core.text import BOS_ID, language_model_loss

OPTIMIZERS = ("lbfgs", "adam")
DISTANCES = ("l2", "cosine")
# (iteration, current best tokens (B, T)) -> True to stop early.
TextCallback = Callable[[int, torch.Tensor], bool | None]


@dataclass(frozen=True)
class TextObservation:
    """What a peer receives for a sentence batch: gradients and public metadata only."""

    gradients: tuple[torch.Tensor, ...]  # one per parameter, model.parameters() order
    batch_size: int  # sentences behind the gradient (public, like num_samples)
    seq_len: int  # tokens per sentence T, <bos>/<eos> excluded (public length metadata)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gradients", tuple(self.gradients))
        if not self.gradients or not all(isinstance(g, torch.Tensor) for g in self.gradients):
            raise ValueError("an observation needs at least one gradient tensor")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {self.batch_size}, {self.seq_len}")


@dataclass(frozen=True)
class TextAttackConfig:
    """Settings of the text attacks (analytic-text reads only bag_tol)."""

    max_iters: int = 30  # outer optimiser steps (each up to `inner` L-BFGS iterations)
    inner: int = 20  # L-BFGS iterations per outer step; ignored by Adam
    optimizer: str = "lbfgs"  # one of OPTIMIZERS
    lr: float = 1.0  # L-BFGS step size (with strong-Wolfe line search) or Adam's lr
    seed: int = 0  # seeds the dummy logits: same seed, same start
    distance: str = "l2"  # squared L2 as DLG, or 1 - cosine similarity; one of DISTANCES
    # Stop once the distance over ||g_obs||^2 (l2) or the distance itself (cosine) is
    # below this: relative, so one value serves any model scale.
    rel_tol: float = 1e-6
    bag_of_words: bool = True  # restrict to the embedding gradient's tokens; False = full vocab
    # A row counts as present when its norm exceeds bag_tol x the largest row's norm;
    # untouched rows are exactly 0, so this only matters once a defence adds noise.
    bag_tol: float = 1e-6
    patience: int = 5  # stop after this many outer steps with no new best; 0 = never
    # Fresh seeded starts when a run ends above restart_tol (a wrong order is a local
    # minimum far above the true one: ~1e-1 against ~1e-7); the best run is kept.
    restarts: int = 3
    restart_tol: float = 1e-4

    def __post_init__(self) -> None:
        if self.max_iters < 1 or self.inner < 1 or min(self.patience, self.restarts) < 0:
            raise ValueError("max_iters and inner must be >= 1, patience and restarts >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{self.optimizer}' (known: {', '.join(OPTIMIZERS)})")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance '{self.distance}' (known: {', '.join(DISTANCES)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.rel_tol >= 0 and self.restart_tol >= 0 and 0 <= self.bag_tol < 1):
            raise ValueError("need rel_tol, restart_tol >= 0 and 0 <= bag_tol < 1")


@dataclass
class TextReconstruction:
    """An attack's answer: token ids and how it got there."""

    tokens: torch.Tensor  # (B, T) int64, what gets scored
    stats: dict[str, Any] = field(default_factory=dict)  # see TextAttack.reconstruct
    candidates: torch.Tensor | None = None  # (K,) the token ids the positions chose among


class TextAttack(ABC):
    """A text gradient-inversion attack: (model, observation) -> reconstruction."""

    name = "text-attack"

    def __init__(self, config: TextAttackConfig | None = None) -> None:
        self.config = config if config is not None else TextAttackConfig()

    @abstractmethod
    def reconstruct(
        self, model: nn.Module, obs: TextObservation, *, callback: TextCallback | None = None
    ) -> TextReconstruction:
        """Reconstruct the sentences behind `obs.gradients` taken of `model` (left untouched).

        Returns:
            A TextReconstruction whose stats hold: attack, iterations, evaluations,
            grad_distance (relative, see TextAttackConfig.rel_tol), seconds,
            bag_size, stop_reason, device.
        """


_REGISTRY: Registry[type[TextAttack]] = Registry("text attack")
TEXT_ATTACKS: Mapping[str, type[TextAttack]] = _REGISTRY.view


def register_text_attack(name: str) -> Callable[[type[TextAttack]], type[TextAttack]]:
    """Register a TextAttack subclass under `name` (ValueError if the name is taken)."""

    def wrap(cls: type[TextAttack]) -> type[TextAttack]:
        cls.name = name
        return _REGISTRY.register(name)(cls)

    return wrap


def create_text_attack(name: str, config: TextAttackConfig | None = None) -> TextAttack:
    """Instantiate a registered text attack (ValueError listing the known names)."""
    return _REGISTRY.get(name)(config)


# --------------------------------------------------------------------------- pure steps


def _param_index(model: nn.Module, param: torch.Tensor) -> int:
    for i, p in enumerate(model.parameters()):
        if p is param:
            return i
    raise ValueError("parameter not found in model.parameters()")


def _embedding_grads(model: nn.Module, obs: TextObservation, attr: str) -> torch.Tensor:
    embedding = getattr(model, attr, None)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"the model has no nn.Embedding '{attr}' (see gradleak.core.text)")
    grad = obs.gradients[_param_index(model, embedding.weight)]
    if grad.shape != embedding.weight.shape:
        raise ValueError(f"{attr} gradient {tuple(grad.shape)} != weight {tuple(embedding.weight.shape)}")
    return grad


def bag_of_words(model: nn.Module, obs: TextObservation, *, tol: float = 1e-6) -> torch.Tensor:
    """Token ids that occur in the observed sentences, from the embedding gradient.

    Args:
        model: the victim, with a `token_embedding` nn.Embedding.
        obs: the observed update.
        tol: a row is present when its L2 norm exceeds tol x the largest row norm.

    Returns:
        (K,) int64 sorted ids, <bos> left out (the model prepends it to every sentence).

    Raises:
        ValueError: when no row other than <bos> is non-zero.
    """
    norms = _embedding_grads(model, obs, "token_embedding").detach().float().norm(dim=1)  # (V,)
    present = norms > tol * norms.max()
    present[BOS_ID] = False
    ids = present.nonzero().flatten().cpu()
    if ids.numel() == 0:
        raise ValueError("the token-embedding gradient has no non-zero row besides <bos>")
    return ids


def _private_copy(model: nn.Module) -> nn.Module:
    victim = copy.deepcopy(model)
    for param in victim.parameters():
        param.requires_grad_(True)
        param.grad = None
    return victim


def _targets(model: nn.Module, obs: TextObservation) -> list[torch.Tensor]:
    params = list(model.parameters())
    if len(obs.gradients) != len(params):
        raise ValueError(f"observation has {len(obs.gradients)} gradients, model has {len(params)}")
    for i, (grad, param) in enumerate(zip(obs.gradients, params, strict=True)):
        if grad.shape != param.shape:
            raise ValueError(f"gradient {i} has shape {tuple(grad.shape)}, parameter {tuple(param.shape)}")
    return [g.detach().to(device=p.device, dtype=p.dtype) for g, p in zip(obs.gradients, params)]


class _TokenMatcher:
    """DLG's objective over soft tokens: softmax(logits) over the candidate ids."""

    def __init__(
        self, model: nn.Module, targets: list[torch.Tensor], candidates: torch.Tensor,
        logits: torch.Tensor, distance: str,
    ) -> None:
        self.model, self.targets, self.logits, self.distance = model, targets, logits, distance
        self.params = list(model.parameters())
        embedding = model.token_embedding
        assert isinstance(embedding, nn.Embedding)  # checked by bag_of_words / caller
        device = targets[0].device
        self.embedding = embedding
        # (K, V) one-hot rows: lift a soft token over the K candidates to the full vocabulary
        self.lift = F.one_hot(candidates.to(device), embedding.num_embeddings).to(targets[0].dtype)
        self.norm2 = sum(float((t.double() ** 2).sum()) for t in targets) or 1.0
        self.best = math.inf
        self.best_logits = logits.detach().clone()
        self.evaluations = 0

    def evaluate(self, *, backward: bool) -> torch.Tensor:
        probs = F.softmax(self.logits, dim=-1)  # (B, T, K)
        soft = probs @ self.lift  # (B, T, V): the dummy tokens as distributions
        embeds = soft @ self.embedding.weight  # (B, T, d)
        # The dummies are their own targets, shifted by the LM framing (DLG's joint labels).
        loss = language_model_loss(self.model(embeds=embeds), soft)
        grads = torch.autograd.grad(loss, self.params, create_graph=backward)
        if self.distance == "l2":
            dist = torch.stack([((g - t) ** 2).sum() for g, t in zip(grads, self.targets)])
            dist = dist.sum() / self.norm2
        else:
            dot = torch.stack([(g * t).sum() for g, t in zip(grads, self.targets)]).sum()
            gnorm = torch.stack([(g**2).sum() for g in grads]).sum().sqrt()
            dist = 1.0 - dot / (gnorm * math.sqrt(self.norm2) + 1e-12)
        self.evaluations += 1
        value = float(dist.detach())
        if backward and math.isfinite(value):
            dist.backward(inputs=[self.logits])
        if value < self.best:
            self.best, self.best_logits = value, self.logits.detach().clone()
        return dist.detach()


def match_tokens(
    model: nn.Module,
    targets: list[torch.Tensor],
    candidates: torch.Tensor,
    shape: tuple[int, int],
    config: TextAttackConfig,
    callback: TextCallback | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimise soft tokens over `candidates` so their gradient matches `targets`.

    Runs up to 1 + config.restarts seeded starts, the next only while the best
    distance is above config.restart_tol, and keeps the best.

    Args:
        model: private model copy; every parameter requires grad.
        targets: observed gradients in parameters() order, on the model's device.
        candidates: (K,) token ids each position chooses among.
        shape: (B, T) of the batch.
        config: budget, optimiser and stopping rules.
        callback: `callback(iteration, tokens)` after each outer step; True stops.

    Returns:
        (tokens (B, T) int64, the argmax of the best soft tokens; stats with
        iterations, evaluations, grad_distance, starts, stop_reason).
    """
    generator = torch.Generator().manual_seed(config.seed)
    best: _TokenMatcher | None = None
    stats: dict[str, Any] = {"iterations": 0, "evaluations": 0, "starts": 0}
    for _ in range(1 + config.restarts):
        start = torch.randn((*shape, candidates.numel()), generator=generator)  # (B, T, K)
        logits = start.to(targets[0]).requires_grad_(True)
        matcher = _TokenMatcher(model, targets, candidates, logits, config.distance)
        iterations, reason = _optimise(matcher, candidates, config, callback)
        stats["iterations"] += iterations
        stats["evaluations"] += matcher.evaluations
        stats["starts"] += 1
        if best is None or matcher.best < best.best:
            best, stats["stop_reason"] = matcher, reason
        if reason == "callback" or best.best <= config.restart_tol:
            break
    assert best is not None  # at least one start ran
    stats["grad_distance"] = best.best
    if not math.isfinite(best.best):
        stats["stop_reason"] = "diverged"
    return _argmax(best, candidates), stats


def _optimise(
    matcher: _TokenMatcher,
    candidates: torch.Tensor,
    config: TextAttackConfig,
    callback: TextCallback | None,
) -> tuple[int, str]:
    """One start: outer optimiser steps until a stopping rule; (steps, stop_reason)."""
    optimizer: torch.optim.Optimizer
    if config.optimizer == "lbfgs":
        optimizer = torch.optim.LBFGS(
            [matcher.logits], lr=config.lr, max_iter=config.inner, line_search_fn="strong_wolfe"
        )
    else:
        optimizer = torch.optim.Adam([matcher.logits], lr=config.lr)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return matcher.evaluate(backward=True)

    stale = 0
    for iterations in range(1, config.max_iters + 1):
        before = matcher.best
        optimizer.step(closure)
        stale = 0 if matcher.best < before else stale + 1
        if matcher.best < config.rel_tol:
            return iterations, "converged"
        if config.patience and stale >= config.patience:
            return iterations, "plateau"
        if callback is not None and callback(iterations, _argmax(matcher, candidates)):
            return iterations, "callback"
    return config.max_iters, "max_iters"


def _argmax(matcher: _TokenMatcher, candidates: torch.Tensor) -> torch.Tensor:
    return candidates[matcher.best_logits.argmax(dim=-1).cpu()]  # (B, T)


def assign_positions(
    token_grads: torch.Tensor, position_grads: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Tokens (T,) of one sentence from its token- and position-embedding gradients.

    Solves token_grads[candidates] ~= A @ position_grads for the (K, T) occurrence
    matrix A (least squares; exact when the T position rows are independent, which
    needs T <= d_model) and gives each position its largest entry.

    Args:
        token_grads: (V, d) token-embedding gradient.
        position_grads: (T, d) position-embedding gradient rows of the sentence's tokens.
        candidates: (K,) ids present in the sentence.
    """
    rows = token_grads[candidates.to(token_grads.device)].double()  # (K, d)
    solution = torch.linalg.lstsq(position_grads.double().T, rows.T).solution  # (T, K) = A^T
    return candidates[solution.argmax(dim=1).cpu()]  # (T,)


# --------------------------------------------------------------------------- attacks


@register_text_attack("dlg-text")
class DLGText(TextAttack):
    """DLG on text: bag of words from the embedding gradient, then gradient matching."""

    def reconstruct(
        self, model: nn.Module, obs: TextObservation, *, callback: TextCallback | None = None
    ) -> TextReconstruction:
        """See TextAttack.reconstruct; bag_of_words=False searches the whole vocabulary."""
        start = time.perf_counter()
        victim = _private_copy(model)
        targets = _targets(victim, obs)
        if self.config.bag_of_words:
            candidates = bag_of_words(victim, obs, tol=self.config.bag_tol)
        else:
            vocab = _embedding_grads(victim, obs, "token_embedding").shape[0]
            candidates = torch.tensor([i for i in range(vocab) if i != BOS_ID])
        tokens, stats = match_tokens(
            victim, targets, candidates, (obs.batch_size, obs.seq_len), self.config, callback
        )
        stats.update(
            attack=self.name, seconds=time.perf_counter() - start,
            bag_size=int(candidates.numel()), device=str(targets[0].device),
        )
        return TextReconstruction(tokens=tokens, stats=stats, candidates=candidates)


@register_text_attack("analytic-text")
class AnalyticText(TextAttack):
    """No optimisation: bag of words, then order from the positional-embedding gradient.

    One sentence only: in a batch the position rows are sums over the sentences.
    """

    def reconstruct(
        self, model: nn.Module, obs: TextObservation, *, callback: TextCallback | None = None
    ) -> TextReconstruction:
        """See TextAttack.reconstruct.

        Raises:
            ValueError: for batch_size > 1, or a model without learned positions.
        """
        if obs.batch_size != 1:
            raise ValueError(f"analytic-text recovers one sentence; batch_size is {obs.batch_size}")
        start = time.perf_counter()
        candidates = bag_of_words(model, obs, tol=self.config.bag_tol)
        token_grads = _embedding_grads(model, obs, "token_embedding")
        position_grads = _embedding_grads(model, obs, "position_embedding")
        # position 0 is <bos>; the sentence's tokens sit at 1..T
        tokens = assign_positions(token_grads, position_grads[1 : obs.seq_len + 1], candidates)
        stats = {
            "attack": self.name, "iterations": 0, "evaluations": 0, "grad_distance": math.nan,
            "seconds": time.perf_counter() - start, "bag_size": int(candidates.numel()),
            "stop_reason": "analytic", "device": str(token_grads.device),
        }
        return TextReconstruction(tokens=tokens[None], stats=stats, candidates=candidates)
