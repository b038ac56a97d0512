"""The public API: :class:`DIFFusionPipeline`, for notebooks and scripts, in the shape diffusers users know.

    >>> import torch
    >>> from diffusion import DIFFusionPipeline
    >>> pipe = DIFFusionPipeline.from_pretrained(decoder="assets/mini_digits/decoder",
    ...                                          prior="assets/mini_digits/prior", device="cpu")
    >>> from datasets.digits import export_digits
    >>> root = export_digits("outputs/data/digits")
    >>> threes = sorted((root / "train" / "3").glob("*.png"))[:50]
    >>> eights = sorted((root / "train" / "8").glob("*.png"))[:50]
    >>> direction = pipe.class_direction(threes, eights, names=("3", "8"))
    >>> inv = pipe.invert(threes[:2], num_inference_steps=100, generator=torch.Generator().manual_seed(0))
    >>> out = pipe(inv, direction, eta=[1.0, 1.5], t_skip=[0.95, 0.9], guidance_scale=2.0)
    >>> len(out.images), out.edits[0].unet_evals
    (8, 20)

Everything the command-line run does goes through these methods (``kandinsky_eval.py`` is a loop over them), so
what the tests check here is what a run computes. The method is in docs/method.md.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from diffusion.config import (
    KANDINSKY_DECODER, KANDINSKY_PRIOR, SEARCHES, DType, FlipAgreement, InversionCond, ModelConfig, SearchMode,
)
from diffusion.devices import resolve_device, resolve_dtype
from diffusion.edit.editor import Editor, EditOutcome, Inversion, Oracle, classify
from diffusion.edit.search import FlipCriterion
from diffusion.embeddings import class_mean, edit_embedding, load_class_embeds
from diffusion.errors import ConfigError
from diffusion.models import (
    Decoder, ImageEncoder, check_embed_dim, load_decoder, load_image_encoder, optimize_unet, weights_fingerprint,
)

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
Images = Union[ImageInput, Sequence[ImageInput], torch.Tensor]


@dataclass
class ClassDirection:
    """Two class means in CLIP image-embedding space; an edit moves an embedding along ``target_mean - source_mean``:

        e' = ||e|| (e/||e|| + eta (mu_target - mu_source))
    """

    source_mean: torch.Tensor  # (D,) float32: mean of the L2-normalised embeddings of the source class
    target_mean: torch.Tensor  # (D,)
    source: str = "source"
    target: str = "target"

    @property
    def vector(self) -> torch.Tensor:
        return self.target_mean - self.source_mean

    def reversed(self) -> "ClassDirection":
        return ClassDirection(self.target_mean, self.source_mean, self.target, self.source)

    def edit(self, embeds: torch.Tensor, eta: float) -> torch.Tensor:
        """e' for embeddings (B, D) at ``eta``."""
        return edit_embedding(embeds, self.source_mean, self.target_mean, eta)


@dataclass
class Edit:
    """One result of a pipeline call: image ``image`` of the inversion edited at ``eta`` / ``t_skip``."""

    image: int  # index into the inverted images
    target: str
    eta: float
    t_skip: Optional[float]  # None: the original was already the target class (not searched)
    picture: Optional[torch.Tensor]  # (3, H, W) in [0, 1]; None when not searched
    sampling_evals: int  # UNet evaluations of this edit's attempts (its whole search's, with a search)
    inversion_evals: int  # ... of its image's inversion so far (shared by every edit of the image)
    attempts: int  # attempts made for it (1 without a search)
    probs: Optional[Dict[str, float]] = None  # the oracle's probability of each class on the edit
    probs_before: Optional[Dict[str, float]] = None  # ... on the original
    flipped: Optional[bool] = None  # the edit meets the flip criterion for the target (None without an oracle)
    already_target: bool = False
    judge_probs: Optional[Dict[str, float]] = None  # an evaluation-only judge's probabilities on the edit
    judge_probs_before: Optional[Dict[str, float]] = None
    member_probs: Optional[Dict[str, List[float]]] = None  # each oracle member's probability of each class, when
    #                                                         the criterion asked for them (flip_agreement: all)
    criterion: Optional[str] = None  # the flip criterion the search used
    searched: bool = False  # a search (first_flip / bisect) chose this edit

    @property
    def unet_evals(self) -> int:
        return self.sampling_evals + self.inversion_evals

    @property
    def judge_flipped(self) -> Optional[bool]:
        """The judge's verdict on this edit as a result: its argmax is the target, on an edit the method stands
        behind. Never for an already-target image, and never when a search found no edit meeting the criterion: the
        strongest attempt it keeps for inspection is no counterfactual, whatever the judge makes of it (counting it
        would credit the method with a picture it rejected, often a full re-sample). None when a judge could have
        scored the edit but none did."""
        if self.already_target or self.picture is None or (self.searched and not self.flipped):
            return False
        if self.judge_probs is None:
            return None
        finite = {c: p for c, p in self.judge_probs.items() if math.isfinite(p)}
        if not finite or len(finite) < len(self.judge_probs):
            return False
        return max(finite, key=finite.get) == self.target


