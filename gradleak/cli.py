"""`gradleak` command line: `gradleak run` starts a testbed from flags and/or a YAML file;
`gradleak peer` runs one peer of it as a process of its own (gradleak/standalone.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradleak.config import (
    ConfigError,
    RunConfig,
    check_attackable,
    from_dict,
    load_yaml,
    parse_scalar,
)
from gradleak.flags import add_flags, overlay
from gradleak.report import add_report_parser, run_report_command
from gradleak.standalone import add_peer_parser, run_peer_command
from gradleak.sweep import add_sweep_parser, run_sweep_command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, no usage dump
        sys.stderr.write(f"gradleak: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradleak", description="Federated-learning gradient leakage testbed.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_attack_parser(sub)
    add_report_parser(sub)
    add_sweep_parser(sub)
    add_peer_parser(sub)
    run = sub.add_parser("run", help="run the gossip testbed with a live attacker")
    run.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    add_flags(run)
    return parser


def _add_attack_parser(sub: Any) -> None:
    p = sub.add_parser("attack", help="attack gradients of images from a file, or replay a run's transcript, offline")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="FILE",
                        help=".npz (images N x C x H x W in [0, 1], labels N) or a folder of images")
    source.add_argument("--corpus", metavar="FILE",
                        help="text file, one sentence per line (use a text model and attack)")
    source.add_argument("--transcript", metavar="RUN_DIR",
                        help="a run directory: replay the updates its attacker received (RUN_DIR/transcript) "
                             "and score them against RUN_DIR/truth")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for result.json and grid.png")
    p.add_argument("--model", default=None,
                   help="the victim model (default: lenet; choices: lenet, mlp, resnet18; transformer "
                        "for --corpus; --transcript uses the run's)")
    p.add_argument("--attack", default=None,
                   help="the attack (default: idlg, analytic for --transcript; choices: the registered "
                        "image attacks, e.g. dlg, idlg, ig, analytic; dlg-text or analytic-text for --corpus)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="samples behind each gradient (default: 1); with --transcript, replay only "
                        "updates of this batch size")
    p.add_argument("--defence", default=None, metavar="D",
                   help="defence chain applied to each gradient, e.g. prune:0.3+fp16 (default: none); "
                        "with --transcript, replay only updates with this defence")
    p.add_argument("--max-iters", type=int, default=None, metavar="N",
                   help="outer optimiser steps per batch (default: 300 for images, 30 for text, the live "
                        "attacker's for --transcript)")
    p.add_argument("--target-psnr", type=float, default=30.0, metavar="DB",
                   help="PSNR whose first reaching is timed (default: 30)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the model init and the attack's start (default: 0; the live run's for "
                        "--transcript)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads (default: 1)")
    p.add_argument("--num-batches", type=int, default=None, metavar="N",
                   help="attack only the first N batches, or updates for --transcript (default: all)")
    p.add_argument("--num-classes", type=int, default=10, metavar="N",
                   help="classes of the victim's output layer (default: 10)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="torch device of the attack (default: auto, CUDA when torch sees one)")
    p.add_argument("--gossip-algebra", action="store_true",
                   help="with --transcript of a --gossip models run: re-run the passive multi-hop "
                        "gossip-algebra attack (OUT/gossip_attack.json), scored against RUN_DIR/truth")
    p.add_argument("--budget", type=float, default=30.0, metavar="S",
                   help="wall seconds of the --gossip-algebra attack (default: 30)")
    p.add_argument("--attack-param", action="append", default=None, metavar="FIELD=VALUE",
                   help="with --transcript: one of the replayed attack's own parameters (repeatable; "
                        "default: the live run's attack.params; fields per attack in the README)")


def _attack(args: argparse.Namespace) -> int:
    from gradleak.offline import OfflineConfig, run_offline

    for name in ("batch_size", "max_iters", "threads", "num_classes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"gradleak: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.num_batches is not None and args.num_batches < 1:
        print("gradleak: error: --num-batches must be >= 1", file=sys.stderr)
        return 2
    if args.corpus is not None:
        return _attack_text(args)
    if args.gossip_algebra:
        return _attack_gossip(args)
    if args.transcript is not None:
        return _attack_transcript(args)
    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "corpus", "transcript", "gossip_algebra", "budget", "attack_param")
              and v is not None}
    if args.attack_param:
        print("gradleak: error: --attack-param applies to --transcript only", file=sys.stderr)
        return 2
    try:
        result = run_offline(OfflineConfig(**fields))
    except ValueError as exc:  # bad input of any kind: one line, nothing written
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    for a in result["attacks"]:
        t = a["time_to_target_seconds"]
        print(f"batch {a['indices']}: PSNR {[round(p, 1) for p in a['psnr'] if p is not None]} dB, "
              f"labels {a['label_accuracy']:.2f}, {a['iterations']} it, {a['seconds']:.2f} s, "
              f"to target {'-' if t is None else f'{t:.2f} s'}")
    print(f"wrote {Path(args.out) / 'result.json'} and grid.png")
    return 0


def _attack_gossip(args: argparse.Namespace) -> int:
    from gradleak.gossip_live import offline_gossip_attack

    if args.transcript is None:
        print("gradleak: error: --gossip-algebra needs --transcript RUN_DIR", file=sys.stderr)
        return 2
    if not args.budget > 0:
        print("gradleak: error: --budget must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        report = offline_gossip_attack(args.transcript, args.out, budget_s=args.budget,
                                       attack=args.attack or "analytic")
    except ValueError as exc:  # no run dir or config, a gradient run, a corrupt transcript
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    if report["status"] != "done":
        print(f"gossip-algebra attack skipped: {report['reason']}")
    else:
        hops = " ".join(f"{h}:{v['reconstructed']}/{v['nodes']}" for h, v in report["by_hop"].items())
        print(f"gossip-algebra: {report['determined_share']:.0%} of {report['honest']} honest nodes determined, "
              f"{report['reconstructed_share']:.0%} reconstructed >= 30 dB (by hop {hops})")
    print(f"wrote {Path(args.out) / 'gossip_attack.json'}")
    return 0


def _attack_transcript(args: argparse.Namespace) -> int:
    from gradleak.replay import ReplayConfig, ReplayError, run_replay

    if args.model is not None:
        print("gradleak: error: --model does not apply to --transcript (the run's model is used)",
              file=sys.stderr)
        return 2
    keep = ("out", "attack", "max_iters", "seed", "threads", "device", "num_batches", "batch_size", "defence")
    fields: dict[str, Any] = {k: getattr(args, k) for k in keep if getattr(args, k) is not None}
    if args.attack_param:
        params: dict[str, Any] = {}
        for item in args.attack_param:
            name, eq, raw = item.partition("=")
            if not (eq and name.strip()):
                print(f"gradleak: error: --attack-param takes FIELD=VALUE, got {item!r}", file=sys.stderr)
                return 2
            params[name.strip()] = parse_scalar(raw)
        fields["params"] = params

    def line(r: dict[str, Any]) -> None:
        head = f"{r['update_id']}: batch {r['batch_size']}, {r['defence']}, step {r['step']}"
        if r["skipped"]:
            print(f"{head}: skipped ({r['skipped']})", flush=True)
        else:
            print(f"{head}: PSNR {[round(p, 1) for p in r['psnr'] if p is not None]} dB, labels "
                  f"{r['label_accuracy']:.2f}, {r['seconds']:.2f} s", flush=True)

    try:
        result = run_replay(ReplayConfig(run_dir=args.transcript, **fields), progress=line)
    except ReplayError as exc:  # missing dir, no/corrupt transcript, unknown attack: one line
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    scored = sum(1 for r in result["updates"] if not r["skipped"])
    print(f"replayed {scored} of {len(result['updates'])} updates with {result['attack']}; "
          f"wrote {Path(args.out) / 'result.json'} and grid.png")
    return 0


def _attack_text(args: argparse.Namespace) -> int:
    from gradleak.offline_text import TextOfflineConfig, run_text_offline

    keep = ("corpus", "out", "model", "attack", "batch_size", "defence", "max_iters", "seed",
            "threads", "num_batches")
    fields = {k: getattr(args, k) for k in keep if getattr(args, k) is not None}
    try:
        result = run_text_offline(TextOfflineConfig(**fields))
    except ValueError as exc:  # bad corpus, unknown names, bad defence: one line
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    for a in result["attacks"]:
        print(f"sentences {a['indices']}: token accuracy {a['token_accuracy']:.2f}, exact "
              f"{a['exact_sentence_rate']:.2f}, {a['seconds']:.2f} s: {a['reconstruction'][0]!r}")
    print(f"wrote {Path(args.out) / 'result.json'}")
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """YAML file first (if any), then each given flag; raises ConfigError on bad values."""
    cfg = load_yaml(args.config) if args.config else RunConfig()
    cfg = from_dict(overlay(args), cfg).validate()
    check_attackable(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "attack":
        return _attack(args)
    if args.command == "report":
        return run_report_command(args)
    if args.command == "sweep":
        return run_sweep_command(args)
    if args.command == "peer":
        return run_peer_command(args)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run(cfg)


def _run(cfg: RunConfig) -> int:
    from gradleak.placement import FitError
    from gradleak.runner import Interrupted, run
    from gradleak.runtime.record import format_table

    try:
        result = run(cfg, progress=lambda s: print(s, flush=True), handle_signals=True)
    except FitError as exc:  # checked before any actor exists: nothing was started
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted:  # a second stop request while the outputs were being written
        print("gradleak: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError, TimeoutError) as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(result.summary))
    print()
    a = result.attacker
    print(f"run {result.run_dir} in {result.seconds:.0f} s: {result.messages} updates sent "
          f"({result.wire_bytes / 1e6:.1f} MB); attacker received {a.get('received', '-')}, attacked "
          f"{a.get('attacked', '-')} (coverage {_ratio(a.get('coverage'))}), evicted {a.get('evicted', '-')}; "
          f"{result.counts['reconstructions']} reconstructions")
    print(f"summary: {result.run_dir / 'summary.md'}  grid: {result.run_dir / 'grid.png'}  "
          f"record: {result.run_dir / 'reconstructions.jsonl'}")
    if result.interrupted:
        print("gradleak: interrupted; the summary holds what was recorded until then", file=sys.stderr)
        return 130
    return 0


def _ratio(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "-"


def entry() -> int:
    # A Ctrl-C before the run installs its own handlers (while torch or Ray is imported)
    # ends quietly with the usual status, not with a traceback.
    try:
        return main()
    except KeyboardInterrupt:
        print("gradleak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(entry())

