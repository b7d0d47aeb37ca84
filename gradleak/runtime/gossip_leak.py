"""The passive multi-hop gossip attack on a live model-gossip run, from the attackers' transcripts.

Each malicious peer's transcript holds every model message it received (updates.bin) and
sent (sent.bin); with the run's public config (members, topology, seed, mixing, R, steps,
lr, the shared x0 from the model seed) that is the whole input of the gossip algebra
(attacker/gossip_algebra.py). This module turns the transcript into the solver's inputs,
solves, inverts every determined gradient with an image attack (attacker/gossip_attack.py)
and hands each reconstruction to a `score` callback under update id f"{node}/r{step}":
the evaluator's score() in a live run, the truth files in an offline replay. The truth
never comes here; the PSNRs are joined afterwards from the scored rows (`join_scores`).

Colluders (`--malicious N`): each attacker's transcript gives its own observations and
knowns; `pooled_inputs` merges them into one knowledge system with several attacker nodes
(attacker/gossip_algebra.py pools rows by construction), so every node any of them can pin
down, alone or only together, is determined.

Lock-step (`--sync rounds`) runs only: async rounds average the newest model of each
neighbour, which the algebra does not model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacker.api import AttackConfig
from attacker.gossip_algebra import X0, Knowledge, Solution, build_knowledge, solve
from attacker.gossip_attack import invert_gradients, node_status
from gradleak.core.colluders import attacker_ids, honest_ids
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.core.models import create_model, init_model
from gradleak.runtime.transcript import TranscriptReader

ATTACK_NAME = "gossip-algebra"
TARGET_DB = 30.0
MAX_STATE_VALUES = 50_000_000  # (S, R + 1, n, p + q) coefficients of the symbolic states
# Gradients whose expected relative error is above this are not inverted (mostly noise).
MAX_EXPECTED_ERROR = 0.3
Score = Callable[[str, str, np.ndarray, np.ndarray, dict[str, Any]], None]


@dataclass(frozen=True)
class GossipPublic:
    """What every member knows of a model-gossip run (nothing private)."""

    members: tuple[str, ...]  # sorted: W's index
    attackers: tuple[str, ...]  # the colluding malicious peers (one in a default run)
    topology: str
    seed: int
    mixing: str
    mix_rounds: int
    steps: int
    lr: float
    model: str
    init: str
    model_seed: int
    sync: str
    batch_size: Mapping[str, int]  # per honest peer, as the config assigns them

    @property
    def attacker(self) -> str:
        """The first attacker: its own weights stand in where the system leaves a node's open."""
        return self.attackers[0]

    @classmethod
    def from_config(cls, cfg: Any) -> GossipPublic:
        """From a RunConfig (ids as the runner names them: gradleak/core/colluders.py)."""
        pc, gc, a = cfg.peers, cfg.gossip, cfg.attack
        ids = honest_ids(pc.honest)
        bad = attacker_ids(pc.honest, a.count, a.placement, cfg.seed)
        return cls(tuple(sorted([*ids, *bad])), tuple(bad), gc.topology, cfg.seed, gc.mixing,
                   gc.mix_rounds, gc.rounds, pc.lr, pc.model, pc.init, cfg.seed, gc.sync,
                   {p: pc.batch_sizes[i % len(pc.batch_sizes)] for i, p in enumerate(ids)})


@dataclass
class Inputs:
    """The solver's inputs as the transcript gives them."""

    observations: dict[tuple[str, int, int], np.ndarray]
    known: dict[tuple, np.ndarray]
    drops: set[tuple[str, str, int, int]]
    own_weights: dict[int, np.ndarray]
    steps: int  # complete local steps in the transcript


def shared_model(public: GossipPublic, input_shape: tuple[int, int, int], num_classes: int
                 ) -> tuple[torch.nn.Module, np.ndarray, list[str]]:
    """The architecture at x0 (the model seed's init), x0 flat, the parameter names in order."""
    c, h, _w = input_shape
    model = create_model(public.model, in_channels=c, num_classes=num_classes, image_size=h)
    init_model(model, public.init, public.model_seed)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().astype(np.float32)
    return model, flat, names


