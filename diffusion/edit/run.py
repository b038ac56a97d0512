"""kandinsky_eval.py's work: every eval image of each source class edited towards its target class(es).

A loop over :class:`~diffusion.pipeline.DIFFusionPipeline`: per loader batch, ``pipe.embed``, ``pipe.invert`` and one
``pipe(...)`` call for all its items, then the strips (``pipe.interpolate``) and the files. Resumable (rows already in
results.csv or a shard are skipped), and data-parallel under ``accelerate launch``: the pending images are split
across processes, each appends to its own shard, the main process merges them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from datasets.folder import ImageRecord
from diffusion.config import SEARCHES, EditConfig, SearchMode
from diffusion.data import dataset_classes, make_loader, split_records
from diffusion.devices import dtype_name, resolve_device, resolve_dtype
from diffusion.edit.editor import Oracle
from diffusion.edit.results import ResultsWriter, fmt, merge_shards, row_key
from diffusion.embeddings import load_class_means, mean_geometry
from diffusion.errors import ConfigError
from diffusion.files import atomic_write_json, atomic_write_text, relative_path, run_lock
from diffusion.metrics import Lpips, pixel_l2, summarize
from diffusion.pipeline import ClassDirection, DIFFusionOutput, DIFFusionPipeline
from diffusion.runinfo import stamp_run_dir
from diffusion.views.images import save_image, save_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditItem:
    """One image with one target class."""

    record: ImageRecord
    rel_path: str  # relative to the data root: the row's source_path
    target: str

    @property
    def out_dir(self) -> str:
        """``edits/<source>_to_<target>/<file name>-<hash>``: readable, stable across runs, and unique by
        construction (the hash is of the image's path within the data root, so ``x.y.png`` and ``x_y.png`` of one
        class never share a folder)."""
        name = Path(self.rel_path).name.replace(".", "_")
        return f"edits/{self.record.class_name}_to_{self.target}/{name}-{zlib.crc32(self.rel_path.encode()):08x}"


def resolve_directions(cfg: EditConfig, classes: Sequence[str]) -> List[Tuple[str, str]]:
    """[source, target] pairs: as configured, or both ways when the dataset has exactly two classes."""
    if cfg.directions:
        for src, tgt in cfg.directions:
            for c in (src, tgt):
                if c not in classes:
                    raise ConfigError(f"directions: class '{c}' is not one of the dataset's classes {list(classes)}",
                                      key="directions")
        return [(s, t) for s, t in cfg.directions]
    if len(classes) != 2:
        raise ConfigError(f"the dataset has {len(classes)} classes {list(classes)}: name the pairs to edit in "
                          "'directions', e.g. directions=[[a,b],[b,a]], or set data.classes to two of them",
                          key="directions")
    return [(classes[0], classes[1]), (classes[1], classes[0])]


def image_seed(base_seed: int, rel_path: str) -> int:
    """A per-image seed from the run seed and the image's path: the same image gets the same noise whatever its
    batch, process or position in the run."""
    return (base_seed * 1_000_003 + zlib.crc32(rel_path.encode())) % (2**63)


def plan_items(cfg: EditConfig, classes: List[str]) -> List[EditItem]:
    directions = resolve_directions(cfg, classes)
    sources = sorted({s for s, _ in directions}, key=classes.index)
    records = split_records(cfg.data, cfg.data.eval_split, sources, use_file_lists=True)
    items = []
    for r in records:
        rel = relative_path(r.path, cfg.data.root)
        items += [EditItem(r, rel, t) for s, t in directions if s == r.class_name]
    return items


def expected_keys(cfg: EditConfig, item: EditItem) -> List[tuple]:
    search = cfg.search.value
    t_skips = cfg.t_skips if cfg.search == SearchMode.sweep else [0.0]
    return [row_key({"source_path": item.rel_path, "target_class": item.target, "eta": eta, "t_skip": t,
                     "search": search}) for eta in cfg.eta for t in t_skips]


@dataclass
class Classifiers:
    """The run's two classifiers: the oracle the search consults, and the judge that only evaluates (either None)."""

    oracle: Optional[Oracle] = None
    judge: Optional[Oracle] = None


def _load_classifier(folder: Optional[str], key: str, classes: List[str], device: torch.device) -> Optional[Oracle]:
    if folder is None:
        return None
    from diffusion.oracle.members import load_oracle as _load

    classifier = _load(folder, device=device)
    _check_classes(classifier, key, folder, classes)
    summary = getattr(classifier, "accuracy_summary", None)
    # with the run's two classes the line adds the accuracy on that pair alone, the figure that matters here
    log.info("%s: %s", key.replace("_dir", ""),
             summary(classes) if callable(summary) else f"{folder} (no accuracy record)")
    return classifier


