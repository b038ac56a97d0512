"""The networks a classifier member can be: torchvision CNNs, small nets for small images, a CLIP linear probe.

Every builder returns a module mapping normalised images (B, 3, S, S) to ``num_outputs`` logits (B, num_outputs):
K logits for K classes (softmax), or one logit for classes[1] in binary members of the first format (sigmoid).
Pure ``nn.Module`` code: no files, no configs. The global RNG draws the random init; seed it first.

Families (an independent judge should differ from the oracle in family, not only in seed):

    resnet18, efficientnet_b0, mobilenet_v2   torchvision CNNs (ImageNet weights or random init), for large images
    lenet                                     LeNet-5: two 5x5 convolutions with max pooling, three dense layers
    small_vgg                                 three 3x3 conv + BatchNorm blocks, global average pooling
    mlp                                       two hidden layers on the raw pixels (no convolution)
    logistic                                  logistic regression on the raw pixels (one linear layer)
    clip_probe                                a linear head on frozen open_clip image features
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

TORCHVISION_CNNS: Tuple[str, ...] = ("resnet18", "efficientnet_b0", "mobilenet_v2")
SMALL_NETS: Tuple[str, ...] = ("lenet", "small_vgg", "mlp", "logistic")
ARCHITECTURES: Tuple[str, ...] = TORCHVISION_CNNS + SMALL_NETS
CLIP_PROBE = "clip_probe"
MIN_LENET_SIZE = 16  # two 5x5 convolutions and two poolings leave nothing of a smaller image


def build_cnn(architecture: str, pretrained: bool, num_outputs: int = 2) -> nn.Module:
    """A torchvision CNN with ``num_outputs`` logits: ImageNet weights (``pretrained``) or random init, then a fresh
    Linear(features, num_outputs) head.

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
        net.fc = nn.Linear(net.fc.in_features, num_outputs)
    else:  # efficientnet_b0 and mobilenet_v2: classifier = (Dropout, Linear)
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_outputs)
    return net


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling: (B, 3, S, S) -> (B, K). At S = 32 the feature map before the dense layers
    is 16 x 5 x 5, as in the original; other sizes are pooled adaptively to 5 x 5."""

    def __init__(self, num_outputs: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 6, 14, 14) at 32 px
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 5, 5)
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallVGG(nn.Module):
    """Three blocks of 3x3 convolution + BatchNorm + ReLU (32, 64, 128 channels; max pooling between them), global
    average pooling, one linear layer: (B, 3, S, S) -> (B, K), any S >= 4."""

    def __init__(self, num_outputs: int, widths: Tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, widths[-1])
        self.classifier = nn.Linear(channels, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def pixel_mlp(num_outputs: int, input_size: int, hidden: Tuple[int, ...] = (256, 128)) -> nn.Module:
    """(B, 3, S, S) -> (B, K): the flattened pixels through ReLU layers of widths ``hidden``; ``hidden`` empty is
    logistic regression (softmax over one linear map of the pixels)."""
    layers: List[nn.Module] = [nn.Flatten()]
    width = 3 * input_size * input_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def build_net(architecture: str, num_outputs: int, input_size: int, pretrained: bool = False) -> nn.Module:
    """The network of ``architecture`` (one of :data:`ARCHITECTURES`) with ``num_outputs`` logits for inputs of
    ``input_size`` pixels. ``pretrained`` (ImageNet weights) exists for the torchvision CNNs only.

    Raises:
        ValueError: unknown architecture, ``pretrained`` for a small net, or an input too small for LeNet.
        WeightsUnavailableError: see :func:`build_cnn`.
    """
    if architecture in TORCHVISION_CNNS:
        return build_cnn(architecture, pretrained, num_outputs)
    if architecture not in SMALL_NETS:
        raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(ARCHITECTURES)}")
    if pretrained:
        raise ValueError(f"{architecture} has no pretrained weights (only {', '.join(TORCHVISION_CNNS)} do); "
                         "set pretrained: false")
    if architecture == "lenet":
        if input_size < MIN_LENET_SIZE:
            raise ValueError(f"lenet needs inputs of at least {MIN_LENET_SIZE} px, got image_size {input_size}")
        return LeNet(num_outputs)
    if architecture == "small_vgg":
        return SmallVGG(num_outputs)
    return pixel_mlp(num_outputs, input_size, hidden=(256, 128) if architecture == "mlp" else ())


# --------------------------------------------------------------------------------------------------------------------
# CLIP linear probe
# --------------------------------------------------------------------------------------------------------------------
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
    """The net of a CLIP linear-probe member: frozen features -> Linear(D, num_outputs). Only ``head`` is learned and
    saved."""

    def __init__(self, features: ClipFeatures, dim: int, num_outputs: int):
        super().__init__()
        self.features, self.head = features, nn.Linear(dim, num_outputs)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


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
