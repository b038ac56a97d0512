"""Typed configuration: one dataclass schema per entry point, YAML + dot-list overrides, validated up front.

Every entry point calls :func:`load_config` before it touches a model, so an unknown key, a wrong type or a bad value
stops the run within seconds with a message that names the key and the closest valid names.
:func:`stamp_run_dir` writes the resolved config, the seed, the git commit and the package versions into the run
folder, so every output can be traced back to what produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import platform
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
KANDINSKY_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
KANDINSKY_PRIOR = "kandinsky-community/kandinsky-2-2-prior"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says which key and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Enums (modes are enums, never free strings)
# --------------------------------------------------------------------------------------------------------------------
class DType(str, enum.Enum):
    auto = "auto"  # float16 on CUDA, float32 elsewhere
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class OnBadFile(str, enum.Enum):
    error = "error"  # stop, naming the file
    skip = "skip"  # leave it out with a warning


class SearchMode(str, enum.Enum):
    first_flip = "first_flip"  # try t_skips mildest first, keep the first edit that flips the oracle
    bisect = "bisect"  # binary search over the ordered t_skips, splits weighted by UNet cost (assumes flipping is
    #                    monotone in edit strength)
    fixed = "fixed"  # one t_skip, no oracle needed
    sweep = "sweep"  # every t_skip x eta, for analysis


class InversionCond(str, enum.Enum):
    null = "null"  # invert with the null embedding, no guidance (the canonical edit-friendly setting)
    source = "source"  # invert with classifier-free guidance on the image's own embedding at inversion_guidance


# --------------------------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Where the Kandinsky 2.2 parts come from: a hub id or a local folder each."""

    decoder: str = KANDINSKY_DECODER  # holds unet/, movq/, scheduler/
    prior: str = KANDINSKY_PRIOR  # holds image_encoder/, image_processor/ (the prior diffusion model is not loaded)
    revision: Optional[str] = None
    local_files_only: bool = False  # True: never touch the network (also implied by HF_HUB_OFFLINE=1)
    device: str = "auto"  # auto = cuda when available, else cpu; or cpu, cuda, cuda:1, mps
    dtype: DType = DType.auto
    image_size: Optional[int] = None  # pixels; None = the UNet's sample_size x the MoVQ scale factor
    channels_last: bool = False  # UNet in channels_last memory format (often faster on GPUs with fp16/bf16)
    compile: bool = False  # torch.compile the UNet (after any LoRA is loaded); pays off on long GPU runs


