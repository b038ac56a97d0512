"""One image at a time: the cached-inversion session (diffusion/interactive.py), scripts/edit_image.py and the local
app (diffusion/app.py, scripts/app.py), on the tiny model with a colour classifier, and the app in real Chromium."""

from __future__ import annotations

import csv
import json
import logging
import runpy
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_blob_images
from diffusion.app import AppModel, enlarged
from diffusion.config import EditConfig, load_config, to_yaml
from diffusion.interactive import EditSession, edit_image_files, load_workbench, source_image

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"]


class ColourOracle:
    """A classifier of the blob images: class_b when the image is bluer than it is red (class_a discs are red)."""

    classes = ["class_a", "class_b"]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(20.0 * (images[:, 2] - images[:, 0]).mean(dim=(1, 2)))
        return torch.stack([1.0 - p, p], dim=1)


def _overrides(root: Path, tiny_model: Path, **over) -> list:
    base = {"output_dir": root / "run", "embeds_dir": root / "embeds", "compute_missing_embeds": "true",
            "model.decoder": tiny_model / "decoder", "model.prior": tiny_model / "prior", "model.device": "cpu",
            "data.root": root / "data", "num_inference_steps": 10, "search": "first_flip",
            "t_skips": "[0.9,0.6,0.3,0.0]", "t_skip": 0.6, "eta": "[1.0]", "batch_size": 2, "lpips": "false",
            "oracle_dir": root / "given-oracle",  # never read: the tests hand the oracle over as an object
            "views.strip_etas": "[0.0,1.0]", "views.strip_t_skip": 0.6}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interactive")
    for cls in ("class_a", "class_b"):
        write_blob_images(root / "data", "train", cls, 6)
        write_blob_images(root / "data", "test", cls, 3, seed=1)
    return root


@pytest.fixture(scope="module")
def bench(root, tiny_model):
    cfg = load_config(EditConfig, None, _overrides(root, tiny_model))
    return load_workbench(cfg, oracle=ColourOracle())


def _eval_image(root: Path, cls: str = "class_a", k: int = 0) -> Path:
    return sorted((root / "data" / "test" / cls).glob("*.png"))[k]


# --------------------------------------------------------------------------------------------------------------------
# The session: one inversion per image, extended lazily, edits as a fresh pipeline call gives them
# --------------------------------------------------------------------------------------------------------------------
def test_a_session_inverts_each_image_once_and_extends_it_only_as_deep_as_asked(bench, root):
    session = EditSession(bench)
    image = source_image(bench.pipe, _eval_image(root), bench.cfg)
    first = session.edit(image, "class_a", "class_b", 1.0, 0.6)  # T = 10: 4 steps deep
    assert first.inverted and first.inversion_steps == 4 and first.edit.sampling_evals == 2 * 4
    other_eta = session.edit(image, "class_a", "class_b", 2.0, 0.6)
    assert not other_eta.inverted and other_eta.inversion_steps == 0  # a slider move pays only the sampling
    milder = session.edit(image, "class_a", "class_b", 1.0, 0.9)
    assert milder.inversion_steps == 0 and milder.edit.sampling_evals == 2 * 1
    deeper = session.edit(image, "class_a", "class_b", 1.0, 0.2)
    assert deeper.inversion_steps == 4 and deeper.edit.inversion_evals == 8  # only the 4 steps it lacked
    again = session.edit(image, "class_a", "class_b", 1.0, 0.6)
    assert torch.allclose(again.edit.picture, first.edit.picture, atol=1e-5)  # extending changed nothing before

    # the cached edit is what a fresh pipeline call gives for this image and seed
    fresh_inv = bench.pipe.invert(image.pixels[None], 10, [torch.Generator().manual_seed(session.seed(image))])
    fresh = bench.pipe(fresh_inv, bench.direction("class_a", "class_b"), eta=1.0, t_skip=0.6,
                       guidance_scale=bench.cfg.guidance_scale,
                       output_type="pt")
    assert torch.allclose(fresh.images[0], first.edit.picture, atol=1e-5)


