"""`gradleak sweep`: the cross product of run settings, one testbed run per cell, into a store.

A cell is one combination (batch_size, defence, attack, seed, peers, fanout, topology,
aggregate): all honest peers use that batch size, defence and aggregation rule, the
malicious peer runs that attack. The aggregate axis (`--aggregate mean,median,trimmed:0.2`)
measures what a robust rule costs in leakage and accuracy (and `refused_steps` what a
poisoned step cost).
Cells run as Ray tasks (each starts its own Testbed actors), at most `--parallel` at a
time and only as many as the cluster's resources hold at once. See gradleak/store.py
for the directory layout and why an interrupted sweep loses no finished cell.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from gradleak import store
from gradleak.config import ConfigError, RunConfig, from_dict
from gradleak.flags import add_flags, overlay
from gradleak.store import Cell, SweepSpec, defence_params, make_spec

Progress = Callable[[str], None]
# sweep.yaml axis key -> its flags (a comma list; the singular/plural spellings both work)
AXIS_FLAGS: dict[str, tuple[str, ...]] = {
    "batch_sizes": ("--batch-sizes", "--batch-size"), "defences": ("--defences", "--defence"),
    "attacks": ("--attacks", "--attack"), "seeds": ("--seeds",), "peers": ("--peers",),
    "fanouts": ("--fanout", "--fanouts"), "topologies": ("--topology", "--topologies"),
    "aggregates": ("--aggregate", "--aggregates"),
}
# `gradleak run` flags a sweep takes as axes (or sets per cell) instead of as base fields.
NOT_BASE = {"--peers", "--batch-size", "--defence", "--attack", "--fanout", "--topology",
            "--seed", "--out", "--metrics-port", "--aggregate"}


# -- running cells -------------------------------------------------------------------


def run_cell(cell: Cell, cfg: RunConfig, root: str) -> dict[str, Any]:
    """Run one cell's testbed to the end; return its cell.json record (not yet written)."""
    from gradleak.runner import Testbed
    from gradleak.runtime.record import RunRecord

    t0 = time.monotonic()
    bed = Testbed(cfg)
    try:
        bed.start()
        bed.run_network()
        bed.drain()
        result = bed.finish(time.monotonic() - t0)
        honest = [result.accuracy[a["peer_id"]] for a in bed.addresses
                  if a["role"] == "honest" and a["peer_id"] in result.accuracy]
    finally:
        bed.shutdown()
    a = result.attacker
    received = a["captured"] + a["dropped"]
    return {
        **cell.axes(),
        "honest_accuracy": sum(honest) / len(honest) if honest else None,
        "honest_accuracy_min": min(honest) if honest else None,
        "messages": result.messages, "bytes_sent": result.wire_bytes,
        **store.leakage(RunRecord(result.run_dir).rows()),
        "captured": a["captured"], "dropped": a["dropped"], "attacked": a["attacked"],
        "attacker_share": received / result.messages if result.messages else None,
        "seconds": round(time.monotonic() - t0, 3),
        "run_dir": os.path.relpath(result.run_dir, root),
        "defence_params": defence_params(cell.defence),
        "refused_steps": sum((result.extra.get("refused_steps") or {}).values()),
    }