@dataclass
class DataConfig:
    """A dataset laid out as root/<split>/<class>/<files> (see datasets/registry.py for the named domains)."""

    name: str = "folder"  # a registry entry: folder, butterfly, kermany, afhq, kikibouba, mad_sane, celebahq, digits
    root: str = MISSING
    classes: List[str] = field(default_factory=list)  # empty = the entry's classes (folder: sorted subfolders)
    train_split: str = "train"
    eval_split: str = "test"
    num_samples: Optional[int] = None  # per-class cap, applied after sorting (deterministic)
    file_lists: Dict[str, str] = field(default_factory=dict)  # class -> text file naming the eval images to use
    on_bad_file: OnBadFile = OnBadFile.error
    background: List[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under transparent pixels
    num_workers: int = 0


@dataclass
class LoraRef:
    """An adapter written by kandinsky_lora_train.py, loaded into the decoder UNet."""

    path: Optional[str] = None  # the training output_dir (or an adapter folder)
    step: Optional[int] = None  # use output_dir/checkpoint-<step>; None = the final adapter in path
    scale: float = 1.0


@dataclass
class ViewsConfig:
    """The teaching views of an editing run (flicker GIFs, interpolation strips, difference maps, index/quiz pages)."""

    enabled: bool = True
    strip_etas: List[float] = field(default_factory=lambda: [-1.0, 0.0, 1.0, 1.5, 2.0])  # one shared inversion
    strip_t_skip: float = 0.7
    gif_frame_ms: int = 700  # flicker GIF: time each frame is shown


# --------------------------------------------------------------------------------------------------------------------
# One schema per entry point
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EmbedsConfig:
    """scripts/save_embeds.py: CLIP image embeddings of every train image of each class."""

    output_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: Optional[str] = None  # None = data.train_split
    batch_size: int = 16
    overwrite: bool = False


@dataclass
class EditConfig:
    """kandinsky_eval.py: counterfactual edits of every eval image towards the other class."""

    output_dir: str = MISSING
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embeds_dir: str = MISSING  # written by scripts/save_embeds.py
    compute_missing_embeds: bool = False  # True: embed the whole train split here for classes embeds_dir lacks
    num_images: Optional[int] = None  # class means over the first num_images train embeddings; None = all
    directions: List[List[str]] = field(default_factory=list)  # [[source, target], ...]; empty = both ways, 2 classes
    num_inference_steps: int = 100  # T
    guidance_scale: float = 4.0  # g, classifier-free guidance between the null and the edited embedding
    inversion: InversionCond = InversionCond.null
    inversion_guidance: float = 1.0  # only with inversion: source
    eta: List[float] = field(default_factory=lambda: [2.0])  # manipulation scale(s)
    search: SearchMode = SearchMode.first_flip
    t_skips: List[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    t_skip: float = 0.7  # search: fixed
    batch_size: int = 4
    save_attempts: bool = False
    oracle_dir: Optional[str] = None  # a classifier ensemble folder (scripts/train_classifiers.py)
    lpips: bool = True
    lora: LoraRef = field(default_factory=LoraRef)
    views: ViewsConfig = field(default_factory=ViewsConfig)


@dataclass
class LoraTrainConfig:
    """kandinsky_lora_train.py: LoRA domain tuning of the decoder UNet (MoVQ and the image encoder stay frozen).

    Objective: epsilon MSE on the first latent channels of the UNet output, t ~ U{0 .. num_train_timesteps - 1},
    noise added to the image's MoVQ latent w_0 with DDPMScheduler.add_noise, conditioned on the same image's CLIP
    embedding. Writes output_dir/{config.yaml, run_info.json, checkpoint-<step>/, pytorch_lora_weights.safetensors,
    validation/}. Modes are Literal types (OmegaConf validates them like enums); value checks are in __post_init__.
    """

    output_dir: str = MISSING
    seed: int = 0  # LoRA init, data order, noise and timesteps (each step's draws derive from seed and step)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.dtype auto = the mixed_precision dtype
    data: DataConfig = field(default_factory=DataConfig)  # trains on data.train_split of data.classes
    # the adapter (PEFT LoraConfig, gaussian init)
    rank: int = 4
    alpha: float = 8.0  # the LoRA update is scaled by alpha / rank
    target_modules: List[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    )
    # the optimisation: AdamW, constant LR after an optional linear warmup
    learning_rate: float = 4.3e-4  # the LR used, never rescaled (authors: 3e-3 x batch 32 x 1 GPU / 224 = 4.29e-4)
    lr_warmup_steps: int = 0  # LR ramps linearly from learning_rate / lr_warmup_steps to learning_rate
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0  # clip the global L2 norm of the LoRA gradients; null = no clipping
    train_batch_size: int = 32  # images per process and micro-step
    gradient_accumulation_steps: int = 1  # total batch = train_batch_size x processes x gradient_accumulation_steps
    max_train_steps: int = 2000  # optimizer updates; raise it and resume to train on
    mixed_precision: typing.Literal["no", "fp16", "bf16"] = "no"  # autocast; LoRA weights always stay float32
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    allow_tf32: bool = True  # TF32 matmuls and convolutions on CUDA (no effect elsewhere)
    augment_flip: bool = False  # random horizontal flips; MoVQ latents are then computed every step (no cache)
    cache_dir: Optional[str] = None  # MoVQ latents + CLIP embeddings, keyed by model and data; null = output_dir/cache
    # checkpoints: output_dir/checkpoint-<step>/ (adapter + optimizer, LR schedule, RNG, step), written atomically
    checkpointing_steps: int = 100  # also written at the last step
    checkpoints_total_limit: Optional[int] = None  # keep only the newest N checkpoints; null = keep all
    resume_from_checkpoint: Optional[str] = None  # "latest" (newest in output_dir, or start fresh if none) or a path
    # validation: fixed held-out images of data.eval_split, sampled from noise with their own embedding
    validation_steps: Optional[int] = None  # every N steps (and at step 0 and the end); null = no validation
    num_validation_images: int = 4
    validation_inference_steps: int = 50
    validation_guidance_scale: float = 4.0  # classifier-free guidance against the null embedding
    report_to: typing.Literal["none", "tensorboard", "wandb"] = "none"  # loss, LR and validation grids

    def __post_init__(self) -> None:
        """Checks that types alone cannot express; runs when load_config builds the object, before any model loads."""

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"lora config: '{key}' {what}")

        need(self.rank > 0, "rank", "must be > 0")
        need(self.alpha > 0, "alpha", "must be > 0")
        need(len(self.target_modules) > 0, "target_modules", "must name at least one module (e.g. to_q)")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 / adam_beta2", "must lie in [0, 1)")
        need(self.adam_weight_decay >= 0 and self.adam_epsilon > 0, "adam_weight_decay / adam_epsilon",
             "must be >= 0 / > 0")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null")
        need(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0")
        need(self.max_train_steps > 0, "max_train_steps", "must be > 0")
        need(self.checkpointing_steps > 0, "checkpointing_steps", "must be > 0")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0, "checkpoints_total_limit",
             "must be > 0 or null")
        need(self.validation_steps is None or self.validation_steps > 0, "validation_steps", "must be > 0 or null")
        need(self.num_validation_images > 0, "num_validation_images", "must be > 0")
        need(self.validation_inference_steps > 0, "validation_inference_steps", "must be > 0")
        need(self.resume_from_checkpoint != "", "resume_from_checkpoint", "must be latest, a path or null")
        half = {DType.float16: "fp16", DType.bfloat16: "bf16"}.get(self.model.dtype)
        need(half is None or half == self.mixed_precision, "model.dtype",
             f"= {self.model.dtype.value} needs mixed_precision: {half} (frozen weights may be half precision only "
             "under autocast); or set model.dtype: auto, which follows mixed_precision")


@dataclass
class ClassifierConfig:
    """scripts/train_classifiers.py: the evaluation oracle of one binary domain, written to ``output_dir`` (the folder
    kandinsky_eval.py's ``oracle_dir`` points at). ``kind: ensemble`` trains one CNN per entry of ``architectures``;
    ``kind: clip_probe`` trains a logistic-regression head on frozen open_clip image features instead (an oracle
    independent of the CNNs; give it its own output_dir). Both train on ``data.train_split`` minus a seeded
    validation share, and report accuracy on ``data.eval_split`` (the images that get edited) only as a test set.
    Modes are Literal types (OmegaConf validates them like enums), so the schema needs nothing outside itself.
    """

    output_dir: str = MISSING
    seed: int = 0  # the validation split, weight init, shuffling and augmentation
    data: DataConfig = field(default_factory=DataConfig)
    kind: typing.Literal["ensemble", "clip_probe"] = "ensemble"
    architectures: List[typing.Literal["resnet18", "efficientnet_b0", "mobilenet_v2"]] = field(
        default_factory=lambda: ["resnet18", "efficientnet_b0", "mobilenet_v2"]
    )  # kind: ensemble
    pretrained: bool = True  # kind: ensemble; ImageNet init from torchvision (downloaded once); false = random init
    image_size: int = 224  # kind: ensemble; the CNNs' input size (clip_probe uses the CLIP model's own size)
    clip_model: str = "ViT-B-32"  # kind: clip_probe; an open_clip model name
    clip_pretrained: Optional[str] = "laion2b_s34b_b79k"  # kind: clip_probe; open_clip tag or file; null = random (tests)
    batch_size: int = 32
    epochs: int = 10  # at most; early stopping on the validation loss usually ends sooner
    learning_rate: float = 1e-3  # Adam
    patience: int = 5  # epochs without a better validation loss before stopping
    val_fraction: float = 0.1  # of each class's train images (at most max_train_per_class of them), at least one
    max_train_per_class: Optional[int] = 1000  # null = every train image not in the validation split
    device: str = "auto"  # auto = cuda when available, else cpu; or cpu, cuda, cuda:N, mps
    save_dtype: typing.Literal["float32", "float16"] = "float32"  # stored weights (float16 halves a shipped oracle)

    def __post_init__(self) -> None:
        """Checks that types alone cannot express; runs when load_config builds the object, before any model loads."""

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"classifier config: '{key}' {what}")

        need(len(self.architectures) > 0, "architectures", "must name at least one architecture")
        need(len(set(self.architectures)) == len(self.architectures), "architectures",
             f"has duplicates: {list(self.architectures)} (one checkpoint per architecture)")
        need(self.image_size > 0, "image_size", "must be > 0")
        need(self.epochs > 0, "epochs", "must be > 0")
        need(self.patience > 0, "patience", "must be > 0")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(0.0 < self.val_fraction < 1.0, "val_fraction", f"= {self.val_fraction} must lie strictly between 0 and 1")
        need(self.max_train_per_class is None or self.max_train_per_class > 0, "max_train_per_class",
             "must be > 0 or null")
        need(self.data.train_split != self.data.eval_split, "data.eval_split",
             f"= '{self.data.eval_split}' is also the train split: the test images must not be trained on")
        need(len(self.data.classes) in (0, 2), "data.classes",
             f"= {list(self.data.classes)}: the oracle is binary, name exactly two classes (or none for the dataset's)")
        dev = self.device
        need(dev in ("auto", "cpu", "mps", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "device",
             f"= '{dev}' must be auto, cpu, cuda, cuda:N or mps")


@dataclass
class MiniConfig:
    """scripts/train_mini_model.py: a small Kandinsky-2.2-shaped model (MoVQ, CLIP image encoder, UNet, DDPM
    scheduler) trained from scratch on the CPU, for the offline demo. Three stages, each saved when done:
    the MoVQ autoencoder, then the image encoder (supervised-contrastive on the labels, then frozen), then the UNet
    (epsilon MSE, conditioned on the frozen encoder's embedding with Gaussian noise added and a share replaced by c_0).
    """

    output_dir: str = MISSING  # the model folder: decoder/{unet,movq,scheduler}, prior/{image_encoder,image_processor}
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    image_size: int = 32
    num_threads: Optional[int] = None  # torch CPU threads (the mini model trains on the CPU); null = torch's default
    # MoVQ: three levels (latents are image_size / 4), trained as a plain autoencoder (quantiser bypassed)
    movq_channels: int = 32
    movq_steps: int = 300
    movq_lr: float = 1e-3
    latent_std_weight: float = 0.01  # keeps the latents near unit variance (there is no scaling factor)
    # image encoder: a small CLIP vision transformer, supervised-contrastive on the labels, with augmentations that
    # make the embedding ignore position and size (semantic but lossy, like CLIP)
    encoder_hidden: int = 128
    encoder_layers: int = 4
    encoder_patch: int = 8
    embed_dim: int = 64
    encoder_steps: int = 600
    encoder_lr: float = 1e-3
    contrastive_temperature: float = 0.1
    # UNet
    unet_channels: List[int] = field(default_factory=lambda: [64, 128])
    unet_steps: int = 4000
    unet_lr: float = 5e-4
    embed_noise: float = 0.3  # Gaussian noise of this fraction of the embedding's norm, added while the UNet trains
    null_prob: float = 0.1  # share of embeddings replaced by c_0 (the unconditional branch of guidance)
    batch_size: int = 64
    save_dtype: DType = DType.float16
    overwrite: bool = False  # retrain stages whose output already exists


SCHEMAS: Dict[str, type] = {
    "mini": MiniConfig,
    "edit": EditConfig,
    "lora": LoraTrainConfig,
    "embeds": EmbedsConfig,
    "classifier": ClassifierConfig,
}

C = TypeVar("C")


# --------------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------------
def _valid_keys(schema: type, dotted: str) -> List[str]:
    """The field names at the level of ``dotted`` (a.b.c) in a dataclass schema."""
    cls: Any = schema
    for part in dotted.split(".")[:-1]:
        cls = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(schema, str(key))
        leaf = str(key).split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return ConfigError(
            f"{source}: unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid) or '(none)'}."
        )
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


def load_config(schema: Type[C], config_path: Optional[str], overrides: Sequence[str] = ()) -> C:
    """Merge schema defaults <- YAML file <- ``key.sub=value`` overrides, validate, return the typed object.

    Raises ConfigError (naming the file and key) on an unknown key, a wrong type, a missing required value or a value
    that fails :func:`validate`.
    """
    base = OmegaConf.structured(schema)
    layers: List[Any] = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass --config_path pointing at a YAML file in configs/)")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as err:  # yaml syntax errors come in many types
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    if overrides:
        try:
            layers.append(("command-line overrides", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line overrides: {err}") from err
    cfg: DictConfig = base
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, source) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{config_path or 'config'}: required key(s) not set: {', '.join(missing)} "
            f"(set them in the YAML or as key=value on the command line)"
        )
    obj = OmegaConf.to_object(cfg)
    validate(obj, source=str(config_path or "config"))
    return obj  # type: ignore[return-value]


