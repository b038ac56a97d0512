"""quiz.html: the quick practice page. Part of the run's images are a lesson (each real image beside its
counterfactual and the flicker), the rest a quiz on real images NOT shown in the lesson (every class, shuffled with a
fixed seed), scored in the page. For a measured teaching study (pre-test, lesson by arm, post-test) see study.html.

Lessons teach only with edits that reached the other class: by the judge where the run has one (results.csv
``judge_flipped``), else by the oracle (``flipped``); never an image the oracle already called the target class. The
quiz's images are opaque copies and its classes tokens (:mod:`diffusion.views.blind`), decoded when answered.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

from diffusion.metrics import is_judge_flip
from diffusion.views.blind import OpaqueCopies, encode_class, page_key
from diffusion.views.pages import Row, cell_float, row_change

QUIZ_SEED = 0  # the lesson/quiz split and the quiz order; fixed, so every learner of a run sees the same quiz
VERDICT_COLUMNS = ("judge_flipped", "flipped")  # who says an edit reached its target, most trusted first


def verdict_column(rows: Sequence[Row]) -> Optional[str]:
    """The results column that says whether an edit reached its target class: ``judge_flipped`` when any row has a
    judge verdict (an evaluation-only classifier the search never saw), else ``flipped`` (the oracle) when any row
    has one, else None (a run without a classifier)."""
    return next((c for c in VERDICT_COLUMNS if any(r.get(c) not in (None, "") for r in rows)), None)


def reached_target(row: Row, column: Optional[str]) -> Optional[bool]:
    """Whether this edit is a counterfactual to teach with: False for an already-target image (no edit) or a row
    without a counterfactual; else the verdict in ``column`` (None when ``column`` is None: nobody judged it)."""
    if row.get("already_target") == "1" or not row.get("counterfactual_path"):
        return False
    if column is None:
        return None
    if column == "judge_flipped":
        return is_judge_flip(row)  # also never the kept strongest attempt of a search that found no flip
    return row.get(column) == "1"


def lesson_row(rows: Sequence[Row], column: Optional[str] = None) -> Optional[Row]:
    """The counterfactual to teach with, among one (image, target)'s rows: the smallest change (LPIPS, else L2) that
    reached the target (:func:`reached_target` by the run's ``column``; None: :func:`verdict_column` of ``rows``);
    None when none did. Without any verdict: the largest eta, then the smallest change, of the rows with an edit."""
    column = column if column is not None else verdict_column(rows)
    verdicts = [(r, reached_target(r, column)) for r in rows]
    if column is not None:
        flips = [r for r, ok in verdicts if ok]
        return min(flips, key=row_change) if flips else None
    edits = [r for r, ok in verdicts if ok is None]
    return min(edits, key=lambda r: (-(cell_float(r.get("eta")) or 0.0), row_change(r))) if edits else None


def rows_by_image(rows: Sequence[Row]) -> "OrderedDict[str, List[Row]]":
    """The run's rows grouped by source image, images sorted by (class, path)."""
    by_image: "OrderedDict[str, List[Row]]" = OrderedDict()
    for r in sorted(rows, key=lambda r: (r["source_class"], r["source_path"])):
        by_image.setdefault(r["source_path"], []).append(r)
    return by_image


def lesson_and_quiz(rows: Sequence[Row], seed: int = QUIZ_SEED) -> Tuple[List[Dict[str, object]], List[Dict[str, str]]]:
    """Split the run's images, per source class, into lesson images (the larger half) and quiz images (the rest).

    Returns (lesson, quiz): the lesson is one counterfactual pair per lesson image and target (:func:`lesson_row`,
    with the run's verdict column), in class order; the quiz is the other images' originals with their true class,
    both classes mixed and shuffled. A seeded ``random.Random`` makes the split and the order the same on every call.
    """
    rng = random.Random(seed)
    column = verdict_column(rows)
    by_image = rows_by_image(rows)
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
                best = lesson_row(rs, column)
                if best is not None:
                    lesson.append({"source_path": path, "source_class": cls, "target_class": tgt, "row": best})
        quiz += [{"source_path": p, "label": cls, "row": by_image[p][0]} for p in paths[:n_quiz]]
    rng.shuffle(quiz)
    return lesson, quiz


def quiz_data(run_dir: Path, rows: List[Row], cards: List[Dict[str, object]], classes: List[str], seed: int,
              copies: Optional[OpaqueCopies] = None) -> Dict[str, object]:
    """What quiz.html shows: the lesson pairs (with both images on disk) and the quiz images, each with a token of
    its class. Every image is an opaque copy (``copies``, made here when not given)."""
    copies = copies if copies is not None else OpaqueCopies(run_dir)
    card_of = {id(r): c for r, c in zip(rows, cards)}
    lesson, quiz = lesson_and_quiz(rows, seed)
    pairs = []
    for item in lesson:
        row, card = item["row"], card_of[id(item["row"])]
        original, counterfactual = copies(row["original_path"]), copies(row["counterfactual_path"])
        if original and counterfactual:
            gif = copies(unquote(card["gif"])) if card["gif"] else None
            pairs.append({"source_class": item["source_class"], "target_class": item["target_class"],
                          "original": original, "counterfactual": counterfactual, "gif": gif,
                          "p_before": card["p_before"], "p_after": card["p_after"]})
    images = [(copies(q["row"]["original_path"]), q["label"]) for q in quiz]
    images = [(image, label) for image, label in images if image]
    key = page_key(["quiz", str(seed)] + [image for image, _ in images])
    return {
        "folder": run_dir.resolve().name, "classes": classes, "seed": seed, "key": key,
        "pixelated": any(c["pixelated"] for c in cards), "lesson": pairs,
        "quiz": [{"image": image, "token": encode_class(classes.index(label), key, image)}
                 for image, label in images],
    }
