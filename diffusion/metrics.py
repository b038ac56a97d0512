"""Metrics of an editing run: LPIPS and pixel L2 per edit, the run summary, and a table comparing runs.

Definitions (METHOD.md, "Evaluation protocol"):
- flip rate = flipped / ALL attempted (image, direction, eta) rows, overall and per direction; an unflipped image
  counts in the denominator (dividing by the flipped images only would always give 100%);
- LPIPS (AlexNet, inputs in [-1, 1]) and pixel L2 between the original (as the model saw it) and the chosen edit,
  averaged over flipped rows;
- the distribution of the chosen t_skip (all rows, and flipped rows only), UNet evaluations and seconds per image.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from diffusion.errors import LpipsError

log = logging.getLogger(__name__)


class Lpips:
    """LPIPS distance of image pairs in [0, 1], one network per run (the ``lpips`` package, AlexNet backbone).

    ``random_backbone`` uses an untrained AlexNet (offline tests only: the numbers mean nothing).
    """

    def __init__(self, device: torch.device | str = "cpu", random_backbone: bool = False):
        import lpips

        try:
            self.net = lpips.LPIPS(net="alex", pnet_rand=random_backbone, verbose=False).to(device).eval()
        except Exception as err:  # torchvision raises URLError/RuntimeError when the download is impossible
            raise LpipsError(
                f"LPIPS could not load torchvision's AlexNet ImageNet weights ({type(err).__name__}: {err}). They "
                "download once into the torch hub cache ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth); "
                "offline, copy that file there, or set lpips: false (pixel L2 is still reported)."
            ) from err
        self.net.requires_grad_(False)
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] twice -> (B,) distances."""
        a = a.to(self.device, torch.float32) * 2 - 1
        b = b.to(self.device, torch.float32) * 2 - 1
        return self.net(a, b).flatten().float().cpu()


def pixel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference per image of (B, 3, H, W) tensors in [0, 1] -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt().cpu()


def _f(value: object) -> Optional[float]:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _judged(rows: Sequence[Dict[str, str]]) -> bool:
    """Whether an oracle judged the rows (a run without one leaves ``flipped`` empty)."""
    return any(r.get("flipped") not in (None, "") for r in rows)


def _is_flip(row: Dict[str, str]) -> bool:
    return row.get("flipped") == "1" and not is_already_target(row)


def is_already_target(row: Dict[str, str]) -> bool:
    """The oracle already assigned the original to the target class: not searched, never a flip, not attempted."""
    return row.get("already_target") == "1"


