"""Training objectives and standalone samplers, in the same conventions as ComfyUI.

- eps / v: DDPM with 1000 steps and the config's betas: scaled-linear (0.00085 .. 0.012, ComfyUI's
  default for discrete models) or linear (1e-4 .. 0.02, PixArt's); the network sees t = index / 1000.
- flow: rectified flow x_t = (1 - t) x0 + t noise, target v = noise - x0 (ComfyUI's CONST flow),
  t drawn logit-normal and warped by the config's shift.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .config import LIDiTConfig
from .states import PreparedBranch, TextStates

if TYPE_CHECKING:
    from .model import LIDiTModel

Predict = Callable[[torch.Tensor, torch.Tensor, list[TextStates]], torch.Tensor]
DDPM_STEPS = 1000


def ddpm_betas(schedule: str = "scaled_linear", device=None) -> torch.Tensor:
    """float64 betas, as ComfyUI makes them for its "linear" (= scaled) and "sqrt_linear" (= linear) schedules."""
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, DDPM_STEPS, dtype=torch.float64, device=device)
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, DDPM_STEPS, dtype=torch.float64, device=device) ** 2


def ddpm_alphas_cumprod(schedule: str = "scaled_linear", device=None) -> torch.Tensor:
    return torch.cumprod(1.0 - ddpm_betas(schedule, device), dim=0).float()


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: more time at high noise when shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


FLOW_LOSSES = ("v", "x0")


def noised(config: LIDiTConfig, x0: torch.Tensor, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, the config's target) at a random noise level per sample: logit-normal t warped by the
    shift for flow, a uniform DDPM index for eps and v."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if config.prediction == "flow":
        t = shift_time(torch.sigmoid(torch.randn(b, generator=generator, device=x0.device)), config.shift)
        return (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * noise, t, noise - x0
    index = torch.randint(0, DDPM_STEPS, (b,), generator=generator, device=x0.device)
    ab = ddpm_alphas_cumprod(config.schedule, x0.device)[index]
    a, s = _bcast(ab.sqrt(), x0), _bcast((1 - ab).sqrt(), x0)
    target = noise if config.prediction == "eps" else a * noise - s * x0
    return a * x0 + s * noise, index.float() / DDPM_STEPS, target


def training_loss(model: Predict, config: LIDiTConfig, x0: torch.Tensor, texts: list[TextStates],
                  generator: torch.Generator | None = None, flow_loss: str = "v") -> torch.Tensor:
    """Mean squared error of the config's prediction at a random noise level per sample.

    Flow only: `flow_loss="x0"` scores the implied clean image instead of the velocity, which is
    the velocity error weighted by t^2: more weight on the noisy steps where layout is decided.
    """
    if flow_loss not in FLOW_LOSSES:
        raise ValueError(f"flow_loss must be one of {FLOW_LOSSES}, got {flow_loss!r}")
    x_t, t, target = noised(config, x0, generator)
    error = (model(x_t, t, texts).float() - target.float()) ** 2
    if config.prediction == "flow" and flow_loss == "x0":
        error = error * _bcast(t, error) ** 2
    return error.mean()


def distillation_loss(model: Predict, teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      config: LIDiTConfig, x0: torch.Tensor, texts: list[TextStates],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's predictions on the same noisy input."""
    x_t, t, _ = noised(config, x0, generator)
    with torch.no_grad():
        target = teacher(x_t, t)
    return ((model(x_t, t, texts).float() - target.float()) ** 2).mean()


def guided(model: LIDiTModel, cond: list[TextStates], uncond: list[TextStates] | None, cfg: float) -> Callable:
    """Classifier-free guidance with cond and uncond in one batch, in the weights' dtype.

    The text is prepared once here, not at every step (see `TextPathway.prepare`).
    """
    dtype = next(model.parameters()).dtype
    cond_ = model.text.prepare(cond, dtype)
    if uncond is None or cfg == 1.0:
        return lambda x, t: model(x.to(dtype), t, cond_).float()
    both = [PreparedBranch.cat([c, u]) for c, u in zip(cond_, model.text.prepare(uncond, dtype))]

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_c, out_u = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), both).float().chunk(2)
        return out_u + cfg * (out_c - out_u)
    return predict


@torch.no_grad()
def sample(model: LIDiTModel, config: LIDiTConfig, cond: list[TextStates], uncond: list[TextStates] | None,
           shape: tuple[int, ...], steps: int | None = None, cfg: float | None = None, seed: int = 0,
           device: torch.device | str = "cpu", callback: Callable[[int, int], None] | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic sampling: Euler for flow, DDIM (eta 0) for eps / v. Same seed, same image.

    The network runs in its weights' dtype (load it with `dtype=compute_dtype(device)` for bf16 on
    hardware that has it); the sampler's own arithmetic stays in float32.

    `noise` replaces the seeded starting noise (e.g. one seed per image of a batch).
    """
    steps = steps or config.steps
    predict = guided(model, cond, uncond, config.cfg if cfg is None else cfg)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = noise.to(device)
    shape = x.shape
    ones = torch.ones(shape[0], device=device)
    if config.prediction == "flow":
        times = shift_time(torch.linspace(1.0, 0.0, steps + 1), config.shift).tolist()
        for i in range(steps):
            x = x + (times[i + 1] - times[i]) * predict(x, times[i] * ones)
            if callback:
                callback(i + 1, steps)
        return x
    acp = ddpm_alphas_cumprod(config.schedule)
    indices = torch.linspace(DDPM_STEPS - 1, 0, steps).round().long().tolist()
    for i, index in enumerate(indices):
        ab = acp[index].item()
        ab_prev = acp[indices[i + 1]].item() if i + 1 < steps else 1.0
        out = predict(x, index / DDPM_STEPS * ones)
        if config.prediction == "eps":
            eps = out
            x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        else:
            x0 = ab ** 0.5 * x - (1 - ab) ** 0.5 * out
            eps = (1 - ab) ** 0.5 * x + ab ** 0.5 * out
        x = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
        if callback:
            callback(i + 1, steps)
    return x
