"""The evaluation oracle: training the three CNNs, the folder format, loading (and what it refuses), the CLIP probe,
and scripts/train_classifiers.py end to end. Offline and CPU-only: every network starts from random weights at 32 px.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datasets.folder import ImageRecord
from diffusion.oracle.training import augment, recalibrate_batchnorm, split_train_val, train_classifiers
from diffusion.config import ClassifierConfig, ConfigError, load_config
from diffusion.oracle.members import (
    ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, Member, MemberInfo, OracleError, WeightsUnavailableError, build_cnn,
    load_clip, load_oracle, resize_batch, save_member,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def write_shapes(root: Path, split: str, n: int, seed: int) -> None:
    """root/<split>/{disc,square}/<i>.png: red discs on navy vs blue squares on yellow, random size and place
    (the backgrounds differ too, so that networks from random init learn it in a few dozen steps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cls, colour, background in (("disc", (230, 40, 40), (0, 0, 110)), ("square", (40, 60, 230), (240, 220, 0))):
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            r = rng.uniform(0.15 * SIZE, 0.3 * SIZE)
            cy, cx = rng.uniform(r, SIZE - r, 2)
            if cls == "disc":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            img = np.full((SIZE, SIZE, 3), background, np.uint8)
            img[mask] = colour
            Image.fromarray(img).save(folder / f"{i:03d}.png")


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread for every test here (conftest)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, "train", 40, seed=0)
    write_shapes(root, "test", 16, seed=1)
    return root


