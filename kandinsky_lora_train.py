"""LoRA domain tuning of the Kandinsky 2.2 decoder UNet (MoVQ and the image encoder stay frozen).

    python kandinsky_lora_train.py --config_path configs/lora/<dataset>.yaml [key=value ...]
    accelerate launch --num_processes N kandinsky_lora_train.py --config_path ...
"""

from diffusion.cli import run
from diffusion.config import LoraTrainConfig


def main(cfg: LoraTrainConfig) -> None:
    raise SystemExit("kandinsky_lora_train.py: training is not implemented yet (see the domain-tuning issue); "
                     "the config parsed and validated fine.")


if __name__ == "__main__":
    run(LoraTrainConfig, main, description=__doc__)
