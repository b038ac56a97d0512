"""Metrics of an editing run: LPIPS plumbing, the flip rate over ALL attempted images, the summary, the comparison
table of scripts/analyze_results.py, and an editing run judged by a real oracle folder with LPIPS. Offline, CPU."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import diffusion.edit.run as edit_run
from diffusion.config import EditConfig, load_config
from diffusion.metrics import Lpips, comparison_table, flip_rate, load_run_rows, summarize
from diffusion.oracle.members import IMAGENET_MEAN, IMAGENET_STD, Member, MemberInfo, build_cnn, save_member
from diffusion.edit.results import COLUMNS, read_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for this module (as in test_oracle.py): a busy 2-core machine otherwise stalls torch's many
    small ops on OpenMP barriers, and one thread gives the same float reductions on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_random() -> Lpips:
    return Lpips("cpu", random_backbone=True)  # no download: an untrained AlexNet under the package's linear heads


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(lpips_random) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    same, other = lpips_random(a, a), lpips_random(a, b)
    assert same.shape == (2,) and torch.all(same.abs() < 1e-6)
    assert torch.all(other > 0)
    with torch.no_grad():  # the wrapper hands the network [-1, 1] inputs, as LPIPS expects
        assert torch.allclose(other, lpips_random.net(a * 2 - 1, b * 2 - 1).flatten(), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Flip rate and summary from a hand-made results.csv
# --------------------------------------------------------------------------------------------------------------------
def _row(path: str, src: str, tgt: str, flipped: str, t_skip: float, lpips: str = "", unet: int = 60,
         seconds: float = 2.0) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(source_path=path, source_class=src, target_class=tgt, search="first_flip", t_skip=str(t_skip),
               eta="2", flipped=flipped, lpips=lpips, l2="0.1", unet_evals=str(unet), inversion_evals="50",
               seconds=str(seconds))
    return row


def _write_results(run_dir: Path, rows: list, name: str = "results.csv") -> Path:
    path = run_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


HAND_MADE = [  # 5 attempted images, 2 flipped
    _row("3/a.png", "3", "8", "1", 0.8, lpips="0.2", unet=60),
    _row("3/b.png", "3", "8", "0", 0.0, lpips="0.9", unet=80),
    _row("3/c.png", "3", "8", "0", 0.0, lpips="0.7", unet=80),
    _row("8/d.png", "8", "3", "1", 0.6, lpips="0.4", unet=70),
    _row("8/e.png", "8", "3", "0", 0.0, lpips="0.8", unet=80),
]


def test_flip_rate_counts_unflipped_images_in_the_denominator(tmp_path) -> None:
    rows = read_rows(_write_results(tmp_path, HAND_MADE))
    s = summarize(rows)
    assert s["flip_rate"] == pytest.approx(2 / 5)  # not 2 / 2, the authors' flipped-only ratio
    assert (s["n_rows"], s["n_flipped"], s["n_images"], s["n_unjudged"]) == (5, 2, 5, 0)
    assert s["per_direction"]["3->8"]["flip_rate"] == pytest.approx(1 / 3)
    assert s["per_direction"]["8->3"]["flip_rate"] == pytest.approx(1 / 2)
    assert s["lpips_mean"] == pytest.approx((0.2 + 0.4) / 2)  # over the flipped edits only
    assert s["per_direction"]["3->8"]["lpips_mean"] == pytest.approx(0.2)
    assert s["t_skip_histogram"] == {"0.8": 1, "0.6": 1, "0": 3}
    assert s["t_skip_histogram_flipped"] == {"0.8": 1, "0.6": 1}
    assert s["t_skip_mean_flipped"] == pytest.approx(0.7)
    assert s["unet_evals_per_image"] == pytest.approx((60 + 80 + 80 + 70 + 80) / 5)
    assert s["seconds_per_image"] == pytest.approx(2.0)


def test_no_oracle_means_no_flip_rate_and_a_missing_verdict_is_not_a_flip() -> None:
    unjudged = [dict(r, flipped="") for r in HAND_MADE]
    assert flip_rate(unjudged) is None and summarize(unjudged)["flip_rate"] is None
    partly = HAND_MADE[:4] + [dict(HAND_MADE[4], flipped="")]
    assert flip_rate(partly) == pytest.approx(2 / 5) and summarize(partly)["n_unjudged"] == 1
    assert flip_rate([]) is None


# --------------------------------------------------------------------------------------------------------------------
# scripts/analyze_results.py
# --------------------------------------------------------------------------------------------------------------------
def _analyze_main():
    spec = importlib.util.spec_from_file_location("analyze_results", REPO / "scripts" / "analyze_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_analyze_results_prints_one_row_per_run(tmp_path, capsys) -> None:
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    _write_results(a, HAND_MADE)
    (a / "config.yaml").write_text("search: first_flip\neta: [2.0]\nguidance_scale: 4.0\nnum_inference_steps: 100\n"
                                   "inversion: null\nlora: {path: outputs/lora, step: 400}\n")
    _write_results(b, [dict(r, flipped="1", t_skip="0.9") for r in HAND_MADE])
    (a / "summary.json").write_text(json.dumps({"flip_rate": 1.0}))  # stale: the table recomputes from results.csv
    assert _analyze_main()([str(a), str(b), "--output", str(tmp_path / "table.md")]) == 0
    out = capsys.readouterr().out.strip()
    lines = out.splitlines()
    assert lines[0].startswith("| run |") and lines[1].startswith("| --- |") and lines[4] == ""  # a row per run
    assert lines[2].startswith("| run_a |") and "40.0% (2/5) [11.8, 76.9]" in lines[2]  # Wilson 95%
    assert "3->8: 33.3% (1/3) [6.1, 79.2]" in lines[2]
    assert "lora=outputs/lora@400" in lines[2] and "| 0.3000 [0.2000, 0.4000] |" in lines[2]  # LPIPS, flipped
    assert lines[3].startswith("| run_b |") and "100.0% (5/5) [56.6, 100.0]" in lines[3]
    assert "| 0.900 [0.900, 0.900] |" in lines[3]
    assert "### run_a: chosen t_skip" in out and "Intervals: 95% intervals" in out
    assert "the same classifier that chose the edit" in out  # oracle verdicts are not independent: it says so
    assert (tmp_path / "table.md").read_text().strip() == out
    assert _analyze_main()([str(tmp_path / "nothing")]) == 2


def test_an_unfinished_run_is_read_from_its_shards(tmp_path) -> None:
    _write_results(tmp_path, HAND_MADE[:3], "shards/results.0.csv")
    _write_results(tmp_path, HAND_MADE[2:], "shards/results.1.csv")  # one row in both: counted once
    rows = load_run_rows(tmp_path)
    assert sorted(r["source_path"] for r in rows) == sorted(r["source_path"] for r in HAND_MADE)
    assert not (tmp_path / "results.csv").exists()  # reading never writes
    assert "40.0% (2/5) [" in comparison_table([("run", summarize(rows), "")])


# --------------------------------------------------------------------------------------------------------------------
# An editing run judged by an oracle folder, with LPIPS
# --------------------------------------------------------------------------------------------------------------------
def test_first_flip_run_with_an_oracle_folder_writes_flip_rates_and_lpips(tmp_path, tiny_model, blob_data,
                                                                          monkeypatch) -> None:
    oracle_dir = tmp_path / "oracle"
    for index, architecture in enumerate(("mobilenet_v2", "resnet18")):
        torch.manual_seed(index)
        member = Member(build_cnn(architecture, pretrained=False), 24, IMAGENET_MEAN, IMAGENET_STD)
        save_member(oracle_dir, member, MemberInfo(architecture, ["class_a", "class_b"], 24, list(IMAGENET_MEAN),
                                                   list(IMAGENET_STD)))
    # the accuracy record an oracle folder must hold (random members: chance accuracy)
    (oracle_dir / "test_metrics.json").write_text(json.dumps(
        {"split": "test", "n": 6, "accuracy": {"mobilenet_v2": 0.5, "resnet18": 0.5, "ensemble": 0.5}}))
    monkeypatch.setattr(edit_run, "Lpips", lambda device: Lpips(device, random_backbone=True))  # offline
    overrides = {
        "output_dir": tmp_path / "run", "embeds_dir": tmp_path / "embeds", "compute_missing_embeds": "true",
        "model.decoder": tiny_model / "decoder", "model.prior": tiny_model / "prior", "model.device": "cpu",
        "data.root": blob_data, "num_inference_steps": 10, "batch_size": 3, "search": "first_flip",
        "t_skips": "[0.9,0.5,0.0]", "oracle_dir": oracle_dir, "lpips": "true",
    }
    cfg = load_config(EditConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    edit_run.run_edits(cfg)
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert len(rows) == 6
    tried = [r for r in rows if r["already_target"] == "0"]
    for r in rows:
        assert r["flipped"] in ("0", "1") and r["oracle_prob_before"] != ""
        if r["already_target"] == "1":  # the random oracle already calls the original the target: not searched
            assert r["flipped"] == "0" and r["counterfactual_path"] == "" and r["t_skip"] == ""
            assert r["oracle_pred_before"] == r["target_class"]
        else:
            assert float(r["lpips"]) >= 0 and r["oracle_prob_after"] != ""
    flips = [r for r in tried if r["flipped"] == "1"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_already_target"] == len(rows) - len(tried)
    assert summary["flip_rate"] == (pytest.approx(len(flips) / len(tried)) if tried else None)
    if flips:
        assert summary["lpips_mean"] == pytest.approx(sum(float(r["lpips"]) for r in flips) / len(flips), rel=1e-4)
    else:
        assert summary["lpips_mean"] is None
    assert summary["settings"]["oracle_dir"] == str(oracle_dir)
