"""study.html: the paper's human study on a run's own images, as one offline page. A participant reads the
instructions (``views.study.instructions``), classifies real images without feedback (pre-test), studies a lesson
that depends on their arm, classifies other real images (post-test) and downloads their answers as CSV;
``scripts/analyze_study.py`` compares the arms' learning gains.

The split (fixed per run, the same for every arm, so arms differ only in the lesson):
- per class, the images in a seeded order (``views.study.seed``);
- the **lesson**: the first ``lesson_images`` images of the class with an edit that reached the other class (the judge's
  verdict when the run has one, else the oracle's; never an already-target image; the smallest such edit);
- the **pre-test** and **post-test**: the next ``pretest_images`` and ``posttest_images`` of the remaining images;
  no image is in two parts.
When a class has too few images, each part gets its share of what there is; the page and the log say so.

Arms: ``counterfactual`` shows each lesson image beside its counterfactual and the flicker GIF; ``counterfactual_diff``
adds the difference map; ``examples`` shows the same real lesson images alone, grouped by class (the paper's control).

A participant's arm and order come from their id (:func:`participant_arm`, :func:`participant_order`; study.js does
the same), so a study can be balanced (number the participants 1, 2, 3, ...) and any session replayed. Test images
are opaque copies with tokens for their classes (:mod:`diffusion.views.blind`).
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence
from urllib.parse import unquote

from diffusion.config import StudyConfig
from diffusion.errors import ConfigError
from diffusion.views.blind import OpaqueCopies, encode_class, fnv1a32, page_key, seeded_shuffle
from diffusion.views.pages import Row, row_change
from diffusion.views.quiz import lesson_row, rows_by_image, verdict_column

log = logging.getLogger(__name__)

PHASES = ("pretest", "lesson", "posttest")
_DIGITS = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------
def run_study_config(run_dir: str | Path) -> StudyConfig:
    """``views.study`` from the run's config.yaml; the defaults for whatever the file (or an older run) lacks.

    Raises:
        ConfigError: the file's ``views.study`` holds an unknown key or a bad value (named, with the file).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return StudyConfig()
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    views = (OmegaConf.to_container(OmegaConf.load(path)) or {}).get("views") or {}
    values = views.get("study") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: views.study must be a mapping of keys, got {values!r}", key="views.study")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConfig), values))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}", key=err.key) from None
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        raise ConfigError(f"{path}: views.study: {str(cause).splitlines()[0]}", key="views.study") from None


# --------------------------------------------------------------------------------------------------------------------
# Participants (study.js implements the same two rules)
# --------------------------------------------------------------------------------------------------------------------
def participant_arm(participant: str, arms: Sequence[str], seed: int) -> str:
    """The arm of a participant id (spaces around it ignored).

    A whole number ``k`` gets ``arms[(k + seed) mod len(arms)]``: consecutive ids cycle through the arms, so
    numbering participants 1, 2, 3, ... balances the arms. Any other id gets ``arms[fnv1a32(f"{seed}:{id}") mod
    len(arms)]`` (the 32-bit FNV-1a hash of its UTF-8 bytes): fixed per id, balanced only on average.
    """
    pid = participant.strip()
    if not pid:
        raise ValueError("a participant id must not be empty")
    if _DIGITS.fullmatch(pid):
        return arms[(int(pid) + seed) % len(arms)]
    return arms[fnv1a32(f"{seed}:{pid}") % len(arms)]


def participant_order(items: Sequence, participant: str, phase: str, seed: int) -> list:
    """The order a participant sees a phase's items in: ``items`` shuffled by Fisher-Yates with
    ``mulberry32(fnv1a32(f"{seed}:{id}:{phase}"))`` (see :func:`diffusion.views.blind.seeded_shuffle`)."""
    return seeded_shuffle(items, f"{seed}:{participant.strip()}:{phase}")


