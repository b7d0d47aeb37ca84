"""The report's PNG figures: leakage heatmaps, privacy/utility, the attacker's view by
network shape, reconstruction grids.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no GUI
backend, no global state), so reports render the same on a headless machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from gradleak.report_claims import (
    PSNR_THRESHOLD_DB,
    Group,
    Key,
    defence_family,
    defence_order,
    defence_strength,
)

GRIDS_PER_PAGE = 24  # cells per composed grid image: keeps each PNG readable
GRID_COLUMNS = 2
CAPTION_PX = 16
DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    # No Software/date metadata: the same store gives byte-identical files.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def _matrix(groups: Sequence[Group], value: str, xs: list[int], ys: list[str]) -> np.ndarray:
    m = np.full((len(ys), len(xs)), np.nan)  # (defences, batch sizes)
    for g in groups:
        v = getattr(g, value)
        if v is not None:
            m[ys.index(g.defence), xs.index(g.batch_size)] = v
    return m


def _heat_panel(fig: Figure, ax: Axes, m: np.ndarray, xs: list[int], ys: list[str],
                title: str, fmt: str, vmin: float, vmax: float, cmap: str) -> None:
    colours = colormaps[cmap].with_extremes(bad="#dddddd")  # grey: setting not in the store
    im = ax.imshow(np.ma.masked_invalid(m), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel("batch size")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(m):
        text = "-" if math.isnan(v) else fmt.format(v)
        dark = not math.isnan(v) and (v - vmin) / max(vmax - vmin, 1e-9) < 0.5
        colour = "white" if dark else "black"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(im, ax=ax, shrink=0.8)


def heatmap(path: Path, groups: Sequence[Group], attack: str) -> Path:
    """Mean PSNR and share >= 30 dB of one attack, batch size (x) by defence (y)."""
    xs = sorted({g.batch_size for g in groups})
    ys = sorted({g.defence for g in groups}, key=defence_order)
    psnr = _matrix(groups, "mean_psnr", xs, ys)
    share = _matrix(groups, "share_psnr_30", xs, ys)
    finite = psnr[~np.isnan(psnr)]
    hi = max(float(finite.max()) if finite.size else 0.0, PSNR_THRESHOLD_DB + 10)
    fig = Figure(figsize=(4 + 1.6 * len(xs), 1.5 + 0.45 * len(ys)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    _heat_panel(fig, left, psnr, xs, ys, f"{attack}: mean PSNR (dB)", "{:.1f}", 0.0, hi, "magma")
    _heat_panel(fig, right, share, xs, ys, f"{attack}: share >= {PSNR_THRESHOLD_DB:g} dB",
                "{:.0%}", 0.0, 1.0, "magma")
    right.set_ylabel("")
    left.set_ylabel("defence")
    return _save(fig, path)


def privacy_utility(path: Path, groups: Mapping[Key, Group], attacks: Sequence[str]) -> Path:
    """Mean PSNR against honest accuracy, one panel per attack, one series per defence family.

    Within a family of several strengths, points of one batch size are joined in order of
    strength, so a line traces what a stronger defence buys in privacy and costs in
    accuracy; a family of one strength joins its batch sizes instead.
    """
    fig = Figure(figsize=(1 + 5 * len(attacks), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(attacks), sharey=True, squeeze=False)[0])
    families = sorted({defence_family(g.defence) for g in groups.values()},
                      key=lambda f: (f != "none", f))
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    markers = "osD^vP*Xh<>"
    for ax, attack in zip(axes, attacks):
        mine = [g for g in groups.values() if g.attack == attack
                and g.mean_psnr is not None and g.honest_accuracy is not None]
        for k, family in enumerate(families):
            pts = sorted((g for g in mine if defence_family(g.defence) == family),
                         key=lambda g: (g.batch_size, defence_order(g.defence)))
            if not pts:
                continue
            style = {"color": colours[family], "marker": markers[k % len(markers)]}
            # One strength (or none): join the batch sizes; several: join strengths per batch.
            many = len({defence_strength(g.defence) for g in pts}) > 1
            lines = [[g for g in pts if g.batch_size == b]
                     for b in sorted({g.batch_size for g in pts})] if many else [pts]
            for n, line in enumerate(lines):
                ax.plot([g.honest_accuracy for g in line], [g.mean_psnr for g in line],
                        linestyle="-", linewidth=1, label=family if n == 0 else None, **style)
            for g in pts:
                s = defence_strength(g.defence)
                label = f"b{g.batch_size}" + ("" if s is None else f" {s:g}")
                ax.annotate(label, (g.honest_accuracy or 0.0, g.mean_psnr or 0.0), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        ax.axhline(PSNR_THRESHOLD_DB, color="red", linestyle="--", linewidth=1)
        ax.text(0.01, PSNR_THRESHOLD_DB, f" {PSNR_THRESHOLD_DB:g} dB: leaked above",
                color="red", fontsize=8, va="bottom", transform=ax.get_yaxis_transform())
        ax.set_title(f"{attack}: leakage vs utility")
        ax.set_xlabel("honest model accuracy")
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=8, title="defence", title_fontsize=8)
    axes[0].set_ylabel("mean PSNR of reconstructions (dB)")
    return _save(fig, path)


def grid_pages(out: Path, stem: str, cells: Sequence[tuple[str, Path]]) -> list[Path]:
    """Compose each cell's grid.png, captioned with its cell id, into a few pages.

    Args:
        out: folder for the pages.
        stem: file name stem; pages are `{stem}.png` or `{stem}_2.png`, ...
        cells: (caption, grid.png path) in display order.
    """
    pages = [cells[i:i + GRIDS_PER_PAGE] for i in range(0, len(cells), GRIDS_PER_PAGE)]
    paths = []
    for n, page in enumerate(pages, start=1):
        path = out / (f"{stem}.png" if n == 1 else f"{stem}_{n}.png")
        _compose(path, page)
        paths.append(path)
    return paths


def _compose(path: Path, cells: Sequence[tuple[str, Path]]) -> None:
    images: list[tuple[str, Image.Image]] = []
    for caption, grid in cells:
        with Image.open(grid) as opened:
            images.append((caption, opened.convert("RGB")))
    font = ImageFont.load_default()
    widest = max(max(im.width, math.ceil(font.getlength(c))) for c, im in images)
    w, h = widest + 8, max(im.height for _, im in images) + CAPTION_PX + 8
    cols = min(GRID_COLUMNS, len(images))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (caption, im) in enumerate(images):
        x, y = (i % cols) * w + 4, (i // cols) * h + 4
        draw.text((x, y), caption, fill="black", font=font)
        canvas.paste(im, (x, y + CAPTION_PX))
    canvas.save(path)


def attacker_view_plot(path: Path, view: Sequence[Sequence[Any]]) -> Path:
    """The attacker's share of all updates (left) and its mean PSNR (right) against the
    number of honest peers, one line per (attack, fanout, topology).

    Args:
        view: rows of `gradleak.report.attacker_view`: (attack, peers, fanout, topology,
            cells, attacker_share, reconstructions, mean_psnr).
    """
    series: dict[tuple[str, ...], list[Sequence[Any]]] = {}
    for row in view:
        if row[1] is not None:
            series.setdefault((str(row[0]), str(row[2]), str(row[3])), []).append(row)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    share_ax, psnr_ax = fig.subplots(1, 2, sharex=True)
    markers = "osD^vP*Xh<>"
    for k, ((attack, fanout, topology), rows) in enumerate(sorted(series.items())):
        rows = sorted(rows, key=lambda r: int(r[1]))
        # Attacks share one network, so their share lines coincide: shrinking markers
        # keep every series visible where they overlap.
        style = {"color": f"C{k % 10}", "marker": markers[k % len(markers)],
                 "markersize": 9 - 2 * (k % 3), "label": f"{attack}, fanout {fanout}, {topology}"}
        for ax, column in ((share_ax, 5), (psnr_ax, 7)):
            points = [(int(r[1]), float(r[column])) for r in rows if r[column] is not None]
            if points:
                ax.plot(*zip(*points), linestyle="-", linewidth=1, **style)
    peers = sorted({int(r[1]) for rows in series.values() for r in rows})
    for ax in (share_ax, psnr_ax):
        ax.set_xscale("log", base=2)  # peers grow by doubling; keep the points evenly apart
        ax.set_xticks(peers, [str(p) for p in peers])
        ax.minorticks_off()
        ax.set_xlabel("honest peers")
        ax.grid(alpha=0.3)
    share_ax.set_ylim(bottom=0)
    share_ax.set_ylabel("share of all updates the attacker received")
    share_ax.set_title("attacker's view")
    psnr_ax.axhline(PSNR_THRESHOLD_DB, color="red", linestyle="--", linewidth=1)
    psnr_ax.set_ylabel("mean PSNR of reconstructions (dB)")
    psnr_ax.set_title("attacker's leakage")
    psnr_ax.legend(fontsize=8)
    return _save(fig, path)
