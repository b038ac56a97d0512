"""Training a classifier folder (scripts/train_classifiers.py): an ensemble of K-way networks or a CLIP linear probe.

Data: the train split (capped at data.num_samples per class), optionally only part k of n disjoint parts of each
class (``train_part``, so an independent judge can train on images the oracle never saw), is split per class, with a
seeded permutation, into a validation share and at most ``max_train_per_class`` training images; the eval split
(the images that get edited) is only ever the test set and never decides anything.

Each member: one logit per class, cross-entropy, Adam, at most ``epochs`` epochs, early stopping after ``patience``
epochs without a lower validation loss; the best epoch's weights are kept. A member whose validation accuracy is
below ``min_accuracy`` is not written (the log says why and what to try); when none passes, the run fails. The
folder is then reloaded as an editing run will load it and measured on the test split: test_metrics.json holds each
member's and the ensemble's accuracy with 95% Wilson intervals (diffusion/oracle/accuracy.py). Each member's JSON
records its part of the train split and the content hash of every image it trained or validated on, from which
:func:`diffusion.oracle.members.independence_warnings` tells whether a judge saw the oracle's images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from datasets.folder import ImageRecord
from diffusion.config import Augment, ClassifierConfig
from diffusion.data import dataset_classes, make_loader, prepare_root, split_records
from diffusion.devices import resolve_device
from diffusion.errors import ConfigError, OracleError
from diffusion.files import atomic_write_json, relative_path, run_lock
from diffusion.oracle.accuracy import ENSEMBLE, TEST_METRICS, accuracy_record
from diffusion.oracle.members import (
    CLIP_PROBE, IMAGENET_MEAN, IMAGENET_STD, ClipFeatures, ClipMember, ClipProbe, EnsembleOracle, Member, MemberInfo,
    build_net, load_clip, load_ensemble, remove_member, save_member,
)
from diffusion.runinfo import stamp_run_dir

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (inputs, labels) batches
PART_SEED = 20_250_411  # the train_part shuffle: fixed, so an oracle and a judge of any seed get the same parts
AUGMENTATIONS: Dict[Augment, Dict[str, object]] = {
    Augment.flip_scale: {"flip": True, "scale": (0.8, 1.2)},
    Augment.affine: {"flip": False, "scale": (0.9, 1.1), "rotate": 10.0, "shift": 0.1},
}


# --------------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, scale: Tuple[float, float] = (0.8, 1.2),
            flip: bool = True, rotate: float = 0.0, shift: float = 0.0) -> torch.Tensor:
    """Per image: a random horizontal flip (p = 0.5, when ``flip``), scale s ~ U(scale) about the centre, rotation
    by U(-rotate, rotate) degrees and a shift by U(-shift, shift) of the image size in x and y.

    (B, C, H, W) -> (B, C, H, W). Output pixel x samples the input at (1/s) R(a) M x + t (M the mirror or identity,
    coordinates in [-1, 1]), bilinear; pixels from outside the image are 0 (as torchvision's RandomAffine fills them).
    ``generator`` (CPU) draws everything.
    """
    b = images.shape[0]
    mirror = (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    s = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    a = torch.empty(b).uniform_(-rotate, rotate, generator=generator) * math.pi / 180 if rotate else torch.zeros(b)
    t = torch.empty(b, 2).uniform_(-2 * shift, 2 * shift, generator=generator) if shift else torch.zeros(b, 2)
    m = torch.where(mirror, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) * m / s, -torch.sin(a) / s
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) * m / s, torch.cos(a) / s
    theta[:, :, 2] = t  # shift in [-1, 1] coordinates: 2 * shift of the image size
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mixup(images: torch.Tensor, labels: torch.Tensor, n_classes: int, alpha: float,
          generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., ICLR 2018): each image blended with a random other image of the batch, x = l x_i +
    (1 - l) x_j with one l ~ Beta(alpha, alpha) per image, and its target the same blend of the two one-hot labels.
    A classifier trained so gives in-between images in-between probabilities instead of a confident verdict.

    (B, C, H, W), (B,) class indices -> the mixed images and (B, n_classes) soft targets. ``generator`` (CPU) draws
    the partners and the weights (the Beta draws through numpy, seeded from it: torch's Beta takes no generator)."""
    b = images.shape[0]
    partner = torch.randperm(b, generator=generator).to(images.device)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=b)).to(images.device, images.dtype)
    mixed = lam.view(b, 1, 1, 1) * images + (1 - lam.view(b, 1, 1, 1)) * images[partner]
    one_hot = F.one_hot(labels.to(images.device), n_classes).to(images.dtype)
    soft = lam.view(b, 1) * one_hot + (1 - lam.view(b, 1)) * one_hot[partner]
    return mixed, soft