# --------------------------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ClassPlan:
    """One class's images in the study: source paths of the test parts, lesson rows (the edit taught with)."""

    lesson: List[Row] = field(default_factory=list)
    pretest: List[Row] = field(default_factory=list)
    posttest: List[Row] = field(default_factory=list)
    eligible: int = 0  # images of the class with an edit fit to teach with


def best_edit(rows: Sequence[Row], column: Optional[str]) -> Optional[Row]:
    """The edit one image is taught with: per target its :func:`~diffusion.views.quiz.lesson_row`, then the
    smallest change among them; None when no edit of the image reached a target."""
    by_target: Dict[str, List[Row]] = {}
    for r in rows:
        by_target.setdefault(r["target_class"], []).append(r)
    best = [b for b in (lesson_row(rs, column) for rs in by_target.values()) if b is not None]
    return min(best, key=row_change) if best else None


def _shares(available: int, wanted: Sequence[int]) -> List[int]:
    """Split ``available`` images between parts wanting ``wanted``: all they want when there are enough, else in
    proportion (largest remainders; ties to the later part, so the post-test is the last to lose an image)."""
    total = sum(wanted)
    if available >= total:
        return list(wanted)
    out = [available * w // total for w in wanted]
    by_remainder = sorted(range(len(wanted)), key=lambda k: (-(available * wanted[k] % total), -k))
    for k in by_remainder[:available - sum(out)]:
        out[k] += 1
    return out


def study_split(rows: Sequence[Row], cfg: StudyConfig, has_file: Callable[[str], bool]) -> Dict[str, ClassPlan]:
    """Per source class, the lesson, pre-test and post-test images (module docstring); images whose original is not
    on disk (``has_file`` of its run-relative path) are left out. Deterministic for a given ``cfg.seed``."""
    column = verdict_column(rows)
    rng = random.Random(cfg.seed)
    by_class: Dict[str, List[List[Row]]] = {}
    for rs in rows_by_image(rows).values():
        if has_file(rs[0]["original_path"]):
            by_class.setdefault(rs[0]["source_class"], []).append(rs)
    plans: Dict[str, ClassPlan] = {}
    for cls, images in by_class.items():
        rng.shuffle(images)
        edits = [best_edit(rs, column) for rs in images]
        edits = [e if e is not None and has_file(e["counterfactual_path"]) else None for e in edits]
        eligible = [e for e in edits if e is not None]
        want = (cfg.lesson_images, cfg.pretest_images, cfg.posttest_images)
        n_lesson, n_pre, n_post = _shares(len(images), want)
        if len(eligible) < n_lesson:  # the tests take the images the lesson cannot use
            n_lesson = len(eligible)
            n_pre, n_post = _shares(len(images) - n_lesson, want[1:])
        lesson = eligible[:n_lesson]
        taught = {r["source_path"] for r in lesson}
        rest = [rs[0] for rs in images if rs[0]["source_path"] not in taught]
        plans[cls] = ClassPlan(lesson=lesson, pretest=rest[:n_pre], posttest=rest[n_pre:n_pre + n_post],
                               eligible=len(eligible))
    return plans


def shortfall_notes(plans: Dict[str, ClassPlan], classes: Sequence[str], cfg: StudyConfig,
                    column: Optional[str]) -> List[str]:
    """One line per class that got fewer images than configured (and one when no classifier judged the edits)."""
    notes = []
    if column is None:
        notes.append("No oracle or judge verdicts in results.csv: the lesson's edits are not known to reach the other "
                     "class.")
    for cls in classes:
        plan = plans.get(cls, ClassPlan())
        parts = [(name, len(got), want) for name, got, want in (
            ("pre-test", plan.pretest, cfg.pretest_images), ("lesson", plan.lesson, cfg.lesson_images),
            ("post-test", plan.posttest, cfg.posttest_images)) if len(got) < want]
        if parts:
            detail = ", ".join(f"{name} {got} of {want}" for name, got, want in parts)
            notes.append(f"Class {cls}: too few images for the configured study ({detail}); "
                         f"{sum(len(p) for p in (plan.pretest, plan.lesson, plan.posttest))} used, "
                         f"{plan.eligible} with an edit that reached the other class.")
    return notes


# --------------------------------------------------------------------------------------------------------------------
# The page's data
# --------------------------------------------------------------------------------------------------------------------
def study_data(run_dir: Path, rows: List[Row], cards: List[Dict[str, object]], classes: List[str],
               cfg: StudyConfig, copies: Optional[OpaqueCopies] = None) -> Dict[str, object]:
    """What study.html shows. Test images are opaque copies with class tokens, listed in a seeded order that does not
    follow the classes; lesson items carry their classes (the lesson shows them)."""
    run_dir = Path(run_dir)
    copies = copies if copies is not None else OpaqueCopies(run_dir)
    card_of = {id(r): c for r, c in zip(rows, cards)}
    column = verdict_column(rows)
    plans = study_split(rows, cfg, lambda rel: bool(rel) and (run_dir / rel).is_file())
    notes = shortfall_notes(plans, classes, cfg, column)
    for note in notes:
        log.warning("study.html: %s", note)

    def view(row: Row, key: str) -> Optional[str]:
        card_url = card_of[id(row)][key]
        return copies(unquote(card_url)) if card_url else None

    lesson = [{"class": cls, "original": copies(r["original_path"]), "target": r["target_class"],
               "counterfactual": copies(r["counterfactual_path"]), "gif": view(r, "gif"), "diff": view(r, "diff")}
              for cls, plan in plans.items() for r in plan.lesson]
    tests = {phase: [(copies(r["original_path"]), cls) for cls, plan in plans.items()
                     for r in getattr(plan, phase)] for phase in ("pretest", "posttest")}
    rng = random.Random(f"study-page:{cfg.seed}")
    for items in tests.values():
        rng.shuffle(items)  # the page's own list must not run class by class
    key = page_key(["study", str(cfg.seed)] + [image for items in tests.values() for image, _ in items])
    return {
        "folder": run_dir.resolve().name, "study_id": page_key(["study-id", key, *map(str, cfg.arms)])[:12],
        "classes": classes, "arms": [str(a) for a in cfg.arms], "seed": cfg.seed, "instructions": cfg.instructions,
        "key": key, "pixelated": any(c["pixelated"] for c in cards), "verdict": column, "notes": notes,
        "planned": {"pretest": cfg.pretest_images, "lesson": cfg.lesson_images, "posttest": cfg.posttest_images},
        "lesson": lesson,
        **{phase: [{"image": image, "token": encode_class(classes.index(cls), key, image)} for image, cls in items]
           for phase, items in tests.items()},
    }


def write_study_page(run_dir: Path, rows: List[Row], cards: List[Dict[str, object]], classes: List[str], title: str,
                     cfg: Optional[StudyConfig] = None, copies: Optional[OpaqueCopies] = None) -> Optional[str]:
    """Write ``study.html`` (settings: ``cfg``, else the run's config.yaml); returns its path. When
    ``views.study.enabled`` is false, no page (an earlier one is removed) and None."""
    from diffusion.files import atomic_write_text
    from diffusion.views.pages import render_page

    cfg = cfg if cfg is not None else run_study_config(run_dir)
    page = Path(run_dir) / "study.html"
    if not cfg.enabled:
        if page.is_file():  # an earlier page would point at image copies that are about to be pruned
            page.unlink()
            log.info("views.study.enabled is false: removed the earlier %s", page)
        return None
    data = study_data(run_dir, rows, cards, classes, cfg, copies)
    atomic_write_text(page, render_page("study.html", f"{title}: teaching study", ["blind.js", "study.js"], data,
                                        extra_css=["study.css"]))
    log.info("study: %s (%d pre-test, %d lesson, %d post-test images; arms %s)", page, len(data["pretest"]),
             len(data["lesson"]), len(data["posttest"]), ", ".join(data["arms"]))
    return str(page)
