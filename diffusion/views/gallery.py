"""The teaching views of an editing run, made from its files alone (no model): per edit a flicker GIF and a difference
map, per image an annotated interpolation strip, and two pages that open straight from disk (no server, no network):

- ``index.html``: the run's summary, then every edit with a comparison slider, the GIF, the strip, the difference map,
  the oracle's probabilities and the chosen t_skip; filters by direction and oracle verdict, sorting by the change in
  the oracle's confidence;
- ``quiz.html``: the paper's teaching setting: a lesson of counterfactual pairs from part of the images, then a quiz on
  real images NOT shown in the lesson (both classes, shuffled with a fixed seed), scored in the page.

The pages are the templates in ``templates/`` with the CSS, the JavaScript and the data inlined (the data as a JSON
block: a file:// page cannot fetch a local JSON file in Chromium). Every path is relative to the run folder, so the
folder can be zipped and moved. :func:`write_views` is idempotent: the same run folder gives the same files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tqdm.auto import tqdm

from diffusion.config import StudyConfig, ViewsConfig
from diffusion.files import atomic_write_json, atomic_write_text
from diffusion.metrics import load_run_rows, summarize
from diffusion.views.pages import (
    PIXELATED_BELOW, Row, cell_float, existing_url, legend_gradient, render_page, row_flipped, run_classes, url,
)
from diffusion.views.blind import OpaqueCopies
from diffusion.views.figures import write_run_figures
from diffusion.views.quiz import QUIZ_SEED, quiz_data
from diffusion.views.study import write_study_page
from diffusion.views.images import (
    DIFF_PERCENTILE, load_rgb, save_difference_map, save_flicker_gif, save_strip, strip_frames,
)

log = logging.getLogger(__name__)

DEFAULT_FRAME_MS = ViewsConfig().gif_frame_ms


# --------------------------------------------------------------------------------------------------------------------
# Page plumbing
# --------------------------------------------------------------------------------------------------------------------
def run_frame_ms(run_dir: str | Path) -> int:
    """``views.gif_frame_ms`` from the run's config.yaml; the default when the folder has none or lacks the key."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return DEFAULT_FRAME_MS
    from omegaconf import OmegaConf

    views = (OmegaConf.to_container(OmegaConf.load(path)) or {}).get("views") or {}
    return int(views.get("gif_frame_ms", DEFAULT_FRAME_MS))


VIEWS_FILE = "views.json"  # the options the run folder's views were last made with


def views_options(run_dir: str | Path) -> Optional[Dict[str, object]]:
    """The options of the views now in ``run_dir`` (views.json), or None when none were recorded (an older run)."""
    path = Path(run_dir) / VIEWS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_views_options(run_dir: Path, options: Dict[str, object]) -> None:
    """Record the options the views are about to be made with in views.json, saying so when they differ from those
    of the views already there (a resumed run or make_views.py with other settings re-renders every view)."""
    options = {**options, "diff_percentile": DIFF_PERCENTILE, "strip_captions": "html"}
    before = views_options(run_dir)
    if before is not None and before != options:
        changed = {k: f"{before.get(k)} -> {v}" for k, v in options.items() if before.get(k) != v}
        log.warning("%s: re-rendering every view with new options (%s)", run_dir,
                    ", ".join(f"{k} {c}" for k, c in changed.items()))
    elif before is None and (run_dir / "index.html").is_file():
        log.warning("%s: its views record no options (an older version made them); re-rendering every view with %s",
                    run_dir, options)
    atomic_write_json(run_dir / VIEWS_FILE, options)


# --------------------------------------------------------------------------------------------------------------------
# Per-edit and per-image views
# --------------------------------------------------------------------------------------------------------------------
def _view_paths(counterfactual_path: str) -> Tuple[str, str]:
    """(GIF, difference map) paths beside a counterfactual: cf_eta2.png -> flicker_eta2.gif, diff_eta2.png."""
    cf = Path(counterfactual_path)
    tag = cf.stem[3:] if cf.stem.startswith("cf_") else cf.stem
    return (cf.parent / f"flicker_{tag}.gif").as_posix(), (cf.parent / f"diff_{tag}.png").as_posix()