def _by_class(records: Sequence[ImageRecord]) -> Dict[str, List[ImageRecord]]:
    by_class: Dict[str, List[ImageRecord]] = {}
    for r in records:
        by_class.setdefault(r.class_name, []).append(r)
    return by_class


def split_part(records: Sequence[ImageRecord], part: int, n_parts: int) -> List[ImageRecord]:
    """Part ``part`` of ``n_parts`` disjoint parts of each class's records: a permutation seeded by a fixed seed and
    the class name, every n-th record from position ``part``. The parts of a class cover it and differ in size by
    at most one; they depend on the class's record list alone (not on the run's seed or the other classes)."""
    out: List[ImageRecord] = []
    for name, recs in _by_class(records).items():
        g = torch.Generator().manual_seed(PART_SEED + zlib.crc32(name.encode()))
        order = torch.randperm(len(recs), generator=g).tolist()
        out += [recs[i] for i in order[part::n_parts]]
    return out


def split_train_val(records: Sequence[ImageRecord], val_fraction: float, max_train_per_class: Optional[int],
                    seed: int) -> Tuple[List[ImageRecord], List[ImageRecord]]:
    """Per class: a permutation seeded by (seed, class name); the first n_val records are validation, the next ones
    (up to ``max_train_per_class``) training. n_val = round(val_fraction * min(n, max_train_per_class)), at least 1,
    so validation stays a fixed share of what a class contributes. A class's split depends on nothing else.

    Raises:
        ConfigError: a class has fewer than two train images (one for training, one for validation).
    """
    train: List[ImageRecord] = []
    val: List[ImageRecord] = []
    for name, recs in _by_class(records).items():
        n = len(recs)
        if n < 2:
            raise ConfigError(f"class '{name}' has {n} train image(s); a classifier needs at least two per class "
                              "(one to train on, one to validate on). Add images, raise data.num_samples, or use "
                              "fewer train_part parts.")
        cap = max_train_per_class or n
        n_val = min(n - 1, max(1, round(val_fraction * min(n, cap))))
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        order = torch.randperm(n, generator=g).tolist()
        val += [recs[i] for i in order[:n_val]]
        train += [recs[i] for i in order[n_val:n_val + cap]]
    return train, val


def content_hashes(records: Sequence[ImageRecord], root: Path) -> Dict[str, str]:
    """file (relative to ``root``) -> the first 16 hex digits of the sha256 of its bytes: the same image under
    another name or root gets the same hash, so overlap between two classifiers' training sets is found by
    content."""
    return {relative_path(r.path, root): hashlib.sha256(Path(r.path).read_bytes()).hexdigest()[:16] for r in records}


