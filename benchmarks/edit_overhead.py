"""Edit overhead: wall time per image of the editing run divided by (its UNet evaluations x the bare UNet forward
time per evaluation at the same batch size). 1.0 would mean the run does nothing but UNet calls.

    python benchmarks/edit_overhead.py [--model DIR] [--images 16] [--steps 50] [--batch 1 8]
    python benchmarks/edit_overhead.py --decoder kandinsky-community/kandinsky-2-2-decoder \
        --prior kandinsky-community/kandinsky-2-2-prior --device cuda --dtype bfloat16     (on a GPU)

The run edits digits (resized to the model's own size) with `search: fixed` at t_skip 0.5, so every image costs the
same number of UNet evaluations and no oracle is needed.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from _common import REPO, best_time, default_model
from diffusion.config import EditConfig, load_config
from diffusion.edit.run import run_edits
from diffusion.models import load_decoder


def bare_eval_seconds(cfg: EditConfig, batch: int) -> float:
    """Seconds per UNet evaluation when the UNet runs ``batch`` latents per call (guided sampling: 2 per row)."""
    decoder = load_decoder(cfg.model)
    c = decoder.latent_channels
    s = decoder.latent_size
    d = decoder.unet.config.encoder_hid_dim
    w = torch.randn(batch, c, s, s, device=decoder.device)
    e = torch.randn(batch, d, device=decoder.device)
    t = torch.full((batch,), 500, device=decoder.device)
    with torch.inference_mode():
        return best_time(lambda: decoder.eps(w, t, e), repeats=5) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model()))
    parser.add_argument("--images", type=int, default=16, help="images per class and direction")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decoder", help="decoder folder or hub id (default: MODEL/decoder)")
    parser.add_argument("--prior", help="prior folder or hub id (default: MODEL/prior)")
    parser.add_argument("--device", default="cpu", help="model.device: cpu, cuda, auto, ...")
    parser.add_argument("--dtype", default="auto", help="model.dtype: auto, float32, bfloat16, float16")
    args = parser.parse_args()
    decoder_src = args.decoder or f"{args.model}/decoder"
    prior_src = args.prior or f"{args.model}/prior"
    logging.basicConfig(level=logging.WARNING)
    print(f"model {decoder_src}, device {args.device}, dtype {args.dtype}, T={args.steps}, "
          f"torch threads {torch.get_num_threads()}")
    print("| batch | images | UNet evals/image | s/image | bare s/eval | overhead |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        with tempfile.TemporaryDirectory() as tmp:
            def config(out: str, per_class: int) -> EditConfig:
                return load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), [
                    f"output_dir={out}", f"embeds_dir={tmp}/embeds", f"data.root={tmp}/digits",
                    f"model.decoder={decoder_src}", f"model.prior={prior_src}", f"model.device={args.device}",
                    f"model.dtype={args.dtype}", f"model.local_files_only={args.decoder is None}",
                    f"data.num_samples={per_class}", f"num_inference_steps={args.steps}", "search=fixed",
                    "t_skip=0.5", f"batch_size={batch}", "views.enabled=false", "lpips=false", "oracle_dir=null",
                    "compute_missing_embeds=true",
                ])

            run_edits(config(f"{tmp}/warm", 1))  # embeddings, data export, first-call costs: not per-image costs
            cfg = config(f"{tmp}/run", args.images // 2)
            start = time.perf_counter()
            summary = run_edits(cfg)
            wall = time.perf_counter() - start
            per_image = summary["seconds_per_image"]
            evals = summary["unet_evals_per_image"]
            bare = bare_eval_seconds(cfg, 2 * batch)
            print(f"| {batch} | {summary['n_images']} | {evals:.0f} | {per_image:.3f} | {bare * 1e3:.2f} ms "
                  f"| {per_image / (evals * bare):.3f} |")
            print(f"  (whole run incl. model loading: {wall:.1f} s)")


if __name__ == "__main__":
    main()
