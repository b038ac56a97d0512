"""Peak memory (max RSS) of each entry point on the demo configs, against the size of the model weights it loads
and against the bare interpreter with torch/diffusers/transformers imported.

    python benchmarks/peak_memory.py [--model DIR]
    python benchmarks/peak_memory.py --full_size DIR [--image_size 512]

--full_size measures the editing run on a model with the full Kandinsky 2.2 architecture (the published UNet, MoVQ
and ViT-bigG/14 configs of benchmarks/gpu_estimate.py, 3.2 B parameters) and random bf16 weights, written to DIR on
first use (6.3 GB), so the weights dominate the import cost as they do on a GPU: kandinsky_eval with model.dtype
bfloat16, `search: fixed` (t_skip 0.7, T 10: no oracle needed), two images at the model's 512 px, and
kandinsky_lora_train for two bf16-autocast steps of batch 2, on a few generated images. About three minutes on a
2-core CPU with AMX-bf16 (plus a minute to write the model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, default_model, weights_bytes


def peak_rss_mb(cmd: list) -> float:
    """Max RSS (MB) of one child process tree run to completion (each measurement in its own wrapper process)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def write_full_size_model(out: Path) -> None:
    """Random Kandinsky 2.2-shaped decoder/ and prior/ in ``out``, bf16 safetensors."""
    import torch
    from gpu_estimate import build
    from transformers import CLIPImageProcessor

    from diffusion.demo.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, kandinsky_scheduler

    unet, movq, clip = build(None, None, device="cpu")
    for name, m in (("decoder/unet", unet), ("decoder/movq", movq), ("prior/image_encoder", clip)):
        m.to(torch.bfloat16).save_pretrained(out / name)
        del m
    kandinsky_scheduler().save_pretrained(out / "decoder" / "scheduler")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(out / "prior" /
                                                                                               "image_processor")


def write_digit_folder(root: Path) -> None:
    """root/{train,test}/{3,8}: two train and one test digit per class, as PNG (the loader resizes them)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for cls in (3, 8):
        idx = np.flatnonzero(d.target == cls)
        for split, picks in (("train", idx[:2]), ("test", idx[2:3])):
            (root / split / str(cls)).mkdir(parents=True, exist_ok=True)
            for i in picks:
                Image.fromarray((255 - d.images[i] * 255 / 16).astype("uint8")).save(root / split / str(cls) /
                                                                                     f"{i}.png")


def full_size(folder: str, image_size: int) -> None:
    out = Path(folder)
    if not (out / "prior" / "image_processor").is_dir():
        print(f"writing a random full-size Kandinsky 2.2-shaped model to {out} (once) ...", flush=True)
        write_full_size_model(out)
    weights = weights_bytes(out) / 2**20
    base = peak_rss_mb([sys.executable, "-c", "import torch, diffusers, transformers, accelerate, peft"])
    with tempfile.TemporaryDirectory() as tmp:
        write_digit_folder(Path(tmp) / "data")
        common = [f"model.decoder={out}/decoder", f"model.prior={out}/prior", f"model.image_size={image_size}",
                  "data.name=folder", f"data.root={tmp}/data"]
        runs = {
            "kandinsky_eval (bf16, search fixed, T 10, batch 2)": [
                sys.executable, "kandinsky_eval.py", "--config_path", "configs/edit/demo.yaml", *common,
                "model.dtype=bfloat16", "data.num_samples=1", "search=fixed", "t_skip=0.7", "num_inference_steps=10",
                "oracle_dir=null", "views.enabled=false", "batch_size=2", f"output_dir={tmp}/edit",
                f"embeds_dir={tmp}/embeds"],
            "kandinsky_lora_train (bf16 autocast, batch 2, 2 steps)": [
                sys.executable, "kandinsky_lora_train.py", "--config_path", "configs/lora/demo.yaml", *common,
                "mixed_precision=bf16", "train_batch_size=2", "max_train_steps=2", "checkpointing_steps=2",
                "validation_steps=null", f"output_dir={tmp}/lora"],
        }
        peaks = {name: peak_rss_mb(cmd) for name, cmd in runs.items()}
        summary = json.loads((Path(tmp) / "edit" / "summary.json").read_text())
    print(f"the editing run edited {summary['n_rows']} images, {summary['unet_evals_per_image']:.0f} UNet evaluations "
          f"and {summary['seconds_per_image']:.1f} s per image")
    print(f"full-size Kandinsky 2.2 architecture, random bf16 weights: {weights:.0f} MB on disk; {image_size} px; "
          f"import baseline {base:.0f} MB")
    print("| entry point | peak RSS | above import baseline | above baseline / weights | target 1.5 x weights + 300 MB |")
    print("| --- | --- | --- | --- | --- |")
    for name, peak in peaks.items():
        print(f"| {name} | {peak:.0f} MB | {peak - base:.0f} MB | {(peak - base) / weights:.2f} | "
              f"{1.5 * weights + 300:.0f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model()))
    parser.add_argument("--full_size", metavar="DIR", help="measure on a random full-size Kandinsky 2.2 in DIR")
    parser.add_argument("--image_size", type=int, default=512, help="with --full_size: the pixel size")
    args = parser.parse_args()
    if args.full_size:
        return full_size(args.full_size, args.image_size)
    weights = weights_bytes(args.model) / 2**20
    base = peak_rss_mb([sys.executable, "-c", "import torch, diffusers, transformers, accelerate, peft"])
    with tempfile.TemporaryDirectory() as tmp:
        model = [f"model.decoder={args.model}/decoder", f"model.prior={args.model}/prior"]
        runs = {
            "save_embeds": [sys.executable, "scripts/save_embeds.py", "--config_path", "configs/embeds/demo.yaml",
                            f"output_dir={tmp}/embeds", f"data.root={tmp}/digits", *model],
            "kandinsky_eval (demo)": [sys.executable, "kandinsky_eval.py", "--config_path", "configs/edit/demo.yaml",
                                      f"output_dir={tmp}/edit", f"embeds_dir={tmp}/embeds", f"data.root={tmp}/digits",
                                      *model],
            "kandinsky_lora_train (demo)": [sys.executable, "kandinsky_lora_train.py", "--config_path",
                                            "configs/lora/demo.yaml", f"output_dir={tmp}/lora",
                                            f"data.root={tmp}/digits", *model],
        }
        print(f"model {args.model}: weights {weights:.1f} MB on disk; "
              f"python + torch/diffusers/transformers/accelerate/peft imported: {base:.0f} MB")
        print("| entry point | peak RSS | above import baseline | target 1.5 x weights + 300 MB |")
        print("| --- | --- | --- | --- |")
        for name, cmd in runs.items():
            peak = peak_rss_mb(cmd)
            print(f"| {name} | {peak:.0f} MB | {peak - base:.0f} MB | {1.5 * weights + 300:.0f} MB |")


if __name__ == "__main__":
    main()