def demand(cfg: RunConfig) -> dict[str, float]:
    """Ray resources a cell's actors hold together (the evaluator asks for none)."""
    pc, ac = cfg.peers, cfg.attack
    hosts = -(-pc.honest // pc.per_process) if pc.per_process else pc.honest  # auto: at most one each
    need = {"CPU": pc.num_cpus * (hosts + 1), "GPU": pc.num_gpus * pc.honest + ac.num_gpus}
    if ac.resource:
        need[ac.resource] = 1.0
    return need


class _Scheduler:
    """Launches cells as Ray tasks, commits finished ones, keeps the Prometheus targets."""

    def __init__(self, spec: SweepSpec, root: Path, todo: list[Cell], parallel: int,
                 progress: Progress) -> None:
        import ray

        self.root, self.base, self.progress, self.parallel = root, spec.base, progress, parallel
        self.pending = deque(todo)
        self.total, self.already = len(spec.cells()), len(spec.cells()) - len(todo)
        self.running: dict[Any, tuple[Cell, dict[str, float]]] = {}
        self.capacity = {k: float(v) for k, v in ray.cluster_resources().items()}
        self.task = ray.remote(num_cpus=0, max_retries=0)(run_cell)
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._targets: list[Any] | None = None

    def run(self) -> None:
        import ray

        while self.pending or self.running:
            self._launch()
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
            for ref in ready:
                self._collect(ref)
            self._write_targets()

    def _fits(self, need: dict[str, float]) -> bool:
        if not self.running:
            return True  # one cell always runs; it waits for resources as `gradleak run` would
        used: dict[str, float] = {}
        for _cell, held in self.running.values():
            for k, v in held.items():
                used[k] = used.get(k, 0.0) + v
        return all(used.get(k, 0.0) + v <= self.capacity.get(k, 0.0) + 1e-9
                   for k, v in need.items() if v > 0)

    def _launch(self) -> None:
        while self.pending and len(self.running) < self.parallel:
            cell = self.pending[0]
            cfg = cell.config(self.base, self.root)
            need = demand(cfg)
            if not self._fits(need):
                return
            self.pending.popleft()
            store.reset_cell(self.root, cell.cell_id)  # a partial dir from an earlier try
            self.running[self.task.remote(cell, cfg, str(self.root))] = (cell, need)

    def _collect(self, ref: Any) -> None:
        import ray

        cell, _need = self.running.pop(ref)
        try:
            record = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.failed += 1
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            self.progress(f"cell {cell.cell_id} failed (rerun with --resume): {first}")
            return
        store.write_cell(self.root, record)  # the commit point: the cell is done from here on
        self.done += 1
        self.progress(self._line(record))

    def _line(self, r: dict[str, Any]) -> str:
        elapsed = time.monotonic() - self.t0
        left = len(self.pending) + len(self.running)
        eta = elapsed / self.done * left if self.done else 0.0
        psnr, acc = r["mean_psnr"], r["honest_accuracy"]
        return (f"[{self.already + self.done}/{self.total}] {r['cell_id']}: "
                f"{r['reconstructions']} reconstructions, mean PSNR "
                f"{'-' if psnr is None else f'{psnr:.1f} dB'}, honest accuracy "
                f"{'-' if acc is None else f'{acc:.2f}'}, elapsed {_dur(elapsed)}, ETA {_dur(eta)}")

    def _write_targets(self) -> None:
        groups = store.running_targets(self.root, [c.cell_id for c, _n in self.running.values()])
        if groups != self._targets:
            store.write_atomic(self.root / store.TARGETS_FILE, json.dumps(groups, indent=2))
            self._targets = groups

    def abandon(self) -> int:
        """Stop the running cells; their partial dirs stay until --resume deletes them."""
        import ray

        for ref in list(self.running):
            with contextlib.suppress(Exception):  # the task may have ended already
                ray.cancel(ref, force=True)
        n = len(self.running)
        self.running.clear()
        self._write_targets()
        return n


def _dur(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_sweep(spec: SweepSpec, root: Path, todo: list[Cell], *, parallel: int | None = None,
              progress: Progress = print) -> int:
    """Run the cells in `todo` (from `plan`) into the store at `root`; return the exit status.

    0 when every cell is done, 1 when some failed, 130 when interrupted (Ctrl-C).
    """
    import ray

    from gradleak.runner import ensure_ray

    root.mkdir(parents=True, exist_ok=True)
    store.write_atomic(root / store.SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    started = ensure_ray(spec.base)
    status = 0
    try:
        if parallel is None:
            parallel = max(1, int(ray.cluster_resources().get("CPU", 1)) // 4)
        sched = _Scheduler(spec, root, todo, parallel, progress)
        progress(f"sweep: {sched.total} cells, {sched.already} done, {len(todo)} to run, "
                 f"{parallel} at a time; store {root}; Prometheus targets "
                 f"{root / store.TARGETS_FILE}")
        try:
            sched.run()
        except KeyboardInterrupt:
            n = sched.abandon()
            progress(f"interrupted: {n} running cells abandoned; rerun with --resume to finish")
            status = 130
        status = status or (1 if sched.failed else 0)
        cells_csv, rows_csv = store.write_tables(root)
        progress(f"{len(store.load_cells(root))}/{sched.total} cells done; tables {cells_csv}, "
                 f"{rows_csv}")
    finally:
        if started:
            ray.shutdown()
    return status


# -- command line --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, no usage dump
        sys.stderr.write(f"gradleak: error: {message}\n")
        raise SystemExit(2)


def add_sweep_parser(subparsers: Any) -> None:
    """Add `gradleak sweep` to the CLI's subparsers."""
    _add_arguments(subparsers.add_parser("sweep", help="run a grid of testbed runs into a store"))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="sweep directory (the store)")
    p.add_argument("--config", help="sweep YAML: axes and a `base:` run config (flags override it)")
    p.add_argument("--resume", action="store_true", help="skip done cells, redo unfinished ones")
    p.add_argument("--parallel", type=int, default=None, help="cells at once (default: CPUs // 4)")
    for name, flags in AXIS_FLAGS.items():
        what = "N (seeds 0..N-1) or A,B" if name == "seeds" else "A,B"
        p.add_argument(*flags, dest=f"axis_{name}", metavar="A,B",
                       help=f"axis {name}: {what} (default: the base's {store.SPEC_AXES[name]})")
    add_flags(p, prefix="base_", skip=NOT_BASE, what="base run: ")


def spec_from_args(args: argparse.Namespace, config: str | None = None) -> SweepSpec:
    """The YAML file (`config`, else --config) first, then the flags; ConfigError if bad."""
    config = config or args.config
    raw = store.read_yaml(Path(config)) if config else {}
    known = [*store.SPEC_AXES, "base"]
    if set(raw) - set(known):
        raise ConfigError(f"unknown sweep key '{min(set(raw) - set(known))}' (known: "
                          f"{', '.join(known)})")
    base = from_dict(raw.get("base") or {})
    base = from_dict(overlay(args, prefix="base_"), base)
    for name in AXIS_FLAGS:
        if getattr(args, f"axis_{name}") is not None:
            raw[name] = getattr(args, f"axis_{name}")
    return make_spec(raw, base)


def _spec_flags_given(args: argparse.Namespace) -> bool:
    return args.config is not None or any(
        v is not None for k, v in vars(args).items()
        if k.startswith(("axis_", "base_")) and k != "base_ray_address")


def plan(args: argparse.Namespace) -> tuple[SweepSpec, list[Cell]]:
    """Resolve the spec and check DIR against it; returns the spec and the cells to run.

    Creates nothing: a ConfigError here leaves no trace.
    """
    root = Path(args.out)
    stored = root / store.SPEC_FILE
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    if not args.resume and root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; use --resume to continue the sweep in it")
    resuming = args.resume and stored.is_file()
    # `--out DIR --resume` alone continues the stored sweep.
    spec = spec_from_args(args, str(stored) if resuming and not _spec_flags_given(args) else None)
    if resuming and store.read_yaml(stored) != _plain(spec.to_dict()):
        raise ConfigError(f"{stored} holds a different sweep; resume with the same settings "
                          "(or with --out and --resume alone)")
    cells = spec.cells()
    return spec, [c for c in cells if not store.is_done(root, c.cell_id)]


def _plain(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run `gradleak sweep` from parsed arguments; returns the exit status."""
    try:
        spec, todo = plan(args)
    except ConfigError as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_sweep(spec, Path(args.out), todo, parallel=args.parallel,
                     progress=lambda s: print(s, flush=True))


def build_parser() -> argparse.ArgumentParser:
    """`gradleak sweep` on its own (for `python -m gradleak.sweep`)."""
    parser = _Parser(prog="gradleak sweep", description="Run a grid of testbed runs into a store.")
    _add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_sweep_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    # Through the package module, so Ray ships references to gradleak.sweep, not copies.
    from gradleak.sweep import main as _main

    raise SystemExit(_main())
