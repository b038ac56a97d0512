"""The analysis figures (:func:`diffusion.analysis.analyze`) as PNG and SVG files, one panel per series side by side:

- ``flip_rate_vs_t_skip``: sweep: flip rate against t_skip, a line per eta, 95% band (dashed: the judge);
- ``distance_vs_t_skip``: sweep: mean distance (LPIPS, else L2) of the edits against t_skip, a line per eta;
- ``tradeoff``: sweep: flip rate (the judge's when there is one) against mean distance, one point per (eta, t_skip),
  both intervals as bars;
- ``t_skip_histogram``: searched runs: how often each t_skip was chosen (dark: flipped);
- ``distance_histogram``: searched runs: the distances of the chosen edits (dark: flipped);
- ``series``: several searched series: flip rate and mean distance per series, with intervals.

matplotlib's ``Figure`` is used without pyplot (no global state, Agg for PNG); SVGs carry no date and fixed ids, so
the same analysis gives the same bytes (:func:`diffusion.views.gallery.write_views` is idempotent).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from diffusion.analysis import ALL
from diffusion.files import atomic_save

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")
PANEL = (4.2, 3.2)  # inches per panel
DPI = 150
Analysis = Dict[str, object]
SeriesData = Dict[str, object]


# --------------------------------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------------------------------
def _grid(n_directions: int, n_series: int, title: str):
    """(figure, axes[direction][series]) with shared axes, sized per panel: a row per direction and a column per
    series, or the directions side by side when there is one series (a compact figure for one run)."""
    from matplotlib.figure import Figure

    n_rows, n_cols = (1, n_directions) if n_series == 1 else (n_directions, n_series)
    fig = Figure(figsize=(max(6.0, PANEL[0] * n_cols), PANEL[1] * n_rows + 0.6), layout="constrained")
    grid = fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False)
    fig.suptitle(title, fontsize=11)
    axes = [[grid[0][d]] for d in range(n_directions)] if n_series == 1 else [list(row) for row in grid]
    return fig, axes


def _save(fig, out_dir: Path, name: str) -> Dict[str, str]:
    """Write ``name.png`` and ``name.svg`` atomically; returns {format: path}."""
    import matplotlib

    paths = {}
    with matplotlib.rc_context({"svg.hashsalt": "diffusion-figures", "svg.fonttype": "path"}):
        for fmt in FORMATS:
            path = out_dir / f"{name}.{fmt}"
            metadata = {"Date": None} if fmt == "svg" else None
            atomic_save(path, lambda tmp, fmt=fmt, metadata=metadata: fig.savefig(
                tmp, format=fmt, dpi=DPI, metadata=metadata))
            paths[fmt] = str(path)
    return paths


def _eta_colours(etas: Sequence[float]) -> Dict[float, Tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["plasma"]  # ordered like eta, and its ends stay apart from each other and from white
    ordered = sorted(set(etas))
    return {e: cmap(0.8 * (k / max(1, len(ordered) - 1))) for k, e in enumerate(ordered)}


def _directions(series: Sequence[SeriesData], table: str) -> List[str]:
    """The direction groups the series have, "all" first."""
    seen: List[str] = []
    for s in series:
        names = [c["direction"] for c in s[table]] if table == "sweep" else list(s[table])  # type: ignore[union-attr]
        for d in names:
            if d not in seen:
                seen.append(d)
    return [ALL] + [d for d in seen if d != ALL] if ALL in seen else seen


def _distance(series: Sequence[SeriesData]) -> Tuple[str, str]:
    """(column, axis label): LPIPS when every series measured it, else pixel L2."""
    if series and all(s["distance"] == "lpips" for s in series):
        return "lpips", "LPIPS"
    return "l2", "L2 (pixel RMS, [0, 1] images)"


def _label_panels(axes, series: Sequence[SeriesData], directions: Sequence[str], xlabel: str, ylabel: str) -> None:
    for r, direction in enumerate(directions):
        for c, s in enumerate(series):
            ax = axes[r][c]
            where = "all directions" if direction == ALL else direction.replace("->", " to ")
            ax.set_title(where if len(series) == 1 else f"{s['label']}, {where}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if ax.get_subplotspec().is_last_row():
                ax.set_xlabel(xlabel, fontsize=9)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel(ylabel, fontsize=9)


def _integer_counts(fig) -> None:
    """Whole-number ticks on the count axis of a histogram."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _cells(s: SeriesData, direction: str, eta: float) -> List[Dict[str, object]]:
    cells = [c for c in s["sweep"] if c["direction"] == direction and c["eta"] == eta]  # type: ignore[union-attr]
    return sorted(cells, key=lambda c: c["t_skip"])  # type: ignore[arg-type,return-value]