def edit_views(run_dir: Path, row: Row, frame_ms: int) -> Dict[str, object]:
    """Write one edit's flicker GIF and difference map; returns its card data for the gallery (URLs; None for a view
    whose source images are missing)."""
    orig_path, cf_path = run_dir / row["original_path"], run_dir / row["counterfactual_path"]
    gif = diff = scale = size = None
    if orig_path.is_file() and cf_path.is_file():
        original, counterfactual = load_rgb(orig_path), load_rgb(cf_path)
        gif, diff = _view_paths(row["counterfactual_path"])
        save_flicker_gif(original, counterfactual, run_dir / gif, frame_ms)
        scale = save_difference_map(original, counterfactual, run_dir / diff)
        size = list(original.size)
    else:
        log.warning("%s: original or counterfactual image missing; no GIF or difference map", row["source_path"])
    p_before, p_after = cell_float(row.get("oracle_prob_before")), cell_float(row.get("oracle_prob_after"))
    return {
        "source_path": row["source_path"], "source_class": row["source_class"], "target_class": row["target_class"],
        "direction": f"{row['source_class']} \u2192 {row['target_class']}", "search": row.get("search"),
        "eta": cell_float(row.get("eta")), "t_skip": cell_float(row.get("t_skip")), "guidance_scale": cell_float(row.get("guidance_scale")),
        "oracle_pred_before": row.get("oracle_pred_before") or None, "p_before": p_before, "p_after": p_after,
        "delta": p_after - p_before if p_before is not None and p_after is not None else None,
        "flipped": row_flipped(row), "l2": cell_float(row.get("l2")), "lpips": cell_float(row.get("lpips")),
        "attempts": cell_float(row.get("attempts")), "unet_evals": cell_float(row.get("unet_evals")),
        "original": existing_url(run_dir, row["original_path"]),
        "counterfactual": existing_url(run_dir, row["counterfactual_path"]),
        "pair": existing_url(run_dir, row.get("pair_path")), "gif": existing_url(run_dir, gif),
        "diff": existing_url(run_dir, diff), "diff_scale": scale,
        "size": size, "pixelated": bool(size and size[0] < PIXELATED_BELOW), "strip": None, "strip_t_skip": None,
        "strip_size": None,
    }


def image_strip(run_dir: Path, image_dir: str, original_prob: Optional[float]) -> Optional[Dict[str, object]]:
    """Compose ``<image_dir>/strip.png`` from the run's strip.json and strip/ frames (the original first); None when
    the run saved no strip for this image (views disabled, or an older run)."""
    folder = run_dir / image_dir
    info_path = folder / "strip.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    frames = [f for f in info.get("frames", []) if (folder / f["path"]).is_file()]
    if not frames:
        log.warning("%s: strip.json lists no frame found on disk; no strip", info_path)
        return None
    original = load_rgb(folder / "original.png") if (folder / "original.png").is_file() else None
    tiles = strip_frames(folder, frames, original, original_prob)
    rel = f"{image_dir}/strip.png"
    strip = save_strip(tiles, run_dir / rel)  # no text in it: the page captions each frame in HTML
    paths = (["original.png"] if original is not None else []) + [f["path"] for f in frames]
    shown = [{"image": url(f"{image_dir}/{p}"), "caption": t.caption, "target_prob": t.target_prob}
             for p, t in zip(paths, tiles)]
    return {"strip": url(rel), "strip_t_skip": float(info["t_skip"]), "strip_size": list(strip.size),
            "strip_frames": shown}


# --------------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------------
def _load_summary(run_dir: Path, rows: List[Row]) -> Dict[str, object]:
    """The summary recomputed from the rows (so an older run gets today's intervals, and the page agrees with its
    figures), with what only summary.json knows (settings, class-mean geometry) kept."""
    path = run_dir / "summary.json"
    if not path.is_file():
        log.warning("%s: no summary.json (the run did not finish); summarising results.csv alone", run_dir)
    return {**(json.loads(path.read_text()) if path.is_file() else {}), **summarize(rows)}


