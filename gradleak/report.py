"""`gradleak report DIR`: figures and a Markdown summary of a sweep store.

Reads the store through `gradleak.store` (only done cells: a cell folder without a
cell.json is still running or failed and is ignored), plus each run dir's grid.png.
Writes, under --out (default DIR/report): one leakage heatmap per attack,
privacy_utility.png, attacker_view.png (when the store holds more than one network
shape), composed reconstruction grids per attack, and summary.md, whose claims table
is computed from the cells by `gradleak.report_claims`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradleak.report_claims import (
    ACCURACY_COST_MIN,
    PAPER_ATTACK,
    PSNR_CLOSE_DB,
    PSNR_THRESHOLD_DB,
    SHARE_NEAR_ZERO,
    ClaimResult,
    Finding,
    check_claims,
    defence_order,
    group_cells,
)
from gradleak.store import (
    CELL_FILE,
    CELLS_DIR,
    StoreError,
    cell_reconstructions,
    leakage,
    run_dir,
    scan_cells,
)

GRID = "grid.png"
SUMMARY = "summary.md"
SHAPE = ("peers", "fanout", "topology")  # a cell's network shape
SETTINGS = ("attack", "batch_size", "defence", "seed", "peers", "fanout", "topology")
CELL_COLUMNS = (
    "cell_id", "attack", "batch_size", "defence", "seed", "reconstructions", "mean_psnr",
    "best_psnr", "share_psnr_30", "mean_ssim", "label_accuracy", "honest_accuracy",
    "captured", "dropped", "seconds", "nodes",
)


# ------------------------------------------------------------------ the store


def load_done_cells(store: Path) -> tuple[list[dict[str, Any]], int]:
    """The done cells' rows (sorted by cell id) and how many cells are not done.

    Each row gets `best_psnr` (the best single image among its reconstructions), `grid`
    (its grid.png path, or None) and `nodes` (where its peers and attacker ran, node ids cut
    to 8; None for cells stored before the sweep recorded them). Where the sweep varies
    parameters of the row's own attack, `attack` becomes that variant (`idlg (lr=0.5)`, see
    `attack_variant`) and `attack_name` keeps the registry name, so the claims, heatmaps,
    pooled tables and grids keep the variants apart instead of pooling them as one attack.

    Raises:
        StoreError: DIR is missing, has no done cell, or one of its files is unreadable.
    """
    rows, incomplete = scan_cells(store)
    if not rows:
        raise StoreError(f"no done cells in {store} (no {CELLS_DIR}/*/{CELL_FILE})")
    for row in rows:
        row["best_psnr"] = leakage(cell_reconstructions(store, row))["best_psnr"]
        row["attack_name"] = row["attack"]
        row["attack"] = attack_variant(row)
        folder = run_dir(store, row)
        row["grid"] = folder / GRID if folder and (folder / GRID).is_file() else None
        if row.get("attacker_node"):
            row["nodes"] = (f"peers {' '.join(n[:8] for n in row.get('peer_nodes') or [])}, "
                            f"attacker {row['attacker_node'][:8]}")
    return rows, incomplete


def attack_variant(row: Mapping[str, Any]) -> str:
    """The row's attack with the values of its own swept parameters: `idlg (lr=0.5)`.

    `attack_params` holds the cell's parameter axes ({"idlg.lr": 0.5, "ig.tv": 0.1});
    only the row's own attack's fields count (an idlg axis leaves an analytic cell as
    `analytic`: its runs do not differ).
    """
    attack = str(row["attack"])
    params = row.get("attack_params") or {}
    own = sorted((str(k).split(".", 1)[1], v) for k, v in params.items()
                 if str(k).startswith(f"{attack}.") and "." in str(k))
    return f"{attack} ({', '.join(f'{name}={value}' for name, value in own)})" if own else attack


# ------------------------------------------------------------------ the report


def write_report(store: Path, out: Path | None = None) -> list[Path]:
    """Write the figures and summary.md; return the paths written (summary last).

    Raises:
        StoreError: as `load_done_cells`; nothing is written then.
    """
    from gradleak.report_figures import attacker_view_plot, grid_pages, heatmap, privacy_utility

    rows, incomplete = load_done_cells(store)
    out = out if out is not None else store / "report"
    out.mkdir(parents=True, exist_ok=True)
    compared = compared_rows(rows)[0]
    groups = group_cells(compared)
    attacks = sorted({str(r["attack"]) for r in compared})
    figures: list[tuple[str, Path]] = []
    for attack in attacks:
        mine = [g for g in groups.values() if g.attack == attack]
        path = heatmap(out / f"heatmap_{_safe(attack)}.png", mine, attack)
        figures.append((f"Leakage of {attack}", path))
    path = privacy_utility(out / "privacy_utility.png", groups, attacks)
    figures.append(("Privacy / utility", path))
    view = attacker_view(rows)
    if len({row[1:4] for row in view}) > 1:  # one network shape: the table says it all
        path = attacker_view_plot(out / "attacker_view.png", view)
        figures.append(("The attacker's view by number of peers, fanout and topology", path))
    for attack in sorted({str(r["attack"]) for r in rows}):
        cells = [(str(r["cell_id"]), r["grid"]) for r in _display_order(rows)
                 if r["attack"] == attack and r["grid"]]
        for n, page in enumerate(grid_pages(out, f"grids_{_safe(attack)}", cells), start=1):
            caption = f"Reconstructions of {attack} (truth above reconstruction), page {n}"
            figures.append((caption, page))
    results, findings = check_claims(compared)
    summary = out / SUMMARY
    text = render_summary(store.resolve().name, rows, incomplete, figures, results, findings, out)
    summary.write_text(text)
    return [p for _, p in figures] + [summary]


def compared_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]],
                                                               tuple[Any, ...] | None]:
    """The cells the claims, heatmaps and pooled leakage compare, and their network shape.

    With several (peers, fanout, topology) in the store, only the shape with the most cells
    (ties: the first in sorted order) is compared: pooling a defence measured at 4 peers
    with 'none' measured at 4 and 8 would mix the network's effect into the defence's.
    The shape is None when the store holds one.
    """
    counts = Counter(_shape(r) for r in rows)
    if len(counts) < 2:
        return list(rows), None
    main = max(sorted(counts, key=str), key=counts.__getitem__)
    return [r for r in rows if _shape(r) == main], main


def _shape(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in SHAPE)


def _setting(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in ("attack", "batch_size", "defence", "seed"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _display_order(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(rows, key=lambda r: (str(r["attack"]), defence_order(str(r["defence"])),
                                       int(r["batch_size"]), str(r.get("seed")), str(r["cell_id"])))


def render_summary(name: str, rows: Sequence[Mapping[str, Any]], incomplete: int,
                   figures: Sequence[tuple[str, Path]], results: Sequence[ClaimResult],
                   findings: Sequence[Finding], out: Path) -> str:
    """The Markdown summary; a pure function of its inputs (no clock, no absolute paths)."""
    lines = [f"# gradleak report: {name}", "", "## Settings", ""]
    lines.append(f"- done cells: {len(rows)} (ignored {incomplete} not done)")
    lines.append(f"- reconstructions: {sum(int(r.get('reconstructions') or 0) for r in rows)}")
    for key in SETTINGS:
        values = sorted({r[key] for r in rows if r.get(key) is not None}, key=_axis_key(key))
        if values:
            lines.append(f"- {key}: {', '.join(f'`{v}`' for v in values)}")
    compared, shape = compared_rows(rows)
    if shape is not None:
        lines.append(f"- compared (claims, heatmaps, privacy/utility, pooled leakage): the "
                     f"{len(compared)} cells of peers `{shape[0]}`, fanout `{shape[1]}`, "
                     f"topology `{shape[2]}`; the attacker's view and the cells table use all")
    lines += ["", "## Claims of the DLG paper, checked", "", _rules(), ""]
    lines += _table(("#", "claim", "attack", "measured", "verdict"),
                    [(r.number, r.claim, r.attack, r.measured, f"**{r.verdict}**")
                     for r in results])
    lines += ["", "## Findings", ""]
    lines += [f"- {f.text()}" for f in findings] or [
        "- no stronger attack broke a defence the paper counts as sufficient."]
    lines += ["", "## Figures", ""]
    for caption, path in figures:
        rel = path.relative_to(out).as_posix() if path.is_relative_to(out) else path.name
        lines += [f"### {caption}", "", f"[{rel}]({rel})", "", f"![{caption}]({rel})", ""]
    lines += ["## Leakage pooled over seeds", ""]
    groups = sorted(group_cells(compared).values(),
                    key=lambda g: (g.attack, defence_order(g.defence), g.batch_size))
    lines += _table(("attack", "batch_size", "defence", "cells", "reconstructions", "mean_psnr",
                     "share_psnr_30", "honest_accuracy"),
                    [(g.attack, g.batch_size, g.defence, g.cells, g.reconstructions, g.mean_psnr,
                      g.share_psnr_30, g.honest_accuracy) for g in groups])
    lines += ["", "## The attacker's view", "",
              ("Share of all updates sent that reached the malicious peer, and its leakage, by "
               "network shape, pooled over the settings (attack, batch size, defence, seed) measured "
               "at every shape, so that shapes are compared on like cells."), ""]
    lines += _table(("attack", "peers", "fanout", "topology", "cells", "attacker_share",
                     "reconstructions", "mean_psnr"), attacker_view(rows))
    lines += ["", "## Cells", ""]
    lines += _table(CELL_COLUMNS,
                    [tuple(r.get(c) for c in CELL_COLUMNS) for r in _display_order(rows)])
    return "\n".join(lines) + "\n"


def attacker_view(rows: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Per (attack, peers, fanout, topology): cells, mean attacker_share, reconstructions,
    mean PSNR weighted by each cell's reconstructions.

    Only the (attack, batch size, defence, seed) settings measured at every network shape
    count: a shape swept with every defence would otherwise be compared, through its
    defended cells, with a shape swept with 'none' alone.
    """
    rows = list(rows)
    by_shape: dict[tuple[Any, ...], set[tuple[Any, ...]]] = {}
    for r in rows:
        by_shape.setdefault(_shape(r), set()).add(_setting(r))
    common = set.intersection(*by_shape.values()) if by_shape else set()
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in (r for r in rows if _setting(r) in common):
        key = (r["attack"], r.get("peers"), r.get("fanout"), r.get("topology"))
        groups.setdefault(key, []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        cells = groups[key]
        shares = [float(c["attacker_share"]) for c in cells if c.get("attacker_share") is not None]
        n = sum(int(c.get("reconstructions") or 0) for c in cells)
        weighted = [(float(c["mean_psnr"]), int(c.get("reconstructions") or 0)) for c in cells
                    if c.get("mean_psnr") is not None and c.get("reconstructions")]
        psnr = sum(p * w for p, w in weighted) / sum(w for _, w in weighted) if weighted else None
        out.append((*key, len(cells), sum(shares) / len(shares) if shares else None, n, psnr))
    return out


def _rules() -> str:
    return (f"Claims are about the paper's attack (`{PAPER_ATTACK}`); the other attacks in the "
            f"store are checked against the same claims. A defence *defends* when the mean PSNR "
            f"is below {PSNR_THRESHOLD_DB:g} dB and at most {SHARE_NEAR_ZERO:.0%} of "
            f"reconstructions reach {PSNR_THRESHOLD_DB:g} dB; fp16 *does not defend* when its "
            f"mean PSNR is within {PSNR_CLOSE_DB:g} dB of `none` (or above); a defence *costs "
            f"accuracy* when the honest accuracy is more than {ACCURACY_COST_MIN:g} below `none` "
            f"at the same batch size. Cells of one setting are pooled over seeds.")


def _axis_key(key: str) -> Any:
    if key == "defence":
        return lambda v: defence_order(str(v))
    return lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v))


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(_fmt(v, h) for v, h in zip(row, head)) + " |" for row in rows)]


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if column.endswith("psnr") else f"{value:.3f}"
    return str(value).replace("|", "\\|")


# ------------------------------------------------------------------ command line


def add_report_parser(subparsers: Any) -> None:
    """Add `report DIR [--out OUT]` to the `gradleak` subcommands."""
    p = subparsers.add_parser("report", help="figures and a Markdown summary of a sweep store")
    p.add_argument("dir", help="the sweep store (holds cells/<cell_id>/cell.json)")
    p.add_argument("--out", default=None, help="folder for the report (default DIR/report)")


def run_report_command(args: argparse.Namespace) -> int:
    """Run `gradleak report`; bad input prints one line and returns 2."""
    try:
        paths = write_report(Path(args.dir), Path(args.out) if args.out else None)
    except StoreError as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {paths[-1]} and {len(paths) - 1} figures")
    return 0
