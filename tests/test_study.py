"""The teaching study: study.html's data (split, arms, orders, settings from the run's config.yaml, shortfalls), the
blinding of answers (opaque copies, tokens), the answers analysis (diffusion/study.py, scripts/analyze_study.py), and
the whole study done by two simulated participants in a real headless Chromium."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

import diffusion.edit.run as edit_run
from conftest import write_blob_images
from diffusion.config import StudyConfig
from diffusion.errors import ArtefactError, ConfigError
from diffusion.study import CSV_COLUMNS, analyze, markdown_report, parse_answers, read_answers
from diffusion.views.blind import (
    OpaqueCopies, decode_class, encode_class, fnv1a32, mulberry32, opaque_name, seeded_shuffle,
)
from diffusion.views.gallery import write_views
from diffusion.views.pages import TEMPLATES
from diffusion.views.study import (
    participant_arm, participant_order, run_study_config, shortfall_notes, study_split,
)
from test_views import DiscOracle, _all_images_loaded, _config, _launch, page_data

REPO = Path(__file__).resolve().parent.parent
PER_CLASS = 8  # test images per class: 3 pre-test + 2 lesson + 3 post-test
STUDY = {"views.study.pretest_images": 3, "views.study.lesson_images": 2, "views.study.posttest_images": 3,
         "views.study.arms": "[counterfactual,examples,counterfactual_diff]", "views.study.seed": 5,
         "views.study.instructions": "'Study of blobs. Go on only if you agree.'"}
JUDGE_KEEPS_B = 2  # the fake judge says only this many class_b -> class_a edits reached class_a


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_model):
    """A finished tiny-model run judged by DiscOracle (every class_a edit flips, no class_b edit does), then a fake
    judge's verdicts written into results.csv (judge_flipped: every class_a edit, and only JUDGE_KEEPS_B class_b
    edits) and the views remade: (run folder, rows, study.html data)."""
    root = tmp_path_factory.mktemp("study")
    for cls in ("class_a", "class_b"):
        write_blob_images(root / "data", "train", cls, 4)
        write_blob_images(root / "data", "test", cls, PER_CLASS, seed=1)
    cfg = _config(root, tiny_model, root / "data", eta="[2]", **STUDY)
    edit_run.run_edits(cfg, oracle=DiscOracle())
    run_dir = Path(cfg.output_dir)
    with open(run_dir / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    kept_b = 0
    for r in sorted(rows, key=lambda r: r["source_path"]):
        if r["source_class"] == "class_b":
            r["judge_flipped"] = "1" if kept_b < JUDGE_KEEPS_B else "0"
            kept_b += 1
        else:
            r["judge_flipped"] = "1"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (run_dir / "results.csv").write_text(out.getvalue())
    write_views(run_dir)
    return run_dir, rows, page_data(run_dir / "study.html")


def truth_of(data: dict) -> dict:
    """image URL -> true class, for every test image of a study page (decoding its tokens as the page does)."""
    return {q["image"]: data["classes"][decode_class(q["token"], data["key"], q["image"])]
            for phase in ("pretest", "posttest") for q in data[phase]}


def sources(run_dir: Path, rows: list) -> dict:
    """opaque copy name -> its results row (originals and counterfactuals)."""
    out = {opaque_name(run_dir / r["original_path"]): r for r in rows}
    out.update({opaque_name(run_dir / r["counterfactual_path"]): r for r in rows if r["counterfactual_path"]})
    return out


# --------------------------------------------------------------------------------------------------------------------
# The page's data
# --------------------------------------------------------------------------------------------------------------------
def test_study_reads_its_settings_from_the_run_config(study_run):
    run_dir, _, data = study_run
    cfg = run_study_config(run_dir)
    assert (cfg.pretest_images, cfg.lesson_images, cfg.posttest_images, cfg.seed) == (3, 2, 3, 5)
    assert data["arms"] == ["counterfactual", "examples", "counterfactual_diff"] and data["seed"] == 5
    assert data["instructions"] == "Study of blobs. Go on only if you agree."
    assert data["notes"] == []  # 8 images per class is exactly enough


def test_split_is_disjoint_balanced_and_teaches_only_judged_flips(study_run):
    run_dir, rows, data = study_run
    of = sources(run_dir, rows)
    truth = truth_of(data)
    parts = {phase: [of[q["image"]]["source_path"] for q in data[phase]] for phase in ("pretest", "posttest")}
    parts["lesson"] = [of[item["original"]]["source_path"] for item in data["lesson"]]
    for a, b in (("pretest", "posttest"), ("pretest", "lesson"), ("posttest", "lesson")):
        assert not set(parts[a]) & set(parts[b]), (a, b)
    for phase, n in (("pretest", 3), ("posttest", 3)):
        assert Counter(truth[q["image"]] for q in data[phase]) == {"class_a": n, "class_b": n}
        assert all(truth[q["image"]] == of[q["image"]]["source_class"] for q in data[phase])
    assert Counter(item["class"] for item in data["lesson"]) == {"class_a": 2, "class_b": 2}
    for item in data["lesson"]:
        row = of[item["counterfactual"]]
        assert row["judge_flipped"] == "1" and row["already_target"] != "1"  # the judge, not the oracle, decides
        assert of[item["original"]]["source_path"] == row["source_path"] and item["target"] == row["target_class"]
        assert item["gif"] and item["diff"]
    judged_b = {r["source_path"] for r in rows if r["source_class"] == "class_b" and r["judge_flipped"] == "1"}
    assert {p for p in parts["lesson"] if "class_b" in p} == judged_b  # only the 2 the judge let through
    assert data["verdict"] == "judge_flipped"


def test_study_page_holds_no_answer_in_plain_text(study_run):
    run_dir, rows, data = study_run
    page = (run_dir / "study.html").read_text()
    for phase in ("pretest", "posttest"):
        for q in data[phase]:
            assert set(q) == {"image", "token"} and re.fullmatch(r"study/[0-9a-f]{16}\.png", q["image"])
        assert len({len(q["token"]) for q in data[phase]}) == 1  # tokens alike whatever the class
        sequence = [truth_of(data)[q["image"]] for q in data[phase]]
        assert sequence != sorted(sequence) and sequence != sorted(sequence, reverse=True)  # not listed by class
    assert "edits/" not in page and "_to_" not in page and "original.png" not in page  # no run path names a class
    hidden = {k: v for k, v in data.items() if k not in ("classes", "lesson", "instructions")}
    for cls in data["classes"]:
        assert cls not in json.dumps(hidden)  # classes appear only in the class list and the lesson
    assert data["key"] in page  # stated plainly: the key is in the page (supervised study, not an exam)


def test_tokens_round_trip_and_differ_between_images():
    key = "k" * 32
    tokens = {encode_class(1, key, f"study/{i:016x}.png") for i in range(20)}
    assert len(tokens) > 15  # the same class hides under different tokens
    for i in range(5):
        image = f"study/{i:016x}.png"
        assert decode_class(encode_class(i, key, image), key, image) == i
    assert fnv1a32("") == 0x811C9DC5 and fnv1a32("a") == 0xE40C292C  # the published FNV-1a test values


def test_participant_rule_balances_numbered_ids_and_replays():
    arms = ["counterfactual", "examples", "counterfactual_diff"]
    assigned = [participant_arm(str(k), arms, seed=0) for k in range(1, 13)]
    assert Counter(assigned) == {a: 4 for a in arms}  # 1, 2, 3, ... cycle through the arms
    assert assigned[:3] == ["examples", "counterfactual_diff", "counterfactual"]  # (k + seed) mod 3
    assert participant_arm(" 7 ", arms, 0) == participant_arm("7", arms, 0)
    assert participant_arm("7", arms, 1) == participant_arm("8", arms, 0)  # the seed rotates the cycle
    named = [participant_arm(f"lab-{k}", arms, 0) for k in range(300)]
    assert set(named) == set(arms) and max(Counter(named).values()) < 140  # hashed ids: balanced on average
    items = list(range(10))
    order = participant_order(items, "P1", "pretest", 0)
    assert sorted(order) == items and order == participant_order(items, "P1", "pretest", 0)
    assert order != participant_order(items, "P2", "pretest", 0)


def _row(path, cls, tgt, flipped, already="0", judge=""):
    return {"source_path": path, "source_class": cls, "target_class": tgt, "eta": "2", "t_skip": "0.5",
            "flipped": flipped, "already_target": already, "judge_flipped": judge, "l2": "0.1", "lpips": "",
            "original_path": f"{path}/original.png", "counterfactual_path": "" if already == "1" else f"{path}/cf.png"}


def test_split_with_too_few_images_uses_what_there_is_and_says_so():
    rows = [_row(f"a{i}", "a", "b", "1") for i in range(5)] + [_row(f"b{i}", "b", "a", "0") for i in range(5)]
    rows[0] = _row("a0", "a", "b", "0", already="1")  # already b: no edit, never a lesson
    cfg = StudyConfig()  # 6 + 4 + 6 per class wanted
    plans = study_split(rows, cfg, lambda rel: True)
    a, b = plans["a"], plans["b"]
    assert (len(a.pretest), len(a.lesson), len(a.posttest)) == (2, 1, 2)  # 5 images, in proportion
    assert all(r["source_path"] != "a0" for r in a.lesson)
    assert (len(b.pretest), len(b.lesson), len(b.posttest)) == (2, 0, 3)  # no b edit reached a: tests take all
    notes = shortfall_notes(plans, ["a", "b"], cfg, "flipped")
    assert len(notes) == 2 and "pre-test 2 of 6" in notes[0] and "0 with an edit" in notes[1]
    missing = study_split(rows, cfg, lambda rel: not rel.startswith("a1/"))  # a1's files are gone
    assert "a1" not in {r["source_path"] for part in ("pretest", "lesson", "posttest")
                        for r in getattr(missing["a"], part)}


def test_a_run_without_any_verdict_teaches_with_its_edits_and_says_they_are_unverified():
    rows = [_row(f"{c}{i}", c, "b" if c == "a" else "a", "") for c in "ab" for i in range(4)]
    cfg = StudyConfig(pretest_images=1, lesson_images=2, posttest_images=1)
    plans = study_split(rows, cfg, lambda rel: True)
    assert all(len(plans[c].lesson) == 2 for c in "ab")
    notes = shortfall_notes(plans, ["a", "b"], cfg, None)
    assert notes == ["No oracle or judge verdicts in results.csv: the lesson's edits are not known to reach the "
                     "other class."]


def test_old_run_folders_get_the_defaults_and_bad_settings_name_the_file(tmp_path):
    assert run_study_config(tmp_path) == StudyConfig()  # no config.yaml at all
    (tmp_path / "config.yaml").write_text("seed: 0\nviews:\n  gif_frame_ms: 300\n")  # an older run: no views.study
    assert run_study_config(tmp_path) == StudyConfig()
    (tmp_path / "config.yaml").write_text("views:\n  study:\n    lesson_images: 0\n")
    with pytest.raises(ConfigError, match=r"config\.yaml.*lesson_images"):
        run_study_config(tmp_path)
    (tmp_path / "config.yaml").write_text("views:\n  study:\n    arms: [counterfactual, flashcards]\n")
    with pytest.raises(ConfigError, match=r"config\.yaml.*flashcards"):
        run_study_config(tmp_path)


def test_disabled_study_writes_no_page_and_copies_are_pruned(study_run, tmp_path):
    run_dir, _, _ = study_run
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    before = set((copy / "study").iterdir())
    views = write_views(copy, study=dataclasses.replace(StudyConfig(), enabled=False))
    assert views["study"] is None and not (copy / "study.html").exists()
    after = set((copy / "study").iterdir())
    assert after < before  # the quiz keeps its copies; the study's own are gone
    used = {q["image"] for q in page_data(copy / "quiz.html")["quiz"]}
    assert used <= {f"study/{p.name}" for p in after}
    copies = OpaqueCopies(copy)
    assert copies("no/such/file.png") is None


def test_the_js_and_python_rules_are_the_same_text():
    """study.js and blind.js implement the documented rules (their constants and the CSV header)."""
    blind, study = (TEMPLATES / "blind.js").read_text(), (TEMPLATES / "study.js").read_text()
    assert "0x811c9dc5" in blind and "0x01000193" in blind and "0x6d2b79f5" in blind
    assert 'data.seed + ":" + pid + ":" + phase' in study and 'data.seed + ":" + pid' in study
    header = re.search(r"var HEADER = \[(.*?)\];", study, re.S).group(1)
    assert tuple(re.findall(r'"(\w+)"', header)) == CSV_COLUMNS


# --------------------------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------------------------
def answers_csv(participant: str, arm: str, pre: list, post: list, session: str = "s1") -> str:
    """An answers CSV like study.html's: ``pre``/``post`` are lists of (true class, answer)."""
    lines = [",".join(CSV_COLUMNS)]
    for phase, answers in (("pretest", pre), ("posttest", post)):
        for k, (truth, answer) in enumerate(answers):
            lines.append(f"S,{participant},{session},{arm},{phase},{k + 1},img{k},{truth},{answer},,1200")
        if phase == "pretest":
            lines.append(f"S,{participant},{session},{arm},lesson,0,,,,,30000")
    return "\n".join(lines) + "\n"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_analysis_reports_the_accuracies_and_gains_the_answers_imply(tmp_path):
    right, wrong = ("a", "a"), ("b", "a")
    files = [
        _write(tmp_path, "p1.csv", answers_csv("1", "counterfactual", [right, wrong, wrong, wrong], [right] * 4)),
        _write(tmp_path, "p2.csv", answers_csv("2", "counterfactual", [right, right, wrong, wrong], [right] * 4)),
        _write(tmp_path, "p3.csv", answers_csv("3", "examples", [right, right, wrong, wrong],
                                               [right, right, right, wrong])),
    ]
    files.append(_write(tmp_path, "dup.csv", files[0].read_text()))  # the same answers twice count once
    result = analyze(read_answers(files), resamples=500, permutations=500)
    cf, ex = result["arms"]["counterfactual"], result["arms"]["examples"]
    assert cf["participants"] == 2 and ex["participants"] == 1
    assert cf["pretest"]["mean"] == pytest.approx(0.375) and cf["posttest"]["mean"] == 1.0
    assert cf["gain"]["mean"] == pytest.approx(0.625) and ex["gain"]["mean"] == pytest.approx(0.25)
    lo, hi = cf["gain"]["ci95"]
    assert 0.5 - 1e-9 <= lo <= 0.625 <= hi <= 0.75 + 1e-9  # bootstrap over the 2 participants' gains .75 and .5
    (comparison,) = result["comparisons"]
    assert (comparison["arm"], comparison["versus"]) == ("counterfactual", "examples")
    assert comparison["gain_difference"] == pytest.approx(0.375) and 0 < comparison["p_value"] <= 1
    per = cf["per_class"]["pretest"]
    assert per["a"]["correct"] == 3 and per["a"]["n"] == 3 and per["b"]["correct"] == 0 and per["b"]["n"] == 5
    assert cf["lesson_seconds"] == 30.0
    table = markdown_report(result)
    assert "| counterfactual | 2 (2) | 37.5%" in table and "+62.5 pp" in table and "+37.5 pp" in table
    json.dumps(result, allow_nan=False)