def _flat(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    # float64 messages (gossip.model_dtype) stay float64: the algebra's error bound reads the dtype.
    dtype = torch.float64 if any(tensors[n].dtype == torch.float64 for n in names) else torch.float32
    return np.concatenate([tensors[n].detach().to(dtype).reshape(-1).numpy() for n in names])


def transcript_inputs(reader: TranscriptReader, public: GossipPublic, x0: np.ndarray,
                      names: Sequence[str], attacker: str | None = None) -> Inputs:
    """Observations (received + own sends), knowns (x0, own lr * g), known losses, own weights.

    The attacker's own x_a(s) is redone from its round R-1 sends and receptions exactly as
    p2p.model_gossip averages (float64 sum, own weight first, neighbours sorted, float32),
    so its known lr * g_a(s) = x_a(s) - z_a(s, 0).
    """
    graph = build_graph(public.topology, public.members, public.seed)
    w = mixing_matrix(graph, public.members, public.mixing)
    a, index = attacker or public.attacker, {p: i for i, p in enumerate(public.members)}
    neighbours = sorted(graph[a])
    received: dict[tuple[str, int, int], np.ndarray] = {}
    for got in reader.updates():
        h = got.update.header
        if h.kind == "model" and h.origin in neighbours:
            received[(h.origin, int(h.round), int(h.mix_round))] = _flat(got.update.tensors, names)
    own: dict[tuple[int, int], np.ndarray] = {}
    drops: set[tuple[str, str, int, int]] = set()
    for m in reader.sent():
        h = m.update.header
        own.setdefault((int(h.round), int(h.mix_round)), _flat(m.update.tensors, names))
        if m.status != "sent":
            drops.add((a, m.receiver, int(h.round), int(h.mix_round)))
    R = public.mix_rounds
    steps = 0
    while steps < public.steps and all((steps + 1, r) in own for r in range(R)):
        steps += 1
    obs: dict[tuple[str, int, int], np.ndarray] = {}
    known: dict[tuple, np.ndarray] = {X0: x0.astype(np.float32)}
    own_weights: dict[int, np.ndarray] = {}
    x = x0.astype(np.float32)
    for s in range(1, steps + 1):
        own_weights[s] = x
        known[(a, s)] = x.astype(np.float64) - own[(s, 0)].astype(np.float64)
        for r in range(R):
            obs[(a, s, r)] = own[(s, r)]
            for j in neighbours:
                if (j, s, r) in received:
                    obs[(j, s, r)] = received[(j, s, r)]
                else:
                    drops.add((j, a, s, r))  # missing at the attacker: it averaged its own
        # x_a(s + 1) = the average of round R - 1, as ModelGossip.average takes it.
        last = own[(s, R - 1)]
        used = [j for j in neighbours if (j, s, R - 1) in received]
        self_w = w[index[a], index[a]] + sum(w[index[a], index[j]] for j in neighbours if j not in used)
        acc = self_w * last.astype(np.float64)
        for j in used:
            acc = acc + w[index[a], index[j]] * received[(j, s, R - 1)].astype(np.float64)
        x = acc.astype(np.float32)
    return Inputs(obs, known, drops, own_weights, steps)


def pooled_inputs(inputs: Mapping[str, Inputs], steps: int | None = None) -> Inputs:
    """The colluders' inputs as one: observations, knowns and known losses merged, over the
    steps all of them completed (at most `steps`); the first attacker's own weights stand in
    for open ones."""
    steps = min([i.steps for i in inputs.values()] + ([steps] if steps is not None else []))
    first = next(iter(inputs.values()))
    obs: dict[tuple[str, int, int], np.ndarray] = {}
    known: dict[tuple, np.ndarray] = {}
    drops: set[tuple[str, str, int, int]] = set()
    for i in inputs.values():
        obs.update({k: v for k, v in i.observations.items() if k[1] <= steps})
        known.update({k: v for k, v in i.known.items() if k == X0 or k[1] <= steps})
        drops |= {d for d in i.drops if d[2] <= steps}
    return Inputs(obs, known, drops, {s: w for s, w in first.own_weights.items() if s <= steps}, steps)


def solve_transcripts(readers: Mapping[str, TranscriptReader], public: GossipPublic, x0: np.ndarray,
                      names: Sequence[str]) -> tuple[Knowledge, Solution, Inputs]:
    """One knowledge system from the transcripts of the attackers `readers` names, solved.

    Any subset of the run's attackers may be passed (e.g. one, to see what it determines
    alone): the others are then unknowns like the honest nodes.
    """
    inputs = pooled_inputs({a: transcript_inputs(r, public, x0, names, a) for a, r in readers.items()})
    if inputs.steps == 0:
        raise ValueError("no complete local step in the transcript")
    knowledge, sol = solve_inputs(inputs, public, list(readers))
    return knowledge, sol, inputs


def solve_inputs(inputs: Inputs, public: GossipPublic, attackers: Sequence[str]) -> tuple[Knowledge, Solution]:
    """The knowledge system of `attackers` over the run's public graph, solved on `inputs`."""
    graph = build_graph(public.topology, public.members, public.seed)
    w = mixing_matrix(graph, public.members, public.mixing)
    knowledge = build_knowledge(graph, public.members, w, list(attackers), steps=inputs.steps,
                                rounds=public.mix_rounds, drops=inputs.drops)
    return knowledge, solve(knowledge, inputs.observations, inputs.known)


def determined_nodes(solution: Solution, public: GossipPublic) -> list[str]:
    """The honest nodes (no attacker of the run) with at least one determined step."""
    return sorted({node for (node, _s), ok in solution.determined.items() if ok and node not in public.attackers})


def _readers(reader: TranscriptReader | Mapping[str, TranscriptReader], public: GossipPublic
             ) -> dict[str, TranscriptReader]:
    if isinstance(reader, TranscriptReader):
        return {public.attacker: reader}
    return dict(reader)


def run_gossip_attack(
    reader: TranscriptReader | Mapping[str, TranscriptReader], public: GossipPublic, score: Score, *,
    budget_s: float = 30.0,
    attack: str = "analytic", attack_time_s: float = 0.5, max_batch_size: int = 8,
) -> dict[str, Any]:
    """Solve, invert and score; returns the report (no PSNR: see `join_scores`).

    reader: the transcript of the one attacker, or each colluder's by id (pooled). With
    several, the report also says how many nodes each would have determined alone.

    Nodes whose (public) batch size is over `max_batch_size` are solved for, not inverted;
    an inversion the image attack refuses is recorded on its step (`failed`).

    A skipped attack (async run, truncated transcript, system too large, no complete step)
    returns {"status": "skipped", "reason": ...}; nothing is scored then.
    """
    t0 = time.monotonic()
    if public.sync != "rounds":
        return _skipped("async run: the gossip algebra models lock-step rounds only")
    readers = _readers(reader, public)
    for aid, r in readers.items():
        if int(r.meta.get("truncated", 0) or 0) > 0:
            return _skipped(f"transcript of {aid} truncated ({r.meta['truncated']} entries refused by its budget)")
    n, R = len(public.members), public.mix_rounds
    p = (n - len(readers)) * public.steps
    size = public.steps * (R + 1) * n * (p + 1 + public.steps)
    if size > MAX_STATE_VALUES:
        return _skipped(f"system too large ({size} state coefficients > {MAX_STATE_VALUES})")
    first = next(iter(readers.values()))
    model, x0, names = shared_model(public, first.input_shape, first.num_classes)
    each = {a: transcript_inputs(r, public, x0, names, a) for a, r in readers.items()}
    inputs = pooled_inputs(each)
    if inputs.steps == 0:
        return _skipped("no complete local step in the transcript")
    knowledge, sol = solve_inputs(inputs, public, list(readers))
    graph = build_graph(public.topology, public.members, public.seed)
    status = node_status(sol, graph)
    # what each colluder would have determined alone, from its own transcript (the others unknown)
    alone = {aid: len(determined_nodes(solve_inputs(pooled_inputs({aid: i}, inputs.steps), public, [aid])[1], public))
             for aid, i in each.items()} if len(readers) > 1 else {}
    nodes: dict[str, dict[str, Any]] = {}
    for node, st in status.items():
        nodes[node] = {"hops": st.hops, "batch_size": public.batch_size.get(node), "steps": {
            str(s): {"determined": bool(sol.determined[(node, s)]), "residual": sol.residual[(node, s)],
                     "expected_error": _finite(sol.expected_error[(node, s)]),
                     "amplification": _finite(sol.amplification[(node, s)]),
                     "reconstructed": False, "psnr": None}
            for s in range(1, inputs.steps + 1)}}
    # Nearest first: when the budget runs out, what is left is the least likely to invert.
    targets = sorted((k for k in sol.estimates if sol.expected_error[k] <= MAX_EXPECTED_ERROR
                      and public.batch_size.get(k[0], 1) <= max_batch_size),
                     key=lambda k: (status[k[0]].hops, k[1], k[0]))
    skipped_budget = 0
    for node, s in targets:
        left = budget_s - (time.monotonic() - t0)
        if left <= 0:
            skipped_budget += 1
            continue
        cfg = AttackConfig(time_budget_s=max(0.05, min(attack_time_s, left)))
        try:
            leaks = invert_gradients(sol, model, lr=public.lr, batch_size=int(public.batch_size.get(node, 1)),
                                     input_shape=first.input_shape, num_classes=first.num_classes,
                                     own_weights=inputs.own_weights, attack=attack, config=cfg, targets=[(node, s)])
        except (ValueError, RuntimeError) as exc:  # what the live worker counts as a failed attack
            nodes[node]["steps"][str(s)]["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        leak = leaks.get((node, s))
        if leak is None:
            continue
        rec = leak.reconstruction
        score(f"{node}/r{s}", ATTACK_NAME, rec.images.detach().cpu().numpy().astype(np.float32),
              rec.labels.detach().cpu().numpy(), {**rec.stats, "weights_exact": leak.weights_exact})
        row = nodes[node]["steps"][str(s)]
        row.update(reconstructed=True, weights_exact=leak.weights_exact)
    return {"status": "done", "attack": ATTACK_NAME, "image_attack": attack, "attackers": list(readers),
            "determined_alone": alone, "determined_nodes": len(determined_nodes(sol, public)),
            "steps": inputs.steps,
            "mix_rounds": R, "topology": public.topology, "rank": sol.rank, "unknowns": len(knowledge.unknowns),
            "observations": len(knowledge.observed), "known_losses": len(inputs.drops),
            "skipped_for_budget": skipped_budget, "budget_s": budget_s,
            "seconds": round(time.monotonic() - t0, 3), "nodes": nodes}


def join_scores(report: dict[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fill each step's PSNR from the scored rows (attack ATTACK_NAME) and add the shares."""
    best: dict[str, float] = {}
    for r in rows:
        if r.get("attack") == ATTACK_NAME and r.get("mean_psnr") is not None:
            best[str(r["update_id"])] = float(r["mean_psnr"])
    if report.get("status") != "done":
        return report
    by_hop: dict[int, dict[str, int]] = {}
    for node, info in report["nodes"].items():
        for s, row in info["steps"].items():
            row["psnr"] = best.get(f"{node}/r{s}")
        psnrs = [r["psnr"] for r in info["steps"].values() if r["psnr"] is not None]
        info["determined_steps"] = [int(s) for s, r in info["steps"].items() if r["determined"]]
        info["reconstructed_steps"] = [int(s) for s, r in info["steps"].items()
                                       if r["psnr"] is not None and r["psnr"] >= TARGET_DB]
        info["best_psnr"] = max(psnrs) if psnrs else None
        hop = by_hop.setdefault(int(info["hops"]), {"nodes": 0, "determined": 0, "reconstructed": 0})
        hop["nodes"] += 1
        hop["determined"] += bool(info["determined_steps"])
        hop["reconstructed"] += bool(info["reconstructed_steps"])
    total = len(report["nodes"])
    report["honest"] = total
    report["determined_share"] = sum(h["determined"] for h in by_hop.values()) / total if total else 0.0
    report["reconstructed_share"] = sum(h["reconstructed"] for h in by_hop.values()) / total if total else 0.0
    report["by_hop"] = {str(h): v for h, v in sorted(by_hop.items())}
    return report


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary.json part: the shares and the by-hop counts (or why it was skipped)."""
    keys = ("status", "reason", "attackers", "determined_nodes", "determined_alone", "honest",
            "determined_share", "reconstructed_share", "by_hop", "steps", "seconds", "skipped_for_budget")
    return {k: report[k] for k in keys if k in report}


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, "attack": ATTACK_NAME}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


__all__ = ["ATTACK_NAME", "GossipPublic", "Inputs", "determined_nodes", "join_scores", "pooled_inputs",
           "run_gossip_attack", "shared_model", "solve_inputs", "solve_transcripts", "summary_of", "transcript_inputs"]
