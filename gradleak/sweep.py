"""`gradleak sweep`: the cross product of run settings, one testbed run per cell, into a store.

A cell is one combination (batch_size, defence, attack, seed, peers, fanout, topology,
aggregate): all honest peers use that batch size, defence and aggregation rule, the
malicious peer runs that attack. The aggregate axis (`--aggregate mean,median,trimmed:0.2`)
measures what a robust rule costs in leakage and accuracy (and `refused_steps` what a
poisoned step cost).
Cells run as Ray tasks (each starts its own Testbed actors), at most `--parallel` at a
time and only as many as the nodes' resources hold at once; `--cell-placement` chooses the
nodes of each cell's actors (gradleak/cell_placement.py; docs/scale.md, "Sweeps on a
cluster"). See gradleak/store.py for the directory layout and why an interrupted sweep
loses no finished cell.
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
from gradleak.cell_placement import (
    POLICIES,
    CellDemand,
    CellNodes,
    Ledger,
    cell_demand,
    describe,
    place,
)
from gradleak.config import ConfigError, RunConfig, from_dict
from gradleak.flags import add_flags, overlay
from gradleak.placement import FitError
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


def run_cell(cell: Cell, cfg: RunConfig, root: str, nodes: CellNodes | None = None,
             policy: str | None = None) -> dict[str, Any]:
    """Run one cell's testbed to the end; return its cell.json record (not yet written).

    nodes: where its actors go (pinned); None lets the fit and Ray choose, as `gradleak run`.
    """
    import ray

    from gradleak.runner import Testbed
    from gradleak.runtime.record import RunRecord

    t0 = time.monotonic()
    bed = Testbed(cfg, nodes=nodes)
    try:
        bed.start()
        bed.run_network()
        bed.drain()
        result = bed.finish(time.monotonic() - t0)
        honest = [result.accuracy[a["peer_id"]] for a in bed.addresses
                  if a["role"] == "honest" and a["peer_id"] in result.accuracy]
        used = bed.nodes_used()  # where the actors say they ran, not only where they were sent
    finally:
        bed.shutdown()
    ran_on = {*used["honest"], used["attacker"]}
    hostnames = {n["NodeID"]: n.get("NodeManagerHostname", "") for n in ray.nodes() if n["NodeID"] in ran_on}
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
        "cell_placement": policy, "peer_nodes": used["honest"], "attacker_node": used["attacker"],
        "node_hosts": hostnames,
    }


def demand(cfg: RunConfig) -> tuple[int, CellDemand]:
    """(peers per process, each actor's resources) of a cell; FitError if the cluster is too small.

    The process layout is the one `gradleak run` of the cell's config would choose here.
    """
    from gradleak.runner import fit

    per = fit(cfg).per_process
    return per, cell_demand(cfg, per)


def node_resources() -> dict[str, dict[str, float]]:
    """Each alive node's CPUs, GPUs and custom resources: the ledger of an idle cluster."""
    import ray

    skip = ("memory", "object_store_memory")
    return {n["NodeID"]: {k: float(v) for k, v in n["Resources"].items()
                          if k not in skip and not k.startswith(("node:", "accelerator_type"))}
            for n in ray.nodes() if n["Alive"]}


class _Scheduler:
    """Launches cells as Ray tasks, commits finished ones, keeps the Prometheus targets."""

    def __init__(self, spec: SweepSpec, root: Path, todo: list[Cell], parallel: int,
                 progress: Progress, policy: str = "spread") -> None:
        import ray

        from gradleak.runner import driver_node

        self.root, self.base, self.progress, self.parallel = root, spec.base, progress, parallel
        self.policy = policy
        self.pending = deque(todo)
        self.total, self.already = len(spec.cells()), len(spec.cells()) - len(todo)
        self.running: dict[Any, tuple[Cell, CellNodes, CellDemand]] = {}
        # What the sweep's running cells leave free on each node (it assumes the cluster is its own).
        self.nodes = Ledger(node_resources())
        # The cell's driver (and so its evaluator, which writes the run dir) on this driver's
        # node: the records land under --out here (KubeRay: the head pod's claim).
        self.task = ray.remote(num_cpus=0, max_retries=0)(run_cell).options(scheduling_strategy=driver_node())
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._targets: list[Any] | None = None
        self._demands: dict[int, tuple[int, CellDemand]] = {}
        self.check(todo)

    def check(self, cells: list[Cell]) -> None:
        """FitError, one line, when even an idle cluster cannot host one of the cells."""
        for cell in cells:
            try:
                per, need = self._demand(cell)
            except FitError as exc:
                raise FitError(f"the cluster cannot host even one cell ({cell.cell_id}): {exc}") from None
            if place(self.nodes.free, need, policy=self.policy, per_process=per) is None:
                raise FitError(f"the cluster cannot host even one cell ({cell.cell_id}): it needs "
                               f"{describe(need)}, and no node has room for them; lower --peer-cpus, "
                               "raise --peers-per-process, or add nodes")

    def _demand(self, cell: Cell) -> tuple[int, CellDemand]:
        # Cells differ in their demand only by the peers axis: one fit per count, not per cell.
        if cell.peers not in self._demands:
            self._demands[cell.peers] = demand(cell.config(self.base, self.root))
        return self._demands[cell.peers]

    def run(self) -> None:
        import ray

        while self.pending or self.running:
            self._launch()
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
            for ref in ready:
                self._collect(ref)
            self._write_targets()

    def _launch(self) -> None:
        while self.pending and len(self.running) < self.parallel:
            cell = self.pending[0]
            per, need = self._demand(cell)
            nodes = self.nodes.place(need, policy=self.policy, per_process=per)
            if nodes is None:
                return  # in order: the next cell waits until a running one gives its nodes back
            self.pending.popleft()
            self.nodes.hold(nodes, need)
            store.reset_cell(self.root, cell.cell_id)  # a partial dir from an earlier try
            ref = self.task.remote(cell, cell.config(self.base, self.root), str(self.root), nodes, self.policy)
            self.running[ref] = (cell, nodes, need)

    def _collect(self, ref: Any) -> None:
        import ray

        cell, nodes, need = self.running.pop(ref)
        self.nodes.hold(nodes, need, -1)
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
                f"{'-' if acc is None else f'{acc:.2f}'}{_where(r)}, elapsed {_dur(elapsed)}, "
                f"ETA {_dur(eta)}")

    def _write_targets(self) -> None:
        groups = store.running_targets(self.root, [c.cell_id for c, _n, _d in self.running.values()])
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


