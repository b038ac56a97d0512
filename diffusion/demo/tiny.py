"""A few-MB, randomly initialised model with the Kandinsky 2.2 component classes and folder layout.

It exists so tests and smoke configs can run the real code path (the same loader, the same sizes-from-config logic)
without the multi-GB weights. Its images are noise: it proves plumbing, not quality.
Shapes follow the small dummy components of diffusers' own Kandinsky 2.2 tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def kandinsky_scheduler() -> DDPMScheduler:
    """A DDPM scheduler configured like the Kandinsky 2.2 decoder's (1000 steps, linear 0.00085..0.012)."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="epsilon", variance_type="learned_range", timestep_spacing="leading", steps_offset=1,
    )


def build_tiny_components(seed: int = 0, embed_dim: int = 32, sample_size: int = 32) -> dict:
    """Random tiny unet / movq / scheduler / image_encoder / image_processor (about 1.5M parameters in all).

    ``sample_size`` is the UNet latent size; the MoVQ has two levels (scale factor 2), so images are 2x that.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=8, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        addition_embed_type="image", encoder_hid_dim_type="image_proj", encoder_hid_dim=embed_dim,
        cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    )
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, image_size=32, patch_size=8, projection_dim=embed_dim, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, num_channels=3,
    ))
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=False,
    )
    for m in (unet, movq, encoder):
        m.eval()  # freshly built models start in train mode; loaded ones in eval mode
    return dict(unet=unet, movq=movq, scheduler=kandinsky_scheduler(), image_encoder=encoder,
                image_processor=processor)


def save_components(components: dict, out_dir: str | Path) -> Path:
    """Write components in the layout of the real models: decoder/{unet,movq,scheduler}, prior/{image_encoder,
    image_processor}, all weights as safetensors."""
    out = Path(out_dir)
    for name in ("unet", "movq", "scheduler"):
        components[name].save_pretrained(out / "decoder" / name)
    components["image_encoder"].save_pretrained(out / "prior" / "image_encoder")
    components["image_processor"].save_pretrained(out / "prior" / "image_processor")
    return out


def make_tiny_model(out_dir: str | Path, seed: int = 0, embed_dim: int = 32, sample_size: int = 32) -> Path:
    """Build and save the tiny random model; returns ``out_dir`` (use ``out_dir/decoder`` and ``out_dir/prior``)."""
    return save_components(build_tiny_components(seed, embed_dim, sample_size), out_dir)