def _band(ax, xs, values, cis, colour, dashed: bool = False, label: Optional[str] = None) -> None:
    pts = [(x, v, ci) for x, v, ci in zip(xs, values, cis) if v is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    ax.plot(x, [p[1] for p in pts], marker="o", markersize=3, linewidth=1.4, color=colour,
            linestyle="--" if dashed else "-", label=label)
    with_ci = [p for p in pts if p[2]]
    if with_ci and not dashed:
        ax.fill_between([p[0] for p in with_ci], [p[2][0] for p in with_ci], [p[2][1] for p in with_ci],
                        color=colour, alpha=0.18, linewidth=0)


# --------------------------------------------------------------------------------------------------------------------
# Sweep figures
# --------------------------------------------------------------------------------------------------------------------
def _sweep_lines(series: Sequence[SeriesData], title: str, ylabel: str,
                 value: Callable[[str], Tuple[str, str]], judge: bool) -> object:
    """A panel per (direction, series): a line per eta of ``value(prefix)`` = (value key, interval key) vs t_skip."""
    directions = _directions(series, "sweep")
    etas = sorted({c["eta"] for s in series for c in s["sweep"]})  # type: ignore[union-attr]
    colours = _eta_colours(etas)
    fig, axes = _grid(len(directions), len(series), title)
    for r, direction in enumerate(directions):
        for col, s in enumerate(series):
            ax = axes[r][col]
            for eta in etas:
                cells = _cells(s, direction, eta)
                xs = [c["t_skip"] for c in cells]
                key, ci = value("")
                _band(ax, xs, [c[key] for c in cells], [c[ci] for c in cells], colours[eta], label=f"eta {eta:g}")
                if judge:
                    key, ci = value("judge_")
                    _band(ax, xs, [c[key] for c in cells], [c[ci] for c in cells], colours[eta], dashed=True)
    _label_panels(axes, series, directions, "t_skip (fraction of steps skipped; 1 = no edit)", ylabel)
    axes[0][0].legend(fontsize=8, loc="best")
    return fig


def flip_rate_figure(series: Sequence[SeriesData]):
    judge = any(c["judge_flip_rate"] is not None for s in series for c in s["sweep"])  # type: ignore[union-attr]
    fig = _sweep_lines(series, "Flip rate against t_skip" +
                       (" (solid: oracle, dashed: judge)" if judge else " (oracle)"), "flip rate",
                       lambda p: (f"{p}flip_rate", f"{p}flip_rate_ci"), judge)
    for row in fig.axes:
        row.set_ylim(-0.03, 1.03)
    return fig


def distance_figure(series: Sequence[SeriesData]):
    column, label = _distance(series)
    return _sweep_lines(series, f"Mean {label.split(' ')[0]} of the edits against t_skip",
                        f"mean {label}", lambda p: (f"{column}_mean_all", f"{column}_mean_all_ci"), False)


def tradeoff_figure(series: Sequence[SeriesData]):
    """Flip rate against mean distance over direction "all": a point per (eta, t_skip), a line joining one eta's.
    The flip rate is the judge's where the runs have one (the verdict independent of the search), else the oracle's;
    the axis says which."""
    column, label = _distance(series)
    etas = sorted({c["eta"] for s in series for c in s["sweep"]})  # type: ignore[union-attr]
    colours = _eta_colours(etas)
    judged = any(c["judge_flip_rate"] is not None for s in series for c in s["sweep"])  # type: ignore[union-attr]
    rate, who = ("judge_flip_rate", "judge") if judged else ("flip_rate", "oracle")
    fig, axes = _grid(1, len(series), f"Flip rate ({who}) against change, a point per (eta, t_skip):\n"
                                      "up and to the left is better")
    for col, s in enumerate(series):
        ax = axes[0][col]
        for eta in etas:
            cells = [c for c in _cells(s, ALL, eta) if c[f"{column}_mean_all"] is not None and c[rate] is not None]
            if not cells:
                continue
            xs = [c[f"{column}_mean_all"] for c in cells]
            ys = [c[rate] for c in cells]
            xerr = [[x - (c[f"{column}_mean_all_ci"] or (x, x))[0] for x, c in zip(xs, cells)],
                    [(c[f"{column}_mean_all_ci"] or (x, x))[1] - x for x, c in zip(xs, cells)]]
            yerr = [[y - (c[f"{rate}_ci"] or (y, y))[0] for y, c in zip(ys, cells)],
                    [(c[f"{rate}_ci"] or (y, y))[1] - y for y, c in zip(ys, cells)]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, color=colours[eta], marker="o", markersize=3.5, linewidth=1,
                        elinewidth=0.7, capsize=1.5, label=f"eta {eta:g}")
            for x, y, c in zip(xs, ys, cells):
                ax.annotate(f"{c['t_skip']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=colours[eta])
        ax.set_ylim(-0.03, 1.03)
    _label_panels(axes, series, [ALL], f"mean {label} of the edits (labels: t_skip)", f"flip rate ({who})")
    axes[0][0].legend(fontsize=8, loc="lower right")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Searched-run figures
# --------------------------------------------------------------------------------------------------------------------
def t_skip_histogram_figure(series: Sequence[SeriesData]):
    directions = _directions(series, "searched")
    fig, axes = _grid(len(directions), len(series), "Chosen t_skip (light: every edit; dark: flipped)")
    t_values = sorted({b["t_skip"] for s in series for t in s["searched"].values()  # type: ignore[union-attr]
                       for b in t["t_skip"]}, reverse=True)
    position = {t: k for k, t in enumerate(t_values)}
    for r, direction in enumerate(directions):
        for col, s in enumerate(series):
            ax = axes[r][col]
            bins = s["searched"].get(direction, {}).get("t_skip", [])  # type: ignore[union-attr]
            xs = [position[b["t_skip"]] for b in bins]
            ax.bar(xs, [b["n"] for b in bins], color="#f3c6a8", width=0.8)
            ax.bar(xs, [b["n_flipped"] for b in bins], color="#d66220", width=0.8)
    for ax in fig.axes:
        ax.set_xticks(range(len(t_values)), [f"{t:g}" for t in t_values], fontsize=7,
                      rotation=90 if len(t_values) > 8 else 0)
    _label_panels(axes, series, directions, "chosen t_skip (mildest first)", "edits")
    _integer_counts(fig)
    return fig


def distance_histogram_figure(series: Sequence[SeriesData]):
    column, label = _distance(series)
    directions = _directions(series, "searched")
    fig, axes = _grid(len(directions), len(series), f"{label.split(' ')[0]} of the chosen edits "
                                                    "(light: every edit; dark: flipped)")
    values = [v for s in series for t in s["searched"].values()  # type: ignore[union-attr]
              for v in t["distance"][column]["values"]]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    bins = [lo + (hi - lo) * k / 20 for k in range(21)] if hi > lo else 10
    for r, direction in enumerate(directions):
        for col, s in enumerate(series):
            table = s["searched"].get(direction)  # type: ignore[union-attr]
            if not table:
                continue
            ax = axes[r][col]
            every, flipped = table["distance"][column]["values"], table["distance"][f"{column}_flipped"]["values"]
            if every:
                ax.hist(every, bins=bins, color="#f3c6a8")
            if flipped:
                ax.hist(flipped, bins=bins, color="#d66220")
    _label_panels(axes, series, directions, label, "edits")
    _integer_counts(fig)
    return fig


def series_figure(series: Sequence[SeriesData]):
    """Flip rate (oracle, judge) and mean distance of the flipped edits per series, with intervals."""
    from matplotlib.figure import Figure

    column, label = _distance(series)
    fig = Figure(figsize=(max(6.0, 1.1 * len(series) + 3), 3.4), layout="constrained")
    rate_ax, dist_ax = fig.subplots(1, 2)
    xs = list(range(len(series)))
    for prefix, colour, name in (("", "#d66220", "oracle"), ("judge_", "#1a5fb4", "judge")):
        pts = [(x, s["summary"][f"{prefix}flip_rate"], s["summary"][f"{prefix}flip_rate_ci"])
               for x, s in zip(xs, series) if s["summary"][f"{prefix}flip_rate"] is not None]
        if pts:
            rate_ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                             yerr=[[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]],
                             marker="o", color=colour, capsize=3, label=name)
    rate_ax.set_ylim(-0.03, 1.03)
    rate_ax.set_ylabel("flip rate")
    rate_ax.legend(fontsize=8)
    pts = [(x, s["summary"][f"{column}_mean"], s["summary"][f"{column}_mean_ci"]) for x, s in zip(xs, series)
           if s["summary"][f"{column}_mean"] is not None]
    if pts:
        dist_ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                         yerr=[[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]], marker="o",
                         color="#444444", capsize=3)
    dist_ax.set_ylabel(f"mean {label.split(' ')[0]} (flipped edits)")
    for ax in (rate_ax, dist_ax):
        ax.set_xticks(xs, [str(s["label"]) for s in series], fontsize=8, rotation=30 if len(series) > 4 else 0)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Per series (95% intervals)", fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------------------------------
