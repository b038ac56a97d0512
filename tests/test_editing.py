"""The editing step: batching invariance, the t_skip searches and the exact count of UNet evaluations."""

from __future__ import annotations

import pytest
import torch

from diffusion.config import EditConfig, InversionCond, ModelConfig, SearchMode
from diffusion.editing import Editor, Search
from diffusion.models import load_decoder, load_image_encoder

T = 10


@pytest.fixture(scope="module")
def parts(tiny_model):
    cfg = ModelConfig(decoder=str(tiny_model / "decoder"), prior=str(tiny_model / "prior"), device="cpu")
    return load_decoder(cfg), load_image_encoder(cfg)


def _cfg(**kw) -> EditConfig:
    base = dict(output_dir="x", embeds_dir="y", num_inference_steps=T, batch_size=3,
                t_skips=[0.9, 0.7, 0.5, 0.3, 0.0], search=SearchMode.fixed, t_skip=0.6)
    base.update(kw)
    return EditConfig(**base)


def _inputs(encoder, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 64, 64, generator=g)
    e = encoder.embed(images)
    mu_s, mu_t = torch.randn(2, 32, generator=g) * 0.1
    return images, e, mu_s.expand(n, -1), mu_t.expand(n, -1)


def _gens(n, base=10):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


class DistanceOracle:
    """Fake oracle over classes [source, target]: 'target' once an image is far enough from its original."""

    classes = ("src", "tgt")

    def __init__(self, originals, threshold):
        self.originals, self.threshold, self.calls = originals, threshold, 0

    def __call__(self, images):
        self.calls += 1
        d = torch.stack([min((im - o).abs().mean() for o in self.originals) for im in images])
        p = (d > self.threshold).float()
        return torch.stack([1 - p, p], dim=1)


def test_a_batch_of_three_equals_three_single_runs(parts):
    decoder, encoder = parts
    images, e, mu_s, mu_t = _inputs(encoder)
    editor = Editor(decoder, _cfg(eta=[1.0, 2.0]), encoder.null_embedding())
    _, together = editor.edit(images, e, mu_s, mu_t, None, _gens(3))
    for b in range(3):
        _, alone = editor.edit(images[b:b + 1], e[b:b + 1], mu_s[:1], mu_t[:1], None, _gens(1, base=10 + b))
        for k, o in enumerate(alone):
            match = [x for x in together if x.image == b and x.eta == o.eta][0]
            diff = (match.chosen.picture - o.chosen.picture).abs().max()
            assert diff < 1e-3, (b, o.eta, float(diff))  # batched convolutions round differently; < 1/4 grey level


def test_fixed_search_counts_unet_evals_exactly(parts):
    decoder, encoder = parts
    images, e, mu_s, mu_t = _inputs(encoder, n=2)
    inv, outs = Editor(decoder, _cfg(), encoder.null_embedding()).edit(images, e, mu_s, mu_t, None, _gens(2))
    assert inv.evals == T  # null-conditioned inversion: one evaluation per step
    assert all(o.sampling_evals == 2 * (T - round(0.6 * T)) for o in outs)  # two branches per sampling step
    inv, _ = Editor(decoder, _cfg(inversion=InversionCond.source, inversion_guidance=2.0),
                    encoder.null_embedding()).edit(images, e, mu_s, mu_t, None, _gens(2))
    assert inv.evals == 2 * T  # guided inversion: two per step


def test_first_flip_stops_at_the_first_flip_and_counts_evals(parts):
    decoder, encoder = parts
    images, e, mu_s, mu_t = _inputs(encoder, n=3)
    t_skips = [0.9, 0.7, 0.5, 0.3, 0.0]
    # never flips: every t_skip is tried, the strongest edit is kept, not flipped
    never = DistanceOracle(images, threshold=1e9)
    ed = Editor(decoder, _cfg(search=SearchMode.first_flip, t_skips=t_skips), encoder.null_embedding(), never)
    inv, outs = ed.edit(images, e, mu_s, mu_t, [1, 1, 1], _gens(3), torch.zeros(3, dtype=torch.long))
    assert never.calls == len(t_skips)  # one oracle batch per round, all images together
    for o in outs:
        assert [a.t_skip for a in o.attempts] == t_skips and o.chosen.t_skip == 0.0 and o.flipped is False
        assert inv.evals + o.sampling_evals == T + sum(2 * (T - round(t * T)) for t in t_skips)
    # flips when the edit moved far enough: the chosen attempt is the first one that flipped
    ref = [o.chosen.picture for o in outs]
    dists = torch.stack([(r - images[o.image]).abs().mean() for r, o in zip(ref, outs)])
    threshold = float(dists.median()) * 0.5
    oracle = DistanceOracle(images, threshold=threshold)
    ed = Editor(decoder, _cfg(search=SearchMode.first_flip, t_skips=t_skips), encoder.null_embedding(), oracle)
    inv, outs = ed.edit(images, e, mu_s, mu_t, [1, 1, 1], _gens(3), torch.zeros(3, dtype=torch.long))
    for o in outs:
        flips = [bool(a.probs.argmax() == 1) for a in o.attempts]
        if o.flipped:
            assert flips[-1] and not any(flips[:-1]) and o.chosen is o.attempts[-1]
        expected = T + sum(2 * (T - round(a.t_skip * T)) for a in o.attempts)
        assert inv.evals + o.sampling_evals == expected
    assert any(o.flipped for o in outs)


@pytest.mark.parametrize("first", [0, 1, 2, 3, 4, 6, 7, None])
def test_search_state_machines(first):
    n = 8
    flips = (lambda k: first is not None and k >= first)
    for mode in (SearchMode.first_flip, SearchMode.bisect):
        s = Search(mode, n)
        while (k := s.next()) is not None:
            s.record(k, flips(k))
        assert s.chosen() == (first if first is not None else n - 1)
        if mode == SearchMode.bisect:
            assert len(s.tried) <= 4  # ceil(log2(8)) + 1
        else:
            assert len(s.tried) == (first + 1 if first is not None else n)


def test_bf16_model_runs_on_cpu_and_stays_close_to_fp32(tiny_model):
    """The GPU setting dtype: bfloat16 runs through the same code; the latent math stays float64."""
    cfg32 = ModelConfig(decoder=str(tiny_model / "decoder"), prior=str(tiny_model / "prior"), device="cpu",
                        dtype="float32")
    cfg16 = ModelConfig(decoder=str(tiny_model / "decoder"), prior=str(tiny_model / "prior"), device="cpu",
                        dtype="bfloat16", channels_last=True)
    encoder = load_image_encoder(cfg32)
    images, e, mu_s, mu_t = _inputs(encoder, n=2)
    pics = []
    for mcfg in (cfg32, cfg16):
        from diffusion.models import optimize_unet

        decoder = load_decoder(mcfg)
        optimize_unet(decoder, mcfg)
        inv, outs = Editor(decoder, _cfg(), encoder.null_embedding()).edit(images, e, mu_s, mu_t, None, _gens(2))
        assert inv.ws.dtype == torch.float64
        pics.append(torch.stack([o.chosen.picture for o in outs]))
    assert decoder.unet.dtype == torch.bfloat16
    err = (pics[0] - pics[1]).abs().mean()
    assert err < 0.02, float(err)  # mean pixel difference in [0, 1]