def validate(cfg: Any, source: str = "config") -> None:
    """Value checks that types alone cannot express. Raises ConfigError naming the key."""

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: '{key}' {what}")

    if hasattr(cfg, "data"):
        d = cfg.data
        need(d.num_samples is None or d.num_samples > 0, "data.num_samples", "must be a positive integer or null")
        need(len(d.background) == 3 and all(0 <= v <= 255 for v in d.background), "data.background",
             "must be three integers in 0..255 (RGB)")
        need(len(set(d.classes)) == len(d.classes), "data.classes", f"has duplicates: {d.classes}")
        for cls in d.file_lists:
            need(not d.classes or cls in d.classes, f"data.file_lists.{cls}", f"names a class not in data.classes {d.classes}")
        from datasets.registry import DATASETS  # the data layer is plain python; importing it loads no model

        if d.name not in DATASETS:
            close = difflib.get_close_matches(d.name, list(DATASETS), n=3)
            raise ConfigError(
                f"{source}: 'data.name' = '{d.name}' is not a known dataset"
                f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}. Known: {', '.join(DATASETS)}"
            )
    for key in ("batch_size", "train_batch_size"):
        if hasattr(cfg, key):
            need(getattr(cfg, key) > 0, key, "must be > 0")
    if hasattr(cfg, "model"):
        dev = cfg.model.device
        need(dev in ("auto", "cpu", "mps") or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()),
             "model.device", f"= '{dev}' must be auto, cpu, cuda, cuda:N or mps")
        need(cfg.model.image_size is None or cfg.model.image_size > 0, "model.image_size", "must be > 0 or null")
    if isinstance(cfg, EditConfig):
        need(cfg.num_inference_steps > 0, "num_inference_steps", "must be > 0")
        need(len(cfg.t_skips) > 0, "t_skips", "must list at least one value")
        for t in list(cfg.t_skips) + [cfg.t_skip, cfg.views.strip_t_skip]:
            need(0.0 <= t <= 1.0, "t_skips / t_skip", f"values must lie in [0, 1], got {t}")
        need(len(cfg.eta) > 0, "eta", "must list at least one value")
        for pair in cfg.directions:
            need(len(pair) == 2 and pair[0] != pair[1], "directions", f"entries must be [source, target], got {pair}")
        need(cfg.search in (SearchMode.fixed, SearchMode.sweep) or cfg.oracle_dir is not None, "oracle_dir",
             f"must be set for search: {cfg.search.value} (or use search: fixed)")
        need(cfg.num_images is None or cfg.num_images > 0, "num_images", "must be > 0 or null")
        need(cfg.lora.step is None or cfg.lora.path is not None, "lora.step", "needs lora.path")
        need(cfg.views.gif_frame_ms > 0, "views.gif_frame_ms", "must be > 0")


