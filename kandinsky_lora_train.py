"""LoRA domain tuning of the Kandinsky 2.2 decoder UNet (MoVQ and the image encoder stay frozen).

    python kandinsky_lora_train.py --config_path configs/lora/<dataset>.yaml [key=value ...]
    accelerate launch --num_processes N kandinsky_lora_train.py --config_path ...      (data-parallel on N GPUs)
    torchrun --nproc_per_node N kandinsky_lora_train.py --config_path ...             (also several CPU processes)

Writes output_dir/{config.yaml, run_info.json, checkpoint-<step>/, pytorch_lora_weights.safetensors, validation/};
resume_from_checkpoint=latest continues a stopped run. Edit with the adapter: lora.path=<output_dir> [lora.step=N].
"""

from diffusion.cli import run
from diffusion.config import LoraTrainConfig


def main(cfg: LoraTrainConfig) -> None:
    from diffusion.train.trainer import train_lora

    train_lora(cfg)


if __name__ == "__main__":
    run(LoraTrainConfig, main, description=__doc__,
        interrupted="the checkpoints already written are kept (no final adapter); rerun the same command with "
                    "resume_from_checkpoint=latest to continue")