def test_the_session_keeps_a_bounded_number_of_inversions(bench, root):
    session = EditSession(bench, cache_size=2)
    images = [source_image(bench.pipe, _eval_image(root, "class_a", k), bench.cfg) for k in range(3)]
    for image in images:
        assert session.edit(image, "class_a", "class_b", 1.0, 0.9).inverted
    assert session.is_cached(images[2]) and session.is_cached(images[1]) and not session.is_cached(images[0])


def test_the_search_keeps_the_mildest_t_skip_that_flips_the_oracle(bench, root):
    session = EditSession(bench)
    image = source_image(bench.pipe, _eval_image(root), bench.cfg)
    found = session.search(image, "class_a", "class_b", 1.0).edit
    assert found.t_skip in bench.cfg.t_skips and found.probs is not None
    milder = [t for t in bench.cfg.t_skips if t > found.t_skip]
    for t in milder:  # first_flip: every milder t_skip was tried and did not flip
        p = session.edit(image, "class_a", "class_b", 1.0, t).edit.probs
        assert p["class_b"] <= p["class_a"]
    if found.flipped:
        assert found.probs["class_b"] > found.probs["class_a"]


# --------------------------------------------------------------------------------------------------------------------
# scripts/edit_image.py
# --------------------------------------------------------------------------------------------------------------------
def test_edit_image_writes_every_view_with_the_oracle_choosing_the_source(bench, root, tiny_model, tmp_path):
    cfg = load_config(EditConfig, None, _overrides(root, tiny_model, eta="[1.0,2.0]"))
    result = edit_image_files(cfg, _eval_image(root, "class_a", 1), "class_b", output=tmp_path / "out",
                              bench=bench)
    out = tmp_path / "out"
    assert result.source == "class_a" and result.source_from == "oracle"  # the red disc: the oracle says class_a
    names = sorted(p.name for p in out.iterdir())
    per_eta = [f"{kind}_eta{eta}.{ext}" for eta in ("1", "2") for kind, ext in
               (("counterfactual", "png"), ("pair", "png"), ("flicker", "gif"), ("difference", "png"))]
    assert names == sorted(per_eta + ["original.png", "strip.png", "edit.json", "config.yaml", "run_info.json"])
    size = bench.pipe.image_size
    with Image.open(out / "pair_eta1.png") as pair:
        assert pair.size == (2 * size + 4, size)
    with Image.open(out / "flicker_eta2.gif") as gif:
        assert gif.n_frames == 2
    with Image.open(out / "strip.png") as strip:
        assert strip.width > 3 * size  # the original and the two strip etas
    saved = json.loads((out / "edit.json").read_text())
    assert saved["source_from"] == "oracle" and saved["search"] == "first_flip"
    assert [e["eta"] for e in saved["edits"]] == [1.0, 2.0]
    for e in saved["edits"]:
        assert e["t_skip"] in cfg.t_skips
        assert e["flipped"] == (e["probs"]["class_b"] > e["probs"]["class_a"])
    assert [f["caption"] for f in saved["strip"]["frames"]] == ["original", "eta 0", "eta 1"]
    assert result.files["strip"] == out / "strip.png" and all(p.is_file() for p in result.files.values())