def test_a_restarted_participant_keeps_their_first_complete_session(tmp_path):
    partial = answers_csv("7", "examples", [("a", "b")], [], session="s0")  # stopped after one question
    full = answers_csv("7", "examples", [("a", "a")], [("a", "a")], session="s1")
    rows = read_answers([_write(tmp_path, "a.csv", partial), _write(tmp_path, "b.csv", full)])
    assert {r.session for r in rows} == {"s1"}


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("true_class", "truth"), r"bad\.csv: missing column\(s\) true_class"),
    (lambda t: t.replace(",examples,", ",flashcards,", 1), r"bad\.csv, line 2: column 'arm' = 'flashcards'"),
    (lambda t: t.replace(",pretest,", ",warmup,", 1), r"bad\.csv, line 2: column 'phase' = 'warmup'"),
    (lambda t: t.replace(",1200", ",soon", 1), r"bad\.csv, line 2: column 'response_ms' = 'soon'"),
    (lambda t: t.split("\n")[0] + "\n", r"bad\.csv: holds no answer"),
])
def test_bad_answer_files_are_refused_naming_file_and_column(tmp_path, change, message):
    path = _write(tmp_path, "bad.csv", change(answers_csv("1", "examples", [("a", "a")], [("a", "b")])))
    with pytest.raises(ArtefactError, match=message):
        read_answers([path])


