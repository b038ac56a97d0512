"""Latency of the local app (scripts/app.py): what a slider move costs once an image is chosen, and what the first
edit of an image costs (pipe.invert, then the noise maps as deep as the slider asks).

    python benchmarks/app_latency.py [--config configs/edit/demo.yaml] [--threads 2] [--images 3] [--browser]
        [key=value ...]

Times ``AppModel.move`` (what the app's slider handler runs: the pipeline call with the oracle and judge, the flicker
GIF, the difference map), on each of the first ``--images`` eval images: a sequence of moves of eta at the default
t_skip and of t_skip from 0.95 to 0.5, then the deepest edit (t_skip 0, all T steps) apart; and, on as many other
images, the first edit at full depth (the whole inversion) against the same depth from the cache. ``--browser``
also times moves end to end in Chromium (slider filled -> the new status shown), through Gradio's server and page.
Figures depend on the machine's load: run it on a quiet machine and read the medians.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from _common import REPO
from diffusion.config import EditConfig, load_config

ETA_MOVES = (0.5, 1.5, 2.0, 1.0)
T_SKIP_MOVES = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def quantiles(xs: List[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]
    return f"median {statistics.median(xs):.3f} s, p90 {p90:.3f} s, max {xs[-1]:.3f} s (n={len(xs)})"


def browser_moves(model, t_skips) -> List[float]:
    """Seconds from filling the t_skip slider to the page showing the new edit's status, per move."""
    import socket

    from playwright.sync_api import sync_playwright

    from diffusion.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(model, port=port, block=False, quiet=True)
    seconds = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#pick input").click()
            page.get_by_role("option").first.click()
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('t_skip')",
                                   timeout=120_000)
            for t in t_skips:
                start = time.perf_counter()
                page.locator("#t_skip input[type=range]").fill(str(t))
                page.wait_for_function(f"() => document.querySelector('#status').innerText.includes('t_skip {t:g} ')",
                                       timeout=120_000)
                seconds.append(time.perf_counter() - start)
            browser.close()
    finally:
        demo.close(verbose=False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "edit" / "demo.yaml"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--images", type=int, default=3, help="eval images to time")
    parser.add_argument("--browser", action="store_true", help="also time moves end to end in Chromium")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="app-latency-"))
    defaults = [f"output_dir={tmp / 'run'}", f"embeds_dir={tmp / 'embeds'}", f"data.root={tmp / 'data'}",
                "compute_missing_embeds=true"]
    cfg = load_config(EditConfig, args.config, defaults + list(args.overrides))

    from diffusion.app import AppModel
    from diffusion.interactive import EditSession, load_workbench

    bench, load_s = timed(lambda: load_workbench(cfg))
    model = AppModel(EditSession(bench), workdir=tmp / "work")
    print(f"config {args.config}: T={cfg.num_inference_steps}, guidance {cfg.guidance_scale:g}, image size "
          f"{bench.pipe.image_size}, oracle {'yes' if bench.oracle else 'no'}, judge {'yes' if bench.judge else 'no'}, "
          f"{torch.get_num_threads()} threads")
    print(f"load (pipeline, classifiers, class means; embeddings computed if missing): {load_s:.2f} s")
    invert, first, moves, deepest = [], [], [], []
    per_t: Dict[float, List[float]] = {}
    for name in list(model.eval_images)[:args.images]:
        (image_id, _, source, target), _ = timed(lambda: model.choose(name))
        image = model.image(image_id)
        _, s = timed(lambda: model.session.inversion(image))
        invert.append(s)
        _, s = timed(lambda: model.move(image_id, source, target, cfg.eta[0], cfg.t_skip))
        first.append(s)
        for eta in ETA_MOVES:
            _, s = timed(lambda: model.move(image_id, source, target, eta, cfg.t_skip))
            moves.append(s)
            per_t.setdefault(cfg.t_skip, []).append(s)
        for t in T_SKIP_MOVES:
            _, s = timed(lambda: model.move(image_id, source, target, 1.0, t))
            moves.append(s)
            per_t.setdefault(t, []).append(s)
        _, s = timed(lambda: model.move(image_id, source, target, 1.0, 0.0))
        deepest.append(s)
    print(f"pipe.invert of a new image (MoVQ encode, CLIP embedding, forward noise): {quantiles(invert)}")
    print(f"its first edit at the default t_skip {cfg.t_skip:g} (noise maps to that depth + sampling): "
          f"{quantiles(first)}")
    print(f"slider moves (eta {list(ETA_MOVES)} at t_skip {cfg.t_skip:g}, t_skip {list(T_SKIP_MOVES)} at eta 1): "
          f"{quantiles(moves)}")
    print("| t_skip | denoising steps | median move (s) |\n| --- | --- | --- |")
    for t in sorted(per_t, reverse=True):
        print(f"| {t:g} | {cfg.num_inference_steps - round(t * cfg.num_inference_steps)} | "
              f"{statistics.median(per_t[t]):.3f} |")
    print(f"deepest edit (t_skip 0, {cfg.num_inference_steps} steps, inversion already 50 steps deep): "
          f"{quantiles(deepest)}")
    names = list(model.eval_images)[args.images:2 * args.images]
    full, again = [], []
    for name in names:  # fresh images: the whole inversion at once, then the same edit from the cache
        image_id, _, source, target = model.choose(name)
        full.append(timed(lambda: model.move(image_id, source, target, 1.0, 0.0))[1])
        again.append(timed(lambda: model.move(image_id, source, target, 2.0, 0.0))[1])
    if names:
        print(f"first edit of a new image at t_skip 0 (all {cfg.num_inference_steps} noise maps + sampling): "
              f"{quantiles(full)}; the same depth again from the cache: {quantiles(again)}")
    if args.browser:
        print(f"in Chromium (slider filled -> status shown), t_skip {list(T_SKIP_MOVES)}: "
              f"{quantiles(browser_moves(model, T_SKIP_MOVES))}")


if __name__ == "__main__":
    main()