CAPTIONS = {
    "flip_rate_vs_t_skip": "Flip rate (edits the classifier calls the target class, over every attempted edit) "
                           "against t_skip, a line per eta; shaded: 95% interval.",
    "distance_vs_t_skip": "How much the edits change the image against t_skip, a line per eta; shaded: 95% "
                          "bootstrap interval over images.",
    "tradeoff": "The flip/identity trade-off: each point one (eta, t_skip) setting, its flip rate (the judge's where "
                "the run has one) against the mean change of its edits; bars: 95% intervals; labels: t_skip.",
    "t_skip_histogram": "How often each t_skip was chosen by the search (dark: edits that flipped).",
    "distance_histogram": "The change of each chosen edit (dark: edits that flipped).",
    "series": "Flip rate and mean change of the flipped edits per series, with 95% intervals.",
}


def write_figures(analysis: Analysis, out_dir: str | Path) -> List[Dict[str, str]]:
    """Every figure that the analysis has data for, as ``out_dir/<name>.png`` and ``.svg``. Returns, in display
    order, {"name", "caption", "width_px", "png", "svg"} per figure written ([] when there is nothing to plot)."""
    out_dir = Path(out_dir)
    series: List[SeriesData] = list(analysis["series"])  # type: ignore[arg-type]
    sweeps = [s for s in series if s["sweep"]]
    searched = [s for s in series if s["searched"]]
    makers: List[Tuple[str, Sequence[SeriesData], Callable]] = []
    if sweeps:
        makers += [("flip_rate_vs_t_skip", sweeps, flip_rate_figure), ("distance_vs_t_skip", sweeps, distance_figure)]
        if any(c["flip_rate"] is not None or c["judge_flip_rate"] is not None
               for s in sweeps for c in s["sweep"]):  # type: ignore[union-attr]
            makers.append(("tradeoff", sweeps, tradeoff_figure))
    if searched:
        makers += [("t_skip_histogram", searched, t_skip_histogram_figure),
                   ("distance_histogram", searched, distance_histogram_figure)]
        if len(searched) > 1:
            makers.append(("series", searched, series_figure))
    written = []
    for name, subset, make in makers:
        fig = make(subset)
        paths = _save(fig, out_dir, name)
        width_px = round(float(fig.get_size_inches()[0]) * 96)  # the SVG's own width in CSS pixels
        written.append({"name": name, "caption": CAPTIONS[name], "width_px": width_px, **paths})
    if written:
        log.info("figures: %s (%s)", out_dir, ", ".join(w["name"] for w in written))
    return written


