"""Typed configuration: one dataclass schema per entry point, YAML + dot-list overrides, validated on construction.

Every field carries its meaning, its bounds and (for floats) a finiteness check in its metadata (:func:`opt`), and
every schema checks itself in ``__post_init__`` and again on assignment: a schema object can never hold an invalid
value, whether it came from :func:`load_config` or was built in Python. Entry points call :func:`load_config` before
anything heavy loads, so an unknown key, a wrong type or a bad value stops the run within a second, naming the key,
whether the file or a command-line override set it, and the closest valid names. ``--help`` lists the keys from the
same metadata (:func:`describe`), so the help can never drift from the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple, Type, TypeVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from diffusion.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
KANDINSKY_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
KANDINSKY_PRIOR = "kandinsky-community/kandinsky-2-2-prior"


# --------------------------------------------------------------------------------------------------------------------
# Modes: every one is a str-valued enum (compares equal to its string, validated by OmegaConf, listed by --help)
# --------------------------------------------------------------------------------------------------------------------
class Mode(str, enum.Enum):
    """A str-valued enum whose str() and format() are its value (file names, messages, JSON)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class DType(Mode):
    auto = "auto"  # float16 on CUDA, float32 elsewhere
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class OnBadFile(Mode):
    error = "error"  # stop, naming the file
    skip = "skip"  # leave it out with a warning (listed in summary.json)


class SearchMode(Mode):
    first_flip = "first_flip"  # try t_skips mildest first, keep the first edit that meets the flip criterion
    bisect = "bisect"  # binary search over the ordered t_skips, splits weighted by UNet cost (assumes flipping is
    #                    monotone in edit strength)
    fixed = "fixed"  # one t_skip, no oracle needed
    sweep = "sweep"  # every t_skip x eta, for analysis


# The modes that search for the mildest edit meeting the flip criterion (they need an oracle; an image for which no
# t_skip meets it keeps its strongest attempt, which is no result). str-valued: results.csv's "search" cell matches.
SEARCHES = frozenset({SearchMode.first_flip, SearchMode.bisect})


class InversionCond(Mode):
    null = "null"  # invert with the null embedding, no guidance (the canonical edit-friendly setting)
    source = "source"  # invert with classifier-free guidance on the image's own embedding at inversion_guidance


class FlipAgreement(Mode):
    mean = "mean"  # the ensemble's mean probability of the target class decides
    all = "all"  # every member must reach the threshold too


class MixedPrecision(Mode):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class ReportTo(Mode):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


class OracleKind(Mode):
    ensemble = "ensemble"  # one network per entry of architectures
    clip_probe = "clip_probe"  # a linear head on frozen open_clip image features


class StudyArm(Mode):
    counterfactual = "counterfactual"  # each lesson image beside its counterfactual, with the flicker
    examples = "examples"  # the same number of real images per class, unpaired (the paper's control arm)
    counterfactual_diff = "counterfactual_diff"  # as counterfactual, with the difference map


class Architecture(Mode):
    """A classifier member's network (diffusion/oracle/nets.py)."""

    resnet18 = "resnet18"  # torchvision CNNs, ImageNet weights or random init
    efficientnet_b0 = "efficientnet_b0"
    mobilenet_v2 = "mobilenet_v2"
    lenet = "lenet"  # small nets for small images, random init: LeNet-5
    small_vgg = "small_vgg"  # three 3x3 conv + BatchNorm blocks
    mlp = "mlp"  # two hidden layers on the pixels
    logistic = "logistic"  # logistic regression on the pixels


SMALL_ARCHITECTURES = (Architecture.lenet, Architecture.small_vgg, Architecture.mlp, Architecture.logistic)


class Augment(Mode):
    flip_scale = "flip_scale"  # random mirror and zoom (photos: a mirrored cat is a cat)
    affine = "affine"  # small shifts, rotations and zooms, no mirror (digits, text: a mirrored 3 is no 3)
    none = "none"