def test_one_participant_in_two_arms_is_refused(tmp_path):
    files = [_write(tmp_path, "x.csv", answers_csv("9", "examples", [("a", "a")], [("a", "a")])),
             _write(tmp_path, "y.csv", answers_csv("9", "counterfactual", [("a", "a")], [("a", "a")], "s2"))]
    with pytest.raises(ArtefactError, match="participant '9' appears in arms counterfactual, examples"):
        read_answers(files)


def test_analyze_study_script_writes_table_json_and_figure(tmp_path, capsys):
    import runpy

    main = runpy.run_path(str(REPO / "scripts" / "analyze_study.py"))["main"]
    a = _write(tmp_path, "a.csv", answers_csv("1", "counterfactual", [("a", "b")] * 2, [("a", "a")] * 2))
    b = _write(tmp_path, "b.csv", answers_csv("2", "examples", [("a", "a")] * 2, [("a", "a")] * 2))
    assert main([str(a), str(b), "--plot", str(tmp_path / "plots"), "--json", str(tmp_path / "r.json"),
                 "--resamples", "200", "--permutations", "200"]) == 0
    assert "| counterfactual | 1 (1) | 0.0%" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["arms"]["counterfactual"]["gain"]["mean"] == 1.0
    assert (tmp_path / "plots" / "study_results.png").stat().st_size > 1000
    bad = _write(tmp_path, "bad.csv", "participant,arm\n1,examples\n")
    assert main([str(bad)]) == 2
    assert "bad.csv: missing column(s) phase" in capsys.readouterr().err