@dataclass
class DIFFusionOutput:
    """What a pipeline call returns: ``images`` (PIL images, a (N, 3, H, W) tensor in [0, 1], or numpy (N, H, W, 3),
    by ``output_type``) in the order of ``edits``; ``attempts`` lists every sampled attempt (a search's rejected
    ones too); ``inversion`` is the (possibly extended) inversion, to reuse in a next call."""

    images: Any
    edits: List[Edit]
    inversion: Inversion
    attempts: List[Dict[str, Any]] = field(default_factory=list)


def _as_generators(generator: Union[None, torch.Generator, Sequence[torch.Generator]], n: int) -> List[torch.Generator]:
    """One generator per image: a list is used as given; a single generator seeds n children (deterministic); None
    draws fresh seeds."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{n} images need {n} generators, got {len(generator)}")
        return list(generator)
    seeds = torch.randint(0, 2**62, (n,), generator=generator) if generator is not None else \
        torch.randint(0, 2**62, (n,))
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _as_list(value: Union[float, Sequence[float]]) -> List[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


class DIFFusionPipeline:
    """The Kandinsky 2.2 decoder (UNet, MoVQ, DDPM scheduler) and the prior's CLIP image encoder, with the DIFFusion
    steps as methods: :meth:`embed`, :meth:`class_direction`, :meth:`invert`, then the call itself.

    Example (the shipped demo model, offline)::

        pipe = DIFFusionPipeline.from_pretrained(decoder="assets/mini_digits/decoder",
                                                 prior="assets/mini_digits/prior", device="cpu")
        inv = pipe.invert(["a.png", "b.png"], generator=torch.Generator().manual_seed(0))
        out = pipe(inv, direction, eta=1.0, t_skip=0.9, guidance_scale=2.0)
        out.images[0].save("edit.png")
    """

    def __init__(self, decoder: Decoder, encoder: ImageEncoder, batch_size: int = 4, background=(255, 255, 255)):
        check_embed_dim(decoder, encoder)
        self.decoder, self.encoder = decoder, encoder
        self.batch_size = int(batch_size)
        self.background = tuple(background)
        self.null_embedding = encoder.null_embedding()  # c_0, computed once
        self.lora_path: Optional[Path] = None
        self._decoder_id: Optional[str] = None
        self.editor = Editor(decoder, self.null_embedding, batch_size=self.batch_size)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, decoder: str = KANDINSKY_DECODER, prior: str = KANDINSKY_PRIOR, device: str = "auto",
                        dtype: Union[str, torch.dtype] = "auto", local_files_only: bool = False,
                        revision: Optional[str] = None, image_size: Optional[int] = None, batch_size: int = 4,
                        allow_pickle_weights: bool = False) -> "DIFFusionPipeline":
        """Load the decoder and the image encoder from hub ids or local folders (safetensors weights only unless
        ``allow_pickle_weights``). ``dtype`` auto is float16 on CUDA, float32 elsewhere."""
        if isinstance(dtype, torch.dtype):
            dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        model = ModelConfig(decoder=str(decoder), prior=str(prior), device=device, dtype=DType(dtype),
                            local_files_only=local_files_only, revision=revision, image_size=image_size,
                            allow_pickle_weights=allow_pickle_weights)
        return cls.from_config(model, batch_size=batch_size)

    @classmethod
    def from_config(cls, model: ModelConfig, device: Optional[torch.device] = None, batch_size: int = 4,
                    background=(255, 255, 255)) -> "DIFFusionPipeline":
        """Load from a ``ModelConfig`` (the ``model:`` section of a run config); ``device`` overrides its device
        (several processes each pass their own)."""
        device = device or resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, device)
        decoder = load_decoder(model, device, dtype)
        encoder = load_image_encoder(model, device, dtype)
        return cls(decoder, encoder, batch_size=batch_size, background=background)

    def load_lora(self, path: Union[str, os.PathLike], step: Optional[int] = None, scale: float = 1.0) -> Path:
        """Load a domain-tuning adapter (a kandinsky_lora_train.py output_dir, or its ``checkpoint-<step>``) into the
        UNet at ``scale``. Inversions made before are refused afterwards (the decoder changed)."""
        from diffusion.lora import load_lora

        folder = load_lora(self.decoder.unet, path, step, scale)
        self.lora_path = folder
        self._decoder_id = None
        self.editor.decoder_id = ""
        return folder

    def optimize(self, model: ModelConfig) -> None:
        """model.channels_last / model.compile on the UNet (after any LoRA is loaded)."""
        optimize_unet(self.decoder, model)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def image_size(self) -> int:
        return self.decoder.image_size

    @property
    def decoder_id(self) -> str:
        """A fingerprint of the decoder's weights (LoRA included): inversions record it and are refused by another."""
        if self._decoder_id is None:
            self._decoder_id = weights_fingerprint(self.decoder.unet) + "-" + weights_fingerprint(self.decoder.movq)
            self.editor.decoder_id = self._decoder_id
        return self._decoder_id

    # --- inputs -------------------------------------------------------------------------------------------------
    def preprocess(self, images: Images) -> torch.Tensor:
        """Images as the model sees them: (B, 3, S, S) float32 in [0, 1] at the decoder's size, from file paths
        (any image mode or .npy), PIL images, numpy arrays (H, W, 3) in [0, 255] or [0, 1], or tensors (3, H, W) /
        (B, 3, H, W) in [0, 1]. Every image is squeezed to S x S (no crop), as the dataset loader does."""
        from datasets.images import load_image, pil_to_tensor, resize

        if isinstance(images, torch.Tensor) and images.dim() == 4:
            items: List[Any] = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        out = []
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                x = load_image(item, background=self.background)
            elif isinstance(item, Image.Image):
                x = pil_to_tensor(item, background=self.background)
            elif isinstance(item, np.ndarray):
                arr = item.astype(np.float32)
                arr = arr / 255.0 if arr.max() > 1.0 else arr
                x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1) if arr.ndim == 3 else arr))
            elif isinstance(item, torch.Tensor):
                x = item.float().cpu()
            else:
                raise TypeError(f"cannot read an image from a {type(item).__name__}")
            if x.dim() != 3 or x.shape[0] not in (1, 3):
                raise ValueError(f"an image must be (3, H, W) or (1, H, W), got shape {tuple(x.shape)}")
            x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
            if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
                raise ValueError("image values must be finite and lie in [0, 1]")
            size = self.image_size
            out.append(x if tuple(x.shape[-2:]) == (size, size) else resize(x, size))
        if not out:
            raise ValueError("no images given")
        return torch.stack(out)

    # --- the steps ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, images: Images) -> torch.Tensor:
        """CLIP ``image_embeds`` of images (any input :meth:`preprocess` takes): (B, D) float32 on the CPU."""
        x = self.preprocess(images)
        return torch.cat([self.encoder.embed(x[i:i + self.batch_size]).cpu()
                          for i in range(0, len(x), self.batch_size)])

    def _class_mean(self, value: Any, embeds_dir: Optional[str], num_images: Optional[int]) -> torch.Tensor:
        if embeds_dir is not None:
            return class_mean(load_class_embeds(embeds_dir, str(value), self.encoder.embed_dim)[0], num_images)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            return value.float().cpu()  # a mean already
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return class_mean(value, num_images)  # embeddings (N, D)
        return class_mean(self.embed(value), num_images)  # images

    def class_direction(self, source: Any, target: Any, embeds_dir: Optional[Union[str, os.PathLike]] = None,
                        num_images: Optional[int] = None,
                        names: Optional[Tuple[str, str]] = None) -> ClassDirection:
        """The direction from class ``source`` to class ``target``. Each is images (paths, PIL, tensors), a matrix
        of embeddings (N, D), a mean (D,), or, with ``embeds_dir`` (scripts/save_embeds.py's output), a class name.
        ``num_images`` uses the first N embeddings of each class."""
        d = str(embeds_dir) if embeds_dir is not None else None
        mu_s, mu_t = self._class_mean(source, d, num_images), self._class_mean(target, d, num_images)
        if mu_s.shape != mu_t.shape or mu_s.numel() != self.encoder.embed_dim:
            raise ValueError(f"class means must both be {self.encoder.embed_dim}-d (this image encoder's width), got "
                             f"{tuple(mu_s.shape)} and {tuple(mu_t.shape)}")
        if names is None:
            names = (str(source), str(target)) if d is not None else ("source", "target")
        return ClassDirection(mu_s, mu_t, names[0], names[1])

    @torch.inference_mode()
    def invert(self, images: Images, num_inference_steps: int = 100,
               generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
               inversion: Union[str, InversionCond] = "null", inversion_guidance: float = 1.0,
               embeds: Optional[torch.Tensor] = None) -> Inversion:
        """Edit-friendly DDPM inversion of images (any input :meth:`preprocess` takes) with T =
        ``num_inference_steps``: the forward noise of every step is drawn now (from ``generator``: one per image,
        or one that seeds them all); the noise maps are computed lazily, as deep as the edits need. ``inversion``:
        ``null`` (the null embedding, no guidance; the canonical setting) or ``source`` (CFG on the image's own
        embedding at ``inversion_guidance``). ``embeds``: the images' embeddings when already computed."""
        x = self.preprocess(images)
        e = embeds.float().cpu() if embeds is not None else self.embed(x)
        gens = _as_generators(generator, len(x))
        self.decoder_id  # noqa: B018  (records the decoder's fingerprint in the inversion)
        return self.editor.invert(x, e, gens, int(num_inference_steps), InversionCond(inversion),
                                  float(inversion_guidance))

    def load_inversion(self, path: Union[str, os.PathLike]) -> Inversion:
        """An inversion saved with ``inv.save(path)``, checked to come from this pipeline's decoder."""
        inv = Inversion.load(path)
        if inv.decoder_id and inv.decoder_id != self.decoder_id:
            from diffusion.errors import ArtefactError

            raise ArtefactError(f"{path} was inverted with other decoder weights ({inv.decoder_id}; this pipeline: "
                                f"{self.decoder_id}; a LoRA adapter counts). Invert the images again.")
        return inv

    @torch.inference_mode()
    def __call__(self, images: Union[Inversion, Images], direction: Union[ClassDirection, Sequence[ClassDirection]],
                 eta: Union[float, Sequence[float]] = 2.0, t_skip: Union[float, Sequence[float]] = 0.7,
                 guidance_scale: float = 4.0, search: Union[None, str, SearchMode] = None,
                 oracle: Optional[Oracle] = None, judge: Optional[Oracle] = None,
                 flip_threshold: Optional[float] = None, flip_agreement: Union[str, FlipAgreement] = "mean",
                 image_index: Optional[Sequence[int]] = None, num_inference_steps: int = 100,
                 generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                 output_type: str = "pil") -> DIFFusionOutput:
        """Counterfactual edits.

        ``images``: an :class:`Inversion` (reused; it is extended in place as deeper edits need it) or images,
        inverted here with ``num_inference_steps`` and ``generator``. ``direction``: one :class:`ClassDirection` for
        every image, or one per *item* with ``image_index`` saying which inverted image each item edits (an image
        may go to several targets). ``eta`` and ``t_skip`` may be lists: without ``search`` every (item, eta,
        t_skip) is one edit; with ``search`` (``first_flip`` or ``bisect``, needs ``oracle``) the t_skips are tried
        mildest first and each (item, eta) keeps the first edit that meets the flip criterion (``flip_threshold``:
        None = the oracle's argmax is the target; ``flip_agreement`` all: every member agrees). An item whose
        original the oracle already assigns to the target is not searched. ``judge``: an evaluation-only classifier
        the search never consults, reported beside the oracle. ``output_type``: pil, pt (tensor) or np.
        """
        inv = images if isinstance(images, Inversion) else self.invert(images, num_inference_steps, generator)
        directions, image_of = _items(inv, direction, image_index)
        mode = SearchMode(search) if search is not None else (SearchMode.fixed if len(_as_list(t_skip)) == 1
                                                              else SearchMode.sweep)
        if mode in SEARCHES and oracle is None:
            raise ConfigError(f"search={mode.value} needs an oracle (a classifier folder: diffusion.load_oracle)")
        criterion = FlipCriterion(flip_threshold, FlipAgreement(flip_agreement))
        etas, t_skips = _as_list(eta), _as_list(t_skip)
        mu_src = torch.stack([d.source_mean for d in directions])
        mu_tgt = torch.stack([d.target_mean for d in directions])
        target_index = pred_before = probs_before = None
        if oracle is not None:
            target_index = [_class_index(oracle, d.target, "oracle") for d in directions]
            if inv.images is not None:
                probs_before = classify(oracle, inv.images[image_of])[0]
                pred_before = probs_before.argmax(1)
        outcomes = self.editor.edit(inv, mu_src, mu_tgt, etas, mode, t_skips, guidance_scale, image_of_item=image_of,
                                    oracle=oracle, target_index=target_index, criterion=criterion,
                                    pred_before=pred_before,
                                    plan=self.editor.plan_for(mode, t_skips, inv.T, inv.mode, guidance_scale,
                                                              inv.guidance))
        searched = mode in SEARCHES
        edits = [self._edit_of(o, inv, directions, image_of, oracle, probs_before, criterion if oracle else None,
                               searched) for o in outcomes]
        if judge is not None:
            self._judge(judge, edits, inv, directions)
        attempts = [{"image": int(image_of[a.item]), "item": a.item, "target": directions[a.item].target,
                     "eta": a.eta, "t_skip": a.t_skip, "unet_evals": a.evals, "met": a.met, "picture": a.picture,
                     "probs": _named(oracle, a.probs), "chosen": o.chosen is a}
                    for o in outcomes for a in o.attempts]
        pictures = [e.picture for e in edits if e.picture is not None]
        return DIFFusionOutput(images=_to_output(pictures, output_type), edits=edits, inversion=inv, attempts=attempts)

    def _edit_of(self, o: EditOutcome, inv: Inversion, directions, image_of, oracle, probs_before,
                 criterion, searched: bool) -> Edit:
        u = int(image_of[o.item])
        a = o.chosen
        return Edit(
            image=u, target=directions[o.item].target, eta=o.eta, t_skip=a.t_skip if a else None,
            picture=a.picture if a else None, sampling_evals=o.sampling_evals, inversion_evals=int(inv.counter[u]),
            attempts=len(o.attempts), probs=_named(oracle, a.probs) if (oracle is not None and a) else None,
            probs_before=_named(oracle, probs_before[o.item]) if probs_before is not None else None,
            flipped=o.flipped if oracle is not None else None, already_target=o.already_target,
            criterion=criterion.describe() if criterion is not None else None, searched=searched,
            member_probs=({str(c): [float(v) for v in a.member_probs[:, k]] for k, c in enumerate(oracle.classes)}
                          if oracle is not None and a is not None and a.member_probs is not None else None))

    def _judge(self, judge: Oracle, edits: List[Edit], inv: Inversion, directions) -> None:
        for d in directions:
            _class_index(judge, d.target, "judge")
        if inv.images is not None:
            before = classify(judge, inv.images)[0]
            for e in edits:
                e.judge_probs_before = _named(judge, before[e.image])
        shown = [e for e in edits if e.picture is not None]
        if shown:
            after = classify(judge, torch.stack([e.picture for e in shown]))[0]
            for e, p in zip(shown, after):
                e.judge_probs = _named(judge, p)

    @torch.inference_mode()
    def interpolate(self, inv: Inversion, direction: Union[ClassDirection, Sequence[ClassDirection]],
                    etas: Sequence[float], t_skip: float, guidance_scale: float = 4.0, oracle: Optional[Oracle] = None,
                    image_index: Optional[Sequence[int]] = None, output_type: str = "pil") -> DIFFusionOutput:
        """An interpolation strip per item: the image re-decoded at every eta in ``etas`` at one ``t_skip`` (eta 0
        = the plain re-sampling, negative = away from the target), items outermost, reusing the inversion."""
        directions, image_of = _items(inv, direction, image_index)
        mu_s = torch.stack([d.source_mean for d in directions])
        mu_t = torch.stack([d.target_mean for d in directions])
        frames = self.editor.interpolate(inv, mu_s, mu_t, [float(e) for e in etas], float(t_skip), guidance_scale,
                                         image_of_item=image_of, oracle=oracle)
        edits = [Edit(image=int(image_of[a.item]), target=directions[a.item].target, eta=a.eta, t_skip=a.t_skip,
                      picture=a.picture, sampling_evals=a.evals, inversion_evals=int(inv.counter[image_of[a.item]]),
                      attempts=1, probs=_named(oracle, a.probs))
                 for a in frames]
        return DIFFusionOutput(images=_to_output([a.picture for a in frames], output_type), edits=edits,
                               inversion=inv)


