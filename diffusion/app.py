"""The local app (``python scripts/app.py --config_path configs/edit/<dataset>.yaml``): pick an eval image or upload
one, pick the target class, move the eta and t_skip sliders, and see the counterfactual, the flicker, the difference
map and the classifiers' probabilities; "search" runs the configured t_skip search.

:class:`AppModel` is the app without Gradio (tests and benchmarks/app_latency.py call it directly); :func:`build_app`
lays it out as a Gradio Blocks; :func:`launch` serves it on 127.0.0.1. Everything runs offline: no analytics or
version check, no share link, no remote font or theme (system fonts), nothing the page loads from elsewhere.

One :class:`~diffusion.interactive.EditSession` serves every request, so the image's inversion is computed once
(``pipe.invert``) and a slider move costs only its sampling (plus the noise maps a deeper t_skip still lacks).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from diffusion.interactive import EditSession, SourceImage, Timed, source_image

log = logging.getLogger(__name__)

DISPLAY_SIZE = 256  # small images are shown enlarged by a whole factor to at least this many pixels (crisp)
KEPT_FILES = 48  # view files kept in the work folder (older ones are deleted: Gradio has copied them by then)

# The environment Gradio reads: no telemetry, no version check, no share link, no server-side rendering (Node).
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_SHARE": "False",
               "GRADIO_SSR_MODE": "False"}
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")
CSS = """
.pixelated img { image-rendering: pixelated; }
#status { min-height: 3em; }
"""


def enlarged(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """``image`` enlarged by the smallest whole factor that makes it at least ``size`` pixels wide (nearest
    neighbour, so a 32 px digit stays crisp); images that are large enough are returned as they are."""
    factor = math.ceil(size / image.width)
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


@dataclass
class Views:
    """What one slider move or search shows."""

    counterfactual: Optional[str]  # PNG path, enlarged for display; None: nothing to show (see status)
    flicker: Optional[str]  # GIF path: original <-> counterfactual
    difference: Optional[str]  # PNG path of the difference map, enlarged
    oracle: Optional[Dict[str, float]]  # the oracle's probability of each class on the edit
    judge: Optional[Dict[str, float]]  # the judge's, when judge_dir is set
    status: str  # one line of Markdown: the setting, the verdict, the cost
    t_skip: Optional[float]  # the edit's t_skip (a search's choice)
    seconds: float = 0.0  # the session call's time (sampling, and inversion steps it needed)


class AppModel:
    """The app's state and actions over one :class:`EditSession`: the eval images of the config, the images seen
    (by id), and the views of the latest edit (a repeated request with the same settings is answered from it)."""

    def __init__(self, session: EditSession, workdir: Optional[Path] = None):
        from diffusion.data import split_records
        from diffusion.files import relative_path

        self.session = session
        cfg = session.cfg
        # the views' files; a folder of our own is removed when the model is (or at exit)
        self._tmp = tempfile.TemporaryDirectory(prefix="diffusion-app-") if workdir is None else None
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        records = split_records(cfg.data, cfg.data.eval_split, self.classes, use_file_lists=True)
        self.eval_images = {relative_path(r.path, cfg.data.root): r for r in records}
        self._images: Dict[str, SourceImage] = {}
        self._files: List[Path] = []
        self._counter = itertools.count()
        self._last: Optional[Tuple[tuple, Views]] = None
        self._lock = threading.RLock()

    @property
    def classes(self) -> List[str]:
        return self.session.bench.classes

    @property
    def has_oracle(self) -> bool:
        return self.session.bench.oracle is not None

    @property
    def has_judge(self) -> bool:
        return self.session.bench.judge is not None

    def other_class(self, source: Optional[str], target: Optional[str]) -> str:
        """``target`` when it is a class other than ``source``, else the first class that is."""
        if target in self.classes and target != source:
            return target
        return next(c for c in self.classes if c != source)

    # --- images -----------------------------------------------------------------------------------------------
    def _remember(self, image: SourceImage) -> str:
        image_id = f"{image.key}|{image.digest}"
        with self._lock:
            self._images[image_id] = image
            while len(self._images) > 4 * self.session.cache_size:
                self._images.pop(next(iter(self._images)))
        return image_id

    def image(self, image_id: Optional[str]) -> Optional[SourceImage]:
        return self._images.get(image_id) if image_id else None

    def choose(self, name: str, target: Optional[str] = None) -> Tuple[str, str, str, str]:
        """An eval image by its name (path relative to data.root): (image id, its picture enlarged (a PNG path),
        source class = its class folder, target class)."""
        from diffusion.errors import ConfigError

        record = self.eval_images.get(name)
        if record is None:
            raise ConfigError(f"'{name}' is not an eval image of this config")
        image = source_image(self.session.bench.pipe, record.path, self.session.cfg, label=record.class_name)
        return self._remember(image), self.display(image), record.class_name, \
            self.other_class(record.class_name, target)

    def upload(self, picture: Image.Image, source: Optional[str], target: Optional[str]) -> Tuple[str, str, str]:
        """An uploaded picture: (image id, source class = the oracle's prediction, or ``source`` without an oracle,
        target class)."""
        # any mode: transparent pixels go over data.background, as the dataset loader puts them
        image = source_image(self.session.bench.pipe, picture, self.session.cfg, name="upload")
        probs = self.session.predict(image)
        if probs is not None:
            known = {c: p for c, p in probs.items() if c in self.classes}
            source = max(known, key=known.get) if known else source
        source = source if source in self.classes else self.classes[0]
        return self._remember(image), source, self.other_class(source, target)

    def display(self, image: SourceImage) -> str:
        from diffusion.views.images import save_pil, to_pil

        return self._file(lambda path: save_pil(enlarged(to_pil(image.pixels)), path), "original", "png")

    def _file(self, write, kind: str, ext: str) -> str:
        """A new file of the work folder, written by ``write(path)`` (atomically: the views' savers write a
        temporary file and rename it) under a name of its own, so no file is rewritten while the page may be
        reading it; the oldest beyond KEPT_FILES are deleted."""
        with self._lock:
            path = self.workdir / f"{kind}-{next(self._counter):06d}.{ext}"
            write(path)
            self._files.append(path)
            while len(self._files) > KEPT_FILES:
                self._files.pop(0).unlink(missing_ok=True)
        return str(path)

    # --- edits ------------------------------------------------------------------------------------------------
    def move(self, image_id: Optional[str], source: str, target: str, eta: float, t_skip: float) -> Views:
        """The views of the edit at (eta, t_skip): what a slider move shows."""
        image = self.image(image_id)
        if image is None:
            return self.empty("Pick an eval image or upload one.")
        if source == target:
            return self.empty(f"Source and target are both **{target}**: pick another target class.")
        request = (image_id, source, target, round(float(eta), 6), round(float(t_skip), 6))
        with self._lock:
            if self._last is not None and self._last[0] == request:
                return self._last[1]
            views = self._views(image, source, target, self.session.edit(image, source, target, eta, t_skip),
                                searched=False)
            self._last = (request, views)
            return views

    def search(self, image_id: Optional[str], source: str, target: str, eta: float) -> Views:
        """The views of the configured t_skip search's choice at ``eta``."""
        image = self.image(image_id)
        if image is None:
            return self.empty("Pick an eval image or upload one.")
        if source == target:
            return self.empty(f"Source and target are both **{target}**: pick another target class.")
        with self._lock:
            views = self._views(image, source, target, self.session.search(image, source, target, eta),
                                searched=True)
            if views.t_skip is not None:
                self._last = ((image_id, source, target, round(float(eta), 6), round(float(views.t_skip), 6)),
                              views)
            return views

    def empty(self, message: str) -> Views:
        return Views(None, None, None, None, None, message, None)

    def _views(self, image: SourceImage, source: str, target: str, timed: Timed, searched: bool) -> Views:
        from diffusion.views.images import difference_map, save_flicker_gif, save_pil, to_pil

        e = timed.edit
        if e.picture is None:  # a search on an original the oracle already assigns to the target
            p = (e.probs_before or {}).get(target)
            return self.empty(f"The oracle already calls this image **{target}** (p {p:.2f}): nothing to search. "
                              "Move the sliders to edit it anyway.")
        original, cf = enlarged(to_pil(image.pixels)), enlarged(to_pil(e.picture))
        diff, scale = difference_map(original, cf)
        frame_ms = self.session.cfg.views.gif_frame_ms
        views = Views(
            counterfactual=self._file(lambda path: save_pil(cf, path), "counterfactual", "png"),
            flicker=self._file(lambda path: save_flicker_gif(original, cf, path, frame_ms), "flicker", "gif"),
            difference=self._file(lambda path: save_pil(diff, path), "difference", "png"),
            oracle=e.probs, judge=e.judge_probs, status=self._status(source, target, timed, searched, scale),
            t_skip=e.t_skip, seconds=timed.seconds)
        return views

    def _status(self, source: str, target: str, timed: Timed, searched: bool, scale: float) -> str:
        e = timed.edit
        T = self.session.cfg.num_inference_steps
        steps = T - round(float(e.t_skip) * T)
        how = f"search ({self.session.search_mode.value}, {e.attempts} attempts) chose " if searched else ""
        parts = [f"**{source} → {target}**: {how}eta {e.eta:g}, t_skip {e.t_skip:g} ({steps} of {T} steps)"]
        for name, probs, before in (("oracle", e.probs, e.probs_before), ("judge", e.judge_probs,
                                                                           e.judge_probs_before)):
            if probs is not None:
                was = f" (original {before[target]:.2f})" if before else ""
                parts.append(f"{name} p({target}) {probs[target]:.2f}{was}")
        if e.flipped is not None:
            parts.append("**flipped**" if e.flipped else "not flipped")
        parts.append(f"change scale {scale:.2f}")
        cost = f"{timed.seconds:.2f} s"
        if timed.inversion_steps:
            cost += f", incl. {timed.inversion_steps} inversion steps" + (" (new image)" if timed.inverted else "")
        parts.append(cost)
        return " · ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Gradio
