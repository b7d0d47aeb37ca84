"""Passive vs active (state override) attacker in model gossip, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/active_gossip.py

In-process (gradleak/gossip_sim.py, gradleak/active_sim.py): N nodes on a graph, the
attacker p0, digits 16x16 on the DLG LeNet, plain SGD half-steps with lr, R rounds.
Victims: the attacker's neighbours. Every (victim, step) gradient is a target:

- passive: the gossip algebra (attacker/gossip_algebra.py) solves what it can; a
  gradient it does not determine counts as not recovered; a determined one is inverted at
  the weights the algebra gives (or the attacker's own, flagged inexact).
- active: the attacker overrides every victim toward theta* at each step's last round
  (init model: theta* = x0; trained model: a fresh DLG-init model, chosen for the attack)
  and reads the next step's gradient at theta* (step 1 at x0, as the passive one).

Printed per (graph, model, batch): share of victims' step images >= 30 dB, mean PSNR,
override exactness, and the detection scores the victims could compute (L2 ratio of the
attacker's model to the other neighbours', cosine with their mean difference, accuracy).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from attacker.active import recover_gradient
from attacker.api import AttackConfig, Observation, create_attack
from attacker.gossip_algebra import build_knowledge, solve
from attacker.gossip_attack import invert_gradients, load_flat, unflatten
from attacker.imprint import brightness_thresholds, imprint_weights, read_imprint
from attacker.metrics import score_batch
from gradleak.active_sim import simulate_override
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.core.models import create_model, init_dlg_uniform, init_sigmoid
from gradleak.gossip_sim import flat_parameters, sgd_update, simulate

SHAPE = (1, 16, 16)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=SHAPE[1:], mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def lenet(seed: int, init: str = "dlg", arch: str = "lenet") -> torch.nn.Module:
    if arch == "relu-mlp":  # PyTorch's init, seeded (SPEAR's victim)
        torch.manual_seed(seed)
        return create_model(arch, in_channels=1, num_classes=10, image_size=16)
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    gen = torch.Generator().manual_seed(seed)
    return init_dlg_uniform(model, gen) if init == "dlg" else init_sigmoid(model, gen)


def imprint_target(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """theta* for a ReLU MLP: imprint weights, thresholds at brightness quantiles of public digits."""
    width = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).weight.shape[0]
    crafted = copy.deepcopy(model)
    state = imprint_weights(crafted, brightness_thresholds(images[1400:], width))  # held-out: public prior
    with torch.no_grad():
        for n, p in crafted.named_parameters():
            p.copy_(state[n])
    return flat_parameters(crafted)


def train(images: torch.Tensor, labels: torch.Tensor, steps: int, arch: str = "lenet") -> tuple[torch.nn.Module, float]:
    """A model trained centrally on the first 1000 digits (the network's model mid-run)."""
    model = lenet(7, "sigmoid", arch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1000, (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(images[idx]), labels[idx]).backward()
        opt.step()
    return model, accuracy(model, images, labels)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images[1400:]).argmax(1) == labels[1400:]).float().mean())


def invert(model: torch.nn.Module, weights: np.ndarray, grad: np.ndarray, batch: int, attack) -> torch.Tensor:
    victim = load_flat(model, weights)
    obs = Observation(gradients=unflatten(victim, grad), batch_size=batch, input_shape=SHAPE, num_classes=10)
    return attack.reconstruct(victim, obs)


