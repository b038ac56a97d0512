"""Metrics of an editing run: LPIPS and pixel L2 per edit, the run summary, and a table comparing runs.

Definitions (docs/method.md, "Metrics"):
- flip rate = flipped / ALL attempted (image, direction, eta) rows, overall and per direction; an unflipped image
  counts in the denominator (dividing by the flipped images only would always give 100%);
- LPIPS (AlexNet, inputs in [-1, 1]) and pixel L2 between the original (as the model saw it) and the chosen edit,
  averaged over flipped rows;
- the distribution of the chosen t_skip (all rows, and flipped rows only), UNet evaluations and seconds per image;
- every rate and mean with a 95% interval: Wilson over the attempted rows for the summary's flip rates, a seeded
  bootstrap over images (all rows of a drawn image together) for means, and for rates where an image has several
  rows (:func:`rate_interval` says which it used). The judge's flip rate (an evaluation-only classifier, the
  ``judge_*`` columns) sits beside the oracle's, which chose the edit and so is not an independent measure.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from diffusion.config import SEARCHES
from diffusion.errors import LpipsError
from diffusion.stats import (
    DEFAULT_RESAMPLES, DEFAULT_SEED, as_list, bootstrap_mean_interval, wilson_interval,
)

log = logging.getLogger(__name__)


class Lpips:
    """LPIPS distance of image pairs in [0, 1], one network per run (the ``lpips`` package, AlexNet backbone).

    ``random_backbone`` uses an untrained AlexNet (offline tests only: the numbers mean nothing).
    """

    def __init__(self, device: torch.device | str = "cpu", random_backbone: bool = False):
        import lpips

        try:
            self.net = lpips.LPIPS(net="alex", pnet_rand=random_backbone, verbose=False).to(device).eval()
        except Exception as err:  # torchvision raises URLError/RuntimeError when the download is impossible
            raise LpipsError(
                f"LPIPS could not load torchvision's AlexNet ImageNet weights ({type(err).__name__}: {err}). They "
                "download once into the torch hub cache ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth); "
                "offline, copy that file there, or set lpips: false (pixel L2 is still reported)."
            ) from err
        self.net.requires_grad_(False)
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] twice -> (B,) distances."""
        a = a.to(self.device, torch.float32) * 2 - 1
        b = b.to(self.device, torch.float32) * 2 - 1
        return self.net(a, b).flatten().float().cpu()


def pixel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference per image of (B, 3, H, W) tensors in [0, 1] -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt().cpu()


def as_number(value: object) -> Optional[float]:
    """A CSV cell as a finite float; None when empty, not a number, or not finite (summaries hold no NaN)."""
    try:
        number = float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(np.asarray(vals, dtype=np.float64))) if vals else None


# --------------------------------------------------------------------------------------------------------------------
# Intervals (95%): Wilson for rates over independent rows, a bootstrap over images for everything else
# --------------------------------------------------------------------------------------------------------------------
INTERVALS_NOTE = (f"95% intervals. flip rates: Wilson score interval over the attempted rows (the *_interval field "
                  f"says 'bootstrap' where one image has several rows in a figure, as rows of one image are not "
                  f"independent). means: percentile bootstrap over images ({DEFAULT_RESAMPLES} resamples, seed "
                  f"{DEFAULT_SEED}; every row of a drawn image goes in together).")


