"""Classifier folders: K-way members saved as safetensors + JSON, loaded as one callable ensemble.

A classifier folder (``output_dir`` of scripts/train_classifiers.py; an editing run's ``oracle_dir`` or its
evaluation-only ``judge_dir``) holds one *member* per network::

    <name>.safetensors   the member's state dict (never a pickle)
    <name>.json          architecture, classes, input size, normalisation, head, validation accuracy, provenance
                         (which part of the train split, and the content hash of every image it trained on)
    test_metrics.json    the accuracy record: each member's and the ensemble's test accuracy with 95% intervals,
                         overall, per class and per pair of classes (diffusion/oracle/accuracy.py)

A member maps images in [0, 1] to class probabilities: it resizes the images to its own input size, normalises
them with its own mean/std, runs its network (diffusion/oracle/nets.py) and applies its head: ``softmax`` over one
logit per class, or, for the binary members of the first format (``diffusion-oracle-member/1``), ``sigmoid`` of
one logit for classes[1], giving [1 - p, p]. The ensemble's probabilities are the mean of its members'.

:func:`load_oracle` refuses a folder it cannot trust (no accuracy record, a damaged or pickled file, mixed class
lists) with one line naming the file and what to do; :func:`independence_warnings` says why a judge folder might
not be independent of an oracle folder; :func:`require_classes` checks that a classifier knows a run's classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save
from torch import nn

from diffusion.errors import ConfigError, OracleError, WeightsUnavailableError  # noqa: F401 (re-exported)
from diffusion.files import atomic_write_bytes, atomic_write_text, make_dirs
from diffusion.oracle.accuracy import TEST_METRICS, read_accuracy_record, summary_line  # noqa: F401
from diffusion.oracle.nets import (  # noqa: F401 (build_cnn, load_clip: part of this module's public face)
    ARCHITECTURES, CLIP_PROBE, SMALL_NETS, TORCHVISION_CNNS, ClipFeatures, ClipProbe, build_cnn, build_net, load_clip,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
MEMBER_FORMAT = "diffusion-oracle-member/2"
BINARY_FORMAT = "diffusion-oracle-member/1"  # one logit for classes[1] (sigmoid); still loads
SOFTMAX, SIGMOID = "softmax", "sigmoid"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")  # refused: loading them can run code
RETRAIN = "Re-run scripts/train_classifiers.py into this folder"
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------------------------
# Member description (the JSON beside each checkpoint)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class MemberInfo:
    """What it takes to rebuild and use one member; stored as ``<name>.json``."""

    architecture: str  # one of ARCHITECTURES, or CLIP_PROBE
    classes: List[str]  # label order of the training data
    input_size: int  # pixels (square); the member resizes its input to this
    mean: List[float]  # per-channel normalisation applied to [0, 1] inputs
    std: List[float]
    val_accuracy: Optional[float] = None
    clip_model: Optional[str] = None  # CLIP_PROBE only
    clip_pretrained: Optional[str] = None  # CLIP_PROBE only
    head: str = SOFTMAX  # softmax: one logit per class; sigmoid: one logit for classes[1] (binary, first format)
    extra: Dict[str, Any] = field(default_factory=dict)  # provenance and training figures (not needed to load)

    @property
    def num_outputs(self) -> int:
        return 1 if self.head == SIGMOID else len(self.classes)

    def to_json(self) -> str:
        return json.dumps({"format": MEMBER_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_file(cls, path: Path) -> "MemberInfo":
        """Read and check a member description (either format).

        Raises:
            OracleError: not JSON, not a member description, missing keys, unknown architecture or head, or a class
                list that cannot be a classifier's.
        """
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise OracleError(f"{path}: not a readable JSON file ({err}); it is damaged. {RETRAIN}, or restore the "
                              "file.") from err
        if not isinstance(raw, dict) or raw.get("format") not in (MEMBER_FORMAT, BINARY_FORMAT):
            raise OracleError(f"{path}: not a classifier member description (expected \"format\": "
                              f"\"{MEMBER_FORMAT}\"). {RETRAIN}, or remove the file.")
        missing = sorted(n for n in ("architecture", "classes", "input_size", "mean", "std") if n not in raw)
        if missing:
            raise OracleError(f"{path}: missing keys {missing}; the file is damaged. {RETRAIN}.")
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in raw.items() if k in names}
        if raw["format"] == BINARY_FORMAT:
            values["head"] = SIGMOID
        try:
            info = cls(**values)
        except TypeError as err:
            raise OracleError(f"{path}: {err}; the file is damaged. {RETRAIN}.") from err
        info.check(path)
        return info

    def check(self, path: Path) -> None:
        known = ARCHITECTURES + (CLIP_PROBE,)
        if self.architecture not in known:
            raise OracleError(f"{path}: unknown architecture '{self.architecture}' (known: {', '.join(known)}).")
        if self.head not in (SOFTMAX, SIGMOID):
            raise OracleError(f"{path}: unknown head '{self.head}' (known: {SOFTMAX}, {SIGMOID}). {RETRAIN}.")
        classes = self.classes
        if not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes):
            raise OracleError(f"{path}: 'classes' = {classes!r}; a classifier needs two or more distinct class names. "
                              f"{RETRAIN}.")
        if self.head == SIGMOID and len(classes) != 2:
            raise OracleError(f"{path}: a sigmoid (binary) member has two classes, but 'classes' = {classes}.")
        if not isinstance(self.input_size, int) or self.input_size < 1 or len(self.mean) != 3 or len(self.std) != 3:
            raise OracleError(f"{path}: input_size {self.input_size!r} / mean / std are not a positive size and three "
                              f"numbers each; the file is damaged. {RETRAIN}.")


# --------------------------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------------------------
def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, C, size, size): bilinear with antialiasing, no crop (as datasets.images.resize
    does for one image), clamped to [0, 1]. Returns the input itself when it already has that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)
    return out.clamp(0.0, 1.0)


def logits_to_probs(logits: torch.Tensor, head: str) -> torch.Tensor:
    """(B, K) logits -> softmax (B, K); (B, 1) logit of classes[1] -> [1 - p, p] (B, 2) with p = sigmoid."""
    if head == SIGMOID:
        p = torch.sigmoid(logits.reshape(-1).float())
        return torch.stack([1.0 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=-1)


class Member(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> logits (B, num_outputs): resize to ``input_size``, normalise, ``net``.
    :meth:`probs` applies the head. Training and the oracle call the same module, so what the oracle sees is what
    the network was trained on."""

    def __init__(self, net: nn.Module, input_size: int, mean: Sequence[float], std: Sequence[float],
                 head: str = SOFTMAX):
        super().__init__()
        self.net, self.input_size, self.head = net, int(input_size), head
        # not in the state dict: the JSON holds them, the checkpoint holds only learned weights
        self.register_buffer("mean", torch.tensor(list(mean)).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).reshape(1, -1, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, input_size, input_size), normalised."""
        images = resize_batch(images.to(self.mean.device, torch.float32), self.input_size)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(images))

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K) class probabilities."""
        return logits_to_probs(self(images), self.head)

    def weights(self) -> Dict[str, torch.Tensor]:
        """What the checkpoint stores."""
        return self.net.state_dict()

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state, strict=True)