# --------------------------------------------------------------------------------------------------------------------
# Fields with meaning and bounds
# --------------------------------------------------------------------------------------------------------------------
def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, ge: Optional[float] = None,
        gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None) -> Any:
    """A schema field: its default (or ``factory`` for lists and dicts), one line of meaning for ``--help``, and
    bounds that every number in it (a list's elements too) must satisfy. Floats must also be finite."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _numbers(value: Any) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


class Schema:
    """Mixin of every config dataclass: field bounds and :meth:`check` run on construction and on assignment.

    ``SECTION`` is the key a section sits under in every schema (``data``, ``model``, ...), so its errors name the
    full dotted key. ``RUN_CONTROL_KEYS`` (entry-point schemas) are the keys a resumed run may change: they steer the
    run (where output goes, logging, batch size, how views look) but never change a result.
    """

    SECTION: ClassVar[str] = ""
    RUN_CONTROL_KEYS: ClassVar[FrozenSet[str]] = frozenset()

    def key(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def need(self, cond: bool, name: str, what: str) -> None:
        """Raise a ConfigError for key ``name`` (a field of this section, or a dotted key below it) unless ``cond``;
        the message shows the field's value."""
        if cond:
            return
        key = self.key(name)
        shown = f" = {_show(getattr(self, name))}" if name in {f.name for f in dataclasses.fields(self)} else ""
        raise ConfigError(f"'{key}'{shown} {what}", key=key)

    def check(self) -> None:
        """Rules between fields that bounds alone cannot express (overridden by the schemas)."""

    def _coerce_modes(self) -> None:
        """Strings given for enum fields (Python callers: ``EditConfig(search="fixed")``) become the enum members;
        an unknown one is a ConfigError listing the choices."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            tp, value = hints[f.name], getattr(self, f.name)
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, List) and typing.get_args(tp) else None
            target = inner if inner is not None else next(
                (a for a in (typing.get_args(tp) or (tp,)) if isinstance(a, type) and issubclass(a, enum.Enum)), None)
            if not (isinstance(target, type) and issubclass(target, enum.Enum)):
                continue

            def member(v: Any) -> Any:
                if v is None or isinstance(v, target):
                    return v
                try:
                    return target(v)
                except ValueError:
                    raise ConfigError(f"'{self.key(f.name)}' = {v!r} is not one of "
                                      f"{', '.join(m.value for m in target)}", key=self.key(f.name)) from None

            fixed = [member(v) for v in value] if inner is not None and isinstance(value, list) else member(value)
            if fixed != value or type(fixed) is not type(value):
                object.__setattr__(self, f.name, fixed)

    def _validate(self) -> None:
        self._coerce_modes()
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, str) and value == MISSING:
                continue  # required and not set yet: load_config says so, naming every missing key
            m = f.metadata
            for v in _numbers(value):
                self.need(not isinstance(v, float) or math.isfinite(v), f.name,
                          "must be a finite number (not nan or inf)")
                for bound, ok, word in (("ge", lambda b: v >= b, ">="), ("gt", lambda b: v > b, ">"),
                                        ("le", lambda b: v <= b, "<="), ("lt", lambda b: v < b, "<")):
                    if m.get(bound) is not None:
                        self.need(ok(m[bound]), f.name, f"must be {word} {m[bound]:g}"
                                  + (f" (got {v:g})" if isinstance(value, list) else ""))
        self.check()

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_validated"):
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self._validate()
        except ConfigError:
            object.__setattr__(self, name, old)  # the object stays valid
            raise


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else f"{value}"


def check_device(name: str) -> bool:
    """Whether ``name`` is a device spelling the project accepts: auto, cpu, mps, cuda or cuda:N."""
    return name in ("auto", "cpu", "mps", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


# --------------------------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig(Schema):
    """Where the Kandinsky 2.2 parts come from (a hub id or a local folder each), and how they run."""

    SECTION: ClassVar[str] = "model"
    decoder: str = opt(KANDINSKY_DECODER, "decoder hub id or folder holding unet/, movq/, scheduler/")
    prior: str = opt(KANDINSKY_PRIOR, "prior hub id or folder holding image_encoder/, image_processor/ (the prior "
                                      "diffusion model itself is never loaded)")
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit) of both")
    local_files_only: bool = opt(False, "never touch the network (also implied by HF_HUB_OFFLINE=1)")
    allow_pickle_weights: bool = opt(False, "also load .bin/.ckpt weights (pickles can run code: only for weights "
                                            "you trust); false = safetensors only")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps")
    dtype: DType = opt(DType.auto, "weights dtype; auto = float16 on CUDA, float32 elsewhere")
    image_size: Optional[int] = opt(None, "pixels images are resized to; null = the UNet's sample_size x the MoVQ "
                                          "scale factor", gt=0)
    channels_last: bool = opt(False, "UNet in channels_last memory format (often faster on GPUs with fp16/bf16)")
    compile: bool = opt(False, "torch.compile the UNet (after any LoRA is loaded); pays off on long GPU runs")

    def check(self) -> None:
        self.need(check_device(self.device), "device", "must be auto, cpu, cuda, cuda:N or mps")


@dataclass
class DataConfig(Schema):
    """A dataset laid out as root/<split>/<class>/<files> (see datasets/registry.py for the named domains)."""

    SECTION: ClassVar[str] = "data"
    name: str = opt("folder", "a registry entry: folder, butterfly, kermany, afhq, kikibouba, mad_sane, celebahq, "
                              "digits")
    root: str = opt(MISSING, "the dataset folder (holding <split>/<class>/<files>)")
    classes: List[str] = opt(help="class names in label order; empty = the entry's (folder: sorted subfolders)",
                             factory=list)
    train_split: str = opt("train", "split of the class means, LoRA and oracle training (a folder name)")
    eval_split: str = opt("test", "split of the images that get edited (a folder name)")
    num_samples: Optional[int] = opt(None, "per-class cap on the images read from a split, after sorting "
                                           "(deterministic); in an editing run: the images edited per class", gt=0)
    file_lists: Dict[str, str] = opt(help="class -> text file naming the eval images to edit (one file name a "
                                          "line)", factory=dict)
    on_bad_file: OnBadFile = opt(OnBadFile.error, "an unreadable image: error (stop, naming it) or skip (warn, "
                                                  "list it in summary.json)")
    background: List[int] = opt(help="RGB under transparent pixels", factory=lambda: [255, 255, 255], ge=0, le=255)
    num_workers: int = opt(0, "DataLoader worker processes", ge=0)

    def check(self) -> None:
        from datasets.registry import DATASETS  # plain python; importing it loads no model

        if self.name not in DATASETS:
            close = difflib.get_close_matches(self.name, list(DATASETS), n=3)
            self.need(False, "name", f"is not a known dataset{' (did you mean ' + ', '.join(close) + '?)' if close else ''}. "
                                     f"Known: {', '.join(DATASETS)}")
        self.need(len(self.background) == 3, "background", "must be three integers in 0..255 (RGB)")
        self.need(len(set(self.classes)) == len(self.classes), "classes", "has duplicates")
        for cls in self.file_lists:
            self.need(not self.classes or cls in self.classes, f"file_lists.{cls}",
                      f"names a class not in data.classes {list(self.classes)}")


@dataclass
class LoraRef(Schema):
    """An adapter written by kandinsky_lora_train.py, loaded into the decoder UNet."""

    SECTION: ClassVar[str] = "lora"
    path: Optional[str] = opt(None, "the LoRA training output_dir (or an adapter folder); null = no adapter")
    step: Optional[int] = opt(None, "use path/checkpoint-<step>; null = the final adapter in path", ge=0)
    scale: float = opt(1.0, "adapter strength (0 = off, 1 = as trained)", ge=0)

    def check(self) -> None:
        self.need(self.step is None or self.path is not None, "step", "needs lora.path")


@dataclass
class StudyConfig(Schema):
    """study.html: a teaching study (instructions, pre-test, lesson by arm, post-test, results) on the run's images."""

    SECTION: ClassVar[str] = "views.study"
    enabled: bool = opt(True, "write study.html beside index.html")
    instructions: str = opt("You will see images of two kinds. First you classify some without help, then you study "
                            "a short lesson, then you classify new images. Your answers are recorded with a "
                            "participant id only. Continue only if you agree to take part.",
                            "the consent / instructions text shown first")
    pretest_images: int = opt(6, "real images per class in the pre-test (no feedback)", gt=0)
    lesson_images: int = opt(4, "lesson images per class (counterfactual pairs, or real examples)", gt=0)
    posttest_images: int = opt(6, "real images per class in the post-test, none seen before", gt=0)
    arms: List[StudyArm] = opt(help="the study's arms; a participant's arm comes from their id (balanced, "
                                    "documented rule)",
                               factory=lambda: [StudyArm.counterfactual, StudyArm.examples])
    seed: int = opt(0, "the seed of the image split and of every participant's order")

    def check(self) -> None:
        self.need(len(self.arms) > 0, "arms", "must name at least one arm")
        self.need(len(set(self.arms)) == len(self.arms), "arms", "has duplicates")


