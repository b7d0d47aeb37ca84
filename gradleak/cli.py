"""`gradleak` command line: `gradleak run` starts a testbed from flags and/or a YAML file."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradleak.config import ConfigError, RunConfig, from_dict, load_yaml
from gradleak.flags import add_flags, overlay
from gradleak.report import add_report_parser, run_report_command
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
    run = sub.add_parser("run", help="run the gossip testbed with a live attacker")
    run.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    add_flags(run)
    return parser


def _add_attack_parser(sub: Any) -> None:
    p = sub.add_parser("attack", help="attack gradients of images from a file, offline")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help=".npz (images N x C x H x W in [0, 1], labels N) or a folder")
    source.add_argument("--corpus", help="text file, one sentence per line (use a text model and attack)")
    p.add_argument("--out", required=True, help="directory for result.json and grid.png")
    p.add_argument("--model", default=None, help="lenet | mlp | resnet18; transformer for --corpus")
    p.add_argument("--attack", default=None, help="dlg | idlg | ig; dlg-text | analytic-text for --corpus")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--defence", default="none")
    p.add_argument("--max-iters", type=int, default=None, help="default 300 (images), 30 (text)")
    p.add_argument("--target-psnr", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-batches", type=int, default=None, help="attack only the first N batches")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


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
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "corpus") and v is not None}
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
    return from_dict(overlay(args), cfg).validate()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "attack":
        return _attack(args)
    if args.command == "report":
        return run_report_command(args)
    if args.command == "sweep":
        return run_sweep_command(args)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run(cfg)


def _run(cfg: RunConfig) -> int:
    from gradleak.runner import run
    from gradleak.runtime.record import format_table

    try:
        result = run(cfg, progress=lambda s: print(s, flush=True))
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(result.summary))
    print()
    a = result.attacker
    print(f"run {result.run_dir} in {result.seconds:.0f} s: {result.messages} updates sent "
          f"({result.wire_bytes / 1e6:.1f} MB); attacker received {a['received']}, attacked "
          f"{a['attacked']} ({a['coverage']:.0%}), evicted {a['evicted']}; {result.counts['reconstructions']} reconstructions")
    print(f"grid: {result.run_dir / 'grid.png'}  record: {result.run_dir / 'reconstructions.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

