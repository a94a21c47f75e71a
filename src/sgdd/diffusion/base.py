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
import torch.nn.functional as F

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


class SampledSoftmax:
    """The sampled softmax of diffusion.softmax_sample = K > 0 (training steps only), for processes whose loss is
    a cross-entropy at the masked positions (masked; score entropy on the absorbing graph, whose DSE is a scaled
    cross-entropy there). The normaliser over the whole vocabulary is replaced by an importance-sampled estimate
    over K + K // 2 columns: the K ids most frequent in the training corpus (always scored) and K // 2 of the rest
    drawn uniformly without replacement (their exp weighted by |rest| / (K // 2)), plus each row's own target
    scored exactly. Subclasses set self.softmax_sample and call SampledSoftmax.__init__."""

    softmax_sample: int = 0

    def __init__(self) -> None:
        self._frequent: torch.Tensor | None = None  # always-scored ids (set_token_counts)
        self._rest: torch.Tensor | None = None  # the ids negatives are drawn from

    def set_token_counts(self, counts) -> None:
        """Training-corpus count of every decoder id (V,). With diffusion.softmax_sample = K > 0 the K most
        frequent ids (PAD and the end token first) are scored in every training step and K // 2
        of the others are drawn uniformly per step; without K this is a no-op."""
        K = self.softmax_sample
        if K <= 0:
            return
        from sgdd.data import Vocab, frequency_order

        # MASK: never a target
        order = frequency_order(counts, first=(Vocab.PAD, Vocab.EOS), exclude=(Vocab.MASK,))
        K = min(K, order.numel())
        self._frequent, self._rest = order[:K].clone(), order[K:].clone()

    def _sample_columns(self, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output columns of one sampled-softmax step (C,) and the log-weight added to each (C,): 0 for the
        frequent ids, log(|rest| / n) for the n uniform draws, so that the sum of exp over the columns is an
        unbiased estimate of the softmax normaliser over the whole vocabulary (own target aside)."""
        if self._frequent is None:
            raise RuntimeError(
                "diffusion.softmax_sample > 0 needs the training token counts: call process.set_token_counts(counts)"
            )
        n = min(self._rest.numel(), max(1, self.softmax_sample // 2))
        drawn = self._rest[torch.randperm(self._rest.numel(), generator=generator)[:n]] if n else self._rest[:0]
        cols = torch.cat([self._frequent, drawn]).to(device)
        logw = torch.zeros(cols.numel(), device=device)
        if n:
            logw[self._frequent.numel():] = float(torch.log(torch.tensor(self._rest.numel() / n)))
        return cols, logw

    def sampled_logits(self, model: ModelFn, x_t, t_model, z, uncond, select, target, generator=None, **extra):
        """One step's logits over its sampled columns and the own target (last): (N, C + 1) float32, and the
        target's index into them (N,) (always C). select (B, L) bool marks the N scored positions."""
        cols, logw = self._sample_columns(x_t.device, generator)
        logits = model(x_t, t_model, z, uncond=uncond, select=select, columns=cols, target=target, **extra)
        logits = logits.float() + F.pad(logw, (0, 1))
        # a drawn column equal to the row's own target would count it twice: the exact last column keeps it
        logits = logits.masked_fill(F.pad(cols[None, :] == target[:, None], (0, 1)), float("-inf"))
        return logits, torch.full_like(target, cols.numel())


def build_process(cfg) -> Process:
    """cfg: the whole sgdd.config.Config (processes need diffusion + data sizes + vocabulary specials)."""
    # importing registers the implementations
    import sgdd.diffusion.masked  # noqa: F401
    import sgdd.diffusion.schedules  # noqa: F401
    import sgdd.diffusion.score_entropy  # noqa: F401

    return PROCESSES.get(cfg.diffusion.process)(cfg)
