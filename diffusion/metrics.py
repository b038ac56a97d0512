"""Metrics of an editing run: LPIPS and pixel L2 per edit, and the run summary.

Definitions (see README, "Metrics"):
- flip rate = flipped / ALL attempted (image, direction, eta) rows, overall and per direction; an unflipped image
  counts in the denominator;
- LPIPS (AlexNet, inputs in [-1, 1]) and pixel L2 between the original (as the model saw it) and the chosen edit,
  averaged over flipped rows;
- the distribution of the chosen t_skip, UNet evaluations and seconds per image.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, Iterable, List, Optional

import torch

log = logging.getLogger(__name__)


class LpipsError(RuntimeError):
    pass


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


def _evals_per_image(rows: List[Dict[str, str]]) -> Optional[float]:
    """UNet evaluations per image: each image's inversion once, plus the sampling of every row (eta) it has."""
    inversion: Dict[str, float] = {}
    sampling = 0.0
    for r in rows:
        inv = _f(r.get("inversion_evals")) or 0.0
        inversion[r["source_path"]] = inv
        sampling += (_f(r.get("unet_evals")) or 0.0) - inv
    return (sum(inversion.values()) + sampling) / len(inversion) if inversion else None


def summarize(rows: List[Dict[str, str]]) -> Dict[str, object]:
    """The run summary from results rows (as read back from results.csv)."""
    flipped_known = [r for r in rows if r.get("flipped") not in (None, "")]
    flipped = [r for r in flipped_known if r["flipped"] == "1"]
    directions: Dict[str, List[Dict[str, str]]] = {}
    for r in rows:
        directions.setdefault(f"{r['source_class']}->{r['target_class']}", []).append(r)
    per_direction = {}
    for name, rs in sorted(directions.items()):
        known = [r for r in rs if r.get("flipped") not in (None, "")]
        flips = [r for r in known if r["flipped"] == "1"]
        per_direction[name] = {
            "n": len(rs),
            "flip_rate": len(flips) / len(known) if known else None,
            "lpips_mean": _mean(_f(r.get("lpips")) for r in flips),
            "l2_mean": _mean(_f(r.get("l2")) for r in flips),
        }
    images = {r["source_path"] for r in rows}
    return {
        "n_images": len(images),
        "n_rows": len(rows),
        "n_flipped": len(flipped),
        "flip_rate": len(flipped) / len(flipped_known) if flipped_known else None,
        "lpips_mean": _mean(_f(r.get("lpips")) for r in flipped),
        "l2_mean": _mean(_f(r.get("l2")) for r in flipped),
        "l2_mean_all": _mean(_f(r.get("l2")) for r in rows),
        "t_skip_histogram": dict(sorted(Counter(f"{float(r['t_skip']):g}" for r in rows).items(), reverse=True)),
        "t_skip_mean": _mean(_f(r.get("t_skip")) for r in rows),
        "unet_evals_per_image": _evals_per_image(rows),
        "seconds_per_image": (sum(_f(r.get("seconds")) or 0 for r in rows) / len(images)) if images else None,
        "per_direction": per_direction,
    }
