"""Training the oracle of one binary domain (scripts/train_classifiers.py): a CNN ensemble or a CLIP linear probe.

Data: the train split (capped at data.num_samples per class) is split per class, with a seeded permutation, into a
validation share and at most ``max_train_per_class`` training images; the eval split (the images that get edited)
is only ever the test set. Each member: one logit, BCE, Adam, at most ``epochs`` epochs, early stopping after
``patience`` epochs without a lower validation loss; the best epoch's weights are the one checkpoint written.
CNN batches are augmented with a random horizontal flip and a random scale in [0.8, 1.2].
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from datasets.folder import ImageRecord
from diffusion.config import ClassifierConfig
from diffusion.devices import resolve_device
from diffusion.errors import ConfigError
from diffusion.files import atomic_write_text
from diffusion.runinfo import stamp_run_dir
from diffusion.data import dataset_classes, make_loader, split_records
from diffusion.oracle.members import (
    CLIP_PROBE, IMAGENET_MEAN, IMAGENET_STD, TEST_METRICS, ClipFeatures, ClipMember, ClipProbe, EnsembleOracle,
    Member, MemberInfo, build_cnn, load_clip, load_oracle, save_member,
)

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (inputs, labels) batches


# --------------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, scale: Tuple[float, float] = (0.8, 1.2)) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and random isotropic scale s ~ U(scale) about the centre, per image.

    (B, C, H, W) -> (B, C, H, W). Output pixel x samples the input at A^-1 x with A = diag(+-s, s), bilinear; pixels
    from outside the image are 0 (as torchvision's RandomAffine fills them). ``generator`` (CPU) draws everything.
    """
    b = images.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    s = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) / s
    theta[:, 1, 1] = 1.0 / s
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def split_train_val(records: Sequence[ImageRecord], val_fraction: float, max_train_per_class: Optional[int],
                    seed: int) -> Tuple[List[ImageRecord], List[ImageRecord]]:
    """Per class: a permutation seeded by (seed, class name); the first n_val records are validation, the next ones
    (up to ``max_train_per_class``) training. n_val = round(val_fraction * min(n, max_train_per_class)), at least 1,
    so validation stays a fixed share of what a class contributes. A class's split depends on nothing else.

    Raises:
        ConfigError: a class has fewer than two train images (one for training, one for validation).
    """
    by_class: Dict[str, List[ImageRecord]] = {}
    for r in records:
        by_class.setdefault(r.class_name, []).append(r)
    train: List[ImageRecord] = []
    val: List[ImageRecord] = []
    for name, recs in by_class.items():
        n = len(recs)
        if n < 2:
            raise ConfigError(f"class '{name}' has {n} train image(s); the oracle needs at least two per class "
                              "(one to train on, one to validate on). Add images or raise data.num_samples.")
        cap = max_train_per_class or n
        n_val = min(n - 1, max(1, round(val_fraction * min(n, cap))))
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        order = torch.randperm(n, generator=g).tolist()
        val += [recs[i] for i in order[:n_val]]
        train += [recs[i] for i in order[n_val:n_val + cap]]
    return train, val


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
    """(mean BCE, accuracy of logit > 0) of ``model`` over one pass of ``batches``, in eval mode."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches():
        logits = model(x.to(device)).reshape(-1)
        y = y.to(device, torch.float32)
        loss_sum += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        correct += int(((logits > 0).float() == y).sum())
        n += len(y)
    return loss_sum / max(1, n), correct / max(1, n)


def fit(model: nn.Module, params: Iterable[nn.Parameter], train_batches: Callable[[int], Iterable],
        val_batches: Batches, epochs: int, patience: int, learning_rate: float, device: torch.device,
        desc: str, state_of: Callable[[], Dict[str, torch.Tensor]],
        calibration_batches: Optional[Batches] = None) -> FitResult:
    """BCE on one logit with Adam; keeps the state (``state_of()``, copied to the CPU) of the epoch with the lowest
    validation loss and stops after ``patience`` epochs without a lower one. ``train_batches(epoch)`` gives that
    epoch's (inputs, labels) batches; a batch of one image is skipped (BatchNorm cannot train on it). With
    ``calibration_batches`` (un-augmented training images), the BatchNorm statistics are recomputed on them after
    every epoch (:func:`recalibrate_batchnorm`), so validation and the saved weights use exact statistics."""
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
            logits = model(x.to(device)).reshape(-1)
            loss = F.binary_cross_entropy_with_logits(logits, y.to(device, torch.float32))
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

    def counts(self) -> Dict[str, Dict[str, int]]:
        return {split: {c: sum(r.class_name == c for r in recs) for c in self.classes}
                for split, recs in (("train", self.train), ("val", self.val), ("test", self.test))}


def oracle_data(cfg: ClassifierConfig) -> OracleData:
    """Classes (label order), train/val records from the train split, test records from the eval split.

    Raises:
        ConfigError: the dataset does not have exactly two classes.
    """
    d = cfg.data
    classes = dataset_classes(d)
    if len(classes) != 2:
        raise ConfigError(f"data: the oracle is binary, but dataset '{d.name}' gives {len(classes)} classes "
                          f"{classes}; set data.classes to the two classes to edit between.")
    train, val = split_train_val(split_records(d, d.train_split, classes), cfg.val_fraction, cfg.max_train_per_class,
                                 cfg.seed)
    test = split_records(d, d.eval_split, classes, use_file_lists=True)
    return OracleData(classes, train, val, test)


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
def train_cnn(architecture: str, train: ImageSet, val: ImageSet, data: OracleData, cfg: ClassifierConfig,
              device: torch.device, index: int = 0) -> Tuple[Member, MemberInfo]:
    """Train one CNN member on ``train`` (augmented) with early stopping on ``val``; returns it with its best
    weights loaded, and its description."""
    torch.manual_seed(cfg.seed * 1_000_003 + index)  # weight init and dropout draw from the global RNG
    member = Member(build_cnn(architecture, cfg.pretrained), cfg.image_size, IMAGENET_MEAN, IMAGENET_STD).to(device)
    shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)

    def train_batches(epoch: int) -> Iterator:
        order = torch.randperm(len(train.labels), generator=shuffle)
        for x, y in train.batches(cfg.batch_size, order):
            yield augment(x.to(device), shuffle), y  # on the training device: grid_sample is cheap on a GPU

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
    member = ClipMember(ClipProbe(features, dim), size, mean, std).to(device)

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
        "pretrained": pretrained, "seed": cfg.seed, "val_loss": result.val_loss, "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "history": result.history, "counts": data.counts(),
        "dataset": {"name": cfg.data.name, "root": cfg.data.root, "train_split": cfg.data.train_split,
                    "eval_split": cfg.data.eval_split},
    }


# --------------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------------
def evaluate_oracle(oracle: EnsembleOracle, records: List[ImageRecord], cfg: ClassifierConfig,
                    size: int) -> Dict[str, object]:
    """Accuracy of each member (sigmoid > 0.5) and of the ensemble (mean sigmoid > 0.5) on ``records``, which are
    loaded at ``size`` (the oracle resizes to each member's own size)."""
    probs, labels = [], []
    for x, y in tqdm(image_batches(records, cfg, size), desc="test", unit="batch"):
        probs.append(oracle.member_probs(x).cpu())
        labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels).float()  # (N, M), (N,)
    accuracy = {name: float(((p[:, m] > 0.5).float() == y).float().mean()) for m, name in enumerate(oracle.names)}
    accuracy["ensemble"] = float(((p.mean(1) > 0.5).float() == y).float().mean())
    per_class = {c: int((y == k).sum()) for k, c in enumerate(oracle.classes)}
    return {"split": cfg.data.eval_split, "n": len(y), "n_per_class": per_class, "accuracy": accuracy}


