"""The benchmark scripts stay runnable (they are not timed here: figures come from running them by hand)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
