"""The edit-friendly DDPM inversion math: exact reconstruction, batching, schedule arithmetic."""

from __future__ import annotations

import pytest
import torch

from diffusion.config import ModelConfig
from diffusion.inversion import ddpm_schedule
from diffusion.inversion import (
    cfg_eps, draw_forward_noise, edit_friendly_noise_maps, forward_noise, make_schedule, sample, step_index,
)
from diffusion.models import load_decoder, load_image_encoder
from diffusion.demo.tiny import kandinsky_scheduler


@pytest.fixture(scope="module")
def parts(tiny_model):
    cfg = ModelConfig(decoder=str(tiny_model / "decoder"), prior=str(tiny_model / "prior"), device="cpu")
    return load_decoder(cfg), load_image_encoder(cfg)


def test_schedule_follows_the_decoder_scheduler():
    s = ddpm_schedule(kandinsky_scheduler(), 100)
    assert s.T == 100 and s.timesteps[0] == 991 and s.timesteps[-1] == 1  # leading spacing, offset 1
    ac = kandinsky_scheduler().alphas_cumprod
    assert torch.allclose(s.alpha.float(), ac[s.timesteps]) and torch.allclose(s.alpha_prev[:-1].float(), ac[s.timesteps[1:]])
    assert s.alpha.dtype == torch.float64 and bool((s.sigma > 0).all())
    assert step_index(s, 0.9) == 90 and step_index(s, 0.0) == 0 and step_index(s, 1.0) == 100
    with pytest.raises(ValueError):
        make_schedule(ac, torch.tensor([1, 5]), 1.0)


def test_forward_noise_is_independent_per_step_and_seeded():
    s = ddpm_schedule(kandinsky_scheduler(), 10)
    w0 = torch.randn(2, 4, 3, 3)
    gens = lambda: [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]  # noqa: E731
    noise = draw_forward_noise(w0.shape[1:], s.T, gens())
    assert noise.shape == (10, 2, 4, 3, 3)
    assert torch.equal(noise, draw_forward_noise(w0.shape[1:], s.T, gens()))
    # image 1 alone draws exactly what it draws in the batch
    alone = draw_forward_noise(w0.shape[1:], s.T, [torch.Generator().manual_seed(2)])
    assert torch.equal(alone[:, 0], noise[:, 1])
    ws = forward_noise(w0, s, noise)
    assert torch.equal(ws[-1].float(), w0)
    a = s.alpha[3]
    assert torch.allclose(ws[3].float(), (a.sqrt() * w0 + (1 - a).sqrt() * noise[3]).float())


def _guided(decoder, sched, c0, cond, g):
    """eps_fn with classifier-free guidance g between c0 and cond[rows]."""

    def fn(w, steps, rows):
        t = sched.timesteps[steps]
        n = len(rows)
        eps = decoder.eps(torch.cat([w, w]), torch.cat([t, t]), torch.cat([c0.expand(n, -1), cond[rows]]))
        return cfg_eps(eps[:n], eps[n:], g)

    return fn


@torch.inference_mode()
@pytest.mark.parametrize("t_skip", [0.0, 0.5, 0.9])
def test_inversion_then_sampling_with_the_same_conditioning_is_exact(parts, t_skip):
    """Invert with CFG g on e, sample back with e' = e and the same g: w_0 within 1e-4 relative error."""
    decoder, encoder = parts
    sched = ddpm_schedule(decoder.scheduler, 20)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    w0 = decoder.encode(images)
    e = encoder.embed(images)
    c0 = encoder.null_embedding()
    noise = draw_forward_noise(w0.shape[1:], sched.T, [torch.Generator().manual_seed(i) for i in range(2)])
    ws = forward_noise(w0, sched, noise)
    fn = _guided(decoder, sched, c0, e, 4.0)
    zs = edit_friendly_noise_maps(ws, sched, fn, chunk_size=2)  # = the sampling batch: bitwise-equal UNet calls
    start = torch.full((2,), step_index(sched, t_skip))
    out = sample(ws, zs, sched, start, fn)
    rel = (out - w0).norm() / w0.norm()
    assert rel < 1e-4


@torch.inference_mode()
def test_t_skip_one_returns_w0_unchanged(parts):
    decoder, encoder = parts
    s = ddpm_schedule(decoder.scheduler, 10)
    w0 = torch.randn(1, 4, 32, 32)
    ws = forward_noise(w0, s, torch.randn(10, 1, 4, 32, 32))
    calls = []
    out = sample(ws, torch.zeros(10, 1, 4, 32, 32), s, torch.tensor([s.T]), lambda w, st, r: calls.append(1) or w)
    assert torch.equal(out, w0) and not calls


@torch.inference_mode()
def test_rows_with_different_starts_in_one_batch_equal_separate_runs(parts):
    decoder, encoder = parts
    sched = ddpm_schedule(decoder.scheduler, 10)
    w0 = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    ws = forward_noise(w0, sched, torch.randn(10, 2, 4, 32, 32, generator=torch.Generator().manual_seed(4)))
    zs = torch.randn(10, 2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    cond = torch.randn(3, 32, generator=torch.Generator().manual_seed(6))
    c0 = torch.zeros(1, 32)
    starts = torch.tensor([2, 7, 5])
    image_of_row = torch.tensor([0, 1, 0])
    together = sample(ws, zs, sched, starts, _guided(decoder, sched, c0, cond, 3.0), image_of_row)
    for r in range(3):
        alone = sample(ws, zs, sched, starts[r:r + 1], _guided(decoder, sched, c0, cond[r:r + 1], 3.0),
                       image_of_row[r:r + 1])
        assert torch.allclose(together[r], alone[0], atol=1e-5)
