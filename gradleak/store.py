"""A sweep's data: its spec and cells (with their ids), and the store it runs into.

The spec is the axes plus a base RunConfig; each cell of their cross product is one
testbed run. Layout of a sweep directory DIR (the store is the source of truth; `gradleak report`
reads it):

    DIR/sweep.yaml                 the resolved sweep spec (axes + base config)
    DIR/prometheus_targets.json    file_sd groups of the cells running now
    DIR/cells/<cell_id>/<run>/     the cell's Testbed run dir (config.yaml,
                                   reconstructions.jsonl, summary.json, grid.png)
    DIR/cells/<cell_id>/cell.json  the cell's figures, written last and atomically
    DIR/cells.csv                  one row per done cell (written by `write_tables`)
    DIR/reconstructions.csv        every done cell's reconstructions, with its axes

A cell is done iff its cell.json exists; everything else under a cell's directory is
partial until then and is thrown away before the cell is run again.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradleak.config import ConfigError, RunConfig, check_attackable, from_dict, parse_scalar

CELLS_DIR = "cells"
CELL_FILE = "cell.json"
SPEC_FILE = "sweep.yaml"
TARGETS_FILE = "prometheus_targets.json"
RECONSTRUCTIONS_FILE = "reconstructions.jsonl"

AXES = ("batch_size", "defence", "attack", "seed", "peers", "fanout", "topology", "aggregate")
# cell.json keys in schema order; columns may be added, never renamed.
CELL_COLUMNS = (
    "cell_id", *AXES, "honest_accuracy", "honest_accuracy_min", "messages", "bytes_sent",
    "reconstructions", "mean_psnr", "share_psnr_30", "mean_ssim", "label_accuracy", "captured",
    "dropped", "attacker_share", "seconds", "run_dir", "defence_params", "refused_steps",
    "cell_placement", "peer_nodes", "attacker_node", "node_hosts", "attack_params",
)
# Axes a reconstruction row gets from its cell (batch_size, defence, attack it has already).
ROW_AXES = ("cell_id", "seed", "peers", "fanout", "topology", "aggregate", "attack_params")
RECONSTRUCTION_COLUMNS = (
    *ROW_AXES[:-1], "update_id", "origin", "round", "batch_size", "defence", "attack", "psnr", "ssim",
    "mean_psnr", "mean_ssim", "label_accuracy", "seconds", "attack_params",
)
# A sweep.yaml key `attack.params.NAME.FIELD: [values]` is an axis over one attack parameter.
PARAM_AXIS = "attack.params."

# sweep.yaml axis key -> the base RunConfig field its default comes from
SPEC_AXES = {
    "batch_sizes": "peers.batch_sizes", "defences": "peers.defences", "attacks": "attack.attacks",
    "seeds": "seed", "peers": "peers.honest", "fanouts": "gossip.fanout",
    "topologies": "gossip.topology", "aggregates": "gossip.aggregate",
}
# Fields each cell sets itself, so sweep.yaml's base leaves them out.
CELL_FIELDS = {"": ("seed", "out_dir", "ray_address"), "peers": ("honest", "batch_sizes", "defences"),
               "gossip": ("fanout", "topology", "aggregate"), "attack": ("attacks",), "telemetry": ("metrics_port",)}


@dataclass(frozen=True)
class Cell:
    batch_size: int
    defence: str  # canonical spec (p2p.defences), e.g. "gauss:0.01"
    attack: str
    seed: int
    peers: int  # honest peers
    fanout: int
    topology: str
    aggregate: str = "mean"  # canonical rule (p2p.aggregate), e.g. "trimmed:0.2"
    # The parameter axes' values: ("idlg.lr", 0.5), ... set in attack.params of the cell.
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def cell_id(self) -> str:
        """Deterministic and filesystem-safe, e.g. bs1-prune_0.3-idlg-s0-p4-f2-complete.

        A rule other than mean is appended (-median, -trimmed_0.2), so the ids of stores
        made before the aggregate axis existed stay as they were.
        """
        rule = "" if self.aggregate == "mean" else f"-{_safe(self.aggregate)}"
        params = "".join(f"-{_safe(f'{key}:{value}')}" for key, value in self.params)
        return (f"bs{self.batch_size}-{_safe(self.defence)}-{_safe(self.attack)}-s{self.seed}"
                f"-p{self.peers}-f{self.fanout}-{_safe(self.topology)}{rule}{params}")

    def axes(self) -> dict[str, Any]:
        """The cell's axes; `attack_params` ({"idlg.lr": 0.5}) only where the sweep has such axes."""
        axes = dataclasses.asdict(self)
        del axes["params"]
        extra = {"attack_params": dict(self.params)} if self.params else {}
        return {"cell_id": self.cell_id, **axes, **extra}

    def config(self, base: RunConfig, root: Path) -> RunConfig:
        """The cell's RunConfig: the base with this cell's axes, its own out dir, any port."""
        r = dataclasses.replace
        defence, secagg = split_secagg(self.defence)
        return r(base, seed=self.seed, out_dir=str(cell_dir(root, self.cell_id)),
                 peers=r(base.peers, honest=self.peers, batch_sizes=(self.batch_size,),
                         defences=(defence,), secagg=secagg),
                 gossip=r(base.gossip, fanout=self.fanout, topology=self.topology, aggregate=self.aggregate),
                 attack=r(base.attack, attacks=(self.attack,), params=self.attack_params(base)),
                 telemetry=r(base.telemetry, metrics_port=0))


    def attack_params(self, base: RunConfig) -> dict[str, dict[str, Any]]:
        """The base's attack.params with this cell's parameter values set."""
        out = {name: dict(fields) for name, fields in base.attack.params.items()}
        for key, value in self.params:
            name, field = key.split(".", 1)
            out.setdefault(name, {})[field] = value
        return out


