"""The figures of one editing run or several, read from their results.csv: what scripts/analyze_results.py prints and
saves, and what the gallery plots.

- A **sweep** run (``search: sweep``: every t_skip x eta kept) gives one cell per (direction, eta, t_skip): the
  oracle's and the judge's flip rates over the attempted rows, and the mean LPIPS and L2 of all its edits and of the
  flipped ones.
- A **searched** run (first_flip, bisect, fixed) gives per direction the distribution of the chosen t_skip, of the
  distances of the chosen edits and of the UNet evaluations per image.
- Several runs are **series** side by side; ``by`` (a dotted key of each run's config.yaml, e.g. ``lora.step``)
  names and orders them, and pools runs that share a value.

Every rate and mean carries a 95% interval (:mod:`diffusion.metrics`: Wilson where each image has one row in the
figure, else a seeded bootstrap over images; each figure says which). Data only: the plots are
:mod:`diffusion.views.figures`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from diffusion.edit.results import fmt
from diffusion.errors import ConfigError
from diffusion.files import atomic_write_text
from diffusion.metrics import (
    INTERVALS_NOTE, as_number, attempted, evals_per_image, flip_figures, is_already_target, is_flip, load_run_rows,
    mean_interval, rate_interval, run_settings, summarize,
)
from diffusion.stats import as_list, bootstrap_mean_interval

log = logging.getLogger(__name__)

Row = Dict[str, str]
ALL = "all"  # the direction label of a figure over every direction
SWEEP = "sweep"


@dataclass
class Series:
    """The rows of one run, or of the runs sharing one value of the ``by`` key, under one label."""

    label: str
    run_dirs: List[str]
    rows: List[Row]

    @property
    def search(self) -> str:
        """The rows' search mode ("sweep", "first_flip", ...), '+'-joined when the pooled runs differ."""
        modes = sorted({r.get("search") or "?" for r in self.rows})
        return "+".join(modes) or "?"


# --------------------------------------------------------------------------------------------------------------------
# Runs and series
# --------------------------------------------------------------------------------------------------------------------
def run_config(run_dir: str | Path) -> Dict[str, object]:
    """A run folder's config.yaml as plain data; {} when it has none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path)) or {}  # type: ignore[return-value]


def config_value(config: Dict[str, object], dotted: str) -> object:
    """``config["a"]["b"]`` for ``"a.b"``. Raises KeyError naming the first missing part."""
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(part)
        node = node[part]
    return node


def _order(value: object) -> Tuple[int, float, str]:
    """Sort key of ``by`` values: null first, then numbers in numeric order, then text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def load_series(run_dirs: Sequence[str | Path], by: Optional[str] = None) -> List[Series]:
    """One series per run folder (labelled by the folder name, or its path when two names clash), or with ``by``
    one per distinct value of that config key, in its order (runs sharing a value are pooled: their rows together).

    Raises:
        FileNotFoundError: a folder holds no results.
        ArtefactError: a results file is damaged (missing columns, malformed row).
        ConfigError: ``by`` is not a key of some run's config.yaml.
    """
    runs = [(str(d), load_run_rows(d)) for d in run_dirs]
    if by is None:
        names = [Path(d).resolve().name for d, _ in runs]
        return [Series(name if names.count(name) == 1 else d, [d], rows) for name, (d, rows) in zip(names, runs)]
    groups: Dict[str, Tuple[object, List[str], List[Row]]] = {}
    for d, rows in runs:
        config = run_config(d)
        try:
            value = config_value(config, by)
        except KeyError as err:
            where = f"{d}/config.yaml" if config else f"{d} (it has no config.yaml)"
            raise ConfigError(f"--by {by}: {where} has no key '{err.args[0]}'; give a dotted key of the runs' "
                              f"config.yaml, e.g. lora.step or eta", key=by) from None
        label = f"{by}={value if not isinstance(value, list) else ','.join(map(str, value))}"
        entry = groups.setdefault(label, (value, [], []))
        entry[1].append(d)
        entry[2].extend(rows)
    series = []
    for label, (value, dirs, rows) in sorted(groups.items(), key=lambda kv: _order(kv[1][0])):
        if len(dirs) > 1:
            log.info("series %s pools %d runs: %s", label, len(dirs), ", ".join(dirs))
        series.append(Series(label, dirs, rows))
    return series