def write_views(run_dir: Path, frame_ms: int = DEFAULT_FRAME_MS, quiz_seed: int = QUIZ_SEED,
                study: Optional[StudyConfig] = None) -> Dict[str, object]:
    """Every teaching view of an editing run folder, from its files only: per edit ``flicker_<tag>.gif`` and
    ``diff_<tag>.png`` beside ``cf_<tag>.png``, per image ``strip.png``, and ``index.html`` + ``quiz.html`` +
    ``study.html`` (settings: ``study``, else the run's config.yaml ``views.study``) at the top, the images the quiz
    and the study show copied under opaque names into ``study/``.

    Reads results.csv (plus unmerged shards), summary.json and each image's strip.json; overwrites earlier views.
    Returns counts and the page paths: {"index", "quiz", "study" (None when disabled), "edits", "gifs", "diff_maps",
    "strips", "lesson_pairs", "quiz_images"}.

    Raises:
        FileNotFoundError: ``run_dir`` is not an editing run folder (no results.csv).
    """
    run_dir = Path(run_dir)
    rows = load_run_rows(run_dir)
    check_views_options(run_dir, {"gif_frame_ms": frame_ms, "quiz_seed": quiz_seed})
    cards = [edit_views(run_dir, r, frame_ms) for r in tqdm(rows, desc="views", unit="edit", leave=False)]
    strips: Dict[str, Optional[Dict[str, object]]] = {}
    for row, card in zip(rows, cards):
        image_dir = Path(row["original_path"]).parent.as_posix()
        if image_dir not in strips:
            strips[image_dir] = image_strip(run_dir, image_dir, card["p_before"])
        card.update(strips[image_dir] or {})
    classes = run_classes(rows)
    title = " vs ".join(classes) or run_dir.resolve().name
    index_data = _index_data(run_dir, rows, cards, classes, frame_ms)
    index_data["figures"] = [{"name": f["name"], "caption": f["caption"], "svg": url(f["svg"]), "png": url(f["png"]),
                              "width_px": f["width_px"]} for f in write_run_figures(run_dir, rows)]
    copies = OpaqueCopies(run_dir)
    quiz = quiz_data(run_dir, rows, cards, classes, quiz_seed, copies)
    atomic_write_text(run_dir / "quiz.html", render_page("quiz.html", f"{title}: lesson and quiz",
                                                         ["blind.js", "quiz.js"], quiz))
    study_page = write_study_page(run_dir, rows, cards, classes, title, study, copies)
    if study_page is not None:  # the organiser's way in (the study page itself links nowhere: it shows no classes)
        index_data["links"]["study.html"] = url("study.html")
    atomic_write_text(run_dir / "index.html", render_page("index.html", f"{title}: counterfactual edits",
                                                          "gallery.js", index_data))
    copies.prune()
    counts = {
        "index": str(run_dir / "index.html"), "quiz": str(run_dir / "quiz.html"), "study": study_page,
        "edits": len(cards),
        "gifs": sum(c["gif"] is not None for c in cards), "diff_maps": sum(c["diff"] is not None for c in cards),
        "strips": sum(s is not None for s in strips.values()), "lesson_pairs": len(quiz["lesson"]),
        "quiz_images": len(quiz["quiz"]),
    }
    log.info("views: %s (%d edits, %d strips), %s (%d lesson pairs, %d quiz images)", counts["index"], counts["edits"],
             counts["strips"], counts["quiz"], counts["lesson_pairs"], counts["quiz_images"])
    return counts


def _index_data(run_dir: Path, rows: List[Row], cards: List[Dict[str, object]], classes: List[str],
                frame_ms: int) -> Dict[str, object]:
    """What index.html shows: the summary, the cards, and what its controls and legend need."""
    return {
        "folder": run_dir.resolve().name, "summary": _load_summary(run_dir, rows), "classes": classes,
        "cards": cards, "frame_ms": frame_ms, "directions": sorted({c["direction"] for c in cards}),
        "has_oracle": any(c["p_before"] is not None for c in cards), "legend": legend_gradient(),
        "diff_percentile": DIFF_PERCENTILE,
        "links": {name: url(name) for name in ("results.csv", "summary.json", "config.yaml", "quiz.html")
                  if name == "quiz.html" or (run_dir / name).is_file()},
    }