def _items(inv: Inversion, direction: Union[ClassDirection, Sequence[ClassDirection]],
           image_index: Optional[Sequence[int]]) -> Tuple[List[ClassDirection], torch.Tensor]:
    """(one direction per item, the inverted image of each item): one direction goes to every image."""
    directions = [direction] if isinstance(direction, ClassDirection) else list(direction)
    if image_index is None:
        image_index = list(range(inv.num_images)) if len(directions) == 1 else list(range(len(directions)))
    if len(directions) == 1:
        directions = directions * len(image_index)
    if len(directions) != len(image_index):
        raise ValueError(f"{len(directions)} directions for {len(image_index)} items: give one per item")
    return directions, torch.as_tensor(list(image_index), dtype=torch.long)


def _class_index(classifier: Oracle, name: str, role: str) -> int:
    classes = [str(c) for c in classifier.classes]
    if str(name) not in classes:
        raise ConfigError(f"the {role} knows the classes {classes}, not '{name}': use one trained on this pair "
                          "(scripts/train_classifiers.py with data.classes naming it)")
    return classes.index(str(name))


def _named(classifier: Optional[Oracle], probs: Optional[torch.Tensor]) -> Optional[Dict[str, float]]:
    if classifier is None or probs is None:
        return None
    return {str(c): float(p) for c, p in zip(classifier.classes, probs)}


def _to_output(pictures: List[torch.Tensor], output_type: str) -> Any:
    if output_type == "pt":
        return torch.stack(pictures) if pictures else torch.zeros(0)
    if output_type == "np":
        return np.stack([p.permute(1, 2, 0).numpy() for p in pictures]) if pictures else np.zeros((0,))
    if output_type == "pil":
        from diffusion.views.images import to_pil

        return [to_pil(p) for p in pictures]
    raise ValueError(f"output_type must be pil, pt or np, got {output_type!r}")
