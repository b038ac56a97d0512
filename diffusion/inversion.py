"""Edit-friendly DDPM inversion and sampling (Huberman-Spiegelglas, Kligvasser, Michaeli, CVPR 2024), as pure math.

This module imports torch only: no models, files or configs. The network enters as a callable

    eps_fn(w, step, rows) -> epsilon          w: (N, C, H, W); step, rows: (N,) long; epsilon: (N, C, H, W) float32

where ``step`` indexes the schedule (0 = the largest timestep) and ``rows`` says which image (or attempt) each of the N
latents belongs to, so the caller can pick the conditioning and guidance of each row.

Notation (paper): T steps with timesteps t_1 > ... > t_T, a_t = alphas_cumprod[t], t' the next smaller timestep in the
spaced schedule (a_{t'} = final alpha after the last step), eta_DDPM = 1:

    x0_hat(w_t, eps) = (w_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma_t^2        = (1 - a_{t'}) / (1 - a_t) * (1 - a_t / a_{t'})
    mu_t             = sqrt(a_{t'}) x0_hat + sqrt(1 - a_{t'} - sigma_t^2) eps
    w_{t'}           = mu_t + sigma_t z_t

The schedule and the latent trajectory (w_t, z_t, every update) are kept in float64 (float32 where the device has
no float64, e.g. MPS), whatever the model dtype: the network sees its own dtype, but the arithmetic around it adds no
rounding of its own, so sampling back with the inversion's own conditioning retraces the stored w_t to the bit and
the reconstruction is exact even in float32/bf16 models (in float32 arithmetic a random network amplified rounding
to ~1e-3 over 100 guided steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """The T-step spaced DDPM schedule. ``timesteps[i]`` is t_{i+1}; index 0 is the noisiest step."""

    timesteps: torch.Tensor  # (T,) long, strictly decreasing
    alpha: torch.Tensor  # (T,) float64, a_t
    alpha_prev: torch.Tensor  # (T,) float64, a_{t'}

    @property
    def T(self) -> int:
        return int(self.timesteps.numel())

    @property
    def sigma(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - a_{t'}) / (1 - a_t) * (1 - a_t / a_{t'})), (T,) float64 (eta_DDPM = 1)."""
        a, ap = self.alpha, self.alpha_prev
        return ((1 - ap) / (1 - a) * (1 - a / ap)).clamp_min(0).sqrt()


def make_schedule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final_alpha: float) -> Schedule:
    """Schedule from the training ``alphas_cumprod`` (num_train,), the spaced ``timesteps`` (T,), decreasing, and the
    alpha used after the last step (a_{t'} for t' < 0)."""
    ts = timesteps.long().cpu()
    if ts.numel() < 1 or (ts.numel() > 1 and not bool((ts[:-1] > ts[1:]).all())):
        raise ValueError(f"timesteps must be non-empty and strictly decreasing, got {ts.tolist()[:5]}...")
    ac = alphas_cumprod.double().cpu()
    alpha = ac[ts]
    alpha_prev = torch.cat([ac[ts[1:]], torch.tensor([float(final_alpha)], dtype=torch.float64)])
    return Schedule(timesteps=ts, alpha=alpha, alpha_prev=alpha_prev)


def ddpm_schedule(scheduler, num_inference_steps: int) -> Schedule:
    """The T-step schedule of a diffusers DDPM scheduler: its own ``timestep_spacing`` / ``steps_offset`` and its
    alphas_cumprod (the scheduler object is only asked for its config; nothing is imported here).

    After the last step a_{t'} = alphas_cumprod[0] (one more step down to t = 0): sigma stays > 0 there, so the
    stored noise maps reconstruct w_0 exactly.

    Raises:
        ValueError: ``num_inference_steps`` is not in 1 .. the scheduler's ``num_train_timesteps``.
    """
    train_steps = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_inference_steps <= train_steps:
        raise ValueError(f"num_inference_steps = {num_inference_steps} must lie in 1 .. {train_steps} (the "
                         "scheduler's num_train_timesteps)")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    return make_schedule(sched.alphas_cumprod, sched.timesteps, final_alpha=float(sched.alphas_cumprod[0]))


