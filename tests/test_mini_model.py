"""The offline demo model's trainer (scripts/train_mini_model.py) on a micro budget: the stages, the UNet stage's
augmentation, resuming a finished stage, and a folder the pipeline loads."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch


def test_affine_identity_quarter_turn_and_white_background():
    from diffusion.demo.mini import _affine, _random_affine

    x = torch.rand(2, 3, 8, 8)
    one, zero = torch.ones(2), torch.zeros(2)
    assert torch.allclose(_affine(x, one, torch.zeros(2, 2), zero), x, atol=1e-5)
    turned = _affine(x, one, torch.zeros(2, 2), torch.full((2,), 90.0))
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, -1))
    # a half-width shift moves the content by a quarter of the image and fills the gap with white
    moved = _affine(x, one, torch.tensor([[0.5, 0.0]] * 2), zero)
    assert torch.allclose(moved[..., -2:], torch.ones_like(moved[..., -2:]))
    assert torch.allclose(moved[..., :6], x[..., 2:], atol=1e-5)
    # zero ranges leave the images as they are; a rotation range changes every image and stays in [0, 1]
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(_random_affine(x, gen, shift=0.0, scale=(1.0, 1.0)), x, atol=1e-5)
    rotated = _random_affine(x, gen, shift=0.0, scale=(1.0, 1.0), rotate=30.0)
    assert all(not torch.allclose(rotated[k], x[k], atol=1e-3) for k in range(2))
    assert float(rotated.min()) >= 0.0 and float(rotated.max()) <= 1.0 + 1e-6


@pytest.mark.usefixtures("one_thread_module")
def test_micro_mini_model_trains_augmented_and_loads(tmp_path):
    from diffusion.config import DataConfig, MiniConfig
    from diffusion.demo.mini import train_mini_model
    from diffusion.errors import ArtefactError, ConfigError
    from diffusion.pipeline import DIFFusionPipeline

    out = tmp_path / "mini"
    cfg = MiniConfig(output_dir=str(out), data=DataConfig(name="digits", root=str(tmp_path / "digits")),
                     movq_steps=2, encoder_hidden=32, encoder_layers=1, encoder_steps=2,
                     embed_dim=16, unet_channels=[32, 32], unet_steps=3, batch_size=8, unet_shift=0.08,
                     unet_scale=0.1, unet_rotate=10)
    report = train_mini_model(cfg)
    assert {"movq", "encoder", "unet"} <= set(report)
    assert report["unet"]["steps"] == 3 and report["config"]["unet_rotate"] == 10
    assert json.loads((out / "training_report.json").read_text())["unet"]["steps"] == 3
    for part in ("decoder/movq", "decoder/unet", "decoder/scheduler", "prior/image_encoder", "prior/image_processor"):
        assert (out / part).is_dir(), part

    # a rerun skips the finished stages: the UNet's weights are not touched
    unet_file = next((out / "decoder" / "unet").glob("*.safetensors"))
    before = unet_file.read_bytes()
    train_mini_model(cfg)
    assert unet_file.read_bytes() == before

    # a rerun that would keep a finished stage trained with other values of its keys is refused before training,
    # naming the stage and the key; a key of a stage that is missing (so trained now) is fine
    with pytest.raises(ConfigError, match=r"decoder/unet was trained with other settings.*unet_ema_decay=0\.5 "
                                          r"\(trained with 0\.0\)"):
        train_mini_model(dataclasses.replace(cfg, unet_ema_decay=0.5))
    with pytest.raises(ConfigError, match=r"decoder/movq was trained .*movq_lr"):
        train_mini_model(dataclasses.replace(cfg, movq_lr=0.5))
    assert unet_file.read_bytes() == before
    report_file = out / "training_report.json"
    good_report = report_file.read_text()
    report_file.write_text("{not json")
    with pytest.raises(ArtefactError, match="training_report.json: damaged"):
        train_mini_model(cfg)
    old_report = json.loads(good_report)  # written before unet_ema_decay existed: the message says so
    del old_report["config"]["unet_ema_decay"]
    report_file.write_text(json.dumps(old_report))
    with pytest.raises(ConfigError, match=r"unet_ema_decay=0\.5 \(the report does not record it\)"):
        train_mini_model(dataclasses.replace(cfg, unet_ema_decay=0.5))
    report_file.write_text(good_report)

    pipe = DIFFusionPipeline.from_pretrained(str(out / "decoder"), str(out / "prior"), device="cpu")
    x = torch.rand(2, 3, pipe.image_size, pipe.image_size)
    e = pipe.embed(x)
    assert e.shape == (2, 16) and torch.isfinite(e).all()


@pytest.mark.parametrize("override, key", [({"movq_channels": 16}, "movq_channels"),
                                           ({"unet_channels": [64, 100]}, "unet_channels"),
                                           ({"unet_channels": [64]}, "unet_channels"),
                                           ({"encoder_patch": 5}, "encoder_patch"),
                                           ({"unet_rotate": -1.0}, "unet_rotate"),
                                           ({"unet_shift": 1.0}, "unet_shift"),
                                           ({"unet_ema_decay": 1.0}, "unet_ema_decay")])
def test_mini_config_refuses_shapes_the_blocks_cannot_take(override, key):
    from diffusion.config import MiniConfig
    from diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        MiniConfig(output_dir="x", **override)


@pytest.mark.usefixtures("one_thread_module")
def test_unet_ema_saves_an_average_of_the_iterates_and_leaves_the_trajectory_alone():
    from diffusion.config import MiniConfig
    from diffusion.demo.mini import train_unet

    w0, e = torch.randn(4, 4, 2, 2), torch.randn(4, 16)

    def run(steps, ema_decay):
        torch.manual_seed(0)  # the UNet's initial weights
        cfg = MiniConfig(output_dir="x", image_size=8, embed_dim=16, unet_channels=[32, 32], unet_steps=steps,
                         batch_size=4, unet_ema_decay=ema_decay)
        unet, stats = train_unet(cfg, lambda idx: (w0[idx], e[idx]), 4, torch.zeros(1, 16),
                                 torch.Generator().manual_seed(1))
        return torch.cat([p.detach().flatten() for p in unet.parameters()]), stats

    p1, _ = run(1, 0.0)
    p2, plain = run(2, 0.0)
    averaged, stats = run(2, 0.999)
    assert "ema_decay" not in plain and stats["ema_decay"] == 0.999
    assert stats["loss_first"] == plain["loss_first"]  # the EMA draws nothing and changes no step
    # what is saved is not the last iterate but a weighted mean of the two, weight on both
    assert not torch.allclose(averaged, p2) and not torch.allclose(averaged, p1)
    lo, hi = torch.minimum(p1, p2), torch.maximum(p1, p2)
    assert bool(((averaged >= lo - 1e-6) & (averaged <= hi + 1e-6)).all())


@pytest.mark.usefixtures("one_thread_module")
def test_a_missing_stage_is_trained_with_the_new_values_and_the_report_says_so(tmp_path):
    from diffusion.config import DataConfig, MiniConfig
    from diffusion.demo.mini import train_mini_model

    out = tmp_path / "mini"
    cfg = MiniConfig(output_dir=str(out), data=DataConfig(name="digits", root=str(tmp_path / "digits")),
                     movq_steps=1, encoder_hidden=32, encoder_layers=1, encoder_steps=1, embed_dim=16,
                     unet_channels=[32, 32], unet_steps=1, batch_size=4)
    train_mini_model(cfg)
    movq_file = next((out / "decoder" / "movq").glob("*.safetensors"))
    movq_before = movq_file.read_bytes()
    shutil.rmtree(out / "decoder" / "unet")  # only the UNet is retrained, with its new values
    report = train_mini_model(dataclasses.replace(cfg, unet_steps=2, unet_ema_decay=0.9))
    assert report["unet"]["steps"] == 2 and report["unet"]["ema_decay"] == 0.9
    assert report["config"]["unet_ema_decay"] == 0.9 and movq_file.read_bytes() == movq_before


def test_the_shipped_model_was_trained_with_the_model_cards_config():
    """The model card's command must rerun on the shipped folder (every stage kept): its run stamp and its training
    report record the config that configs/mini/digits.yaml gives."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from diffusion.config import MiniConfig, config_dict, load_config, result_keys_changed
    from diffusion.demo.mini import report_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(MiniConfig, str(repo / "configs" / "mini" / "digits.yaml"), ["num_threads=2"])
    folder = repo / cfg.output_dir
    stamp = OmegaConf.to_container(OmegaConf.load(folder / "training_run" / "config.yaml"))
    assert result_keys_changed(MiniConfig, stamp, config_dict(cfg)) == []
    report = json.loads((folder / "training_report.json").read_text())
    assert [k for k in result_keys_changed(MiniConfig, report["config"], report_config(cfg)) if k != "data.root"] == []
    assert report["unet"]["steps"] == cfg.unet_steps and report["unet"].get("ema_decay", 0.0) == cfg.unet_ema_decay


