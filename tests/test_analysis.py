"""The analysis of editing runs: a sweep run on the tiny model gives one figure per (t_skip, eta) with intervals that
hold their estimate; the figures are written; the summary's intervals, judge and verdict fields; series by a config
key; results files that are partial or damaged are refused by name. Offline, CPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import xml.etree.ElementTree as ET
from itertools import product
from pathlib import Path

import pytest
import torch
from PIL import Image

import diffusion.edit.run as edit_run
from conftest import write_blob_images
from diffusion.analysis import Series, analyze, figure_records, load_series, sweep_cells
from diffusion.config import EditConfig, load_config
from diffusion.edit.results import COLUMNS, REQUIRED_COLUMNS, read_rows
from diffusion.errors import ArtefactError, ConfigError
from diffusion.metrics import bootstrap_over_images, rate_interval, summarize
from diffusion.stats import bootstrap_mean_interval
from diffusion.views.figures import tradeoff_figure, write_figures

REPO = Path(__file__).resolve().parents[1]
T_SKIPS, ETAS = (0.9, 0.5, 0.0), (1.0, 2.0)


class DiscOracle:
    """class_a is a red disc on a bright background; anything else (a blue disc, or the random model's dark noisy
    edits) is class_b. So class_a -> class_b flips once an edit is strong enough, class_b -> class_a never does."""

    classes = ("class_a", "class_b")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        red = torch.sigmoid(30 * (images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))))
        clean = torch.sigmoid(40 * (images.mean(dim=(1, 2, 3)) - 0.8))
        p_b = 1 - clean * red
        return torch.stack([1 - p_b, p_b], dim=1)


class DarknessJudge:
    """An evaluation-only classifier that disagrees with the oracle: dark images are class_b, bright ones class_a."""

    classes = ("class_a", "class_b")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p_b = torch.sigmoid(20 * (0.75 - images.mean(dim=(1, 2, 3))))
        return torch.stack([1 - p_b, p_b], dim=1)


def _contains(ci, value, tol=1e-12) -> bool:
    return ci[0] - tol <= value <= ci[1] + tol


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, tiny_model):
    """A finished sweep run on the tiny model: 3 test images per class, both directions, every t_skip x eta kept,
    judged by the oracle and by an independent judge. (run folder, rows)."""
    root = tmp_path_factory.mktemp("sweep")
    for cls in ("class_a", "class_b"):
        write_blob_images(root / "data", "train", cls, 4)
        write_blob_images(root / "data", "test", cls, 3, seed=1)
    values = {"output_dir": root / "run", "embeds_dir": root / "embeds", "compute_missing_embeds": "true",
              "model.decoder": tiny_model / "decoder", "model.prior": tiny_model / "prior", "model.device": "cpu",
              "model.image_size": 32, "data.root": root / "data", "num_inference_steps": 8, "search": "sweep",
              "t_skips": "[" + ",".join(map(str, T_SKIPS)) + "]", "eta": "[" + ",".join(map(str, ETAS)) + "]",
              "batch_size": 6, "lpips": "false", "views.strip_etas": "[0,2]", "views.strip_t_skip": 0.5}
    cfg = load_config(EditConfig, None, [f"{k}={v}" for k, v in values.items()])
    edit_run.run_edits(cfg, oracle=DiscOracle(), judge=DarknessJudge())
    run_dir = Path(cfg.output_dir)
    return run_dir, read_rows(run_dir / "results.csv")


# --------------------------------------------------------------------------------------------------------------------
# A sweep on the tiny model
# --------------------------------------------------------------------------------------------------------------------
def test_sweep_gives_one_figure_per_t_skip_and_eta_with_intervals_holding_their_estimate(sweep_run):
    run_dir, rows = sweep_run
    assert len(rows) == 6 * len(T_SKIPS) * len(ETAS) and all(r["search"] == "sweep" for r in rows)
    cells = sweep_cells(rows)
    overall = [c for c in cells if c["direction"] == "all"]
    assert sorted((c["t_skip"], c["eta"]) for c in overall) == sorted(product(T_SKIPS, ETAS))  # one per setting
    assert {c["direction"] for c in cells} == {"all", "class_a->class_b", "class_b->class_a"}
    assert len(cells) == 3 * len(overall)
    for c in cells:
        mine = [r for r in rows if float(r["t_skip"]) == c["t_skip"] and float(r["eta"]) == c["eta"] and
                r["already_target"] == "0" and
                (c["direction"] == "all" or f"{r['source_class']}->{r['target_class']}" == c["direction"])]
        assert c["n_attempted"] == len(mine) > 0 and c["n_images"] == len(mine)  # an image once per setting
        assert c["flip_rate"] == pytest.approx(sum(r["flipped"] == "1" for r in mine) / len(mine))
        assert c["judge_flip_rate"] == pytest.approx(sum(r["judge_flipped"] == "1" for r in mine) / len(mine))
        assert c["flip_rate_interval"] == "wilson"  # one row per image in a cell: independent rows
        for key in ("flip_rate", "judge_flip_rate", "l2_mean_all", "l2_mean"):
            if c[key] is not None:
                assert _contains(c[f"{key}_ci"], c[key]), (key, c)
        assert c["l2_mean_all"] == pytest.approx(sum(float(r["l2"]) for r in mine) / len(mine))
        assert c["lpips_mean_all"] is None and c["lpips_mean_all_ci"] is None  # lpips: false
    # the fake oracle: class_b never flips; class_a flips more as the edit gets stronger (lower t_skip)
    assert all(c["flip_rate"] == 0 for c in cells if c["direction"] == "class_b->class_a")
    a_to_b = {(c["t_skip"], c["eta"]): c["flip_rate"] for c in cells if c["direction"] == "class_a->class_b"}
    assert a_to_b[(0.0, 2.0)] >= a_to_b[(0.9, 2.0)] and a_to_b[(0.0, 2.0)] > 0


def test_sweep_figures_are_written_and_shown_in_the_gallery(sweep_run, tmp_path):
    run_dir, rows = sweep_run
    written = write_figures(analyze([Series("sweep", [str(run_dir)], rows)]), tmp_path)
    assert [w["name"] for w in written] == ["flip_rate_vs_t_skip", "distance_vs_t_skip", "tradeoff"]
    for w in written:
        with Image.open(w["png"]) as png:
            assert png.width > 300 and png.height > 200 and len(set(png.convert("L").getdata())) > 10  # drawn
        svg = ET.parse(w["svg"]).getroot()
        assert svg.tag.endswith("svg") and len(list(svg.iter())) > 50
    # the run's own figures (finish_run -> write_views) and the gallery that shows them
    figures = run_dir / "figures"
    assert all((figures / f"{w['name']}.{fmt}").stat().st_size > 1000 for w in written for fmt in ("png", "svg"))
    page = (run_dir / "index.html").read_text()
    data = json.loads(page.split('id="run-data">')[1].split("</script>")[0])
    assert [f["name"] for f in data["figures"]] == [w["name"] for w in written]
    assert all((run_dir / f["svg"]).is_file() for f in data["figures"])
    saved = json.loads((figures / "figures.json").read_text())
    assert len(saved["series"][0]["sweep"]) == 3 * len(T_SKIPS) * len(ETAS)
    with open(figures / "figures.csv") as f:
        records = list(csv.DictReader(f))
    flips = [r for r in records if r["figure"] == "sweep" and r["statistic"] == "flip_rate" and r["direction"] == "all"]
    assert len(flips) == len(T_SKIPS) * len(ETAS) and {r["interval"] for r in flips} == {"wilson"}
    assert all(float(r["ci_low"]) - 1e-6 <= float(r["value"]) <= float(r["ci_high"]) + 1e-6 for r in flips)


def test_the_tradeoff_figure_plots_the_judges_flip_rate_and_says_so(sweep_run):
    """The figure a reader takes away should carry the verdict independent of the search, and name it."""
    run_dir, rows = sweep_run
    sweeps = [s for s in analyze([Series("sweep", [str(run_dir)], rows)])["series"] if s["sweep"]]
    # give the judge its own rates (the fixture's judge happens to agree with the oracle everywhere)
    for s in sweeps:
        s["sweep"] = [{**c, "judge_flip_rate": 0.05 * k, "judge_flip_rate_ci": [0.0, 1.0]}
                      for k, c in enumerate(s["sweep"])]

    def plotted(ax, eta):  # the y values of one eta's errorbar line, and what they should be, in t_skip order
        line = next(b for b in ax.containers if b.get_label() == f"eta {eta:g}").lines[0]
        mine = sorted((c for c in sweeps[0]["sweep"] if c["direction"] == "all" and c["eta"] == eta),
                      key=lambda c: c["t_skip"])
        return list(line.get_ydata()), mine

    ax = tradeoff_figure(sweeps).axes[0]
    assert ax.get_ylabel() == "flip rate (judge)"
    for eta in ETAS:
        ys, mine = plotted(ax, eta)
        assert ys == pytest.approx([c["judge_flip_rate"] for c in mine])
        assert ys != pytest.approx([c["flip_rate"] for c in mine])
    # without a judge: the oracle's rate, named as such
    for s in sweeps:
        s["sweep"] = [{**c, "judge_flip_rate": None, "judge_flip_rate_ci": None} for c in s["sweep"]]
    ax = tradeoff_figure(sweeps).axes[0]
    assert ax.get_ylabel() == "flip rate (oracle)"
    ys, mine = plotted(ax, ETAS[0])
    assert ys == pytest.approx([c["flip_rate"] for c in mine])


def test_the_run_summary_has_judge_figures_and_says_who_judged(sweep_run):
    _, rows = sweep_run
    s = summarize(rows)
    json.dumps(s, allow_nan=False)
    assert s["judged_by"] == "judge" and "judge" in s["note"]
    tried = [r for r in rows if r["already_target"] != "1"]
    assert s["judge_flip_rate"] == pytest.approx(sum(r["judge_flipped"] == "1" for r in tried) / len(tried))
    assert s["n_judge_flipped"] == sum(r["judge_flipped"] == "1" for r in tried)
    for key in ("flip_rate", "judge_flip_rate", "l2_mean_all", "t_skip_mean", "unet_evals_per_image"):
        assert _contains(s[f"{key}_ci"], s[key]), key
    for d in s["per_direction"].values():
        assert set(d) >= {"flip_rate_ci", "judge_flip_rate", "judge_flip_rate_ci", "n_judge_flipped", "lpips_mean_ci",
                          "l2_mean_ci"}
    assert "too narrow" in s["intervals"]  # 6 rows per image here: the summary's Wilson interval says it is optimistic


@pytest.mark.slow
def test_analyze_results_script_on_the_sweep_run(sweep_run, tmp_path, capsys):
    run_dir, _ = sweep_run
    plots = tmp_path / "plots"
    assert _analyze_main()([str(run_dir), "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "sweep (flip rate and distances per setting)" in out and "| all | 2 | 0.9 | 3 |" not in out
    assert out.count("| all |") == len(T_SKIPS) * len(ETAS)
    assert all((plots / f"{n}.{fmt}").stat().st_size > 0 for n in ("flip_rate_vs_t_skip", "distance_vs_t_skip",
                                                                    "tradeoff") for fmt in ("png", "svg"))
    assert json.loads((plots / "figures.json").read_text())["series"][0]["search"] == "sweep"
    assert (plots / "figures.csv").read_text().startswith("series,figure,direction,eta,t_skip,statistic,value")


# --------------------------------------------------------------------------------------------------------------------
# Hand-made rows
# --------------------------------------------------------------------------------------------------------------------
def _row(path, src="a", tgt="b", flipped="0", t_skip="0.5", eta="1", search="first_flip", **more) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(source_path=path, source_class=src, target_class=tgt, search=search, t_skip=t_skip, eta=eta,
               flipped=flipped, already_target="0", l2="0.2", unet_evals="30", inversion_evals="10", seconds="1")
    row.update(more)
    return row


def _write(folder: Path, rows, config: str = "", columns=COLUMNS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if config:
        (folder / "config.yaml").write_text(config)
    return folder


def _analyze_main():
    spec = importlib.util.spec_from_file_location("analyze_results", REPO / "scripts" / "analyze_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _make_views_main():
    spec = importlib.util.spec_from_file_location("make_views", REPO / "scripts" / "make_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_already_target_rows_never_count_and_no_verdict_means_none():
    rows = [_row("a/1", flipped="1"), _row("a/2"), _row("a/3", already_target="1", t_skip="", l2="")]
    s = summarize(rows)
    assert (s["flip_rate"], s["n_attempted"], s["n_already_target"]) == (0.5, 2, 1)
    assert s["judged_by"] == "oracle" and "chose the edit" in s["note"] and s["judge_flip_rate"] is None
    assert s["judge_flip_rate_ci"] is None and s["n_judge_flipped"] == 0
    unjudged = summarize([dict(r, flipped="") for r in rows[:2]])
    assert unjudged["judged_by"] is None and unjudged["flip_rate"] is None and unjudged["flip_rate_ci"] is None
    already_flipped = summarize([_row("a/1", flipped="1", already_target="1", judge_flipped="1"),
                                 _row("a/2", judge_flipped="0")])
    assert already_flipped["n_flipped"] == 0 and already_flipped["judge_flip_rate"] == 0.0  # never a flip


def test_the_judge_never_credits_a_rejected_search_even_in_an_old_results_csv():
    """A row whose search found no flip keeps its strongest attempt; an older results.csv may say judge_flipped 1
    there. Neither the summary nor a lesson counts it; with search fixed or sweep the judge alone decides."""
    from diffusion.views.quiz import lesson_row, reached_target

    rejected = _row("a/1", flipped="0", judge_flipped="1", l2="0.05", counterfactual_path="e/1/cf_eta1.png")
    accepted = _row("a/2", flipped="1", judge_flipped="1", counterfactual_path="e/2/cf_eta1.png")
    s = summarize([rejected, accepted])
    assert (s["n_judge_flipped"], s["judge_flip_rate"]) == (1, 0.5)
    assert reached_target(rejected, "judge_flipped") is False and reached_target(accepted, "judge_flipped") is True
    assert lesson_row([rejected, dict(accepted, source_path="a/1", l2="0.3")])["l2"] == "0.3"  # not the smaller one
    for mode in ("fixed", "sweep"):
        row = _row("a/1", flipped="0", judge_flipped="1", search=mode, counterfactual_path="e/1/cf.png")
        assert summarize([row])["judge_flip_rate"] == 1.0 and reached_target(row, "judge_flipped") is True


def test_no_nan_anywhere_even_from_nan_cells():
    rows = [_row("a/1", flipped="1", l2="nan", lpips="inf"), _row("a/2", flipped="1", l2="0.3")]
    s = summarize(rows)
    text = json.dumps(analyze([Series("x", ["x"], rows)]), allow_nan=False)  # raises on NaN
    assert s["l2_mean"] == pytest.approx(0.3) and s["lpips_mean"] is None and "NaN" not in text


def test_rate_interval_is_wilson_for_independent_rows_and_a_seeded_bootstrap_otherwise():
    single = [_row(f"a/{k}", flipped=str(k % 2)) for k in range(10)]
    ci, kind = rate_interval(single, lambda r: r["flipped"] == "1")
    assert kind == "wilson" and ci == pytest.approx([0.2366, 0.7634], abs=1e-4)
    repeated = single + [_row(f"a/{k}", eta="2", flipped="1") for k in range(10)]
    ci2, kind2 = rate_interval(repeated, lambda r: r["flipped"] == "1")
    assert kind2 == "bootstrap" and _contains(ci2, 0.75)
    assert ci2 == rate_interval(repeated, lambda r: r["flipped"] == "1")[0]  # seeded: the same every time
    # one value per image draws like a plain bootstrap of the mean; an image's rows are drawn together
    assert bootstrap_over_images([_row("a/1", l2="0.4")], lambda r: float(r["l2"])) == [0.4, 0.4]
    values = [0.1 * k for k in range(12)]
    rows = [_row(f"a/{k}", l2=str(v)) for k, v in enumerate(values)]
    assert bootstrap_over_images(rows, lambda r: float(r["l2"])) == pytest.approx(list(bootstrap_mean_interval(values)))
    paired = rows + [_row(f"a/{k}", eta="2", l2=str(v)) for k, v in enumerate(values)]  # each image twice, same values
    assert bootstrap_over_images(paired, lambda r: float(r["l2"])) == pytest.approx(
        list(bootstrap_mean_interval(values)))  # drawn by image, not by row: the same interval


def test_searched_runs_give_t_skip_distance_and_evaluation_distributions(tmp_path):
    rows = [_row(f"a/{k}", flipped="1" if k < 3 else "0", t_skip=t, l2=str(0.1 * (k + 1)), unet_evals=str(20 + k))
            for k, t in enumerate(["0.9", "0.9", "0", "0.5", "0"])]
    table = analyze([Series("s", ["s"], rows)])["series"][0]["searched"]["all"]
    assert [(b["t_skip"], b["n"], b["n_flipped"]) for b in table["t_skip"]] == [(0.9, 2, 2), (0.5, 1, 0), (0, 2, 1)]
    assert all(_contains(b["share_ci"], b["share"]) and b["share_interval"] == "wilson" for b in table["t_skip"])
    l2 = table["distance"]["l2"]
    assert (l2["n"], l2["min"], l2["median"], l2["max"]) == (5, 0.1, pytest.approx(0.3), 0.5)
    assert table["distance"]["l2_flipped"]["n"] == 3 and _contains(l2["mean_ci"], l2["mean"])
    assert table["unet_evals"]["values"] == [20.0, 21.0, 22.0, 23.0, 24.0]
    written = write_figures(analyze([Series("s", ["s"], rows)]), tmp_path)
    assert [w["name"] for w in written] == ["t_skip_histogram", "distance_histogram"]
    assert all(Path(w[fmt]).stat().st_size > 0 for w in written for fmt in ("png", "svg"))


def test_series_by_a_config_key_are_ordered_by_it_and_side_by_side(tmp_path, capsys):
    runs = []
    for step, rate in ((400, "1"), (100, "0"), (None, "1")):
        rows = [_row(f"a/{k}", flipped=rate if k else "1") for k in range(4)]
        step_text = "null" if step is None else step
        config = f"search: first_flip\nlora: {{path: l, step: {step_text}}}\n"
        runs.append(_write(tmp_path / f"run_{step}", rows, config))
    series = load_series(runs, by="lora.step")
    assert [s.label for s in series] == ["lora.step=None", "lora.step=100", "lora.step=400"]
    pooled = load_series([runs[0], runs[0]], by="lora.step")  # runs sharing a value are pooled
    assert len(pooled) == 1 and len(pooled[0].rows) == 8
    plots = tmp_path / "plots"
    assert _analyze_main()([*map(str, runs), "--by", "lora.step", "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    assert out.index("| lora.step=100 |") < out.index("| lora.step=400 |")
    assert (plots / "series.png").stat().st_size > 0 and (plots / "t_skip_histogram.svg").stat().st_size > 0
    records = figure_records(json.loads((plots / "figures.json").read_text()))
    assert {r["series"] for r in records} == {s.label for s in series}
    with pytest.raises(ConfigError, match="no key 'nothing'"):
        load_series(runs, by="lora.nothing")
    assert _analyze_main()([str(runs[0]), "--by", "lora.nothing"]) == 2
    assert "lora.nothing" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# Damaged results files
# --------------------------------------------------------------------------------------------------------------------
def test_a_partial_csv_is_refused_naming_the_missing_columns(tmp_path, capsys):
    run = _write(tmp_path / "run", [_row("a/1")], columns=[c for c in COLUMNS if c not in ("eta", "flipped")])
    with pytest.raises(ArtefactError, match="lacks the column.s. eta, flipped"):
        read_rows(run / "results.csv")
    assert _analyze_main()([str(run)]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and "eta, flipped" in err
    assert _make_views_main()([str(run)]) == 2
    assert "eta, flipped" in capsys.readouterr().err
    # an older file without the optional columns (judge_*, criterion, ...) still reads, with them empty
    old = _write(tmp_path / "old", [_row("a/1", flipped="1")], columns=[*REQUIRED_COLUMNS, "l2"])
    (row,) = read_rows(old / "results.csv")
    assert set(row) == set(COLUMNS) and row["judge_flipped"] == "" and row["flipped"] == "1"


def test_only_a_torn_last_line_is_skipped_and_it_says_so(tmp_path, caplog):
    run = _write(tmp_path / "run", [_row("a/1"), _row("a/2")])
    path = run / "results.csv"
    text = path.read_text()
    path.write_text(text + text.splitlines()[-1][:25])  # a crash in the middle of the third row's write
    with caplog.at_level(logging.WARNING):
        rows = read_rows(path)
    assert [r["source_path"] for r in rows] == ["a/1", "a/2"]
    assert "last line 4" in caplog.text and "interrupted write" in caplog.text


@pytest.mark.parametrize("damage, message", [
    (lambda line: line + ",extra", "line 2: 28 cells where the header has 27"),
    (lambda line: line.replace(",first_flip,0.5,1,", ",first_flip,half,1,"), "line 2: t_skip = 'half' is not a number"),
    (lambda line: line.replace(",first_flip,0.5,1,,,,,0,0,", ",first_flip,0.5,1,,,,,yes,0,"), "flipped = 'yes'"),
])
def test_a_malformed_row_elsewhere_is_an_error_naming_file_and_line(tmp_path, damage, message):
    run = _write(tmp_path / "run", [_row("a/1"), _row("a/2")])
    path = run / "results.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], damage(lines[1]), lines[2]]) + "\n")
    with pytest.raises(ArtefactError, match=message) as err:
        read_rows(path)
    assert str(path) in str(err.value)
