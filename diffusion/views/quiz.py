"""quiz.html: the quick practice page. Part of the run's images are a lesson (each real image beside its
counterfactual and the flicker), the rest a quiz on real images NOT shown in the lesson (every class, shuffled with a
fixed seed), scored in the page. For a measured teaching study (pre-test, lesson by arm, post-test) see study.html.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from diffusion.views.pages import Row, cell_float, row_change, row_flipped, url

QUIZ_SEED = 0  # the lesson/quiz split and the quiz order; fixed, so every learner of a run sees the same quiz


def lesson_row(rows: Sequence[Row]) -> Optional[Row]:
    """The counterfactual to teach with, among one (image, target)'s rows: the smallest change (LPIPS, else L2) that
    flipped the oracle; None when an oracle judged them and none flipped (that edit did not reach the other class).
    Without an oracle: the largest eta, then the smallest change."""
    if any(row_flipped(r) is not None for r in rows):
        flips = [r for r in rows if row_flipped(r)]
        return min(flips, key=row_change) if flips else None
    return min(rows, key=lambda r: (-(cell_float(r.get("eta")) or 0.0), row_change(r)))


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


def quiz_data(run_dir: Path, rows: List[Row], cards: List[Dict[str, object]], classes: List[str],
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
