"""Teaching views on a tiny-model run judged by a fake oracle: the per-edit files, the pages and what they reference,
the lesson/quiz split, idempotence, the config keys, the script, and both pages in a real headless Chromium."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion.edit.run as edit_run
from conftest import write_blob_images
from diffusion.config import EditConfig, load_config
from diffusion.views.blind import decode_class, opaque_name
from diffusion.views.gallery import write_views
from diffusion.views.pages import embed_json, render_page
from diffusion.views.quiz import lesson_and_quiz, lesson_row, verdict_column
from diffusion.views.images import StripFrame, compose_strip, difference_map, save_flicker_gif

REPO = Path(__file__).resolve().parent.parent
FRAME_MS = 250
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


class DiscOracle:
    """Judges a clean blob image (bright background) by the colour of its disc, red = class_a, blue = class_b, and
    calls anything darker (the random model's noisy edits) class_b, with graded probabilities. So, whatever the noise,
    every class_a -> class_b edit flips and no class_b -> class_a edit does."""

    classes = ("class_a", "class_b")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        colour = torch.sigmoid(30 * (images[:, 2].mean(dim=(1, 2)) - images[:, 0].mean(dim=(1, 2))))
        clean = torch.sigmoid(40 * (images.mean(dim=(1, 2, 3)) - 0.8))
        p = clean * colour + (1 - clean) * (0.75 + 0.2 * images.mean(dim=(1, 2, 3)).clamp(0, 1))
        return torch.stack([1 - p, p], dim=1)


def _config(out: Path, tiny_model: Path, data: Path, **over) -> EditConfig:
    values = {"output_dir": out / "run", "embeds_dir": out / "embeds", "compute_missing_embeds": "true",
              "model.decoder": tiny_model / "decoder", "model.prior": tiny_model / "prior", "model.device": "cpu",
              "model.image_size": 32, "data.root": data, "num_inference_steps": 8, "search": "fixed", "t_skip": 0.6,
              "eta": "[1,2]", "batch_size": 4, "lpips": "false", "views.strip_etas": "[0,2]",
              "views.strip_t_skip": 0.75, "views.gif_frame_ms": FRAME_MS}
    values.update(over)
    return load_config(EditConfig, None, [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """One finished run (2 test images per class, both directions, 2 etas, 32 px so it takes seconds):
    (config, run folder, results rows)."""
    root = tmp_path_factory.mktemp("views")
    for cls in ("class_a", "class_b"):
        write_blob_images(root / "data", "train", cls, 4)
        write_blob_images(root / "data", "test", cls, 2, seed=1)
    cfg = _config(root, tiny_model, root / "data")
    edit_run.run_edits(cfg, oracle=DiscOracle())
    run_dir = Path(cfg.output_dir)
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return cfg, run_dir, rows


def page_data(page: Path) -> dict:
    block = re.search(r'<script type="application/json" id="run-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(block.group(1))


URL_KEYS = {"original", "counterfactual", "pair", "gif", "diff", "strip", "image", "links", "svg", "png"}


def _urls(value, key=None):
    """The page data's file URLs: the values under URL_KEYS, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _urls(v, k if key != "links" else key)
    elif isinstance(value, list):
        for v in value:
            yield from _urls(v, key)
    elif isinstance(value, str) and key in URL_KEYS:
        yield value


def referenced_files(page: Path) -> set:
    """Every file a page points at: its src/href attributes and the file URLs of its data."""
    refs = set(re.findall(r'(?:src|href)="([^"#]+)"', page.read_text()))
    return refs | set(_urls(page_data(page)))


def _tree_digest(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.suffix in {".gif", ".png", ".html"}}


# --------------------------------------------------------------------------------------------------------------------
# Files on disk
# --------------------------------------------------------------------------------------------------------------------
def test_every_edit_gets_a_gif_a_difference_map_and_a_strip(run):
    _, run_dir, rows = run
    assert len(rows) == 4 * 2 and all(r["oracle_prob_after"] != "" for r in rows)
    assert {r["flipped"] for r in rows if r["source_class"] == "class_a"} == {"1"}  # DiscOracle: a -> b flips
    assert {r["flipped"] for r in rows if r["source_class"] == "class_b"} == {"0"}
    for r in rows:
        folder = run_dir / Path(r["counterfactual_path"]).parent
        tag = Path(r["counterfactual_path"]).stem[len("cf_"):]
        original = Image.open(run_dir / r["original_path"]).convert("RGB")
        with Image.open(folder / f"flicker_{tag}.gif") as gif:
            assert gif.n_frames == 2 and gif.info["duration"] == FRAME_MS and gif.info["loop"] == 0
            first = np.asarray(gif.convert("RGB"), dtype=float)
        assert np.abs(first - np.asarray(original, dtype=float)).mean() < 8  # frame 1 is the original (one palette)
        assert Image.open(folder / f"diff_{tag}.png").size == original.size
        strip = Image.open(folder / "strip.png")
        assert strip.width > 3 * 128  # the original and 2 etas side by side, 32 px tiles shown at 128 px
    assert (run_dir / "index.html").is_file() and (run_dir / "quiz.html").is_file()


def test_pages_reference_only_existing_files_inside_the_run(run):
    _, run_dir, rows = run
    for page in ("index.html", "quiz.html"):
        text = (run_dir / page).read_text()
        assert "http://" not in text and "https://" not in text  # nothing from the network
        refs = referenced_files(run_dir / page)
        assert refs
        for ref in refs:
            assert not ref.startswith("/") and "://" not in ref and ".." not in ref.split("/"), ref
            assert (run_dir / unquote(ref)).is_file(), f"{page} references missing {ref}"
    cards = page_data(run_dir / "index.html")["cards"]
    assert len(cards) == len(rows)
    for card in cards:
        assert all(card[k] for k in ("original", "counterfactual", "gif", "diff", "strip"))


def test_gallery_carries_the_oracle_probabilities_and_t_skip(run):
    _, run_dir, rows = run
    data = page_data(run_dir / "index.html")
    assert data["has_oracle"] and data["summary"]["n_rows"] == len(rows) and data["frame_ms"] == FRAME_MS
    by_key = {(c["source_path"], c["target_class"], c["eta"]): c for c in data["cards"]}
    for r in rows:
        card = by_key[(r["source_path"], r["target_class"], float(r["eta"]))]
        assert card["p_before"] == pytest.approx(float(r["oracle_prob_before"]))
        assert card["delta"] == pytest.approx(float(r["oracle_prob_after"]) - float(r["oracle_prob_before"]))
        assert card["t_skip"] == float(r["t_skip"]) and card["flipped"] == (r["flipped"] == "1")


def quiz_truth(data: dict) -> dict:
    """A quiz page's questions: image URL -> the true class its token hides."""
    return {q["image"]: data["classes"][decode_class(q["token"], data["key"], q["image"])] for q in data["quiz"]}


def test_quiz_shows_only_images_absent_from_the_lesson(run):
    _, run_dir, rows = run
    data = page_data(run_dir / "quiz.html")
    source_of = {opaque_name(run_dir / r["original_path"]): r for r in rows}  # the opaque copies' originals
    flipped_cf = {opaque_name(run_dir / r["counterfactual_path"]) for r in rows if r["flipped"] == "1"}
    lesson_images = {source_of[p["original"]]["source_path"] for p in data["lesson"]}
    truth = quiz_truth(data)
    assert truth and not lesson_images & {source_of[image]["source_path"] for image in truth}
    assert set(truth.values()) == {"class_a", "class_b"}  # 2 per class: 1 lesson, 1 quiz each
    assert all(source_of[image]["source_class"] == cls for image, cls in truth.items())
    assert data["lesson"] and all(p["counterfactual"] in flipped_cf for p in data["lesson"])  # reached B
    assert data["classes"] == ["class_a", "class_b"]


def test_quiz_holds_no_class_in_plain_text(run):
    _, run_dir, _ = run
    page = (run_dir / "quiz.html").read_text()
    data = page_data(run_dir / "quiz.html")
    assert all(re.fullmatch(r"study/[0-9a-f]{16}\.png", q["image"]) and set(q) == {"image", "token"}
               for q in data["quiz"])
    assert "_to_" not in page and "edits/" not in page  # no run path (they name the classes) anywhere
    assert {len(q["token"]) for q in data["quiz"]} == {8}  # every token alike, whatever its class


def test_judge_verdict_and_already_target_rule_the_lesson():
    judged = [_row("x", "a", "b", "1", "1", "0.1"), _row("x", "a", "b", "2", "1", "0.3")]
    judged[0]["judge_flipped"], judged[1]["judge_flipped"] = "0", "1"  # the judge overrules the oracle
    assert verdict_column(judged) == "judge_flipped" and lesson_row(judged)["eta"] == "2"
    already = dict(judged[1], already_target="1")
    assert lesson_row([already], "judge_flipped") is None


def test_write_views_is_idempotent(run, tmp_path):
    _, run_dir, _ = run
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    write_views(copy, frame_ms=FRAME_MS)
    once = _tree_digest(copy)
    write_views(copy, frame_ms=FRAME_MS)
    assert _tree_digest(copy) == once
    original = _tree_digest(run_dir)  # the views of the run itself are the same bytes (the pages name the folder)
    assert {k: v for k, v in once.items() if not k.endswith(".html")} == \
        {k: v for k, v in original.items() if not k.endswith(".html")}


def test_finish_run_honours_views_enabled_and_frame_time(run, tmp_path):
    cfg, run_dir, _ = run
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    for page in ("index.html", "quiz.html"):
        (copy / page).unlink()
    off = dataclasses.replace(cfg, output_dir=str(copy), views=dataclasses.replace(cfg.views, enabled=False))
    edit_run.finish_run(off)
    assert not (copy / "index.html").exists()
    edit_run.finish_run(dataclasses.replace(off, views=dataclasses.replace(cfg.views, gif_frame_ms=400)))
    assert (copy / "index.html").is_file() and (copy / "quiz.html").is_file()
    gif = next(copy.rglob("flicker_*.gif"))
    assert Image.open(gif).info["duration"] == 400


@pytest.mark.slow
def test_make_views_script_remakes_a_run_folder(run, tmp_path):
    _, run_dir, _ = run
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    removed = [p for p in copy.rglob("*") if p.name.startswith(("flicker_", "diff_", "strip.png"))]
    for p in removed + [copy / "index.html", copy / "quiz.html"]:
        p.unlink()
    # one process for both cases (imports cost seconds): the run folder is remade, then the empty folder is refused
    proc = subprocess.run([sys.executable, "scripts/make_views.py", str(copy), str(tmp_path / "nothing")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds no results.csv" in proc.stderr, proc.stderr[-2000:]
    assert all(p.is_file() for p in removed + [copy / "index.html", copy / "quiz.html"])
    assert Image.open(next(copy.rglob("flicker_*.gif"))).info["duration"] == FRAME_MS  # from the run's config


def test_a_run_without_rows_still_gets_both_pages(tmp_path):
    from diffusion.edit.results import COLUMNS

    (tmp_path / "results.csv").write_text(",".join(COLUMNS) + "\n")
    views = write_views(tmp_path)
    assert views["edits"] == 0 and views["quiz_images"] == 0
    assert page_data(tmp_path / "index.html")["cards"] == [] and (tmp_path / "quiz.html").is_file()


# --------------------------------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------------------------------
def test_embedded_json_cannot_end_the_script_block():
    data = {"name": "</script><script>alert(1)</script><!-- & >", "arrow": "3 \u2192 8"}
    text = embed_json(data)
    assert "</" not in text and "<!--" not in text and text.isascii()
    assert json.loads(text) == data
    page = render_page("index.html", "a </title> & b", "gallery.js", data)
    assert page.count("</script>") == 2 and "a &lt;/title&gt; &amp; b" in page


def test_difference_map_lights_up_only_what_changed():
    original = np.full((32, 32, 3), 128, np.uint8)
    edited = original.copy()
    edited[8:16, 8:16] = 250
    diff, scale = difference_map(Image.fromarray(original), Image.fromarray(edited))
    arr = np.asarray(diff, dtype=float)
    assert scale == pytest.approx(122 / 255, abs=1e-3)
    assert arr[8:16, 8:16].mean() > 2 * arr[20:, 20:].mean()  # the changed square glows over the dimmed rest
    assert np.ptp(arr[20:, 20:]) == 0  # unchanged pixels: one flat grey
    same, _ = difference_map(Image.fromarray(original), Image.fromarray(original))  # no change: no crash, no colour
    assert np.ptp(np.asarray(same)) == 0


def test_flicker_gif_keeps_unchanged_pixels_identical(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    edited = original.copy()
    edited[:6] = 255 - edited[:6]
    path = save_flicker_gif(Image.fromarray(original), Image.fromarray(edited), tmp_path / "f.gif", 300)
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")))
    assert len(frames) == 2 and np.array_equal(frames[0][6:], frames[1][6:])


def test_compose_strip_is_the_frames_alone_without_text():
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    frames = [StripFrame(Image.new("RGB", (64, 64), c), f"eta {k}", p)
              for k, (c, p) in enumerate(zip(colours, [0.1, None, 0.9]))]
    strip = compose_strip(frames, gap=4)
    assert strip.size == (3 * 128 + 2 * 4, 128)  # 64 px tiles shown at 128 px; no title or caption rows
    arr = np.asarray(strip)
    for k, colour in enumerate(colours):  # each tile is exactly its frame: nothing drawn over it
        assert (arr[:, k * 132:k * 132 + 128] == colour).all()
    assert (arr[:, 128:132] == 255).all()  # the white gap
    with pytest.raises(ValueError):
        compose_strip([])


def _row(path, cls, tgt, eta, flipped, l2, t_skip="0.5"):
    return {"source_path": path, "source_class": cls, "target_class": tgt, "eta": eta, "t_skip": t_skip,
            "flipped": flipped, "l2": l2, "lpips": "", "original_path": f"{path}.png",
            "counterfactual_path": f"{path}_cf{eta}.png", "already_target": "0", "judge_flipped": ""}


def test_lesson_row_teaches_with_the_smallest_edit_that_flipped():
    rows = [_row("x", "a", "b", "1", "0", "0.1"), _row("x", "a", "b", "2", "1", "0.5"),
            _row("x", "a", "b", "3", "1", "0.3")]
    assert lesson_row(rows)["eta"] == "3"
    assert lesson_row([_row("x", "a", "b", "1", "0", "0.1")]) is None  # judged, never flipped: not a lesson
    unjudged = [_row("x", "a", "b", "1", "", "0.1"), _row("x", "a", "b", "2", "", "0.5")]
    assert lesson_row(unjudged)["eta"] == "2"  # no oracle: the strongest eta


def test_lesson_and_quiz_split_is_seeded_and_disjoint():
    rows = [_row(f"{c}{i}", c, "b" if c == "a" else "a", "2", "", "0.1") for c in "ab" for i in range(5)]
    lesson, quiz = lesson_and_quiz(rows, seed=3)
    assert (lesson, quiz) == lesson_and_quiz(rows, seed=3)
    assert len(quiz) == 4 and len(lesson) == 6  # per class: 5 images -> 3 lesson, 2 quiz
    assert not {p["source_path"] for p in lesson} & {q["source_path"] for q in quiz}
    assert {q["label"] for q in quiz} == {"a", "b"}


# --------------------------------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------------------------------
def _launch(playwright, profile: Path):
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium; .ci/run does "
                    "it when apt-get is available) to run the browser test")
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 900})


def _all_images_loaded(page) -> list:
    """Bring every image outside hidden parts into view in turn (lazy ones load then), wait for each, and return the
    ones that failed."""
    images = page.locator("img:visible")
    for k in range(images.count()):
        image = images.nth(k)
        image.scroll_into_view_if_needed()
        image.evaluate("i => i.complete || new Promise(done => { i.onload = i.onerror = done; })")
    return page.evaluate("() => [...document.images].filter(i => i.getAttribute('src') && i.naturalWidth === 0)"
                         ".map(i => i.getAttribute('src'))")


@pytest.mark.slow
def test_gallery_and_quiz_work_offline_in_chromium(run, tmp_path):
    from playwright.sync_api import sync_playwright

    _, run_dir, rows = run
    requests, errors = [], []
    with sync_playwright() as pw:
        browser = _launch(pw, tmp_path / "profile")
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((run_dir / "index.html").as_uri())

        # every figure and every image of every card (original, counterfactual, GIF, difference map, each strip
        # frame) loads from disk
        data = page_data(run_dir / "index.html")
        assert page.locator(".card").count() == len(rows)
        assert _all_images_loaded(page) == []
        frames = sum(len(c["strip_frames"]) for c in data["cards"])
        assert frames == 3 * len(rows)  # the original and 2 etas
        assert page.evaluate("() => document.images.length") == 4 * len(rows) + frames + len(data["figures"])

        # the comparison slider changes what is shown: all counterfactual at 0, all original at 100
        compare = page.locator(".compare").first
        slider = page.locator(".compare-slider").first
        slider.fill("0")
        at_zero = compare.screenshot()
        slider.fill("100")
        at_hundred = compare.screenshot()
        assert at_zero != at_hundred
        assert "100%" in compare.locator(".cf-layer").evaluate("e => getComputedStyle(e).clipPath")

        # filters hide cards; sorting orders them by the change in confidence
        visible = lambda: page.locator(".card:not([hidden])")  # noqa: E731
        direction = "class_a \u2192 class_b"
        page.select_option("#filter-direction", direction)
        shown = visible()
        assert shown.count() == sum(r["source_class"] == "class_a" for r in rows) < len(rows)
        assert {shown.nth(k).get_attribute("data-direction") for k in range(shown.count())} == {direction}
        page.select_option("#filter-direction", "")
        page.select_option("#filter-flipped", "flipped")
        assert visible().count() == sum(r["flipped"] == "1" for r in rows) < len(rows)
        page.select_option("#filter-flipped", "")
        page.select_option("#sort", "delta-desc")
        deltas = [float(visible().nth(k).get_attribute("data-delta")) for k in range(visible().count())]
        assert len(deltas) == len(rows) and deltas == sorted(deltas, reverse=True)
        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)
        assert (tmp_path / "gallery.png").stat().st_size > 0

        # the quiz: lesson first, then every question (one answered wrong on purpose), then the score
        page.goto((run_dir / "quiz.html").as_uri())
        quiz = page_data(run_dir / "quiz.html")
        page.check("#feedback")
        page.click("#start-lesson")
        assert page.locator(".lesson-pair").count() == len(quiz["lesson"]) > 0
        assert _all_images_loaded(page) == []
        page.click("#lesson-done")
        wrong = {"class_a": "class_b", "class_b": "class_a"}
        truth = quiz_truth(quiz)
        for k, item in enumerate(quiz["quiz"]):
            assert page.locator("#progress").inner_text() == f"Question {k + 1} of {len(quiz['quiz'])}"
            assert page.locator("#quiz-image").get_attribute("src") == item["image"]
            assert not page.locator("#next").is_visible()  # nothing to go on to before an answer
            label = truth[item["image"]]
            page.click(f"#answers button[data-class='{label if k else wrong[label]}']")
            assert page.locator("#feedback-text").inner_text().startswith("Not quite" if k == 0 else "Right")
            page.click("#next")
        n = len(quiz["quiz"])
        assert page.locator("#score").inner_text().startswith(f"You scored {n - 1} of {n}")
        assert _all_images_loaded(page) == []
        page.screenshot(path=str(tmp_path / "quiz.png"), full_page=True)
        browser.close()
    assert errors == []
    assert requests and all(u.startswith(("file://", "data:", "blob:")) for u in requests), requests


