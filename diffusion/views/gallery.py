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
import math
import random
import re
from collections import OrderedDict
from html import escape
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from tqdm.auto import tqdm

from diffusion.config import ViewsConfig
from diffusion.files import atomic_write_text
from diffusion.metrics import load_run_rows, summarize
from diffusion.views.images import (
    DIFF_COLORMAP, DIFF_PERCENTILE, load_rgb, save_difference_map, save_flicker_gif, save_strip, strip_frames,
)

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
QUIZ_SEED = 0  # the lesson/quiz split and the quiz order; fixed, so every learner of a run sees the same quiz
DEFAULT_FRAME_MS = ViewsConfig().gif_frame_ms
PIXELATED_BELOW = 256  # images narrower than this are enlarged with crisp pixels in the pages (CSS: pixelated)
Row = Dict[str, str]


# --------------------------------------------------------------------------------------------------------------------
# Page plumbing
# --------------------------------------------------------------------------------------------------------------------
def embed_json(data: object) -> str:
    """JSON safe inside a ``<script type="application/json">`` block: '<', '>' and '&' become \\u escapes, so no value
    (a class name, a path) can close the block ("</script>") or open a comment; ``JSON.parse`` reads them back.
    ASCII only (non-ASCII as \\u escapes too), so the page is the same bytes whatever the locale's encoding."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(template: str, title: str, script: str, data: object) -> str:
    """A template from ``templates/`` with ``{{ title }}``, ``{{ css }}``, ``{{ js }}`` (dom.js, then ``script``) and
    ``{{ data }}`` filled in one pass (text put in is never scanned for further fields)."""
    css = (TEMPLATES / "gallery.css").read_text(encoding="utf-8")
    js = "\n".join((TEMPLATES / name).read_text(encoding="utf-8") for name in ("dom.js", script))
    if "</" in css or "</script" in js.lower():
        raise ValueError(f"templates/{script}, dom.js or gallery.css contains '</': it would end the inline block "
                         "early")
    title = escape(title).encode("ascii", "xmlcharrefreplace").decode("ascii")
    fields = {"title": title, "css": css, "js": js, "data": embed_json(data)}
    page = (TEMPLATES / template).read_text(encoding="utf-8")
    page = re.sub(r"\{\{ (\w+) \}\}", lambda m: fields[m.group(1)], page)
    if not page.isascii():
        raise ValueError(f"templates/{template}, {script}, dom.js or gallery.css holds non-ASCII text: write it as "
                         "an escape")
    return page


def url(rel_path: str) -> str:
    """A run-relative file path as a relative URL (each segment percent-encoded: class names may hold spaces, '#')."""
    return quote(rel_path.replace("\\", "/"), safe="/")


def legend_gradient() -> str:
    """The difference map's colour scale as a CSS linear-gradient (the page's legend)."""
    stops = ", ".join(f"rgb{c} {100 * s:g}%" for s, c in DIFF_COLORMAP)
    return f"linear-gradient(to right, {stops})"


def run_frame_ms(run_dir: str | Path) -> int:
    """``views.gif_frame_ms`` from the run's config.yaml; the default when the folder has none or lacks the key."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return DEFAULT_FRAME_MS
    from omegaconf import OmegaConf

    views = (OmegaConf.to_container(OmegaConf.load(path)) or {}).get("views") or {}
    return int(views.get("gif_frame_ms", DEFAULT_FRAME_MS))


def _f(value: object) -> Optional[float]:
    """A CSV cell as a float; None when empty, not a number, or not finite (JSON has no NaN)."""
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _flipped(row: Row) -> Optional[bool]:
    return None if row.get("flipped") in (None, "") else row["flipped"] == "1"


def _change(row: Row) -> float:
    """How much an edit changed its image: LPIPS when the run measured it, else pixel L2."""
    lpips = _f(row.get("lpips"))
    return lpips if lpips is not None else (_f(row.get("l2")) or 0.0)