@dataclass
class ViewsConfig(Schema):
    """The teaching views of an editing run (flicker GIFs, interpolation strips, difference maps, the pages)."""

    SECTION: ClassVar[str] = "views"
    enabled: bool = opt(True, "write the views and index.html / quiz.html / study.html at the end of the run")
    strip_etas: List[float] = opt(help="interpolation strip: the etas shown (one shared inversion)",
                                  factory=lambda: [-1.0, 0.0, 1.0, 1.5, 2.0])
    strip_t_skip: float = opt(0.7, "interpolation strip: the t_skip of every frame", ge=0, le=1)
    gif_frame_ms: int = opt(700, "flicker GIF: milliseconds each frame is shown", gt=0)
    study: StudyConfig = opt(help="the teaching study page", factory=StudyConfig)


# --------------------------------------------------------------------------------------------------------------------
# One schema per entry point
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EmbedsConfig(Schema):
    """scripts/save_embeds.py: CLIP image embeddings of every train image of each class."""

    RUN_CONTROL_KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {"output_dir", "batch_size", "overwrite", "data.num_workers", "data.on_bad_file", "model.device",
         "model.channels_last", "model.compile"})
    output_dir: str = opt(MISSING, "folder of the <class>.safetensors + <class>.json embedding files")
    model: ModelConfig = opt(help="the image encoder's source (model.prior)", factory=ModelConfig)
    data: DataConfig = opt(help="the dataset", factory=DataConfig)
    split: Optional[str] = opt(None, "split to embed; null = data.train_split")
    batch_size: int = opt(16, "images per encoder batch", gt=0)
    overwrite: bool = opt(False, "recompute classes whose files already exist")