class ClipMember(Member):
    """A member whose net is a :class:`ClipProbe`; its checkpoint holds the head alone."""

    net: ClipProbe

    def weights(self) -> Dict[str, torch.Tensor]:
        return self.net.head.state_dict()

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.net.head.load_state_dict(state, strict=True)


def build_member(info: MemberInfo, pretrained: bool = False) -> Member:
    """The module of a member described by ``info``; torchvision CNNs get ImageNet weights only when ``pretrained``
    (a saved member's own weights are loaded afterwards, so loading never downloads CNN weights)."""
    if info.architecture == CLIP_PROBE:
        clip_model, _, _, _ = load_clip(info.clip_model or "", info.clip_pretrained)
        features = ClipFeatures(clip_model)
        with torch.no_grad():
            dim = features(torch.zeros(1, 3, info.input_size, info.input_size)).shape[-1]
        return ClipMember(ClipProbe(features, dim, info.num_outputs), info.input_size, info.mean, info.std, info.head)
    net = build_net(info.architecture, info.num_outputs, info.input_size, pretrained)
    return Member(net, info.input_size, info.mean, info.std, info.head)


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------------
def member_name(info: MemberInfo) -> str:
    """The file stem of a member: its architecture (one checkpoint per architecture and folder)."""
    return info.architecture