FIGURES_DIR = "figures"  # in a run folder: the figures, figures.json and figures.csv


def write_run_figures(run_dir: str | Path, rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """The figures of one run folder from its rows, into ``run_dir/figures/`` with ``figures.json`` (every figure,
    nested) and ``figures.csv`` (one per line) beside them. Returns :func:`write_figures`'s list with the paths
    relative to ``run_dir`` (for the gallery)."""
    from diffusion.analysis import Series, analyze, figure_records, write_records_csv
    from diffusion.files import atomic_write_json

    run_dir = Path(run_dir)
    out = run_dir / FIGURES_DIR
    # labelled "run", not by the folder's name: a copied or moved folder gives the same files
    analysis = analyze([Series("run", [str(run_dir)], list(rows))])
    analysis["series"][0]["runs"] = ["."]  # type: ignore[index]  # the folder can move: no absolute path inside
    written = write_figures(analysis, out)
    for name in set(CAPTIONS) - {w["name"] for w in written}:  # figures of an earlier render this data no longer has
        for fmt in FORMATS:
            (out / f"{name}.{fmt}").unlink(missing_ok=True)
    atomic_write_json(out / "figures.json", analysis)
    write_records_csv(out / "figures.csv", figure_records(analysis))
    return [{**w, **{fmt: Path(w[fmt]).relative_to(run_dir).as_posix() for fmt in FORMATS}} for w in written]
