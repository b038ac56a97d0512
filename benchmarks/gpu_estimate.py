"""Seconds per image on a modern GPU, estimated from FLOPs counted on the real model's architecture.

    python benchmarks/gpu_estimate.py [--decoder FOLDER --prior FOLDER] [--mfu 0.15 0.35] [--no-calibrate]

How: the Kandinsky 2.2 decoder UNet, MoVQ and the prior's CLIP ViT-bigG/14 image encoder are built from their
published configs (or from the configs in --decoder/--prior, e.g. a downloaded snapshot) on PyTorch's meta device,
so no weights are needed or allocated, and one forward pass of each (and one LoRA training step of the UNet,
forward + backward) runs under torch.utils.flop_counter.FlopCounterMode, which counts the FLOPs of every matrix
multiply, convolution and attention the modules actually execute (2 FLOPs per multiply-add; norms and activations
are not counted and are small). The parameter counts are printed next to the published ones as a check that the
architecture is right.

Then: FLOPs of an image = encode (MoVQ encoder + CLIP) + UNet evaluations x UNet FLOPs + one MoVQ decode per
attempt, for each search and where the first flip happens (the attempt schedule and evaluation counts come from the
same search code the editing run uses), and seconds = FLOPs / (GPU peak dense bf16 FLOP/s x MFU). MFU (the fraction of
peak reached) is an assumption, printed as a range: about 0.15 for batch-1 eager UNet inference, about 0.35 batched
with bf16 and torch.compile; measure yours with benchmarks/edit_overhead.py on the GPU. With --calibrate (default)
the same counter is run on the shipped mini model and its UNet is timed on this machine, which gives this machine's
achieved FLOP/s and checks that counted FLOPs predict the LoRA cache speed-up that benchmarks/lora_step.py measures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import best_time, default_model, search_outcomes

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# The published Kandinsky 2.2 configs (kandinsky-community/kandinsky-2-2-decoder and -prior): architecture facts.
KANDINSKY22_UNET = dict(
    act_fn="silu", addition_embed_type="image", addition_embed_type_num_heads=64, attention_head_dim=64,
    block_out_channels=[384, 768, 1152, 1536], cross_attention_dim=768, encoder_hid_dim=1280,
    encoder_hid_dim_type="image_proj", in_channels=4, out_channels=8, layers_per_block=3, norm_num_groups=32,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    resnet_time_scale_shift="scale_shift", sample_size=64,
)
KANDINSKY22_MOVQ = dict(
    in_channels=3, out_channels=3, latent_channels=4, num_vq_embeddings=16384, vq_embed_dim=4, layers_per_block=2,
    block_out_channels=[128, 256, 256, 512], norm_type="spatial",
    down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
)
KANDINSKY22_CLIP = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                        patch_size=14, image_size=224, projection_dim=1280, hidden_act="gelu")
PUBLISHED_PARAMS = {"unet": 1.22e9, "movq": 67e6, "clip": 1.8e9}  # the Kandinsky 2.2 model card
GPUS = {"H100 SXM (989 TFLOP/s dense bf16)": 989e12, "A100 (312 TFLOP/s dense bf16)": 312e12}
PAPER_T_SKIPS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def build(decoder: str | None, prior: str | None, device: str = "meta"):
    """(unet, movq, clip) from the published configs or the given folders, on ``device``, weights uninitialised."""
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet_cfg = dict(UNet2DConditionModel.load_config(Path(decoder) / "unet")) if decoder else KANDINSKY22_UNET
    movq_cfg = dict(VQModel.load_config(Path(decoder) / "movq")) if decoder else KANDINSKY22_MOVQ
    clip_cfg = (CLIPVisionConfig.from_pretrained(Path(prior) / "image_encoder") if prior
                else CLIPVisionConfig(**KANDINSKY22_CLIP))
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        movq = VQModel.from_config(movq_cfg)
        clip = CLIPVisionModelWithProjection(clip_cfg)
    return unet, movq, clip


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops(unet, movq, clip, batch: int = 1, device: str = "meta") -> dict:
    """FLOPs of one call of each component at the model's own sizes, for ``batch`` images."""
    from diffusion.lora import add_lora

    scale = 2 ** (len(movq.config.block_out_channels) - 1)
    latent = int(unet.config.sample_size)
    size = latent * scale
    lc = int(movq.config.latent_channels)
    with torch.device(device):
        w = torch.randn(batch, lc, latent, latent)
        e = torch.randn(batch, int(unet.config.encoder_hid_dim))
        t = torch.full((batch,), 500)
        x = torch.randn(batch, 3, size, size)
        px = torch.randn(batch, 3, clip.config.image_size, clip.config.image_size)
        with torch.no_grad():
            out = {
                "image_size": size,
                "unet_forward": count(lambda: unet(w, t, encoder_hidden_states=None,
                                                   added_cond_kwargs={"image_embeds": e})),
                "movq_encode": count(lambda: movq.encode(x)),
                "movq_decode": count(lambda: movq.decode(w, force_not_quantize=True)),
                "clip_forward": count(lambda: clip(pixel_values=px)),
            }
        add_lora(unet, 4, 8.0, LORA_TARGETS)

        def step():
            eps = unet(w, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": e}).sample[:, :lc]
            torch.nn.functional.mse_loss(eps, torch.zeros_like(eps)).backward()

        out["lora_step"] = count(step)  # forward + backward through the frozen UNet into the adapters
    out["params"] = {name: sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)
                     for name, m in (("unet", unet), ("movq", movq), ("clip", clip))}
    return out