def save_member(folder: PathLike, member: Member, info: MemberInfo, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``folder``, each through a temporary file and an atomic
    rename, replacing an earlier checkpoint of the same architecture. Floating-point weights are stored as ``dtype``
    (float16 halves a shipped classifier; loading casts back to float32). Returns the checkpoint path."""
    folder = make_dirs(folder)
    path = folder / f"{member_name(info)}.safetensors"
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in member.weights().items()}
    atomic_write_bytes(path, save(state, metadata={"format": MEMBER_FORMAT, "architecture": info.architecture}))
    atomic_write_text(path.with_suffix(".json"), info.to_json())
    return path


def remove_member(folder: PathLike, architecture: str) -> bool:
    """Delete ``<architecture>.safetensors`` and ``.json`` from ``folder``; True when there was one."""
    found = False
    for suffix in (".safetensors", ".json"):
        path = Path(folder) / f"{architecture}{suffix}"
        if path.is_file():
            path.unlink()
            found = True
    return found


def check_oracle_folder(folder: PathLike) -> List[Tuple[Path, MemberInfo]]:
    """The members of a classifier folder, checked: ``[(checkpoint path, info), ...]`` sorted by name.

    Raises:
        FileNotFoundError: the folder does not exist.
        OracleError: it holds pickle-format weights (.pt/.pth/.pkl/.bin/...), no member, a checkpoint without its
            JSON, a damaged JSON, two members of one architecture, or members trained on different class lists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"classifier folder {folder} does not exist. Train one with "
                                "scripts/train_classifiers.py --config_path configs/classifier/<dataset>.yaml.")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise OracleError(f"classifier folder {folder} holds pickle-format weights {pickles}: they are refused because "
                          "loading a pickle can run arbitrary code. Keep only the .safetensors + .json members "
                          "written by scripts/train_classifiers.py (move the others elsewhere).")
    members = []
    for path in sorted(folder.glob("*.safetensors")):
        meta = path.with_suffix(".json")
        if not meta.is_file():
            raise OracleError(f"{path} has no description {meta.name} beside it (architecture, classes, input size). "
                              f"{RETRAIN}, or remove the checkpoint.")
        members.append((path, MemberInfo.from_file(meta)))
    if not members:
        raise OracleError(f"classifier folder {folder} holds no member (<architecture>.safetensors + .json). Train "
                          "one with scripts/train_classifiers.py.")
    seen: Dict[str, str] = {}
    for path, info in members:
        if info.architecture in seen:
            raise OracleError(f"classifier folder {folder} holds two {info.architecture} members "
                              f"({seen[info.architecture]}, {path.name}): an ensemble has one checkpoint per "
                              "architecture. Remove one.")
        seen[info.architecture] = path.name
    first_path, first = members[0]
    for path, info in members[1:]:
        if list(info.classes) != list(first.classes):
            raise OracleError(f"classifier folder {folder} mixes class lists: {first_path.name} has {first.classes}, "
                              f"{path.name} has {info.classes} (order matters: it is the output order). Train every "
                              "member on the same data.")
    return members


