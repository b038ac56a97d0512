"""Write a few-MB randomly initialised model with the Kandinsky 2.2 classes and folder layout (its images are noise).

    python scripts/make_tiny_model.py [OUT_DIR] [--seed N]     (default OUT_DIR: outputs/tiny_model)

Point model.decoder at OUT_DIR/decoder and model.prior at OUT_DIR/prior.
"""

import argparse


from diffusion.demo.tiny import make_tiny_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="outputs/tiny_model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_tiny_model(args.out_dir, seed=args.seed)
    print(f"tiny model written to {out} (decoder: {out / 'decoder'}, prior: {out / 'prior'})")