def test_an_eval_image_edited_alone_gets_the_editing_runs_counterfactual(bench, root, tiny_model, tmp_path):
    """Same seed rule, same inversion, same sampling: kandinsky_eval.py and edit_image.py agree pixel for pixel."""
    import diffusion.edit.run as edit_run

    over = dict(output_dir=tmp_path / "run", search="fixed", oracle_dir="null", **{"views.enabled": "false"})
    cfg = load_config(EditConfig, None, _overrides(root, tiny_model, **over))
    edit_run.run_edits(cfg)
    with open(tmp_path / "run" / "results.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["source_class"] == "class_b")
    alone = edit_image_files(cfg, root / "data" / row["source_path"], "class_a", source="class_b",
                             output=tmp_path / "alone", bench=bench)
    assert alone.edits[0].t_skip == 0.6 and alone.mode == "fixed"
    ran = np.asarray(Image.open(tmp_path / "run" / row["counterfactual_path"]), dtype=int)
    mine = np.asarray(Image.open(tmp_path / "alone" / "counterfactual.png"), dtype=int)
    assert np.abs(ran - mine).max() <= 1  # 8-bit rounding of float-equal images


def _edit_image_main():
    return runpy.run_path(str(REPO / "scripts" / "edit_image.py"), run_name="edit_image")["main"]


@pytest.mark.parametrize("case", ["unknown target", "unknown source", "unreadable image", "missing image",
                                  "no oracle, no source", "same class"])
def test_edit_image_refuses_bad_input_in_one_line_with_exit_2(case, root, tiny_model, tmp_path, caplog):
    config = tmp_path / "edit.yaml"
    config.write_text(to_yaml(load_config(EditConfig, None, _overrides(root, tiny_model))))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    image, extra, expect = str(_eval_image(root)), [], ""
    if case == "unknown target":
        extra, expect = ["--target", "class_z"], "unknown target class 'class_z'"
    elif case == "unknown source":
        extra, expect = ["--target", "class_b", "--source", "class_q"], "unknown source class 'class_q'"
    elif case == "unreadable image":
        image, extra, expect = str(broken), ["--target", "class_b"], str(broken)
    elif case == "missing image":
        image, extra, expect = str(tmp_path / "nowhere.png"), ["--target", "class_b"], "nowhere.png"
    elif case == "no oracle, no source":
        extra, expect = ["--target", "class_b", "oracle_dir=null", "search=fixed"], "pass --source"
    elif case == "same class":
        extra, expect = ["--target", "class_a", "--source", "class_a"], "both 'class_a'"
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as stop:
        _edit_image_main()([image, "--config_path", str(config), *extra])
    assert stop.value.code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expect in errors[0].getMessage(), [r.getMessage() for r in errors]
    assert "\n" not in errors[0].getMessage()
    assert not (root / "run" / "single").exists()  # nothing written


@pytest.mark.slow
def test_edit_image_command_on_the_demo_model(tmp_path):
    """The README command on the shipped demo model and its classifiers: the oracle picks the source, the files
    the command prints exist."""
    from datasets.digits import export_digits

    data = tmp_path / "digits"
    export_digits(data)
    digit = sorted((data / "test" / "3").glob("*.png"))[0]
    cmd = [sys.executable, "scripts/edit_image.py", str(digit), "--config_path", "configs/edit/demo.yaml",
           "--target", "8", "--output", str(tmp_path / "out"), f"output_dir={tmp_path / 'run'}",
           f"embeds_dir={tmp_path / 'embeds'}", f"data.root={data}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": /" in line)
    assert {"counterfactual", "pair", "flicker", "difference", "strip", "edit.json"} <= set(printed)
    assert all(Path(p).is_file() for p in printed.values())
    saved = json.loads(Path(printed["edit.json"]).read_text())
    assert saved["target"] == "8" and saved["source_from"] == "oracle" and saved["source"] != "8"


# --------------------------------------------------------------------------------------------------------------------
# The app, without a browser
# --------------------------------------------------------------------------------------------------------------------
def test_enlarged_keeps_pixels_crisp():
    small = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    big = enlarged(small, 10)
    assert big.size == (12, 12) and np.array_equal(np.asarray(big)[::3, ::3], np.asarray(small))
    assert enlarged(big, 10) is big


def test_the_app_model_answers_moves_from_one_cached_inversion(bench, tmp_path):
    model = AppModel(EditSession(bench), workdir=tmp_path / "work")
    assert len(model.eval_images) == 6
    name = next(n for n in model.eval_images if "/class_b/" in n)
    image_id, picture, source, target = model.choose(name)
    size = Image.open(picture).size
    assert (source, target) == ("class_b", "class_a") and size[0] >= 256
    first = model.move(image_id, source, target, 1.0, 0.6)
    assert "new image" in first.status and first.t_skip == 0.6
    assert Image.open(first.counterfactual).size == size and Image.open(first.difference).size == size
    with Image.open(first.flicker) as gif:
        assert gif.n_frames == 2 and gif.size == size
    assert set(first.oracle) == {"class_a", "class_b"} and first.judge is None
    assert model.move(image_id, source, target, 1.0, 0.6) is first  # the same request: the same answer
    moved = model.move(image_id, source, target, 2.0, 0.9)
    assert "inversion" not in moved.status and len(model.session._inversions) == 1
    found = model.search(image_id, source, target, 1.0)
    assert found.t_skip in bench.cfg.t_skips and "search" in found.status
    assert "both" in model.move(image_id, "class_a", "class_a", 1.0, 0.6).status
    assert model.move(None, source, target, 1.0, 0.6).counterfactual is None


def test_an_upload_takes_the_oracles_class_as_its_source(bench, root, tmp_path):
    model = AppModel(EditSession(bench), workdir=tmp_path / "work")
    with Image.open(_eval_image(root, "class_b", 2)) as im:
        image_id, source, target = model.upload(im.copy(), "class_a", "class_b")
    assert (source, target) == ("class_b", "class_a")
    assert model.move(image_id, source, target, 1.0, 0.9).counterfactual is not None
    clear = Image.new("RGBA", (20, 20), (0, 0, 255, 0))  # fully transparent: the white background is edited
    image_id, _, _ = model.upload(clear, "class_a", "class_b")
    assert torch.equal(model.image(image_id).pixels, torch.ones_like(model.image(image_id).pixels))


# --------------------------------------------------------------------------------------------------------------------
# The app in real Chromium
# --------------------------------------------------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NET: dict = {"recording": False, "hosts": []}


def _record_network(event: str, args: tuple) -> None:
    """Audit hook: the host of every socket connection and name lookup this process makes while recording."""
    if not _NET["recording"]:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):
        _NET["hosts"].append(str(args[1][0]))
    elif event == "socket.getaddrinfo":
        _NET["hosts"].append(str(args[0]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def served(bench, tmp_path):
    """The app on a free local port, in this process, recording every host it connects to; stopped (and checked to
    be stopped) when the test ends."""
    from diffusion.app import launch

    if not _NET.get("hooked"):
        sys.addaudithook(_record_network)  # audit hooks cannot be removed: this one records only while asked
        _NET["hooked"] = True
    port = _free_port()
    _NET.update(recording=True, hosts=[])
    try:
        demo = launch(AppModel(EditSession(bench), workdir=tmp_path / "work"), port=port, block=False, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close(verbose=False)
    finally:
        _NET["recording"] = False
    assert _port_closed(port), "the server still answers after the test"


def _drive(url: str, profile: Path, option: str, new_t_skip: float, screenshot: Path,
           upload: Optional[Tuple[Path, str]] = None) -> list:
    """Open the app in Chromium, choose the eval image ``option``, check its edit appears, move the t_skip slider to
    ``new_t_skip`` and check a new edit replaces it; then (``upload`` = (file, the status it must show)) upload a
    file and check its edit. Returns every URL the page requested."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium to run the browser test")
    from playwright.sync_api import expect, sync_playwright

    requests, errors = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            counterfactual, status = page.locator("#counterfactual img"), page.locator("#status")
            expect(counterfactual).to_have_count(0)

            # choose an eval image: its edit appears, with the views and the oracle's verdict
            page.locator("#pick input").click()
            page.get_by_role("option", name=option).click()
            expect(counterfactual).to_have_count(1, timeout=120_000)
            expect(status).to_contain_text("t_skip", timeout=120_000)
            for view in ("#flicker img", "#difference img"):
                expect(page.locator(view)).to_have_count(1)
            expect(page.locator("#oracle")).to_contain_text("%")
            first = counterfactual.get_attribute("src")

            # move the t_skip slider: another edit replaces the first
            page.locator("#t_skip input[type=range]").fill(f"{new_t_skip:g}")
            expect(status).to_contain_text(f"t_skip {new_t_skip:g} ", timeout=120_000)
            expect(counterfactual).not_to_have_attribute("src", first)
            counterfactual.evaluate("i => i.complete || new Promise(done => { i.onload = i.onerror = done; })")
            assert counterfactual.evaluate("i => i.naturalWidth") >= 256
            if upload is not None:
                moved = counterfactual.get_attribute("src")
                page.locator("#original button[aria-label='Remove Image']").click()
                page.locator("#original input[type=file]").set_input_files(str(upload[0]))
                expect(status).to_contain_text(upload[1], timeout=120_000)
                expect(counterfactual).not_to_have_attribute("src", moved)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert errors == []
    return requests


@pytest.mark.slow
def test_the_app_edits_in_chromium_and_moves_with_the_slider_offline(served, bench, tmp_path):
    blue = sorted((Path(bench.cfg.data.root) / "test" / "class_b").glob("*.png"))[0]
    requests = _drive(served, tmp_path / "profile", "test/class_a/001.png", 0.3, tmp_path / "app.png",
                      upload=(blue, "class_b → class_a"))  # the oracle calls the upload class_b: its source
    assert all(url.startswith((served, "data:", "blob:")) for url in requests), \
        [u for u in requests if not u.startswith(served)]
    outside = sorted({h for h in _NET["hosts"] if h not in LOOPBACK})
    assert _NET["hosts"] and outside == [], outside  # the server made local connections only (its own checks)


@pytest.mark.slow
def test_the_app_command_serves_the_demo_model_and_stops_on_ctrl_c(tmp_path):
    """scripts/app.py as documented, on the demo model and its classifiers, every connection it makes logged by an
    audit hook: it serves on 127.0.0.1, answers a choice and a slider move in Chromium, touches no other host, and
    Ctrl-C stops it."""
    import os
    import signal
    import time

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "_log = open(os.environ['NET_AUDIT_LOG'], 'a', buffering=1)\n"
        "def _hook(event, args):\n"
        "    if event == 'socket.connect' and isinstance(args[1], tuple):\n"
        "        _log.write(str(args[1][0]) + '\\n')\n"
        "    elif event == 'socket.getaddrinfo':\n"
        "        _log.write(str(args[0]) + '\\n')\n"
        "sys.addaudithook(_hook)\n")
    net_log = tmp_path / "connections.txt"
    env = {**os.environ, "PYTHONPATH": str(site), "NET_AUDIT_LOG": str(net_log), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    cmd = [sys.executable, "scripts/app.py", "--config_path", "configs/edit/demo.yaml", "--port", str(port),
           f"output_dir={tmp_path / 'run'}", f"embeds_dir={tmp_path / 'embeds'}", f"data.root={tmp_path / 'digits'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while _port_closed(port):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "the app did not start"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        requests = _drive(url, tmp_path / "profile", "test/3/0045.png", 0.9, tmp_path / "app.png")
        assert all(u.startswith((url, "data:", "blob:")) for u in requests), [u for u in requests
                                                                              if not u.startswith(url)]
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert _port_closed(port), output[-2000:]
    hosts = set(net_log.read_text().split())
    assert hosts and hosts <= set(LOOPBACK), hosts
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_the_latency_benchmark_runs_on_the_tiny_model(root, tiny_model):
    """benchmarks/app_latency.py stays runnable (its figures are read by hand, never asserted)."""
    over = [f"model.decoder={tiny_model / 'decoder'}", f"model.prior={tiny_model / 'prior'}", "data.name=folder",
            f"data.root={root / 'data'}", "data.classes=[class_a,class_b]", "oracle_dir=null", "judge_dir=null",
            "search=fixed", "num_inference_steps=10"]
    proc = subprocess.run([sys.executable, "benchmarks/app_latency.py", "--images", "1", "--threads", "1", *over],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("pipe.invert of a new image", "slider moves", "deepest edit", "first edit of a new image"):
        assert line in proc.stdout, proc.stdout
