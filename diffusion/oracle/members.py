"""The evaluation oracle: binary classifiers of one domain, saved as safetensors + JSON, loaded as one callable.

An oracle folder (``output_dir`` of scripts/train_classifiers.py, ``oracle_dir`` of kandinsky_eval.py) holds one
*member* per classifier::

    <name>.safetensors   the member's state dict (never a pickle)
    <name>.json          architecture, classes, input size, normalisation, validation accuracy, provenance
    test_metrics.json    test accuracy of each member and of the ensemble (written by the training script)

A member maps images in [0, 1] to one logit for ``classes[1]``: it resizes the images to its own input size,
normalises them with its own mean/std, and runs its network. The oracle averages the members' sigmoids,
p = mean_m sigmoid(logit_m), and returns [1 - p, p] per image, so its prediction (argmax) is "p > 0.5".
Members are CNNs (resnet18, efficientnet_b0, mobilenet_v2 from torchvision) or a CLIP linear probe (a linear head on
frozen open_clip image features; only the head is stored, the CLIP weights come from open_clip).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from diffusion.errors import OracleError, WeightsUnavailableError
from diffusion.files import atomic_write_bytes, atomic_write_text, make_dirs

log = logging.getLogger(__name__)

ARCHITECTURES: Tuple[str, ...] = ("resnet18", "efficientnet_b0", "mobilenet_v2")
CLIP_PROBE = "clip_probe"
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
MEMBER_FORMAT = "diffusion-oracle-member/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")  # refused: loading them can run code
TEST_METRICS = "test_metrics.json"
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------------------------
# Member description (the JSON beside each checkpoint)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class MemberInfo:
    """What it takes to rebuild and use one member; stored as ``<name>.json``."""

    architecture: str  # one of ARCHITECTURES, or CLIP_PROBE
    classes: List[str]  # label order of the training data; the logit is for classes[1]
    input_size: int  # pixels (square); the member resizes its input to this
    mean: List[float]  # per-channel normalisation applied to [0, 1] inputs
    std: List[float]
    val_accuracy: Optional[float] = None
    clip_model: Optional[str] = None  # CLIP_PROBE only
    clip_pretrained: Optional[str] = None  # CLIP_PROBE only
    extra: Dict[str, Any] = field(default_factory=dict)  # provenance and training figures (not needed to load)

    def to_json(self) -> str:
        return json.dumps({"format": MEMBER_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_file(cls, path: Path) -> "MemberInfo":
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise OracleError(f"{path}: not a readable JSON file ({err}). Re-run scripts/train_classifiers.py."
                              ) from err
        if not isinstance(raw, dict) or raw.get("format") != MEMBER_FORMAT:
            raise OracleError(f"{path}: not an oracle member description (expected \"format\": \"{MEMBER_FORMAT}\"). "
                              "Re-run scripts/train_classifiers.py into this folder, or remove the file.")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(n for n in ("architecture", "classes", "input_size", "mean", "std") if n not in raw)
        if missing:
            raise OracleError(f"{path}: missing keys {missing}. Re-run scripts/train_classifiers.py.")
        info = cls(**{k: v for k, v in raw.items() if k in names})
        if info.architecture not in ARCHITECTURES + (CLIP_PROBE,):
            raise OracleError(f"{path}: unknown architecture '{info.architecture}' "
                              f"(known: {', '.join(ARCHITECTURES + (CLIP_PROBE,))}).")
        if len(info.classes) != 2 or len(set(info.classes)) != 2:
            raise OracleError(f"{path}: a member is a binary classifier, but 'classes' = {info.classes}.")
        return info


# --------------------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------------------
def build_cnn(architecture: str, pretrained: bool) -> nn.Module:
    """A torchvision CNN with one output logit: ImageNet weights (``pretrained``) or random init, then a fresh
    Linear(features, 1) head. The global RNG draws the random parts; seed it first for a reproducible init.

    Raises:
        ValueError: unknown architecture.
        WeightsUnavailableError: ``pretrained`` and torchvision cannot download or find the ImageNet weights.
    """
    from torchvision import models

    builders = {
        "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
        "efficientnet_b0": (models.efficientnet_b0, models.EfficientNet_B0_Weights.IMAGENET1K_V1),
        "mobilenet_v2": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1),
    }
    if architecture not in builders:
        raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(builders)}")
    builder, weights = builders[architecture]
    try:
        net = builder(weights=weights if pretrained else None)
    except Exception as err:  # URLError offline, RuntimeError on a damaged download, ...
        raise WeightsUnavailableError(
            f"{architecture}: torchvision's ImageNet weights could not be loaded ({type(err).__name__}: {err}). "
            f"They download once from {weights.url} into the torch hub cache ($TORCH_HOME/hub/checkpoints). "
            f"Offline, copy that file there, or set pretrained: false to train {architecture} from random init."
        ) from err
    if architecture == "resnet18":
        net.fc = nn.Linear(net.fc.in_features, 1)
    else:  # efficientnet_b0 and mobilenet_v2: classifier = (Dropout, Linear)
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, 1)
    return net


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, C, size, size): bilinear with antialiasing, no crop (as datasets.images.resize
    does for one image), clamped to [0, 1]. Returns the input itself when it already has that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


class Member(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> logits (B,) for classes[1]: resize to ``input_size``, normalise, ``net``.

    Training and the oracle call the same module, so what the oracle sees is what the network was trained on.
    """

    def __init__(self, net: nn.Module, input_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net, self.input_size = net, int(input_size)
        # not in the state dict: the JSON holds them, the checkpoint holds only learned weights
        self.register_buffer("mean", torch.tensor(list(mean)).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).reshape(1, -1, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, input_size, input_size), normalised."""
        images = resize_batch(images.to(self.mean.device, torch.float32), self.input_size)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(images)).reshape(-1)

    def weights(self) -> Dict[str, torch.Tensor]:
        """What the checkpoint stores."""
        return self.net.state_dict()

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state, strict=True)


class ClipFeatures(nn.Module):
    """Frozen open_clip image tower: (B, 3, S, S) normalised -> (B, D) features, L2-normalised and scaled by sqrt(D)
    (unit RMS per dimension, so a linear head trained with Adam at 1e-3 moves at the pace the CNN heads do)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model.eval().requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.clip.encode_image(pixels).float()  # (B, D)
        return F.normalize(feats, dim=-1) * math.sqrt(feats.shape[-1])


class ClipProbe(nn.Module):
    """The net of a CLIP linear-probe member: frozen features -> Linear(D, 1). Only ``head`` is learned and saved."""

    def __init__(self, features: ClipFeatures, dim: int):
        super().__init__()
        self.features, self.head = features, nn.Linear(dim, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


class ClipMember(Member):
    """A member whose net is a :class:`ClipProbe`; its checkpoint holds the head alone."""

    net: ClipProbe

    def weights(self) -> Dict[str, torch.Tensor]:
        return self.net.head.state_dict()

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.net.head.load_state_dict(state, strict=True)


def load_clip(model_name: str, pretrained: Optional[str]) -> Tuple[nn.Module, int, List[float], List[float]]:
    """An open_clip model with its input size and normalisation: ``(model, size, mean, std)``.

    Raises:
        WeightsUnavailableError: open_clip does not know the model, or its weights cannot be loaded (offline, unknown
            tag, missing file). The message names clip_model / clip_pretrained and what to do.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise WeightsUnavailableError(f"clip_model '{model_name}' is not an open_clip model; see "
                                      f"open_clip.list_models(), e.g. ViT-B-32, ViT-L-14.")
    if pretrained is None:
        log.warning("clip_pretrained is null: %s has RANDOM weights (only for tests)", model_name)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights (pretrained: null) must be the same when the probe is loaded again
            model = open_clip.create_model(model_name, pretrained=pretrained,
                                           require_pretrained=pretrained is not None)
    except Exception as err:  # RuntimeError from open_clip, OSError / hub errors offline
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsUnavailableError(
            f"open_clip could not load clip_model '{model_name}' with clip_pretrained '{pretrained}' "
            f"({type(err).__name__}: {err}). Known tags for this model: {', '.join(tags) or '(none)'}. The weights "
            "download once from the Hugging Face hub into its cache ($HF_HOME); offline, run once where the hub is "
            "reachable and copy the cache, or pass a local weights file as clip_pretrained."
        ) from err
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    return model, int(size), list(pre["mean"]), list(pre["std"])


def build_member(info: MemberInfo, pretrained: bool = False) -> Member:
    """The module of a member described by ``info``; CNNs get ImageNet weights only when ``pretrained``
    (a saved member's own weights are loaded afterwards, so loading never downloads CNN weights)."""
    if info.architecture == CLIP_PROBE:
        clip_model, _, _, _ = load_clip(info.clip_model or "", info.clip_pretrained)
        features = ClipFeatures(clip_model)
        with torch.no_grad():
            dim = features(torch.zeros(1, 3, info.input_size, info.input_size)).shape[-1]
        return ClipMember(ClipProbe(features, dim), info.input_size, info.mean, info.std)
    return Member(build_cnn(info.architecture, pretrained), info.input_size, info.mean, info.std)


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------------
def member_name(info: MemberInfo) -> str:
    """The file stem of a member: its architecture (one checkpoint per architecture and folder)."""
    return info.architecture


def save_member(folder: PathLike, member: Member, info: MemberInfo, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``folder``, each through a temporary file and an atomic
    rename, replacing an earlier checkpoint of the same architecture. Floating-point weights are stored as ``dtype``
    (float16 halves a shipped oracle; loading casts back to float32). Returns the checkpoint path."""
    folder = make_dirs(folder)
    path = folder / f"{member_name(info)}.safetensors"
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in member.weights().items()}
    atomic_write_bytes(path, save(state, metadata={"format": MEMBER_FORMAT, "architecture": info.architecture}))
    atomic_write_text(path.with_suffix(".json"), info.to_json())
    return path


def check_oracle_folder(folder: PathLike) -> List[Tuple[Path, MemberInfo]]:
    """The members of an oracle folder, checked: ``[(checkpoint path, info), ...]`` sorted by name.

    Raises:
        FileNotFoundError: the folder does not exist.
        OracleError: it holds pickle-format weights (.pt/.pth/.pkl/.bin/...), no member, a checkpoint without its
            JSON, two members of one architecture, or members trained on different class lists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"oracle folder {folder} does not exist. Train one with "
                                "scripts/train_classifiers.py --config_path configs/classifier/<dataset>.yaml.")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise OracleError(f"oracle folder {folder} holds pickle-format weights {pickles}: they are refused because "
                          "loading a pickle can run arbitrary code. Keep only the .safetensors + .json members "
                          "written by scripts/train_classifiers.py (move the others elsewhere).")
    members = []
    for path in sorted(folder.glob("*.safetensors")):
        meta = path.with_suffix(".json")
        if not meta.is_file():
            raise OracleError(f"{path} has no description {meta.name} beside it (architecture, classes, input size). "
                              "Re-run scripts/train_classifiers.py into this folder, or remove the checkpoint.")
        members.append((path, MemberInfo.from_file(meta)))
    if not members:
        raise OracleError(f"oracle folder {folder} holds no member (<architecture>.safetensors + .json). Train one "
                          "with scripts/train_classifiers.py.")
    seen: Dict[str, str] = {}
    for path, info in members:
        if info.architecture in seen:
            raise OracleError(f"oracle folder {folder} holds two {info.architecture} members ({seen[info.architecture]}"
                              f", {path.name}): an ensemble has one checkpoint per architecture. Remove one.")
        seen[info.architecture] = path.name
    first_path, first = members[0]
    for path, info in members[1:]:
        if list(info.classes) != list(first.classes):
            raise OracleError(f"oracle folder {folder} mixes class lists: {first_path.name} has {first.classes}, "
                              f"{path.name} has {info.classes} (order matters: the logit is for classes[1]). "
                              "Train every member on the same data.")
    return members


def load_member(path: Path, info: MemberInfo, device: Union[str, torch.device] = "cpu") -> Member:
    """Build the member ``info`` describes and load its safetensors weights; eval mode, on ``device``."""
    member = build_member(info)
    try:
        state = load_file(str(path), device="cpu")
        member.load_weights(state)
    except Exception as err:  # SafetensorError (not a safetensors file), RuntimeError (other shapes or keys), OSError
        raise OracleError(f"{path}: cannot be loaded as a {info.architecture} member ({err}). The file may be damaged "
                          "or written by another version; re-run scripts/train_classifiers.py.") from err
    return member.to(device).eval().requires_grad_(False)


class EnsembleOracle(nn.Module):
    """The oracle of a run (satisfies ``diffusion.edit.editor.Oracle``): images (B, 3, H, W) in [0, 1] at any size ->
    (B, 2) probabilities [1 - p, p] of ``classes``, p = the members' mean sigmoid for classes[1]."""

    def __init__(self, members: Sequence[Member], infos: Sequence[MemberInfo]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.infos = list(infos)
        self.classes: List[str] = list(infos[0].classes)

    @property
    def names(self) -> List[str]:
        return [info.architecture for info in self.infos]

    @torch.inference_mode()
    def member_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, M) sigmoid probability of classes[1] from each member."""
        return torch.stack([torch.sigmoid(m(images)) for m in self.members], dim=1).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.member_probs(images).mean(dim=1)  # (B,)
        return torch.stack([1.0 - p, p], dim=1).to(images.device)


def load_oracle(path: PathLike, device: Union[str, torch.device] = "cpu") -> EnsembleOracle:
    """The oracle stored in folder ``path`` (see :func:`check_oracle_folder` for what is refused), on ``device``."""
    members = check_oracle_folder(path)
    loaded = [load_member(p, info, device) for p, info in members]
    oracle = EnsembleOracle(loaded, [info for _, info in members]).eval()
    log.info("oracle %s: %s on classes %s", path, ", ".join(oracle.names), oracle.classes)
    return oracle
