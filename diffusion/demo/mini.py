"""A small Kandinsky-2.2-shaped model trained from scratch on the CPU: the offline demo's model.

Same component classes as the real model (VQModel as MoVQ, CLIPVisionModelWithProjection + CLIPImageProcessor as the
image encoder, UNet2DConditionModel with image-embedding conditioning, DDPMScheduler), saved in the same folder layout,
loaded by the same loader. Three stages, each written to disk when it finishes (a rerun skips finished stages):

1. MoVQ: a three-level autoencoder (latents image_size / 4), quantiser bypassed, latents kept near unit variance
   because Kandinsky applies no latent scaling factor.
2. Image encoder: supervised-contrastive on the labels, with random shifts and scalings of both views, so the
   embedding says *which digit* but not *where or how big*: semantic but lossy, like CLIP. Then frozen.
3. UNet: epsilon MSE on the first latent channels, t ~ U{0..999}, conditioned on the frozen encoder's embedding with
   Gaussian noise added (a share replaced by the null embedding c_0, the unconditional branch of guidance). The noise
   widens p(x | e): an embedding that pins an image down leaves the edit-friendly noise maps nothing to preserve.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, VQModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffusion.config import MiniConfig
from diffusion.files import atomic_dir
from diffusion.demo.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, kandinsky_scheduler

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------------
def build_movq(cfg: MiniConfig) -> VQModel:
    c = cfg.movq_channels
    return VQModel(
        in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=256, layers_per_block=1,
        block_out_channels=[c, c, c], norm_type="spatial", norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    )


def build_encoder(cfg: MiniConfig) -> Tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.encoder_hidden, intermediate_size=cfg.encoder_hidden * 2, num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=4, image_size=cfg.image_size, patch_size=cfg.encoder_patch, projection_dim=cfg.embed_dim,
    ))
    processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=False,
    )
    return model, processor


def build_unet(cfg: MiniConfig) -> UNet2DConditionModel:
    ch = tuple(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=ch,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        addition_embed_type="image", encoder_hid_dim_type="image_proj", encoder_hid_dim=cfg.embed_dim,
        cross_attention_dim=ch[-1], attention_head_dim=32, resnet_time_scale_shift="scale_shift",
    )


# --------------------------------------------------------------------------------------------------------------------
# Stage helpers
# --------------------------------------------------------------------------------------------------------------------
def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """Indices of ``steps`` batches: seeded epochs of a permutation, so a run is reproducible."""
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def _train(name: str, params, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, cfg: MiniConfig, steps: int,
           lr: float, gen: torch.Generator, after_step: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    bar = tqdm(_batches(n, cfg.batch_size, steps, gen), total=steps, desc=name, unit="step")
    for idx in bar:
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.4f}")
    tail = losses[-min(50, len(losses)):]
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "loss_first": losses[0],
            "loss_last50": sum(tail) / len(tail)}


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Scale (B,), translate (B, 2; a fraction of the half-width) and rotate (B,) images (B, C, H, W) about their
    centre; the background is white."""
    a = degrees * (math.pi / 180)
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.cos(a) / scale
    theta[:, 0, 1] = -torch.sin(a) / scale
    theta[:, 1, 0] = torch.sin(a) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return 1 - F.grid_sample(1 - x, grid, align_corners=False, padding_mode="zeros")  # pad with white


def _random_affine(x: torch.Tensor, gen: torch.Generator, shift: float = 0.12, scale: Tuple[float, float] = (0.85, 1.15),
                   rotate: float = 0.0):
    """Per-image random translation (up to ``shift`` of the half-width), scaling (in ``scale``) and rotation (up to
    ``rotate`` degrees either way); without rotation the draws are those of the encoder stage's augmentation."""
    b = x.shape[0]
    s = torch.empty(b).uniform_(*scale, generator=gen)
    t = torch.empty(b, 2).uniform_(-shift, shift, generator=gen)
    a = torch.empty(b).uniform_(-rotate, rotate, generator=gen) if rotate else torch.zeros(b)
    return _affine(x, s, t, a)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of L2-normalised embeddings z (N, D) with labels (N,)."""
    z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -((log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)).mean()


def _save_atomic(save: Callable[[Path], None], target: Path) -> None:
    """A stage's folder, written whole or not at all."""
    with atomic_dir(target) as tmp:
        save(tmp)


