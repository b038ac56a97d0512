"""Choosing eta, guidance and flip_threshold on validation images (scripts/calibrate.py), never on the test set.

Validation images are a seeded share of each class's TRAIN split; they are left out of the class means used here, and
edited like a run would edit them. Every (eta, guidance) is run once as a sweep over the t_skips (one shared inversion
per image); each flip_threshold then picks, per image, the mildest t_skip whose edit meets the oracle's criterion,
which is exactly what ``search: first_flip`` would choose. The judge (an independent classifier) scores the chosen
edits. The rule that picks a setting is stated in :func:`choose` and printed with the table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from diffusion.config import EditConfig
from diffusion.data import make_loader, validation_split
from diffusion.embeddings import class_mean, load_class_embeds
from diffusion.errors import ConfigError
from diffusion.files import relative_path
from diffusion.metrics import pixel_l2
from diffusion.pipeline import ClassDirection, DIFFusionPipeline
from diffusion.runinfo import read_stamped_config
from diffusion.stats import as_list, wilson_interval

log = logging.getLogger(__name__)

# An edit is "closer" when its pixel change is smaller than the distance from its source to the nearest real train image
# of the target class: where it is not, showing that real image would teach as much. Here the nearest is sought among
# the train images that are not validation images (benchmarks/demo_quality.py, on test images, searches all of them).


@dataclass
class Setting:
    eta: float
    guidance_scale: float
    flip_threshold: Optional[float]
    flip_agreement: str = "mean"


@dataclass
class SettingResult:
    setting: Setting
    n: int = 0  # attempted edits (already-target images left out)
    oracle_flips: int = 0
    judge_flips: int = 0
    closer: int = 0  # judged flips closer to their source than the source is to its nearest real target image
    l2: List[float] = field(default_factory=list)  # pixel L2 of the judged flips
    per_direction: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)  # direction -> (judge flips, n, closer)

    @property
    def judge_flip_rate(self) -> Optional[float]:
        return self.judge_flips / self.n if self.n else None

    @property
    def closer_share(self) -> Optional[float]:
        return self.closer / self.judge_flips if self.judge_flips else None

    def row(self) -> dict:
        s = self.setting
        return {
            "eta": s.eta, "guidance_scale": s.guidance_scale, "flip_threshold": s.flip_threshold,
            "flip_agreement": s.flip_agreement, "n": self.n,
            "oracle_flip_rate": self.oracle_flips / self.n if self.n else None,
            "judge_flip_rate": self.judge_flip_rate,
            "judge_flip_rate_ci": as_list(wilson_interval(self.judge_flips, self.n)),
            "judged_flips_closer_than_nearest_target": self.closer_share,
            "l2_mean_judged_flips": sum(self.l2) / len(self.l2) if self.l2 else None,
            "worst_direction_judge_flip_rate": min((f / n for f, n, _ in self.per_direction.values() if n),
                                                   default=None),
            "worst_direction_closer": min((c / f for f, _, c in self.per_direction.values() if f), default=None),
            "worst_direction_score": self.worst_direction_score,
        }

    @property
    def worst_direction_score(self) -> float:
        """The smallest, over directions, of the judge flip rate and of the share of judged flips that are closer
        (0 for a direction with no judged flip): both figures must be high in every direction."""
        scores = [min(f / n, c / f if f else 0.0) for f, n, c in self.per_direction.values() if n]
        return min(scores) if scores else 0.0


def choose(results: Sequence[SettingResult]) -> Optional[SettingResult]:
    """The stated rule: the setting whose worst direction does best on both counts, i.e. the highest
    :attr:`SettingResult.worst_direction_score` (per direction, the smaller of the judge flip rate and the share of
    judged flips closer to their source than the source's nearest real image of the target class); ties go to the
    higher overall judge flip rate, then the higher overall closer share, then the smaller mean L2 of the judged
    flips. None when no setting has a judged flip."""
    ok = [r for r in results if r.judge_flips]
    if not ok:
        return None

    def key(r: SettingResult):
        row = r.row()
        return (-r.worst_direction_score, -(r.judge_flip_rate or 0.0), -(r.closer_share or 0.0),
                row["l2_mean_judged_flips"] or 0.0)

    return min(ok, key=key)


def _held_out(stored: dict, classes: Sequence[str], per_class: int, seed: int) -> bool:
    """Whether a trainer's recorded config left every validation image of ``classes`` out of its training (or never
    trained on the class): the same seed, at least as many per class, and the class among those held out (a LoRA run
    holds out every class it trains on; the mini model names its holdout_classes)."""
    trained_on = list((stored.get("data") or {}).get("classes") or classes)  # [] = every class of the dataset
    held_classes = stored.get("holdout_classes")
    held_classes = trained_on if held_classes is None else held_classes
    same_draw = stored.get("holdout_seed", 0) == seed and (stored.get("holdout_per_class") or 0) >= per_class
    return all(c not in trained_on or (same_draw and c in held_classes) for c in classes)


def validation_seen(cfg: EditConfig, classes: Sequence[str], per_class: int, seed: int) -> Optional[str]:
    """Whether the model trained on the validation images, as far as its records say: the training report next to a
    decoder written by scripts/train_mini_model.py (``holdout_*`` there) and the config.yaml of the LoRA run
    (``holdout_per_class``, ``holdout_seed``). A sentence for the log, or None when nothing is recorded (a downloaded
    decoder without an adapter)."""
    known, seen = [], []
    report = Path(cfg.model.decoder).parent / "training_report.json"
    if report.is_file():
        try:
            stored = json.loads(report.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            stored = {}  # unreadable: assume the worst
        (known if _held_out(stored, classes, per_class, seed) else seen).append(f"the decoder ({report})")
    if cfg.lora.path:
        folder = Path(cfg.lora.path)  # the run folder, or one of its checkpoint-<step> folders
        run = next((f for f in (folder, folder.parent) if (f / "config.yaml").is_file()), None)
        try:
            stored = read_stamped_config(run) if run else {}
        except ConfigError:  # a damaged stamp records nothing: assume the worst
            stored = {}
        where = run / "config.yaml" if run else f"{folder}, which has no config.yaml of its training run"
        (known if _held_out(stored, classes, per_class, seed) else seen).append(f"the LoRA adapter ({where})")
    if seen:
        return (f"{' and '.join(seen)} did not hold these validation images out of training: the figures are "
                "optimistic next to unseen images (to hold them out: holdout_per_class and holdout_seed of the LoRA "
                "run; holdout_classes, holdout_per_class and holdout_seed of scripts/train_mini_model.py)")
    if known:
        return f"the validation images were held out of the training of {' and '.join(known)}: they are unseen images"
    return None


def _images(cfg: EditConfig, records, size: int) -> torch.Tensor:
    return torch.cat([b["pixel_values"] for b in make_loader(records, cfg.data, size, 64) if b is not None])


def calibrate(cfg: EditConfig, pipe: DIFFusionPipeline, oracle, judge, pairs: Sequence[Tuple[str, str]],
              settings: Sequence[Setting], t_skips: Sequence[float], per_class: int,
              seed: int = 0) -> List[SettingResult]:
    """Edit ``per_class`` validation images of each class of ``pairs`` (both ways) at every setting; returns one
    result per setting, in the order given."""
    classes = sorted({c for pair in pairs for c in pair})
    seen = validation_seen(cfg, classes, per_class, seed)
    if seen:
        log.info(seen)
    val, rest = validation_split(cfg.data, classes, per_class, seed)
    means = {}
    for c in classes:  # class means without the validation images
        embeds, meta = load_class_embeds(cfg.embeds_dir, c, pipe.encoder.embed_dim)
        held_out = {relative_path(r.path, cfg.data.root) for r in val[c]}
        keep = [i for i, f in enumerate(meta["files"]) if f not in held_out]
        means[c] = class_mean(embeds[keep], cfg.class_mean_images)
    train_images = {c: _images(cfg, rest[c], pipe.image_size) for c in classes}
    results = {i: SettingResult(s) for i, s in enumerate(settings)}
    by_eg: Dict[Tuple[float, float], List[int]] = {}
    for i, s in enumerate(settings):
        by_eg.setdefault((s.eta, s.guidance_scale), []).append(i)
    order = sorted(t_skips, reverse=True)
    for src, tgt in [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]:
        x = _images(cfg, val[src], pipe.image_size)
        nearest = torch.cdist(x.flatten(1), train_images[tgt].flatten(1)).min(1).values / x[0].numel() ** 0.5
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(len(x))]
        inv = pipe.invert(x, cfg.num_inference_steps, gens, cfg.inversion, cfg.inversion_guidance)
        direction = ClassDirection(means[src], means[tgt], src, tgt)
        name = f"{src}->{tgt}"
        for (eta, g), indices in by_eg.items():
            members = any(settings[i].flip_agreement == "all" for i in indices)
            out = pipe(inv, direction, eta=eta, t_skip=order, guidance_scale=g, oracle=oracle, judge=judge,
                       flip_agreement="all" if members else "mean", output_type="pt")
            grid: Dict[int, Dict[float, object]] = {}
            for e in out.edits:
                grid.setdefault(e.image, {})[e.t_skip] = e
            for i in indices:
                thr, agree = settings[i].flip_threshold, settings[i].flip_agreement
                r = results[i]
                flips_here = n_here = closer_here = 0
                for u, edits in grid.items():
                    first = edits[order[0]]
                    if first.probs_before is not None and max(first.probs_before, key=first.probs_before.get) == tgt:
                        continue  # already the target: not an attempted edit
                    n_here += 1
                    chosen = next((edits[t] for t in order if _meets(edits[t], tgt, thr, agree)), None)
                    if chosen is None:
                        continue
                    r.oracle_flips += 1
                    if max(chosen.judge_probs, key=chosen.judge_probs.get) == tgt:
                        flips_here += 1
                        dist = float(pixel_l2(x[u:u + 1], chosen.picture[None])[0])
                        r.l2.append(dist)
                        closer_here += int(dist < float(nearest[u]))
                r.n += n_here
                r.judge_flips += flips_here
                r.closer += closer_here
                f, n, c = r.per_direction.get(name, (0, 0, 0))
                r.per_direction[name] = (f + flips_here, n + n_here, c + closer_here)
        log.info("calibration: %s done (%d images)", name, len(x))
    return [results[i] for i in range(len(settings))]


def _meets(edit, target: str, threshold: Optional[float], agreement: str) -> bool:
    """The search's criterion (diffusion.edit.search.FlipCriterion) applied to a recorded edit."""
    from diffusion.edit.search import FlipCriterion

    classes = list(edit.probs)
    criterion = FlipCriterion(threshold, agreement)
    members = None
    if criterion.needs_members:
        members = torch.tensor([edit.member_probs[c] for c in classes]).T  # (M, K)
    return criterion.met(torch.tensor([edit.probs[c] for c in classes]), classes.index(target), members)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: Sequence[SettingResult], chosen: Optional[SettingResult]) -> str:
    """A markdown table of every setting, the chosen one marked."""
    lines = ["| eta | guidance | flip_threshold | agreement | n | oracle flip rate | judge flip rate (95% CI) | judged "
             "flips closer than nearest real target | worst direction: judge / closer | worst-direction score | L2 of "
             "judged flips | chosen |",
             "| ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        row = r.row()
        ci = row["judge_flip_rate_ci"]
        lines.append(
            f"| {row['eta']:g} | {row['guidance_scale']:g} | {'argmax' if row['flip_threshold'] is None else row['flip_threshold']} "
            f"| {row['flip_agreement']} | {row['n']} | {_fmt(row['oracle_flip_rate'])} "
            f"| {_fmt(row['judge_flip_rate'])}"
            f"{f' ({ci[0]:.2f}-{ci[1]:.2f})' if ci else ''} | {_fmt(row['judged_flips_closer_than_nearest_target'])} "
            f"| {_fmt(row['worst_direction_judge_flip_rate'])} / {_fmt(row['worst_direction_closer'])} "
            f"| {_fmt(row['worst_direction_score'])} | {_fmt(row['l2_mean_judged_flips'])} "
            f"| {'**yes**' if r is chosen else ''} |")
    return "\n".join(lines)


def direction_table(result: SettingResult) -> str:
    """One setting's figures by direction (a markdown table): where the targets hold and where they do not."""
    lines = ["| direction | n | judge flips | judge flip rate (95% CI) | closer | closer share (95% CI) |",
             "| --- | ---: | ---: | --- | ---: | --- |"]
    for name, (f, n, c) in result.per_direction.items():
        ci_f, ci_c = wilson_interval(f, n), wilson_interval(c, f)
        lines.append(f"| {name} | {n} | {f} | {_fmt(f / n if n else None)}"
                     f"{f' ({ci_f[0]:.2f}-{ci_f[1]:.2f})' if n else ''} | {c} | {_fmt(c / f if f else None)}"
                     f"{f' ({ci_c[0]:.2f}-{ci_c[1]:.2f})' if f else ''} |")
    return "\n".join(lines)


def snippet(chosen: SettingResult, pairs: Sequence[Tuple[str, str]], per_class: int) -> str:
    s = chosen.setting
    thr = "null" if s.flip_threshold is None else f"{s.flip_threshold:g}"
    return (f"# chosen by scripts/calibrate.py on {per_class} validation images per class (train split) of "
            f"{', '.join('/'.join(p) for p in pairs)}\n"
            f"eta: [{s.eta:g}]\nguidance_scale: {s.guidance_scale:g}\nflip_threshold: {thr}\n"
            f"flip_agreement: {s.flip_agreement}\n")
