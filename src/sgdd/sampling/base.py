"""The sampler interface and its registry.

    sampler.sample(model, process, z (B, Dz), lengths (B,) long, cfg_scale, generator=None, callback=None)
        -> ids (B, L) long, no MASK left; L = slot_width(lengths, cfg); positions >= lengths[i] are PAD.

`model` is the raw decoder callable; the sampler applies classifier-free guidance itself through
sgdd.sampling.guidance.guided(model, cfg_scale). callback(step: int, x: LongTensor (B, L)) sees every
intermediate state. Sampling arithmetic runs in float32 (Gumbel noise in float64).
"""

from __future__ import annotations

import logging

import torch

from sgdd.registry import ConfigError, Registry

SAMPLERS = Registry("sampling.sampler")
EOS_ID = 2  # decoder vocabulary contract (sgdd.data.Vocab.EOS)

log = logging.getLogger("sgdd")


def slot_width(lengths, cfg) -> int:
    """The sampled sequence length L for slots `lengths` (B,): the longest slot plus `sampling.pad_tail` visible
    PAD positions, capped at data.max_length (never below the longest slot). Training rows end in a PAD tail
    (the batch's longest sentence + 1 + up to data.pad_slack); a row decoded without one ends its sentence early."""
    longest = int(lengths.max())
    return max(longest, min(longest + pad_tail(cfg), cfg.data.max_length))


def pad_tail(cfg) -> int:
    """sampling.pad_tail, or data.pad_slack + 4 when it is None (the longest tails training rows end in)."""
    tail = cfg.sampling.pad_tail
    return cfg.data.pad_slack + 4 if tail is None else tail


def exempt_ids(vocab_size: int, token_counts, top: int, always: tuple[int, ...]) -> torch.Tensor:
    """(V,) bool: the `top` most frequent ids by token_counts (V,) and the ids in `always`; without counts
    only `always`."""
    exempt = torch.zeros(vocab_size, dtype=torch.bool)
    if token_counts is not None and top > 0:
        counts = torch.as_tensor(token_counts, dtype=torch.float64).flatten()
        if counts.numel() != vocab_size:
            raise ValueError(f"token_counts has {counts.numel()} entries, the model predicts {vocab_size} ids")
        exempt[torch.argsort(counts, descending=True, stable=True)[: min(top, vocab_size)]] = True
    exempt[list(always)] = True
    return exempt


def penalize_repeats(
    logits: torch.Tensor, x: torch.Tensor, select: torch.Tensor, exempt: torch.Tensor, penalty: float,
    mask_id: int, column_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lower the logit of every id visible in the row by `penalty` per visible copy (exempt ids and MASK aside).

    logits (N, V) for the N positions where select (B, L) is True (row-major order), x (B, L) the current ids,
    exempt (V,) bool on x's device. With a shortlist, logits are (N, C) and column_of (B, V) long gives each
    row's column of an id (-1: not in the row's shortlist, nothing to lower). Returns float32 logits (in place
    when they already are float32). O(N L) besides the copy.
    """
    logits = logits.float()
    rows = select.nonzero()[:, 0]  # (N,) the row of each selected position
    seen = x[rows]  # (N, L) ids visible in that row (MASK positions carry mask_id)
    hit = ~exempt[seen] & (seen != mask_id)
    cols = seen
    if column_of is not None:
        cols = column_of[rows[:, None], seen]  # (N, L), without materialising column_of[rows] (N, V)
        hit &= cols >= 0
        cols = cols.clamp(min=0)
    return logits.scatter_add_(1, cols, torch.where(hit, -float(penalty), 0.0).to(logits.dtype))


class Sampler:
    def __init__(self, cfg, token_counts=None):
        """cfg: the whole sgdd.config.Config (reads cfg.sampling). token_counts (V,), optional: the training
        corpus count of every decoder id (sgdd.data.Vocab.counts), for options that tell frequent tokens apart."""
        self.cfg = cfg
        self.token_counts = token_counts
        s = cfg.sampling
        if s.repeat_penalty < 0:
            raise ConfigError(f"sampling.repeat_penalty must be >= 0 (0 = off), got {s.repeat_penalty}")
        if s.repeat_exempt < 0:
            raise ConfigError(f"sampling.repeat_exempt must be >= 0, got {s.repeat_exempt}")
        self._exempt: torch.Tensor | None = None

    def exempt(self, vocab_size: int, pad_id: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(V,) bool ids the repetition penalty spares, on `device` (built once per sampler and device)."""
        if self._exempt is None or self._exempt.numel() != vocab_size:
            s = self.cfg.sampling
            if self.token_counts is None and s.repeat_exempt > 0:
                log.warning(
                    "sampling.repeat_penalty: this vocabulary has no training token counts (saved before they "
                    "were recorded), so the %d most frequent ids cannot be exempt; every id but PAD / EOS is "
                    "penalised. Retrain, or set sampling.repeat_exempt: 0 to silence this.", s.repeat_exempt)
            self._exempt = exempt_ids(vocab_size, self.token_counts, s.repeat_exempt, (pad_id, EOS_ID))
        if self._exempt.device != torch.device(device):
            self._exempt = self._exempt.to(device)  # one copy per device, not one per step
        return self._exempt

    def row_widths(self, model, lengths: torch.Tensor) -> torch.Tensor | None:
        """(B,) long: each row's own width, its slots + sampling.pad_tail capped at data.max_length (never below
        its slots), when sampling.row_widths is on, the model takes widths (Decoder.supports_widths) and some row
        is narrower than the batch (slot_width); else None (every row as wide as the batch)."""
        if not self.cfg.sampling.row_widths or not getattr(model, "supports_widths", False):
            return None
        lengths = lengths.long()
        own = torch.maximum(lengths, (lengths + pad_tail(self.cfg)).clamp(max=self.cfg.data.max_length))
        return None if bool((own == slot_width(lengths, self.cfg)).all()) else own

    def sample(self, model, process, z, lengths, cfg_scale, generator=None, callback=None):
        raise NotImplementedError


def build_sampler(cfg, token_counts=None) -> Sampler:
    import sgdd.sampling.analytic  # noqa: F401
    import sgdd.sampling.euler  # noqa: F401
    import sgdd.sampling.maskgit  # noqa: F401

    return SAMPLERS.get(cfg.sampling.sampler)(cfg, token_counts=token_counts)