# --------------------------------------------------------------------------------------------------------------------
# Figures of a sweep
# --------------------------------------------------------------------------------------------------------------------
def direction_of(row: Row) -> str:
    return f"{row['source_class']}->{row['target_class']}"


def direction_groups(rows: Sequence[Row]) -> Dict[str, List[Row]]:
    """{"all": rows, and per direction when there are several: "a->b": its rows}."""
    groups: Dict[str, List[Row]] = {ALL: list(rows)}
    directions = sorted({direction_of(r) for r in rows})
    if len(directions) > 1:
        for d in directions:
            groups[d] = [r for r in rows if direction_of(r) == d]
    return groups


def distance_figures(rows: Sequence[Row]) -> Dict[str, object]:
    """Mean LPIPS and L2 (with bootstrap intervals over images) of every edit in ``rows`` (``*_mean_all``) and of the
    flipped ones (``*_mean``, the summary's convention)."""
    tried = attempted(rows)
    flips = [r for r in tried if is_flip(r)]
    out: Dict[str, object] = {}
    for column in ("lpips", "l2"):
        out[f"{column}_mean_all"], out[f"{column}_mean_all_ci"] = mean_interval(tried, column)
        out[f"{column}_mean"], out[f"{column}_mean_ci"] = mean_interval(flips, column)
    return out


