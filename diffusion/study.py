"""The analysis of a teaching study run with study.html: read the answers CSVs, and per arm the pre- and post-test
accuracy, the learning gain (post minus pre, per participant) with a 95% bootstrap interval over participants, the
difference of gains between arms (bootstrap interval and permutation test), per-class accuracy, and a figure.

Pure functions on rows; the only I/O is :func:`read_answers` (and :func:`save_figure`). Every number is a plain float
or None (never NaN), ready for JSON.

Counting rules (stated in the markdown too):
- a participant's accuracy in a phase is their share of right answers; an arm's accuracy is the mean over its
  participants (each person counts once, however many images they saw);
- a participant's gain is post-test minus pre-test accuracy; only participants with both tests count towards gains;
- a participant who appears in several sessions (they restarted) keeps the first session with both tests (else
  their first session); identical rows found in several files (a participant's own CSV and the organiser's combined
  one) count once.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from diffusion.config import StudyArm
from diffusion.errors import ArtefactError
from diffusion.files import atomic_save
from diffusion.stats import (
    DEFAULT_RESAMPLES, DEFAULT_SEED, as_list, bootstrap_mean_interval, permutation_test, wilson_interval,
)

log = logging.getLogger(__name__)

# the columns of study.html's CSV (study.js writes them in this order); the analysis needs REQUIRED_COLUMNS only and
# recomputes "correct" from the classes
CSV_COLUMNS = ("study", "participant", "session", "arm", "phase", "trial", "image", "true_class", "answer", "correct",
               "response_ms")
REQUIRED_COLUMNS = ("participant", "arm", "phase", "image", "true_class", "answer", "response_ms")
TEST_PHASES = ("pretest", "posttest")
PHASES = ("pretest", "lesson", "posttest")
ARMS = tuple(a.value for a in StudyArm)
# the order arms are reported in: the treatments first, the control (examples) last, so a difference reads as
# treatment minus control
ARM_ORDER = ("counterfactual", "counterfactual_diff", "examples")


@dataclass(frozen=True)
class Answer:
    """One row of an answers CSV. ``correct`` is recomputed from the classes (never trusted from the file); a lesson
    row has no image, classes or correctness, and its ``response_ms`` is the time spent on the lesson."""

    participant: str
    arm: str
    phase: str
    image: str
    true_class: str
    answer: str
    response_ms: Optional[float]
    study: str = ""
    session: str = ""
    trial: str = ""
    source: str = ""  # the file it came from

    @property
    def correct(self) -> Optional[bool]:
        return None if self.phase == "lesson" else self.answer == self.true_class

    def key(self) -> Tuple[str, ...]:
        """What makes a row the same row in two files."""
        return (self.study, self.participant, self.session, self.arm, self.phase, self.trial, self.image,
                self.true_class, self.answer)


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def _bad(path: Path, line: int, column: str, value: str, what: str) -> ArtefactError:
    return ArtefactError(f"{path}, line {line}: column '{column}' = {value!r} {what}")


def parse_answers(text: str, path: str | Path = "<answers>") -> List[Answer]:
    """The rows of one answers CSV (study.html's download).

    Raises:
        ArtefactError: naming the file (and line and column): no header, a missing column, an unknown arm or phase,
            a test row without its class or answer, a response time that is not a number.
    """
    path = Path(path)
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ArtefactError(f"{path}: missing column(s) {', '.join(missing)} (it has {', '.join(header) or 'none'}); "
                            f"an answers CSV of study.html has {', '.join(CSV_COLUMNS)}")
    out = []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise ArtefactError(f"{path}, line {line}: more cells than the header has columns")
        cells = {k: (v or "").strip() for k, v in row.items()}
        if cells["arm"] not in ARMS:
            raise _bad(path, line, "arm", cells["arm"], f"is not an arm of study.html ({', '.join(ARMS)})")
        if cells["phase"] not in PHASES:
            raise _bad(path, line, "phase", cells["phase"], f"is not a phase of study.html ({', '.join(PHASES)})")
        if not cells["participant"]:
            raise _bad(path, line, "participant", "", "is empty: every row needs the participant id")
        if cells["phase"] != "lesson":
            for column in ("true_class", "answer"):
                if not cells[column]:
                    raise _bad(path, line, column, "", f"is empty in a {cells['phase']} row")
        try:
            ms = float(cells["response_ms"]) if cells["response_ms"] else None
        except ValueError:
            raise _bad(path, line, "response_ms", cells["response_ms"], "is not a number (milliseconds)") from None
        if ms is not None and not (math.isfinite(ms) and ms >= 0):
            raise _bad(path, line, "response_ms", cells["response_ms"], "must be a finite number >= 0")
        out.append(Answer(participant=cells["participant"], arm=cells["arm"], phase=cells["phase"],
                          image=cells["image"], true_class=cells["true_class"], answer=cells["answer"],
                          response_ms=ms, study=cells.get("study", ""), session=cells.get("session", ""),
                          trial=cells.get("trial", ""), source=str(path)))
    return out


def read_answers(paths: Sequence[str | Path]) -> List[Answer]:
    """Every answer of the given CSV files, with duplicates and repeated sessions resolved (module docstring).

    Raises:
        ArtefactError: a file is unreadable or malformed (:func:`parse_answers`), holds no answer, or one participant
            appears in two arms.
    """
    rows: List[Answer] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ArtefactError(f"{path}: no such file (an answers CSV downloaded from study.html)")
        file_rows = parse_answers(path.read_text(encoding="utf-8-sig"), path)
        if not file_rows:
            raise ArtefactError(f"{path}: holds no answer (only a header, or empty)")
        rows.extend(file_rows)
    return resolve_sessions(dedupe(rows))


def dedupe(rows: Sequence[Answer]) -> List[Answer]:
    """The rows with identical copies (the same answer in two files) kept once, in first-seen order."""
    seen, out = set(), []
    for r in rows:
        if r.key() not in seen:
            seen.add(r.key())
            out.append(r)
    if len(out) < len(rows):
        log.info("%d duplicate rows (the same answers in several files) counted once", len(rows) - len(out))
    return out


def resolve_sessions(rows: Sequence[Answer]) -> List[Answer]:
    """One session per participant: the first (by session id) with both tests, else the first; refuses a participant
    seen in two arms (two studies mixed up, or a reused id)."""
    by_participant: Dict[str, Dict[str, List[Answer]]] = {}
    for r in rows:
        by_participant.setdefault(r.participant, {}).setdefault(r.session, []).append(r)
    out: List[Answer] = []
    for pid, sessions in by_participant.items():
        arms = sorted({r.arm for rs in sessions.values() for r in rs})
        if len(arms) > 1:
            files = sorted({r.source for rs in sessions.values() for r in rs})
            raise ArtefactError(f"participant {pid!r} appears in arms {', '.join(arms)} ({', '.join(files)}): answers "
                                "of two studies are mixed, or an id was reused; keep one study's files")
        complete = [s for s in sorted(sessions) if {r.phase for r in sessions[s]} >= set(TEST_PHASES)]
        keep = complete[0] if complete else sorted(sessions)[0]
        if len(sessions) > 1:
            log.warning("participant %r has %d sessions; keeping %r", pid, len(sessions), keep)
        out.extend(sessions[keep])
    studies = sorted({r.study for r in out if r.study})
    if len(studies) > 1:
        log.warning("answers from %d different study pages (%s) analysed together", len(studies), ", ".join(studies))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------------
def _accuracy(rows: Sequence[Answer]) -> Optional[float]:
    return sum(bool(r.correct) for r in rows) / len(rows) if rows else None


def participant_scores(rows: Sequence[Answer]) -> List[Dict[str, Any]]:
    """Per participant: arm, answers and accuracy per test, gain (None without both tests), lesson seconds, median
    response time per test."""
    by_pid: Dict[str, List[Answer]] = {}
    for r in rows:
        by_pid.setdefault(r.participant, []).append(r)
    out = []
    for pid in sorted(by_pid):
        mine = by_pid[pid]
        entry: Dict[str, Any] = {"participant": pid, "arm": mine[0].arm}
        for phase in TEST_PHASES:
            answers = [r for r in mine if r.phase == phase]
            times = [r.response_ms for r in answers if r.response_ms is not None]
            entry[f"{phase}_n"] = len(answers)
            entry[f"{phase}_accuracy"] = _accuracy(answers)
            entry[f"{phase}_median_ms"] = float(np.median(times)) if times else None
        pre, post = entry["pretest_accuracy"], entry["posttest_accuracy"]
        entry["gain"] = post - pre if pre is not None and post is not None else None
        lesson = [r.response_ms for r in mine if r.phase == "lesson" and r.response_ms is not None]
        entry["lesson_seconds"] = sum(lesson) / 1000 if lesson else None
        out.append(entry)
    return out


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _summary(values: Sequence[Optional[float]], resamples: int, seed: int) -> Dict[str, Any]:
    kept = [float(v) for v in values if v is not None]
    return {"mean": _mean(kept), "ci95": as_list(bootstrap_mean_interval(kept, resamples, seed)), "n": len(kept)}


def difference_interval(a: Sequence[float], b: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                        seed: int = DEFAULT_SEED, level: float = 0.95) -> Optional[Tuple[float, float]]:
    """Percentile bootstrap interval of mean(a) - mean(b), resampling each group's participants on their own; None
    when either is empty."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return None
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
             - y[rng.integers(0, y.size, (resamples, y.size))].mean(axis=1))
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def _per_class(rows: Sequence[Answer], classes: Sequence[str]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for phase in TEST_PHASES:
        out[phase] = {}
        for cls in classes:
            mine = [r for r in rows if r.phase == phase and r.true_class == cls]
            right = sum(bool(r.correct) for r in mine)
            out[phase][cls] = {"correct": right, "n": len(mine), "accuracy": _accuracy(mine),
                               "ci95": as_list(wilson_interval(right, len(mine)))}
    return out


def analyze(rows: Sequence[Answer], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
            permutations: int = 10000) -> Dict[str, Any]:
    """Every number of the study (module docstring): {"participants", "n_answers", "classes", "arms": {arm: {...}},
    "comparisons": [...], "settings"}. Intervals are 95% (percentile bootstrap over participants; Wilson for the
    per-class rates, which pool answers)."""
    scores = participant_scores(rows)
    classes = sorted({r.true_class for r in rows if r.phase in TEST_PHASES})
    present = [a for a in ARM_ORDER if any(s["arm"] == a for s in scores)]
    arms: Dict[str, Any] = {}
    gains: Dict[str, List[float]] = {}
    for arm in present:
        mine = [s for s in scores if s["arm"] == arm]
        gains[arm] = [float(s["gain"]) for s in mine if s["gain"] is not None]
        arm_rows = [r for r in rows if r.arm == arm]
        arms[arm] = {
            "participants": len(mine), "complete": len(gains[arm]),
            "pretest": {**_summary([s["pretest_accuracy"] for s in mine], resamples, seed),
                        "answers": sum(int(s["pretest_n"]) for s in mine)},
            "posttest": {**_summary([s["posttest_accuracy"] for s in mine], resamples, seed),
                         "answers": sum(int(s["posttest_n"]) for s in mine)},
            "gain": _summary(gains[arm], resamples, seed),
            "lesson_seconds": _mean([s["lesson_seconds"] for s in mine]),
            "median_response_ms": {p: _mean([s[f"{p}_median_ms"] for s in mine]) for p in TEST_PHASES},
            "per_class": _per_class(arm_rows, classes),
        }
    comparisons = []
    for a, b in itertools.combinations(present, 2):
        ga, gb = gains[a], gains[b]
        diff = float(np.mean(ga) - np.mean(gb)) if ga and gb else None
        comparisons.append({"arm": a, "versus": b, "gain_difference": diff,
                            "ci95": as_list(difference_interval(ga, gb, resamples, seed)),
                            "p_value": permutation_test(ga, gb, permutations, seed), "n": [len(ga), len(gb)]})
    incomplete = [s["participant"] for s in scores if s["gain"] is None]
    if incomplete:
        log.warning("%d participant(s) without both tests left out of the gains: %s", len(incomplete),
                    ", ".join(map(str, incomplete)))
    return {"participants": scores, "n_answers": sum(r.phase in TEST_PHASES for r in rows), "classes": classes,
            "arms": arms, "comparisons": comparisons, "incomplete": incomplete,
            "settings": {"bootstrap_resamples": resamples, "permutations": permutations, "seed": seed}}


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------
def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _pct_ci(summary: Dict[str, Any], signed: bool = False) -> str:
    mean, ci = summary.get("mean"), summary.get("ci95")
    if mean is None:
        return "n/a"
    fmt = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    text = fmt(mean) + " pp" if signed else _pct(mean)
    return text + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def markdown_report(result: Dict[str, Any]) -> str:
    """The tables of :func:`analyze` as markdown: per arm, the comparisons, per class."""
    arms: Dict[str, Dict[str, Any]] = result["arms"]
    lines = ["| arm | participants (complete) | pre-test accuracy [95% CI] | post-test accuracy [95% CI] | "
             "gain [95% CI] | lesson time (s) |", "|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        lesson = a["lesson_seconds"]
        lines.append(f"| {arm} | {a['participants']} ({a['complete']}) | {_pct_ci(a['pretest'])} | "
                     f"{_pct_ci(a['posttest'])} | {_pct_ci(a['gain'], signed=True)} | "
                     f"{'n/a' if lesson is None else f'{lesson:.1f}'} |")
    if result["comparisons"]:
        lines += ["", "| comparison | difference of gains [95% CI] | permutation p | participants |",
                  "|---|---|---|---|"]
        for c in result["comparisons"]:
            d, ci, p = c["gain_difference"], c["ci95"], c["p_value"]
            text = "n/a" if d is None else f"{100 * d:+.1f} pp" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
                                                                    if ci else "")
            lines.append(f"| {c['arm']} - {c['versus']} | {text} | {'n/a' if p is None else f'{p:.4f}'} | "
                         f"{c['n'][0]} vs {c['n'][1]} |")
    lines += ["", "| arm | test | true class | accuracy | right / answers [Wilson 95% CI] |", "|---|---|---|---|---|"]
    for arm, a in arms.items():
        for phase, per in a["per_class"].items():
            for cls, c in per.items():
                ci = c["ci95"]
                lines.append(f"| {arm} | {phase} | {cls} | {_pct(c['accuracy'])} | {c['correct']} / {c['n']}"
                             + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "") + " |")
    lines += ["", "Accuracy: per participant, then the mean over the arm's participants; gain = post-test minus "
              "pre-test accuracy (percentage points), only participants with both tests; intervals: percentile "
              f"bootstrap over participants ({result['settings']['bootstrap_resamples']} resamples); p: two-sided "
              f"permutation test of the gains ({result['settings']['permutations']} permutations)."]
    return "\n".join(lines)


