"""The benchmark scripts stay runnable (they are not timed here: figures come from running them by hand)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_estimate_counts_the_published_architecture():
    """FLOPs are counted on the meta device: no weights, a few seconds. The parameter counts of the built
    architecture must match the Kandinsky 2.2 model card, or every estimate derived from it is wrong."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_estimate.py", "--no-calibrate"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^\| ([A-Za-z ]+?) \| ([\d.]+) B \| ([\d.]+) B \| (\d+) \|$", proc.stdout, re.M)}
    assert set(rows) == {"UNet forward", "MoVQ encode", "MoVQ decode", "CLIP image encoder"}, proc.stdout
    for name, (params, published, gflop) in rows.items():
        assert abs(params - published) / published < 0.05, (name, params, published)
        assert gflop > 100, name  # a 512 px pass of any of them is hundreds of GFLOP
    # the paper's protocol with the full inversion is never cheaper than the lazy one, outcome by outcome
    evals = {}
    for m in re.finditer(r"^\| (first_flip, [^|]+|bisect, [^|]+) \| ([^|]+) \| (\d+) \|", proc.stdout, re.M):
        evals[(m.group(1).strip(), m.group(2).strip())] = int(m.group(3))
    eager = {o: e for (s, o), e in evals.items() if "paper" in s}
    lazy = {o: e for (s, o), e in evals.items() if s.startswith("first_flip, lazy")}
    assert eager and set(eager) == set(lazy) and all(lazy[o] <= eager[o] for o in eager)
    assert re.search(r"the cache saves x[\d.]+ of the FLOPs", proc.stdout)


@pytest.mark.slow
def test_demo_quality_runs_on_the_shipped_model_and_its_ceiling_bounds_the_stopping_rule(tmp_path):
    """benchmarks/demo_quality.py end to end on two test images per direction of 3/8 (the shipped mini model,
    oracle and judge). The --ceiling diagnostic tries every t_skip of the grid, the chosen one among them, so an
    image whose chosen edit the judge accepts and that is closer than the nearest real target is always reachable."""
    out = tmp_path / "dq.json"
    cmd = [sys.executable, "benchmarks/demo_quality.py", "--pairs", "3,8", "--per_class", "2", "--ceiling",
           "--json", str(out), "--", f"data.root={tmp_path / 'digits'}", f"embeds_dir={tmp_path / 'embeds'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["directions"]) == {"3->8", "8->3"} and result["ceiling"] is True
    for name, d in result["directions"].items():
        ceiling = d["ceiling_any_t_skip_judged_and_closer"]
        closer = d["diffusion"]["judged_flips_closer_than_nearest_real_target"]
        assert ceiling["n"] == d["diffusion"]["n_attempted"] <= 2, name
        assert closer["k"] <= ceiling["k"] <= ceiling["n"], (name, closer, ceiling)
    assert "ceiling: some t_skip judged and closer" in proc.stdout


def test_the_readme_demo_table_is_the_shipped_benchmark_output():
    """The README's judged demo table must show what benchmarks/demo_quality.py wrote to
    assets/mini_digits/demo_quality.json: every direction's oracle and judge flips, closer counts and verdict."""
    figures = json.loads((REPO / "assets/mini_digits/demo_quality.json").read_text())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The demo, judged independently"):]
    rows = {f"{m.group(1)}->{m.group(2)}": m for m in re.finditer(
        r"^\| (\d) → (\d) \| [\d.]+ \((\d+)/(\d+)\) [^|]* \| \*\*[\d.]+ \((\d+)/(\d+)\) [^|]*\*\* "
        r"\| [\d.]+ \((\d+)/(\d+)\)[^|]* \|.* \| (yes|no) \|$", section, re.M)}
    assert set(rows) == set(figures["directions"]), "README table directions differ from demo_quality.json"
    for name, d in figures["directions"].items():
        m, f = rows[name], d["diffusion"]
        shown = tuple(int(m.group(i)) for i in range(3, 9))
        assert shown == (f["oracle_flip_rate"]["k"], f["oracle_flip_rate"]["n"], f["judge_flip_rate"]["k"],
                         f["judge_flip_rate"]["n"], f["judged_flips_closer_than_nearest_real_target"]["k"],
                         f["judged_flips_closer_than_nearest_real_target"]["n"]), name
        assert (m.group(9) == "yes") == figures["targets_met"][name], name
