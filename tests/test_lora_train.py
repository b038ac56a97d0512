"""LoRA domain tuning (kandinsky_lora_train.py / diffusion.train.trainer) on a tiny random model, on the CPU.

Behaviour, not calls: the loss falls; a stopped and resumed run equals an uninterrupted one; pruning keeps exactly
the limit; the adapter loads with plain diffusers and through the editing path, reproducing the trained model; bad
input, a full disk and a stop signal give clear errors and never a half checkpoint; two processes train together.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datasets.folder import DatasetLayoutError
from diffusion.config import LoraTrainConfig, load_config
from diffusion.demo.tiny import make_tiny_model
from diffusion.errors import CheckpointError, ConfigError, RunInterrupted
from diffusion.lora import WEIGHTS_NAME, add_lora, load_lora, save_lora
from diffusion.models import load_decoder
from diffusion.train import checkpoints, trainer
from diffusion.train.checkpoints import list_checkpoints
from diffusion.train.data import BatchOrder
from diffusion.train.objective import diffusion_loss
from diffusion.train.trainer import train_lora

REPO = Path(__file__).resolve().parent.parent
# The recipe every resume comparison shares: accumulation and warmup make the optimizer/scheduler state matter.
RECIPE = ["gradient_accumulation_steps=2", "lr_warmup_steps=3", "learning_rate=5e-3", "checkpointing_steps=2"]


def _write_images(folder: Path, n: int, colour: tuple, seed: int) -> None:
    """n 24 px squares of ``colour`` at random places on a light background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((24, 24, 3), 235, np.uint8)
        y, x = rng.integers(0, 14, 2)
        img[y:y + 10, x:x + 10] = colour
        Image.fromarray(img).save(folder / f"{i:02d}.png")


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread for every test here (conftest)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A tiny random model with 32 px images and root/{train,test}/{a,b} (8 train, 2 test images per class)."""
    base = tmp_path_factory.mktemp("lora")
    model = make_tiny_model(base / "model", seed=0, sample_size=16)
    data = base / "data"
    for split, n in (("train", 8), ("test", 2)):
        _write_images(data / split / "a", n, (220, 40, 40), seed=len(split))
        _write_images(data / split / "b", n, (40, 60, 220), seed=len(split) + 1)
    return {"model": model, "data": data, "cache": base / "cache"}


def make_cfg(env: dict, out: Path, *overrides: str) -> LoraTrainConfig:
    """A validated config for the tiny model (through load_config, as the entry point does)."""
    return load_config(LoraTrainConfig, None, [
        f"output_dir={out}", f"model.decoder={env['model'] / 'decoder'}", f"model.prior={env['model'] / 'prior'}",
        "model.local_files_only=true", "model.device=cpu", f"data.root={env['data']}", "train_batch_size=4",
        f"cache_dir={env['cache']}", *overrides,
    ])


def adapter_tensors(folder: Path) -> dict:
    return load_file(str(folder / WEIGHTS_NAME))


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"LoRA weights differ by {worst}"


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """Six uninterrupted steps of RECIPE, keeping two checkpoints, with validation every 3 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = make_cfg(env, out, *RECIPE, "max_train_steps=6", "checkpoints_total_limit=2", "validation_steps=3",
                   "num_validation_images=2", "validation_inference_steps=4")
    return cfg, train_lora(cfg)


# --------------------------------------------------------------------------------------------------------------------
def test_loss_falls_over_30_seeded_steps(env, tmp_path):
    result = train_lora(make_cfg(env, tmp_path / "run", "max_train_steps=30", "checkpointing_steps=30",
                                 "learning_rate=1e-2"))
    losses = np.array(result.losses)
    assert len(losses) == 30 and np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < first - 0.05, f"loss did not fall clearly: first 5 steps {first:.4f}, last 5 {last:.4f}"
    assert (tmp_path / "run" / WEIGHTS_NAME).is_file()


def test_pruning_keeps_exactly_the_limit_and_validation_grids(reference):
    cfg, result = reference
    out = Path(cfg.output_dir)
    assert result.global_step == 6
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # 2 was written, then pruned
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".deleting"))]
    for step in (0, 3, 6):
        grid = Image.open(out / "validation" / f"step-{step:06d}.png")
        assert grid.size == (2 + 2 * 34, 2 + 2 * 34)  # rows originals / samples, 2 images of 32 px, 2 px gaps
    assert {"optimizer.safetensors", "training_state.json", "rng_state_0.safetensors", WEIGHTS_NAME} <= {
        p.name for p in (out / "checkpoint-6").iterdir()}
    assert_same_weights(adapter_tensors(out), adapter_tensors(out / "checkpoint-6"), tol=0)