def _where(r: dict[str, Any]) -> str:
    """', peers on node ab12cd34, attacker on ef56ab78' (node ids cut to 8, as Ray's CLI shows)."""
    peers = ", ".join(n[:8] for n in r.get("peer_nodes") or [])
    return f", peers on {peers or '-'}, attacker on {(r.get('attacker_node') or '-')[:8]}"


def _dur(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_sweep(spec: SweepSpec, root: Path, todo: list[Cell], *, parallel: int | None = None,
              progress: Progress = print, placement: str = "spread") -> int:
    """Run the cells in `todo` (from `plan`) into the store at `root`; return the exit status.

    0 when every cell is done, 1 when some failed, 130 when interrupted (Ctrl-C).
    placement: the cell placement policy (gradleak/cell_placement.py).

    Raises:
        FitError: the cluster cannot host even one cell (nothing is written then).
    """
    import ray

    from gradleak.runner import ensure_ray

    started = ensure_ray(spec.base)
    status = 0
    try:
        if parallel is None:
            parallel = max(1, int(ray.cluster_resources().get("CPU", 1)) // 4)
        sched = _Scheduler(spec, root, todo, parallel, progress, placement)
        root.mkdir(parents=True, exist_ok=True)
        store.write_atomic(root / store.SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))
        progress(f"sweep: {sched.total} cells, {sched.already} done, {len(todo)} to run, "
                 f"{parallel} at a time, cells placed by {placement} over {len(sched.nodes.free)} nodes; "
                 f"store {root}; Prometheus targets {root / store.TARGETS_FILE}")
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
    p.add_argument("--cell-placement", choices=POLICIES, default="spread",
                   help="nodes of a cell's actors: spread = parallel cells on different nodes, pack = "
                        "fill one node before the next; a cell's peers share one node either way "
                        "when they fit (default: spread)")
    for name, flags in AXIS_FLAGS.items():
        what = "N (seeds 0..N-1) or A,B" if name == "seeds" else "A,B"
        p.add_argument(*flags, dest=f"axis_{name}", metavar="A,B",
                       help=f"axis {name}: {what} (default: the base's {store.SPEC_AXES[name]})")
    p.add_argument("--param-axis", action="append", metavar="NAME.FIELD=A,B",
                   help="an axis over one attack parameter (attack.params.NAME.FIELD of the cells' "
                        "config; e.g. idlg.lr=0.1,1.0), repeatable; sweep.yaml: a key "
                        f"{store.PARAM_AXIS}NAME.FIELD: [A, B] (default: none, the base's value)")
    add_flags(p, prefix="base_", skip=NOT_BASE, what="base run: ")


def spec_from_args(args: argparse.Namespace, config: str | None = None) -> SweepSpec:
    """The YAML file (`config`, else --config) first, then the flags; ConfigError if bad."""
    config = config or args.config
    raw = store.read_yaml(Path(config)) if config else {}
    known = [*store.SPEC_AXES, "base"]
    unknown = {k for k in set(raw) - set(known) if not str(k).startswith(store.PARAM_AXIS)}
    if unknown:
        raise ConfigError(f"unknown sweep key '{min(unknown)}' (known: "
                          f"{', '.join(known)}, {store.PARAM_AXIS}NAME.FIELD)")
    base = from_dict(raw.get("base") or {})
    base = from_dict(overlay(args, prefix="base_"), base)
    for name in AXIS_FLAGS:
        if getattr(args, f"axis_{name}") is not None:
            raw[name] = getattr(args, f"axis_{name}")
    for item in getattr(args, "param_axis", None) or ():
        key, eq, values = item.partition("=")
        if not eq:
            raise ConfigError(f"--param-axis takes NAME.FIELD=A,B, got {item!r}")
        raw[store.PARAM_AXIS + key.strip()] = values
    return make_spec(raw, base)


def _spec_flags_given(args: argparse.Namespace) -> bool:
    return args.config is not None or any(
        v is not None for k, v in vars(args).items()
        if k.startswith(("axis_", "base_", "param_axis")) and k != "base_ray_address")


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
    try:
        return run_sweep(spec, Path(args.out), todo, parallel=args.parallel,
                         progress=lambda s: print(s, flush=True), placement=args.cell_placement)
    except FitError as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2


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
