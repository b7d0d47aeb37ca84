"""What one peer of a run is: the PeerSpec built from the run config and its index.

Shared by `gradleak run` (every peer of the network as Ray actors) and `gradleak peer`
(one of them as its own process), so both give the peer at index i the same shard,
seeds, batch size, defence and clock.
"""

from __future__ import annotations

from typing import Any

from gradleak.config import RunConfig
from gradleak.data import Dataset, Shard
from gradleak.runtime.peer_node import PeerSpec
from p2p.defences import parse_defence
from p2p.peer import InboxLimits


def header_defences(defences: tuple[str, ...], secagg: str | None) -> tuple[str, ...]:
    """The defence names the run's updates carry in their headers (p2p.peer.Peer.defence_name)."""
    names = []
    for d in defences:
        base = parse_defence(d).name
        names.append(base if secagg is None else secagg if base == "none" else f"{base}+{secagg}")
    return tuple(dict.fromkeys(names))


def peer_spec(cfg: RunConfig, i: int, peer_id: str, *, role: str, shard: Shard, test: Shard,
              data: Dataset, members: tuple[str, ...], host: str, secagg_name: str | None = None,
              **extra: Any) -> PeerSpec:
    """The spec of the peer at index i (role malicious: the attacker, batch and defence aside).

    extra: per-process fields (tls, secagg, port, metrics_port).
    """
    pc, gc = cfg.peers, cfg.gossip
    malicious = role == "malicious"
    return PeerSpec(
        peer_id=peer_id, role=role,
        shard_images=shard.images, shard_labels=shard.labels,
        test_images=test.images, test_labels=test.labels, input_shape=data.input_shape,
        num_classes=data.num_classes, model=pc.model,
        batch_size=min(pc.batch_sizes) if malicious else pc.batch_sizes[i % len(pc.batch_sizes)],
        defence="none" if malicious else pc.defences[i % len(pc.defences)],
        lr=pc.lr, optimizer=pc.optimizer, init=pc.init, seed=cfg.seed * 1000 + i + 1, model_seed=cfg.seed,
        keep_versions=pc.keep_versions, keep_bytes=int(pc.keep_mb * (1 << 20)),
        fanout=gc.fanout, topology=gc.topology, timeout_s=gc.timeout_s, chunk_bytes=gc.chunk_bytes,
        bulk_min_bytes=gc.bulk_min_bytes,
        host=host, threads=pc.threads, device="cpu" if malicious else pc.effective_device,
        period_s=gc.period_s[i % len(gc.period_s)], jitter=gc.jitter, staleness=gc.staleness,
        secagg_wait=gc.secagg_wait if gc.sync == "async" else 0,
        mix_every=gc.mix_every, mix_weight=gc.mix_weight, lockstep=gc.sync == "rounds",
        aggregate=gc.aggregate, max_update_norm=gc.max_update_norm, max_samples=max(pc.batch_sizes),
        inbox=InboxLimits(max_round=gc.rounds, step_window=gc.step_window,
                          max_pending_per_origin=gc.inbox_per_origin, max_pending=gc.inbox_total,
                          max_masked_steps=gc.inbox_masked_steps),
        # Only members may push (and, under TLS, pull); the malicious peer is a member too.
        members=members, insecure=gc.insecure,
        known_defences=header_defences((*pc.defences, "none"), secagg_name),
        known_batch_sizes=tuple(sorted(set(pc.batch_sizes))),
        run_seed=cfg.seed, exchange=gc.exchange, mixing=gc.mixing, mix_rounds=gc.mix_rounds, drop=gc.drop,
        model_dtype=gc.model_dtype,
        **extra,
    )


__all__ = ["header_defences", "peer_spec"]