def load_member(path: Path, info: MemberInfo, device: Union[str, torch.device] = "cpu") -> Member:
    """Build the member ``info`` describes and load its safetensors weights; eval mode, on ``device``."""
    member = build_member(info)
    try:
        state = load_file(str(path), device="cpu")
        member.load_weights(state)
    except Exception as err:  # SafetensorError (not a safetensors file), RuntimeError (other shapes or keys), OSError
        raise OracleError(f"{path}: cannot be loaded as a {info.architecture} member ({str(err)[:300]}). The file may "
                          f"be damaged or written by another version; {RETRAIN[0].lower() + RETRAIN[1:]}.") from err
    return member.to(device).eval().requires_grad_(False)


class EnsembleOracle(nn.Module):
    """A classifier folder as one callable (satisfies ``diffusion.edit.editor.Oracle``): images (B, 3, H, W) in
    [0, 1] at any size -> (B, K) probabilities of ``classes``, the mean of the members' class probabilities.

    ``accuracy`` is the folder's accuracy record (test_metrics.json, see diffusion/oracle/accuracy.py) when it was
    loaded with :func:`load_oracle`; :meth:`accuracy_summary` says it in one line for a run log.
    """

    def __init__(self, members: Sequence[Member], infos: Sequence[MemberInfo],
                 accuracy: Optional[Dict[str, Any]] = None, folder: Optional[PathLike] = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.infos = list(infos)
        self.classes: List[str] = list(infos[0].classes)
        self.accuracy = accuracy
        self.folder = None if folder is None else Path(folder)

    @property
    def names(self) -> List[str]:
        return [info.architecture for info in self.infos]

    @torch.inference_mode()
    def member_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, M, K) class probabilities of each member, on ``images``' device."""
        return torch.stack([m.probs(images) for m in self.members], dim=1).float().to(images.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.member_probs(images).mean(dim=1)  # (B, K)

    def accuracy_summary(self, classes: Optional[Sequence[str]] = None) -> str:
        """'<folder>: ensemble test accuracy 0.987 [0.971, 0.994] (n=450) ...'; with two ``classes``, also the
        accuracy on the test images of those two classes alone."""
        if self.accuracy is None:
            return f"{self.folder}: no accuracy record loaded"
        return f"{self.folder}: {summary_line(self.accuracy, classes)}"


def load_ensemble(path: PathLike, device: Union[str, torch.device] = "cpu") -> EnsembleOracle:
    """The members of folder ``path`` as an ensemble, without its accuracy record (training uses this to measure
    the record; editing runs use :func:`load_oracle`)."""
    members = check_oracle_folder(path)
    loaded = [load_member(p, info, device) for p, info in members]
    return EnsembleOracle(loaded, [info for _, info in members], folder=path).eval()


def load_oracle(path: PathLike, device: Union[str, torch.device] = "cpu") -> EnsembleOracle:
    """The classifier stored in folder ``path``, with its accuracy record, on ``device``.

    Raises:
        FileNotFoundError: no such folder.
        OracleError: anything :func:`check_oracle_folder` or :func:`load_member` refuses, or a missing, damaged or
            stale test_metrics.json (see :func:`diffusion.oracle.accuracy.read_accuracy_record`).
    """
    oracle = load_ensemble(path, device)
    oracle.accuracy = read_accuracy_record(Path(path), oracle.names, oracle.classes)
    log.info("classifier %s: %s on classes %s", path, ", ".join(oracle.names), oracle.classes)
    return oracle


def require_classes(classifier: Any, classes: Sequence[str], key: Optional[str] = None) -> List[int]:
    """The column of each of ``classes`` in ``classifier.classes`` (so a ten-class oracle serves a run on two).

    Raises:
        ConfigError: some of ``classes`` are unknown to it; the message names them, the ones it knows, and ``key``
            (e.g. oracle_dir) when given.
    """
    known = [str(c) for c in classifier.classes]
    missing = [c for c in classes if str(c) not in known]
    if missing:
        where = f"{key} {getattr(classifier, 'folder', '') or ''}".strip() if key else "the classifier"
        raise ConfigError(f"{where}: knows classes {known}, not {missing}. Point it at a classifier trained on these "
                          "classes (scripts/train_classifiers.py with data.classes covering them), or change "
                          "data.classes.", key=key)
    return [known.index(str(c)) for c in classes]


# --------------------------------------------------------------------------------------------------------------------
# Independence of a judge from an oracle
# --------------------------------------------------------------------------------------------------------------------
def seen_images(info: MemberInfo) -> Optional[Dict[str, str]]:
    """content hash -> file (relative to the data root) of every image the member trained or validated on, from
    its JSON; None when it records none (members written before image lists were recorded)."""
    images = info.extra.get("data", {}).get("images") if isinstance(info.extra.get("data"), dict) else None
    if not isinstance(images, dict):
        return None
    out: Dict[str, str] = {}
    for split in ("train", "val"):
        for rel, digest in (images.get(split) or {}).items():
            out[str(digest)] = str(rel)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def independence_warnings(oracle_dir: PathLike, judge_dir: PathLike) -> List[str]:
    """Reasons the judge in ``judge_dir`` may not be independent of the oracle in ``oracle_dir`` (empty: none
    found). A judge that is the oracle, shares a member file with it, or trained on the oracle's images grades
    its own homework: the edits were searched until the oracle agreed, so it would agree too.

    Checks: the same folder; a member file with the same bytes (sha256); members of the same architecture; images
    (compared by content hash) that both trained or validated on; members that record no image list (cannot check).

    Raises:
        FileNotFoundError, OracleError: a folder that :func:`check_oracle_folder` refuses.
    """
    oracle_dir, judge_dir = Path(oracle_dir), Path(judge_dir)
    if oracle_dir.resolve() == judge_dir.resolve():
        return [f"judge_dir {judge_dir} is the oracle_dir: the judge is the oracle, so it agrees with every edit the "
                "search chose. Train an independent judge (other architectures, another train_part) and point "
                "judge_dir at it."]
    oracle, judge = check_oracle_folder(oracle_dir), check_oracle_folder(judge_dir)
    warnings: List[str] = []
    oracle_files = {file_sha256(p): p for p, _ in oracle}
    for path, info in judge:
        twin = oracle_files.get(file_sha256(path))
        if twin is not None:
            warnings.append(f"judge member {path} has the same bytes as oracle member {twin}: the judge shares a "
                            "network with the oracle. Retrain the judge with other architectures.")
    shared = sorted({i.architecture for _, i in judge} & {i.architecture for _, i in oracle})
    if shared:
        warnings.append(f"judge and oracle both have {', '.join(shared)} members: the same architecture tends to "
                        "make the same mistakes, so the judge is less independent than one of another family "
                        "(e.g. lenet / mlp / logistic against small_vgg).")
    oracle_seen: Dict[str, str] = {}
    unchecked: List[str] = []
    for path, info in oracle:
        images = seen_images(info)
        if images is None:
            unchecked.append(f"oracle member {path.with_suffix('.json')}")
        else:
            oracle_seen.update(images)
    for path, info in judge:
        images = seen_images(info)
        if images is None:
            unchecked.append(f"judge member {path.with_suffix('.json')}")
            continue
        common = sorted(rel for digest, rel in images.items() if digest in oracle_seen)
        if common:
            warnings.append(f"judge member {info.architecture} ({judge_dir}): {len(common)} of the {len(images)} "
                            f"images it trained or validated on were the oracle's too (e.g. {', '.join(common[:3])}; "
                            "compared by content): train the judge on another part of the train split (train_part: "
                            "[k, n] with another k than the oracle's).")
    if unchecked:
        warnings.append(f"cannot check whether judge and oracle trained on the same images: {', '.join(unchecked)} "
                        "record no image list (written before image lists were recorded). Retrain with "
                        "scripts/train_classifiers.py to make the check possible.")
    return warnings