def math_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for the latent trajectory, except on devices without it (MPS: float32)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def step_index(schedule: Schedule, t_skip: float) -> int:
    """T_skip = round(t_skip * T): the number of steps skipped; sampling starts at schedule index T_skip."""
    if not 0.0 <= t_skip <= 1.0:
        raise ValueError(f"t_skip must lie in [0, 1], got {t_skip}")
    return int(round(t_skip * schedule.T))


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) on like's device, for broadcasting against latents."""
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def draw_forward_noise(shape: Sequence[int], T: int, generators: Sequence[torch.Generator],
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Independent standard normal noise for every timestep of every image: (T, B, *shape) float32.

    Image b draws all T of its maps from ``generators[b]`` alone, so an image gets the same noise whether it is
    processed alone or in a batch.
    """
    per_image = [torch.randn((T, *shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(per_image, dim=1).to(device)


def forward_noise(w0: torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """w_t = sqrt(a_t) w_0 + sqrt(1 - a_t) eps_t with an independent eps_t per step.

    w0: (B, C, H, W); noise: (T, B, C, H, W). Returns ws: (T + 1, B, C, H, W) in :func:`math_dtype` with
    ws[i] = w_{t_{i+1}} and ws[T] = w_0 (the latent "after" the last step).
    """
    w0 = w0.to(math_dtype(w0.device))
    a = schedule.alpha.to(w0.device, w0.dtype).view(-1, 1, 1, 1, 1)
    ws = a.sqrt() * w0.unsqueeze(0) + (1 - a).sqrt() * noise.to(w0.device, w0.dtype)
    return torch.cat([ws, w0.unsqueeze(0)], dim=0)


def predict_x0(w_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (w_t - sqrt(1 - a_t) eps) / sqrt(a_t); a_t: (N,)."""
    a = _bc(a_t, w_t)
    return (w_t - (1 - a).sqrt() * eps) / a.sqrt()


def posterior_mean(w_t: torch.Tensor, eps: torch.Tensor, schedule: Schedule, step: torch.Tensor) -> torch.Tensor:
    """mu_t = sqrt(a_{t'}) x0_hat + sqrt(1 - a_{t'} - sigma_t^2) eps, per row at schedule index ``step`` (N,)."""
    a, ap, s = schedule.alpha[step], schedule.alpha_prev[step], schedule.sigma[step]
    direction = (1 - ap - s**2).clamp_min(0).sqrt()
    eps = eps.to(w_t.dtype)
    return _bc(ap.sqrt(), w_t) * predict_x0(w_t, eps, a) + _bc(direction, w_t) * eps


def edit_friendly_noise_maps(ws: torch.Tensor, schedule: Schedule, eps_fn: EpsFn, chunk_size: int = 8,
                             steps: Optional[Sequence[tuple[int, int]]] = None,
                             zs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z_t = (w_{t'} - mu_t(w_t, eps_theta(w_t, t, c_inv))) / sigma_t for every step and image.

    ws: (T + 1, B, C, H, W) from :func:`forward_noise`. Because every w_t was drawn independently from w_0, the network
    calls do not depend on one another: they are batched ``chunk_size`` latents at a time, across steps and images,
    and any subset of them can be computed on its own, in any order, with the same maps (up to the network's
    batch-dependent rounding). ``steps`` lists the
    (schedule index, image) pairs to compute (default: all); they are written into ``zs`` in place when given (else
    into a new zero tensor). Steps with sigma_t = 0 get z_t = 0. Returns zs: (T, B, C, H, W) in ws's dtype.
    """
    T, B = schedule.T, ws.shape[1]
    sigma = schedule.sigma
    if zs is None:
        zs = torch.zeros_like(ws[:T])
    if steps is None:
        steps = [(i, b) for i in range(T) for b in range(B)]
    pairs = [(i, b) for i, b in steps if sigma[i] > 0]
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start:start + chunk_size]
        idx = torch.tensor([i for i, _ in chunk])
        rows = torch.tensor([b for _, b in chunk])
        w_t = ws[idx, rows]
        eps = eps_fn(w_t, idx, rows)
        mu = posterior_mean(w_t, eps, schedule, idx)
        zs[idx, rows] = (ws[idx + 1, rows] - mu) / _bc(sigma[idx], mu)
    return zs


def sample(ws: torch.Tensor, zs: torch.Tensor, schedule: Schedule, start: torch.Tensor, eps_fn: EpsFn,
           image_of_row: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reverse DDPM from the stored w at schedule index ``start`` with the stored noise maps:

        w_{t'} = sqrt(a_{t'}) x0_hat(w_t, eps) + sqrt(1 - a_{t'} - sigma_t^2) eps + sigma_t z_t

    ws: (T + 1, B, ...), zs: (T, B, ...) of the B inverted images. ``start`` (A,) gives each of A rows (attempts) its
    own T_skip; ``image_of_row`` (A,) maps rows to images (default: row a is image a). Rows with different starts
    share one network batch from the step where both are running. ``rows`` passed to eps_fn index the A rows.
    Returns the final latents (A, C, H, W); a row with start = T returns w_0 unchanged.
    """
    start = start.long().cpu()
    A = start.numel()
    img = torch.arange(A) if image_of_row is None else image_of_row.long().cpu()
    w = ws[start, img].clone()
    sigma = schedule.sigma
    for i in range(int(start.min()), schedule.T):
        rows = torch.nonzero(start <= i).flatten()
        if rows.numel() == 0:
            continue
        steps = torch.full_like(rows, i)
        eps = eps_fn(w[rows], steps, rows)
        mu = posterior_mean(w[rows], eps, schedule, steps)
        w[rows] = mu + sigma[i].to(mu.device, mu.dtype) * zs[i, img[rows]]
    return w


def cfg_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: eps = eps(w, t, c_0) + g (eps(w, t, c) - eps(w, t, c_0)); g may be per row (N,)."""
    g = guidance_scale if not torch.is_tensor(guidance_scale) else _bc(guidance_scale, eps_cond)
    return eps_uncond + g * (eps_cond - eps_uncond)