def test_parse_answers_reads_study_js_quoting():
    text = ",".join(f'"{c}"' for c in CSV_COLUMNS) + "\n" + \
        '"S","P, 1","s","examples","pretest","1","study/ab.png","x ""y""","x ""y""","1","12"\n'
    (row,) = parse_answers(text)
    assert row.participant == "P, 1" and row.true_class == 'x "y"' and row.correct and row.response_ms == 12


# --------------------------------------------------------------------------------------------------------------------
# The whole study in a real browser
# --------------------------------------------------------------------------------------------------------------------
def _do_study(page, run_dir: Path, pid: str, data: dict, right: dict, lesson_seen, downloads: Path) -> Path:
    """Complete study.html as participant ``pid``: ``right[phase](k)`` says whether the k-th answer of a test is
    right; ``lesson_seen(page)`` checks the lesson. Checks on the way that nothing on screen gives a test image's
    class away. Returns the downloaded CSV."""
    truth = truth_of(data)
    classes = data["classes"]
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    page.goto((run_dir / "study.html").as_uri() + f"?participant={pid}")
    assert page.locator("#start").is_disabled()  # not before consent
    page.check("#consent")
    page.click("#start")
    for phase in ("pretest", "posttest"):
        for k in range(len(data[phase])):
            page.wait_for_selector("#test-answers button:not([disabled])")
            image = page.locator("#test-image")
            src = image.get_attribute("src")
            attrs = image.evaluate("i => [...i.attributes].map(a => a.value).join(' ')")
            assert all(c not in attrs for c in classes), attrs  # no class in the image's address or attributes
            shown = page.locator("#test").inner_text()
            assert all(shown.count(c) == 1 for c in classes)  # each class once: its answer button
            answer = truth[src] if right[phase](k) else other[truth[src]]
            page.click(f"#test-answers button[data-class='{answer}']")
        if phase == "pretest":
            page.click("#interlude-next")
            page.wait_for_selector("#lesson:not([hidden])")
            assert _all_images_loaded(page) == []
            lesson_seen(page)
            page.click("#lesson-done")
            page.click("#interlude-next")
    page.wait_for_selector("#result:not([hidden])")
    with page.expect_download() as download:
        page.click("#download")
    path = downloads / download.value.suggested_filename
    download.value.save_as(path)
    return path


