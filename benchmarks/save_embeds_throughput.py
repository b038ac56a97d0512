"""save_embeds throughput: images per second of the embedding pass against the bare image-encoder forward.

    python benchmarks/save_embeds_throughput.py [--model DIR] [--images 256] [--batch 32] [--dtype bfloat16]

With the full-size random model of `benchmarks/peak_memory.py --full_size DIR` (ViT-bigG/14) the encoder dominates:
    python benchmarks/save_embeds_throughput.py --model DIR --images 16 --batch 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from _common import REPO, best_time, default_model
from diffusion.config import EmbedsConfig, load_config
from diffusion.models import load_image_encoder
from diffusion.precompute import save_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model()))
    parser.add_argument("--images", type=int, default=256, help="train images per class")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="model.dtype (auto, float32, bfloat16, float16)")
    parser.add_argument("--device", default="cpu", help="model.device (cpu, cuda, auto, ...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"data.root={tmp}/digits", f"model.decoder={args.model}/decoder", f"model.prior={args.model}/prior",
                     f"data.num_samples={args.images}", f"batch_size={args.batch}", "data.classes=[0,1]",
                     f"model.dtype={args.dtype}", f"model.device={args.device}"]
        warm = load_config(EmbedsConfig, str(REPO / "configs/embeds/demo.yaml"),
                           [*overrides, f"output_dir={tmp}/warm", "data.num_samples=2"])
        save_embeddings(warm)  # exports the digits, warms the loaders
        cfg = load_config(EmbedsConfig, str(REPO / "configs/embeds/demo.yaml"), [*overrides, f"output_dir={tmp}/e"])
        encoder = load_image_encoder(cfg.model)
        start = time.perf_counter()
        save_embeddings(cfg, encoder=encoder)
        wall = time.perf_counter() - start
        n = 2 * args.images
        x = torch.rand(args.batch, 3, 32, 32)  # the processor resizes to the encoder's own input size
        bare = best_time(lambda: encoder.embed(x), repeats=3) / args.batch
    print(f"model {args.model}, batch {args.batch}, device {args.device}, dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"save_embeds: {n} images in {wall:.2f} s = {n / wall:.1f} img/s (incl. reading and resizing PNGs)")
    print(f"bare encoder (processor + forward): {1 / bare:.1f} img/s")
    print(f"ratio (pipeline / bare): {(n / wall) * bare:.2f}")


if __name__ == "__main__":
    main()