# --------------------------------------------------------------------------------------------------------------------
def offline_gradio():
    """Gradio, imported with telemetry, the version check, share links and server-side rendering turned off."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    import gradio as gr

    return gr


def theme():
    """A plain theme on system fonts: nothing is fetched, not even Gradio's bundled font files."""
    gr = offline_gradio()
    return gr.themes.Base(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def build_app(model: AppModel, title: str = "DIFFusion"):
    """The Gradio Blocks of ``model``: inputs on the left, the views on the right."""
    gr = offline_gradio()
    cfg = model.session.cfg
    T = cfg.num_inference_steps
    eta_max = max(3.0, 2.0 * max(abs(e) for e in cfg.eta))

    def as_outputs(v: Views) -> list:
        return [v.counterfactual, v.flicker, v.difference, v.oracle, v.judge, v.status]

    def guarded(fn):
        def run(*args):
            from diffusion.errors import user_errors

            try:
                return fn(*args)
            except user_errors() as err:
                raise gr.Error(str(err)) from None
        return run

    # delete_cache: Gradio's copies of the shown views older than an hour go, every 10 minutes
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        image_id = gr.State(None)
        gr.Markdown(f"### {title}: {' / '.join(model.classes)}  \nDecoder `{cfg.model.decoder}`, T = {T}, guidance "
                    f"{cfg.guidance_scale:g}. Pick an eval image or upload one, pick the target class, move the "
                    "sliders.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                pick = gr.Dropdown(choices=list(model.eval_images), value=None, label="eval image",
                                   elem_id="pick")
                original = gr.Image(label="image (drop one here to upload it)", type="pil", image_mode=None,
                                    sources=["upload", "clipboard"], height=DISPLAY_SIZE,
                                    elem_id="original", elem_classes=["pixelated"])
                with gr.Row():
                    source = gr.Dropdown(choices=model.classes, value=model.classes[0], label="source class",
                                         elem_id="source")
                    target = gr.Dropdown(choices=model.classes, value=model.other_class(model.classes[0], None),
                                         label="target class", elem_id="target")
                eta = gr.Slider(-eta_max, eta_max, value=float(cfg.eta[0]), step=0.05, label="eta",
                                info="manipulation scale: 0 = no edit, negative = away from the target",
                                elem_id="eta")
                t_skip = gr.Slider(0.0, 1.0, value=float(cfg.t_skip), step=1.0 / T, label="t_skip",
                                   info="share of the steps skipped: 1 = the original, 0 = the strongest edit",
                                   elem_id="t_skip")
                how = model.session.search_mode.value if model.has_oracle else "needs an oracle"
                search = gr.Button(f"search t_skip ({how})",
                                   interactive=model.has_oracle, variant="primary", elem_id="search")
                status = gr.Markdown("Pick an eval image or upload one.", elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    views = dict(interactive=False, height=DISPLAY_SIZE, elem_classes=["pixelated"],
                                 buttons=["download", "fullscreen"])
                    counterfactual = gr.Image(label="counterfactual", type="filepath", elem_id="counterfactual",
                                              **views)
                    flicker = gr.Image(label="flicker", type="filepath", elem_id="flicker", **views)
                    difference = gr.Image(label="difference map", type="filepath", elem_id="difference", **views)
                with gr.Row():
                    oracle = gr.Label(label="oracle: p(class) of the edit", visible=model.has_oracle,
                                      elem_id="oracle")
                    judge = gr.Label(label="judge (evaluation only): p(class) of the edit", visible=model.has_judge,
                                     elem_id="judge")
        outputs = [counterfactual, flicker, difference, oracle, judge, status]
        move_inputs = [image_id, source, target, eta, t_skip]

        def on_move(iid, src, tgt, eta_value, t_value):
            return as_outputs(model.move(iid, src, tgt, eta_value, t_value))

        def on_search(iid, src, tgt, eta_value):
            v = model.search(iid, src, tgt, eta_value)
            return as_outputs(v) + [gr.update(value=v.t_skip) if v.t_skip is not None else gr.update()]

        def on_pick(name, tgt):
            iid, picture, src, tgt = model.choose(name, tgt)
            return iid, picture, src, tgt

        def on_upload(picture, src, tgt):
            if picture is None:
                return None, src, tgt
            return model.upload(picture, src, tgt)

        quiet = dict(show_progress="minimal", trigger_mode="always_last")
        pick.input(guarded(on_pick), [pick, target], [image_id, original, source, target]).then(
            guarded(on_move), move_inputs, outputs, **quiet)
        original.upload(guarded(on_upload), [original, source, target], [image_id, source, target]).then(
            guarded(on_move), move_inputs, outputs, **quiet)
        for control in (eta, t_skip, source, target):
            control.input(guarded(on_move), move_inputs, outputs, **quiet)
        search.click(guarded(on_search), [image_id, source, target, eta], outputs + [t_skip], show_progress="full")
    return demo


def launch(model: AppModel, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True,
           quiet: bool = False) -> Any:
    """Serve the app of ``model`` on ``host``:``port`` (a free port from 7860 when None); returns the Blocks (call
    ``.close()`` to stop it when ``block`` is False)."""
    demo = build_app(model)
    demo.queue(default_concurrency_limit=1)  # one edit at a time: they share the pipeline and the inversions
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                show_error=True, quiet=quiet, footer_links=[], run_history=False, ssr_mode=False, pwa=False,
                mcp_server=False, enable_monitoring=False, allowed_paths=[str(model.workdir)], theme=theme(),
                css=CSS)
    return demo
