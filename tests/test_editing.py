"""The editing engine: batching invariance, the t_skip searches and the exact count of UNet evaluations."""

from __future__ import annotations

import pytest
import torch

from diffusion.config import InversionCond, ModelConfig, SearchMode
from diffusion.edit.editor import Editor
from diffusion.edit.search import Search, bisect_plan
from diffusion.models import load_decoder, load_image_encoder

T = 10


@pytest.fixture(scope="module")
def parts(tiny_model):
    cfg = ModelConfig(decoder=str(tiny_model / "decoder"), prior=str(tiny_model / "prior"), device="cpu")
    return load_decoder(cfg), load_image_encoder(cfg)


def _edit(decoder, encoder, images, e, mu_s, mu_t, gens, oracle=None, target=None, pred=None, image_of=None,
          etas=(2.0,), search=SearchMode.fixed, t_skips=(0.6,), inversion=InversionCond.null, inversion_guidance=1.0,
          guidance=4.0, batch_size=3):
    """Invert ``images`` (per-image embeddings ``e``) and edit their items; returns (inversion, outcomes)."""
    editor = Editor(decoder, encoder.null_embedding(), batch_size=batch_size)
    inv = editor.invert(images, e, gens, T, inversion, inversion_guidance)
    plan = editor.plan_for(search, t_skips, T, inversion)
    outs = editor.edit(inv, mu_s, mu_t, list(etas), search, list(t_skips), guidance, image_of_item=image_of,
                       oracle=oracle, target_index=target, pred_before=pred, plan=plan)
    return inv, outs


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
    _, together = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(3), etas=(1.0, 2.0))
    for b in range(3):
        _, alone = _edit(decoder, encoder, images[b:b + 1], e[b:b + 1], mu_s[:1], mu_t[:1], _gens(1, base=10 + b),
                         etas=(1.0, 2.0))
        for k, o in enumerate(alone):
            match = [x for x in together if x.item == b and x.eta == o.eta][0]
            diff = (match.chosen.picture - o.chosen.picture).abs().max()
            assert diff < 1e-3, (b, o.eta, float(diff))  # batched convolutions round differently; < 1/4 grey level


def test_fixed_search_counts_unet_evals_exactly(parts):
    decoder, encoder = parts
    images, e, mu_s, mu_t = _inputs(encoder, n=2)
    inv, outs = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(2))
    depth = T - round(0.6 * T)  # sampling from T_skip needs the noise maps of the steps it runs, no more
    assert inv.counter.tolist() == [depth, depth]  # null-conditioned inversion: one evaluation per step
    assert all(o.sampling_evals == 2 * depth for o in outs)  # two branches per sampling step
    inv, _ = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(2), inversion=InversionCond.source,
                   inversion_guidance=2.0)
    assert inv.counter.tolist() == [2 * depth, 2 * depth]  # guided inversion: two per step


def test_first_flip_stops_at_the_first_flip_and_counts_evals(parts):
    decoder, encoder = parts
    images, e, mu_s, mu_t = _inputs(encoder, n=3)
    t_skips = [0.9, 0.7, 0.5, 0.3, 0.0]
    # never flips: every t_skip is tried, the strongest edit is kept, not flipped
    never = DistanceOracle(images, threshold=1e9)
    search = dict(search=SearchMode.first_flip, t_skips=t_skips, target=[1, 1, 1], pred=torch.zeros(3, dtype=torch.long))
    inv, outs = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(3), oracle=never, **search)
    assert never.calls == len(t_skips)  # one oracle batch per round, all images together
    for o in outs:
        assert [a.t_skip for a in o.attempts] == t_skips and o.chosen.t_skip == 0.0 and o.flipped is False
        assert int(inv.counter[o.item]) + o.sampling_evals == T + sum(2 * (T - round(t * T)) for t in t_skips)
    # flips when the edit moved far enough: the chosen attempt is the first one that flipped
    ref = [o.chosen.picture for o in outs]
    dists = torch.stack([(r - images[o.item]).abs().mean() for r, o in zip(ref, outs)])
    threshold = float(dists.median()) * 0.5
    oracle = DistanceOracle(images, threshold=threshold)
    inv, outs = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(3), oracle=oracle, **search)
    for o in outs:
        flips = [bool(a.probs.argmax() == 1) for a in o.attempts]
        if o.flipped:
            assert flips[-1] and not any(flips[:-1]) and o.chosen is o.attempts[-1]
        depth = max(T - round(a.t_skip * T) for a in o.attempts)  # inverted as deep as the strongest attempt
        expected = depth + sum(2 * (T - round(a.t_skip * T)) for a in o.attempts)
        assert int(inv.counter[o.item]) + o.sampling_evals == expected
    assert any(o.flipped for o in outs)


