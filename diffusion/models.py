"""Loading the Kandinsky 2.2 parts the method needs, and the one place for each shared model step.

DIFFusion uses the decoder (UNet2DConditionModel + MoVQ VQModel + its DDPM scheduler) and only the *image encoder* of
the prior (CLIPVisionModelWithProjection + CLIPImageProcessor); the prior diffusion model is never loaded.
Every size (latent channels, MoVQ scale factor, embedding width, image size) is read from the model configs, so the
tiny models of the tests and the real 2.2 weights run through exactly the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from diffusion.config import ModelConfig
from diffusion.devices import resolve_device, resolve_dtype
from diffusion.inversion import cfg_eps
from diffusion.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class ImageEncoder:
    """The prior's CLIP image encoder with its processor; ``embed`` is the only way images become embeddings."""

    model: CLIPVisionModelWithProjection
    processor: CLIPImageProcessor

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def fingerprint(self) -> str:
        """What makes this encoder's embeddings: its weights and its processor's settings (cached)."""
        if not hasattr(self, "_fingerprint"):
            proc = hashlib.sha256(json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode())
            self._fingerprint = f"{weights_fingerprint(self.model)}-{proc.hexdigest()[:8]}"
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP ``image_embeds`` of images in [0, 1]: (B, 3, H, W) -> (B, D) float32.

        The processor resizes, crops and normalises; rescaling is off because the input is already in [0, 1].
        """
        pixels = self.processor(images=images.float().cpu(), do_rescale=False, return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device, self.dtype)).image_embeds
        return out.float()

    @torch.inference_mode()
    def null_embedding(self) -> torch.Tensor:
        """c_0: the embedding of an all-zero, already normalised pixel tensor at the encoder's input size, (1, D)."""
        size = int(self.model.config.image_size)
        zeros = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
        return self.model(pixel_values=zeros).image_embeds.float()


