"""The analytic (Tweedie tau-leaping) sampler for the score-entropy (SEDD) process.

With dsigma = sigma_bar(t) - sigma_bar(t_next) each position moves from x to y with

    q_y = [P(-dsigma)^T s]_y  P(dsigma)[y, x]          (P(sigma) = exp(sigma Q), s the score at x)

which is the exact conditional p(x_{t_next} = y | x_t) of a single position when s is the true score (the
other positions held fixed). For the absorbing graph with the SEDD parameterisation this unmasks a masked
position with probability (e^dsigma - 1) / (e^sigma_bar(t) - 1) into a token drawn from p(x_0 | x_t).
The loop, guidance, final denoising step and sampling rules are shared with the Euler sampler
(sgdd.sampling.euler.ScoreSampler).
"""

from __future__ import annotations

import torch

from sgdd.sampling.base import SAMPLERS
from sgdd.sampling.euler import ScoreSampler


@SAMPLERS.register("analytic")
class AnalyticSampler(ScoreSampler):
    """Tweedie tau-leaping: the staggered score times the forward transition into the current token."""

    name = "analytic"

    def move_prob(self, process, t, t_next):
        # q_y = s_y (e^dsigma - 1) for the tokens, summed: (e^dsigma - 1) / (e^sigma_bar(t) - 1)
        sig = process.noise.total(torch.tensor([float(t), float(t_next)], dtype=torch.float64))
        return min(1.0, max(0.0, float(torch.expm1(sig[0] - sig[1]) / torch.expm1(sig[0]))))

    def step_probs(self, process, graph, x, log_score, t, t_next):
        ts = torch.tensor([float(t), float(t_next)], dtype=torch.float64)
        sig = process.noise.total(ts)
        dsigma = (sig[0] - sig[1]).float().to(log_score.device).expand(x.shape)
        return graph.tweedie_probs(x, log_score, dsigma)
