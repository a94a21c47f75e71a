"""Keep-probability schedules alpha(t) of the masked (absorbing) process, registered in SCHEDULES.

A position is still clean at time t with probability alpha(t) (alpha(0) = 1, alpha(1) = 0) and [MASK]ed
otherwise. The continuous-time ELBO (MDLM) weights the cross-entropy of a masked token by

    weight(t) = -alpha'(t) / (1 - alpha(t))

which diverges like 1/t near t = 0; it is evaluated at t >= T_MIN. `inverse(alpha)` gives the t at which
the keep probability is alpha: samplers know the fraction of positions still masked and ask for the time.
"""

from __future__ import annotations

import math

import torch

from sgdd.diffusion.base import SCHEDULES

T_MIN = 1.0e-4  # weight(t) is evaluated at max(t, T_MIN)


class Schedule:
    """alpha(t), weight(t), inverse(alpha) on float tensors of any shape."""

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, alpha: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)


@SCHEDULES.register("cosine")
class CosineSchedule(Schedule):
    """alpha(t) = cos(pi t / 2); weight(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) / tan(pi t/4)."""

    name = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        # the half-angle form avoids 0/0 near t = 0
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * t.clamp(min=T_MIN))

    def inverse(self, alpha: torch.Tensor) -> torch.Tensor:
        return torch.arccos(alpha.clamp(0.0, 1.0)) * (2.0 / math.pi)


@SCHEDULES.register("loglinear")
class LogLinearSchedule(Schedule):
    """alpha(t) = 1 - t (MDLM's log-linear noise: total noise sigma(t) = -log(1 - t)); weight(t) = 1 / t."""

    name = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t.clamp(min=T_MIN)

    def inverse(self, alpha: torch.Tensor) -> torch.Tensor:
        return 1.0 - alpha.clamp(0.0, 1.0)


@SCHEDULES.register("sine")
class SineSchedule(Schedule):
    """alpha(t) = 1 - sin(pi t / 2): the mask probability sin(pi t/2) is MaskGIT's training distribution of mask
    ratios (cos(pi r / 2) with r = 1 - t uniform), mean 2/pi = 0.64 masked where "cosine" has 1 - 2/pi = 0.36.
    Under uniform time draws it trains most at the high mask ratios the MaskGIT sampler spends most of its steps
    at (half its steps with >= 71 % masked). weight(t) = (pi/2) cos(pi t/2) / sin(pi t/2) = (pi/2) / tan(pi t/2)."""

    name = "sine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.sin(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        # clamped: in float32 pi/2 * 1.0 lies just past pi/2, where tan is large and negative
        return (0.5 * math.pi / torch.tan(0.5 * math.pi * t.clamp(min=T_MIN))).clamp(min=0.0)

    def inverse(self, alpha: torch.Tensor) -> torch.Tensor:
        return torch.arcsin((1.0 - alpha).clamp(0.0, 1.0)) * (2.0 / math.pi)


def build_schedule(name: str) -> Schedule:
    return SCHEDULES.get(name)()