# --------------------------------------------------------------------------------------------------------------------
# Stamping run folders
# --------------------------------------------------------------------------------------------------------------------
_STAMPED_PACKAGES = (
    "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "omegaconf", "open_clip_torch",
    "safetensors", "pillow", "numpy", "lpips", "scikit-learn",
)


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (with '-dirty' when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for name in _STAMPED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def stamp_run_dir(cfg: Any, output_dir: Optional[str] = None) -> Path:
    """Create the run folder and write config.yaml (resolved) and run_info.json (seed, git commit, versions, argv).

    A resumed run keeps the first stamp's config.yaml when it is identical and refuses a different one, so a folder
    never mixes results of two configs.
    """
    out = Path(output_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = to_yaml(cfg)
    cfg_file = out / "config.yaml"
    if cfg_file.exists() and cfg_file.read_text() != text:
        old = OmegaConf.to_container(OmegaConf.create(cfg_file.read_text()))
        new = OmegaConf.to_container(OmegaConf.create(text))
        diff = sorted(_diff_keys(old, new))
        allowed = {"batch_size", "overwrite", "data.num_workers", "model.device", "model.dtype"}
        if set(diff) - allowed:
            raise ConfigError(
                f"{cfg_file} was written by a different config (keys differ: {', '.join(diff)}). "
                f"Use a new output_dir, or delete {out} to start over."
            )
    atomic_write_text(cfg_file, text)
    info = {
        "seed": getattr(cfg, "seed", None),
        "git_commit": git_commit(),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
    }
    atomic_write_text(out / "run_info.json", json.dumps(info, indent=2))
    return out


def _diff_keys(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys: List[str] = []
        for k in set(a) | set(b):
            keys += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