def _simulate(search: Search, first, depths, invert_cost=1):
    """Run a search against 'flips from index ``first`` on' (None: never); returns (chosen, UNet evaluations) with
    the lazy inversion's cost rule: 2 evals per sampling step, inversion steps paid once, when first needed."""
    cost = inverted = 0
    while (k := search.next()) is not None:
        cost += 2 * depths[k] + invert_cost * max(0, depths[k] - inverted)
        inverted = max(inverted, depths[k])
        search.record(k, first is not None and k >= first)
    return search.chosen(), cost


@pytest.mark.parametrize("first", [0, 1, 2, 3, 4, 6, 7, None])
def test_search_state_machines(first):
    n = 8
    depths = [1, 3, 5, 10, 20, 40, 70, 100]
    plan, _, _ = bisect_plan(depths)
    for mode, plan_ in ((SearchMode.first_flip, None), (SearchMode.bisect, None), (SearchMode.bisect, plan)):
        s = Search(mode, n, plan_)
        chosen, _ = _simulate(s, first, depths)
        assert chosen == (first if first is not None else n - 1), (mode, plan_ is None)
        if mode == SearchMode.bisect and plan_ is None:
            assert len(s.tried) <= 4  # ceil(log2(8)) + 1
        elif mode == SearchMode.first_flip:
            assert len(s.tried) == (first + 1 if first is not None else n)


@pytest.mark.parametrize("depths", [[1, 3, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
                                    [10, 20, 30, 40, 50, 60, 70, 80, 90, 100], [5] * 9, [0, 0, 4, 50]])
@pytest.mark.parametrize("invert_cost", [1, 2])
def test_bisect_plan_minimises_the_mean_cost(depths, invert_cost):
    n = len(depths)
    plan, worst, mean = bisect_plan(depths, 2, invert_cost)
    outcomes = [*range(n), None]
    weighted = [_simulate(Search(SearchMode.bisect, n, plan), f, depths, invert_cost) for f in outcomes]
    midpoint = [_simulate(Search(SearchMode.bisect, n), f, depths, invert_cost) for f in outcomes]
    costs, mid_costs = [c for _, c in weighted], [c for _, c in midpoint]
    assert max(costs) == worst and sum(costs) / (n + 1) == pytest.approx(mean)  # the plan's own figures
    assert mean <= sum(mid_costs) / (n + 1)  # never above the plain midpoint on average
    assert [k for k, _ in weighted] == [k for k, _ in midpoint]  # the same answers when flipping is monotone
    if len(set(depths)) == 1:  # equal costs: the midpoint search's mean
        assert mean == pytest.approx(sum(mid_costs) / (n + 1))
    if depths[0] == 1 and n == 13:  # the demo's list: the mildest flip costs one attempt, like first_flip
        assert costs[0] == 2 * 1 + invert_cost
    with pytest.raises(ValueError, match="non-decreasing"):
        bisect_plan(list(reversed(depths)) + [-1])


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
        inv, outs = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(2))
        assert inv.ws.dtype == torch.float64
        pics.append(torch.stack([o.chosen.picture for o in outs]))
    assert decoder.unet.dtype == torch.bfloat16
    err = (pics[0] - pics[1]).abs().mean()
    assert err < 0.02, float(err)  # mean pixel difference in [0, 1]