def _existing_url(run_dir: Path, rel_path: Optional[str]) -> Optional[str]:
    """The URL of a run-relative file, or None when it is not on disk (the page then shows a placeholder)."""
    return url(rel_path) if rel_path and (run_dir / rel_path).is_file() else None


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
    p_before, p_after = _f(row.get("oracle_prob_before")), _f(row.get("oracle_prob_after"))
    return {
        "source_path": row["source_path"], "source_class": row["source_class"], "target_class": row["target_class"],
        "direction": f"{row['source_class']} \u2192 {row['target_class']}", "search": row.get("search"),
        "eta": _f(row.get("eta")), "t_skip": _f(row.get("t_skip")), "guidance_scale": _f(row.get("guidance_scale")),
        "oracle_pred_before": row.get("oracle_pred_before") or None, "p_before": p_before, "p_after": p_after,
        "delta": p_after - p_before if p_before is not None and p_after is not None else None,
        "flipped": _flipped(row), "l2": _f(row.get("l2")), "lpips": _f(row.get("lpips")),
        "attempts": _f(row.get("attempts")), "unet_evals": _f(row.get("unet_evals")),
        "original": _existing_url(run_dir, row["original_path"]),
        "counterfactual": _existing_url(run_dir, row["counterfactual_path"]),
        "pair": _existing_url(run_dir, row.get("pair_path")), "gif": _existing_url(run_dir, gif),
        "diff": _existing_url(run_dir, diff), "diff_scale": scale,
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
    title = f"{info['source_class']} -> {info['target_class']}, every eta at t_skip {float(info['t_skip']):g}"
    rel = f"{image_dir}/strip.png"
    strip = save_strip(tiles, title, str(info["target_class"]), run_dir / rel)
    return {"strip": url(rel), "strip_t_skip": float(info["t_skip"]), "strip_size": list(strip.size)}


# --------------------------------------------------------------------------------------------------------------------
# Lesson and quiz
# --------------------------------------------------------------------------------------------------------------------
def lesson_row(rows: Sequence[Row]) -> Optional[Row]:
    """The counterfactual to teach with, among one (image, target)'s rows: the smallest change (LPIPS, else L2) that
    flipped the oracle; None when an oracle judged them and none flipped (that edit did not reach the other class).
    Without an oracle: the largest eta, then the smallest change."""
    if any(_flipped(r) is not None for r in rows):
        flips = [r for r in rows if _flipped(r)]
        return min(flips, key=_change) if flips else None
    return min(rows, key=lambda r: (-(_f(r.get("eta")) or 0.0), _change(r)))


def lesson_and_quiz(rows: Sequence[Row], seed: int = QUIZ_SEED) -> Tuple[List[Dict[str, object]], List[Dict[str, str]]]:
    """Split the run's images, per source class, into lesson images (the larger half) and quiz images (the rest).

    Returns (lesson, quiz): the lesson is one counterfactual pair per lesson image and target (:func:`lesson_row`), in
    class order; the quiz is the other images' originals with their true class, both classes mixed and shuffled.
    A seeded ``random.Random`` makes the split and the order the same on every call.
    """
    rng = random.Random(seed)
    by_image: "OrderedDict[str, List[Row]]" = OrderedDict()
    for r in sorted(rows, key=lambda r: (r["source_class"], r["source_path"])):
        by_image.setdefault(r["source_path"], []).append(r)
    by_class: "OrderedDict[str, List[str]]" = OrderedDict()
    for path, rs in by_image.items():
        by_class.setdefault(rs[0]["source_class"], []).append(path)
    lesson, quiz = [], []
    for cls, paths in by_class.items():
        paths = list(paths)
        rng.shuffle(paths)
        n_quiz = len(paths) // 2
        for path in paths[n_quiz:]:
            targets: "OrderedDict[str, List[Row]]" = OrderedDict()
            for r in by_image[path]:
                targets.setdefault(r["target_class"], []).append(r)
            for tgt, rs in targets.items():
                best = lesson_row(rs)
                if best is not None:
                    lesson.append({"source_path": path, "source_class": cls, "target_class": tgt, "row": best})
        quiz += [{"source_path": p, "label": cls, "row": by_image[p][0]} for p in paths[:n_quiz]]
    rng.shuffle(quiz)
    return lesson, quiz


def _classes(rows: Sequence[Row]) -> List[str]:
    """Every class of the run (sources and targets), in order of first appearance."""
    seen: "OrderedDict[str, None]" = OrderedDict()
    for r in rows:
        seen.setdefault(r["source_class"])
        seen.setdefault(r["target_class"])
    return list(seen)


# --------------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------------
def _load_summary(run_dir: Path, rows: List[Row]) -> Dict[str, object]:
    path = run_dir / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    log.warning("%s: no summary.json (the run did not finish); summarising results.csv instead", run_dir)
    return summarize(rows)


def write_views(run_dir: Path, frame_ms: int = DEFAULT_FRAME_MS, quiz_seed: int = QUIZ_SEED) -> Dict[str, object]:
    """Every teaching view of an editing run folder, from its files only: per edit ``flicker_<tag>.gif`` and
    ``diff_<tag>.png`` beside ``cf_<tag>.png``, per image ``strip.png``, and ``index.html`` + ``quiz.html`` at the top.

    Reads results.csv (plus unmerged shards), summary.json and each image's strip.json; overwrites earlier views.
    Returns counts and the page paths: {"index", "quiz", "edits", "gifs", "diff_maps", "strips", "lesson_pairs",
    "quiz_images"}.

    Raises:
        FileNotFoundError: ``run_dir`` is not an editing run folder (no results.csv).
    """
    run_dir = Path(run_dir)
    rows = load_run_rows(run_dir)
    cards = [edit_views(run_dir, r, frame_ms) for r in tqdm(rows, desc="views", unit="edit", leave=False)]
    strips: Dict[str, Optional[Dict[str, object]]] = {}
    for row, card in zip(rows, cards):
        image_dir = Path(row["original_path"]).parent.as_posix()
        if image_dir not in strips:
            strips[image_dir] = image_strip(run_dir, image_dir, card["p_before"])
        card.update(strips[image_dir] or {})
    classes = _classes(rows)
    title = " vs ".join(classes) or run_dir.resolve().name
    index_data = _index_data(run_dir, rows, cards, classes, frame_ms)
    quiz_data = _quiz_data(run_dir, rows, cards, classes, quiz_seed)
    atomic_write_text(run_dir / "index.html", render_page("index.html", f"{title}: counterfactual edits",
                                                          "gallery.js", index_data))
    atomic_write_text(run_dir / "quiz.html", render_page("quiz.html", f"{title}: lesson and quiz", "quiz.js",
                                                         quiz_data))
    counts = {
        "index": str(run_dir / "index.html"), "quiz": str(run_dir / "quiz.html"), "edits": len(cards),
        "gifs": sum(c["gif"] is not None for c in cards), "diff_maps": sum(c["diff"] is not None for c in cards),
        "strips": sum(s is not None for s in strips.values()), "lesson_pairs": len(quiz_data["lesson"]),
        "quiz_images": len(quiz_data["quiz"]),
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


def _quiz_data(run_dir: Path, rows: List[Row], cards: List[Dict[str, object]], classes: List[str],
               seed: int) -> Dict[str, object]:
    """What quiz.html shows: the lesson pairs (with both images on disk) and the quiz images with their classes."""
    card_of = {id(r): c for r, c in zip(rows, cards)}
    lesson, quiz = lesson_and_quiz(rows, seed)
    pairs = []
    for item in lesson:
        card = card_of[id(item["row"])]
        if card["original"] and card["counterfactual"]:
            pairs.append({"source_class": item["source_class"], "target_class": item["target_class"],
                          "original": card["original"], "counterfactual": card["counterfactual"],
                          "gif": card["gif"], "p_before": card["p_before"], "p_after": card["p_after"]})
    return {
        "folder": run_dir.resolve().name, "classes": classes, "seed": seed,
        "pixelated": any(c["pixelated"] for c in cards), "lesson": pairs,
        "quiz": [{"image": url(q["row"]["original_path"]), "label": q["label"]} for q in quiz
                 if (run_dir / q["row"]["original_path"]).is_file()],
    }