def save_figure(result: Dict[str, Any], path: str | Path) -> Path:
    """Two panels: pre- and post-test accuracy per arm (mean, 95% CI, a line per arm), and each arm's gain (mean,
    95% CI, one dot per participant). PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: Dict[str, Dict[str, Any]] = result["arms"]
    names = list(arms)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for k, arm in enumerate(names):
        means, errs = [], []
        for phase in TEST_PHASES:
            s = arms[arm][phase]
            m = s["mean"]
            ci = s["ci95"] or [m, m]
            means.append(np.nan if m is None else m)
            errs.append([0, 0] if m is None else [m - ci[0], ci[1] - m])
        x = np.arange(len(TEST_PHASES)) + (k - (len(names) - 1) / 2) * 0.06
        left.errorbar(x, means, yerr=np.array(errs).T, marker="o", capsize=4, label=arm)
        gain = arms[arm]["gain"]
        dots = [s["gain"] for s in result["participants"] if s["arm"] == arm and s["gain"] is not None]
        right.scatter(np.full(len(dots), k) + np.linspace(-0.12, 0.12, len(dots)) if dots else [], dots, s=14,
                      alpha=0.5, color=f"C{k}")
        if gain["mean"] is not None:
            ci = gain["ci95"] or [gain["mean"]] * 2
            right.errorbar([k], [gain["mean"]], yerr=[[gain["mean"] - ci[0]], [ci[1] - gain["mean"]]],
                           marker="s", markersize=8, capsize=6, color=f"C{k}")
    left.set_xticks(range(len(TEST_PHASES)), ["pre-test", "post-test"])
    left.set_ylabel("accuracy (mean over participants)")
    left.set_ylim(0, 1.05)
    left.legend(frameon=False, fontsize=8)
    left.set_title("accuracy, 95% CI", fontsize=10)
    right.axhline(0, color="0.6", linewidth=0.8)
    right.set_xticks(range(len(names)), names)
    right.set_xlim(-0.6, len(names) - 0.4)
    right.set_ylabel("gain (post - pre accuracy)")
    right.set_title("learning gain, 95% CI; dots: participants", fontsize=10)
    try:
        return atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
