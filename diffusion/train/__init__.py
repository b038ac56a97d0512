"""LoRA domain tuning of the decoder UNet (kandinsky_lora_train.py).

Modules: ``objective`` (the epsilon loss), ``data`` (seeds, the data order, batches from the feature cache or the
images), ``cache`` (MoVQ latents + CLIP embeddings computed once), ``checkpoints`` (write, prune, resume),
``validation`` (held-out images regenerated from noise), ``trainer`` (the run: setup, resume, steps, checkpoints).
"""