def _check_classes(classifier: Oracle, key: str, folder: Optional[str], classes: List[str]) -> None:
    missing = [c for c in classes if c not in [str(k) for k in classifier.classes]]
    if missing:
        raise ConfigError(f"{key} {folder}: it knows the classes {list(classifier.classes)}, not {missing}; train one "
                          f"on this dataset's classes (scripts/train_classifiers.py), or edit only classes it knows "
                          "(data.classes / directions)", key=key)


def load_classifiers(cfg: EditConfig, classes: List[str], device: torch.device,
                     given: Optional[Classifiers] = None) -> Classifiers:
    """The oracle and the judge of a run (``given`` ones, e.g. from a test, win), checked to know the run's classes;
    a judge that is not independent of the oracle gets a warning saying why."""
    given = given or Classifiers()
    oracle = given.oracle or _load_classifier(cfg.oracle_dir, "oracle_dir", classes, device)
    judge = given.judge or _load_classifier(cfg.judge_dir, "judge_dir", classes, device)
    for name, c in (("oracle_dir", given.oracle), ("judge_dir", given.judge)):
        if c is not None:
            _check_classes(c, name, "(given)", classes)
    if cfg.oracle_dir and cfg.judge_dir:
        from diffusion.oracle.members import independence_warnings

        for warning in independence_warnings(cfg.oracle_dir, cfg.judge_dir):
            log.warning("judge_dir is not independent of oracle_dir: %s", warning)
    if judge is None and oracle is not None:
        log.warning("no judge_dir: the flip rate will be judged by the oracle that chose the edits (optimistic by "
                    "construction); set judge_dir to an independent classifier folder")
    return Classifiers(oracle, judge)


def check_inputs(cfg: EditConfig, given: Optional["Classifiers"] = None) -> None:
    """What can be checked without loading weights, before anything is written: T against the scheduler, the LoRA
    adapter's folder, the classifier folders (those not ``given`` as objects)."""
    from diffusion.models import check_num_inference_steps

    check_num_inference_steps(cfg.model, cfg.num_inference_steps)
    if cfg.lora.path:
        from diffusion.lora import adapter_dir

        adapter_dir(cfg.lora.path, cfg.lora.step)
    for key in ("oracle_dir", "judge_dir"):
        folder = getattr(cfg, key)
        if given is not None and getattr(given, key[:-4]) is not None:
            continue
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{key} = {folder} does not exist: train one with scripts/train_classifiers.py "
                              f"--config_path configs/classifier/<dataset>.yaml, or fix the path", key=key)


def run_edits(cfg: EditConfig, oracle: Optional[Oracle] = None,
              judge: Optional[Oracle] = None) -> Optional[Dict[str, object]]:
    """The whole editing run; returns the summary on the main process (None on the others). ``oracle`` / ``judge``:
    classifiers to use instead of loading ``oracle_dir`` / ``judge_dir`` (tests, notebooks)."""
    from accelerate import PartialState

    # cpu=True lets torchrun/accelerate start several CPU processes (gloo) on a machine without CUDA
    state = PartialState(cpu=resolve_device(cfg.model.device).type == "cpu")
    classes = dataset_classes(cfg.data)
    items = plan_items(cfg, classes)  # lists and checks the data before any model loads
    check_inputs(cfg, Classifiers(oracle, judge))
    out = Path(cfg.output_dir)
    device = _device(cfg, state)
    resolved = {"dtype": dtype_name(resolve_dtype(cfg.model.dtype, device))}
    with run_lock(out) if state.is_main_process else contextlib.nullcontext():  # one run per folder
        if state.is_main_process:  # a folder with no result yet (a run that failed early) accepts a corrected config
            _warn_changed_strips(cfg, out)
            stamp_run_dir(cfg, has_results=lambda folder: bool(ResultsWriter.existing_keys(folder)),
                          resolved=resolved)
        state.wait_for_everyone()
        writer = ResultsWriter(out, rank=state.process_index)
        done = writer.done_keys()
        pending = [it for it in items if not set(expected_keys(cfg, it)) <= done]
        log.info("%d (image, target) pairs, %d already done, %d to do", len(items), len(items) - len(pending),
                 len(pending))
        with state.split_between_processes(pending) as mine:
            if mine:
                _edit_items(cfg, list(mine), classes, writer, done, state, Classifiers(oracle, judge))
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        return finish_run(cfg, items)


