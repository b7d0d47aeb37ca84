"""Attacking many captured updates at once: one stacked optimisation for k updates.

A malicious peer collects many small updates, each taken at its sender's model
version. `reconstruct_many` solves them together: every (update, restart) pair is
one problem of an attacker.stacked stack, with its own weights when the updates
came at different versions. Each problem's result equals what the one-by-one
attack gives from the same seed (up to floating-point summation order), at a
fraction of the time per update on small models, where per-operation overhead,
not arithmetic, bounds the speed.

Only attacks with a stacked solver (STACKED: "ig") are batched that way;
"analytic" has its own stacked path (Analytic.reconstruct_many: one conjugate-
gradient solve per convolution for all updates, each with its own CG scalars and
stopping, so each result is its one-by-one result up to summation order; it
refuses the whole list up front, naming the index, if any update is unsupported,
e.g. batch size 2). The others (dlg, idlg: L-BFGS, whose line steps a joint
objective would couple across problems) run one by one through the same call, so
callers need not tell them apart.

Speed of the stacked analytic path: each CG iteration is a few small float64
matmuls plus unfold/fold, already arithmetic- and memory-bound at one CPU thread,
so stacking saves little there (about 1x); it pays off where per-operation
overhead dominates (GPU kernel launches, many threads).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from attacker.analytic import Analytic
from attacker.api import (
    AttackConfig,
    Observation,
    Reconstruction,
    create_attack,
    simulated_steps,
    update_model,
)
from attacker.ig import Prepared, pick_restart, prepare, schedule_of
from attacker.stacked import attack_copy, invert_stacked, stack_weights

STACKED = ("ig",)  # attacks with a stacked solver; the rest run one by one
# (iteration, best-so-far images of each update in the group, (B, C, H, W) each) -> stop?
ManyCallback = Callable[[int, list[torch.Tensor]], bool | None]


def reconstruct_many(
    attack_name: str,
    models: nn.Module | Sequence[nn.Module],
    observations: Sequence[Observation],
    config: AttackConfig | None = None,
    *,
    callback: ManyCallback | None = None,
) -> list[Reconstruction]:
    """Reconstruct every observation, stacking them into one optimisation where possible.

    Args:
        attack_name: a registered attack; "ig" is solved stacked, others one by one.
        models: one model for all observations, or one per observation (the model
            at that update's version); all of one architecture and train/eval mode.
            Left untouched.
        observations: the captured updates.
        config: attack settings, as for `create_attack`.
        callback: stacked attacks only: after each outer iteration of each group
            (updates sharing batch size, input shape and label source) with its
            updates' best-so-far images; returning True stops that group. For
            "analytic": once per stack with iteration 0 and its analytic images.

    Returns:
        One Reconstruction per observation, in order. Stacked ones have stats
        "seconds" (the group's wall time shared out equally), "stack_seconds" and
        "stacked" (how many updates were solved together).

    Raises:
        ValueError: on an unknown attack, a models/observations count mismatch, or
            models that differ in architecture or mode; for "analytic", also
            "update j: ..." when update j is unsupported (batch size other than 1,
            a model outside its chains, a non-finite gradient), before any work.
    """
    config = config if config is not None else AttackConfig()
    per_obs = _models_for(models, len(observations))
    if attack_name == "analytic":
        analytic = create_attack(attack_name, config)
        assert isinstance(analytic, Analytic)
        recons = analytic.reconstruct_many(per_obs, list(observations), callback=callback)
        for recon, obs in zip(recons, observations, strict=True):
            recon.stats.setdefault("update_model", update_model(obs, False))
        return recons
    if attack_name not in STACKED:
        attack = create_attack(attack_name, config)
        return [attack.reconstruct(m, o) for m, o in zip(per_obs, observations, strict=True)]
    create_attack(attack_name, config)  # the registry's unknown-name error, if any
    copies = _attack_copies(per_obs)
    prepared = [prepare(config, c, o) for c, o in zip(copies, observations, strict=True)]
    groups: dict[tuple, list[int]] = {}
    for j, (obs, prep) in enumerate(zip(observations, prepared, strict=True)):
        # Deltas of different local steps or rates simulate different clients: own stacks.
        key = (obs.batch_size, obs.input_shape, obs.num_classes, prep.hard is None,
               simulated_steps(config, obs))
        groups.setdefault(key, []).append(j)
    out: dict[int, Reconstruction] = {}
    for members in groups.values():
        simulate = simulated_steps(config, observations[members[0]])
        solved = _solve_group(attack_name, config, [copies[j] for j in members],
                              [prepared[j] for j in members], callback, simulate)
        for j, recon in zip(members, solved, strict=True):
            recon.stats["update_model"] = update_model(observations[j], simulate is not None)
        out.update(zip(members, solved, strict=True))
    return [out[j] for j in range(len(observations))]


def _models_for(models: nn.Module | Sequence[nn.Module], count: int) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models] * count
    per_obs = list(models)
    if len(per_obs) != count:
        raise ValueError(f"got {len(per_obs)} models for {count} observations")
    return per_obs


def _attack_copies(models: list[nn.Module]) -> list[nn.Module]:
    """One attack copy per distinct model object, shared by the updates that use it."""
    seen: dict[int, nn.Module] = {}
    copies = [seen.setdefault(id(m), attack_copy(m)) for m in models]
    first = copies[0]
    shapes = [(n, p.shape) for n, p in first.named_parameters()]
    for c in seen.values():
        if [(n, p.shape) for n, p in c.named_parameters()] != shapes:
            raise ValueError("all models must share one architecture")
        if c.training != first.training or type(c) is not type(first):
            raise ValueError("all models must be of one class and in one train/eval mode")
    return copies


def _solve_group(
    name: str, config: AttackConfig, copies: list[nn.Module], prepared: list[Prepared],
    callback: ManyCallback | None, simulate: tuple[int, float] | None = None,
) -> list[Reconstruction]:
    """One stacked run for updates of equal shapes; rows j*R .. j*R+R-1 are update j's."""
    start = time.perf_counter()
    restarts = config.restarts
    module = copies[0]
    names = [n for n, _ in module.named_parameters()]
    shared = all(c is module for c in copies)
    if shared:
        params = {n: p.detach() for n, p in module.named_parameters()}
        buffers = {n: b.detach() for n, b in module.named_buffers()}
    else:
        params, buffers = stack_weights([c for c in copies for _ in range(restarts)])
    targets = {
        n: torch.stack([p.targets[i] for p in prepared]).repeat_interleave(restarts, dim=0)
        for i, n in enumerate(names)
    }  # (k * R, ...) each
    images = torch.cat([p.images for p in prepared])  # (k * R, B, C, H, W)
    labels = torch.cat([p.labels for p in prepared])  # (k * R, B, K)
    stacked_cb = None
    if callback is not None:
        user = callback

        def stacked_cb(iteration: int, best: torch.Tensor, losses: torch.Tensor) -> bool | None:
            rows = [j * restarts + int(torch.argmin(losses[j * restarts:(j + 1) * restarts]))
                    for j in range(len(prepared))]
            return user(iteration, [best[r] for r in rows])

    result = invert_stacked(
        module, params, buffers, targets, images, labels, schedule_of(config),
        stacked_weights=not shared, learn_labels=prepared[0].hard is None,
        callback=stacked_cb, groups=[j for j in range(len(prepared)) for _ in range(restarts)],
        simulate=simulate,
    )
    seconds = time.perf_counter() - start
    recons = []
    for j, prep in enumerate(prepared):
        rows = range(j * restarts, (j + 1) * restarts)
        recon = pick_restart(name, config, result, rows, prep, seconds / len(prepared),
                             images.device)
        recon.stats.update(stacked=len(prepared), stack_seconds=seconds)
        recons.append(recon)
    return recons


def compare_throughput(
    attack_name: str,
    models: nn.Module | Sequence[nn.Module],
    observations: Sequence[Observation],
    config: AttackConfig | None = None,
) -> dict[str, float]:
    """Time the same attack one by one and stacked on the same updates (for benchmarks).

    Returns:
        one_by_one_s, stacked_s (wall seconds), their per-second throughputs and
        ratio = one_by_one_s / stacked_s (how many times faster stacking is).
    """
    config = config if config is not None else AttackConfig()
    per_obs = _models_for(models, len(observations))
    attack = create_attack(attack_name, config)
    start = time.perf_counter()
    for model, obs in zip(per_obs, observations, strict=True):
        attack.reconstruct(model, obs)
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    reconstruct_many(attack_name, per_obs, observations, config)
    stacked = time.perf_counter() - start
    count = len(observations)
    return {
        "updates": float(count),
        "one_by_one_s": one_by_one,
        "stacked_s": stacked,
        "one_by_one_per_s": count / one_by_one,
        "stacked_per_s": count / stacked,
        "ratio": one_by_one / stacked,
    }