def run_case(graph_name: str, n: int, model: torch.nn.Module, x0: np.ndarray, target: np.ndarray,
             data, b: int, steps: int, args) -> dict:
    images, labels = data
    members = [f"p{i}" for i in range(n)]
    graph = ({"p0": tuple(members[1:]), **{m: ("p0",) for m in members[1:]}} if graph_name == "star"
             else build_graph(graph_name, members))
    w = mixing_matrix(graph, members)
    victims = list(graph["p0"])

    def batch(node: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (members.index(node) * 50 + step * b) % 1400
        return images[i:i + b], labels[i:i + b]

    update = sgd_update(model, batch, args.lr)
    cfg = AttackConfig(time_budget_s=args.budget, max_iters=args.max_iters)
    attack = create_attack(args.attack, cfg)
    keys = [(v, s) for v in victims for s in range(1, steps + 1)]
    out: dict = {}
    # passive: the algebra on the honest run
    view, _truth = simulate(graph, members, w, ["p0"], x0, steps=steps, rounds=args.rounds, local_update=update)
    know = build_knowledge(graph, members, w, ["p0"], steps=steps, rounds=args.rounds)
    sol = solve(know, view.observations, view.known)
    leaks = {}
    for key in keys:  # one at a time: an attack that raises on one gradient fails only that one
        try:
            leaks.update(invert_gradients(sol, model, lr=args.lr, batch_size=b, input_shape=SHAPE, num_classes=10,
                                          own_weights=view.own_weights, targets=[key], config=cfg,
                                          attack=args.attack))
        except (RuntimeError, ValueError) as exc:
            print(f"  passive {key}: {type(exc).__name__}: {exc}", flush=True)
    out["passive"] = _scores({k: leaks[k].reconstruction for k in leaks}, keys, batch)
    out["passive"]["determined"] = sum(bool(sol.determined.get(k)) for k in keys)
    _hv, honest = simulate_override(graph, members, w, ["p0"], victims, x0, steps=steps, rounds=args.rounds,
                               local_update=update, target=None)
    # active
    run, truth = simulate_override(graph, members, w, ["p0"], victims, x0, steps=steps, rounds=args.rounds,
                            local_update=update, target=target)
    recs = {}
    for v, s in keys:
        at = x0 if s == 1 else target
        grad = recover_gradient(at, run.half_steps[(v, s)], args.lr)
        if s > 1 and args.model == "relu-mlp":  # read the imprint
            victim = load_flat(model, at)
            recs[(v, s)] = read_imprint(victim, unflatten(victim, grad), b, SHAPE)
        else:
            try:
                recs[(v, s)] = invert(model, at, grad, b, attack)
            except (RuntimeError, ValueError) as exc:
                print(f"  active {(v, s)}: {type(exc).__name__}: {exc}", flush=True)
    out["active"] = _scores(recs, keys, batch)
    out["active"]["exact"] = sum(o.exact for o in run.sent.values()) / max(1, len(run.sent))
    for name, r in (("passive", honest), ("active", truth)):
        d = [r.detection[(v, s)]["p0"] for v in victims for s in range(1, steps)]
        out[name]["l2_ratio"] = float(np.median([x.l2_ratio for x in d]))
        out[name]["cosine"] = float(np.nanmedian([x.cosine for x in d])) if graph_name != "star" else float("nan")
        out[name]["acc"] = float(np.mean([accuracy(load_flat(model, r.weights[(v, s)]), images, labels)
                                          for v in victims for s in range(2, steps + 1)]))
    return out


def _scores(recs: dict, keys: list, batch) -> dict:
    psnrs = []
    for k in keys:
        images, labels = batch(*k)
        if k not in recs:
            psnrs += [0.0] * len(labels)  # not determined: not recovered
            continue
        rec = recs[k]
        try:
            psnrs += score_batch(rec.images.detach().numpy(), rec.labels.numpy(), images.numpy(), labels.numpy())["psnr"]
        except ValueError:
            psnrs += [0.0] * len(labels)
    got = [p for p in psnrs if p > 0]
    per = len(psnrs) // len(keys)
    later = [p for (_v, s), i in zip(keys, range(0, len(psnrs), per)) if s > 1 for p in psnrs[i:i + per]]
    return {"share30": float(np.mean([p >= 30 for p in psnrs])), "mean": float(np.mean(got)) if got else 0.0,
            "images": len(psnrs), "later30": float(np.mean([p >= 30 for p in later])) if later else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="local steps at batch 1")
    ap.add_argument("--steps-large", type=int, default=2, help="local steps at batches > 1 (slower attack)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--graphs", default="ring,star")
    ap.add_argument("--models", default="init,trained")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per reconstruction")
    ap.add_argument("--max-iters", type=int, default=100)
    ap.add_argument("--model", default="lenet", choices=("lenet", "relu-mlp"),
                    help="relu-mlp: passive attack spear, active target the imprint weights")
    args = ap.parse_args()
    args.attack = "spear" if args.model == "relu-mlp" else "analytic"
    torch.set_num_threads(1)
    data = digits()
    fresh = lenet(1234, arch=args.model)
    rows = []
    for kind in args.models.split(","):
        if kind == "trained":
            model, acc = train(*data, args.train_steps, args.model)
            print(f"trained model: held-out accuracy {acc:.3f}", flush=True)
        else:
            model, acc = fresh, accuracy(fresh, *data)
        x0 = flat_parameters(model)
        # lenet: init theta* = x0, trained the crafted fresh init; relu-mlp: the imprint weights
        target = imprint_target(model, data[0]) if args.model == "relu-mlp" else flat_parameters(fresh)
        for g in args.graphs.split(","):
            for b in (int(x) for x in args.batches.split(",")):
                t0 = time.time()
                res = run_case(g, args.nodes, model, x0, target, data, b, args.steps if b == 1 else args.steps_large, args)
                rows.append((g, kind, b, res))
                print(f"{g} {kind} B={b}: {time.time() - t0:.0f} s", flush=True)
    print("\n| graph | model | B | images | passive >=30 dB | active >=30 dB | steps >= 2: passive / active | passive mean dB | active mean dB "
          "| exact overrides | L2 ratio honest/active | cosine honest/active | victim acc honest/active |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for g, kind, b, r in rows:
        p, a = r["passive"], r["active"]
        print(f"| {g} | {kind} | {b} | {p['images']} | {p['share30']:.0%} ({p['determined']} grads det.) | "
              f"{a['share30']:.0%} | {p['later30']:.0%} / {a['later30']:.0%} | {p['mean']:.1f} | {a['mean']:.1f} | {a['exact']:.0%} | "
              f"{p['l2_ratio']:.2f} / {a['l2_ratio']:.2f} | {p['cosine']:.2f} / {a['cosine']:.2f} | "
              f"{p['acc']:.2f} / {a['acc']:.2f} |")


if __name__ == "__main__":
    main()