def _warn_changed_strips(cfg: EditConfig, out: Path) -> None:
    """Strips need the model, so a resumed run cannot remake the ones already written: say so when the strip
    settings changed (each strip's captions still say its own etas and t_skip)."""
    from diffusion.runinfo import read_stamped_config

    old = (read_stamped_config(out) or {}).get("views") or {}
    if not ResultsWriter.existing_keys(out):
        return
    for key in ("strip_etas", "strip_t_skip"):
        if key in old and old[key] != getattr(cfg.views, key):
            log.warning("views.%s changed from %s to %s: images edited before keep their strips with the old value "
                        "(use a new output_dir for uniform strips)", key, old[key], getattr(cfg.views, key))


def _device(cfg: EditConfig, state) -> torch.device:
    return state.device if state.num_processes > 1 else resolve_device(cfg.model.device)


def load_pipeline(cfg: EditConfig, device: torch.device) -> DIFFusionPipeline:
    """The pipeline of an editing config: the models on ``device``, its LoRA adapter and GPU settings, and the class
    embeddings computed first when ``compute_missing_embeds`` (the run, the one-image command and the app share it)."""
    pipe = DIFFusionPipeline.from_config(cfg.model, device=device, batch_size=cfg.batch_size,
                                         background=tuple(cfg.data.background))
    if cfg.lora.path:
        pipe.load_lora(cfg.lora.path, cfg.lora.step, cfg.lora.scale)
    pipe.optimize(cfg.model)
    if cfg.compute_missing_embeds:
        from diffusion.precompute import compute_missing_class_embeddings

        compute_missing_class_embeddings(cfg, pipe.encoder)
    return pipe


