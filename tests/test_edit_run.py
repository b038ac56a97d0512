"""The editing run end to end on the tiny model: outputs, resumption, the oracle path, and 2 processes = 1."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusion.edit.run as edit_run
from diffusion.config import EditConfig, load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent


def _overrides(tmp_path, tiny_model, data_root, **over):
    base = {"output_dir": tmp_path / "run", "embeds_dir": tmp_path / "embeds", "compute_missing_embeds": "true",
            "model.decoder": tiny_model / "decoder", "model.prior": tiny_model / "prior", "model.device": "cpu",
            "data.root": data_root, "num_inference_steps": 10, "search": "fixed", "t_skip": 0.6, "batch_size": 2,
            "lpips": "false"}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(*args, **kw) -> EditConfig:
    return load_config(EditConfig, None, _overrides(*args, **kw))


def _rows(run_dir):
    with open(Path(run_dir) / "results.csv") as f:
        return list(csv.DictReader(f))


def test_fixed_run_writes_every_output(tmp_path, tiny_model, blob_data):
    cfg = _cfg(tmp_path, tiny_model, blob_data, eta="[1,2]")
    summary = edit_run.run_edits(cfg)
    rows = _rows(cfg.output_dir)
    assert len(rows) == 6 * 2  # 3 test images per class, 2 etas
    assert {(r["source_class"], r["target_class"]) for r in rows} == {("class_a", "class_b"), ("class_b", "class_a")}
    for r in rows:
        for key in ("original_path", "counterfactual_path", "pair_path"):
            assert (Path(cfg.output_dir) / r[key]).is_file()
        # T = 10, t_skip 0.6: 4 steps inverted (the strip's deeper inversion is not the edit's cost) + 4 guided steps
        assert int(r["inversion_evals"]) == 4 and int(r["unet_evals"]) == 4 + 2 * 4
        assert r["flipped"] == "" and float(r["l2"]) > 0
    saved = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert saved["n_images"] == 6 and saved["t_skip_histogram"] == {"0.6": 12}
    assert saved["unet_evals_per_image"] == 4 + 2 * 2 * 4  # one inversion, two etas of 4 guided steps
    assert summary["n_rows"] == 12
    for name in ("config.yaml", "run_info.json"):
        assert (Path(cfg.output_dir) / name).is_file()


def test_resume_after_interruption_writes_each_row_once(tmp_path, tiny_model, blob_data, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model, blob_data)
    real = edit_run._edit_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(edit_run, "_edit_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit_run.run_edits(cfg)
    monkeypatch.setattr(edit_run, "_edit_batch", lambda *a, **k: calls.append(2) or real(*a, **k))
    edit_run.run_edits(cfg)
    assert calls.count(2) == 2  # 6 images in batches of 2: the finished first batch is not redone
    rows = _rows(cfg.output_dir)
    assert len(rows) == 6 and len({r["source_path"] for r in rows}) == 6
    edit_run.run_edits(cfg)  # a third run finds everything done
    assert calls.count(2) == 2 and len(_rows(cfg.output_dir)) == 6


class FakeOracle:
    """Predicts class_b for images whose mean red channel is below a threshold (deterministic, image-based)."""

    classes = ("class_a", "class_b")

    def __call__(self, images):
        p = (images[:, 0].mean(dim=(1, 2)) < 0.9).float()
        return torch.stack([1 - p, p], dim=1)


class AlwaysOracle:
    """Calls every image the same class."""

    classes = ("class_a", "class_b")

    def __init__(self, index: int):
        self.index = index

    def __call__(self, images):
        p = torch.zeros(len(images), 2)
        p[:, self.index] = 1.0
        return p


def test_first_flip_run_reports_flip_rate_over_all_images(tmp_path, tiny_model, blob_data):
    cfg = _cfg(tmp_path, tiny_model, blob_data, search="first_flip", oracle_dir="unused", t_skips="[0.9,0.5,0.0]")
    summary = edit_run.run_edits(cfg, oracle=FakeOracle())
    rows = _rows(cfg.output_dir)
    # an original the fake oracle already calls the target class is not an attempted edit (none here: see below)
    already = [r for r in rows if r["already_target"] == "1"]
    tried = [r for r in rows if r["already_target"] == "0"]
    assert len(tried) + len(already) == 6 and {r["oracle_pred_before"] for r in tried} == {"class_a", "class_b"}
    flipped = sum(r["flipped"] == "1" for r in tried)
    assert summary["flip_rate"] == pytest.approx(flipped / len(tried))
    assert summary["n_already_target"] == len(already)
    for r in tried:
        assert r["oracle_prob_before"] != "" and r["oracle_prob_after"] != ""
        assert 1 <= int(r["attempts"]) <= 3
    # one image whose original is already the target: not searched, no edit, never a flip
    target_b = FakeOracle.classes.index("class_b")
    forced = edit_run.run_edits(_cfg(tmp_path / "forced", tiny_model, blob_data, search="first_flip",
                                     oracle_dir="unused", t_skips="[0.9,0.5,0.0]"), oracle=AlwaysOracle(target_b))
    rows = _rows(tmp_path / "forced" / "run")
    for r in rows:
        if r["target_class"] == "class_b":
            assert r["already_target"] == "1" and r["attempts"] == "0" and r["counterfactual_path"] == ""
            assert r["flipped"] == "0" and r["t_skip"] == ""
        else:
            assert r["already_target"] == "0" and r["flipped"] == "0"  # never reaches class_a
    assert forced["n_already_target"] == 3 and forced["flip_rate"] == 0.0


@pytest.mark.slow
def test_two_processes_give_the_same_rows_as_one(tmp_path, tiny_model, blob_data):
    """torchrun --nproc_per_node 2 (gloo, CPU) splits the images; the merged results equal a 1-process run."""
    one = _cfg(tmp_path / "one", tiny_model, blob_data)
    edit_run.run_edits(one)
    config = tmp_path / "one.yaml"
    config.write_text(to_yaml(one))  # exactly the 1-process settings
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "kandinsky_eval.py", "--config_path", str(config), f"output_dir={tmp_path / 'two' / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted((tmp_path / "two" / "run" / "shards").glob("results.*.csv"))
    assert len(shards) == 2
    a, b = _rows(one.output_dir), _rows(tmp_path / "two" / "run")
    assert [r["source_path"] for r in a] == [r["source_path"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["seed"] == rb["seed"] and ra["t_skip"] == rb["t_skip"]
        assert float(ra["l2"]) == pytest.approx(float(rb["l2"]), abs=1e-3)


@pytest.mark.slow
def test_demo_command_runs_as_documented(tmp_path):
    """The README's main command (with its outputs redirected to a temporary folder)."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "kandinsky_eval.py", "--config_path", "configs/edit/demo.yaml", f"output_dir={out}/edit",
           f"embeds_dir={out}/embeds", f"data.root={out}/digits"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "edit" / "summary.json").read_text())
    assert summary["n_images"] > 0
    assert len(_rows(out / "edit")) == summary["n_rows"]