def sweep_cells(rows: Sequence[Row]) -> List[Dict[str, object]]:
    """One cell per (direction, eta, t_skip) of a sweep: counts, flip rates (oracle, judge) and distances with their
    intervals. Directions: "all", then each one when there are several. Ordered by direction, eta, mildest t_skip
    first. Rows without a t_skip (already the target: not attempted) belong to no cell."""
    cells = []
    for direction, group in direction_groups(rows).items():
        by_setting: Dict[Tuple[float, float], List[Row]] = {}
        for r in group:
            t, eta = as_number(r.get("t_skip")), as_number(r.get("eta"))
            if t is None or eta is None or is_already_target(r):
                continue
            by_setting.setdefault((eta, t), []).append(r)
        for (eta, t), cell_rows in sorted(by_setting.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            cell: Dict[str, object] = {"direction": direction, "eta": eta, "t_skip": t,
                                       "n_images": len({r["source_path"] for r in cell_rows})}
            cell.update(flip_figures(cell_rows))
            cell.update(distance_figures(cell_rows))
            cells.append(cell)
    return cells


# --------------------------------------------------------------------------------------------------------------------
# Figures of a searched run
# --------------------------------------------------------------------------------------------------------------------
def distribution(values: Sequence[Optional[float]], mean_ci: Optional[List[float]] = None) -> Dict[str, object]:
    """n, mean with its bootstrap interval (``mean_ci``, else a bootstrap of ``values`` in their order, one value per
    image), min, quartiles, max and the sorted values (for histograms); the statistics are None without values."""
    given = [v for v in values if v is not None and math.isfinite(v)]
    vals = sorted(given)
    if not vals:
        return {"n": 0, "mean": None, "mean_ci": None, "min": None, "q25": None, "median": None, "q75": None,
                "max": None, "values": []}
    q = np.quantile(np.asarray(vals, dtype=np.float64), [0.25, 0.5, 0.75])
    ci = mean_ci if mean_ci is not None else as_list(bootstrap_mean_interval(given))
    return {"n": len(vals), "mean": float(np.mean(given)), "mean_ci": ci,
            "min": vals[0], "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2]), "max": vals[-1],
            "values": vals}


def t_skip_distribution(rows: Sequence[Row]) -> List[Dict[str, object]]:
    """The chosen t_skip of the attempted rows: per t_skip (mildest first) the edits, the flipped ones, and the share
    of edits with its 95% interval (``share_interval``: wilson or bootstrap, as :func:`rate_interval`)."""
    tried = [r for r in attempted(rows) if as_number(r.get("t_skip")) is not None]
    values = sorted({as_number(r["t_skip"]) for r in tried}, reverse=True)  # type: ignore[type-var]
    out = []
    for t in values:
        at = [r for r in tried if as_number(r["t_skip"]) == t]
        ci, kind = rate_interval(tried, lambda r, t=t: as_number(r["t_skip"]) == t)
        out.append({"t_skip": t, "n": len(at), "n_flipped": sum(is_flip(r) for r in at),
                    "share": len(at) / len(tried), "share_ci": ci, "share_interval": kind})
    return out


def searched_tables(rows: Sequence[Row]) -> Dict[str, Dict[str, object]]:
    """Per direction group ("all", then each direction when several): ``t_skip`` (:func:`t_skip_distribution`),
    ``distance`` (LPIPS and L2 of the chosen edits: ``lpips``, ``l2`` over every attempted row with an edit,
    ``lpips_flipped``, ``l2_flipped``, each a :func:`distribution`) and ``unet_evals`` (per image)."""
    out = {}
    for direction, group in direction_groups(rows).items():
        tried = attempted(group)
        flips = [r for r in tried if is_flip(r)]
        distance = {}
        for column in ("lpips", "l2"):  # intervals over images, as the summary's (an image may have several rows)
            distance[column] = distribution([as_number(r.get(column)) for r in tried], mean_interval(tried, column)[1])
            distance[f"{column}_flipped"] = distribution([as_number(r.get(column)) for r in flips],
                                                         mean_interval(flips, column)[1])
        out[direction] = {"n_attempted": len(tried), **flip_figures(tried), "t_skip": t_skip_distribution(group),
                          "distance": distance, "unet_evals": distribution(list(evals_per_image(group).values()))}
    return out


# --------------------------------------------------------------------------------------------------------------------
# The whole analysis
# --------------------------------------------------------------------------------------------------------------------
def distance_column(rows: Sequence[Row]) -> str:
    """"lpips" when the rows measured it, else "l2" (pixel RMS, always measured)."""
    return "lpips" if any(as_number(r.get("lpips")) is not None for r in rows) else "l2"


def analyze(series: Sequence[Series], by: Optional[str] = None) -> Dict[str, object]:
    """Every figure of every series: {"intervals", "by", "series": [{"label", "runs", "search", "settings",
    "distance", "summary", "sweep" (cells, for sweep rows) or None, "searched" (tables, for the others) or None}]}.
    JSON-ready (no NaN)."""
    out = []
    for s in series:
        sweep_rows = [r for r in s.rows if r.get("search") == SWEEP]
        searched_rows = [r for r in s.rows if r.get("search") != SWEEP]
        settings = sorted({run_settings(d) for d in s.run_dirs} - {""})
        out.append({
            "label": s.label, "runs": list(s.run_dirs), "search": s.search, "settings": "; ".join(settings),
            "distance": distance_column(s.rows), "summary": summarize(s.rows),
            "sweep": sweep_cells(sweep_rows) if sweep_rows else None,
            "searched": searched_tables(searched_rows) if searched_rows else None,
        })
    return {"intervals": INTERVALS_NOTE, "by": by, "series": out}


# --------------------------------------------------------------------------------------------------------------------
# Flat records (CSV) and markdown
# --------------------------------------------------------------------------------------------------------------------
RECORD_COLUMNS = ("series", "figure", "direction", "eta", "t_skip", "statistic", "value", "ci_low", "ci_high", "n",
                  "interval")


def _record(series: str, figure: str, direction: str, statistic: str, value: object, ci: object = None,
            n: object = None, interval: Optional[str] = None, eta: object = None,
            t_skip: object = None) -> Dict[str, object]:
    lo, hi = ci if ci else (None, None)  # type: ignore[misc]
    return {"series": series, "figure": figure, "direction": direction, "eta": eta, "t_skip": t_skip,
            "statistic": statistic, "value": value, "ci_low": lo, "ci_high": hi, "n": n, "interval": interval}


def _mean_kind(ci: object) -> Optional[str]:
    return "bootstrap" if ci else None


def figure_records(analysis: Dict[str, object]) -> List[Dict[str, object]]:
    """Every figure of :func:`analyze` as one flat record (columns :data:`RECORD_COLUMNS`), for a CSV file.
    ``interval`` is wilson or bootstrap (over images); empty where there is no interval (counts, quantiles)."""
    records: List[Dict[str, object]] = []
    for s in analysis["series"]:  # type: ignore[union-attr]
        label = s["label"]
        summary = s["summary"]
        groups = {ALL: summary, **summary["per_direction"]} if len(summary["per_direction"]) > 1 else {ALL: summary}
        for direction, g in groups.items():
            n = g.get("n_attempted")
            for prefix in ("", "judge_"):
                if g.get(f"{prefix}flip_rate") is not None:
                    records.append(_record(label, "summary", direction, f"{prefix}flip_rate", g[f"{prefix}flip_rate"],
                                           g[f"{prefix}flip_rate_ci"], n, "wilson"))
            for stat in ("lpips_mean", "l2_mean", "t_skip_mean", "t_skip_mean_flipped"):
                if g.get(stat) is not None:
                    records.append(_record(label, "summary", direction, stat, g[stat], g.get(f"{stat}_ci"),
                                           interval=_mean_kind(g.get(f"{stat}_ci"))))
        for stat in ("l2_mean_all", "unet_evals_per_image", "seconds_per_image"):
            if summary.get(stat) is not None:
                records.append(_record(label, "summary", ALL, stat, summary[stat], summary.get(f"{stat}_ci"),
                                       interval=_mean_kind(summary.get(f"{stat}_ci"))))
        for cell in s["sweep"] or []:
            where = {"eta": cell["eta"], "t_skip": cell["t_skip"]}
            for prefix in ("", "judge_"):
                if cell[f"{prefix}flip_rate"] is not None:
                    records.append(_record(label, "sweep", cell["direction"], f"{prefix}flip_rate",
                                           cell[f"{prefix}flip_rate"], cell[f"{prefix}flip_rate_ci"],
                                           cell["n_attempted"], cell["flip_rate_interval"], **where))
            for stat in ("lpips_mean_all", "l2_mean_all", "lpips_mean", "l2_mean"):
                if cell[stat] is not None:
                    records.append(_record(label, "sweep", cell["direction"], stat, cell[stat], cell[f"{stat}_ci"],
                                           interval="bootstrap", **where))
        for direction, table in (s["searched"] or {}).items():
            for b in table["t_skip"]:
                records.append(_record(label, "chosen_t_skip", direction, "share", b["share"], b["share_ci"],
                                       b["n"], b["share_interval"], t_skip=b["t_skip"]))
                records.append(_record(label, "chosen_t_skip", direction, "n_flipped", b["n_flipped"],
                                       t_skip=b["t_skip"]))
            dists = [(f"distance_{k}", d) for k, d in table["distance"].items()] + [("unet_evals", table["unet_evals"])]
            for figure, d in dists:
                if not d["n"]:
                    continue
                records.append(_record(label, figure, direction, "mean", d["mean"], d["mean_ci"], d["n"],
                                       "bootstrap"))
                for stat in ("min", "q25", "median", "q75", "max"):
                    records.append(_record(label, figure, direction, stat, d[stat], n=d["n"]))
    return records


def write_records_csv(path: str | Path, records: Sequence[Dict[str, object]]) -> Path:
    """:func:`figure_records` as a CSV file (columns :data:`RECORD_COLUMNS`; numbers with 6 significant digits, None
    as empty), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RECORD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: fmt(v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def _num(value: object, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_ci(value: object, ci: object, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    text = f"{scale * value:.{digits}f}{suffix}"  # type: ignore[operator]
    return text + (f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]" if ci else "")  # type: ignore[index]


def _rate_cell(cell: Dict[str, object], prefix: str = "") -> str:
    rate = cell.get(f"{prefix}flip_rate")
    if rate is None:
        return "-"
    ci = cell.get(f"{prefix}flip_rate_ci")
    return (f"{100 * rate:.1f}% ({cell[f'n_{prefix}flipped']}/{cell['n_attempted']})"  # type: ignore[operator]
            + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))  # type: ignore[index]


def sweep_markdown(label: str, cells: Sequence[Dict[str, object]]) -> str:
    """A markdown table of a sweep series, a row per (direction, eta, t_skip)."""
    lines = [f"### {label}: sweep (flip rate and distances per setting)", "",
             "| direction | eta | t_skip | images | flip rate | judge flip rate | interval | LPIPS (all) | L2 (all) | "
             "L2 (flipped) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for c in cells:
        lines.append(f"| {c['direction']} | {c['eta']:g} | {c['t_skip']:g} | {c['n_images']} | {_rate_cell(c)} | "
                     f"{_rate_cell(c, 'judge_')} | {c['flip_rate_interval'] or '-'} | "
                     f"{_with_ci(c['lpips_mean_all'], c['lpips_mean_all_ci'], 4)} | "
                     f"{_with_ci(c['l2_mean_all'], c['l2_mean_all_ci'], 4)} | "
                     f"{_with_ci(c['l2_mean'], c['l2_mean_ci'], 4)} |")
    return "\n".join(lines)


def searched_markdown(label: str, tables: Dict[str, Dict[str, object]]) -> str:
    """Markdown tables of a searched series: the chosen t_skip, and the distance / UNet evaluation distributions."""
    lines = [f"### {label}: chosen t_skip", "", "| direction | t_skip | edits | flipped | share of edits | interval |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for direction, table in tables.items():
        for b in table["t_skip"]:  # type: ignore[union-attr]
            lines.append(f"| {direction} | {b['t_skip']:g} | {b['n']} | {b['n_flipped']} | "
                         f"{_with_ci(b['share'], b['share_ci'], 1, 100, '%')} | {b['share_interval']} |")
    lines += ["", f"### {label}: distances of the chosen edits, UNet evaluations per image", "",
              "| direction | figure | n | mean [95% bootstrap] | min | q25 | median | q75 | max |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for direction, table in tables.items():
        dists = [(f"{k} (chosen edits)" if not k.endswith("_flipped") else f"{k[:-8]} (flipped)", d, 4)
                 for k, d in table["distance"].items()] + [("UNet evals / image", table["unet_evals"], 1)]  # type: ignore[union-attr]
        for name, d, digits in dists:
            if not d["n"]:
                continue
            lines.append(f"| {direction} | {name} | {d['n']} | {_with_ci(d['mean'], d['mean_ci'], digits)} | " +
                         " | ".join(_num(d[k], digits) for k in ("min", "q25", "median", "q75", "max")) + " |")
    return "\n".join(lines)


def markdown_report(analysis: Dict[str, object]) -> str:
    """The comparison table (a row per series), then each series' sweep or searched tables, then how the intervals
    were computed and which classifier judged the flips."""
    from diffusion.metrics import comparison_table

    series = analysis["series"]  # type: ignore[assignment]
    parts = [comparison_table([(s["label"], s["summary"], s["settings"]) for s in series])]  # type: ignore[index]
    for s in series:  # type: ignore[union-attr]
        if s["sweep"]:
            parts.append(sweep_markdown(s["label"], s["sweep"]))
        if s["searched"]:
            parts.append(searched_markdown(s["label"], s["searched"]))
    notes = sorted({f"{s['label']}: {s['summary']['note']}" for s in series if s["summary"].get("note")})  # type: ignore[index]
    parts.append("\n".join([f"Intervals: {analysis['intervals']}"] + [f"Verdicts: {n}" for n in notes]))
    return "\n\n".join(parts)