# --------------------------------------------------------------------------------------------------------------------
# The three stages
# --------------------------------------------------------------------------------------------------------------------
def train_movq(cfg: MiniConfig, images: torch.Tensor, gen: torch.Generator) -> Tuple[VQModel, Dict[str, float]]:
    """Plain autoencoder on [-1, 1] images: MSE + latent_std_weight ((std - 1)^2 + mean^2) of the latents."""
    movq = build_movq(cfg).train()
    x_all = images * 2 - 1

    def loss_fn(idx):
        x = x_all[idx]
        lat = movq.encode(x).latents
        rec = movq.decode(lat, force_not_quantize=True).sample
        return F.mse_loss(rec, x) + cfg.latent_std_weight * ((lat.std() - 1) ** 2 + lat.mean() ** 2)

    stats = _train("movq", movq.parameters(), loss_fn, len(images), cfg, cfg.movq_steps, cfg.movq_lr, gen)
    return movq.eval(), stats


def train_encoder(cfg: MiniConfig, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    """Supervised-contrastive training of the CLIP vision encoder on two randomly shifted/scaled views."""
    model, processor = build_encoder(cfg)
    model.train()

    def embed(x):
        pixels = processor(images=x, do_rescale=False, return_tensors="pt").pixel_values
        return model(pixel_values=pixels).image_embeds

    def loss_fn(idx):
        x = images[idx]
        views = torch.cat([_random_affine(x, gen), _random_affine(x, gen)])
        return supcon_loss(embed(views), torch.cat([labels[idx], labels[idx]]), cfg.contrastive_temperature)

    stats = _train("encoder", model.parameters(), loss_fn, len(images), cfg, cfg.encoder_steps, cfg.encoder_lr, gen)
    return model.eval(), processor, stats


def train_unet(cfg: MiniConfig, batch_fn: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], n: int,
               c0: torch.Tensor, gen: torch.Generator) -> Tuple[UNet2DConditionModel, Dict[str, float]]:
    """The LoRA trainer's epsilon objective (:func:`diffusion.train.objective.diffusion_loss`) on the full UNet, with noisy
    embeddings (embed_noise x ||e||) and null-embedding dropout (null_prob). ``batch_fn(indices)`` gives the batch's
    (latents, embeddings) of the ``n`` training images (augmented ones when the UNet stage augments)."""
    from diffusion.train.objective import diffusion_loss

    unet = build_unet(cfg).train()
    scheduler = kandinsky_scheduler()

    def loss_fn(idx):
        w0, e = batch_fn(idx)
        b, d = e.shape
        e = e + cfg.embed_noise * e.norm(dim=1, keepdim=True) * torch.randn(b, d, generator=gen) / math.sqrt(d)
        drop = torch.rand(b, generator=gen) < cfg.null_prob
        e = torch.where(drop[:, None], c0.expand(b, -1), e)
        return diffusion_loss(unet, scheduler, w0, e, gen, latent_channels=w0.shape[1])

    ema = EMAModel(unet.parameters(), decay=cfg.unet_ema_decay) if cfg.unet_ema_decay else None
    stats = _train("unet", unet.parameters(), loss_fn, n, cfg, cfg.unet_steps, cfg.unet_lr, gen,
                   after_step=(lambda: ema.step(unet.parameters())) if ema else None)
    if ema is not None:
        ema.copy_to(unet.parameters())  # the averaged weights are the ones saved
        stats["ema_decay"] = cfg.unet_ema_decay
    return unet.eval(), stats