def test_sweep_keeps_every_t_skip_and_eta_and_resumes_per_row(tmp_path, tiny_model, blob_data):
    cfg = _cfg(tmp_path, tiny_model, blob_data, search="sweep", t_skips="[0.8,0.4]", eta="[0,2]",
               **{"data.num_samples": 2, "views.enabled": "false"})
    summary = edit_run.run_edits(cfg)
    rows = _rows(cfg.output_dir)
    assert len(rows) == 4 * 2 * 2  # 4 test images (2 per class) x 2 t_skips x 2 etas
    assert {(r["t_skip"], r["eta"]) for r in rows} == {("0.8", "0"), ("0.8", "2"), ("0.4", "0"), ("0.4", "2")}
    assert summary["t_skip_histogram"] == {"0.8": 8, "0.4": 8}
    # one inversion per image serves all four attempts
    per_image = 6 + 2 * (2 * 2 + 2 * 6)  # inverted 6 steps deep (t_skip 0.4)
    assert summary["unet_evals_per_image"] == per_image
    edit_run.run_edits(cfg)
    assert len(_rows(cfg.output_dir)) == 16


def test_three_classes_an_image_with_two_targets_is_inverted_once(tmp_path, tiny_model, blob_data, monkeypatch):
    from conftest import write_blob_images

    from diffusion.models import Decoder

    write_blob_images(blob_data, "train", "class_c", 6)
    write_blob_images(blob_data, "test", "class_c", 3, seed=1)
    cfg = _cfg(tmp_path, tiny_model, blob_data, **{"directions": "[[class_a,class_b],[class_a,class_c]]",
                                                    "views.enabled": "false", "data.num_samples": 2})
    rows_evaluated = []
    real_eps = Decoder.eps

    def counting_eps(self, w, *args, **kwargs):
        rows_evaluated.append(len(w))
        return real_eps(self, w, *args, **kwargs)

    monkeypatch.setattr(Decoder, "eps", counting_eps)
    summary = edit_run.run_edits(cfg)
    # the UNet really ran 2 images x 4 inversion steps + 4 edits x 4 guided steps x 2 branches (not 4 inversions)
    assert sum(rows_evaluated) == 2 * 4 + 4 * 4 * 2
    rows = _rows(cfg.output_dir)
    assert sorted((r["source_path"], r["target_class"]) for r in rows) == sorted(
        (f"test/class_a/{i:03d}.png", t) for i in range(2) for t in ("class_b", "class_c"))
    for r in rows:  # T = 10, t_skip 0.6: 4 inversion steps shared by the two targets, 4 guided steps per row
        assert int(r["inversion_evals"]) == 4 and int(r["unet_evals"]) == 4 + 2 * 4
    assert summary["unet_evals_per_image"] == 4 + 2 * (2 * 4)  # one inversion, two targets' sampling
    by_image = {}
    for r in rows:
        by_image.setdefault(r["source_path"], set()).add(r["counterfactual_path"])
    assert all(len(paths) == 2 for paths in by_image.values())  # one edit per target, in separate folders


