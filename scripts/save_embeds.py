"""Precompute the CLIP image embeddings of every train image, one safetensors file per class.

    python scripts/save_embeds.py --config_path configs/embeds/<dataset>.yaml [key=value ...]

Writes output_dir/<class>.safetensors + <class>.json (the image list); a rerun skips complete classes (checked
against their files) and resumes an interrupted one.
"""

from diffusion.cli import run
from diffusion.config import EmbedsConfig


def main(cfg: EmbedsConfig) -> None:
    from diffusion.precompute import save_embeddings

    save_embeddings(cfg, stamp=True)


if __name__ == "__main__":
    run(EmbedsConfig, main, description=__doc__,
        interrupted="the classes already written are kept; rerun the same command to embed the rest")
