"""Class means and the edited embedding against hand computations; the per-class embedding files."""

from __future__ import annotations

import pytest
import torch

from diffusion.embeddings import (
    EmbeddingsError, class_mean, edit_embedding, load_class_embeds, load_class_means, save_class_embeds,
)


def test_class_mean_is_the_mean_of_normalised_rows_not_renormalised():
    e = torch.tensor([[3.0, 4.0], [0.0, 2.0], [10.0, 0.0]])
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 1.0])) / 2
    assert torch.allclose(class_mean(e, num_images=2), expected)
    full = (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 1.0]) + torch.tensor([1.0, 0.0])) / 3
    assert torch.allclose(class_mean(e), full)
    assert class_mean(e).norm() < 1  # not renormalised


def test_edit_embedding_matches_the_formula_by_hand():
    e = torch.tensor([[3.0, 4.0]])  # norm 5
    mu_s, mu_t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = edit_embedding(e, mu_s, mu_t, 2.0)
    # 5 * ([0.6, 0.8] + 2 * [-1, 1]) = 5 * [-1.4, 2.8]
    assert torch.allclose(out, torch.tensor([[-7.0, 14.0]]))


def test_eta_zero_leaves_e_unchanged_and_sign_points_to_target():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 16, generator=g)
    mu_s, mu_t = torch.randn(16, generator=g), torch.randn(16, generator=g)
    assert torch.allclose(edit_embedding(e, mu_s, mu_t, 0.0), e, atol=1e-6)
    d = mu_t - mu_s
    before = e @ d / e.norm(dim=1)
    towards = edit_embedding(e, mu_s, mu_t, 1.0)
    away = edit_embedding(e, mu_s, mu_t, -1.0)
    assert bool(((towards @ d) / e.norm(dim=1) > before).all())
    assert bool(((away @ d) / e.norm(dim=1) < before).all())
    per_row = edit_embedding(e, mu_s, mu_t, torch.tensor([0.0, 1.0, -1.0, 0.0]))
    assert torch.allclose(per_row[1], towards[1]) and torch.allclose(per_row[2], away[2])


def test_embedding_files_round_trip_and_check_width(tmp_path):
    e = torch.randn(3, 8)
    save_class_embeds(tmp_path, "cat", e, ["a.png", "b.png", "c.png"], meta={"model": "m", "split": "train"})
    loaded, meta = load_class_embeds(tmp_path, "cat", expected_dim=8)
    assert torch.equal(loaded, e) and meta["files"] == ["a.png", "b.png", "c.png"] and meta["num_images"] == "3"
    with pytest.raises(EmbeddingsError, match="8-d .* 1280-d"):
        load_class_embeds(tmp_path, "cat", expected_dim=1280)
    with pytest.raises(EmbeddingsError, match="save_embeds"):
        load_class_means(tmp_path, ["cat", "dog"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