def attempted(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """The rows that were really edited towards their target (every row but the already-target ones)."""
    return [r for r in rows if not is_already_target(r)]


def flip_rate(rows: Sequence[Dict[str, str]]) -> Optional[float]:
    """Flipped rows / ALL attempted rows; None when no oracle judged them. A row left without a verdict in a judged
    run counts as not flipped: it was attempted. Already-target rows are not attempted edits (counted apart)."""
    tried = attempted(rows)
    if not tried or not _judged(tried):
        return None
    return sum(_is_flip(r) for r in tried) / len(tried)


def t_skip_histogram(rows: Iterable[Dict[str, str]]) -> Dict[str, int]:
    """{t_skip: rows}, mildest t_skip (largest) first; rows without a t_skip (already the target) left out."""
    counts = Counter(float(r["t_skip"]) for r in rows if r.get("t_skip") not in (None, ""))
    return {f"{t:g}": counts[t] for t in sorted(counts, reverse=True)}


def _evals_per_image(rows: List[Dict[str, str]]) -> Optional[float]:
    """UNet evaluations per image: each image's inversion once, plus the sampling of every row (eta) it has."""
    inversion: Dict[str, float] = {}
    sampling = 0.0
    for r in rows:
        inv = _f(r.get("inversion_evals")) or 0.0
        inversion[r["source_path"]] = inv
        sampling += (_f(r.get("unet_evals")) or 0.0) - inv
    return (sum(inversion.values()) + sampling) / len(inversion) if inversion else None


def _group_summary(rows: List[Dict[str, str]]) -> Dict[str, object]:
    flips = [r for r in rows if _is_flip(r)]
    return {
        "n": len(rows),
        "n_flipped": len(flips),
        "flip_rate": flip_rate(rows),
        "n_already_target": sum(is_already_target(r) for r in rows),
        "lpips_mean": _mean(_f(r.get("lpips")) for r in flips),
        "l2_mean": _mean(_f(r.get("l2")) for r in flips),
        "t_skip_mean": _mean(_f(r.get("t_skip")) for r in rows),
        "t_skip_mean_flipped": _mean(_f(r.get("t_skip")) for r in flips),
    }


def summarize(rows: List[Dict[str, str]]) -> Dict[str, object]:
    """The run summary from results rows (as read back from results.csv)."""
    flipped = [r for r in rows if _is_flip(r)]
    directions: Dict[str, List[Dict[str, str]]] = {}
    for r in rows:
        directions.setdefault(f"{r['source_class']}->{r['target_class']}", []).append(r)
    images = {r["source_path"] for r in rows}
    return {
        "n_images": len(images),
        "n_rows": len(rows),
        "n_flipped": len(flipped),
        "n_unjudged": sum(r.get("flipped") in (None, "") for r in rows) if _judged(rows) else 0,
        "flip_rate": flip_rate(rows),
        # originals the oracle already assigns to the target class: not searched, never flips, counted apart
        "n_already_target": sum(is_already_target(r) for r in rows),
        "lpips_mean": _mean(_f(r.get("lpips")) for r in flipped),
        "l2_mean": _mean(_f(r.get("l2")) for r in flipped),
        "l2_mean_all": _mean(_f(r.get("l2")) for r in rows),
        "t_skip_histogram": t_skip_histogram(rows),
        "t_skip_histogram_flipped": t_skip_histogram(flipped),
        "t_skip_mean": _mean(_f(r.get("t_skip")) for r in rows),
        "t_skip_mean_flipped": _mean(_f(r.get("t_skip")) for r in flipped),
        "unet_evals_per_image": _evals_per_image(rows),
        "seconds_per_image": (sum(_f(r.get("seconds")) or 0 for r in rows) / len(images)) if images else None,
        "per_direction": {name: _group_summary(rs) for name, rs in sorted(directions.items())},
    }


# --------------------------------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------------------------------
def load_run_rows(run_dir: str | Path) -> List[Dict[str, str]]:
    """The rows of an editing run folder, read-only: results.csv plus any shard rows it lacks (a run still going or
    interrupted before the merge), one row per key.

    Raises:
        FileNotFoundError: the folder holds neither results.csv nor shards/results.*.csv.
    """
    from diffusion.edit.results import collect_rows, result_sources

    if not any(p.is_file() for p in result_sources(run_dir)):
        raise FileNotFoundError(f"{run_dir} holds no results.csv (nor shards/results.*.csv): is it the output_dir of "
                                "a kandinsky_eval.py run?")
    return collect_rows(run_dir)


def run_settings(run_dir: str | Path) -> str:
    """The settings that tell editing runs apart, from the run's config.yaml: search, eta, guidance, T, inversion,
    LoRA (path and step) and oracle folder; '' when the folder has no config.yaml."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return ""
    c = OmegaConf.to_container(OmegaConf.load(path))
    lora = c.get("lora") or {}
    parts = [f"{c.get('search')}", f"eta={c.get('eta')}", f"g={c.get('guidance_scale')}",
             f"T={c.get('num_inference_steps')}", f"inversion={c.get('inversion')}"]
    if c.get("search") == "fixed":
        parts.append(f"t_skip={c.get('t_skip')}")
    if lora.get("path"):
        parts.append(f"lora={lora['path']}" + (f"@{lora['step']}" if lora.get("step") is not None else ""))
    if c.get("oracle_dir"):
        parts.append(f"oracle={c['oracle_dir']}")
    return " ".join(parts).replace("|", "/")


def _cell(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate(rate: Optional[float], flipped: int, n: int) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}% ({flipped}/{n})"


def comparison_table(runs: Sequence[Tuple[str, Dict[str, object], str]]) -> str:
    """One markdown table, a row per ``(name, summary, settings)``: images, rows, flip rate (overall and per
    direction), mean LPIPS and L2 of the flipped edits, mean t_skip, UNet evaluations and seconds per image."""
    lines = [
        "| run | settings | images | rows | flip rate | flip rate per direction | LPIPS (flipped) | L2 (flipped) | "
        "mean t_skip | mean t_skip (flipped) | UNet evals / image | s / image |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s, settings in runs:
        per_dir: Dict[str, Dict[str, object]] = s["per_direction"]  # type: ignore[assignment]
        directions = "; ".join(f"{d}: {_rate(v['flip_rate'], v['n_flipped'], v['n'])}"  # type: ignore[arg-type]
                               for d, v in per_dir.items())
        lines.append(
            f"| {name} | {settings} | {s['n_images']} | {s['n_rows']} | "
            f"{_rate(s['flip_rate'], s['n_flipped'], s['n_rows'])} | {directions} | "  # type: ignore[arg-type]
            f"{_cell(s['lpips_mean'], 4)} | {_cell(s['l2_mean'], 4)} | {_cell(s['t_skip_mean'])} | "
            f"{_cell(s['t_skip_mean_flipped'])} | {_cell(s['unet_evals_per_image'], 1)} | "
            f"{_cell(s['seconds_per_image'], 2)} |"
        )
    return "\n".join(lines)
