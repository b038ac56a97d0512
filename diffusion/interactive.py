"""One image at a time: scripts/edit_image.py (an edit and its teaching views as files) and the local app
(diffusion/app.py, live sliders), both thin over the public API (:class:`~diffusion.pipeline.DIFFusionPipeline`).

:func:`load_workbench` loads, once, what an editing run loads: the pipeline (with any LoRA adapter), the class means
of ``embeds_dir`` (embedding the train split first when ``compute_missing_embeds``), the oracle of ``oracle_dir`` and
the judge of ``judge_dir``. An :class:`EditSession` keeps the :class:`~diffusion.edit.editor.Inversion` of the
images it has edited: ``pipe.invert`` runs once per image (MoVQ encode, CLIP embedding, the forward noise), the noise
maps are computed lazily, as deep as the deepest t_skip asked for so far, so another eta or a milder t_skip costs only
its sampling, and a deeper one only the steps the inversion lacks.

An image is seeded as the editing run seeds it (``image_seed(seed, path relative to data.root)``), so an eval image
edited here gets the same noise, and the same counterfactual, as in kandinsky_eval.py; an image from elsewhere (or
an upload) is seeded by a hash of its pixels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from PIL import Image

from diffusion.config import SEARCHES, EditConfig, SearchMode
from diffusion.edit.editor import Inversion, Oracle, classify
from diffusion.errors import ConfigError
from diffusion.files import atomic_write_json
from diffusion.pipeline import ClassDirection, DIFFusionPipeline, Edit

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# What is loaded once
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Workbench:
    """The loaded parts of an editing config: pipeline, class means mu_c (one per class of the data config), and the
    oracle (the search consults it) and judge (evaluation only), either of which may be None."""

    cfg: EditConfig
    pipe: DIFFusionPipeline
    means: Dict[str, torch.Tensor]  # class -> (D,) mean of the L2-normalised train embeddings
    oracle: Optional[Oracle] = None
    judge: Optional[Oracle] = None

    @property
    def classes(self) -> List[str]:
        return list(self.means)

    def with_config(self, cfg: EditConfig) -> "Workbench":
        """The same loaded parts under another config of the same model, data and embeddings (other eta, t_skip,
        search, guidance, seed, T, views)."""
        return Workbench(cfg, self.pipe, self.means, self.oracle, self.judge)

    def direction(self, source: str, target: str) -> ClassDirection:
        """mu_target - mu_source, checked: both must be classes of the data config, and differ."""
        check_classes(self.classes, source, target)
        return ClassDirection(self.means[source], self.means[target], source, target)


def check_classes(classes: Sequence[str], source: Optional[str], target: str) -> None:
    """A ConfigError naming the class and the known ones, unless ``target`` (and ``source`` when given) are classes of
    the data config and differ."""
    for role, name in (("target", target), ("source", source)):
        if name is not None and name not in classes:
            raise ConfigError(f"unknown {role} class '{name}': the config's classes are {list(classes)} (data.classes "
                              "names them; each needs a class mean in embeds_dir)")
    if source is not None and source == target:
        raise ConfigError(f"source and target are both '{target}': pick another target class")


def load_workbench(cfg: EditConfig, device: Optional[torch.device] = None, oracle: Optional[Oracle] = None,
                   judge: Optional[Oracle] = None) -> Workbench:
    """Load everything an interactive edit of ``cfg`` needs, as the editing run loads it and with the run's checks,
    the small and failure-prone parts first (the data's classes, T, the classifier folders), so a bad folder stops
    in seconds, before the decoder loads. ``oracle`` / ``judge``: classifiers to use instead of loading
    ``oracle_dir`` / ``judge_dir`` (tests, notebooks)."""
    from diffusion.data import dataset_classes
    from diffusion.devices import resolve_device
    from diffusion.edit.run import Classifiers, check_inputs, load_classifiers, load_means, load_pipeline

    device = device or resolve_device(cfg.model.device)
    classes = dataset_classes(cfg.data)
    given = Classifiers(oracle, judge)
    check_inputs(cfg, given)
    clf = load_classifiers(cfg, classes, device, given)
    pipe = load_pipeline(cfg, device)
    means = load_means(cfg, pipe, classes)
    log.info("workbench: classes %s, T=%d, guidance %g, oracle %s, judge %s, device %s", classes,
             cfg.num_inference_steps, cfg.guidance_scale, "yes" if clf.oracle is not None else "none",
             "yes" if clf.judge is not None else "none", pipe.device)
    return Workbench(cfg, pipe, means, clf.oracle, clf.judge)


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SourceImage:
    """An image as the model sees it, with what identifies it."""

    pixels: torch.Tensor  # (3, S, S) float32 in [0, 1] at the decoder's size
    key: str  # its seed key: the path relative to data.root for a dataset file (the run's key), else a pixel hash
    name: str  # a short name for titles and folders
    label: Optional[str] = None  # its class folder, for an image of the dataset's eval split

    @functools.cached_property
    def digest(self) -> str:
        return pixel_digest(self.pixels)


def pixel_digest(pixels: torch.Tensor) -> str:
    """A short hash of an image's pixels: two images with the same digest get the same noise."""
    return hashlib.sha1(pixels.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def read_image_file(path: Union[str, Path], cfg: EditConfig) -> torch.Tensor:
    """The image file as a (3, H, W) tensor in [0, 1] (any mode, or .npy), read before any model loads; a missing or
    unreadable file raises ``datasets.images.BadImageError`` naming it."""
    from datasets.images import load_image

    return load_image(path, background=tuple(cfg.data.background))


def source_image(pipe: DIFFusionPipeline, image: Union[str, Path, torch.Tensor, Image.Image], cfg: EditConfig,
                 name: Optional[str] = None, label: Optional[str] = None) -> SourceImage:
    """A :class:`SourceImage` from a file (seeded by its path relative to data.root when it lies there, as the run
    seeds it) or from pixels (a PIL image or a (3, H, W) tensor: seeded by their hash)."""
    from diffusion.files import relative_path

    if isinstance(image, (str, Path)):
        pixels = pipe.preprocess(read_image_file(image, cfg))[0]
        rel = relative_path(image, cfg.data.root)
        key = rel if not Path(rel).is_absolute() else f"pixels:{pixel_digest(pixels)}"
        return SourceImage(pixels, key, name or Path(image).stem, label)
    pixels = pipe.preprocess(image)[0]
    digest = pixel_digest(pixels)
    return SourceImage(pixels, f"pixels:{digest}", name or f"image-{digest[:8]}", label)


# --------------------------------------------------------------------------------------------------------------------
# A session: cached inversions
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Timed:
    """The result of a session call and what it cost."""

    edit: Edit
    seconds: float
    inverted: bool  # pipe.invert ran for this call (the image was not cached)
    inversion_steps: int  # noise maps this call added to the image's inversion


class EditSession:
    """Edits of one image after another with one loaded :class:`Workbench`. The inversions of the last
    ``cache_size`` images are kept, so moving eta or t_skip re-runs only the sampling. Calls are serialised (one
    lock): the cached inversions are extended in place and the app may call from several threads."""

    def __init__(self, bench: Workbench, cache_size: int = 4):
        self.bench = bench
        self.cache_size = int(cache_size)
        self._inversions: "OrderedDict[str, Inversion]" = OrderedDict()
        self._lock = threading.RLock()

    @property
    def cfg(self) -> EditConfig:
        return self.bench.cfg

    @staticmethod
    def seed_of(cfg: EditConfig, image: SourceImage) -> int:
        """The image's seed, as the editing run computes it."""
        from diffusion.edit.run import image_seed

        return image_seed(cfg.seed, image.key)

    def seed(self, image: SourceImage) -> int:
        return self.seed_of(self.cfg, image)

    def inversion(self, image: SourceImage) -> Inversion:
        """The (lazy) inversion of ``image``: cached, else ``pipe.invert`` with the config's T, conditioning and the
        image's seed."""
        cache_key = f"{image.key}|{image.digest}"
        with self._lock:
            inv = self._inversions.get(cache_key)
            if inv is None:
                generator = torch.Generator().manual_seed(self.seed(image))
                inv = self.bench.pipe.invert(image.pixels[None], self.cfg.num_inference_steps, [generator],
                                             self.cfg.inversion, self.cfg.inversion_guidance)
                self._inversions[cache_key] = inv
                while len(self._inversions) > self.cache_size:
                    self._inversions.popitem(last=False)
            self._inversions.move_to_end(cache_key)
            return inv

    def is_cached(self, image: SourceImage) -> bool:
        return f"{image.key}|{image.digest}" in self._inversions

    def predict(self, image: SourceImage, judge: bool = False) -> Optional[Dict[str, float]]:
        """The oracle's (or the judge's) probability of each class on the original; None without one."""
        classifier = self.bench.judge if judge else self.bench.oracle
        if classifier is None:
            return None
        probs = classify(classifier, image.pixels[None])[0]
        return {str(c): float(p) for c, p in zip(classifier.classes, probs[0])}

    def _call(self, image: SourceImage, source: str, target: str, **kwargs: Any) -> Timed:
        direction = self.bench.direction(source, target)
        with self._lock:
            start = time.perf_counter()
            inverted = not self.is_cached(image)
            inv = self.inversion(image)
            before = int(inv.counter[0])
            out = self.bench.pipe(inv, direction, guidance_scale=self.cfg.guidance_scale, oracle=self.bench.oracle,
                                  judge=self.bench.judge, flip_threshold=self.cfg.flip_threshold,
                                  flip_agreement=self.cfg.flip_agreement, output_type="pt", **kwargs)
            steps = int(inv.counter[0]) - before
            return Timed(out.edits[0], time.perf_counter() - start, inverted, steps)

    def edit(self, image: SourceImage, source: str, target: str, eta: float, t_skip: float) -> Timed:
        """The counterfactual at one (eta, t_skip): what a slider move asks for."""
        return self._call(image, source, target, eta=float(eta), t_skip=float(t_skip))

    @property
    def search_mode(self) -> SearchMode:
        """The search :meth:`search` runs: the config's first_flip or bisect; first_flip when the config edits at a
        fixed t_skip (or sweeps)."""
        return self.cfg.search if self.cfg.search in SEARCHES else SearchMode.first_flip

    def search(self, image: SourceImage, source: str, target: str, eta: float) -> Timed:
        """The t_skip search (:attr:`search_mode` over ``t_skips``, with the config's flip criterion) at one eta;
        needs an oracle. An original the oracle already assigns to the target is not searched (the edit then has no
        picture and ``already_target``)."""
        if self.bench.oracle is None:
            raise ConfigError("the t_skip search needs an oracle: set oracle_dir (a scripts/train_classifiers.py "
                              "folder)", key="oracle_dir")
        return self._call(image, source, target, eta=float(eta), t_skip=list(self.cfg.t_skips),
                          search=self.search_mode)

    def strip(self, image: SourceImage, source: str, target: str, etas: Sequence[float],
              t_skip: float) -> List[Edit]:
        """One re-decoding per eta in ``etas`` at ``t_skip`` (the interpolation strip), with the oracle's view."""
        direction = self.bench.direction(source, target)
        with self._lock:
            inv = self.inversion(image)
            out = self.bench.pipe.interpolate(inv, direction, [float(e) for e in etas], float(t_skip),
                                              self.cfg.guidance_scale, oracle=self.bench.oracle, output_type="pt")
        return out.edits


# --------------------------------------------------------------------------------------------------------------------
# scripts/edit_image.py
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ImageEdits:
    """What :func:`edit_image_files` made: the edits (one per eta) and the files written."""

    image: SourceImage
    source: str
    source_from: str  # "option" (given) or "oracle" (its prediction on the original)
    target: str
    mode: str  # the search, or "fixed"
    edits: List[Edit]
    files: Dict[str, Path] = field(default_factory=dict)  # name -> path, in the order written


def plan_mode(cfg: EditConfig) -> SearchMode:
    """How the t_skip of a one-image edit is chosen: the config's search (first_flip or bisect, consulting the
    oracle), or its fixed ``t_skip``. ``search: sweep`` is for analysis runs (kandinsky_eval.py)."""
    if cfg.search == SearchMode.sweep:
        raise ConfigError("search: sweep tries every t_skip and is for kandinsky_eval.py; for one image use "
                          "search=first_flip or bisect (with an oracle), or search=fixed t_skip=T (--t_skip T)",
                          key="search")
    return cfg.search


def edit_image_files(cfg: EditConfig, image_path: Union[str, Path], target: str, source: Optional[str] = None,
                     output: Optional[Union[str, Path]] = None, bench: Optional[Workbench] = None) -> ImageEdits:
    """Edit one image file towards class ``target`` and write the counterfactual, the side-by-side pair, the flicker
    GIF, the difference map (one of each per eta of ``cfg.eta``), the interpolation strip and ``edit.json`` into
    ``output`` (default ``<output_dir>/single/<image>_to_<target>``), stamped with the config.

    ``source`` defaults to the oracle's prediction on the image. t_skip is searched as the config says (``search``
    first_flip or bisect over ``t_skips``, consulting the oracle), or is ``t_skip`` with ``search: fixed``.
    Everything a user can get wrong (the image, a class, no oracle and no source) is refused before the decoder
    loads. ``bench``: an already loaded :class:`Workbench` of the same model, data and embeddings (it is used
    under ``cfg``).
    """
    from diffusion.data import dataset_classes

    read_image_file(image_path, cfg)  # a bad file stops here, naming it
    classes = dataset_classes(cfg.data)
    check_classes(classes, source, target)
    has_oracle = bench.oracle is not None if bench is not None else cfg.oracle_dir is not None
    if source is None and not has_oracle:
        raise ConfigError(f"no source class for {image_path}: pass --source CLASS (one of {classes}), or set "
                          "oracle_dir so the oracle's prediction is used", key="oracle_dir")
    mode = plan_mode(cfg)
    bench = bench.with_config(cfg) if bench is not None else load_workbench(cfg)
    session = EditSession(bench)
    image = source_image(bench.pipe, image_path, cfg)
    source_from = "option"
    before = session.predict(image)
    if source is None:
        assert before is not None  # there is an oracle (checked above)
        source, source_from = max(before, key=before.get), "oracle"
        log.info("source class: the oracle's prediction '%s' (p %.3f)", source, before[source])
        if source == target:
            raise ConfigError(f"the oracle already calls {image_path} '{target}' (p {before[target]:.3f}): pick "
                              "another target, or pass --source to say what it is")
        check_classes(classes, source, target)
    elif mode in SEARCHES and before is not None and max(before, key=before.get) == target:
        raise ConfigError(f"the oracle already calls {image_path} '{target}' (p {before[target]:.3f}), so there is "
                          "no flip to search for: pass --t_skip to edit it at a fixed t_skip anyway")
    edits = []
    for eta in cfg.eta:
        if mode in SEARCHES:
            timed = session.search(image, source, target, eta)
        else:
            timed = session.edit(image, source, target, eta, cfg.t_skip)
        edits.append(timed.edit)
        log.info("eta %g: t_skip %s, oracle %s, %d UNet evaluations, %.2f s", eta, timed.edit.t_skip,
                 _describe_probs(timed.edit.probs, target), timed.edit.unet_evals, timed.seconds)
    strip = session.strip(image, source, target, cfg.views.strip_etas, cfg.views.strip_t_skip)
    result = ImageEdits(image, source, source_from, target, mode.value, edits)
    out = Path(output) if output is not None else Path(cfg.output_dir) / "single" / f"{image.name}_to_{target}"
    write_image_edits(result, strip, out, cfg, before)
    return result


def _describe_probs(probs: Optional[Dict[str, float]], target: str) -> str:
    return "n/a" if probs is None else f"p({target}) {probs[target]:.3f}"


def write_image_edits(result: ImageEdits, strip: List[Edit], out: Path, cfg: EditConfig,
                      probs_before: Optional[Dict[str, float]]) -> Dict[str, Path]:
    """The files of :func:`edit_image_files` (names gain ``_eta<eta>`` when there are several etas)."""
    from diffusion.runinfo import stamp_run_dir
    from diffusion.views.images import (
        StripFrame, save_difference_map, save_flicker_gif, save_image, save_pair, save_strip, to_pil,
    )

    stamp_run_dir(cfg, output_dir=out, has_results=lambda _: False,  # the folder holds the latest edit only
                  extra={"image": result.image.key, "source": result.source, "target": result.target})
    files = result.files
    original = to_pil(result.image.pixels)
    files["original"] = save_image(result.image.pixels, out / "original.png")
    entries = []
    for e in result.edits:
        suffix = f"_eta{e.eta:g}" if len(result.edits) > 1 else ""
        entry: Dict[str, Any] = {"eta": e.eta, "t_skip": e.t_skip, "flipped": e.flipped, "probs": e.probs,
                                 "judge_probs": e.judge_probs, "unet_evals": e.unet_evals, "attempts": e.attempts,
                                 "criterion": e.criterion, "files": {}}
        if e.picture is not None:
            cf = to_pil(e.picture)
            paths = {
                "counterfactual": save_image(e.picture, out / f"counterfactual{suffix}.png"),
                "pair": save_pair(result.image.pixels, e.picture, out / f"pair{suffix}.png"),
                "flicker": save_flicker_gif(original, cf, out / f"flicker{suffix}.gif", cfg.views.gif_frame_ms),
                "difference": out / f"difference{suffix}.png",
            }
            entry["difference_scale"] = save_difference_map(original, cf, paths["difference"])
            entry["files"] = {k: p.name for k, p in paths.items()}
            files.update({f"{k}{suffix}": p for k, p in paths.items()})
        entries.append(entry)
    shown = [f for f in strip if f.picture is not None]
    frames = [StripFrame(original, "original", probs_before.get(result.target) if probs_before else None)]
    frames += [StripFrame(to_pil(f.picture), f"eta {f.eta:g}", f.probs.get(result.target) if f.probs else None)
               for f in shown]
    files["strip"] = out / "strip.png"
    save_strip(frames, files["strip"])
    summary = {
        "image": result.image.key, "name": result.image.name, "source": result.source,
        "source_from": result.source_from, "target": result.target, "search": result.mode,
        "t_skips": list(cfg.t_skips) if result.mode != SearchMode.fixed.value else None,
        "seed": EditSession.seed_of(cfg, result.image), "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps, "probs_before": probs_before,
        "judge_probs_before": result.edits[0].judge_probs_before if result.edits else None,
        "edits": entries,
        "strip": {"file": "strip.png", "t_skip": cfg.views.strip_t_skip,
                  "frames": [{"caption": f.caption, "target_prob": f.target_prob} for f in frames]},
    }
    files["edit.json"] = atomic_write_json(out / "edit.json", summary)
    return files