@dataclass
class EditConfig(Schema):
    """kandinsky_eval.py: counterfactual edits of every eval image towards the other class."""

    RUN_CONTROL_KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {"output_dir", "batch_size", "save_attempts", "data.num_workers", "data.on_bad_file", "model.device",
         "model.channels_last", "model.compile", "model.local_files_only", "compute_missing_embeds", "embeds_dir",
         "views.enabled", "views.gif_frame_ms", "views.strip_etas", "views.strip_t_skip", "views.study.enabled",
         "views.study.instructions", "views.study.pretest_images", "views.study.lesson_images",
         "views.study.posttest_images", "views.study.arms", "views.study.seed"})
    output_dir: str = opt(MISSING, "run folder: results.csv, summary.json, edits/, index.html, ...")
    seed: int = opt(0, "base of every image's seed (each image's noise depends only on it and the image's path)")
    model: ModelConfig = opt(help="the Kandinsky parts", factory=ModelConfig)
    data: DataConfig = opt(help="the dataset; data.eval_split is edited", factory=DataConfig)
    embeds_dir: str = opt(MISSING, "class embedding files written by scripts/save_embeds.py")
    compute_missing_embeds: bool = opt(False, "embed the whole train split here for classes embeds_dir lacks")
    class_mean_images: Optional[int] = opt(None, "class means over the first N train embeddings of each class; "
                                                 "null = all (it does not cap the images edited: data.num_samples "
                                                 "does)", gt=0)
    directions: List[List[str]] = opt(help="[[source, target], ...]; empty = both ways between two classes",
                                      factory=list)
    num_inference_steps: int = opt(100, "T, the DDPM steps of inversion and sampling", gt=0)
    guidance_scale: float = opt(4.0, "g, classifier-free guidance between the null and the edited embedding", ge=0)
    inversion: InversionCond = opt(InversionCond.null, "null: invert under c_0 without guidance; source: CFG on "
                                                       "the image's own embedding at inversion_guidance")
    inversion_guidance: float = opt(1.0, "guidance of the inversion (inversion: source only)", ge=0)
    eta: List[float] = opt(help="manipulation scale(s); each runs on one shared inversion per image",
                           factory=lambda: [2.0])
    search: SearchMode = opt(SearchMode.first_flip, "how t_skip is chosen: first_flip, bisect (need oracle_dir), "
                                                    "fixed (t_skip), sweep (every t_skip, for analysis)")
    t_skips: List[float] = opt(help="t_skips the search may try (the fraction of steps skipped: 1 = no edit)",
                               factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], ge=0, le=1)
    t_skip: float = opt(0.7, "the t_skip of search: fixed", ge=0, le=1)
    batch_size: int = opt(4, "images per UNet batch; their attempts share it (each image keeps its own noise)",
                          gt=0)
    save_attempts: bool = opt(False, "also save every tried t_skip, not only the chosen edit")
    oracle_dir: Optional[str] = opt(None, "classifier folder (scripts/train_classifiers.py) the search consults")
    judge_dir: Optional[str] = opt(None, "an independent classifier folder that only evaluates the chosen edits (never "
                                         "consulted by the search); its flip rate is the one to trust")
    flip_threshold: Optional[float] = opt(None, "an edit counts once the oracle's probability of the target class "
                                                "reaches this; null = the argmax is the target (the paper's rule)",
                                          gt=0, lt=1)
    flip_agreement: FlipAgreement = opt(FlipAgreement.mean, "mean: the ensemble's probability decides; all: every "
                                                            "member must meet the criterion too")
    lpips: bool = opt(True, "LPIPS between original and edit (needs torchvision's AlexNet weights once)")
    lora: LoraRef = opt(help="a domain-tuned adapter", factory=LoraRef)
    views: ViewsConfig = opt(help="the teaching views", factory=ViewsConfig)

    def check(self) -> None:
        self.need(len(self.t_skips) > 0, "t_skips", "must list at least one value")
        self.need(len(self.eta) > 0, "eta", "must list at least one value")
        for pair in self.directions:
            self.need(len(pair) == 2 and pair[0] != pair[1], "directions",
                      f"entries must be [source, target] of two different classes, got {list(pair)}")
        self.need(self.search in (SearchMode.fixed, SearchMode.sweep) or self.oracle_dir is not None, "oracle_dir",
                  f"must be set for search: {self.search.value} (or use search: fixed)")