def test_resume_equals_uninterrupted_run(env, tmp_path, reference):
    _, ref = reference
    out = tmp_path / "run"
    first = train_lora(make_cfg(env, out, *RECIPE, "max_train_steps=3"))
    assert first.global_step == 3 and [s for s, _ in list_checkpoints(out)] == [2, 3]
    second = train_lora(make_cfg(env, out, *RECIPE, "max_train_steps=6", "resume_from_checkpoint=latest"))
    assert second.resumed_from == out / "checkpoint-3" and len(second.losses) == 3
    assert_same_weights(adapter_tensors(out), adapter_tensors(ref.output_dir))
    np.testing.assert_allclose(second.losses, ref.losses[3:], rtol=1e-5)
    # every run on this model and data shared one cache entry per kind
    assert len(list(env["cache"].glob("latents-*.safetensors"))) == 1
    assert len(list(env["cache"].glob("embeds-*.safetensors"))) == 1


def test_resume_with_flip_augmentation_equals_uninterrupted_run(env, tmp_path):
    flip = ["augment_flip=true", *RECIPE]
    whole = train_lora(make_cfg(env, tmp_path / "whole", *flip, "max_train_steps=4"))
    train_lora(make_cfg(env, tmp_path / "split", *flip, "max_train_steps=2"))
    resumed = train_lora(make_cfg(env, tmp_path / "split", *flip, "max_train_steps=4", "resume_from_checkpoint=latest"))
    assert resumed.global_step == 4
    assert_same_weights(adapter_tensors(tmp_path / "split"), adapter_tensors(whole.output_dir))
    assert len(list(env["cache"].glob("embeds_flip-*.safetensors"))) == 1  # flips: embeddings cached, latents live


def test_adapter_loads_with_diffusers_and_through_the_editing_path(env, reference):
    cfg, result = reference
    out = Path(cfg.output_dir)
    w = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    e = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    # plain diffusers, as the issue promises
    plain = load_decoder(cfg.model)
    before = plain.eps(w, t, e).detach()
    plain.unet.load_lora_adapter(str(out), prefix=None, use_safetensors=True)
    after = plain.eps(w, t, e).detach()
    assert float((after - before).abs().max()) > 1e-4  # the adapter changes the output
    # the editing path (edit config lora.path / lora.step) reproduces the in-memory trained model
    with torch.no_grad():
        trained = result.decoder.eps(w, t, e)
        for step in (None, 6):
            fresh = load_decoder(cfg.model)
            load_lora(fresh.unet, out, step=step)
            torch.testing.assert_close(fresh.eps(w, t, e), trained, atol=1e-6, rtol=0)
    torch.testing.assert_close(after, trained, atol=1e-6, rtol=0)


def test_adapter_that_does_not_fit_is_a_clear_error(env, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(env["model"] / "decoder" / "unet"),
                                              "block_out_channels": (64, 128)})
    add_lora(other, 4, 8, ["to_q", "to_k"])
    save_lora(other, tmp_path / "wider")
    model_cfg = make_cfg(env, tmp_path / "x").model
    with pytest.raises(ConfigError, match="does not fit"):
        load_lora(load_decoder(model_cfg).unet, tmp_path / "wider")
    # tensors for layers this UNet lacks: diffusers would only warn and load the rest
    decoder = load_decoder(model_cfg)
    add_lora(decoder.unet, 4, 8, ["to_q"])
    state = {k: v.clone() for k, v in load_file(str(save_lora(decoder.unet, tmp_path / "own"))).items()}
    state.update({k.replace("down_blocks.1", "down_blocks.7"): v.clone() for k, v in state.items()})
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "own" / WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    (tmp_path / "extra").mkdir()
    save_file(state, str(tmp_path / "extra" / WEIGHTS_NAME), metadata=metadata)
    with pytest.raises(ConfigError, match="does not have"):
        load_lora(load_decoder(model_cfg).unet, tmp_path / "extra")
    with pytest.raises(ConfigError, match="match no layer"):
        add_lora(load_decoder(model_cfg).unet, 4, 8, ["to_q", "to_qq"])