def _cfg(output_dir: Path, data_root: Path, *overrides: str) -> ClassifierConfig:
    return load_config(ClassifierConfig, None, [
        f"output_dir={output_dir}", f"data.root={data_root}", "pretrained=false", f"image_size={SIZE}",
        "device=cpu", "batch_size=8", "epochs=7", "patience=7", "val_fraction=0.25", *overrides,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> tuple:
    """The three CNNs trained once on the shapes: (folder, test metrics)."""
    folder = tmp_path_factory.mktemp("oracle") / "ensemble"
    return folder, train_classifiers(_cfg(folder, shapes))


def _random_member_folder(folder: Path, architecture: str, classes: list) -> Path:
    """An untrained member saved the way training saves one (fast: no training)."""
    torch.manual_seed(0)
    member = Member(build_cnn(architecture, pretrained=False), SIZE, IMAGENET_MEAN, IMAGENET_STD)
    info = MemberInfo(architecture, classes, SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return save_member(folder, member, info)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs" / "classifier").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_classifier_config_loads(path: Path) -> None:
    cfg = load_config(ClassifierConfig, str(path))
    assert cfg.kind == "ensemble"
    if path.stem == "demo":  # the shipped demo oracle: two small CNNs in float16
        assert cfg.data.name == "digits" and cfg.data.classes == ["3", "8"] and not cfg.pretrained
        assert cfg.output_dir == "assets/mini_digits_oracle" and cfg.image_size <= 64
        assert list(cfg.architectures) == ["efficientnet_b0", "mobilenet_v2"] and cfg.save_dtype == "float16"
    else:
        assert list(cfg.architectures) == list(ARCHITECTURES)
        assert cfg.data.name == path.stem and cfg.data.root == f"data/{path.stem}" and cfg.pretrained


@pytest.mark.parametrize("override, key", [
    ("architectures=[resnet18,resnet18]", "architectures"),
    ("architectures=[vgg16]", "architectures"),
    ("kind=svm", "kind"),
    ("val_fraction=0", "val_fraction"),
    ("data.eval_split=train", "data.eval_split"),
    ("data.classes=[a]", "data.classes"),
    ("epochs=0", "epochs"),
    ("device=gpu", "device"),
])
def test_bad_classifier_configs_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config(ClassifierConfig, str(REPO / "configs/classifier/demo.yaml"), [override])


# --------------------------------------------------------------------------------------------------------------------
# Pure pieces: the validation split, augmentation, BatchNorm recalibration
# --------------------------------------------------------------------------------------------------------------------
def _records(counts: dict) -> list:
    return [ImageRecord(Path(f"{c}/{i:03d}.png"), label, c) for label, (c, n) in enumerate(counts.items())
            for i in range(n)]


def test_validation_split_is_seeded_disjoint_and_capped() -> None:
    records = _records({"a": 50, "b": 200})
    train, val = split_train_val(records, 0.1, 100, seed=0)
    assert not {r.path for r in train} & {r.path for r in val}
    count = lambda rs, c: sum(r.class_name == c for r in rs)  # noqa: E731
    assert (count(val, "a"), count(train, "a")) == (5, 45)  # 10% of 50; the rest trains
    assert (count(val, "b"), count(train, "b")) == (10, 100)  # 10% of the capped 100; training capped at 100
    again = split_train_val(records, 0.1, 100, seed=0)
    assert [r.path for r in again[1]] == [r.path for r in val]
    assert [r.path for r in split_train_val(records, 0.1, 100, seed=1)[1]] != [r.path for r in val]
    only_a = split_train_val(_records({"a": 50}), 0.1, 100, seed=0)[1]
    assert [r.path for r in only_a] == [r.path for r in val if r.class_name == "a"]  # independent of other classes
    with pytest.raises(ConfigError, match="at least two"):
        split_train_val(_records({"a": 1, "b": 5}), 0.1, None, seed=0)


def test_augmentation_is_seeded_and_flips_or_scales() -> None:
    images = torch.rand(6, 3, 16, 16)
    a = augment(images, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and torch.equal(a, augment(images, torch.Generator().manual_seed(3)))
    flipped = augment(images, torch.Generator().manual_seed(3), scale=(1.0, 1.0))  # flips only
    for img, out in zip(images, flipped):
        assert torch.allclose(out, img, atol=1e-5) or torch.allclose(out, img.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, images, atol=1e-5)  # some of the six were flipped
    zoomed = augment(torch.ones(4, 1, 16, 16), torch.Generator().manual_seed(0), scale=(0.8, 0.8))
    assert zoomed[:, :, 0, 0].max() == 0 and zoomed[:, :, 8, 8].min() == 1  # zoomed out: a black border


def test_batchnorm_recalibration_replaces_the_running_statistics() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    x = torch.randn(10, 3, 5, 5) * 3 + 2
    net[1].running_mean.fill_(7.0)  # stale statistics are replaced, not blended
    recalibrate_batchnorm(net, [(x[:5], None), (x[5:], None)], torch.device("cpu"))
    features = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert net[1].momentum == 0.1 and not net.training


# --------------------------------------------------------------------------------------------------------------------
# Training the ensemble
# --------------------------------------------------------------------------------------------------------------------
def test_three_architectures_learn_the_shapes(trained) -> None:
    folder, metrics = trained
    names = sorted(p.name for p in folder.iterdir())
    expected = sorted([f"{a}.safetensors" for a in ARCHITECTURES] + [f"{a}.json" for a in ARCHITECTURES])
    # one checkpoint per architecture, its metrics and the run's stamp, nothing else
    assert names == sorted(expected + ["test_metrics.json", "config.yaml", "run_info.json"])
    assert metrics["n"] == 32 and metrics["split"] == "test"
    for name in ARCHITECTURES:
        assert metrics["accuracy"][name] >= 0.75, metrics  # chance is 0.5
    assert metrics["accuracy"]["ensemble"] >= 0.85, metrics
    info = json.loads((folder / "resnet18.json").read_text())
    assert info["classes"] == ["disc", "square"] and info["input_size"] == SIZE
    assert info["mean"] == list(IMAGENET_MEAN) and info["std"] == list(IMAGENET_STD)
    assert 0.0 <= info["val_accuracy"] <= 1.0 and info["extra"]["counts"]["val"] == {"disc": 10, "square": 10}
    assert json.loads((folder / "test_metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def test_the_oracle_gives_class_probabilities_at_any_input_size(trained, shapes) -> None:
    folder, metrics = trained
    oracle = load_oracle(folder)
    assert list(oracle.classes) == ["disc", "square"] and sorted(oracle.names) == sorted(ARCHITECTURES)
    from datasets.images import load_image, resize

    files = [f for cls in ("disc", "square") for f in sorted((shapes / "test" / cls).glob("*.png"))[:3]]
    images = torch.stack([load_image(f) for f in files])  # (6, 3, 32, 32)
    probs = oracle(images)
    assert probs.shape == (6, 2) and torch.allclose(probs.sum(1), torch.ones(6))
    assert torch.allclose(probs[:, 1], oracle.member_probs(images).mean(1))
    bigger = torch.stack([resize(im, 48) for im in images])
    assert torch.allclose(oracle(bigger), oracle(resize_batch(bigger, SIZE)))  # it resizes to its members' size
    assert (oracle(bigger).argmax(1) == probs.argmax(1)).float().mean() >= 0.8
    if metrics["accuracy"]["ensemble"] == 1.0:
        assert probs.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]


def test_retraining_with_another_config_is_refused_and_leaves_the_folder_as_it_was(trained, shapes, tmp_path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(trained[0], folder)
    before = load_file(str(folder / "resnet18.safetensors"))
    with pytest.raises(ConfigError, match="other values of .*seed"):  # members of two configs never share a folder
        train_classifiers(_cfg(folder, shapes, "architectures=[resnet18]", "epochs=1", "seed=5"))
    after = load_file(str(folder / "resnet18.safetensors"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in trained[0].iterdir())  # no temp files
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------------------------
# Loading refuses what it cannot trust
# --------------------------------------------------------------------------------------------------------------------
def test_the_oracle_refuses_a_pickled_checkpoint(tmp_path) -> None:
    _random_member_folder(tmp_path, "mobilenet_v2", ["a", "b"])
    load_oracle(tmp_path)  # fine as written
    torch.save(build_cnn("mobilenet_v2", pretrained=False).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(OracleError, match="pickle"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_mixed_class_lists(tmp_path) -> None:
    _random_member_folder(tmp_path, "mobilenet_v2", ["a", "b"])
    _random_member_folder(tmp_path, "resnet18", ["b", "a"])
    with pytest.raises(OracleError, match="mixes class lists"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_two_members_of_one_architecture(tmp_path) -> None:
    path = _random_member_folder(tmp_path, "mobilenet_v2", ["a", "b"])
    shutil.copy(path, tmp_path / "mobilenet_v2_old.safetensors")
    shutil.copy(path.with_suffix(".json"), tmp_path / "mobilenet_v2_old.json")
    with pytest.raises(OracleError, match="two mobilenet_v2 members"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_incomplete_folders(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train_classifiers"):
        load_oracle(tmp_path / "missing")
    with pytest.raises(OracleError, match="no member"):
        load_oracle(tmp_path)
    path = _random_member_folder(tmp_path, "mobilenet_v2", ["a", "b"])
    path.with_suffix(".json").unlink()
    with pytest.raises(OracleError, match="no description"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_a_damaged_checkpoint(tmp_path) -> None:
    path = _random_member_folder(tmp_path, "mobilenet_v2", ["a", "b"])
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(OracleError, match="cannot be loaded as a mobilenet_v2 member"):
        load_oracle(tmp_path)


def test_unavailable_imagenet_weights_are_a_clear_error(monkeypatch) -> None:
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet18.*pretrained: false"):
        build_cnn("resnet18", pretrained=True)


# --------------------------------------------------------------------------------------------------------------------
# The CLIP linear probe
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_clip(tmp_path) -> str:
    """A tiny open_clip model config registered under a test name (random weights: clip_pretrained null)."""
    import open_clip

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-test-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return "tiny-test-clip"


def test_clip_probe_trains_saves_only_its_head_and_reloads(tiny_clip, shapes, tmp_path) -> None:
    folder = tmp_path / "clip"
    metrics = train_classifiers(_cfg(folder, shapes, "kind=clip_probe", f"clip_model={tiny_clip}",
                                     "clip_pretrained=null", "epochs=3"))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["clip_probe.json", "clip_probe.safetensors", "config.yaml", "run_info.json", "test_metrics.json"]
    assert set(load_file(str(folder / "clip_probe.safetensors"))) == {"weight", "bias"}  # the head alone
    info = json.loads((folder / "clip_probe.json").read_text())
    assert info["clip_model"] == tiny_clip and info["input_size"] == SIZE
    assert metrics["accuracy"]["clip_probe"] >= 0.75, metrics
    images = torch.rand(4, 3, SIZE, SIZE)
    assert torch.equal(load_oracle(folder)(images), load_oracle(folder)(images))  # same CLIP weights each load


def test_unavailable_clip_weights_are_a_clear_error(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError, match="clip_pretrained"):
        load_clip("ViT-B-32", str(tmp_path / "missing_weights.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="not an open_clip model"):
        load_clip("ViT-B-33", None)


# --------------------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_classifiers_script_runs_the_demo_config(tmp_path) -> None:
    out = tmp_path / "oracle"
    cmd = [sys.executable, "scripts/train_classifiers.py", "--config_path", "configs/classifier/demo.yaml",
           f"output_dir={out}", f"data.root={tmp_path / 'digits'}", "data.num_samples=12", "epochs=1",
           "architectures=[mobilenet_v2]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread_module fixture, for the same reasons
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mobilenet_v2 |" in proc.stdout and "| ensemble |" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "run_info.json", "mobilenet_v2.safetensors", "mobilenet_v2.json",
            "test_metrics.json"} == names
    assert json.loads((out / "test_metrics.json").read_text())["classes"] == ["3", "8"]
    bad = subprocess.run(cmd + ["patience=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "patience" in bad.stderr