class CountingJudge(AlwaysOracle):
    """A judge that calls everything class_b and counts how often it is asked."""

    def __init__(self):
        super().__init__(1)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return super().__call__(images)


def test_the_judge_only_evaluates_and_fills_its_columns(tmp_path, tiny_model, blob_data):
    kw = dict(search="first_flip", oracle_dir="unused", t_skips="[0.9,0.5,0.0]", **{"views.enabled": "false"})
    edit_run.run_edits(_cfg(tmp_path / "alone", tiny_model, blob_data, **kw), oracle=FakeOracle())
    judge = CountingJudge()
    edit_run.run_edits(_cfg(tmp_path / "judged", tiny_model, blob_data, **kw), oracle=FakeOracle(), judge=judge)
    alone, judged = _rows(tmp_path / "alone" / "run"), _rows(tmp_path / "judged" / "run")
    # the search never consults the judge: the same t_skips, attempts and oracle verdicts
    for a, b in zip(alone, judged):
        assert (a["t_skip"], a["attempts"], a["flipped"]) == (b["t_skip"], b["attempts"], b["flipped"])
        assert a["judge_flipped"] == "" and a["judge_prob_after"] == ""
    for r in judged:
        assert r["judge_pred_before"] == "class_b" and float(r["judge_prob_before"]) == float(r["target_class"] == "class_b")
        if r["already_target"] == "1":
            assert r["judge_flipped"] == "0"
        else:
            assert r["judge_flipped"] == ("1" if r["target_class"] == "class_b" else "0")
    assert judge.calls == 2 * 3  # per batch of 2 images: the originals once, the chosen edits once