def test_bad_input_gives_clear_errors(env, tmp_path, reference):
    with pytest.raises(ConfigError, match="only 16 training images"):
        train_lora(make_cfg(env, tmp_path / "a", "train_batch_size=32"))
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        train_lora(make_cfg(env, tmp_path / "b", f"data.root={tmp_path / 'missing'}"))
    with pytest.raises(ConfigError, match="does not exist"):
        train_lora(make_cfg(env, tmp_path / "c", f"resume_from_checkpoint={tmp_path / 'nowhere'}"))
    cfg, _ = reference  # a fresh run into a folder with checkpoints would overwrite them
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_lora(make_cfg(env, Path(cfg.output_dir), *RECIPE, "max_train_steps=6"))
    with pytest.raises(ConfigError, match="other values of .*learning_rate"):  # resuming another recipe
        train_lora(make_cfg(env, tmp_path / "d", "learning_rate=1e-3",
                            f"resume_from_checkpoint={Path(cfg.output_dir) / 'checkpoint-6'}"))
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            train_lora(make_cfg(env, tmp_path / "e", "report_to=tensorboard"))
    assert not any((tmp_path / d).exists() for d in "abcde")  # every check comes before anything is written


def test_full_disk_leaves_no_half_checkpoint_and_loses_nothing(env, tmp_path, monkeypatch, reference):
    _, ref = reference
    out = tmp_path / "run"
    real_save = checkpoints.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "checkpoint-4.tmp" in str(path) and path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", save_file)
    with pytest.raises(CheckpointError, match="No space left on device.*intact \\(checkpoint-2\\)"):
        train_lora(make_cfg(env, out, *RECIPE, "max_train_steps=4"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.setattr(checkpoints, "save_file", real_save)
    train_lora(make_cfg(env, out, *RECIPE, "max_train_steps=4", "resume_from_checkpoint=latest"))
    assert_same_weights(adapter_tensors(out), adapter_tensors(ref.output_dir / "checkpoint-4"))


def test_stop_signal_checkpoints_then_resume_continues(env, tmp_path, monkeypatch, reference):
    _, ref = reference
    out = tmp_path / "run"
    calls = {"n": 0}
    real_loss = trainer.diffusion_loss

    def loss_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # during step 1 (micro-steps 0, 1 form step 1 with accumulation 2)
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "diffusion_loss", loss_then_interrupt)
    with pytest.raises(RunInterrupted, match="stopped at step 1 of 4.*checkpoint-1.*final adapter was not written"):
        train_lora(make_cfg(env, out, *RECIPE, "max_train_steps=4"))
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert not (out / WEIGHTS_NAME).exists()  # a partial run never writes the final adapter
    monkeypatch.setattr(trainer, "diffusion_loss", real_loss)
    train_lora(make_cfg(env, out, *RECIPE, "max_train_steps=4", "resume_from_checkpoint=latest"))
    assert_same_weights(adapter_tensors(out), adapter_tensors(ref.output_dir / "checkpoint-4"))


def test_holdout_leaves_calibrates_images_out_and_calibrate_reads_the_run(env, tmp_path, reference, caplog):
    """holdout_per_class keeps scripts/calibrate.py's validation images (same count and seed) out of the LoRA's
    training data; calibrate reads the run's config.yaml to say whether its images were unseen by the adapter."""
    import logging

    from diffusion.config import EditConfig, LoraRef, ModelConfig
    from diffusion.edit.calibrate import validation_seen

    out = tmp_path / "held"
    with caplog.at_level(logging.INFO, logger="diffusion.train.trainer"):
        train_lora(make_cfg(env, out, "max_train_steps=1", "holdout_per_class=3", "holdout_seed=1"))
    assert "6 train images held out for scripts/calibrate.py (holdout_per_class 3, seed 1)" in caplog.text
    with pytest.raises(ConfigError, match="only 10 training images"):  # 16 - 6: the held-out images are gone
        train_lora(make_cfg(env, tmp_path / "few", "holdout_per_class=3", "train_batch_size=12"))

    def seen(lora_path, per_class, seed):
        cfg = EditConfig(output_dir=str(tmp_path / "edit"), search="fixed", lora=LoraRef(path=str(lora_path)),
                         model=ModelConfig(decoder=str(env["model"] / "decoder"), prior=str(env["model"] / "prior")))
        return validation_seen(cfg, ["a", "b"], per_class, seed)

    assert "held out of the training of the LoRA adapter" in seen(out, 3, 1)
    assert "held out of the training of the LoRA adapter" in seen(out, 2, 1)  # fewer images: the same draw's first
    for per_class, seed in ((4, 1), (3, 0)):
        assert "did not hold these validation images out" in seen(out, per_class, seed)
    ref_cfg, _ = reference  # trained on every image
    assert "LoRA adapter" in seen(ref_cfg.output_dir, 1, 0) and "did not hold" in seen(ref_cfg.output_dir, 1, 0)
    assert "did not hold" in seen(Path(ref_cfg.output_dir) / "checkpoint-6", 1, 0)  # the stamp one folder up
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.yaml").write_text("holdout_per_class: [unclosed\n")
    assert "did not hold" in seen(damaged, 1, 0)  # an unreadable record proves nothing
    assert "which has no config.yaml" in seen(tmp_path / "nowhere", 1, 0)


def test_gradient_checkpointing_really_applies(env):
    """Same LoRA gradients, and the checkpointed blocks run their forward again during backward."""
    cfg = make_cfg(env, Path("unused"))
    grads, forwards = [], []
    for checkpointing in (False, True):
        decoder = load_decoder(cfg.model)
        torch.manual_seed(0)
        add_lora(decoder.unet, 4, 8, cfg.target_modules)
        if checkpointing:
            decoder.unet.enable_gradient_checkpointing()
        decoder.unet.train()
        count = {"n": 0}
        # a pre-hook: non-reentrant checkpointing stops the recomputation early, before any post-forward hook
        resnet = decoder.unet.up_blocks[0].resnets[0]
        resnet.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
        w0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        e = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
        loss = diffusion_loss(decoder.unet, decoder.scheduler, w0, e, torch.Generator().manual_seed(2), 4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in decoder.unet.named_parameters() if p.requires_grad})
        forwards.append(count["n"])
    assert forwards == [1, 2]
    # B starts at zero (so A's gradient is zero at the first step); every B gets a gradient through the checkpoints
    assert all(float(g.abs().sum()) > 0 for n, g in grads[1].items() if "lora_B" in n)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_batch_order_is_a_seeded_permutation_per_epoch_whatever_the_process_split():
    one = BatchOrder(10, 4, num_processes=1, rank=0, seed=3)
    stream = [i for m in range(5) for i in one.indices(m)]  # 20 samples = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation each epoch
    two = [BatchOrder(10, 2, num_processes=2, rank=r, seed=3) for r in (0, 1)]
    split = [i for m in range(5) for r in (0, 1) for i in two[r].indices(m)]
    assert split == stream  # a global batch does not depend on how it is split across processes
    assert BatchOrder(10, 4, 1, 0, seed=4).indices(0) != one.indices(0)


def test_configs_hold_the_paper_recipe():
    for name in ("butterfly", "kermany", "afhq", "kikibouba", "mad_sane", "celebahq"):
        cfg = load_config(LoraTrainConfig, str(REPO / "configs" / "lora" / f"{name}.yaml"))
        assert (cfg.model.image_size, cfg.train_batch_size, cfg.max_train_steps, cfg.checkpointing_steps) == (
            512, 32, 2000, 100)
        assert (cfg.rank, cfg.alpha, cfg.learning_rate, cfg.lr_warmup_steps, cfg.augment_flip) == (4, 8.0, 4.3e-4, 0,
                                                                                                   False)
        assert cfg.data.name == name and cfg.data.root == f"data/{name}"
    demo = load_config(LoraTrainConfig, str(REPO / "configs" / "lora" / "demo.yaml"))
    assert demo.model.decoder == "assets/mini_digits/decoder" and demo.output_dir == "outputs/demo/lora"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_together(env, tmp_path):
    """Subprocess, ~20-40 s: torchrun starts 2 gloo processes; they share the cache work and write one checkpoint
    with each process's RNG state."""
    out = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(
        f"output_dir: {out}\nmodel: {{decoder: {env['model'] / 'decoder'}, prior: {env['model'] / 'prior'}, "
        f"local_files_only: true, device: cpu}}\ndata: {{root: {env['data']}}}\n"
        f"train_batch_size: 2\nmax_train_steps: 2\ncheckpointing_steps: 2\ncache_dir: {tmp_path / 'cache'}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "kandinsky_lora_train.py", "--config_path", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    files = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", WEIGHTS_NAME} <= files
    assert (out / WEIGHTS_NAME).is_file()