def per_image(f: dict, mode: str, t_skips, T: int = 100, eager: bool = False):
    """Per-outcome (label, UNet evaluations, attempts, FLOPs) of one image under ``mode`` with null inversion."""
    ts = sorted(t_skips, reverse=True)
    depths = [T - round(t * T) for t in ts]
    rows = []
    for first, tried, evals in search_outcomes(mode, depths, 1):
        if eager:  # the whole inversion up front, as the paper's protocol runs it
            evals = evals - max(depths[k] for k in tried) + T
        total = (f["movq_encode"] + f["clip_forward"] + evals * f["unet_forward"] + len(tried) * f["movq_decode"])
        label = f"first flip at t_skip {ts[first]:g}" if first is not None else "no t_skip flips"
        rows.append((label, evals, len(tried), total))
    return rows


def calibrate() -> None:
    """Count FLOPs of the shipped mini model and time its UNet here: this machine's achieved FLOP/s."""
    from diffusion.config import ModelConfig
    from diffusion.models import load_decoder

    model = default_model()
    unet, movq, clip = build(str(model / "decoder"), str(model / "prior"))
    f = flops(unet, movq, clip, batch=8)
    decoder = load_decoder(ModelConfig(decoder=str(model / "decoder"), prior=str(model / "prior"), device="cpu"))
    lc, s = decoder.latent_channels, decoder.latent_size
    w, t = torch.randn(8, lc, s, s), torch.full((8,), 500)
    e = torch.randn(8, int(decoder.unet.config.encoder_hid_dim))
    with torch.inference_mode():
        sec = best_time(lambda: decoder.unet(w, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": e}),
                        repeats=10, warmup=3)
    print(f"\ncalibration on this machine ({torch.get_num_threads()} threads): mini model {f['image_size']} px, "
          f"UNet forward at batch 8 = {f['unet_forward'] / 1e9:.2f} GFLOP in {sec * 1e3:.1f} ms: "
          f"{f['unet_forward'] / sec / 1e9:.1f} GFLOP/s achieved")
    pred = (f["movq_encode"] + f["clip_forward"] + f["lora_step"]) / f["lora_step"]
    print(f"mini model LoRA step, FLOPs with encoders / cached: x{pred:.2f} "
          f"(compare `python benchmarks/lora_step.py`, which also saves image loading)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", help="decoder folder with unet/ and movq/ configs (default: published K2.2)")
    parser.add_argument("--prior", help="prior folder with image_encoder/ config (default: published K2.2)")
    parser.add_argument("--mfu", type=float, nargs=2, default=[0.15, 0.35], help="assumed utilisation, low high")
    parser.add_argument("--steps", type=int, default=100, help="num_inference_steps T")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    args = parser.parse_args()
    start = time.perf_counter()
    unet, movq, clip = build(args.decoder, args.prior)
    f = flops(unet, movq, clip)
    name = "published Kandinsky 2.2" if not args.decoder else f"{args.decoder} / {args.prior}"
    print(f"model: {name}; image {f['image_size']} px; counted in {time.perf_counter() - start:.1f} s on the meta "
          f"device")
    print("| component | parameters | published | GFLOP per image |")
    print("| --- | --- | --- | --- |")
    for comp, key in (("UNet forward", "unet"), ("MoVQ encode", "movq"), ("MoVQ decode", "movq"),
                      ("CLIP image encoder", "clip")):
        fk = {"UNet forward": "unet_forward", "MoVQ encode": "movq_encode", "MoVQ decode": "movq_decode",
              "CLIP image encoder": "clip_forward"}[comp]
        pub = f"{PUBLISHED_PARAMS[key] / 1e9:.3g} B" if not args.decoder else "-"
        print(f"| {comp} | {f['params'][key] / 1e9:.3g} B | {pub} | {f[fk] / 1e9:.0f} |")
    print(f"| LoRA step (UNet fwd + bwd, r=4 on the attention projections) | | | {f['lora_step'] / 1e9:.0f} |")
    lo, hi = sorted(args.mfu)
    print(f"\nper image, T = {args.steps}, guidance (2 UNet evaluations per sampling step), null inversion, "
          f"t_skips {PAPER_T_SKIPS}; seconds at MFU {lo:g}..{hi:g}")
    gpu_cols = " | ".join(f"s on {g}" for g in GPUS)
    print(f"| search | outcome | UNet evals | attempts | TFLOP | {gpu_cols} |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * len(GPUS))
    for label, mode, eager in (("first_flip, full inversion up front (paper)", "first_flip", True),
                               ("first_flip, lazy inversion (this repo)", "first_flip", False),
                               ("bisect, lazy inversion (this repo)", "bisect", False)):
        rows = per_image(f, mode, PAPER_T_SKIPS, args.steps, eager)
        for outcome, evals, attempts, total in [rows[0], rows[3], rows[6], rows[-1]]:
            secs = " | ".join(f"{total / (peak * hi):.2f}..{total / (peak * lo):.2f}" for peak in GPUS.values())
            print(f"| {label} | {outcome} | {evals} | {attempts} | {total / 1e12:.1f} | {secs} |")
    enc = f["movq_encode"] + f["clip_forward"]
    print(f"\nLoRA step per image: {f['lora_step'] / 1e9:.0f} GFLOP cached, {(f['lora_step'] + enc) / 1e9:.0f} GFLOP "
          f"encoding every step (MoVQ encode + CLIP): the cache saves x{(f['lora_step'] + enc) / f['lora_step']:.2f} "
          f"of the FLOPs")
    if args.calibrate:
        calibrate()


if __name__ == "__main__":
    main()