def train_classifiers(cfg: ClassifierConfig) -> Dict[str, object]:
    """Train every member of ``cfg`` into ``cfg.output_dir`` (one checkpoint each), reload the folder as the oracle
    kandinsky_eval.py will use, and write its test accuracy to ``test_metrics.json``; returns those metrics."""
    device = resolve_device(cfg.device, key="device")
    data = oracle_data(cfg)
    stamp_run_dir(cfg, has_results=lambda folder: any(folder.glob("*.safetensors")))
    counts = data.counts()
    names = list(cfg.architectures) if cfg.kind == "ensemble" else [CLIP_PROBE]
    log.info("oracle %s: classes %s; images per class train %s, val %s, test %s; members %s; image size %s; "
             "batch %d; <= %d epochs (patience %d); device %s", cfg.kind, data.classes, counts["train"],
             counts["val"], counts["test"], names, cfg.image_size if cfg.kind == "ensemble" else "CLIP's",
             cfg.batch_size, cfg.epochs, cfg.patience, device)
    start = time.perf_counter()
    if cfg.kind == "ensemble":
        train = load_image_set(data.train, cfg, cfg.image_size, "train")
        val = load_image_set(data.val, cfg, cfg.image_size, "val")
    for index, name in enumerate(names):
        if name == CLIP_PROBE:
            member, info = train_clip_probe(data, cfg, device)
        else:
            member, info = train_cnn(name, train, val, data, cfg, device, index)
        path = save_member(cfg.output_dir, member, info, dtype=getattr(torch, cfg.save_dtype))
        log.info("%s: best epoch %s of %s, val accuracy %.4f -> %s", name, info.extra["best_epoch"],
                 info.extra["epochs_run"], info.val_accuracy, path)
        del member
    train_seconds = time.perf_counter() - start
    oracle = load_oracle(cfg.output_dir, device=device)
    size = max(info.input_size for info in oracle.infos)
    metrics = evaluate_oracle(oracle, data.test, cfg, size)
    metrics["val_accuracy"] = {info.architecture: info.val_accuracy for info in oracle.infos}
    metrics["train_seconds"] = train_seconds
    metrics["classes"] = data.classes
    atomic_write_text(Path(cfg.output_dir) / TEST_METRICS, json.dumps(metrics, indent=2))
    return metrics


def accuracy_table(metrics: Dict[str, object]) -> str:
    """The test (and validation) accuracy of each member and of the ensemble as a markdown table."""
    test: Dict[str, float] = metrics["accuracy"]  # type: ignore[assignment]
    val: Dict[str, Optional[float]] = metrics.get("val_accuracy", {})  # type: ignore[assignment]
    lines = [f"| model | val accuracy | test accuracy ({metrics['split']}, n={metrics['n']}) |", "| --- | --- | --- |"]
    for name, acc in test.items():
        v = val.get(name)
        lines.append(f"| {name} | {'' if v is None else f'{v:.4f}'} | {acc:.4f} |")
    return "\n".join(lines)