@dataclass
class LoraTrainConfig(Schema):
    """kandinsky_lora_train.py: LoRA domain tuning of the decoder UNet (MoVQ and the image encoder stay frozen).

    Objective: epsilon MSE on the first latent channels of the UNet output, t ~ U{0 .. num_train_timesteps - 1},
    noise added to the image's MoVQ latent w_0 with DDPMScheduler.add_noise, conditioned on the same image's CLIP
    embedding. Writes output_dir/{config.yaml, run_info.json, checkpoint-<step>/, pytorch_lora_weights.safetensors,
    validation/}.
    """

    RUN_CONTROL_KEYS: ClassVar[FrozenSet[str]] = frozenset({
        "output_dir", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
        "validation_steps", "num_validation_images", "validation_inference_steps", "validation_guidance_scale",
        "report_to", "cache_dir", "gradient_checkpointing", "allow_tf32", "data.num_workers", "model.device",
        "model.channels_last", "model.compile", "model.local_files_only"})
    output_dir: str = opt(MISSING, "run folder: checkpoints, the final adapter, validation grids")
    seed: int = opt(0, "LoRA init, data order, noise and timesteps (each step's draws derive from seed and step)")
    model: ModelConfig = opt(help="the Kandinsky parts; model.dtype auto = the mixed_precision dtype",
                             factory=ModelConfig)
    data: DataConfig = opt(help="trains on data.train_split of data.classes", factory=DataConfig)
    rank: int = opt(4, "LoRA rank r", gt=0)
    alpha: float = opt(8.0, "LoRA alpha; the update is scaled by alpha / rank", gt=0)
    target_modules: List[str] = opt(help="UNet layers that get an adapter",
                                    factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"])
    learning_rate: float = opt(4.3e-4, "AdamW LR, used as given (authors: 3e-3 x batch 32 / 224 = 4.29e-4)", gt=0)
    lr_warmup_steps: int = opt(0, "LR ramps linearly from learning_rate / lr_warmup_steps to learning_rate", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2", ge=0, lt=1)
    adam_weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: Optional[float] = opt(1.0, "clip the global L2 norm of the LoRA gradients; null = no clipping",
                                         gt=0)
    train_batch_size: int = opt(32, "images per process and micro-step", gt=0)
    gradient_accumulation_steps: int = opt(1, "total batch = train_batch_size x processes x this", gt=0)
    max_train_steps: int = opt(2000, "optimizer updates; raise it and resume to train on", gt=0)
    mixed_precision: MixedPrecision = opt(MixedPrecision.no, "autocast: no, fp16 or bf16; LoRA weights stay float32")
    gradient_checkpointing: bool = opt(False, "recompute UNet activations in backward: less memory, ~30% slower")
    allow_tf32: bool = opt(True, "TF32 matmuls and convolutions on CUDA (no effect elsewhere)")
    augment_flip: bool = opt(False, "random horizontal flips; MoVQ latents are then computed every step (no cache)")
    holdout_per_class: int = opt(0, "leave this many train images per class out of training: the validation images "
                                    "scripts/calibrate.py edits with --images this (or fewer) and --seed "
                                    "holdout_seed, so that settings are chosen on images the adapter never saw; "
                                    "0 = train on all", ge=0)
    holdout_seed: int = opt(0, "the seed of that share (calibrate.py's --seed)", ge=0)
    cache_dir: Optional[str] = opt(None, "MoVQ latents + CLIP embeddings, keyed by model and data; null = "
                                         "output_dir/cache")
    checkpointing_steps: int = opt(100, "write checkpoint-<step>/ every N steps (and at the last)", gt=0)
    checkpoints_total_limit: Optional[int] = opt(None, "keep only the newest N checkpoints; null = keep all", gt=0)
    resume_from_checkpoint: Optional[str] = opt(None, "latest (newest in output_dir, or start fresh), a path, or "
                                                      "null")
    validation_steps: Optional[int] = opt(None, "regenerate held-out images every N steps; null = no validation",
                                          gt=0)
    num_validation_images: int = opt(4, "held-out images of data.eval_split shown in the validation grids", gt=0)
    validation_inference_steps: int = opt(50, "DDPM steps of the validation samples", gt=0)
    validation_guidance_scale: float = opt(4.0, "classifier-free guidance of the validation samples", ge=0)
    report_to: ReportTo = opt(ReportTo.none, "tracker for loss, LR and validation grids: none, tensorboard, wandb")

    def check(self) -> None:
        self.need(len(self.target_modules) > 0, "target_modules", "must name at least one module (e.g. to_q)")
        self.need(self.resume_from_checkpoint != "", "resume_from_checkpoint", "must be latest, a path or null")
        half = {DType.float16: MixedPrecision.fp16, DType.bfloat16: MixedPrecision.bf16}.get(self.model.dtype)
        self.need(half is None or half == self.mixed_precision, "model.dtype",
                  f"= {self.model.dtype.value} needs mixed_precision: {half.value if half else ''} (frozen weights "
                  "may be half precision only under autocast); or set model.dtype: auto, which follows "
                  "mixed_precision")


@dataclass
class ClassifierConfig(Schema):
    """scripts/train_classifiers.py: a classifier folder (the editing run's oracle_dir or judge_dir).

    ``kind: ensemble`` trains one network per entry of ``architectures``; ``kind: clip_probe`` a linear head on frozen
    open_clip image features (an oracle independent of the CNNs). Both train on ``data.train_split`` minus a seeded
    validation share, and report accuracy on ``data.eval_split`` (the images that get edited) only as a test set.
    """

    RUN_CONTROL_KEYS: ClassVar[FrozenSet[str]] = frozenset({"output_dir", "device", "data.num_workers"})
    output_dir: str = opt(MISSING, "folder of the members (<architecture>.safetensors + .json) and test_metrics.json")
    seed: int = opt(0, "the validation split, weight init, shuffling and augmentation")
    data: DataConfig = opt(help="the dataset; every class of data.classes is one output of the classifier",
                           factory=DataConfig)
    kind: OracleKind = opt(OracleKind.ensemble, "ensemble (networks) or clip_probe (linear head on open_clip features)")
    architectures: List[Architecture] = opt(
        help="kind ensemble: the networks, one member each",
        factory=lambda: [Architecture.resnet18, Architecture.efficientnet_b0, Architecture.mobilenet_v2])
    pretrained: bool = opt(True, "kind ensemble: ImageNet init from torchvision (downloaded once; resnet18, "
                                 "efficientnet_b0, mobilenet_v2 only); false = random")
    augment: Augment = opt(Augment.flip_scale, "kind ensemble: training augmentation (affine for digits and text)")
    mixup: float = opt(0.0, "kind ensemble: mixup's Beta(a, a) parameter a: each training image blended with "
                            "another of its batch and its label likewise, so in-between images get in-between "
                            "probabilities; 0 = off", ge=0)
    image_size: int = opt(224, "kind ensemble: the networks' input size (clip_probe uses CLIP's own)", gt=0)
    clip_model: str = opt("ViT-B-32", "kind clip_probe: an open_clip model name")
    clip_pretrained: Optional[str] = opt("laion2b_s34b_b79k", "kind clip_probe: open_clip tag or weights file; null "
                                                               "= random (tests)")
    batch_size: int = opt(32, "images per batch", gt=0)
    epochs: int = opt(10, "at most; early stopping on the validation loss usually ends sooner", gt=0)
    learning_rate: float = opt(1e-3, "Adam LR", gt=0)
    patience: int = opt(5, "epochs without a better validation loss before stopping", gt=0)
    val_fraction: float = opt(0.1, "share of each class's train images held out for validation", gt=0, lt=1)
    max_train_per_class: Optional[int] = opt(1000, "train images per class at most; null = all not in validation",
                                             gt=0)
    train_part: Optional[List[int]] = opt(None, "[k, n]: train and validate on part k of n disjoint parts of each "
                                                "class's train images (a fixed shuffle, the same whatever the seed; "
                                                "an independent judge takes another k); null = all")
    min_accuracy: float = opt(0.75, "a member whose validation accuracy is below this is not written (the test "
                                    "split is never used to decide)", ge=0, le=1)
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps")
    save_dtype: DType = opt(DType.float32, "stored weights: float32 or float16 (halves a shipped oracle)")

    def check(self) -> None:
        self.need(len(self.architectures) > 0, "architectures", "must name at least one architecture")
        self.need(len(set(self.architectures)) == len(self.architectures), "architectures",
                  "has duplicates (one checkpoint per architecture)")
        self.need(self.data.train_split != self.data.eval_split, "data.eval_split",
                  f"= '{self.data.eval_split}' is also the train split: the test images must not be trained on")
        self.need(len(self.data.classes) != 1, "data.classes",
                  "names one class: a classifier needs two or more (or none for the dataset's)")
        self.need(self.train_part is None or (len(self.train_part) == 2 and 0 <= self.train_part[0] < self.train_part[1]),
                  "train_part", "must be [k, n] with 0 <= k < n, or null")
        small = [str(a) for a in self.architectures if a in SMALL_ARCHITECTURES]
        self.need(self.kind != OracleKind.ensemble or not (self.pretrained and small), "pretrained",
                  f"but {small} have no pretrained weights: set pretrained: false (random init), or use "
                  "only resnet18 / efficientnet_b0 / mobilenet_v2")
        self.need("lenet" not in small or self.image_size >= 16, "image_size", "must be at least 16 for lenet")
        self.need(check_device(self.device), "device", "must be auto, cpu, cuda, cuda:N or mps")
        self.need(self.save_dtype in (DType.float32, DType.float16), "save_dtype", "must be float32 or float16")
        self.need(self.mixup == 0 or self.kind == OracleKind.ensemble, "mixup",
                  f"= {self.mixup:g} but kind is {self.kind}: the linear probe trains on fixed features without "
                  "mixup; set mixup: 0 or use kind: ensemble")


@dataclass
class MiniConfig(Schema):
    """scripts/train_mini_model.py: a small Kandinsky-2.2-shaped model (MoVQ, CLIP image encoder, UNet, DDPM
    scheduler) trained from scratch on the CPU, for the offline demo. Three stages, each saved when done:
    the MoVQ autoencoder, then the image encoder (supervised-contrastive on the labels, then frozen), then the UNet
    (epsilon MSE, conditioned on the frozen encoder's embedding with Gaussian noise added and a share replaced by c_0).
    """

    RUN_CONTROL_KEYS: ClassVar[FrozenSet[str]] = frozenset({"output_dir", "num_threads", "overwrite"})
    output_dir: str = opt(MISSING, "the model folder: decoder/{unet,movq,scheduler}, prior/{image_encoder,"
                                   "image_processor}")
    seed: int = opt(0, "every random draw of the three stages")
    data: DataConfig = opt(help="the training data (all classes)", factory=DataConfig)
    image_size: int = opt(32, "pixels", gt=0)
    num_threads: Optional[int] = opt(None, "torch CPU threads; null = torch's default", gt=0)
    movq_channels: int = opt(32, "MoVQ width (three levels: latents are image_size / 4)", gt=0)
    movq_steps: int = opt(300, "MoVQ training steps", gt=0)
    movq_lr: float = opt(1e-3, "MoVQ AdamW LR", gt=0)
    latent_std_weight: float = opt(0.01, "keeps the latents near unit variance (there is no scaling factor)", ge=0)
    encoder_hidden: int = opt(128, "image encoder width", gt=0)
    encoder_layers: int = opt(4, "image encoder layers", gt=0)
    encoder_patch: int = opt(8, "image encoder patch size", gt=0)
    embed_dim: int = opt(64, "embedding width (image_embeds)", gt=0)
    encoder_steps: int = opt(600, "encoder training steps (supervised-contrastive)", gt=0)
    encoder_lr: float = opt(1e-3, "encoder AdamW LR", gt=0)
    contrastive_temperature: float = opt(0.1, "supervised-contrastive temperature", gt=0)
    unet_channels: List[int] = opt(help="UNet block widths", factory=lambda: [64, 128], gt=0)
    unet_steps: int = opt(4000, "UNet training steps", gt=0)
    unet_lr: float = opt(5e-4, "UNet AdamW LR", gt=0)
    unet_ema_decay: float = opt(0.0, "UNet stage: save an exponential moving average of the weights with this decay "
                                     "(diffusers' EMAModel, e.g. 0.999) instead of the last step's; 0 = off",
                                ge=0, lt=1)
    embed_noise: float = opt(0.3, "Gaussian noise of this fraction of the embedding's norm, added while the UNet "
                                  "trains", ge=0)
    null_prob: float = opt(0.1, "share of embeddings replaced by c_0 (the unconditional branch of guidance)",
                           ge=0, le=1)
    unet_shift: float = opt(0.0, "UNet stage: random translation of each training image, a fraction of its "
                                 "half-width (0 = the images as they are)", ge=0, lt=1)
    unet_scale: float = opt(0.0, "UNet stage: random scaling of each training image by 1 +- this", ge=0, lt=1)
    unet_rotate: float = opt(0.0, "UNet stage: random rotation of each training image, up to this many degrees",
                             ge=0, le=180)
    holdout_classes: List[str] = opt(help="classes whose validation images are left out of all three stages: the "
                                          "images scripts/calibrate.py edits (same count and seed), so that the "
                                          "settings are chosen on images the model never saw; [] = none",
                                     factory=list)
    holdout_per_class: int = opt(0, "validation images left out per class of holdout_classes (calibrate.py's "
                                    "--images)", ge=0)
    holdout_seed: int = opt(0, "the seed of that share (calibrate.py's --seed)", ge=0)
    batch_size: int = opt(64, "images per step", gt=0)
    save_dtype: DType = opt(DType.float16, "stored weights")
    overwrite: bool = opt(False, "retrain stages whose output already exists")

    def check(self) -> None:
        # diffusers' MoVQ and UNet blocks normalise over 32 groups, and the UNet's attention heads are 32 wide
        self.need(self.movq_channels % 32 == 0, "movq_channels", "must be a multiple of 32 (32, 64, ...)")
        self.need(all(c % 32 == 0 for c in self.unet_channels) and len(self.unet_channels) == 2, "unet_channels",
                  "must be two multiples of 32, e.g. [64, 128]")
        self.need(self.encoder_hidden % 4 == 0, "encoder_hidden", "must be a multiple of 4 (four attention heads)")
        self.need(self.image_size % 4 == 0, "image_size", "must be a multiple of 4 (the MoVQ halves it twice)")
        self.need(self.image_size % self.encoder_patch == 0, "encoder_patch", "must divide image_size")
        self.need(bool(self.holdout_classes) == (self.holdout_per_class > 0), "holdout_per_class",
                  "set both holdout_classes and holdout_per_class (or neither)")
        self.need(len(set(self.holdout_classes)) == len(self.holdout_classes), "holdout_classes",
                  "names a class twice")


SCHEMAS: Dict[str, type] = {
    "mini": MiniConfig,
    "edit": EditConfig,
    "lora": LoraTrainConfig,
    "embeds": EmbedsConfig,
    "classifier": ClassifierConfig,
}

# Old key -> new key. The old name still works, with a warning, so existing configs keep running.
DEPRECATED_KEYS: Dict[type, Dict[str, str]] = {EditConfig: {"num_images": "class_mean_images"}}

C = TypeVar("C")


# --------------------------------------------------------------------------------------------------------------------
# Schema introspection (for errors, list coercion and --help)
# --------------------------------------------------------------------------------------------------------------------
def _field_type(schema: type, dotted: str) -> Any:
    """The annotated type of key ``a.b.c`` in a dataclass schema, or None when it does not exist."""
    cls: Any = schema
    for part in dotted.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _is_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_is_list(a) for a in typing.get_args(tp) if a is not type(None))
    return origin in (list, List)


def _valid_keys(schema: type, dotted: str) -> List[str]:
    """The field names at the level of ``dotted`` (a.b.c) in a dataclass schema."""
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    cls = _field_type(schema, parent) if parent else schema
    return [f.name for f in dataclasses.fields(cls)] if isinstance(cls, type) and dataclasses.is_dataclass(cls) else []


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null" if len(inner) == 1 else " | ".join(map(_type_name, inner))
    if origin in (list, List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    return getattr(tp, "__name__", str(tp))


def describe(schema: type, prefix: str = "") -> List[Tuple[str, str, str, str]]:
    """Every key of a schema as (dotted key, type, default, meaning), sections flattened, from the field metadata."""
    rows: List[Tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{key}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = MISSING
        shown = "(required)" if default == MISSING else ("null" if default is None else _show(default))
        rows.append((key, _type_name(tp), shown, f.metadata.get("help", "")))
    return rows


def help_text(schema: type) -> str:
    """The keys of ``schema`` for ``--help``: one line each with type and default, then the meaning."""
    lines = []
    for key, tp, default, meaning in describe(schema):
        lines.append(f"  {key} ({tp}; default {default})\n      {meaning}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _flat_keys(node: Any, prefix: str = "") -> List[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in ([f"{prefix}{key}"] + _flat_keys(v, f"{prefix}{key}."))]
    return []


def _apply_aliases(schema: type, layer: DictConfig, source: str) -> DictConfig:
    """Rename deprecated keys of one layer to their new names, with a warning naming both."""
    for old, new in DEPRECATED_KEYS.get(schema, {}).items():
        if OmegaConf.select(layer, old, default=None) is not None or old in layer:
            log.warning("%s: key '%s' is deprecated; it is now '%s' (same meaning). Rename it.", source, old, new)
            if new in layer:
                raise ConfigError(f"{source}: both '{old}' (deprecated) and '{new}' are set; keep only '{new}'",
                                  key=new)
            value = layer.pop(old)
            layer[new] = value
    return layer


def _listify(schema: type, layer: DictConfig) -> DictConfig:
    """A scalar where the schema expects a list becomes a one-element list (``eta=2`` means ``eta=[2.0]``)."""
    container = OmegaConf.to_container(layer)
    for key in _flat_keys(container):
        value = OmegaConf.select(layer, key)
        if _is_list(_field_type(schema, key)) and value is not None and not isinstance(value, (ListConfig, list)):
            OmegaConf.update(layer, key, [value], merge=False)
    return layer


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "?")
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(schema, key)
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        where = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return ConfigError(f"{source}: unknown config key '{key}'.{hint} Valid keys here: "
                           f"{', '.join(where + v for v in valid) or '(none)'}.", key=key)
    tp = _field_type(schema, key)
    expected = f" (expected {_type_name(tp)})" if tp is not None else ""
    return ConfigError(f"{source}: bad value for '{key}'{expected}: {msg}", key=key)


def resolve_config_path(config_path: str) -> Path:
    """The YAML file of ``--config_path``: the path itself, or an alias (``configs/edit/retina.yaml`` is the Kermany
    OCT domain's ``kermany.yaml``). A missing file raises a ConfigError listing the configs beside it and the closest
    name."""
    path = Path(config_path)
    if path.is_file():
        return path
    alias = CONFIG_ALIASES.get(path.stem)
    if alias is not None and (path.parent / f"{alias}.yaml").is_file():
        log.info("%s: using %s (the %s domain's config)", path, path.parent / f"{alias}.yaml", path.stem)
        return path.parent / f"{alias}.yaml"
    folder = path.parent if path.parent.is_dir() else CONFIGS_DIR
    existing = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
    aliases = [f"{a}.yaml" for a, target in CONFIG_ALIASES.items() if f"{target}.yaml" in existing]
    close = difflib.get_close_matches(path.name, existing + aliases, n=1, cutoff=0.4)
    if close and close[0] in aliases:  # suggest the file itself, not its alias
        close = [f"{CONFIG_ALIASES[close[0][:-5]]}.yaml"]
    hint = f" Did you mean {folder / close[0]}?" if close else ""
    listing = f" Configs in {folder}: {', '.join(existing)}." if existing else \
        f" Configs live in {CONFIGS_DIR}/<edit|lora|embeds|classifier|mini>/<dataset>.yaml."
    raise ConfigError(f"config file not found: {path}.{hint}{listing}")


# The paper's names for domains whose config files use the dataset's name.
CONFIG_ALIASES: Dict[str, str] = {"retina": "kermany", "oct": "kermany", "blackhole": "mad_sane",
                                  "black_hole": "mad_sane", "butterflies": "butterfly"}


def load_config(schema: Type[C], config_path: Optional[str], overrides: Sequence[str] = ()) -> C:
    """Merge schema defaults <- YAML file <- ``key.sub=value`` overrides, validate, return the typed object.

    Raises ConfigError naming the file or the override and the key: an unknown key, a wrong type, a missing
    required value, or a value the schema refuses.
    """
    base = OmegaConf.structured(schema)
    layers: List[Tuple[str, DictConfig]] = []
    file_label = "config"
    if config_path is not None:
        path = resolve_config_path(config_path)
        file_label = str(path)
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml syntax errors come in many types
            detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ConfigError(f"{path}: not valid YAML: {detail[:400]}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the file must hold a mapping of keys (key: value lines), not a list")
        layers.append((str(path), loaded))
    override_keys: Dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. eta=[1.0] or "
                              f"data.num_samples=5)")
        try:
            one = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line override '{item}': {str(err).splitlines()[0]}") from err
        key = item.split("=", 1)[0].strip()
        override_keys[key] = item
        layers.append((f"command-line override '{item}'", one))
    cfg: DictConfig = base
    for source, layer in layers:
        try:
            layer = _listify(schema, _apply_aliases(schema, layer, source))
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, source) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{file_label}: required key(s) not set: {', '.join(missing)} (set them in the YAML or as "
                          "key=value on the command line)")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]  (runs every schema's validation)
    except ConfigError as err:
        raise ConfigError(f"{_blame(err.key, override_keys, file_label)}: {err}", key=err.key) from None
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise ConfigError(f"{_blame(cause.key, override_keys, file_label)}: {cause}", key=cause.key) from None
        raise _explain(err, schema, file_label) from err


def _blame(key: Optional[str], override_keys: Dict[str, str], file_label: str) -> str:
    """Who set ``key``: the override that names it (or one of its sections), else the file."""
    if key:
        for k, item in reversed(list(override_keys.items())):
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"command-line override '{item}'"
    return file_label


# --------------------------------------------------------------------------------------------------------------------
# Comparing configs (resume)
# --------------------------------------------------------------------------------------------------------------------
def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_dict(cfg: Any) -> dict:
    """The resolved config as plain nested dicts (enums as their values)."""
    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))  # type: ignore[return-value]