def list_digest(hashes: Dict[str, str]) -> str:
    """sha256 of the sorted content hashes: equal for equal image sets, whatever the file names or order."""
    return hashlib.sha256("\n".join(sorted(hashes.values())).encode()).hexdigest()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                          device: torch.device) -> None:
    """Recompute every BatchNorm's running mean/var at the current weights as the average of their per-batch values
    over ``batches`` ("precise BN"), replacing the exponential averages accumulated during training.

    Why: from random init, the variances of a deep CNN start far below the running_var of 1 and the running averages
    lag the moving weights for many steps; in eval mode the activations then shrink layer by layer to ~1e-9
    (EfficientNet-B0, MobileNet-V2), so validation (and early stopping) would see a constant net. Only the
    BatchNorm layers run in train mode here; dropout and stochastic depth stay off."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    for x, _ in batches:
        if len(x) > 1:
            model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@dataclass
class FitResult:
    best_state: Dict[str, torch.Tensor]
    best_epoch: int  # 1-based
    epochs_run: int
    val_loss: float
    val_accuracy: float
    history: List[Dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate_logits(model: nn.Module, batches: Batches, device: torch.device) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy of the argmax) of ``model``'s (B, K) logits over one pass of ``batches``, in
    eval mode."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches():
        logits = model(x.to(device))
        y = y.to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        n += len(y)
    return loss_sum / max(1, n), correct / max(1, n)


def fit(model: nn.Module, params: Iterable[nn.Parameter], train_batches: Callable[[int], Iterable],
        val_batches: Batches, epochs: int, patience: int, learning_rate: float, device: torch.device,
        desc: str, state_of: Callable[[], Dict[str, torch.Tensor]],
        calibration_batches: Optional[Batches] = None) -> FitResult:
    """Cross-entropy on K logits with Adam; keeps the state (``state_of()``, copied to the CPU) of the epoch with
    the lowest validation loss and stops after ``patience`` epochs without a lower one. ``train_batches(epoch)``
    gives that epoch's (inputs, labels) batches; a batch of one image is skipped (BatchNorm cannot train on it).
    With ``calibration_batches`` (un-augmented training images), the BatchNorm statistics are recomputed on them
    after every epoch (:func:`recalibrate_batchnorm`), so validation and the saved weights use exact statistics."""
    optimiser = torch.optim.Adam(params, lr=learning_rate)
    best: Optional[FitResult] = None
    since_best = 0
    history: List[Dict[str, float]] = []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch")
    for epoch in bar:
        model.train()
        loss_sum, n = 0.0, 0
        for x, y in tqdm(train_batches(epoch), desc=f"{desc} epoch {epoch}", unit="batch", leave=False):
            if len(y) < 2:
                continue
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum, n = loss_sum + loss.item() * len(y), n + len(y)
        if calibration_batches is not None:
            recalibrate_batchnorm(model, calibration_batches(), device)
        val_loss, val_acc = evaluate_logits(model, val_batches, device)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(1, n), "val_loss": val_loss,
                        "val_accuracy": val_acc})
        if best is None or val_loss < best.val_loss:
            state = {k: v.detach().to("cpu", copy=True) for k, v in state_of().items()}
            best = FitResult(state, epoch, epoch, val_loss, val_acc)
            since_best = 0
        else:
            since_best += 1
        bar.set_postfix(train_loss=f"{history[-1]['train_loss']:.3f}", val_loss=f"{val_loss:.3f}",
                        val_acc=f"{val_acc:.3f}", best=best.best_epoch)
        if since_best >= patience:
            log.info("%s: early stop after epoch %d (best epoch %d)", desc, epoch, best.best_epoch)
            break
    bar.close()
    assert best is not None  # epochs >= 1
    best.epochs_run, best.history = len(history), history
    return best


# --------------------------------------------------------------------------------------------------------------------
# The data of a run
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class OracleData:
    classes: List[str]
    train: List[ImageRecord]
    val: List[ImageRecord]
    test: List[ImageRecord]
    root: Path
    hashes: Dict[str, Dict[str, str]] = field(default_factory=dict)  # "train" / "val" -> file -> content hash

    def counts(self) -> Dict[str, Dict[str, int]]:
        return {split: {c: sum(r.class_name == c for r in recs) for c in self.classes}
                for split, recs in (("train", self.train), ("val", self.val), ("test", self.test))}


def oracle_data(cfg: ClassifierConfig) -> OracleData:
    """Classes (label order), train/val records from (part ``train_part`` of) the train split with their content
    hashes, test records from the eval split.

    Raises:
        ConfigError: the dataset has fewer than two classes, or a class too few images for its part.
    """
    d = cfg.data
    classes = dataset_classes(d)
    if len(classes) < 2:
        raise ConfigError(f"data: a classifier needs two or more classes, but dataset '{d.name}' gives {classes}; set "
                          "data.classes to the classes to tell apart (or leave it empty for all of the dataset's).",
                          key="data.classes")
    records = split_records(d, d.train_split, classes)
    if cfg.train_part is not None:
        records = split_part(records, *cfg.train_part)
    train, val = split_train_val(records, cfg.val_fraction, cfg.max_train_per_class, cfg.seed)
    test = split_records(d, d.eval_split, classes, use_file_lists=True)
    root = prepare_root(d)
    hashes = {"train": content_hashes(train, root), "val": content_hashes(val, root)}
    return OracleData(classes, train, val, test, root, hashes)


def image_batches(records: List[ImageRecord], cfg: ClassifierConfig, size: int) -> Iterator:
    """(pixel_values (B, 3, size, size) in [0, 1], label (B,)) batches of ``records`` in order, read from disk."""
    for batch in make_loader(records, cfg.data, size, cfg.batch_size):
        if batch is not None:
            yield batch["pixel_values"], batch["label"]


@dataclass
class ImageSet:
    """Decoded images held in memory, so epochs and architectures do not decode the files again."""

    images: torch.Tensor  # (N, 3, S, S) float16 in [0, 1] (half the memory of float32; ample for [0, 1] pixels)
    labels: torch.Tensor  # (N,) int64

    def batches(self, batch_size: int, order: Optional[torch.Tensor] = None) -> Iterator:
        """(images (B, 3, S, S) float32, labels (B,)) in ``order`` (default: as stored)."""
        order = torch.arange(len(self.labels)) if order is None else order
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.images[idx].float(), self.labels[idx]


def load_image_set(records: List[ImageRecord], cfg: ClassifierConfig, size: int, desc: str) -> ImageSet:
    images, labels = [], []
    for x, y in tqdm(image_batches(records, cfg, size), desc=f"load {desc}", unit="batch", leave=False):
        images.append(x.half())
        labels.append(y)
    if not images:
        raise ConfigError(f"data: no readable {desc} images (every file was skipped as unreadable)")
    return ImageSet(torch.cat(images), torch.cat(labels))


# --------------------------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------------------------
def train_network(architecture: str, train: ImageSet, val: ImageSet, data: OracleData, cfg: ClassifierConfig,
                  device: torch.device, index: int = 0) -> Tuple[Member, MemberInfo]:
    """Train one member of ``architecture`` on ``train`` (augmented as ``cfg.augment`` says) with early stopping
    on ``val``; returns it with its best weights loaded, and its description."""
    torch.manual_seed(cfg.seed * 1_000_003 + index)  # weight init and dropout draw from the global RNG
    net = build_net(architecture, len(data.classes), cfg.image_size, cfg.pretrained)
    member = Member(net, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD).to(device)
    shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    augmentation = AUGMENTATIONS.get(cfg.augment)

    def train_batches(epoch: int) -> Iterator:
        order = torch.randperm(len(train.labels), generator=shuffle)
        for x, y in train.batches(cfg.batch_size, order):
            x = x.to(device)  # augmented on the training device: grid_sample is cheap on a GPU
            if augmentation:
                x = augment(x, shuffle, **augmentation)  # type: ignore[arg-type]
            yield mixup(x, y, len(data.classes), cfg.mixup, shuffle) if cfg.mixup > 0 else (x, y)

    result = fit(member, member.parameters(), train_batches, lambda: val.batches(cfg.batch_size), cfg.epochs,
                 cfg.patience, cfg.learning_rate, device, architecture, member.weights,
                 calibration_batches=lambda: train.batches(cfg.batch_size))
    member.load_weights(result.best_state)
    info = MemberInfo(architecture, list(data.classes), cfg.image_size, list(IMAGENET_MEAN), list(IMAGENET_STD),
                      val_accuracy=result.val_accuracy, extra=_provenance(cfg, data, result, pretrained=cfg.pretrained))
    return member, info


def train_clip_probe(data: OracleData, cfg: ClassifierConfig, device: torch.device) -> Tuple[Member, MemberInfo]:
    """Train a linear head on frozen open_clip image features (``clip_model`` / ``clip_pretrained``), computed once
    per image at the CLIP model's own input size and normalisation, without augmentation."""
    clip_model, size, mean, std = load_clip(cfg.clip_model, cfg.clip_pretrained)
    features = ClipFeatures(clip_model).to(device)
    with torch.no_grad():
        dim = features(torch.zeros(1, 3, size, size, device=device)).shape[-1]
    torch.manual_seed(cfg.seed)
    member = ClipMember(ClipProbe(features, dim, len(data.classes)), size, mean, std).to(device)

    def encode(records: List[ImageRecord], desc: str) -> Tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        for x, y in tqdm(image_batches(records, cfg, size), desc=f"CLIP features ({desc})", unit="batch"):
            with torch.no_grad():
                feats.append(member.net.features(member.normalise(x.to(device))).cpu())
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    train_x, train_y = encode(data.train, "train")
    val_x, val_y = encode(data.val, "val")
    shuffle = torch.Generator().manual_seed(cfg.seed)

    def train_batches(epoch: int) -> Iterator:
        order = torch.randperm(len(train_y), generator=shuffle)
        for i in range(0, len(order), cfg.batch_size):
            yield train_x[order[i:i + cfg.batch_size]], train_y[order[i:i + cfg.batch_size]]

    def val_batches() -> Iterator:
        for i in range(0, len(val_y), cfg.batch_size):
            yield val_x[i:i + cfg.batch_size], val_y[i:i + cfg.batch_size]

    head = member.net.head
    result = fit(head, head.parameters(), train_batches, val_batches, cfg.epochs, cfg.patience, cfg.learning_rate,
                 device, CLIP_PROBE, member.weights)
    member.load_weights(result.best_state)
    info = MemberInfo(CLIP_PROBE, list(data.classes), size, mean, std, val_accuracy=result.val_accuracy,
                      clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
                      extra=_provenance(cfg, data, result, pretrained=cfg.clip_pretrained is not None))
    return member, info


