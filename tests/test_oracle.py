"""Classifier folders: K-way training (small nets, the torchvision CNNs, the CLIP probe), the accuracy record and its
intervals, the accuracy gate, train_part, the folder format and what loading refuses, binary folders of the first
format, independence warnings, and scripts/train_classifiers.py end to end. Offline, CPU-only, one thread, random
init on 32 px shapes.
"""

from __future__ import annotations

import json
import logging
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
from safetensors.torch import load_file, save_file

import diffusion.oracle.training as training
from datasets.folder import ImageRecord
from diffusion.config import ClassifierConfig, ConfigError, load_config
from diffusion.oracle.accuracy import accuracy_record, pair_rate, rate, summary_line
from diffusion.oracle.members import (
    BINARY_FORMAT, IMAGENET_MEAN, IMAGENET_STD, SMALL_NETS, TORCHVISION_CNNS, Member, MemberInfo,
    OracleError, WeightsUnavailableError, build_cnn, build_net, independence_warnings, load_clip, load_oracle,
    require_classes, resize_batch, save_member,
)
from diffusion.oracle.training import (
    augment, mixup, recalibrate_batchnorm, split_part, split_train_val, train_classifiers,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
SHAPES = ("bar", "disc", "square")  # sorted: the label order of the folders
COLOURS = {"disc": ((230, 40, 40), (0, 0, 110)), "square": ((40, 60, 230), (240, 220, 0)),
           "bar": ((20, 200, 60), (120, 120, 120)), "noise": ((128, 128, 128), (128, 128, 128))}


def write_shapes(root: Path, split: str, n: int, seed: int, classes=SHAPES) -> None:
    """root/<split>/<class>/<i>.png: a red disc on navy, a blue square on yellow, a green bar on grey, random size
    and place (the backgrounds differ too, so that networks from random init learn it in a few epochs). Classes
    named noise*: uniform noise, the same distribution for each (nothing to learn)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cls in classes:
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        colour, background = COLOURS["noise" if cls.startswith("noise") else cls]
        for i in range(n):
            if cls.startswith("noise"):
                img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            else:
                r = rng.uniform(0.15 * SIZE, 0.3 * SIZE)
                cy, cx = rng.uniform(r, SIZE - r, 2)
                mask = {"disc": (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,
                        "square": (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r),
                        "bar": (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r / 3)}[cls]
                img = np.full((SIZE, SIZE, 3), background, np.uint8)
                img[mask] = colour
            Image.fromarray(img).save(folder / f"{i:03d}.png")


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread for every test here (conftest)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, "train", 40, seed=0)
    write_shapes(root, "test", 12, seed=1)
    return root


def _cfg(output_dir: Path, data_root: Path, *overrides: str) -> ClassifierConfig:
    return load_config(ClassifierConfig, None, [
        f"output_dir={output_dir}", f"data.root={data_root}", "pretrained=false", f"image_size={SIZE}",
        "device=cpu", "batch_size=16", "epochs=6", "patience=6", "val_fraction=0.25", *overrides,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> tuple:
    """The four small nets trained once on the three shapes, on part 0 of 2: (folder, record)."""
    folder = tmp_path_factory.mktemp("oracle") / "small"
    cfg = _cfg(folder, shapes, f"architectures=[{','.join(SMALL_NETS)}]", "train_part=[0,2]", "augment=affine")
    return folder, train_classifiers(cfg)


def _write_record(folder: Path, names, n: int = 10, accuracy: float = 0.5) -> None:
    """A first-format accuracy record (flat accuracies and n), as older folders hold."""
    flat = {**{name: accuracy for name in names}, "ensemble": accuracy}
    (folder / "test_metrics.json").write_text(json.dumps({"split": "test", "n": n, "accuracy": flat}))


def _random_member_folder(folder: Path, architecture: str, classes: list, record: bool = True) -> Path:
    """An untrained member saved the way training saves one (fast: no training)."""
    torch.manual_seed(0)
    info = MemberInfo(architecture, classes, SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD))
    member = Member(build_net(architecture, len(classes), SIZE), SIZE, IMAGENET_MEAN, IMAGENET_STD)
    path = save_member(folder, member, info)
    if record:
        _write_record(folder, sorted(p.stem for p in folder.glob("*.safetensors")))
    return path


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs" / "classifier").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_classifier_config_loads(path: Path) -> None:
    cfg = load_config(ClassifierConfig, str(path))
    assert cfg.kind == "ensemble"
    if path.stem.startswith("demo"):  # the shipped demo oracle and judge: small nets, all ten digits, float16
        assert cfg.data.name == "digits" and cfg.data.classes == [] and not cfg.pretrained
        assert cfg.image_size == 32 and cfg.save_dtype == "float16" and cfg.augment == "affine"
        assert set(cfg.architectures) <= set(SMALL_NETS)
    else:
        assert list(cfg.architectures) == list(TORCHVISION_CNNS)
        assert cfg.data.name == path.stem and cfg.data.root == f"data/{path.stem}" and cfg.pretrained


def test_the_demo_judge_is_independent_of_the_demo_oracle_by_config() -> None:
    oracle = load_config(ClassifierConfig, str(REPO / "configs/classifier/demo.yaml"))
    judge = load_config(ClassifierConfig, str(REPO / "configs/classifier/demo_judge.yaml"))
    assert oracle.output_dir == "assets/mini_digits_oracle" and judge.output_dir == "assets/mini_digits_judge"
    assert not set(oracle.architectures) & set(judge.architectures)
    assert oracle.train_part[1] == judge.train_part[1] and oracle.train_part[0] != judge.train_part[0]


@pytest.mark.parametrize("override, key", [
    ("architectures=[resnet18,resnet18]", "architectures"),
    ("architectures=[vgg16]", "architectures"),
    ("kind=svm", "kind"),
    ("val_fraction=0", "val_fraction"),
    ("data.eval_split=train", "data.eval_split"),
    ("data.classes=[a]", "data.classes"),
    ("epochs=0", "epochs"),
    ("device=gpu", "device"),
    ("pretrained=true", "pretrained"),  # the small nets have no ImageNet weights
    ("train_part=[2,2]", "train_part"),
    ("augment=mirror", "augment"),
    ("min_accuracy=1.5", "min_accuracy"),
    ("mixup=-0.5", "mixup"),
])
def test_bad_classifier_configs_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config(ClassifierConfig, str(REPO / "configs/classifier/demo.yaml"), [override])


def test_mixup_on_a_linear_probe_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="mixup.*clip_probe"):
        load_config(ClassifierConfig, str(REPO / "configs/classifier/demo.yaml"), ["kind=clip_probe", "mixup=0.4"])
    assert load_config(ClassifierConfig, str(REPO / "configs/classifier/demo.yaml"), ["kind=clip_probe"]).mixup == 0


# --------------------------------------------------------------------------------------------------------------------
# Pure pieces: parts, the validation split, augmentation, BatchNorm recalibration, the accuracy record
# --------------------------------------------------------------------------------------------------------------------
def _records(counts: dict) -> list:
    return [ImageRecord(Path(f"{c}/{i:03d}.png"), label, c) for label, (c, n) in enumerate(counts.items())
            for i in range(n)]


def test_train_parts_are_disjoint_cover_each_class_and_do_not_depend_on_the_seed() -> None:
    records = _records({"a": 50, "b": 21})
    parts = [split_part(records, k, 3) for k in range(3)]
    paths = [{r.path for r in part} for part in parts]
    assert sum(len(p) for p in paths) == len(records) and set().union(*paths) == {r.path for r in records}
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    for part in parts:  # per class: sizes differ by at most one
        assert sum(r.class_name == "a" for r in part) in (16, 17) and sum(r.class_name == "b" for r in part) == 7
    assert [r.path for r in split_part(records, 1, 3)] == [r.path for r in parts[1]]  # fixed, whatever the seed
    only_a = split_part(_records({"a": 50}), 1, 3)
    assert [r.path for r in only_a] == [r.path for r in parts[1] if r.class_name == "a"]  # per class
    assert {r.path for r in split_part(records, 0, 3)} != {r.path for r in records[::3]}  # shuffled, not strided


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


def test_augmentation_is_seeded_and_flips_scales_rotates_or_shifts() -> None:
    images = torch.rand(6, 3, 16, 16)
    a = augment(images, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and torch.equal(a, augment(images, torch.Generator().manual_seed(3)))
    flipped = augment(images, torch.Generator().manual_seed(3), scale=(1.0, 1.0))  # flips only
    for img, out in zip(images, flipped):
        assert torch.allclose(out, img, atol=1e-5) or torch.allclose(out, img.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, images, atol=1e-5)  # some of the six were flipped
    zoomed = augment(torch.ones(4, 1, 16, 16), torch.Generator().manual_seed(0), scale=(0.8, 0.8))
    assert zoomed[:, :, 0, 0].max() == 0 and zoomed[:, :, 8, 8].min() == 1  # zoomed out: a black border
    identity = augment(images, torch.Generator().manual_seed(3), scale=(1.0, 1.0), flip=False)
    assert torch.allclose(identity, images, atol=1e-5)  # no mirror without flip
    dot = torch.zeros(1, 1, 16, 16)
    dot[..., 4:6, 4:6] = 1.0
    moved = augment(dot.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1), scale=(1.0, 1.0), flip=False,
                    rotate=10.0, shift=0.1)
    assert not torch.allclose(moved[0], dot[0], atol=1e-2) and (moved.sum((1, 2, 3)) > 1).all()  # moved, kept


def test_mixup_blends_images_and_labels_alike_and_is_seeded() -> None:
    images = torch.rand(8, 3, 6, 6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, soft = mixup(images, labels, 3, 0.4, torch.Generator().manual_seed(5))
    again, soft_again = mixup(images, labels, 3, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
    assert mixed.shape == images.shape and soft.shape == (8, 3)
    assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft >= 0).all()
    assert not torch.allclose(mixed, images)  # Beta(0.4, 0.4) weights are almost never all 1
    # a partner of another class: the mixed image is l * its own + (1 - l) * that partner, l its own label's weight
    checked = 0
    for i in range(8):
        lam = float(soft[i, labels[i]])
        if soft[i].max() < 1 and 0.05 < lam < 0.95:
            rest = (mixed[i] - lam * images[i]) / (1 - lam)
            partners = [j for j in range(8) if labels[j] != labels[i]]
            assert min(float((rest - images[j]).abs().max()) for j in partners) < 1e-4
            checked += 1
    assert checked > 0


def test_batchnorm_recalibration_replaces_the_running_statistics() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    x = torch.randn(10, 3, 5, 5) * 3 + 2
    net[1].running_mean.fill_(7.0)  # stale statistics are replaced, not blended
    recalibrate_batchnorm(net, [(x[:5], None), (x[5:], None)], torch.device("cpu"))
    features = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert net[1].momentum == 0.1 and not net.training


def test_accuracy_record_counts_intervals_per_class_and_pairs() -> None:
    classes = ["a", "b", "c"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    member = torch.tensor([[.8, .1, .1], [.2, .5, .3], [.1, .8, .1], [.1, .8, .1], [.3, .1, .6], [.1, .6, .3]])
    probs = torch.stack([member, member], dim=1)  # (6, 2, 3): two identical members
    record = accuracy_record(probs, labels, ["m1", "m2"], classes, "test")
    ens = record["ensemble"]
    assert (ens["correct"], ens["n"]) == (4, 6) and ens["accuracy"] == pytest.approx(4 / 6)
    assert {c: ens["per_class"][c]["correct"] for c in classes} == {"a": 1, "b": 2, "c": 1}
    assert ens["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 1, 1]]
    assert ens["pairs"]["a/c"]["correct"] == 3 and ens["pairs"]["a/c"]["n"] == 4  # image 1 (a): c .3 > a .2
    assert ens["pairs"]["b/c"]["n"] == 4 and ens["pairs"]["b/c"]["correct"] == 3
    assert record["accuracy"] == {"m1": pytest.approx(4 / 6), "m2": pytest.approx(4 / 6),
                                  "ensemble": pytest.approx(4 / 6)}
    for r in [ens, *ens["per_class"].values(), *ens["pairs"].values(), *record["members"].values()]:
        lo, hi = r["interval"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1
    assert rate(0, 0) == {"correct": 0, "n": 0, "accuracy": None, "interval": None}
    assert pair_rate(member, labels, 0, 1)["correct"] == 3  # image 1 (a) has b > a: wrong


# --------------------------------------------------------------------------------------------------------------------
# Training K-way members
# --------------------------------------------------------------------------------------------------------------------
def test_small_nets_learn_three_shapes_and_record_accuracy_with_intervals(trained) -> None:
    folder, metrics = trained
    names = sorted(p.name for p in folder.iterdir())
    members = [f"{a}.{s}" for a in SMALL_NETS for s in ("json", "safetensors")]
    assert names == sorted(members + ["test_metrics.json", "config.yaml", "run_info.json"])
    assert metrics["n"] == 36 and metrics["classes"] == list(SHAPES) and metrics["train_part"] == [0, 2]
    for name in ("lenet", "small_vgg", "mlp", "ensemble"):
        assert metrics["accuracy"][name] >= 0.75, metrics["accuracy"]  # chance is 1/3
    for r in [metrics["ensemble"], *metrics["members"].values()]:
        lo, hi = r["interval"]
        assert lo <= r["accuracy"] <= hi and hi - lo > 0  # 36 test images: never a zero-width interval
        assert set(r["per_class"]) == set(SHAPES) and sum(c["n"] for c in r["per_class"].values()) == 36
    assert set(metrics["ensemble"]["pairs"]) == {"bar/disc", "bar/square", "disc/square"}
    assert json.loads((folder / "test_metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def test_members_record_their_part_and_training_images(trained, shapes) -> None:
    folder, _ = trained
    info = json.loads((folder / "lenet.json").read_text())
    assert info["classes"] == list(SHAPES) and info["head"] == "softmax" and info["input_size"] == SIZE
    data = info["extra"]["data"]
    assert data["train_part"] == [0, 2] and len(data["train_images_sha256"]) == 64
    assert data["n_train"] + data["n_val"] == 3 * 20  # half of the 40 train images per class
    seen = set(data["images"]["train"]) | set(data["images"]["val"])
    assert len(seen) == 60 and all(p.startswith("train/") for p in seen)
    assert info["extra"]["counts"]["val"] == {"bar": 5, "disc": 5, "square": 5}


def test_the_oracle_gives_k_class_probabilities_and_member_probabilities(trained, shapes) -> None:
    folder, metrics = trained
    oracle = load_oracle(folder)
    assert oracle.classes == list(SHAPES) and oracle.names == sorted(SMALL_NETS)
    from datasets.images import load_image, resize

    files = [f for cls in SHAPES for f in sorted((shapes / "test" / cls).glob("*.png"))[:2]]
    images = torch.stack([load_image(f) for f in files])  # (6, 3, 32, 32)
    probs, members = oracle(images), oracle.member_probs(images)
    assert probs.shape == (6, 3) and members.shape == (6, 4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(6)) and torch.allclose(members.sum(2), torch.ones(6, 4))
    assert torch.allclose(probs, members.mean(1))
    bigger = torch.stack([resize(im, 48) for im in images])
    assert torch.allclose(oracle(bigger), oracle(resize_batch(bigger, SIZE)))  # it resizes to its members' size
    if metrics["accuracy"]["ensemble"] == 1.0:
        assert probs.argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    assert oracle.accuracy["ensemble"]["accuracy"] == metrics["ensemble"]["accuracy"]
    summary = oracle.accuracy_summary(["disc", "bar"])
    assert "ensemble test accuracy" in summary and "disc/bar" in summary and "lenet" in summary


def test_torchvision_cnns_train_k_way_and_reload(shapes, tmp_path) -> None:
    folder = tmp_path / "cnns"
    metrics = train_classifiers(_cfg(folder, shapes, "epochs=1", "min_accuracy=0", "data.num_samples=12"))
    oracle = load_oracle(folder)
    assert sorted(oracle.names) == sorted(TORCHVISION_CNNS) and set(metrics["members"]) == set(TORCHVISION_CNNS)
    assert oracle.member_probs(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 3, 3)
    assert load_file(str(folder / "resnet18.safetensors"))["fc.weight"].shape[0] == 3  # one logit per class


def test_retraining_with_another_config_is_refused_and_leaves_the_folder_as_it_was(trained, shapes, tmp_path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(trained[0], folder)
    before = load_file(str(folder / "lenet.safetensors"))
    with pytest.raises(ConfigError, match="other values of .*seed"):  # members of two configs never share a folder
        train_classifiers(_cfg(folder, shapes, "architectures=[lenet]", "epochs=1", "seed=5"))
    after = load_file(str(folder / "lenet.safetensors"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in trained[0].iterdir())  # no temp files
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------------------------
# The accuracy gate (validation decides, never the test split)
# --------------------------------------------------------------------------------------------------------------------
def test_members_that_cannot_learn_are_not_written_and_the_run_says_why(tmp_path) -> None:
    root = tmp_path / "noise"
    write_shapes(root, "train", 20, seed=0, classes=("noise_a", "noise_b"))
    write_shapes(root, "test", 4, seed=1, classes=("noise_a", "noise_b"))
    folder = tmp_path / "out"
    with pytest.raises(OracleError, match=r"no member reached min_accuracy 0.95.*logistic: validation accuracy "
                                          r"0\.\d+ on 10 images is below min_accuracy 0.95.*Try more epochs"):
        train_classifiers(_cfg(folder, root, "architectures=[logistic,lenet]", "epochs=2", "min_accuracy=0.95"))
    assert not list(folder.glob("*.safetensors")) and [p.name for p in folder.glob("*.json")] == ["run_info.json"]
    assert not (folder / "test_metrics.json").exists()


def test_a_member_below_the_gate_is_left_out_and_the_others_are_kept(shapes, tmp_path, monkeypatch) -> None:
    real = training.build_net

    def blind(architecture, num_outputs, input_size, pretrained=False):  # logistic sees a blank image
        net = real(architecture, num_outputs, input_size, pretrained)
        return _Blind(net) if architecture == "logistic" else net

    monkeypatch.setattr(training, "build_net", blind)
    folder = tmp_path / "out"
    metrics = train_classifiers(_cfg(folder, shapes, "architectures=[lenet,logistic]", "min_accuracy=0.7"))
    assert sorted(p.stem for p in folder.glob("*.safetensors")) == ["lenet"]
    why = metrics["rejected"]["logistic"]["why"]
    assert "below min_accuracy 0.7" in why and "chance is 0.33" in why and "another architecture" in why
    assert set(metrics["members"]) == {"lenet"} and load_oracle(folder).names == ["lenet"]


class _Blind(torch.nn.Module):
    """A network that multiplies its input by zero: it can learn the class prior, never the image."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 0)


# --------------------------------------------------------------------------------------------------------------------
# Loading refuses what it cannot trust
# --------------------------------------------------------------------------------------------------------------------
def test_a_folder_without_or_with_a_damaged_accuracy_record_is_refused(tmp_path) -> None:
    _random_member_folder(tmp_path, "lenet", ["a", "b", "c"], record=False)
    with pytest.raises(OracleError, match=r"test_metrics.json is missing.*accuracy record.*train_classifiers"):
        load_oracle(tmp_path)
    (tmp_path / "test_metrics.json").write_text('{"n": 10, "accuracy": {"ens')
    with pytest.raises(OracleError, match=r"test_metrics.json: not readable JSON.*damaged"):
        load_oracle(tmp_path)
    (tmp_path / "test_metrics.json").write_text('{"n": 10, "accuracy": {"lenet": 0.5, "ensemble": NaN}}')
    with pytest.raises(OracleError, match="no ensemble accuracy"):
        load_oracle(tmp_path)
    _write_record(tmp_path, ["mlp"])  # written for other members
    with pytest.raises(OracleError, match=r"no accuracy for member\(s\) \['lenet'\]"):
        load_oracle(tmp_path)
    _write_record(tmp_path, ["lenet"], n=40, accuracy=0.9)
    oracle = load_oracle(tmp_path)  # a first-format record: the interval comes from the counts
    assert oracle.accuracy["ensemble"]["correct"] == 36 and oracle.accuracy["ensemble"]["interval"][0] < 0.9


def test_a_damaged_member_description_is_refused(tmp_path) -> None:
    path = _random_member_folder(tmp_path, "mlp", ["a", "b"])
    path.with_suffix(".json").write_text('{"format": "diffusion-oracle-member/2", "archi')
    with pytest.raises(OracleError, match=r"mlp.json: not a readable JSON file.*damaged"):
        load_oracle(tmp_path)
    path.with_suffix(".json").write_text(json.dumps({"format": "diffusion-oracle-member/2", "architecture": "mlp",
                                                     "classes": ["a"], "input_size": SIZE, "mean": [0, 0, 0],
                                                     "std": [1, 1, 1]}))
    with pytest.raises(OracleError, match="two or more distinct class names"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_a_pickled_checkpoint(tmp_path) -> None:
    _random_member_folder(tmp_path, "mobilenet_v2", ["a", "b"])
    load_oracle(tmp_path)  # fine as written
    torch.save(build_cnn("mobilenet_v2", pretrained=False).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(OracleError, match="pickle"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_mixed_class_lists(tmp_path) -> None:
    _random_member_folder(tmp_path, "logistic", ["a", "b"])
    _random_member_folder(tmp_path, "lenet", ["b", "a"])
    with pytest.raises(OracleError, match="mixes class lists"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_two_members_of_one_architecture(tmp_path) -> None:
    path = _random_member_folder(tmp_path, "logistic", ["a", "b"])
    shutil.copy(path, tmp_path / "logistic_old.safetensors")
    shutil.copy(path.with_suffix(".json"), tmp_path / "logistic_old.json")
    with pytest.raises(OracleError, match="two logistic members"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_incomplete_folders(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train_classifiers"):
        load_oracle(tmp_path / "missing")
    with pytest.raises(OracleError, match="no member"):
        load_oracle(tmp_path)
    path = _random_member_folder(tmp_path, "logistic", ["a", "b"])
    path.with_suffix(".json").unlink()
    with pytest.raises(OracleError, match="no description"):
        load_oracle(tmp_path)


def test_the_oracle_refuses_a_damaged_checkpoint(tmp_path) -> None:
    path = _random_member_folder(tmp_path, "lenet", ["a", "b"])
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(OracleError, match="cannot be loaded as a lenet member"):
        load_oracle(tmp_path)


def test_unavailable_imagenet_weights_are_a_clear_error(monkeypatch) -> None:
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet18.*pretrained: false"):
        build_cnn("resnet18", pretrained=True)


# --------------------------------------------------------------------------------------------------------------------
# Binary folders of the first format still load
# --------------------------------------------------------------------------------------------------------------------
def test_a_binary_folder_of_the_first_format_loads_as_two_class_probabilities(tmp_path) -> None:
    torch.manual_seed(0)
    net = build_cnn("mobilenet_v2", pretrained=False, num_outputs=1)  # one logit for classes[1]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "mobilenet_v2.safetensors"))
    (tmp_path / "mobilenet_v2.json").write_text(json.dumps({
        "format": BINARY_FORMAT, "architecture": "mobilenet_v2", "classes": ["3", "8"], "input_size": SIZE,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "val_accuracy": 0.9, "clip_model": None,
        "clip_pretrained": None, "extra": {}}))
    _write_record(tmp_path, ["mobilenet_v2"], n=89, accuracy=0.876)
    oracle = load_oracle(tmp_path)
    images = torch.rand(3, 3, SIZE, SIZE)
    p = torch.sigmoid(net.eval()((images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                                 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)).reshape(-1))
    assert oracle.classes == ["3", "8"] and oracle.infos[0].head == "sigmoid"
    assert torch.allclose(oracle(images), torch.stack([1 - p, p], 1), atol=1e-5)
    assert oracle.member_probs(images).shape == (3, 1, 2)
    assert oracle.accuracy["ensemble"]["correct"] == 78 and "0.876" in oracle.accuracy_summary()
    assert any("record no image list" in w for w in independence_warnings(tmp_path, _judge_like(tmp_path)))


def _judge_like(folder: Path) -> Path:
    other = folder.parent / (folder.name + "_judge")
    _random_member_folder(other, "lenet", ["3", "8"])
    return other


# --------------------------------------------------------------------------------------------------------------------
# Classes and independence
# --------------------------------------------------------------------------------------------------------------------
def test_require_classes_gives_columns_or_names_the_missing_and_known_classes(tmp_path) -> None:
    _random_member_folder(tmp_path, "logistic", [str(d) for d in range(10)])
    oracle = load_oracle(tmp_path)
    assert require_classes(oracle, ["8", "3"]) == [8, 3]  # a ten-class oracle serves any pair
    with pytest.raises(ConfigError, match=r"judge_dir .*knows classes \['0', '1'.*'9'\], not \['cat'\]") as err:
        require_classes(oracle, ["3", "cat"], key="judge_dir")
    assert err.value.key == "judge_dir"


def test_independence_warnings(trained, shapes, tmp_path) -> None:
    oracle_dir, _ = trained
    assert "is the oracle_dir" in independence_warnings(oracle_dir, oracle_dir)[0]
    judge = tmp_path / "judge"  # other families would be used for real; logistic is the fastest to train here
    train_classifiers(_cfg(judge, shapes, "architectures=[logistic]", "train_part=[1,2]", "min_accuracy=0",
                           "epochs=1", "seed=3"))
    warnings = independence_warnings(oracle_dir, judge)
    assert len(warnings) == 1 and "both have logistic members" in warnings[0]  # other part: no image in common
    overlap = tmp_path / "overlap"
    train_classifiers(_cfg(overlap, shapes, "architectures=[logistic]", "min_accuracy=0", "epochs=1"))  # all parts
    (message,) = [w for w in independence_warnings(oracle_dir, overlap) if "images" in w]
    assert "60 of the 120 images it trained or validated on" in message
    assert "train/" in message and "train_part" in message
    shutil.copy(oracle_dir / "lenet.safetensors", judge / "lenet.safetensors")
    shutil.copy(oracle_dir / "lenet.json", judge / "lenet.json")
    assert any("same bytes as oracle member" in w and "lenet" in w for w in independence_warnings(oracle_dir, judge))


def test_summary_line_reports_a_pair() -> None:
    record = accuracy_record(torch.eye(3).repeat(2, 1)[:, None], torch.arange(3).repeat(2), ["m"], ["a", "b", "c"],
                             "test")
    assert summary_line(record, ["c", "a"]).endswith("on c/a alone 1.000 [0.510, 1.000] (n=4)")


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
                                     "clip_pretrained=null", "epochs=30", "learning_rate=1e-2", "min_accuracy=0"))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["clip_probe.json", "clip_probe.safetensors", "config.yaml", "run_info.json", "test_metrics.json"]
    head = load_file(str(folder / "clip_probe.safetensors"))
    assert set(head) == {"weight", "bias"} and head["weight"].shape[0] == 3  # the head alone, one row per class
    info = json.loads((folder / "clip_probe.json").read_text())
    assert info["clip_model"] == tiny_clip and info["input_size"] == SIZE
    assert metrics["accuracy"]["clip_probe"] >= 0.5, metrics["accuracy"]  # chance is 1/3
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
           f"output_dir={out}", f"data.root={tmp_path / 'digits'}", "data.num_samples=12", "epochs=2",
           "architectures=[lenet]", "min_accuracy=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread_module fixture, for the same reasons
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lenet |" in proc.stdout and "| ensemble |" in proc.stdout and "[95% CI]" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "run_info.json", "lenet.safetensors", "lenet.json", "test_metrics.json"} == names
    assert json.loads((out / "test_metrics.json").read_text())["classes"] == [str(d) for d in range(10)]
    bad = subprocess.run(cmd + ["patience=-1"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "patience" in bad.stderr
    gated = subprocess.run(cmd[:-1] + ["min_accuracy=1", "epochs=1", f"output_dir={tmp_path / 'gated'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300, env=env)
    assert gated.returncode == 2 and "no member reached min_accuracy 1" in gated.stderr
    assert not list((tmp_path / "gated").glob("*.safetensors"))


def test_the_run_log_gives_the_oracles_accuracy_on_the_runs_pair(caplog) -> None:
    """An editing run between two digits logs the shipped oracle's accuracy on that pair, not only on ten digits."""
    from diffusion.edit.run import _load_classifier

    with caplog.at_level(logging.INFO, logger="diffusion.edit.run"):
        _load_classifier(str(REPO / "assets" / "mini_digits_oracle"), "oracle_dir", ["4", "9"], torch.device("cpu"))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("oracle: ")]
    assert "ensemble test accuracy" in line and "on 4/9 alone" in line