def load_means(cfg: EditConfig, pipe: DIFFusionPipeline, classes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The class means of ``classes`` from ``embeds_dir``, checked to come from this pipeline's image encoder."""
    return load_class_means(cfg.embeds_dir, list(classes), pipe.encoder.embed_dim, cfg.class_mean_images,
                            expected_encoder=pipe.encoder.fingerprint)


def _edit_items(cfg: EditConfig, items: List[EditItem], classes: List[str], writer: ResultsWriter, done: set,
                state, given: Classifiers) -> None:
    device = _device(cfg, state)
    # the small, most failure-prone parts first, so an unusable oracle, judge or LPIPS stops the run in seconds
    involved = [c for c in classes if any(c in pair for pair in resolve_directions(cfg, classes))]
    clf = load_classifiers(cfg, involved, device, given)
    lpips = Lpips(device) if cfg.lpips else None
    pipe = load_pipeline(cfg, device)
    means = load_means(cfg, pipe, involved)
    log.info("edit: %d items, T=%d, guidance %g, eta %s, search %s, t_skips %s, batch %d, device %s, dtype %s",
             len(items), cfg.num_inference_steps, cfg.guidance_scale, list(cfg.eta), cfg.search.value,
             sorted(cfg.t_skips, reverse=True) if cfg.search != SearchMode.fixed else [cfg.t_skip], cfg.batch_size,
             pipe.device, str(pipe.dtype).replace("torch.", ""))
    by_path: Dict[str, List[EditItem]] = {}
    for it in items:
        by_path.setdefault(str(it.record.path), []).append(it)
    records = list({str(it.record.path): it.record for it in items}.values())
    loader = make_loader(records, cfg.data, pipe.image_size, cfg.batch_size)
    bar = tqdm(total=len(items), desc="edit", unit="item", disable=not state.is_local_main_process)
    for batch in loader:
        if batch is None:
            continue
        start = time.perf_counter()
        batch_items, image_of_item = [], []
        for k, path in enumerate(batch["path"]):
            for it in by_path[path]:
                batch_items.append(it)
                image_of_item.append(k)
        rows = _edit_batch(cfg, pipe, means, clf, lpips, batch_items, batch["pixel_values"], image_of_item, done)
        seconds = (time.perf_counter() - start) / max(1, len(batch_items))
        for row in rows:
            row["seconds"] = seconds / sum(1 for r in rows if r["source_path"] == row["source_path"])
        writer.append(rows)
        bar.update(len(batch_items))
    bar.close()


def _edit_batch(cfg: EditConfig, pipe: DIFFusionPipeline, means: Dict[str, torch.Tensor], clf: Classifiers, lpips,
                items: List[EditItem], sources: torch.Tensor, image_of_item: List[int],
                done: set) -> List[Dict[str, object]]:
    """Edit the items of one loader batch: ``sources`` (U, 3, H, W) the distinct images, ``image_of_item`` the image
    of each item (an image with several target classes is embedded, classified and inverted once)."""
    out = Path(cfg.output_dir)
    first_item = {u: k for k, u in reversed(list(enumerate(image_of_item)))}
    seeds = [image_seed(cfg.seed, it.rel_path) for it in items]
    generators = [torch.Generator().manual_seed(seeds[first_item[u]]) for u in range(len(sources))]
    inv = pipe.invert(sources, cfg.num_inference_steps, generators, cfg.inversion, cfg.inversion_guidance)
    directions = [ClassDirection(means[it.record.class_name], means[it.target], it.record.class_name, it.target)
                  for it in items]
    t_skips = [cfg.t_skip] if cfg.search == SearchMode.fixed else list(cfg.t_skips)
    result = pipe(inv, directions, eta=list(cfg.eta), t_skip=t_skips, guidance_scale=cfg.guidance_scale,
                  search=cfg.search if cfg.search in SEARCHES else None,
                  oracle=clf.oracle, judge=clf.judge, flip_threshold=cfg.flip_threshold,
                  flip_agreement=cfg.flip_agreement, image_index=image_of_item)
    for it, u in zip(items, image_of_item):
        save_image(sources[u], out / it.out_dir / "original.png")
    if cfg.views.enabled:
        _save_strips(cfg, pipe, inv, items, directions, image_of_item, clf.oracle)
    return _rows(cfg, result, items, sources, seeds, clf, lpips, done)


def _rows(cfg: EditConfig, result: DIFFusionOutput, items: List[EditItem], sources: torch.Tensor,
          seeds: List[int], clf: Classifiers, lpips, done: set) -> List[Dict[str, object]]:
    """One results row per chosen edit (per t_skip too for sweep), and its files. An item whose original the oracle
    already assigns to the target class gets a row (already_target = 1) but no edit."""
    out = Path(cfg.output_dir)
    per_item = len(cfg.eta) * (len(cfg.t_skips) if cfg.search == SearchMode.sweep else 1)
    shown = [n for n, e in enumerate(result.edits) if e.picture is not None]
    l2: Dict[int, float] = {}
    dist: Dict[int, float] = {}
    if shown:
        chosen = torch.stack([result.edits[n].picture for n in shown])
        originals = sources[[result.edits[n].image for n in shown]]
        l2 = dict(zip(shown, pixel_l2(originals, chosen).tolist()))
        if lpips is not None:
            dist = dict(zip(shown, lpips(originals, chosen).tolist()))
    attempts_of: Dict[Tuple[int, float], List[dict]] = {}
    for a in result.attempts:
        attempts_of.setdefault((a["item"], a["eta"]), []).append(a)
    rows = []
    for n, e in enumerate(result.edits):
        k = n // per_item  # the item of this edit (edits are items outermost)
        it = items[k]
        suffix = f"eta{e.eta:g}" + (f"_t{e.t_skip:g}" if cfg.search == SearchMode.sweep else "")
        row: Dict[str, object] = {
            "source_path": it.rel_path, "source_class": it.record.class_name, "target_class": it.target,
            "search": cfg.search.value, "t_skip": e.t_skip, "eta": e.eta, "guidance_scale": cfg.guidance_scale,
            "flipped": e.flipped, "already_target": e.already_target if clf.oracle is not None else None,
            "criterion": e.criterion, "l2": l2.get(n), "lpips": dist.get(n), "unet_evals": e.unet_evals,
            "inversion_evals": e.inversion_evals, "attempts": e.attempts, "seed": seeds[k],
            "original_path": f"{it.out_dir}/original.png",
        }
        if row_key(row) in done:
            continue
        if clf.oracle is not None:
            before = e.probs_before or {}
            row.update(oracle_pred_before=_argmax(before), oracle_prob_before=before.get(it.target),
                       oracle_prob_after=e.probs[it.target] if e.probs is not None else None)
        if clf.judge is not None:
            before, after = e.judge_probs_before or {}, e.judge_probs
            row.update(judge_pred_before=_argmax(before), judge_prob_before=before.get(it.target),
                       judge_prob_after=after[it.target] if after is not None else None,
                       # the judge's argmax, on an edit the search accepted (diffusion.pipeline.Edit.judge_flipped)
                       judge_flipped=bool(e.judge_flipped))
        if e.picture is not None:
            row.update(counterfactual_path=f"{it.out_dir}/cf_{suffix}.png", pair_path=f"{it.out_dir}/pair_{suffix}.png")
            save_image(e.picture, out / str(row["counterfactual_path"]))
            save_pair(sources[e.image], e.picture, out / str(row["pair_path"]))
        if cfg.save_attempts:
            for att in attempts_of.get((k, e.eta), []):
                save_image(att["picture"], out / it.out_dir / "attempts" / f"eta{att['eta']:g}_t{att['t_skip']:g}.png")
        rows.append(row)
    return rows


def _with_ci(value: Optional[float], ci: Optional[List[float]]) -> str:
    """'0.95 [0.76, 0.99]', or '' when there is no value."""
    if value is None:
        return ""
    return f"{value:.3g}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _argmax(probs: Dict[str, float]) -> Optional[str]:
    """The class with the highest finite probability (None when there is none: a NaN edit has no prediction)."""
    finite = {k: v for k, v in probs.items() if math.isfinite(v)}
    return max(finite, key=finite.get) if finite else None


def _save_strips(cfg: EditConfig, pipe: DIFFusionPipeline, inv, items: List[EditItem],
                 directions: List[ClassDirection], image_of_item: List[int], oracle) -> None:
    """Interpolation frames over views.strip_etas at views.strip_t_skip, with the oracle's target probability."""
    out = Path(cfg.output_dir)
    strip = pipe.interpolate(inv, directions, cfg.views.strip_etas, cfg.views.strip_t_skip, cfg.guidance_scale,
                             oracle=oracle, image_index=image_of_item)
    n = len(cfg.views.strip_etas)
    for k, it in enumerate(items):
        mine = strip.edits[k * n:(k + 1) * n]
        for f in mine:
            save_image(f.picture, out / it.out_dir / "strip" / f"eta{f.eta:g}.png")
        info = {
            "t_skip": cfg.views.strip_t_skip, "source_class": it.record.class_name, "target_class": it.target,
            "frames": [{"eta": f.eta, "path": f"strip/eta{f.eta:g}.png",
                        "target_prob": f.probs[it.target] if f.probs is not None else None} for f in mine],
        }
        atomic_write_text(out / it.out_dir / "strip.json", json.dumps(info, indent=1))


def finish_run(cfg: EditConfig, items: Optional[List[EditItem]] = None) -> Dict[str, object]:
    """Merge the shards into results.csv and write summary.json (main process). ``items``: every planned item; those
    with no row after a complete pass were left out as unreadable (data.on_bad_file: skip) and are listed."""
    out = Path(cfg.output_dir)
    rows = merge_shards(out)
    summary = summarize(rows)
    if items is not None:
        with_rows = {r["source_path"] for r in rows}
        summary["skipped_files"] = sorted({it.rel_path for it in items} - with_rows)
        if summary["skipped_files"]:
            log.warning("%d unreadable image(s) left out (data.on_bad_file: skip), listed in summary.json: %s",
                        len(summary["skipped_files"]), ", ".join(summary["skipped_files"][:5]))
    summary["settings"] = {
        "search": cfg.search.value, "eta": list(cfg.eta), "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps, "inversion": cfg.inversion.value,
        "t_skips": list(cfg.t_skips) if cfg.search != SearchMode.fixed else [cfg.t_skip],
        "decoder": cfg.model.decoder, "prior": cfg.model.prior, "lora": cfg.lora.path, "lora_step": cfg.lora.step,
        "oracle_dir": cfg.oracle_dir, "judge_dir": cfg.judge_dir, "flip_threshold": cfg.flip_threshold,
        "flip_agreement": cfg.flip_agreement.value,
    }
    try:
        classes = dataset_classes(cfg.data)
        summary["class_mean_geometry"] = mean_geometry(load_class_means(cfg.embeds_dir, classes, None,
                                                                        cfg.class_mean_images))
    except Exception as err:  # informative only; never fail a finished run over it
        log.warning("class-mean geometry not computed: %s", err)
    atomic_write_json(out / "summary.json", summary)
    log.info("results: %s (%d rows); flip rate: oracle %s, judge %s; L2 (flipped) %s, LPIPS (flipped) %s, UNet "
             "evals/image %s", out / "results.csv", len(rows),
             _with_ci(summary.get("flip_rate"), summary.get("flip_rate_ci")) or "n/a (no oracle)",
             _with_ci(summary.get("judge_flip_rate"), summary.get("judge_flip_rate_ci")) or "n/a (no judge_dir: the "
             "oracle's rate is not an independent measure)",
             _with_ci(summary.get("l2_mean"), summary.get("l2_mean_ci")) or "n/a",
             fmt(summary["lpips_mean"]) or "n/a", fmt(summary["unet_evals_per_image"]))
    if cfg.views.enabled:
        from diffusion.views.gallery import write_views

        write_views(out, frame_ms=cfg.views.gif_frame_ms)
    return summary
