"""A classifier folder's accuracy record (``test_metrics.json``): computing it, reading it back, summarising it.

Every rate is stored with its counts and a 95% Wilson interval (:func:`diffusion.stats.wilson_interval`), so a
reader can tell 0.97 of 450 images from 0.97 of 30::

    {"format": "diffusion-classifier-metrics/1", "split": "test", "classes": [...], "n": 450,
     "n_per_class": {class: n},
     "members": {name: {"correct", "n", "accuracy", "interval", "per_class": {class: {...}}}},
     "ensemble": {the same, "pairs": {"a/b": {...}}, "confusion": [[...]]},
     "accuracy": {name: accuracy, ..., "ensemble": accuracy},    (flat, as the first records had it)
     ...}

A prediction is the argmax of a member's (or the ensemble's mean) class probabilities. A pair's accuracy ("3/8")
is measured on the test images of those two classes, predicting the one of the two with the higher probability:
what an editing run between them relies on. Records written before this format (``accuracy`` and ``n`` alone, no
intervals) still load; their intervals are recomputed from the counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from diffusion.errors import OracleError
from diffusion.stats import wilson_interval

METRICS_FORMAT = "diffusion-classifier-metrics/1"
TEST_METRICS = "test_metrics.json"
MAX_PAIR_CLASSES = 20  # pairs are listed for up to this many classes (190 pairs); beyond, only overall figures
ENSEMBLE = "ensemble"
RETRAIN = "re-run scripts/train_classifiers.py with the config.yaml saved in that folder"


def rate(correct: int, n: int) -> Dict[str, Any]:
    """``{"correct", "n", "accuracy", "interval"}`` of ``correct`` out of ``n`` (accuracy and interval None at n 0)."""
    interval = wilson_interval(int(correct), int(n))
    return {"correct": int(correct), "n": int(n), "accuracy": correct / n if n else None,
            "interval": list(interval) if interval else None}


def pair_key(a: str, b: str) -> str:
    return f"{a}/{b}"


def pair_rate(probs: torch.Tensor, labels: torch.Tensor, i: int, j: int) -> Dict[str, Any]:
    """Accuracy on the images of classes ``i`` and ``j`` only, predicting whichever of the two has the higher
    probability (ties go to ``i``). probs (N, K), labels (N,)."""
    keep = (labels == i) | (labels == j)
    p, y = probs[keep], labels[keep]
    pred = torch.where(p[:, j] > p[:, i], j, i)
    return rate(int((pred == y).sum()), int(keep.sum()))


def rates_of(probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Dict[str, Any]:
    """Overall and per-class accuracy (the recall of each class) of the argmax of ``probs`` (N, K)."""
    pred = probs.argmax(dim=1)
    out = rate(int((pred == labels).sum()), len(labels))
    out["per_class"] = {c: rate(int(((pred == k) & (labels == k)).sum()), int((labels == k).sum()))
                        for k, c in enumerate(classes)}
    return out


def accuracy_record(member_probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str],
                    classes: Sequence[str], split: str) -> Dict[str, Any]:
    """The record of one test pass: ``member_probs`` (N, M, K) class probabilities of M members named ``names``,
    ``labels`` (N,) class indices into ``classes``. The ensemble is the members' mean probability."""
    labels = labels.long()
    k = len(classes)
    members = {name: rates_of(member_probs[:, m], labels, classes) for m, name in enumerate(names)}
    mean = member_probs.mean(dim=1)  # (N, K)
    ensemble = rates_of(mean, labels, classes)
    if k <= MAX_PAIR_CLASSES:
        ensemble["pairs"] = {pair_key(classes[i], classes[j]): pair_rate(mean, labels, i, j)
                             for i in range(k) for j in range(i + 1, k)}
    confusion = torch.zeros(k, k, dtype=torch.long)  # [true, predicted]
    confusion.index_put_((labels, mean.argmax(dim=1)), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    ensemble["confusion"] = confusion.tolist()
    return {
        "format": METRICS_FORMAT, "split": split, "classes": list(classes), "n": len(labels),
        "n_per_class": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "members": members, ENSEMBLE: ensemble,
        "accuracy": {**{name: r["accuracy"] for name, r in members.items()}, ENSEMBLE: ensemble["accuracy"]},
    }


# --------------------------------------------------------------------------------------------------------------------
# Reading a record back
# --------------------------------------------------------------------------------------------------------------------
def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _damaged(path: Path, what: str) -> OracleError:
    return OracleError(f"{path}: {what}; the accuracy record is damaged or not one this project wrote. Restore it, "
                       f"or {RETRAIN}.")


def read_accuracy_record(folder: Path, member_names: Sequence[str], classes: Sequence[str]) -> Dict[str, Any]:
    """The accuracy record of a classifier folder, checked against its members and classes and normalised to the
    current shape (a record of the first format gets ``members`` / ``ensemble`` entries with intervals).

    Raises:
        OracleError: the file is missing (the training run did not finish), is not JSON, lacks the ensemble's
            accuracy or the test-set size, holds a non-finite or out-of-range rate, or was written for other members
            or other classes than the folder holds now. The message names the file and what to do.
    """
    import json

    path = Path(folder) / TEST_METRICS
    if not path.is_file():
        raise OracleError(f"{path} is missing: it is the folder's accuracy record, which scripts/train_classifiers.py "
                          f"writes last, so the training run did not finish or the file was removed. Without it "
                          f"nobody can say how far to trust this classifier: {RETRAIN}.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(path, f"not readable JSON ({str(err).splitlines()[0][:120]})") from err
    if not isinstance(raw, dict):
        raise _damaged(path, "not a JSON object")
    flat = raw.get("accuracy")
    n = raw.get("n")
    if not isinstance(flat, dict) or not _is_rate(flat.get(ENSEMBLE)):
        raise _damaged(path, "no ensemble accuracy (accuracy.ensemble, a number in [0, 1])")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _damaged(path, f"'n' (the number of test images) = {n!r}, not a positive integer")
    bad = sorted(name for name, value in flat.items() if not _is_rate(value))
    if bad:
        raise _damaged(path, f"accuracy of {bad} is not a number in [0, 1]")
    missing = [name for name in member_names if name not in flat]
    if missing:
        raise OracleError(f"{path} has no accuracy for member(s) {missing} (it covers {sorted(flat)}): the members "
                          f"changed after the record was written, so it does not describe this ensemble. {RETRAIN}.")
    if "classes" in raw and list(raw["classes"]) != list(classes):
        raise OracleError(f"{path} was written for classes {raw['classes']}, but the members have {list(classes)}: "
                          f"the record does not describe them. {RETRAIN}.")
    record = dict(raw)
    if "members" not in raw or ENSEMBLE not in raw:  # the first format: flat accuracies and n
        record["members"] = {name: rate(round(flat[name] * n), n) for name in member_names}
        record[ENSEMBLE] = rate(round(flat[ENSEMBLE] * n), n)
    record["members"] = {name: record["members"][name] for name in member_names if name in record["members"]}
    record["path"] = str(path)
    return record


def _fmt(r: Optional[Dict[str, Any]]) -> str:
    if not r or r.get("accuracy") is None:
        return "n/a"
    lo, hi = r["interval"]
    return f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (n={r['n']})"


def summary_line(record: Dict[str, Any], classes: Optional[Sequence[str]] = None) -> str:
    """One line for a run log: the ensemble's test accuracy with its 95% interval, the members', and, with
    ``classes`` (e.g. the two classes a run edits between), the accuracy restricted to them."""
    members = ", ".join(f"{name} {_fmt(r)}" for name, r in record["members"].items())
    line = f"ensemble test accuracy {_fmt(record[ENSEMBLE])} on the {record.get('split', 'test')} split; members: " \
           f"{members}"
    if classes is not None and len(classes) == 2:
        pairs = record[ENSEMBLE].get("pairs", {})
        pair = pairs.get(pair_key(*classes)) or pairs.get(pair_key(*reversed(list(classes))))
        if pair is not None:
            line += f"; on {pair_key(*classes)} alone {_fmt(pair)}"
    return line

