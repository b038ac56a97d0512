"""Precompute the CLIP image embeddings of every train image, one safetensors file per class.

    python scripts/save_embeds.py --config_path configs/embeds/<dataset>.yaml [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from diffusion.cli import run  # noqa: E402
from diffusion.config import EmbedsConfig, stamp_run_dir  # noqa: E402


def main(cfg: EmbedsConfig) -> None:
    from diffusion.precompute import save_embeddings

    stamp_run_dir(cfg)
    save_embeddings(cfg)


if __name__ == "__main__":
    run(EmbedsConfig, main, description=__doc__)