def test_every_training_key_belongs_to_a_stage():
    """A MiniConfig key left out of the stage table would never be checked on a rerun."""
    from diffusion.config import MiniConfig
    from diffusion.demo.mini import _COMMON_KEYS, STAGE_KEYS

    listed = {k.split(".")[0] for k in _COMMON_KEYS} | {k for keys in STAGE_KEYS.values() for k in keys}
    fields = {f.name for f in dataclasses.fields(MiniConfig)} - MiniConfig.RUN_CONTROL_KEYS
    assert fields == listed


@pytest.mark.usefixtures("one_thread_module")
def test_holdout_leaves_calibrates_validation_images_out_and_calibrate_knows(tmp_path):
    """holdout_* leave out exactly the images scripts/calibrate.py edits (same classes, count and seed), and the
    calibration reads the training report to say whether its validation images were unseen."""
    from diffusion.config import DataConfig, EditConfig, MiniConfig, ModelConfig
    from diffusion.data import held_out_paths, validation_split
    from diffusion.demo.mini import held_out_files, train_mini_model
    from diffusion.edit.calibrate import validation_seen
    from diffusion.errors import ConfigError

    data = DataConfig(name="digits", root=str(tmp_path / "digits"))
    out = tmp_path / "mini"
    cfg = MiniConfig(output_dir=str(out), data=data, movq_steps=1, encoder_hidden=32, encoder_layers=1,
                     encoder_steps=1, embed_dim=16, unet_channels=[32, 32], unet_steps=1, batch_size=8,
                     holdout_classes=["3", "8"], holdout_per_class=5, holdout_seed=2)
    val, _ = validation_split(data, ["3", "8"], 5, seed=2)
    assert held_out_files(cfg) == sorted(str(r.path) for c in ("3", "8") for r in val[c])
    capped = dataclasses.replace(data, num_samples=12)  # drawn from the whole split, as calibrate.py draws them
    assert held_out_paths(capped, ["3", "8"], 5, 2) == held_out_files(cfg)
    report = train_mini_model(cfg)
    assert report["data"] == {"train_images": 1347 - 10, "test_images": 450, "held_out_images": 10}

    def edit_cfg(classes):
        return EditConfig(output_dir=str(tmp_path / "edit"), search="fixed",
                          data=dataclasses.replace(data, classes=classes),
                          model=ModelConfig(decoder=str(out / "decoder"), prior=str(out / "prior")))

    assert "held out of the training of the decoder" in validation_seen(edit_cfg(["3", "8"]), ["3", "8"], 5, 2)
    assert "held out of the training" in validation_seen(edit_cfg(["3", "8"]), ["8"], 3, 2)  # fewer: a subset
    for classes, per_class, seed in [(["3", "4"], 5, 2), (["3", "8"], 6, 2), (["3", "8"], 5, 0)]:
        message = validation_seen(edit_cfg(classes), classes, per_class, seed)
        assert "did not hold these validation images out" in message and "holdout_per_class" in message
    no_report = dataclasses.replace(edit_cfg(["3", "8"]), model=ModelConfig(decoder=str(tmp_path / "x" / "decoder")))
    assert validation_seen(no_report, ["3", "8"], 5, 2) is None  # nothing known of a downloaded decoder
    with pytest.raises(ConfigError, match="holdout_per_class"):
        MiniConfig(output_dir="x", holdout_classes=["3"])
    with pytest.raises(ConfigError, match="holdout_per_class"):
        MiniConfig(output_dir="x", holdout_per_class=4)
    with pytest.raises(ConfigError, match="holdout_classes.*names a class twice"):
        MiniConfig(output_dir="x", holdout_classes=["3", "3"], holdout_per_class=4)