def movq_encode(movq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """w_0 = movq.encode(2x - 1).latents for images in [0, 1]: (B, 3, H, W) -> (B, C, H/f, W/f) float32.
    No scaling factor (Kandinsky 2.2 uses the MoVQ latents as they are)."""
    x = images.to(movq.device, movq.dtype) * 2 - 1
    return movq.encode(x).latents.float()


def movq_decode(movq: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], float32 (the quantiser is bypassed, as the Kandinsky pipeline does)."""
    x = movq.decode(latents.to(movq.device, movq.dtype), force_not_quantize=True).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


@dataclass
class Decoder:
    """The Kandinsky 2.2 decoder: UNet (epsilon + learned variance), MoVQ autoencoder and the DDPM scheduler."""

    unet: UNet2DConditionModel
    movq: VQModel
    scheduler: DDPMScheduler
    image_size: int

    @property
    def latent_channels(self) -> int:
        return int(self.movq.config.latent_channels)

    @property
    def scale_factor(self) -> int:
        """MoVQ downsampling: 2 ** (number of levels - 1) (8 for the real model)."""
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return movq_encode(self.movq, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return movq_decode(self.movq, latents)

    def eps(self, w: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
        """epsilon_theta(w, t, e): the first latent_channels of the UNet output (the rest is the learned variance)."""
        out = self.unet(
            sample=w.to(self.device, self.dtype),
            timestep=t,
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": embeds.to(self.device, self.dtype)},
        ).sample
        return out[:, : self.latent_channels].float()

    def eps_fn(self, timesteps: torch.Tensor, cond: torch.Tensor, null: Optional[torch.Tensor] = None,
               guidance: Optional[float] = None, counter: Optional[torch.Tensor] = None):
        """The network as the ``eps_fn(w, step, rows)`` of :mod:`diffusion.inversion`: row r is conditioned on
        ``cond[r]`` (R, D); with ``guidance`` g, classifier-free guidance against ``null`` (1, D), both branches in
        one UNet batch:

            eps = eps(w, t, c_0) + g (eps(w, t, cond) - eps(w, t, c_0))

        ``counter`` (R,) long, when given, accumulates the UNet evaluations spent on each row (2 per guided step).
        This is the one place classifier-free guidance is applied. g = 1 is the conditional prediction alone, so
        the unconditional branch is skipped (one evaluation per step instead of two)."""
        if guidance is not None and null is None:
            raise ValueError("guidance needs the null embedding")
        if guidance is not None and float(guidance) == 1.0:
            guidance = None

        def fn(w: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            t = timesteps[steps].to(self.device)
            n = len(rows)
            embeds = cond[rows.to(cond.device)]
            if guidance is None:
                if counter is not None:
                    counter.index_add_(0, rows, torch.ones(n, dtype=counter.dtype))
                return self.eps(w, t, embeds).to(w.device)
            if counter is not None:
                counter.index_add_(0, rows, torch.full((n,), 2, dtype=counter.dtype))
            both = torch.cat([null.to(embeds.device).reshape(1, -1).expand(n, -1), embeds])
            eps = self.eps(torch.cat([w, w]), torch.cat([t, t]), both).to(w.device)
            return cfg_eps(eps[:n], eps[n:], guidance)

        return fn


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights: every tensor's name, shape, dtype and up to 1024 evenly spaced values.

    Cheap even for multi-GB models, and different for any two checkpoints in practice (fine-tuned weights change
    nearly every value).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def _from_pretrained(cls, source: str, subfolder: str, cfg: ModelConfig, loader: str = "from_pretrained", **kwargs):
    local = Path(source).is_dir()
    offline = cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return getattr(cls, loader)(
            source, subfolder=subfolder, revision=cfg.revision, local_files_only=offline or local, **kwargs
        )
    except (OSError, ValueError, EnvironmentError) as err:
        where = f"local folder {source}/{subfolder}" if local else f"hub id '{source}' (subfolder {subfolder})"
        if kwargs.get("use_safetensors") and "safetensors" in str(err).lower():
            raise ModelLoadError(
                f"{where} has no .safetensors weights for {cls.__name__} (only pickle-format files such as .bin, "
                "which can run code when loaded). Convert them to safetensors, or set model.allow_pickle_weights=true "
                "if you trust where they came from.") from err
        raise ModelLoadError(
            f"could not load {cls.__name__} from {where}: {str(err).splitlines()[0]}\n"
            "  - on a machine with internet, run once without HF_HUB_OFFLINE / model.local_files_only so the weights "
            "download to the Hugging Face cache;\n"
            "  - offline, copy the weights (huggingface-cli download ...) and point model.decoder / model.prior at "
            "the local folders;\n"
            "  - for a quick test without weights, use the tiny model: python scripts/make_tiny_model.py"
        ) from err


def check_num_inference_steps(cfg: ModelConfig, num_inference_steps: int) -> None:
    """Refuse a T the decoder's scheduler cannot space (more than its training steps), reading only its config, so
    the error comes before any weights load."""
    sched_cfg = _from_pretrained(DDPMScheduler, cfg.decoder, "scheduler", cfg, loader="load_config")
    train_steps = int(sched_cfg.get("num_train_timesteps", 1000))
    if num_inference_steps > train_steps:
        raise ConfigError(f"num_inference_steps = {num_inference_steps} is more than the decoder scheduler's "
                          f"{train_steps} training steps ({cfg.decoder}/scheduler); use at most {train_steps} "
                          "(the paper uses 100)", key="num_inference_steps")


def decoder_image_size(cfg: ModelConfig) -> int:
    """The pixel size images are resized to: model.image_size, else the UNet's sample_size x the MoVQ scale factor.

    Reads only the two config files, so scripts that need no decoder weights still use the editing run's size.
    """
    unet_cfg = _from_pretrained(UNet2DConditionModel, cfg.decoder, "unet", cfg, loader="load_config")
    movq_cfg = _from_pretrained(VQModel, cfg.decoder, "movq", cfg, loader="load_config")
    return _image_size(cfg, unet_cfg, movq_cfg)


def _image_size(cfg: ModelConfig, unet_cfg, movq_cfg) -> int:
    scale = 2 ** (len(movq_cfg["block_out_channels"]) - 1)
    size = cfg.image_size or int(unet_cfg["sample_size"]) * scale
    if size % scale:
        raise ConfigError(f"model.image_size = {size} must be a multiple of the MoVQ scale factor {scale}",
                          key="model.image_size")
    return size


def load_decoder(cfg: ModelConfig, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> Decoder:
    """UNet, MoVQ and scheduler from ``cfg.decoder`` (a hub id or a folder with unet/, movq/, scheduler/)."""
    device = device or resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    safe = None if cfg.allow_pickle_weights else True
    unet = _from_pretrained(UNet2DConditionModel, cfg.decoder, "unet", cfg, torch_dtype=dtype, use_safetensors=safe)
    movq = _from_pretrained(VQModel, cfg.decoder, "movq", cfg, torch_dtype=dtype, use_safetensors=safe)
    scheduler = _from_pretrained(DDPMScheduler, cfg.decoder, "scheduler", cfg)
    unet.to(device).eval().requires_grad_(False)
    movq.to(device).eval().requires_grad_(False)
    image_size = _image_size(cfg, unet.config, movq.config)
    if unet.config.in_channels != movq.config.latent_channels:
        raise ModelLoadError(f"{cfg.decoder}: UNet in_channels {unet.config.in_channels} != MoVQ latent_channels "
                             f"{movq.config.latent_channels}; the unet/ and movq/ folders do not belong together")
    return Decoder(unet=unet, movq=movq, scheduler=scheduler, image_size=image_size)


def optimize_unet(decoder: Decoder, cfg: ModelConfig) -> None:
    """Apply model.channels_last / model.compile to the decoder UNet, in place (call after loading LoRA weights).

    Attention already runs through PyTorch's scaled_dot_product_attention (diffusers' default processor)."""
    if cfg.channels_last:
        decoder.unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        decoder.unet.compile()


def load_image_encoder(cfg: ModelConfig, device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> ImageEncoder:
    """The prior's CLIP image encoder and processor from ``cfg.prior`` (subfolders image_encoder/, image_processor/)."""
    device = device or resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    model = _from_pretrained(CLIPVisionModelWithProjection, cfg.prior, "image_encoder", cfg, dtype=dtype,
                             use_safetensors=None if cfg.allow_pickle_weights else True)
    processor = _from_pretrained(CLIPImageProcessor, cfg.prior, "image_processor", cfg)
    model.to(device).eval().requires_grad_(False)
    return ImageEncoder(model=model, processor=processor)


def check_embed_dim(decoder: Decoder, encoder: ImageEncoder) -> None:
    """The UNet's image-embedding width must equal the encoder's projection width."""
    width = decoder.unet.config.encoder_hid_dim
    if width is not None and int(width) != encoder.embed_dim:
        raise ModelLoadError(
            f"the decoder UNet expects {width}-d image embeddings but the image encoder gives {encoder.embed_dim}-d; "
            "model.decoder and model.prior must come from the same model family"
        )