def nearest_mean_accuracy(train_e: torch.Tensor, train_y: torch.Tensor, test_e: torch.Tensor,
                          test_y: torch.Tensor) -> float:
    """Accuracy of assigning each test embedding to the nearest class mean (cosine) of the train embeddings."""
    classes = sorted(set(train_y.tolist()))
    means = torch.stack([F.normalize(train_e[train_y == c], dim=1).mean(0) for c in classes])
    pred = (F.normalize(test_e, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
    return float((torch.tensor(classes)[pred] == test_y).float().mean())


def write_report(out: Path, report: dict) -> None:
    (out / "training_report.json").write_text(json.dumps(report, indent=2))


# The config keys each stage's weights depend on (a stage also depends on the stages before it).
_COMMON_KEYS = ("seed", "image_size", "batch_size", "save_dtype", "data.name", "data.classes", "holdout_classes",
                "holdout_per_class", "holdout_seed")
STAGE_KEYS = {
    "decoder/movq": ("movq_channels", "movq_steps", "movq_lr", "latent_std_weight"),
    "prior/image_encoder": ("encoder_hidden", "encoder_layers", "encoder_patch", "embed_dim", "encoder_steps",
                            "encoder_lr", "contrastive_temperature"),
    "decoder/unet": ("unet_channels", "unet_steps", "unet_lr", "unet_ema_decay", "embed_noise", "null_prob",
                     "unet_shift", "unet_scale", "unet_rotate"),
}


def report_config(cfg: MiniConfig) -> dict:
    """The config as the training report records it."""
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "data"}
    config["data"] = {"name": cfg.data.name, "root": cfg.data.root, "classes": list(cfg.data.classes)}
    config["save_dtype"] = cfg.save_dtype.value
    return config


def _trained_with(stored: dict, key: str) -> str:
    """What a training report says of ``key``: its value, or that a report older than the key does not record it."""
    from diffusion.config import lookup

    missing = object()
    value = lookup(stored, key, missing)
    return "the report does not record it" if value is missing else f"trained with {value!r}"


def _read_report(out: Path, cfg: MiniConfig) -> dict:
    """The folder's training report ({} when there is none, or when overwrite retrains everything). A finished stage
    that a rerun would skip must have been trained with this config's values of its keys: otherwise the report would
    claim settings its weights were not trained with, so that is refused before anything loads."""
    from diffusion.config import lookup, result_keys_changed
    from diffusion.errors import ArtefactError, ConfigError

    path = out / "training_report.json"
    if cfg.overwrite or not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
        stored = report.get("config") if isinstance(report, dict) else None
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        raise ArtefactError(f"{path}: damaged or not a training report. Delete it and rerun (finished stages are kept, "
                            "but their training figures are lost), or retrain with overwrite=true.") from None
    changed = set(result_keys_changed(MiniConfig, stored, report_config(cfg)))
    depends: Tuple[str, ...] = _COMMON_KEYS
    for stage, keys in STAGE_KEYS.items():
        depends += keys
        clash = sorted(k for k in changed if k in depends)
        if (out / stage).exists() and clash:
            shown = ", ".join(f"{k}={lookup(report_config(cfg), k)!r} ({_trained_with(stored, k)})" for k in clash)
            raise ConfigError(f"{out / stage} was trained with other settings than this config's: {shown}. A rerun "
                              "keeps finished stages, so these values would not be used: retrain with overwrite=true, "
                              "or write to a new output_dir.")
    return report


# --------------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------------
def _load_split(cfg: MiniConfig, split: str, held_out: Sequence[str] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    from diffusion.data import dataset_classes, make_loader, split_records

    left_out = set(held_out)
    records = [r for r in split_records(cfg.data, split, dataset_classes(cfg.data)) if str(r.path) not in left_out]
    loader = make_loader(records, cfg.data, cfg.image_size, batch_size=256)
    xs, ys = zip(*[(b["pixel_values"], b["label"]) for b in loader if b is not None])
    return torch.cat(xs), torch.cat(ys)


def held_out_files(cfg: MiniConfig) -> List[str]:
    """The train images left out of training (holdout_*): the validation images of scripts/calibrate.py."""
    from diffusion.data import held_out_paths

    return held_out_paths(cfg.data, cfg.holdout_classes, cfg.holdout_per_class, cfg.holdout_seed)


def _save_half(model, path: Path, dtype: torch.dtype) -> None:
    import copy

    copy.deepcopy(model).to(dtype).save_pretrained(path)


def train_mini_model(cfg: MiniConfig) -> dict:
    """Train (or resume) the three stages into cfg.output_dir; returns the training report."""
    from diffusion.devices import resolve_dtype
    from diffusion.models import ImageEncoder, movq_encode

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    save_dtype = resolve_dtype(cfg.save_dtype, torch.device("cpu"))
    report = _read_report(out, cfg)  # before anything loads: a finished stage trained otherwise is refused
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    held_out = held_out_files(cfg)
    x_train, y_train = _load_split(cfg, cfg.data.train_split, held_out)
    x_test, y_test = _load_split(cfg, cfg.data.eval_split)
    log.info("mini model: %d train / %d test images at %d px, %d classes%s", len(x_train), len(x_test),
             cfg.image_size, len(set(y_train.tolist())),
             f"; {len(held_out)} train images held out for validation ({cfg.holdout_per_class} per class of "
             f"{', '.join(cfg.holdout_classes)})" if held_out else "")
    out.mkdir(parents=True, exist_ok=True)

    movq_dir = out / "decoder" / "movq"
    if movq_dir.exists() and not cfg.overwrite:
        movq = VQModel.from_pretrained(movq_dir, torch_dtype=torch.float32).eval()
    else:
        movq, report["movq"] = train_movq(cfg, x_train, gen)
        _save_atomic(lambda p: _save_half(movq, p, save_dtype), movq_dir)
    movq.requires_grad_(False)
    with torch.no_grad():
        lat_test = movq_encode(movq, x_test)
        rec = movq.decode(lat_test, force_not_quantize=True).sample
        report.setdefault("movq", {})["test_mse_pm1"] = float(F.mse_loss(rec, x_test * 2 - 1))
        lat_train = torch.cat([movq_encode(movq, x_train[i:i + 256]) for i in range(0, len(x_train), 256)])
        report["movq"]["latent_std"] = float(lat_train.std())

    enc_dir = out / "prior" / "image_encoder"
    if enc_dir.exists() and not cfg.overwrite:
        model = CLIPVisionModelWithProjection.from_pretrained(enc_dir, dtype=torch.float32).eval()
        processor = CLIPImageProcessor.from_pretrained(out / "prior" / "image_processor")
    else:
        model, processor, report["encoder"] = train_encoder(cfg, x_train, y_train, gen)
        _save_atomic(lambda p: _save_half(model, p, save_dtype), enc_dir)
        processor.save_pretrained(out / "prior" / "image_processor")
    encoder = ImageEncoder(model=model.requires_grad_(False), processor=processor)
    e_train = torch.cat([encoder.embed(x_train[i:i + 256]) for i in range(0, len(x_train), 256)])
    e_test = encoder.embed(x_test)
    report.setdefault("encoder", {})["nearest_class_mean_accuracy_test"] = nearest_mean_accuracy(
        e_train, y_train, e_test, y_test)

    unet_dir = out / "decoder" / "unet"
    if not unet_dir.exists() or cfg.overwrite:
        c0 = encoder.null_embedding()
        if cfg.unet_shift or cfg.unet_scale or cfg.unet_rotate:
            def batch_fn(idx):  # a fresh random shift/scale/rotation of every image, encoded by the frozen stages
                x = _random_affine(x_train[idx], gen, cfg.unet_shift, (1 - cfg.unet_scale, 1 + cfg.unet_scale),
                                   cfg.unet_rotate)
                with torch.no_grad():
                    return movq_encode(movq, x), encoder.embed(x)
        else:
            def batch_fn(idx):
                return lat_train[idx], e_train[idx]
        unet, report["unet"] = train_unet(cfg, batch_fn, len(x_train), c0, gen)
        _save_atomic(lambda p: _save_half(unet, p, save_dtype), unet_dir)
        kandinsky_scheduler().save_pretrained(out / "decoder" / "scheduler")
    report["data"] = {"train_images": len(x_train), "test_images": len(x_test), "held_out_images": len(held_out)}
    report["config"] = report_config(cfg)
    write_report(out, report)
    return report
