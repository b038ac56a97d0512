"""DIFFusion as a library, on the shipped demo model, offline (about 20 s on 2 CPU cores):

    python docs/example_api.py [--out outputs/api_example]

1. load the pipeline; 2. class means of handwritten 3s and 8s from a few train images; 3. invert two test 3s
once; 4. edit them at two etas and two t_skips in one call; 5. save the inversion and edit it again later; 6. let an
oracle choose each image's t_skip while an independent judge scores the result. Writes PNGs into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datasets.digits import export_digits
from diffusion import DIFFusionPipeline, load_oracle

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/api_example")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. the decoder (UNet, MoVQ, scheduler) and the prior's image encoder, from folders or hub ids
    demo = REPO / "assets" / "mini_digits"
    pipe = DIFFusionPipeline.from_pretrained(decoder=str(demo / "decoder"), prior=str(demo / "prior"), device="cpu",
                                             local_files_only=True)

    # 2. the direction from "3" to "8": class means of CLIP embeddings (images, embeddings or an embeds_dir work)
    digits = export_digits("outputs/data/digits")  # scikit-learn's digits as PNG folders (offline, once)
    train = {d: sorted((digits / "train" / d).glob("*.png"))[:60] for d in ("3", "8")}
    direction = pipe.class_direction(train["3"], train["8"], names=("3", "8"))

    # 3. edit-friendly inversion, once per image; the noise maps are computed lazily, as deep as edits need
    threes = sorted((digits / "test" / "3").glob("*.png"))[:2]
    inv = pipe.invert(threes, num_inference_steps=100, generator=torch.Generator().manual_seed(0))

    # 4. every (image, eta, t_skip) in one batched call; t_skip is the fraction of steps skipped (1 = no edit)
    result = pipe(inv, direction, eta=[1.0, 1.5], t_skip=[0.95, 0.9], guidance_scale=2.0)
    for edit, image in zip(result.edits, result.images):
        image.save(out / f"image{edit.image}_eta{edit.eta:g}_t{edit.t_skip:g}.png")
        print(f"image {edit.image}, eta {edit.eta:g}, t_skip {edit.t_skip:g}: {edit.unet_evals} UNet evaluations")

    # 5. the inversion (with what is computed so far) is one safetensors file
    path = inv.save(out / "inversion.safetensors")
    again = pipe(pipe.load_inversion(path), direction, eta=1.0, t_skip=0.9, guidance_scale=2.0)
    print(f"reloaded {path.name}: {len(again.images)} more edit(s), no inversion step recomputed")

    # 6. the oracle picks each image's t_skip (mildest first); the judge, which the search never sees, scores it
    oracle = load_oracle(REPO / "assets" / "mini_digits_oracle")
    judge_dir = REPO / "assets" / "mini_digits_judge"
    judge = load_oracle(judge_dir) if judge_dir.is_dir() else None
    searched = pipe(inv, direction, eta=1.0, t_skip=[0.99, 0.97, 0.95, 0.9, 0.8, 0.7], guidance_scale=2.0,
                    search="first_flip", oracle=oracle, judge=judge)
    for edit, image in zip(searched.edits, searched.images):
        image.save(out / f"image{edit.image}_searched.png")
        judged = f", judge p(8) {edit.judge_probs['8']:.2f}" if edit.judge_probs else ""
        print(f"image {edit.image}: t_skip {edit.t_skip:g} chosen, oracle p(8) {edit.probs['8']:.2f}{judged}")
    print(f"pictures in {out}")


if __name__ == "__main__":
    main()
