"""scripts/save_embeds.py's work end to end: mixed image modes, rows equal the encoder's output, resumption."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.images import load_image, resize
from diffusion.config import EmbedsConfig, load_config
from diffusion.demo.tiny import make_tiny_model
from diffusion.embeddings import EmbeddingsError, caller_meta, load_class_embeds, save_class_embeds
from diffusion.models import load_image_encoder
import diffusion.precompute as precompute


def _mixed_folder(root):
    """train/{a,b}: RGB, L, RGBA, P, I;16, .npy and (in b) a corrupt file."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        rgb = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(d / "1_rgb.png")
        Image.fromarray(rgb[..., 0]).save(d / "2_grey.png")
        Image.fromarray(np.dstack([rgb, np.full((20, 20), 128, np.uint8)])).save(d / "3_rgba.png")
        Image.fromarray(rgb).convert("P").save(d / "4_palette.png")
        Image.fromarray(rng.integers(0, 65535, (20, 20)).astype(np.uint16)).save(d / "5_grey16.png")
        np.save(d / "6_array.npy", rng.normal(size=(20, 20)).astype(np.float32))
    (root / "train" / "b" / "7_corrupt.png").write_bytes(b"not an image at all")


def _config(tmp_path, tiny_model, data_root, **over) -> EmbedsConfig:
    overrides = [f"output_dir={tmp_path / 'embeds'}", f"model.decoder={tiny_model / 'decoder'}",
                 f"model.prior={tiny_model / 'prior'}", "model.device=cpu", f"data.root={data_root}",
                 "batch_size=4"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(EmbedsConfig, None, overrides)


def test_mixed_modes_one_row_per_readable_image(tmp_path, tiny_model):
    root = tmp_path / "data"
    _mixed_folder(root)
    cfg = _config(tmp_path, tiny_model, root, **{"data.on_bad_file": "skip"})
    precompute.save_embeddings(cfg)
    encoder = load_image_encoder(cfg.model)
    for cls, n in (("a", 6), ("b", 6)):
        embeds, meta = load_class_embeds(cfg.output_dir, cls, expected_dim=32)
        assert embeds.shape == (n, 32) and len(meta["files"]) == n
        assert meta["split"] == "train" and meta["model"] == str(tiny_model / "prior")
        # row i is the encoder's output for files[i], loaded and resized as the editing run does (64 px)
        pixels = torch.stack([resize(load_image(root / f), 64) for f in meta["files"]])
        assert torch.allclose(embeds, encoder.embed(pixels), atol=1e-5)
    side = json.loads((tmp_path / "embeds" / "b.json").read_text())
    assert side["skipped"] == ["train/b/7_corrupt.png"]


def test_corrupt_file_without_skip_names_the_file(tmp_path, tiny_model):
    root = tmp_path / "data"
    _mixed_folder(root)
    with pytest.raises(Exception, match="7_corrupt.png"):
        precompute.save_embeddings(_config(tmp_path, tiny_model, root))


def test_resume_skips_complete_classes_and_redoes_missing_ones(tmp_path, tiny_model, blob_data, monkeypatch):
    cfg = _config(tmp_path, tiny_model, blob_data)
    precompute.save_embeddings(cfg)
    first = {c: load_class_embeds(cfg.output_dir, c)[0] for c in ("class_a", "class_b")}
    calls = []
    real = precompute.embed_class
    monkeypatch.setattr(precompute, "embed_class", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    precompute.save_embeddings(cfg)
    assert calls == []  # everything complete: nothing recomputed
    (tmp_path / "embeds" / "class_b.json").unlink()  # as if interrupted before class_b finished
    precompute.save_embeddings(cfg)
    assert calls == ["embed class_b"]
    again = {c: load_class_embeds(cfg.output_dir, c)[0] for c in ("class_a", "class_b")}
    assert all(torch.equal(first[c], again[c]) for c in first)  # deterministic
    precompute.save_embeddings(load_config(EmbedsConfig, None, [*_args(cfg), "overwrite=true"]))
    assert calls == ["embed class_b", "embed class_a", "embed class_b"]


def _args(cfg):
    return [f"output_dir={cfg.output_dir}", f"model.decoder={cfg.model.decoder}", f"model.prior={cfg.model.prior}",
            "model.device=cpu", f"data.root={cfg.data.root}"]


def test_a_moved_model_keeps_its_embeddings_and_other_weights_are_refused(tmp_path, tiny_model, blob_data,
                                                                          monkeypatch):
    cfg = _config(tmp_path, tiny_model, blob_data)
    precompute.save_embeddings(cfg)
    calls = []
    real = precompute.embed_class
    monkeypatch.setattr(precompute, "embed_class", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    # the same weights in another folder (a copied snapshot): judged by the encoder's fingerprint, nothing recomputed
    copy = tmp_path / "copied_model"
    shutil.copytree(tiny_model, copy)
    precompute.save_embeddings(_config(tmp_path, copy, blob_data))
    assert calls == []
    # other weights of the same shapes in a third folder: refused, naming the file, not overwritten
    other = make_tiny_model(tmp_path / "other_model", seed=1)
    before = (tmp_path / "embeds" / "class_a.safetensors").read_bytes()
    with pytest.raises(EmbeddingsError, match="class_a.json: made by another image encoder"):
        precompute.save_embeddings(_config(tmp_path, other, blob_data))
    assert calls == [] and (tmp_path / "embeds" / "class_a.safetensors").read_bytes() == before


def test_an_old_file_from_another_model_path_is_not_silently_reused(tmp_path, tiny_model, blob_data):
    cfg = _config(tmp_path, tiny_model, blob_data)
    precompute.save_embeddings(cfg)
    meta = json.loads((tmp_path / "embeds" / "class_a.json").read_text())
    meta["model"] = "someone/else"
    del meta["encoder_fingerprint"]  # written before fingerprints: only the path can tell
    (tmp_path / "embeds" / "class_a.json").write_text(json.dumps(meta))
    with pytest.raises(EmbeddingsError, match="overwrite"):
        precompute.save_embeddings(cfg)


def _strip_fingerprint(embeds_dir, cls, embeds=None):
    """Make ``cls``'s files look written by a version before fingerprints (optionally holding other ``embeds``)."""
    meta = json.loads((embeds_dir / f"{cls}.json").read_text())
    stored, _ = load_class_embeds(embeds_dir, cls)
    older = {k: v for k, v in caller_meta(meta).items() if k != "encoder_fingerprint"}
    save_class_embeds(embeds_dir, cls, stored if embeds is None else embeds, meta["files"], older,
                      skipped=meta["skipped"])
    assert "encoder_fingerprint" not in json.loads((embeds_dir / f"{cls}.json").read_text())


def test_an_old_file_without_a_fingerprint_is_checked_and_then_stamped(tmp_path, tiny_model, blob_data, caplog):
    cfg = _config(tmp_path, tiny_model, blob_data)
    precompute.save_embeddings(cfg)
    before, _ = load_class_embeds(cfg.output_dir, "class_a")
    _strip_fingerprint(tmp_path / "embeds", "class_a")
    with caplog.at_level(logging.INFO, logger="diffusion.precompute"):
        precompute.save_embeddings(cfg)
    assert "match this encoder" in caplog.text
    meta = json.loads((tmp_path / "embeds" / "class_a.json").read_text())
    assert meta["encoder_fingerprint"] == load_image_encoder(cfg.model).fingerprint
    after, _ = load_class_embeds(cfg.output_dir, "class_a")
    assert torch.equal(before, after)  # the stored embeddings are kept, not replaced


def test_an_old_file_from_another_encoder_is_refused_and_left_alone(tmp_path, tiny_model, blob_data):
    cfg = _config(tmp_path, tiny_model, blob_data)
    precompute.save_embeddings(cfg)
    stored, _ = load_class_embeds(cfg.output_dir, "class_a")
    other = torch.randn(stored.shape, generator=torch.Generator().manual_seed(0))  # not this encoder's output
    _strip_fingerprint(tmp_path / "embeds", "class_a", embeds=other)
    before = {f: (tmp_path / "embeds" / f).read_bytes() for f in ("class_a.json", "class_a.safetensors")}
    with pytest.raises(EmbeddingsError, match=r"class_a\.json: written by an older version .* another encoder"):
        precompute.save_embeddings(cfg)
    assert {f: (tmp_path / "embeds" / f).read_bytes() for f in before} == before


def test_missing_class_folder_lists_what_was_found(tmp_path, tiny_model, blob_data):
    cfg = _config(tmp_path, tiny_model, blob_data, **{"data.classes": "[class_a,class_c]"})
    with pytest.raises(FileNotFoundError) as err:
        precompute.save_embeddings(cfg)
    assert "class_c" in str(err.value) and "class_b" in str(err.value)
