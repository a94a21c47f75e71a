"""The process interface and the registries a config chooses from.

A process owns the forward corruption x_0 -> x_t, the training loss, and the conversion from what a sampler
knows (the fraction of positions still masked / the diffusion time) to what the model is fed. It is handed
the model as an argument; the model returns raw logits and knows nothing of schedules.

    model(x_t (B, L) long, t (B,) float, z (B, Dz), uncond (B,) bool | None, select (B, L) bool | None)
        -> logits (B, L, V), or (N, V) at the N selected positions
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sgdd.registry import Registry

SCHEDULES = Registry("diffusion.schedule")  # masked process: keep-probability schedules alpha(t)
NOISES = Registry("diffusion.noise")  # score entropy: total-noise schedules sigma_bar(t)
PROCESSES = Registry("diffusion.process")

ModelFn = Callable[..., torch.Tensor]


class Process:
    """Base class. Subclasses register in PROCESSES and are built from the whole Config."""

    mask_id: int | None = None  # the absorbing token, if the process has one

    def loss(
        self, model: ModelFn, x0: torch.Tensor, z: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x0 (B, L) clean ids (tokens, EOS, PAD); z (B, Dz). Returns (scalar loss, metrics of python floats)."""
        raise NotImplementedError

    def clean_logits(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        mask_ratio: torch.Tensor,
        z: torch.Tensor,
        uncond: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of p(x_0 | x_t) (float32) for a partially masked x_t whose fraction of masked positions is
        mask_ratio (B,). Used by MaskGIT-style samplers; processes without an absorbing state raise.
        Processes that train self-conditioned models (the masked one) also take `sc=` and
        `return_features=` (see MaskedProcess.clean_logits)."""
        raise NotImplementedError(f"{type(self).__name__} has no absorbing state: MaskGIT does not apply")


def build_process(cfg) -> Process:
    """cfg: the whole sgdd.config.Config (processes need diffusion + data sizes + vocabulary specials)."""
    # importing registers the implementations
    import sgdd.diffusion.masked  # noqa: F401
    import sgdd.diffusion.schedules  # noqa: F401
    import sgdd.diffusion.score_entropy  # noqa: F401

    return PROCESSES.get(cfg.diffusion.process)(cfg)