def test_lazy_inversion_computes_only_the_steps_sampling_needs_and_equals_the_full_one(parts):
    decoder, encoder = parts
    images, e, _, _ = _inputs(encoder, n=2)
    editor = Editor(decoder, encoder.null_embedding(), batch_size=3)
    with torch.inference_mode():
        lazy = editor.invert(images, e, _gens(2), T)
        assert lazy.counter.tolist() == [0, 0] and lazy.ready.tolist() == [T, T]  # nothing computed up front
        editor.ensure(lazy, torch.tensor([8]), torch.tensor([1]))  # image 1 from step 8: steps 8, 9 of image 1 only
        assert lazy.counter.tolist() == [0, 2] and lazy.ready.tolist() == [T, 8]
        editor.ensure(lazy, torch.tensor([5, 9]), torch.tensor([1, 0]))  # extends image 1 to 5, starts image 0 at 9
        assert lazy.counter.tolist() == [1, 5] and lazy.ready.tolist() == [9, 5]
        editor.ensure(lazy, torch.tensor([7]), torch.tensor([1]))  # already there: no network call
        assert lazy.counter.tolist() == [1, 5]
        full = editor.invert(images, e, _gens(2), T)
        editor.ensure(full, torch.tensor([0, 0]), torch.tensor([0, 1]))
        assert full.counter.tolist() == [T, T]
    assert torch.equal(lazy.ws, full.ws)
    # the same maps up to float32 batching (the UNet saw other batch companions); z is N(0, 1)-sized
    torch.testing.assert_close(lazy.zs[9:, 0], full.zs[9:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(lazy.zs[5:, 1], full.zs[5:, 1], rtol=0, atol=1e-4)
    assert lazy.zs[:9, 0].abs().max() == 0 and lazy.zs[:5, 1].abs().max() == 0  # never computed


@pytest.mark.parametrize("mode", [SearchMode.first_flip, SearchMode.bisect])
def test_searches_through_the_editor_count_the_lazy_inversion(parts, mode):
    decoder, encoder = parts
    images, e, mu_s, mu_t = _inputs(encoder, n=3)
    t_skips = [0.9, 0.8, 0.7, 0.5, 0.3, 0.0]
    oracle = DistanceOracle(images, threshold=0.0)  # every edit 'flips': the mildest t_skip is the answer
    inv, outs = _edit(decoder, encoder, images, e, mu_s, mu_t, _gens(3), oracle=oracle, search=mode, t_skips=t_skips,
                      target=[1, 1, 1], pred=torch.zeros(3, dtype=torch.long))
    for o in outs:
        assert o.chosen.t_skip == 0.9 and o.flipped
        depth = max(T - round(a.t_skip * T) for a in o.attempts)
        assert int(inv.counter[o.item]) + o.sampling_evals == depth + sum(2 * (T - round(a.t_skip * T))
                                                                        for a in o.attempts)
    if mode == SearchMode.first_flip:
        assert all(len(o.attempts) == 1 for o in outs)


def test_an_image_with_several_targets_is_inverted_once_and_edits_as_if_alone(parts):
    decoder, encoder = parts
    images, e, mu_s, _ = _inputs(encoder, n=2)
    g = torch.Generator().manual_seed(5)
    mu_t = torch.randn(3, 32, generator=g) * 0.1  # image 0 goes to two targets, image 1 to one
    source_of = [0, 0, 1]
    mu_s3 = mu_s[:1].expand(3, -1)
    shared_inv, shared = _edit(decoder, encoder, images, e, mu_s3, mu_t, _gens(2), image_of=source_of,
                               t_skips=(0.5,))
    dup_inv, dup = _edit(decoder, encoder, images[source_of], e[source_of], mu_s3, mu_t,
                         [torch.Generator().manual_seed(10 + u) for u in source_of], t_skips=(0.5,))
    depth = T - round(0.5 * T)
    assert shared_inv.counter.tolist() == [depth, depth]  # two inversions, not three
    assert dup_inv.counter.tolist() == [depth, depth, depth]
    for a, b in zip(shared, dup):
        assert a.item == b.item
        assert (a.chosen.picture - b.chosen.picture).abs().max() < 1e-3  # same seeds: the same edit
    assert (shared[0].chosen.picture - shared[1].chosen.picture).abs().max() > 1e-3  # different targets differ
    with pytest.raises(ValueError, match="image_of_item"):
        _edit(decoder, encoder, images, e, mu_s3, mu_t, _gens(2), image_of=[0, 0, 2], t_skips=(0.5,))


def test_the_flip_criterion_threshold_agreement_and_non_finite_probabilities():
    from diffusion.edit.search import FlipCriterion

    probs = torch.tensor([0.3, 0.7])  # the ensemble: target (index 1) is the argmax at 0.7
    members = torch.tensor([[0.1, 0.9], [0.5, 0.5]])  # one member convinced, one on the fence
    assert FlipCriterion().met(probs, 1) and not FlipCriterion().met(probs, 0)  # the paper's argmax rule
    assert FlipCriterion(0.6).met(probs, 1) and not FlipCriterion(0.8).met(probs, 1)
    assert not FlipCriterion(0.6, "all").met(probs, 1, members)  # the second member does not reach 0.6
    assert FlipCriterion(0.5, "all").met(probs, 1, members)
    assert not FlipCriterion().met(torch.tensor([float("nan"), 0.2]), 1)  # NaN is never a flip
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        FlipCriterion(1.0)
    with pytest.raises(ValueError, match="per-member"):
        FlipCriterion(0.5, "all").met(probs, 1)