@pytest.mark.slow
def test_gallery_figures_strip_captions_and_a_420px_screen_in_chromium(run, tmp_path):
    """The run's figures render above the cards, the strip captions are HTML text under each frame, and at a 420 px
    wide screen nothing makes the page scroll sideways."""
    from playwright.sync_api import sync_playwright

    _, run_dir, rows = run
    data = page_data(run_dir / "index.html")
    assert [f["name"] for f in data["figures"]] == ["t_skip_histogram", "distance_histogram"]  # a fixed-t_skip run
    errors = []
    with sync_playwright() as pw:
        browser = _launch(pw, tmp_path / "profile")
        page = browser.new_page()
        page.set_viewport_size({"width": 420, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((run_dir / "index.html").as_uri())
        figures = page.locator("#figures img")
        assert figures.count() == len(data["figures"])
        assert _all_images_loaded(page) == []
        for k in range(figures.count()):  # an SVG drawn at a real size, inside the screen, above the first card
            box = figures.nth(k).bounding_box()
            assert figures.nth(k).get_attribute("src").endswith(".svg")
            assert figures.nth(k).evaluate("i => i.naturalWidth") > 0 and box["width"] > 100 and box["height"] > 50
            assert box["x"] >= 0 and box["x"] + box["width"] <= 420
        assert page.evaluate("() => document.querySelector('#figures').compareDocumentPosition("
                             "document.querySelector('.card')) & Node.DOCUMENT_POSITION_FOLLOWING")

        # nothing sticks out of a 420 px screen (wide tables scroll inside .table-wrap)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 420
        sticking_out = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => !e.closest('.table-wrap, [hidden]') && e.getClientRects().length)
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
            .map(e => e.tagName + '.' + e.className)""")
        assert sticking_out == []

        # interpolation strips: one HTML caption under each frame, as wide as its frame, in a readable size
        captions = page.locator(".strip-frame figcaption")
        assert captions.count() == sum(len(c["strip_frames"]) for c in data["cards"])
        first = [captions.nth(k).inner_text() for k in range(3)]
        assert first[0].startswith("original") and first[1].startswith("eta 0") and first[2].startswith("eta 2")
        assert all("p(class_" in t for t in first)
        size = captions.first.evaluate("c => parseFloat(getComputedStyle(c).fontSize)")
        assert size >= 11
        frame = page.locator(".strip-frame").first.bounding_box()
        assert captions.first.bounding_box()["width"] <= frame["width"] + 0.5
        page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)
        browser.close()
    assert errors == []


def _hand_made_run(folder: Path, t_skips) -> Path:
    """A run folder with results.csv only (no images): one first_flip row per t_skip."""
    from diffusion.edit.results import COLUMNS

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for k, t in enumerate(t_skips):
            writer.writerow({**{c: "" for c in COLUMNS}, "source_path": f"a/{k}.png", "source_class": "a",
                             "target_class": "b", "search": "first_flip", "t_skip": t, "eta": "1",
                             "flipped": "1" if k % 2 else "0", "already_target": "0", "l2": str(0.1 * (k + 1))})
    return folder


@pytest.mark.slow
def test_gallery_histogram_lists_t_skip_in_numeric_order_in_chromium(tmp_path):
    """Bin "0" comes last, after 0.97 and 0.5 (JavaScript would list the integer-like key first)."""
    from playwright.sync_api import sync_playwright

    run_dir = _hand_made_run(tmp_path / "run", ["0", "0.97", "0.5", "0", "1"])
    write_views(run_dir)
    with sync_playwright() as pw:
        browser = _launch(pw, tmp_path / "profile")
        page = browser.new_page()
        page.goto((run_dir / "index.html").as_uri())
        keys = page.locator(".hist-key").all_inner_texts()
        browser.close()
    assert keys == ["1", "0.97", "0.5", "0"]


def test_views_record_their_options_and_new_ones_are_logged_or_kept(tmp_path, caplog):
    import importlib.util
    import logging

    from diffusion.views.gallery import views_options

    run_dir = _hand_made_run(tmp_path / "run", ["0.5", "0"])
    write_views(run_dir, frame_ms=300)
    assert views_options(run_dir)["gif_frame_ms"] == 300
    with caplog.at_level(logging.WARNING):
        write_views(run_dir, frame_ms=300)
        assert "re-rendering" not in caplog.text
        write_views(run_dir, frame_ms=500)  # e.g. a resumed run with another views.gif_frame_ms
        assert "re-rendering every view with new options (gif_frame_ms 300 -> 500)" in caplog.text
    spec = importlib.util.spec_from_file_location("make_views", REPO / "scripts" / "make_views.py")
    make_views = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_views)
    assert make_views.main([str(run_dir)]) == 0  # no --frame_ms: the options the views were made with stay
    assert views_options(run_dir)["gif_frame_ms"] == 500
    assert make_views.main([str(run_dir), "--frame_ms", "250"]) == 0
    assert views_options(run_dir)["gif_frame_ms"] == 250 and "500 -> 250" in caplog.text

