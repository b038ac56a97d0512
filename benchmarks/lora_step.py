"""Time one LoRA training step with and without the latent/embedding cache (a benchmark, not a test).

    python benchmarks/lora_step.py [--config_path configs/lora/demo.yaml] [--steps 20] [--warmup 3] [key=value ...]

Same model, data, batch and objective as kandinsky_lora_train.py with that config. "no cache": each step loads its
images, runs the MoVQ encoder and the CLIP image encoder, then the UNet forward/backward and AdamW; "cache": the
latents and embeddings were computed once up front (their one-off cost is printed too), so a step runs only the UNet
and AdamW. Single process; under mixed precision the steps run in autocast without a grad scaler (timing only).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time


import torch

from diffusion.config import LoraTrainConfig, MixedPrecision, load_config
from diffusion.errors import ConfigError


def parse() -> tuple:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", default="configs/lora/demo.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the modes interleaved (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args()
    try:
        cfg = load_config(LoraTrainConfig, args.config_path, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")
    return cfg, args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    cfg, args = parse()
    from diffusion.data import dataset_classes, split_records
    from diffusion.lora import add_lora
    from diffusion.devices import resolve_device
    from diffusion.models import load_decoder, load_image_encoder
    from diffusion.train.cache import Features, compute_features
    from diffusion.train.data import BatchOrder, CachedBatches, LiveBatches
    from diffusion.train.objective import diffusion_loss
    from diffusion.train.trainer import PRECISION_DTYPES

    device = resolve_device(cfg.model.device)
    dtype = PRECISION_DTYPES[cfg.mixed_precision]
    decoder = load_decoder(cfg.model, device, dtype)
    encoder = load_image_encoder(cfg.model, device, dtype)
    records = split_records(cfg.data, cfg.data.train_split, dataset_classes(cfg.data))
    batch = cfg.train_batch_size
    order = BatchOrder(len(records), batch, 1, 0, cfg.seed)

    sync(device)
    start = time.perf_counter()
    feats = compute_features(decoder, encoder, records, list(range(len(records))), cfg.data, ["latents", "embeds"],
                             batch, desc="cache", show_progress=False)
    sync(device)
    build = time.perf_counter() - start
    features = Features(indices=feats["indices"].tolist(), files=[str(r.path) for r in records],
                        latents=feats["latents"], embeds=feats["embeds"], embeds_flip=None)

    torch.manual_seed(cfg.seed)
    add_lora(decoder.unet, cfg.rank, cfg.alpha, cfg.target_modules)
    params = [p for p in decoder.unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    decoder.unet.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    autocast = (torch.autocast(device.type, dtype=dtype) if cfg.mixed_precision != MixedPrecision.no
                else contextlib.nullcontext())
    total = args.warmup + args.rounds * args.steps
    modes = {
        "no cache (images -> MoVQ + CLIP -> UNet)": LiveBatches(records, order, decoder, encoder, cfg, 0, total),
        "cache (UNet only)": CachedBatches(features, order, device),
    }
    print(f"model {cfg.model.decoder}, {decoder.image_size} px, batch {batch}, {len(records)} images, device "
          f"{device}, {torch.get_num_threads()} CPU threads, mixed precision {cfg.mixed_precision}, "
          f"gradient checkpointing {cfg.gradient_checkpointing}")
    print(f"cache build (once): {build:.2f} s for {len(records)} images")
    def run(batches, micro_steps: range) -> float:
        """Seconds per training step over ``micro_steps``: batch, loss, backward, clipping, AdamW."""
        sync(device)
        start = time.perf_counter()
        for micro in micro_steps:
            with autocast:
                w0, e = batches.get(micro)
                gen = torch.Generator(device=device).manual_seed(micro)
                loss = diffusion_loss(decoder.unet, decoder.scheduler, w0, e, gen, decoder.latent_channels)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return (time.perf_counter() - start) / max(1, len(micro_steps))

    for batches in modes.values():
        run(batches, range(args.warmup))
    timings = {name: [] for name in modes}
    for r in range(args.rounds):  # interleaved, so a change of machine load hits both modes alike
        first = args.warmup + r * args.steps
        for name, batches in modes.items():
            timings[name].append(run(batches, range(first, first + args.steps)))
    medians = {name: statistics.median(t) for name, t in timings.items()}
    base = next(iter(medians.values()))
    print(f"median of {args.rounds} rounds x {args.steps} steps:")
    for name, seconds in medians.items():
        spread = ", ".join(f"{t * 1000:.0f}" for t in timings[name])
        print(f"  {name:42s} {seconds * 1000:8.1f} ms/step  {batch / seconds:7.1f} images/s  x{base / seconds:.2f}"
              f"   (rounds: {spread} ms)")


if __name__ == "__main__":
    main()
