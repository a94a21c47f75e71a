"""The sampler interface and its registry.

    sampler.sample(model, process, z (B, Dz), lengths (B,) long, cfg_scale, generator=None, callback=None)
        -> ids (B, L) long, no MASK left; L = slot_width(lengths, cfg); positions >= lengths[i] are PAD.

`model` is the raw decoder callable; the sampler applies classifier-free guidance itself through
sgdd.sampling.guidance.guided(model, cfg_scale). callback(step: int, x: LongTensor (B, L)) sees every
intermediate state. Sampling arithmetic runs in float32 (Gumbel noise in float64).
"""

from __future__ import annotations

from sgdd.registry import Registry

SAMPLERS = Registry("sampling.sampler")


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


class Sampler:
    def __init__(self, cfg, token_counts=None):
        """cfg: the whole sgdd.config.Config (reads cfg.sampling). token_counts (V,), optional: the training
        corpus count of every decoder id (sgdd.data.Vocab.counts), for options that tell frequent tokens apart."""
        self.cfg = cfg
        self.token_counts = token_counts

    def sample(self, model, process, z, lengths, cfg_scale, generator=None, callback=None):
        raise NotImplementedError


def build_sampler(cfg, token_counts=None) -> Sampler:
    import sgdd.sampling.analytic  # noqa: F401
    import sgdd.sampling.euler  # noqa: F401
    import sgdd.sampling.maskgit  # noqa: F401

    return SAMPLERS.get(cfg.sampling.sampler)(cfg, token_counts=token_counts)
