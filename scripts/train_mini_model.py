"""Train the offline demo's small Kandinsky-2.2-shaped model on scikit-learn's digits, on the CPU.

    python scripts/train_mini_model.py --config_path configs/mini/digits.yaml [key=value ...]

Stages (MoVQ, image encoder, UNet) are saved as they finish; a rerun skips finished stages (overwrite=true retrains).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from diffusion.cli import run  # noqa: E402
from diffusion.config import MiniConfig, stamp_run_dir  # noqa: E402


def main(cfg: MiniConfig) -> None:
    from diffusion.mini import train_mini_model

    stamp_run_dir(cfg, Path(cfg.output_dir) / "training_run")
    train_mini_model(cfg)


if __name__ == "__main__":
    run(MiniConfig, main, description=__doc__)