def _provenance(cfg: ClassifierConfig, data: OracleData, result: FitResult, pretrained: bool) -> Dict[str, object]:
    return {
        "pretrained": pretrained, "seed": cfg.seed, "augment": str(cfg.augment), "mixup": cfg.mixup,
        "val_loss": result.val_loss,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "history": result.history,
        "counts": data.counts(),
        "dataset": {"name": cfg.data.name, "root": cfg.data.root, "train_split": cfg.data.train_split,
                    "eval_split": cfg.data.eval_split},
        "data": {"train_part": None if cfg.train_part is None else list(cfg.train_part),
                 "train_images_sha256": list_digest(data.hashes["train"]), "n_train": len(data.hashes["train"]),
                 "n_val": len(data.hashes["val"]), "images": data.hashes},
    }


def gate_message(name: str, val_accuracy: float, n_val: int, cfg: ClassifierConfig, n_classes: int) -> str:
    """Why a member is not written, and what to try."""
    tries = [f"more epochs (epochs={cfg.epochs}, patience={cfg.patience})",
             "another architecture", f"another learning_rate (now {cfg.learning_rate:g})",
             f"a lower min_accuracy (now {cfg.min_accuracy:g})"]
    if not cfg.pretrained and name in ("resnet18", "efficientnet_b0", "mobilenet_v2"):
        tries.insert(1, "pretrained: true (ImageNet init)")
    return (f"{name}: validation accuracy {val_accuracy:.3f} on {n_val} images is below min_accuracy "
            f"{cfg.min_accuracy:g} (chance is {1 / n_classes:.2f}), so it is not written. Try " + ", ".join(tries))