def bootstrap_over_images(rows: Sequence[Dict[str, str]], value: Callable[[Dict[str, str]], Optional[float]],
                          resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                          level: float = 0.95) -> Optional[List[float]]:
    """Percentile bootstrap interval of the mean of ``value(row)`` over ``rows`` (rows giving None left out), drawing
    whole images (``source_path``) with replacement: each resample's statistic is the pooled mean of the values of
    the drawn images. None when no row has a value; one image gives the degenerate [v, v].

    The same estimator as :func:`diffusion.stats.bootstrap_grouped` with a pooled mean, vectorised (a sweep has
    hundreds of figures); with one value per image it draws exactly as :func:`diffusion.stats.bootstrap_mean_interval`.
    """
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for r in rows:
        v = value(r)
        if v is None:
            continue
        sums[r["source_path"]] = sums.get(r["source_path"], 0.0) + v
        counts[r["source_path"]] = counts.get(r["source_path"], 0) + 1
    if not counts:
        return None
    s = np.asarray([sums[k] for k in counts], dtype=np.float64)
    n = np.asarray([counts[k] for k in counts], dtype=np.float64)
    if s.size == 1:
        return [float(s[0] / n[0])] * 2
    rng = np.random.default_rng(seed)
    # (R, images) draws at once while small (the same draws as bootstrap_mean_interval), in blocks for large runs
    block = max(1, min(resamples, 20_000_000 // s.size))
    stats = np.empty(resamples)
    for start in range(0, resamples, block):
        picked = rng.integers(0, s.size, size=(min(block, resamples - start), s.size))
        stats[start:start + picked.shape[0]] = s[picked].sum(axis=1) / n[picked].sum(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def rate_interval(rows: Sequence[Dict[str, str]], success: Callable[[Dict[str, str]], bool]) -> Tuple[
        Optional[List[float]], Optional[str]]:
    """95% interval of the share of ``rows`` for which ``success`` holds, and its kind: ``"wilson"`` when every image
    has at most one row here (independent rows), else ``"bootstrap"`` over images. (None, None) for no rows."""
    if not rows:
        return None, None
    if len({r["source_path"] for r in rows}) == len(rows):
        return as_list(wilson_interval(sum(bool(success(r)) for r in rows), len(rows))), "wilson"
    return bootstrap_over_images(rows, lambda r: 1.0 if success(r) else 0.0), "bootstrap"


def mean_interval(rows: Sequence[Dict[str, str]], column: str) -> Tuple[Optional[float], Optional[List[float]]]:
    """(mean, 95% bootstrap-over-images interval) of a numeric column over ``rows``; (None, None) when empty."""
    values = [as_number(r.get(column)) for r in rows]
    return _mean(values), bootstrap_over_images(rows, lambda r: as_number(r.get(column)))


# --------------------------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------------------------
def _judged(rows: Sequence[Dict[str, str]]) -> bool:
    """Whether an oracle judged the rows (a run without one leaves ``flipped`` empty)."""
    return any(r.get("flipped") not in (None, "") for r in rows)


def _judge_judged(rows: Sequence[Dict[str, str]]) -> bool:
    """Whether the evaluation-only judge gave a verdict on any row (its columns are empty without judge_dir)."""
    return any(r.get("judge_flipped") not in (None, "") for r in rows)


def is_flip(row: Dict[str, str]) -> bool:
    """The oracle's verdict: the edit reached the target class (never for an already-target row)."""
    return row.get("flipped") == "1" and not is_already_target(row)


def is_judge_flip(row: Dict[str, str]) -> bool:
    """The independent judge's verdict on the edit: never for an already-target row, nor for the strongest attempt
    a search keeps when no t_skip met the criterion (no counterfactual; results.csv rows written before the run
    said so themselves may still carry judge_flipped 1 there, so the rule is applied on reading too)."""
    if row.get("judge_flipped") != "1" or is_already_target(row):
        return False
    return not (row.get("search") in SEARCHES and row.get("flipped") != "1")


def is_already_target(row: Dict[str, str]) -> bool:
    """The oracle already assigned the original to the target class: not searched, never a flip, not attempted."""
    return row.get("already_target") == "1"


def attempted(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """The rows that were really edited towards their target (every row but the already-target ones)."""
    return [r for r in rows if not is_already_target(r)]


def flip_rate(rows: Sequence[Dict[str, str]]) -> Optional[float]:
    """Flipped rows / ALL attempted rows; None when no oracle judged them. A row left without a verdict in a judged
    run counts as not flipped: it was attempted. Already-target rows are not attempted edits (counted apart)."""
    tried = attempted(rows)
    if not tried or not _judged(tried):
        return None
    return sum(is_flip(r) for r in tried) / len(tried)


def judge_flip_rate(rows: Sequence[Dict[str, str]]) -> Optional[float]:
    """The judge's flips / ALL attempted rows (as :func:`flip_rate`); None when the judge gave no verdict."""
    tried = attempted(rows)
    if not tried or not _judge_judged(tried):
        return None
    return sum(is_judge_flip(r) for r in tried) / len(tried)


def flip_figures(rows: Sequence[Dict[str, str]], wilson_only: bool = False) -> Dict[str, object]:
    """The oracle's and the judge's flip rates over the attempted ``rows`` with their 95% intervals (None where no
    verdict): ``flip_rate``, ``flip_rate_ci``, ``n_flipped``, ``judge_flip_rate``, ``judge_flip_rate_ci``,
    ``n_judge_flipped`` and ``flip_rate_interval`` (which interval: wilson or bootstrap). ``wilson_only`` forces
    the Wilson interval over rows (the run summary's contract)."""
    tried = attempted(rows)
    out: Dict[str, object] = {"n_attempted": len(tried), "n_flipped": sum(is_flip(r) for r in tried),
                              "n_judge_flipped": sum(is_judge_flip(r) for r in tried)}
    for prefix, rate, success in (("", flip_rate(tried), is_flip), ("judge_", judge_flip_rate(tried), is_judge_flip)):
        ci, kind = (None, None)
        if rate is not None:
            if wilson_only:
                ci, kind = as_list(wilson_interval(sum(success(r) for r in tried), len(tried))), "wilson"
            else:
                ci, kind = rate_interval(tried, success)
        out[f"{prefix}flip_rate"] = rate
        out[f"{prefix}flip_rate_ci"] = ci
        if not prefix:
            out["flip_rate_interval"] = kind
    return out


def t_skip_histogram(rows: Iterable[Dict[str, str]]) -> Dict[str, int]:
    """{t_skip: rows}, mildest t_skip (largest) first; rows without a t_skip (already the target) left out."""
    counts = Counter(float(r["t_skip"]) for r in rows if r.get("t_skip") not in (None, ""))
    return {f"{t:g}": counts[t] for t in sorted(counts, reverse=True)}


def evals_per_image(rows: Sequence[Dict[str, str]]) -> Dict[str, float]:
    """{image: UNet evaluations}: each image's inversion once, plus the sampling of every row (eta, target) it has."""
    inversion: Dict[str, float] = {}
    sampling: Dict[str, float] = {}
    for r in rows:
        inv = as_number(r.get("inversion_evals")) or 0.0
        inversion[r["source_path"]] = inv
        sampling[r["source_path"]] = sampling.get(r["source_path"], 0.0) + (as_number(r.get("unet_evals")) or 0.0) - inv
    return {k: inversion[k] + sampling[k] for k in inversion}


def _evals_per_image(rows: List[Dict[str, str]]) -> Optional[float]:
    per_image = evals_per_image(rows)
    return sum(per_image.values()) / len(per_image) if per_image else None


def _per_image_mean(values: Dict[str, float]) -> Tuple[Optional[float], Optional[List[float]]]:
    """(mean, bootstrap interval) of one value per image."""
    vals = list(values.values())
    return (_mean(vals), as_list(bootstrap_mean_interval(vals)))


def _group_summary(rows: List[Dict[str, str]]) -> Dict[str, object]:
    flips = [r for r in rows if is_flip(r)]
    out: Dict[str, object] = {"n": len(rows), "n_already_target": sum(is_already_target(r) for r in rows)}
    out.update(flip_figures(rows, wilson_only=True))
    for column in ("lpips", "l2"):
        out[f"{column}_mean"], out[f"{column}_mean_ci"] = mean_interval(flips, column)
    out["t_skip_mean"], out["t_skip_mean_ci"] = mean_interval(attempted(rows), "t_skip")
    out["t_skip_mean_flipped"], out["t_skip_mean_flipped_ci"] = mean_interval(flips, "t_skip")
    return out


def verdict_source(rows: Sequence[Dict[str, str]]) -> Tuple[Optional[str], Optional[str]]:
    """(judged_by, note): "judge" when the independent judge's columns are filled, else "oracle" (with a note that
    its flip rate is not an independent measure when it chose the edit), or (None, note) when nothing judged."""
    if _judge_judged(rows):
        return "judge", ("judge_flip_rate is the independent judge's (judge_dir, never consulted by the search; an "
                         "image whose search found no flip never counts): the one to trust; flip_rate is the oracle's")
    if not _judged(rows):
        return None, "no classifier judged the edits: no flip rate"
    if all(r.get("search") in ("sweep", "fixed") for r in rows):
        return "oracle", ("flip_rate is judged by the oracle; with search sweep/fixed it chose no edit here, but it is "
                          "the classifier a search would consult: set judge_dir for an independent measure")
    return "oracle", ("flip_rate is judged by the oracle, the same classifier that chose the edit (the search stops "
                      "when it flips): not an independent measure; set judge_dir for one")


def intervals_note(rows: Sequence[Dict[str, str]]) -> str:
    """:data:`INTERVALS_NOTE`, plus a warning when an image has several rows (etas, t_skips, targets): the summary's
    Wilson interval then treats dependent rows as independent."""
    per_image = Counter(r["source_path"] for r in attempted(rows))
    most = max(per_image.values(), default=0)
    if most <= 1:
        return INTERVALS_NOTE
    return (INTERVALS_NOTE + f" Here an image has up to {most} rows, so the summary's Wilson intervals of the flip "
            "rates are too narrow; scripts/analyze_results.py gives per-setting figures with one row per image.")


def summarize(rows: List[Dict[str, str]]) -> Dict[str, object]:
    """The run summary from results rows (as read back from results.csv).

    Flip rates count flipped rows over ALL attempted rows (already-target rows apart), with Wilson intervals over
    those rows; LPIPS and L2 are means over the flipped rows, t_skip over the attempted ones, each with a bootstrap
    interval over images; ``intervals`` says so. Every interval is [lo, hi] or None; nothing is NaN.
    """
    flipped = [r for r in rows if is_flip(r)]
    tried = attempted(rows)
    directions: Dict[str, List[Dict[str, str]]] = {}
    for r in rows:
        directions.setdefault(f"{r['source_class']}->{r['target_class']}", []).append(r)
    images = {r["source_path"] for r in rows}
    judged_by, note = verdict_source(rows)
    per_image_evals = evals_per_image(rows)
    per_image_seconds: Dict[str, float] = {}
    for r in rows:
        seconds = as_number(r.get("seconds")) or 0.0
        per_image_seconds[r["source_path"]] = per_image_seconds.get(r["source_path"], 0.0) + seconds
    summary: Dict[str, object] = {
        "n_images": len(images),
        "n_rows": len(rows),
        "n_flipped": len(flipped),
        "n_unjudged": sum(r.get("flipped") in (None, "") for r in rows) if _judged(rows) else 0,
        # originals the oracle already assigns to the target class: not searched, never flips, counted apart
        "n_already_target": sum(is_already_target(r) for r in rows),
        "judged_by": judged_by,
        "note": note,
        "intervals": intervals_note(rows),
    }
    summary.update(flip_figures(rows, wilson_only=True))
    summary["lpips_mean"], summary["lpips_mean_ci"] = mean_interval(flipped, "lpips")
    summary["l2_mean"], summary["l2_mean_ci"] = mean_interval(flipped, "l2")
    summary["l2_mean_all"], summary["l2_mean_all_ci"] = mean_interval(tried, "l2")
    summary["t_skip_histogram"] = t_skip_histogram(rows)
    summary["t_skip_histogram_flipped"] = t_skip_histogram(flipped)
    summary["t_skip_mean"], summary["t_skip_mean_ci"] = mean_interval(tried, "t_skip")
    summary["t_skip_mean_flipped"], summary["t_skip_mean_flipped_ci"] = mean_interval(flipped, "t_skip")
    summary["unet_evals_per_image"], summary["unet_evals_per_image_ci"] = _per_image_mean(per_image_evals)
    summary["seconds_per_image"], summary["seconds_per_image_ci"] = _per_image_mean(per_image_seconds)
    summary["per_direction"] = {name: _group_summary(rs) for name, rs in sorted(directions.items())}
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------------------------------
def load_run_rows(run_dir: str | Path) -> List[Dict[str, str]]:
    """The rows of an editing run folder, read-only: results.csv plus any shard rows it lacks (a run still going or
    interrupted before the merge), one row per key.

    Raises:
        FileNotFoundError: the folder holds neither results.csv nor shards/results.*.csv.
    """
    from diffusion.edit.results import collect_rows, result_sources

    if not any(p.is_file() for p in result_sources(run_dir)):
        raise FileNotFoundError(f"{run_dir} holds no results.csv (nor shards/results.*.csv): is it the output_dir of "
                                "a kandinsky_eval.py run?")
    return collect_rows(run_dir)


def run_settings(run_dir: str | Path) -> str:
    """The settings that tell editing runs apart, from the run's config.yaml: search, eta, guidance, T, inversion,
    LoRA (path and step) and oracle folder; '' when the folder has no config.yaml."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return ""
    c = OmegaConf.to_container(OmegaConf.load(path))
    lora = c.get("lora") or {}
    parts = [f"{c.get('search')}", f"eta={c.get('eta')}", f"g={c.get('guidance_scale')}",
             f"T={c.get('num_inference_steps')}", f"inversion={c.get('inversion')}"]
    if c.get("search") == "fixed":
        parts.append(f"t_skip={c.get('t_skip')}")
    if lora.get("path"):
        parts.append(f"lora={lora['path']}" + (f"@{lora['step']}" if lora.get("step") is not None else ""))
    if c.get("oracle_dir"):
        parts.append(f"oracle={c['oracle_dir']}")
    return " ".join(parts).replace("|", "/")


def _ci(interval: object, digits: int, scale: float = 1.0) -> str:
    if not interval:
        return ""
    lo, hi = interval  # type: ignore[misc]
    return f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def _cell(value: Optional[float], digits: int = 3, interval: object = None) -> str:
    return "-" if value is None else f"{value:.{digits}f}{_ci(interval, digits)}"


def _rate(rate: Optional[float], flipped: int, n: int, interval: object = None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}% ({flipped}/{n}){_ci(interval, 1, 100)}"


def _direction_rate(v: Dict[str, object]) -> str:
    return _rate(v["flip_rate"], v["n_flipped"], v.get("n_attempted", v["n"]),  # type: ignore[arg-type]
                 v.get("flip_rate_ci"))


def comparison_table(runs: Sequence[Tuple[str, Dict[str, object], str]]) -> str:
    """One markdown table, a row per ``(name, summary, settings)``: images, rows, flip rate (overall and per
    direction; the judge's too), mean LPIPS and L2 of the flipped edits, mean t_skip, UNet evaluations and seconds
    per image. Every rate and mean is followed by its 95% interval in brackets (:data:`INTERVALS_NOTE`)."""
    lines = [
        "| run | settings | images | rows | flip rate | judge flip rate | flip rate per direction | LPIPS (flipped) | "
        "L2 (flipped) | mean t_skip | mean t_skip (flipped) | UNet evals / image | s / image |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s, settings in runs:
        g = s.get  # older summaries (summary.json of earlier runs) lack the newer keys
        per_dir: Dict[str, Dict[str, object]] = s["per_direction"]  # type: ignore[assignment]
        tried = int(g("n_attempted", s["n_rows"]))  # type: ignore[arg-type]
        directions = "; ".join(f"{d}: {_direction_rate(v)}" for d, v in per_dir.items())
        cells = [
            name, settings, str(s["n_images"]), str(s["n_rows"]),
            _rate(g("flip_rate"), g("n_flipped"), tried, g("flip_rate_ci")),  # type: ignore[arg-type]
            _rate(g("judge_flip_rate"), g("n_judge_flipped", 0), tried, g("judge_flip_rate_ci")),  # type: ignore[arg-type]
            directions,
            _cell(g("lpips_mean"), 4, g("lpips_mean_ci")), _cell(g("l2_mean"), 4, g("l2_mean_ci")),  # type: ignore[arg-type]
            _cell(g("t_skip_mean"), 3, g("t_skip_mean_ci")),  # type: ignore[arg-type]
            _cell(g("t_skip_mean_flipped"), 3, g("t_skip_mean_flipped_ci")),  # type: ignore[arg-type]
            _cell(g("unet_evals_per_image"), 1, g("unet_evals_per_image_ci")),  # type: ignore[arg-type]
            _cell(g("seconds_per_image"), 2, g("seconds_per_image_ci")),  # type: ignore[arg-type]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
