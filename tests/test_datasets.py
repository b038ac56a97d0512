"""The data layer: every image mode, bad files, the folder layout, file lists, the registry and the data builders.

Fast and offline: every file is written into ``tmp_path`` by the test itself.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.celebahq import prepare_celebahq
from datasets.digits import MANIFEST_NAME, export_digits
from datasets.folder import (
    DatasetLayoutError,
    ImageRecord,
    ImageRecordDataset,
    build_records,
    collate_skip_bad,
    discover_classes,
    list_class_files,
)
from datasets.images import IMAGE_EXTENSIONS, BadImageError, is_image_file, load_image, resize
from datasets.registry import DATASETS, DatasetSpec, UnknownDatasetError, get_spec, resolve_classes

REPO_ROOT = Path(__file__).resolve().parents[1]


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _check_image(x: torch.Tensor, height: int, width: int) -> None:
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, height, width)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def _make_tree(root: Path, split: str, counts: dict[str, int], ext: str = ".png") -> None:
    """root/<split>/<class>/<i>.<ext> small RGB images, i = 0..count-1 written in reverse order."""
    for class_name, count in counts.items():
        for i in reversed(range(count)):
            _save(Image.new("RGB", (6, 4), (10 * i, 0, 0)), root / split / class_name / f"img{i:02d}{ext}")


# --------------------------------------------------------------------------------------------------------------------
# images.py
# --------------------------------------------------------------------------------------------------------------------
def test_extensions_are_case_insensitive() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"} == set(IMAGE_EXTENSIONS)
    assert is_image_file("a/B.PNG") and is_image_file("scan.Tiff") and is_image_file("x.NPY")
    assert not is_image_file("notes.txt") and not is_image_file("README")


def test_rgb_and_grey_modes(tmp_path: Path) -> None:
    rgb = load_image(_save(Image.new("RGB", (5, 3), (255, 0, 51)), tmp_path / "rgb.png"))
    _check_image(rgb, 3, 5)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))

    grey = load_image(_save(Image.new("L", (4, 2), 128), tmp_path / "grey.png"))
    _check_image(grey, 2, 4)
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255))

    bits = Image.new("1", (3, 3), 0)
    bits.putpixel((1, 1), 1)
    one = load_image(_save(bits, tmp_path / "one.png"))
    _check_image(one, 3, 3)
    assert one[:, 1, 1].tolist() == [1.0, 1.0, 1.0] and one[:, 0, 0].tolist() == [0.0, 0.0, 0.0]

    cmyk = load_image(_save(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100))
    _check_image(cmyk, 3, 3)
    assert cmyk[0].mean() > 0.9 and cmyk[1:].mean() < 0.1  # pure red


def test_alpha_is_composited_over_background(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 2), (200, 100, 0, 255))
    rgba.putpixel((0, 0), (200, 100, 0, 0))  # fully transparent
    rgba.putpixel((1, 0), (200, 100, 0, 128))  # half transparent
    path = _save(rgba, tmp_path / "rgba.png")
    on_white = load_image(path)
    on_black = load_image(path, background=(0, 0, 0))
    assert torch.allclose(on_white[:, 0, 0], torch.ones(3))
    assert torch.allclose(on_black[:, 0, 0], torch.zeros(3))
    assert torch.allclose(on_black[:, 1, 1], torch.tensor([200, 100, 0]) / 255)  # opaque: background is irrelevant
    assert torch.allclose(on_white[:, 1, 1], on_black[:, 1, 1])
    a = 128 / 255  # out = a * pixel + (1 - a) * background
    expected_white = torch.tensor([200, 100, 0]) / 255 * a + (1 - a)
    expected_black = torch.tensor([200, 100, 0]) / 255 * a
    assert torch.allclose(on_white[:, 0, 1], expected_white, atol=1e-5)
    assert torch.allclose(on_black[:, 0, 1], expected_black, atol=1e-5)

    la = Image.new("LA", (2, 2), (50, 0))
    assert torch.allclose(load_image(_save(la, tmp_path / "la.png"), background=(0, 255, 0))[:, 0, 0],
                          torch.tensor([0.0, 1.0, 0.0]))


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)  # 0 = red, 1 = blue
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette(palette)
    pal.putpixel((1, 0), 1)
    plain = load_image(_save(pal, tmp_path / "p.png"))
    assert plain[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and plain[:, 0, 1].tolist() == [0.0, 0.0, 1.0]

    keyed = load_image(_save(pal, tmp_path / "p_trans.png", transparency=0), background=(0, 255, 0))
    assert keyed[:, 0, 0].tolist() == [0.0, 1.0, 0.0]  # the transparent index shows the background
    assert keyed[:, 0, 1].tolist() == [0.0, 0.0, 1.0]
    gif = load_image(_save(pal, tmp_path / "p_trans.gif", transparency=0), background=(0, 255, 0))
    assert gif[:, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_16_bit_greyscale_uses_the_full_range(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    for name, array in (("little.png", values), ("big.tif", values.astype(">u2"))):
        img = Image.fromarray(array)
        assert img.mode.startswith("I;16")
        x = load_image(_save(img, tmp_path / name))
        _check_image(x, 1, 3)
        assert x[:, 0, 0].tolist() == [0.0, 0.0, 0.0]
        assert torch.allclose(x[:, 0, 1], torch.full((3,), 32768 / 65535))
        assert x[:, 0, 2].tolist() == [1.0, 1.0, 1.0]
    big_endian = Image.new("I;16B", (2, 2), 65535)
    assert big_endian.mode == "I;16B"
    assert torch.allclose(load_image(_save(big_endian, tmp_path / "b.tif")), torch.ones(3, 2, 2))


def test_32_bit_and_float_greyscale(tmp_path: Path) -> None:
    int32 = np.array([[0, 2**31 - 1]], dtype=np.int32)
    x = load_image(_save(Image.fromarray(int32), tmp_path / "i32.tif"))
    assert x[:, 0, 0].tolist() == [0.0] * 3 and x[:, 0, 1].tolist() == [1.0] * 3

    unit = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    f = load_image(_save(Image.fromarray(unit), tmp_path / "f.tif"))
    assert torch.allclose(f[0, 0], torch.tensor([0.0, 0.25, 1.0]))
    wide = load_image(_save(Image.fromarray(unit * 8 - 2), tmp_path / "wide.tif"))  # outside [0, 1]: min-max
    assert torch.allclose(wide[0, 0], torch.tensor([0.0, 0.25, 1.0]))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 2, 4))  # white left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    x = load_image(path)
    _check_image(x, 8, 4)  # stored 8 wide x 4 high, shown 4 wide x 8 high
    assert x[:, :2].mean() > 0.9 and x[:, -2:].mean() < 0.1  # the left edge is now on top


def test_npy_arrays(tmp_path: Path) -> None:
    grid = np.arange(12, dtype=np.float64).reshape(3, 4) * 3 - 7
    scaled = (grid - grid.min()) / (grid.max() - grid.min())
    cases = {
        "float_hw.npy": grid.astype(np.float32),
        "int_hw.npy": np.arange(12, dtype=np.int16).reshape(3, 4),
        "hw1.npy": grid[..., None],
        "1hw.npy": grid[None],
    }
    for name, array in cases.items():
        np.save(tmp_path / name, array)
        x = load_image(tmp_path / name)
        _check_image(x, 3, 4)
        assert torch.allclose(x[0], torch.from_numpy(scaled).float(), atol=1e-6), name
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated to 3 channels

    colour = np.zeros((3, 4, 3), dtype=np.float32)
    colour[..., 0], colour[..., 2] = 10.0, 5.0
    np.save(tmp_path / "hw3.npy", colour)
    np.save(tmp_path / "3hw.npy", np.moveaxis(colour, -1, 0))
    for name in ("hw3.npy", "3hw.npy"):
        x = load_image(tmp_path / name)
        _check_image(x, 3, 4)
        assert x[:, 0, 0].tolist() == [1.0, 0.0, 0.5], name  # min-max over the whole array, not per channel

    np.save(tmp_path / "constant.npy", np.full((5, 6), 7.5))
    assert torch.equal(load_image(tmp_path / "constant.npy"), torch.zeros(3, 5, 6))


@pytest.mark.parametrize(
    "array, what",
    [
        (np.zeros((2, 3, 4, 5)), "shape"),
        (np.zeros((4, 5, 2)), "shape"),
        (np.zeros((0, 5)), "shape"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([["a", "b"]]), "dtype"),
    ],
)
def test_bad_npy_arrays(tmp_path: Path, array: np.ndarray, what: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(BadImageError, match=what) as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_corrupt_truncated_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    short_npy = tmp_path / "short.npy"
    np.save(short_npy, np.zeros((8, 8)))
    short_npy.write_bytes(short_npy.read_bytes()[:100])
    for path in (garbage, truncated, pickled, short_npy, tmp_path / "absent.png"):
        with pytest.raises(BadImageError) as info:
            load_image(path)
        assert str(path) in str(info.value), path
        assert isinstance(info.value, ValueError)


def test_bad_image_error_survives_dataloader_reraise() -> None:
    """torch's DataLoader rebuilds a worker's exception from its message alone; that must still work."""
    err = BadImageError("worker said: Cannot read image x.png")
    assert str(err) == "worker said: Cannot read image x.png" and err.path is None


def test_resize_squeezes_without_crop() -> None:
    img = torch.zeros(3, 10, 40)
    img[:, :, :20] = 1.0  # left half white
    out = resize(img, 16)
    _check_image(out, 16, 16)
    assert out[:, :, :7].min() > 0.99 and out[:, :, 9:].max() < 0.01  # the whole width kept: no crop
    sharp = torch.zeros(3, 64, 64)
    sharp[:, ::2] = 1.0
    assert 0.0 <= float(resize(sharp, 7).min()) and float(resize(sharp, 7).max()) <= 1.0


# --------------------------------------------------------------------------------------------------------------------
# folder.py
# --------------------------------------------------------------------------------------------------------------------
def test_listing_is_sorted_filtered_and_capped(tmp_path: Path) -> None:
    _make_tree(tmp_path, "train", {"a": 5})
    class_dir = tmp_path / "train" / "a"
    (class_dir / ".hidden.png").write_bytes(b"")
    (class_dir / "._img00.png").write_bytes(b"")  # macOS resource fork
    (class_dir / "notes.txt").write_text("not an image")
    (class_dir / "subfolder").mkdir()
    _save(Image.new("RGB", (2, 2)), class_dir / "UPPER.JPG")
    files = list_class_files(tmp_path, "train", "a")
    assert [p.name for p in files] == ["UPPER.JPG", "img00.png", "img01.png", "img02.png", "img03.png", "img04.png"]
    assert [p.name for p in list_class_files(tmp_path, "train", "a", num_samples=2)] == ["UPPER.JPG", "img00.png"]
    assert len(list_class_files(tmp_path, "train", "a", num_samples=100)) == 6
    assert [p.name for p in list_class_files(tmp_path, "train", "a", extensions=("JPG",))] == ["UPPER.JPG"]
    with pytest.raises(ValueError, match="num_samples"):
        list_class_files(tmp_path, "train", "a", num_samples=0)


def test_file_list_keeps_order_and_ignores_comments(tmp_path: Path) -> None:
    _make_tree(tmp_path, "test", {"a": 4})
    listing = tmp_path / "a.txt"
    listing.write_text("# chosen for the user study\n\nimg03.png\n  img01.png  \n# img02.png\nimg00.png\nimg03.png\n")
    files = list_class_files(tmp_path, "test", "a", file_list=listing)
    assert [p.name for p in files] == ["img03.png", "img01.png", "img00.png"]
    assert [p.name for p in list_class_files(tmp_path, "test", "a", num_samples=2, file_list=listing)] == [
        "img03.png", "img01.png"]

    listing.write_text("img00.png\nmissing1.png\nIMG01.png\n")
    with pytest.raises(DatasetLayoutError) as info:
        list_class_files(tmp_path, "test", "a", file_list=listing)
    message = str(info.value)
    assert "missing1.png" in message and "IMG01.png" in message and str(tmp_path / "test" / "a") in message
    assert "img00.png" not in message.split(":", 1)[1]

    listing.write_text("test/a/img00.png\n")
    with pytest.raises(ValueError, match="bare file name"):
        list_class_files(tmp_path, "test", "a", file_list=listing)
    with pytest.raises(FileNotFoundError, match="no_such_list"):
        list_class_files(tmp_path, "test", "a", file_list=tmp_path / "no_such_list.txt")


def test_missing_and_empty_folders_say_what_was_found(tmp_path: Path) -> None:
    _make_tree(tmp_path, "train", {"cat": 1, "dog": 1})
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        list_class_files(tmp_path, "test", "cat")
    assert "[train, val]" in str(info.value) and str(tmp_path / "test") in str(info.value)

    with pytest.raises(FileNotFoundError) as info:
        list_class_files(tmp_path, "train", "Cat")
    assert "[cat, dog]" in str(info.value) and str(tmp_path / "train" / "Cat") in str(info.value)

    empty = tmp_path / "train" / "bird"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    (empty / "b.txt").write_text("x")
    (empty / "nested").mkdir()
    with pytest.raises(DatasetLayoutError) as info:
        list_class_files(tmp_path, "train", "bird")
    message = str(info.value)
    assert "found 3 visible entries" in message and ".txt" in message and "nested" in message

    with pytest.raises(DatasetLayoutError, match="not a folder"):
        discover_classes(tmp_path / "nowhere", "train")


def test_records_for_many_classes_and_a_val_split(tmp_path: Path) -> None:
    _make_tree(tmp_path, "val", {"c0": 2, "c1": 3, "c2": 1, "c3": 2})
    assert discover_classes(tmp_path, "val") == ["c0", "c1", "c2", "c3"]
    with pytest.raises(FileNotFoundError, match="val"):  # 'test' is never mapped onto 'val'
        build_records(tmp_path, "test", ["c0", "c1"])
    classes = ["c2", "c0", "c3"]
    records = build_records(tmp_path, "val", classes, num_samples=1)
    assert records == [
        ImageRecord(tmp_path / "val" / "c2" / "img00.png", 0, "c2"),
        ImageRecord(tmp_path / "val" / "c0" / "img00.png", 1, "c0"),
        ImageRecord(tmp_path / "val" / "c3" / "img00.png", 2, "c3"),
    ]
    assert len(build_records(tmp_path, "val", ["c1"])) == 3  # one class is allowed
    listing = tmp_path / "c1.txt"
    listing.write_text("img02.png\n")
    with_list = build_records(tmp_path, "val", ["c0", "c1"], file_lists={"c1": listing})
    assert [(r.class_name, r.path.name) for r in with_list] == [("c0", "img00.png"), ("c0", "img01.png"),
                                                                 ("c1", "img02.png")]
    with pytest.raises(ValueError, match="duplicates"):
        build_records(tmp_path, "val", ["c0", "c0"])
    with pytest.raises(ValueError, match="c9"):
        build_records(tmp_path, "val", ["c0"], file_lists={"c9": listing})


def test_dataset_items_and_bad_file_policies(tmp_path: Path) -> None:
    _make_tree(tmp_path, "train", {"a": 2, "b": 2})
    (tmp_path / "train" / "b" / "img01.png").write_bytes(b"not a png at all")
    records = build_records(tmp_path, "train", ["a", "b"])

    strict = ImageRecordDataset(records, size=8)
    item = strict[0]
    _check_image(item["pixel_values"], 8, 8)
    assert item["label"] == 0 and item["index"] == 0 and item["path"] == str(records[0].path)
    with pytest.raises(BadImageError, match="img01.png"):
        strict[3]

    lenient = ImageRecordDataset(records, size=8, on_bad_file="skip")
    assert lenient[3] is None
    batches = list(DataLoader(lenient, batch_size=4, collate_fn=collate_skip_bad))
    assert len(batches) == 1
    batch = batches[0]
    assert tuple(batch["pixel_values"].shape) == (3, 3, 8, 8)
    assert batch["label"].tolist() == [0, 0, 1] and batch["index"].tolist() == [0, 1, 2]
    assert batch["path"] == [str(r.path) for r in records[:3]]
    assert collate_skip_bad([None, None]) is None

    with pytest.raises(ValueError, match="on_bad_file"):
        ImageRecordDataset(records, size=8, on_bad_file="ignore")  # type: ignore[arg-type]


def test_skipped_file_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    dataset = ImageRecordDataset([ImageRecord(bad, 0, "a")], size=4, on_bad_file="skip")
    with caplog.at_level("WARNING", logger="datasets.folder"):
        assert dataset[0] is None
    assert str(bad) in caplog.text


# --------------------------------------------------------------------------------------------------------------------
# registry.py
# --------------------------------------------------------------------------------------------------------------------
def test_registry_entries() -> None:
    expected = {
        "folder": (),
        "butterfly": ("Monarch", "Viceroy"),
        "kermany": ("DRUSEN", "NORMAL"),
        "afhq": ("dog", "cat"),
        "kikibouba": ("kiki", "bouba"),
        "mad_sane": ("MAD", "SANE"),
        "celebahq": ("serious", "smiling"),
        "digits": tuple("0123456789"),
    }
    assert {name: spec.classes for name, spec in DATASETS.items()} == expected
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec) and spec.name == name and spec.layout
        assert spec.extensions is None or set(spec.extensions) <= IMAGE_EXTENSIONS
    assert DATASETS["mad_sane"].extensions == (".npy",)
    assert "val" in DATASETS["afhq"].layout and "OCT2017" in DATASETS["kermany"].layout
    assert get_spec("kermany") is DATASETS["kermany"]


def test_unknown_dataset_suggests_close_names() -> None:
    with pytest.raises(KeyError) as info:
        get_spec("kermani")
    assert isinstance(info.value, UnknownDatasetError)
    assert "'kermany'" in str(info.value) and "celebahq" in str(info.value)


def test_resolve_classes(tmp_path: Path) -> None:
    _make_tree(tmp_path, "train", {"zebra": 1, "ant": 1, "mole": 1})
    folder = get_spec("folder")
    assert resolve_classes(folder, tmp_path, "train") == ["ant", "mole", "zebra"]
    assert resolve_classes(folder, tmp_path, "train", ["zebra", "ant"]) == ["zebra", "ant"]
    assert resolve_classes(get_spec("kermany"), tmp_path, "train") == ["DRUSEN", "NORMAL"]
    assert resolve_classes(get_spec("kermany"), tmp_path, "train", ["CNV", "NORMAL"]) == ["CNV", "NORMAL"]
    (tmp_path / "empty_split").mkdir()
    with pytest.raises(FileNotFoundError, match="No class folders"):
        resolve_classes(folder, tmp_path, "empty_split")
    with pytest.raises(ValueError, match="duplicates"):
        resolve_classes(folder, tmp_path, "train", ["ant", "ant"])


def test_mad_sane_reads_only_arrays(tmp_path: Path) -> None:
    for class_name in ("MAD", "SANE"):
        (tmp_path / "train" / class_name).mkdir(parents=True)
        np.save(tmp_path / "train" / class_name / "0.npy", np.eye(4))
        _save(Image.new("RGB", (2, 2)), tmp_path / "train" / class_name / "preview.png")
    spec = get_spec("mad_sane")
    records = build_records(tmp_path, "train", resolve_classes(spec, tmp_path, "train"), extensions=spec.extensions)
    assert [(r.class_name, r.path.name) for r in records] == [("MAD", "0.npy"), ("SANE", "0.npy")]
    _check_image(ImageRecordDataset(records, size=8)[1]["pixel_values"], 8, 8)


# --------------------------------------------------------------------------------------------------------------------
# digits.py and celebahq.py
# --------------------------------------------------------------------------------------------------------------------
def test_export_digits_layout_and_idempotence(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    assert export_digits(root, size=12) == root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temporary folder left behind
    spec = get_spec("digits")
    classes = resolve_classes(spec, root, "train")
    train = build_records(root, "train", classes, extensions=spec.extensions)
    test = build_records(root, "test", classes, extensions=spec.extensions)
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.25) < 0.01
    assert {r.label for r in test} == set(range(10))
    assert not {r.path.name for r in train} & {r.path.name for r in test}
    with Image.open(train[0].path) as img:
        assert img.mode == "L" and img.size == (12, 12)
    first = ImageRecordDataset(test, size=12)[0]["pixel_values"]
    assert float(first.max()) > 0.5  # real strokes, not a blank page

    stamp = train[0].path.stat().st_mtime_ns
    assert export_digits(root, size=12) == root  # already complete: nothing rewritten
    assert train[0].path.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="size"):
        export_digits(root, size=16)
    train[0].path.unlink()
    with pytest.raises(FileExistsError, match="changed after export"):
        export_digits(root, size=12)
    assert (root / MANIFEST_NAME).is_file()


def test_export_digits_refuses_unrelated_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a digits export"):
        export_digits(tmp_path, size=8)


def _write_celebahq(tmp_path: Path, smiling: dict[str, int], columns=("Attractive", "Smiling", "Young")) -> tuple:
    image_dir = tmp_path / "CelebA-HQ-img"
    for name in smiling:
        _save(Image.new("RGB", (4, 4), (len(name), 0, 0)), image_dir / name)
    lines = [str(len(smiling)), " ".join(columns)]
    for name, value in smiling.items():
        values = ["1" if c != "Smiling" else str(value) for c in columns]
        lines.append(f"{name}  {' '.join(values)}")
    attribute_file = tmp_path / "CelebAMask-HQ-attribute-anno.txt"
    attribute_file.write_text("\n".join(lines) + "\n")
    return image_dir, attribute_file


def test_prepare_celebahq(tmp_path: Path) -> None:
    labels = {f"{i}.jpg": (1 if i % 3 == 0 else -1) for i in range(12)}
    image_dir, attribute_file = _write_celebahq(tmp_path, labels)
    out = tmp_path / "celebahq"
    assert prepare_celebahq(image_dir, attribute_file, out, test_fraction=0.25) == out
    smiling_names = sorted(n for n, v in labels.items() if v == 1)  # 0, 3, 6, 9 -> string order 0, 3, 6, 9
    serious_names = sorted(n for n, v in labels.items() if v == -1)  # 1, 10, 11, 2, 4, 5, 7, 8
    listed = {
        (split, c): [p.name for p in list_class_files(out, split, c)]
        for split in ("train", "test") for c in ("serious", "smiling")
    }
    assert listed[("test", "smiling")] == smiling_names[-1:]
    assert listed[("train", "smiling")] == smiling_names[:-1]
    assert listed[("test", "serious")] == serious_names[-2:]
    assert listed[("train", "serious")] == serious_names[:-2]
    link = out / "train" / "smiling" / "0.jpg"
    assert link.is_symlink() and link.resolve() == (image_dir / "0.jpg").resolve()
    assert prepare_celebahq(image_dir, attribute_file, out, test_fraction=0.25) == out  # complete: no-op

    copies = tmp_path / "copies"
    prepare_celebahq(image_dir, attribute_file, copies, test_fraction=0.25, link=False)
    assert not (copies / "train" / "smiling" / "0.jpg").is_symlink()
    assert (copies / "train" / "smiling" / "0.jpg").read_bytes() == (image_dir / "0.jpg").read_bytes()


def test_prepare_celebahq_errors(tmp_path: Path) -> None:
    labels = {f"{i}.jpg": (1 if i % 2 else -1) for i in range(6)}
    image_dir, attribute_file = _write_celebahq(tmp_path, labels, columns=("Attractive", "Smile", "Young"))
    with pytest.raises(ValueError, match="no 'Smiling' column.*Smile"):
        prepare_celebahq(image_dir, attribute_file, tmp_path / "out")

    image_dir, attribute_file = _write_celebahq(tmp_path, labels)
    (image_dir / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 images.*3\.jpg"):
        prepare_celebahq(image_dir, attribute_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# The package name shadows Hugging Face's `datasets`: ours must stay light and importable next to the HF stack.
# --------------------------------------------------------------------------------------------------------------------
def _python_in_repo(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_package_import_is_light() -> None:
    result = _python_in_repo(
        "import sys, datasets, datasets.registry; "
        "heavy = [m for m in ('torch', 'PIL', 'numpy', 'sklearn') if m in sys.modules]; "
        "print(datasets.__file__); print(heavy)"
    )
    assert result.returncode == 0, result.stderr
    path, heavy = result.stdout.strip().splitlines()
    assert Path(path).resolve() == (REPO_ROOT / "datasets" / "__init__.py").resolve()
    assert heavy == "[]"


def test_hugging_face_stack_imports_next_to_our_datasets() -> None:
    missing = [m for m in ("diffusers", "transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # find_spec instead of importorskip: importing the stack here too would double the test's time
        pytest.skip(f"not installed: {', '.join(missing)}")
    result = _python_in_repo(
        "import diffusers, transformers, peft, accelerate; import datasets.registry; import datasets; "
        "print(datasets.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]).resolve() == (REPO_ROOT / "datasets" / "__init__.py").resolve()