def _safe(name: str) -> str:
    # Injective: ':' -> '_', anything outside [A-Za-z0-9.+-] (including '_' itself) -> %XX.
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-")
    return "".join(c if c in ok else "_" if c == ":" else f"%{ord(c):02X}" for c in name)


@dataclass(frozen=True)
class SweepSpec:
    batch_sizes: tuple[int, ...]
    defences: tuple[str, ...]
    attacks: tuple[str, ...]
    seeds: tuple[int, ...]
    peers: tuple[int, ...]
    fanouts: tuple[int, ...]
    topologies: tuple[str, ...]
    base: RunConfig
    aggregates: tuple[str, ...] = ("mean",)
    # Axes over attack parameters: ("idlg.lr", (0.5, 1.0)), ...; after the others, in order.
    params: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def cells(self) -> list[Cell]:
        """The cross product, in axis order (batch size slowest, then aggregation rule, then
        the parameter axes)."""
        axes = (self.batch_sizes, self.defences, self.attacks, self.seeds, self.peers,
                self.fanouts, self.topologies, self.aggregates, *(values for _, values in self.params))
        keys = [key for key, _ in self.params]
        cells = []
        for combo in itertools.product(*axes):
            bs, defence, attack, seed, peers, fanout, topology, aggregate = combo[:8]
            cells.append(Cell(bs, defence, attack, seed, peers, fanout, topology, aggregate,
                              params=tuple(zip(keys, combo[8:], strict=True))))
        return cells

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as sweep.yaml holds it (itself a valid `--config` file)."""
        base = self.base.to_dict()
        for section, names in CELL_FIELDS.items():
            for name in names:
                (base[section] if section else base).pop(name)
        axes = {name: list(getattr(self, name)) for name in SPEC_AXES}
        params = {PARAM_AXIS + key: list(values) for key, values in self.params}
        return {**axes, **params, "base": base}


def make_spec(raw: dict[str, Any], base: RunConfig) -> SweepSpec:
    """Normalise and check the axes (missing ones default to the base config's values)."""
    values: dict[str, Any] = {}
    for name, default in SPEC_AXES.items():
        value = raw.get(name)
        if value is None:
            value = _get(base, default)
            value = [value] if name == "seeds" else value  # base seed: one seed, not a count
        values[name] = value
    seeds = values["seeds"]
    if isinstance(seeds, int) or (isinstance(seeds, str) and "," not in seeds):
        count = _ints("seeds", seeds)[0]
        if count < 1:
            raise ConfigError(f"seeds as a count must be >= 1, got {count}")
        seeds = list(range(count))
    spec = SweepSpec(
        batch_sizes=_ints("batch_sizes", values["batch_sizes"]),
        defences=tuple(dict.fromkeys(_defence(d) for d in _names("defences", values["defences"]))),
        attacks=_names("attacks", values["attacks"]), seeds=_ints("seeds", seeds),
        peers=_ints("peers", values["peers"]), fanouts=_ints("fanouts", values["fanouts"]),
        topologies=_names("topologies", values["topologies"]), base=base,
        aggregates=tuple(dict.fromkeys(_aggregate(a) for a in _names("aggregates", values["aggregates"]))),
        params=param_axes(raw),
    )
    cells = spec.cells()
    for cell in cells:  # every cell must be a valid run before anything starts
        check_attackable(cell.config(base, Path(".")).validate())
    if len({c.cell_id for c in cells}) != len(cells):
        raise ConfigError("two cells would share a cell_id; rename an axis value")
    return spec


def param_axes(raw: dict[str, Any]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The `attack.params.NAME.FIELD` axes of a sweep mapping: (("NAME.FIELD", values), ...).

    Values are a list or a comma string (read as `gradleak run --attack-param` reads one);
    whether NAME and FIELD exist and the values fit is checked with every cell's config."""
    out = []
    for key, value in raw.items():
        if not key.startswith(PARAM_AXIS):
            continue
        name, dot, field = key[len(PARAM_AXIS):].partition(".")
        if not (name and dot and field) or "." in field:
            raise ConfigError(f"sweep axis '{key}' must be {PARAM_AXIS}NAME.FIELD")
        items = _items(key, value)
        values = [parse_scalar(x) if isinstance(value, str) else x for x in items]
        out.append((f"{name}.{field}", tuple(dict.fromkeys(values))))
    return tuple(out)


def _get(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _items(name: str, value: Any) -> list[Any]:
    items = [x.strip() for x in value.split(",")] if isinstance(value, str) else value
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    if not items or any(x == "" for x in items):
        raise ConfigError(f"{name} must be a non-empty list, got {value!r}")
    return items


def _ints(name: str, value: Any) -> tuple[int, ...]:
    out = []
    for x in _items(name, value):
        if isinstance(x, bool) or not isinstance(x, (int, str)) or not str(x).lstrip("-").isdigit():
            raise ConfigError(f"{name} must be integers, got {x!r}")
        out.append(int(x))
    return tuple(dict.fromkeys(out))


def _names(name: str, value: Any) -> tuple[str, ...]:
    items = _items(name, value)
    if not all(isinstance(x, str) for x in items):
        raise ConfigError(f"{name} must be names, got {value!r}")
    return tuple(dict.fromkeys(items))


SECAGG = "secagg"  # a sweep defence step: all peers of the cell form one masking group


def split_secagg(spec: str) -> tuple[str, bool]:
    """('prune:0.3', True) for 'prune:0.3+secagg': secure aggregation is a run-level
    switch (--secagg on), the rest an ordinary defence chain ('none' when empty)."""
    steps = [s.strip() for s in spec.split("+")]
    rest = [s for s in steps if s != SECAGG]
    return ("+".join(rest) or "none"), len(rest) < len(steps)


def _defence(spec: str) -> str:
    from p2p.defences import parse_defence

    rest, secagg = split_secagg(spec)
    try:
        name = parse_defence(rest).name
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not secagg:
        return name
    return SECAGG if name == "none" else f"{name}+{SECAGG}"


def _aggregate(spec: str) -> str:
    from p2p.aggregate import parse_aggregate

    try:
        return parse_aggregate(spec).name
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def defence_params(spec: str) -> dict[str, Any]:
    from p2p.defences import parse_defence

    rest, _secagg = split_secagg(spec)
    return dict(getattr(parse_defence(rest), "params", {}))


def load_spec(root: str | Path) -> SweepSpec:
    """The sweep a store holds (DIR/sweep.yaml)."""
    raw = read_yaml(Path(root) / SPEC_FILE)
    return make_spec(raw, from_dict(raw.get("base") or {}))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file; ConfigError (one line) if missing or malformed."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping")
    return raw


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cell_dir(root: Path, cell_id: str) -> Path:
    return Path(root) / CELLS_DIR / cell_id


def is_done(root: Path, cell_id: str) -> bool:
    return (cell_dir(root, cell_id) / CELL_FILE).is_file()


def write_cell(root: Path, record: dict[str, Any]) -> Path:
    """Commit a finished cell: its cell.json, atomically (this is what makes it done)."""
    path = cell_dir(root, record["cell_id"]) / CELL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def reset_cell(root: Path, cell_id: str) -> bool:
    """Delete what an unfinished cell left behind; a done cell is never touched.

    Returns True if something was deleted.
    """
    path = cell_dir(root, cell_id)
    if is_done(root, cell_id) or not path.exists():
        return False
    shutil.rmtree(path)
    return True


def running_targets(root: Path, cell_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The union of the Prometheus file_sd groups the given cells' testbeds wrote."""
    groups: list[dict[str, Any]] = []
    for cell_id in cell_ids:
        for path in sorted(cell_dir(root, cell_id).glob(f"*/{TARGETS_FILE}")):
            with contextlib.suppress(OSError, ValueError):  # mid-write: read on the next pass
                groups += json.loads(path.read_text())
    return groups


class StoreError(ValueError):
    """A store that cannot be read; the message is one line and names the file."""


# Keys every cell.json has; the report groups and labels cells by them.
REQUIRED = ("cell_id", "attack", "batch_size", "defence")


def scan_cells(root: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every done cell's cell.json (sorted by cell_id) and how many cell folders are not done.

    Raises:
        StoreError: `root` is not a directory, or a cell.json is unreadable, not a JSON
            object, or lacks a REQUIRED key.
    """
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"no store at {root}")
    base = root / CELLS_DIR
    folders = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    cells = [_read_cell(f / CELL_FILE) for f in folders if (f / CELL_FILE).is_file()]
    return sorted(cells, key=lambda c: str(c["cell_id"])), len(folders) - len(cells)


def _read_cell(path: Path) -> dict[str, Any]:
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"unreadable {path}: {exc}") from None
    if not isinstance(cell, dict):
        raise StoreError(f"{path} is not a JSON object")
    missing = [k for k in REQUIRED if k not in cell]
    if missing:
        raise StoreError(f"{path} lacks {', '.join(missing)}")
    return cell


def load_cells(root: str | Path) -> list[dict[str, Any]]:
    """Every done cell's cell.json, sorted by cell_id (StoreError as `scan_cells`)."""
    return scan_cells(root)[0]


def run_dir(root: str | Path, cell: dict[str, Any]) -> Path | None:
    """The cell's Testbed run dir, or None for a cell that records none."""
    return Path(root) / str(cell["run_dir"]) if cell.get("run_dir") else None


def cell_reconstructions(root: str | Path, cell: dict[str, Any]) -> list[dict[str, Any]]:
    """A done cell's reconstruction rows ([] without a reconstructions.jsonl).

    Raises:
        StoreError: the file is unreadable or a line is not a JSON object.
    """
    folder = run_dir(root, cell)
    path = folder / RECONSTRUCTIONS_FILE if folder else None
    if path is None or not path.is_file():
        return []  # a cell without any reconstruction
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise StoreError(f"unreadable {path}: {exc}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise StoreError(f"{path} has a line that is not a JSON object")
    return rows


def load_reconstructions(root: str | Path) -> list[dict[str, Any]]:
    """Reconstruction rows of every done cell, each extended with its cell's axes."""
    return [{**{k: cell.get(k) for k in ROW_AXES}, **row}
            for cell in load_cells(root) for row in cell_reconstructions(root, cell)]


def write_tables(root: str | Path) -> tuple[Path, Path]:
    """Write DIR/cells.csv and DIR/reconstructions.csv from the done cells."""
    root = Path(root)
    cells_csv = root / "cells.csv"
    rows_csv = root / "reconstructions.csv"
    _write_csv(cells_csv, load_cells(root), CELL_COLUMNS)
    _write_csv(rows_csv, load_reconstructions(root), RECONSTRUCTION_COLUMNS)
    return cells_csv, rows_csv


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], first: Sequence[str]) -> None:
    columns = _columns(rows, first)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    os.replace(tmp, path)


def _columns(rows: Iterable[dict[str, Any]], first: Sequence[str]) -> list[str]:
    """The known columns in order, then any further keys in first-seen order."""
    columns = list(first)
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""  # an empty field reads as missing (NaN in pandas)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def leakage(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A cell's leakage figures from its reconstruction rows (per-image PSNR / SSIM)."""
    psnrs = [float(p) for r in rows for p in r.get("psnr") or [] if p is not None]
    ssims = [float(q) for r in rows for q in r.get("ssim") or [] if q is not None]
    labels = [r["label_accuracy"] for r in rows if r.get("label_accuracy") is not None]
    return {
        "reconstructions": len(rows),
        "mean_psnr": _mean(psnrs),
        "best_psnr": max(psnrs) if psnrs else None,
        "share_psnr_30": _mean([float(p >= 30.0) for p in psnrs]),
        "mean_ssim": _mean(ssims),
        "label_accuracy": _mean(labels),
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None
