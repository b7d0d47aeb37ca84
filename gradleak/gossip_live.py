"""The gossip-algebra attack on a model-gossip run: at its end (live) and from its run dir (offline).

Live (`Testbed.finish`, after the network stopped, before the summary): the attack reads the
malicious peers' transcripts (pooled when they collude: RUN_DIR/transcript/<id>/ each) and hands each reconstruction to the evaluator's score(); the
driver then joins the PSNRs from the scored rows (reconstructions.jsonl), writes
RUN_DIR/gossip_attack.json, sets the evaluator's gradleak_reconstructible_nodes_ratio and
returns the summary part. Offline (`gradleak attack --transcript RUN_DIR --gossip-algebra`):
the same attack, scored against RUN_DIR/truth/ after it ran, as the replay does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attacker.metrics import score_batch
from gradleak.config import RunConfig, load_yaml
from gradleak.runtime.evaluation import load_truth
from gradleak.runtime.evaluator_shards import as_shards
from gradleak.runtime.gossip_leak import GossipPublic, join_scores, run_gossip_attack, summary_of
from gradleak.runtime.record import RunRecord, clean
from gradleak.runtime.transcript import TranscriptError, TranscriptReader, transcript_path

REPORT_FILE = "gossip_attack.json"


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False))


def colluder_readers(cfg: RunConfig, run_dir: Path) -> dict[str, TranscriptReader]:
    """Each attacker's transcript by id: RUN_DIR/transcript for one, RUN_DIR/transcript/<id> for several.

    Raises:
        TranscriptError: an attacker's transcript is missing or corrupt.
    """
    ids = GossipPublic.from_config(cfg).attackers
    if len(ids) == 1:
        return {ids[0]: TranscriptReader(run_dir)}
    return {a: TranscriptReader(transcript_path(run_dir, a)) for a in ids}


def live_gossip_attack(cfg: RunConfig, run_dir: Path, evaluator: Any, get: Callable[[Any], Any]) -> dict[str, Any]:
    """Run the attack on a finished live run; `get` resolves Ray refs (the Testbed's _get).

    evaluator: the run's EvaluatorShards (or one evaluator handle); scores go to each
    update's shard, the share to the primary.
    """
    shards = as_shards(evaluator)
    assert shards is not None
    try:
        readers = colluder_readers(cfg, run_dir)
    except TranscriptError as exc:
        report: dict[str, Any] = {"status": "skipped", "reason": f"no usable transcript: {exc}"}
    else:
        refs: list[Any] = []

        def score(update_id: str, attack: str, images: np.ndarray, labels: np.ndarray,
                  stats: dict[str, Any]) -> None:
            refs.append(shards.for_update(update_id).score.remote(update_id, attack, images, labels, stats))

        report = run_gossip_attack(readers, GossipPublic.from_config(cfg), score,
                                   budget_s=cfg.attack.gossip_budget_s, max_batch_size=cfg.attack.max_batch_size)
        if refs:
            get(refs)  # every score is in reconstructions.jsonl before the rows are read
        report = join_scores(report, RunRecord(run_dir).rows())
    _write(run_dir / REPORT_FILE, report)
    if report.get("status") == "done":
        get(shards.primary.set_reconstructible.remote(cfg.gossip.topology, "models", report["reconstructed_share"]))
    return summary_of(report)


def offline_gossip_attack(run_dir: str | Path, out: str | Path, *, budget_s: float = 30.0,
                          attack: str = "analytic") -> dict[str, Any]:
    """Re-run the attack from RUN_DIR (config.yaml, transcript/), score against truth/, write OUT/gossip_attack.json.

    Raises:
        ValueError: no run dir, config or transcript, or a corrupt one (nothing written).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"no config.yaml in {run_dir}: not a run directory")
    cfg = load_yaml(run_dir / "config.yaml")
    if cfg.gossip.exchange != "models":
        raise ValueError(f"{run_dir} is a {cfg.gossip.exchange} run; the gossip-algebra attack needs --gossip models")
    readers = colluder_readers(cfg, run_dir)  # TranscriptError is a ValueError
    held: list[tuple[str, str, np.ndarray, np.ndarray]] = []

    def keep(update_id: str, name: str, images: np.ndarray, labels: np.ndarray, _stats: dict[str, Any]) -> None:
        held.append((update_id, name, images, labels))

    report = run_gossip_attack(readers, GossipPublic.from_config(cfg), keep, budget_s=budget_s, attack=attack,
                               max_batch_size=cfg.attack.max_batch_size)
    rows = []
    for update_id, name, images, labels in held:  # scoring, after the attack: the only truth read
        truth = load_truth(run_dir, update_id)
        if truth is None or images.shape != truth.images.shape:
            continue
        s = score_batch(images, labels, truth.images, truth.labels)
        rows.append({"update_id": update_id, "attack": name, "mean_psnr": clean(s["mean_psnr"])})
    report = join_scores(report, rows)
    _write(Path(out) / REPORT_FILE, report)
    return report
