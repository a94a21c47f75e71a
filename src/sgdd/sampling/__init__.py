"""Samplers (MaskGIT confidence decoding, SEDD Euler and analytic/Tweedie) and classifier-free guidance."""

from sgdd.sampling.base import SAMPLERS, Sampler, build_sampler

__all__ = ["SAMPLERS", "Sampler", "build_sampler"]