@pytest.mark.slow
def test_participants_in_every_arm_complete_the_study_and_the_analysis_reports_their_scores(study_run, tmp_path):
    from playwright.sync_api import sync_playwright

    run_dir, _, data = study_run
    truth = truth_of(data)
    arms = data["arms"]
    pids = {arm: next(str(k) for k in range(1, 10) if participant_arm(str(k), arms, data["seed"]) == arm)
            for arm in arms}
    n_lesson = len(data["lesson"])

    def lesson_check(arm):
        def check(page):
            if arm == "examples":  # real images only, grouped by class, as many as the counterfactual arm's pairs
                assert page.locator(".lesson-pair").count() == 0
                assert page.locator(".example-row img").count() == n_lesson
            else:  # original, edit, flicker (and the difference map)
                assert page.locator(".lesson-pair").count() == n_lesson
                per_pair = 4 if arm == "counterfactual_diff" else 3
                assert page.locator(".lesson-pair img").count() == per_pair * n_lesson
        return check

    # counterfactual: 2 of 6 right before, 6 of 6 after; examples: 3 of 6 before, 4 of 6 after; with the
    # difference map: 3 of 6, then 5 of 6
    right = {
        "counterfactual": {"pretest": lambda k: k < 2, "posttest": lambda k: True},
        "examples": {"pretest": lambda k: k % 2 == 0, "posttest": lambda k: k < 4},
        "counterfactual_diff": {"pretest": lambda k: k >= 3, "posttest": lambda k: k != 0},
    }
    expected = {"counterfactual": (2 / 6, 1.0), "examples": (3 / 6, 4 / 6), "counterfactual_diff": (3 / 6, 5 / 6)}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    errors, requests, files = [], [], {}
    with sync_playwright() as pw:
        browser = _launch(pw, tmp_path / "profile")
        page = browser.new_page()  # a persistent context accepts downloads by default
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        for arm in right:
            files[arm] = _do_study(page, run_dir, pids[arm], data, right[arm], lesson_check(arm), downloads)
        # the organiser's page collects both sessions from this browser
        page.goto((run_dir / "study.html").as_uri() + "?results=all")
        assert page.locator("#collect-table tbody tr").count() == len(right)
        with page.expect_download() as download:
            page.click("#download-all")
        combined = downloads / "all.csv"
        download.value.save_as(combined)
        # the page's hash, generator and shuffle are the Python ones, bit for bit
        probe = ["", "a", "P-07", "h\u00e9llo \u2192 world"]
        js = page.evaluate("t => t.map(s => [fnv1a32(s), (function () { var d = mulberry32(fnv1a32(s)); "
                           "return [d(), d(), d()]; })(), seededShuffle([0,1,2,3,4,5,6,7,8,9], s)])", probe)
        for text, (h, draws, order) in zip(probe, js):
            gen = mulberry32(fnv1a32(text))
            assert h == fnv1a32(text) and draws == [next(gen) for _ in range(3)]
            assert order == seeded_shuffle(list(range(10)), text)
        browser.close()
    assert errors == []
    assert requests and all(u.startswith(("file://", "data:", "blob:")) for u in requests), requests

    for arm, path in files.items():
        rows = list(csv.DictReader(path.open()))
        assert {r["arm"] for r in rows} == {arm} and {r["participant"] for r in rows} == {pids[arm]}
        assert [r["phase"] for r in rows] == ["pretest"] * 6 + ["lesson"] + ["posttest"] * 6
        for phase in ("pretest", "posttest"):  # the order Python replays from the id
            order = participant_order(data[phase], pids[arm], phase, data["seed"])
            assert [r["image"] for r in rows if r["phase"] == phase] == [q["image"] for q in order]
        assert all(r["true_class"] == truth[r["image"]] for r in rows if r["phase"] != "lesson")
        assert all(float(r["response_ms"]) >= 0 for r in rows)

    from diffusion.study import analyze as analyse_rows

    result = analyse_rows(read_answers(list(files.values())), resamples=300, permutations=300)
    for arm, (pre, post) in expected.items():
        assert result["arms"][arm]["pretest"]["mean"] == pytest.approx(pre)
        assert result["arms"][arm]["posttest"]["mean"] == pytest.approx(post)
        assert result["arms"][arm]["gain"]["mean"] == pytest.approx(post - pre)
    gains = {arm: post - pre for arm, (pre, post) in expected.items()}
    assert [(c["arm"], c["versus"]) for c in result["comparisons"]] == [
        ("counterfactual", "counterfactual_diff"), ("counterfactual", "examples"), ("counterfactual_diff", "examples")]
    for c in result["comparisons"]:
        assert c["gain_difference"] == pytest.approx(gains[c["arm"]] - gains[c["versus"]])
    again = analyse_rows(read_answers([combined, files["examples"]]), resamples=300, permutations=300)
    assert again["arms"] == result["arms"]  # the combined file holds the same answers; duplicates count once