# --------------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------------
def predict_records(oracle: EnsembleOracle, records: List[ImageRecord], cfg: ClassifierConfig,
               size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(member probabilities (N, M, K), labels (N,)) of ``oracle`` on ``records``, loaded at ``size`` (each member
    resizes to its own input size)."""
    probs, labels = [], []
    for x, y in tqdm(image_batches(records, cfg, size), desc="test", unit="batch"):
        probs.append(oracle.member_probs(x).cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def train_classifiers(cfg: ClassifierConfig) -> Dict[str, object]:
    """Train every member of ``cfg`` into ``cfg.output_dir`` (one checkpoint each, those below ``min_accuracy``
    left out), reload the folder as kandinsky_eval.py will, and write its accuracy record ``test_metrics.json``;
    returns the record.

    Raises:
        OracleError: no member reached ``min_accuracy`` (nothing is written; the message says what to try).
        ConfigError: bad data (see :func:`oracle_data`).
    """
    device = resolve_device(cfg.device, key="device")
    data = oracle_data(cfg)
    with run_lock(cfg.output_dir):  # one run per folder
        return _train_into_folder(cfg, data, device)


def _train_into_folder(cfg: ClassifierConfig, data: "OracleData", device: torch.device) -> Dict[str, object]:
    out = Path(cfg.output_dir)
    stamp_run_dir(cfg, has_results=lambda folder: any(folder.glob("*.safetensors")))
    (out / TEST_METRICS).unlink(missing_ok=True)  # written last: its absence says the folder is not finished
    counts = data.counts()
    names = [str(a) for a in cfg.architectures] if cfg.kind == "ensemble" else [CLIP_PROBE]
    log.info("classifier %s: %d classes %s; train_part %s; images per class train %s, val %s, test %s; members %s; "
             "image size %s; augment %s; batch %d; <= %d epochs (patience %d); min_accuracy %g; device %s", cfg.kind,
             len(data.classes), data.classes, cfg.train_part, counts["train"], counts["val"], counts["test"], names,
             cfg.image_size if cfg.kind == "ensemble" else "CLIP's", cfg.augment, cfg.batch_size, cfg.epochs,
             cfg.patience, cfg.min_accuracy, device)
    start = time.perf_counter()
    if cfg.kind == "ensemble":
        train = load_image_set(data.train, cfg, cfg.image_size, "train")
        val = load_image_set(data.val, cfg, cfg.image_size, "val")
    val_accuracy: Dict[str, float] = {}
    rejected: Dict[str, Dict[str, object]] = {}
    seconds: Dict[str, float] = {}
    for index, name in enumerate(names):
        t0 = time.perf_counter()
        if name == CLIP_PROBE:
            member, info = train_clip_probe(data, cfg, device)
        else:
            member, info = train_network(name, train, val, data, cfg, device, index)
        seconds[name] = time.perf_counter() - t0
        info.extra["train_seconds"] = seconds[name]
        assert info.val_accuracy is not None
        if info.val_accuracy < cfg.min_accuracy:
            why = gate_message(name, info.val_accuracy, len(data.val), cfg, len(data.classes))
            log.warning("%s", why)
            rejected[name] = {"val_accuracy": info.val_accuracy, "why": why}
            if remove_member(out, name):  # an earlier run's checkpoint would not match this run's record
                log.warning("%s: removed the earlier %s checkpoint from %s", name, name, out)
        else:
            path = save_member(out, member, info, dtype=getattr(torch, str(cfg.save_dtype)))
            val_accuracy[name] = info.val_accuracy
            log.info("%s: best epoch %s of %s, val accuracy %.4f, %.0f s -> %s", name, info.extra["best_epoch"],
                     info.extra["epochs_run"], info.val_accuracy, seconds[name], path)
        del member
    if not val_accuracy:
        raise OracleError(f"no member reached min_accuracy {cfg.min_accuracy:g} on the validation images, so no "
                          f"member was written to {out}: " + "; ".join(r["why"] for r in rejected.values()))
    train_seconds = time.perf_counter() - start
    oracle = load_ensemble(out, device=device)
    size = max(info.input_size for info in oracle.infos)
    probs, labels = predict_records(oracle, data.test, cfg, size)
    metrics: Dict[str, object] = accuracy_record(probs, labels, oracle.names, oracle.classes, cfg.data.eval_split)
    metrics.update(val_accuracy=val_accuracy, min_accuracy=cfg.min_accuracy, rejected=rejected,
                   train_part=None if cfg.train_part is None else list(cfg.train_part), train_seconds=train_seconds,
                   member_seconds=seconds)
    atomic_write_json(out / TEST_METRICS, metrics)
    return metrics


def _ci(r: Dict[str, object]) -> str:
    if r.get("accuracy") is None:
        return "n/a"
    lo, hi = r["interval"]  # type: ignore[misc]
    return f"{r['accuracy']:.4f} [{lo:.3f}, {hi:.3f}]"


def accuracy_table(metrics: Dict[str, object]) -> str:
    """Markdown tables of a fresh record: each member's and the ensemble's validation and test accuracy (95% Wilson
    interval), then the test accuracy per class; members left out by the accuracy gate are listed below."""
    members: Dict[str, Dict] = metrics["members"]  # type: ignore[assignment]
    ensemble: Dict = metrics[ENSEMBLE]  # type: ignore[assignment]
    val: Dict[str, float] = metrics.get("val_accuracy", {})  # type: ignore[assignment]
    rows = {**members, ENSEMBLE: ensemble}
    lines = [f"| model | val accuracy | test accuracy [95% CI] ({metrics['split']}, n={metrics['n']}) |",
             "| --- | --- | --- |"]
    for name, r in rows.items():
        v = val.get(name)
        lines.append(f"| {name} | {'' if v is None else f'{v:.4f}'} | {_ci(r)} |")
    lines += ["", "| class | n | " + " | ".join(rows) + " |", "| --- | --- |" + " --- |" * len(rows)]
    for c, n in metrics["n_per_class"].items():  # type: ignore[union-attr]
        lines.append(f"| {c} | {n} | " + " | ".join(_ci(r["per_class"][c]) for r in rows.values()) + " |")
    for name, r in metrics.get("rejected", {}).items():  # type: ignore[union-attr]
        lines.append(f"\nnot written: {r['why']}")
    return "\n".join(lines)
