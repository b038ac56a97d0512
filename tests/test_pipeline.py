"""The public API end to end on the shipped demo model: from_pretrained, embed, class_direction, invert (lazy, saved
and reloaded), one call over two etas x two t_skips, the search with an oracle, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from datasets.digits import export_digits
from diffusion import ClassDirection, DIFFusionPipeline, Inversion
from diffusion.config import EditConfig
from diffusion.errors import ArtefactError, ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "assets" / "mini_digits"
T = 20


@pytest.fixture(scope="module")
def pipe() -> DIFFusionPipeline:
    return DIFFusionPipeline.from_pretrained(decoder=str(DEMO / "decoder"), prior=str(DEMO / "prior"), device="cpu",
                                             local_files_only=True, batch_size=8)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return export_digits(tmp_path_factory.mktemp("digits") / "digits")


def _files(root: Path, split: str, digit: str, n: int) -> list:
    return sorted((root / split / digit).glob("*.png"))[:n]


def test_invert_once_edit_two_etas_and_two_t_skips_save_and_reload(pipe, digits, tmp_path):
    direction = pipe.class_direction(_files(digits, "train", "3", 40), _files(digits, "train", "8", 40),
                                     names=("3", "8"))
    assert isinstance(direction, ClassDirection) and direction.vector.shape == (pipe.encoder.embed_dim,)
    sources = _files(digits, "test", "3", 2)
    inv = pipe.invert(sources, num_inference_steps=T, generator=torch.Generator().manual_seed(0))
    assert inv.counter.tolist() == [0, 0]  # lazy: nothing inverted until an edit needs it
    out = pipe(inv, direction, eta=[0.5, 1.0], t_skip=[0.9, 0.7], guidance_scale=2.0, output_type="pt")
    # every (image, eta, t_skip), images outermost; the inversion went as deep as the strongest edit (t_skip 0.7)
    assert [(e.image, e.eta, e.t_skip) for e in out.edits] == [
        (i, eta, t) for i in range(2) for eta in (0.5, 1.0) for t in (0.9, 0.7)]
    assert out.images.shape == (8, 3, pipe.image_size, pipe.image_size)
    depth = T - round(0.7 * T)
    assert inv.counter.tolist() == [depth, depth]
    for e in out.edits:
        assert e.sampling_evals == 2 * (T - round(e.t_skip * T)) and e.inversion_evals == depth
    # a saved and reloaded inversion gives identical edits, without inverting again
    path = inv.save(tmp_path / "inv.safetensors")
    again = pipe.load_inversion(path)
    assert torch.equal(again.ws, inv.ws) and torch.equal(again.zs, inv.zs) and again.counter.tolist() == [depth] * 2
    out2 = pipe(again, direction, eta=[0.5, 1.0], t_skip=[0.9, 0.7], guidance_scale=2.0, output_type="pt")
    assert torch.equal(out2.images, out.images)
    assert again.counter.tolist() == [depth, depth]  # nothing recomputed
    # the same call on a fresh inversion with the same seed: the same images (lazy maps equal the full ones)
    fresh = pipe.invert(sources, num_inference_steps=T, generator=torch.Generator().manual_seed(0))
    out3 = pipe(fresh, direction, eta=[0.5, 1.0], t_skip=[0.9, 0.7], guidance_scale=2.0, output_type="pt")
    assert (out3.images - out.images).abs().max() < 1e-4
    # PIL output, and eta 0 with t_skip 1 returns the original (w_0 decoded, nothing sampled)
    same = pipe(inv, direction, eta=0.0, t_skip=1.0, guidance_scale=2.0)
    assert isinstance(same.images[0], Image.Image) and same.edits[0].sampling_evals == 0


class TargetAfterChange:
    """A stand-in oracle over ("3", "8"): "8" once the edit moved far enough from the original image."""

    classes = ("3", "8")

    def __init__(self, originals: torch.Tensor, threshold: float):
        self.originals, self.threshold = originals, threshold

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        d = torch.tensor([min(float((im - o).abs().mean()) for o in self.originals) for im in images])
        p = (d > self.threshold).float()
        return torch.stack([1 - p, p], dim=1)


def test_search_with_an_oracle_keeps_the_mildest_edit_that_meets_the_criterion(pipe, digits):
    direction = pipe.class_direction(_files(digits, "train", "3", 40), _files(digits, "train", "8", 40),
                                     names=("3", "8"))
    inv = pipe.invert(_files(digits, "test", "3", 3), num_inference_steps=T,
                      generator=torch.Generator().manual_seed(1))
    oracle = TargetAfterChange(pipe.preprocess(_files(digits, "test", "3", 3)), threshold=0.02)
    out = pipe(inv, direction, eta=1.0, t_skip=[0.95, 0.9, 0.8, 0.5], guidance_scale=2.0, search="first_flip",
               oracle=oracle, judge=oracle)
    for e in out.edits:
        tried = [a for a in out.attempts if a["image"] == e.image]
        assert [a["t_skip"] for a in tried] == [0.95, 0.9, 0.8, 0.5][:len(tried)]  # mildest first, stops at the flip
        if e.flipped:
            assert e.t_skip == tried[-1]["t_skip"] and not any(a["met"] for a in tried[:-1])
        assert e.probs_before["8"] == 0.0 and e.judge_probs is not None and e.criterion == "argmax"
    # an oracle that already calls the originals "8": nothing is searched, nothing counts as flipped
    already = TargetAfterChange(pipe.preprocess(_files(digits, "test", "3", 3)), threshold=-1.0)
    out = pipe(inv, direction, eta=1.0, t_skip=[0.9, 0.5], search="first_flip", oracle=already)
    assert all(e.already_target and not e.flipped and e.picture is None for e in out.edits) and not out.attempts


class Constant:
    """A stand-in classifier over ("3", "8") that calls every image ``label``."""

    classes = ("3", "8")

    def __init__(self, label: str):
        self.index = self.classes.index(label)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p = torch.zeros(len(images), 2)
        p[:, self.index] = 1.0
        return p


def test_the_judge_never_credits_an_edit_the_search_rejected(pipe, digits):
    """A search that finds no flip keeps its strongest attempt for inspection; the judge calling that picture the
    target must not count as a flip (it is no counterfactual). Without a search every edit is a result."""
    direction = pipe.class_direction(_files(digits, "train", "3", 20), _files(digits, "train", "8", 20),
                                     names=("3", "8"))
    inv = pipe.invert(_files(digits, "test", "3", 2), num_inference_steps=T,
                      generator=torch.Generator().manual_seed(2))
    never, judge = Constant("3"), Constant("8")
    searched = pipe(inv, direction, eta=1.0, t_skip=[0.9, 0.8], guidance_scale=1.0, search="first_flip",
                    oracle=never, judge=judge)
    for e in searched.edits:
        assert e.searched and not e.flipped and e.t_skip == 0.8 and e.picture is not None  # the strongest attempt
        assert e.judge_probs["8"] == 1.0 and e.judge_flipped is False
    fixed = pipe(inv, direction, eta=1.0, t_skip=0.8, guidance_scale=1.0, oracle=never, judge=judge)
    assert all(not e.searched and e.judge_flipped is True for e in fixed.edits)  # the judge alone decides
    accepted = pipe(inv, direction, eta=1.0, t_skip=[0.9, 0.8], guidance_scale=1.0, search="first_flip",
                    oracle=judge, judge=judge)
    assert all(e.already_target and e.judge_flipped is False for e in accepted.edits)  # already "8": no edit
    moved = TargetAfterChange(pipe.preprocess(_files(digits, "test", "3", 2)), threshold=0.0)  # "8" once changed
    found = pipe(inv, direction, eta=1.0, t_skip=[0.9, 0.8], guidance_scale=1.0, search="first_flip",
                 oracle=moved, judge=judge)
    assert all(e.searched and e.flipped and e.t_skip == 0.9 and e.judge_flipped is True for e in found.edits)
    assert pipe(inv, direction, eta=1.0, t_skip=0.8, guidance_scale=1.0).edits[0].judge_flipped is None  # no judge


def test_bad_input_is_refused_with_a_clear_message(pipe, digits, tmp_path):
    direction = ClassDirection(torch.zeros(pipe.encoder.embed_dim), torch.ones(pipe.encoder.embed_dim), "3", "8")
    inv = pipe.invert(_files(digits, "test", "3", 1), num_inference_steps=T,
                      generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="needs an oracle"):
        pipe(inv, direction, t_skip=[0.9, 0.5], search="first_flip")
    with pytest.raises(ConfigError, match="knows the classes"):
        pipe(inv, ClassDirection(direction.source_mean, direction.target_mean, "3", "cat"), search="first_flip",
             t_skip=[0.9], oracle=TargetAfterChange(torch.zeros(1, 3, 32, 32), 0.1))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ArtefactError, match="junk.safetensors"):
        pipe.load_inversion(tmp_path / "junk.safetensors")
    path = inv.save(tmp_path / "inv.safetensors")
    other = Inversion.load(path)
    other.decoder_id = "another-decoder"
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ArtefactError, match="other decoder weights"):
        pipe.load_inversion(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="finite and lie in"):
        pipe.preprocess(torch.full((3, 8, 8), float("nan")))


def test_a_schema_object_can_never_hold_an_invalid_value():
    with pytest.raises(ConfigError, match="'t_skips'.*<= 1"):
        EditConfig(output_dir="x", embeds_dir="y", t_skips=[5.0])
    with pytest.raises(ConfigError, match="'batch_size' = -3 must be > 0"):
        EditConfig(output_dir="x", embeds_dir="y", batch_size=-3)
    with pytest.raises(ConfigError, match="finite"):
        EditConfig(output_dir="x", embeds_dir="y", eta=[float("nan")])
    cfg = EditConfig(output_dir="x", embeds_dir="y", search="fixed")
    with pytest.raises(ConfigError, match="guidance_scale"):
        cfg.guidance_scale = -1.0
    assert cfg.guidance_scale == 4.0  # the refused assignment left the object as it was
    with pytest.raises(ConfigError, match="model.device"):
        cfg.model.device = "gpu0"


@pytest.mark.slow
def test_the_documented_example_runs_offline(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "docs/example_api.py", "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no inversion step recomputed" in proc.stdout and len(list((tmp_path / "out").glob("*.png"))) == 10