def differing_keys(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts, sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(k for key in set(a) | set(b) for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}."))
    return [] if a == b else [prefix.rstrip(".")]


_ABSENT = object()


def _plain_default(schema: type, dotted: str) -> Any:
    """The schema's default of key ``a.b.c`` as config_dict writes it (enums as values), or _ABSENT."""
    cls: Any = schema
    *parents, last = dotted.split(".")
    for part in parents:
        cls = _field_type(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return _ABSENT
    f = next((f for f in dataclasses.fields(cls) if f.name == last), None)
    if f is None:
        return _ABSENT
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return _ABSENT
    if dataclasses.is_dataclass(value):
        return _ABSENT
    value = [v.value if isinstance(v, enum.Enum) else v for v in value] if isinstance(value, list) else value
    return value.value if isinstance(value, enum.Enum) else value


def lookup(d: Any, dotted: str, absent: Any = _ABSENT) -> Any:
    """The value at ``a.b.c`` of nested dicts, or ``absent``."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return absent
        d = d[part]
    return d


def result_keys_changed(schema: type, old: dict, new: dict) -> List[str]:
    """The keys that differ between two configs of ``schema`` and are not run-control keys: a resumed run that
    changed one of them would mix results of two settings. A key that ``old`` lacks (it was written before the key
    existed) counts as unchanged while the new value is the key's default, since a new key's default keeps the old
    behaviour; a deprecated key in ``old`` is read under its new name."""
    control = getattr(schema, "RUN_CONTROL_KEYS", frozenset())
    old = dict(old)
    for was, now in DEPRECATED_KEYS.get(schema, {}).items():  # a stamp written before a rename: same key
        if was in old and now not in old:
            old[now] = old.pop(was)
    # a key the old stamp lacks is the same run while it holds its default (both sides absent never differ)
    return [k for k in differing_keys(old, new) if k not in control
            and not (lookup(old, k) is _ABSENT and lookup(new, k) == _plain_default(schema, k))]
