"""Score Entropy Discrete Diffusion (SEDD; Lou, Meng, Ermon 2023): graphs, noise schedules, the process.

Per position, a continuous-time Markov chain on the token ids {0..V-1} with rate matrix Q_t = sigma(t) Q,
where Q is fixed by the *graph* and sigma(t) = d sigma_bar / dt by the *noise*. Conventions used throughout
(row convention): Q[x, y] >= 0 is the rate of jumping x -> y (x != y), Q[x, x] = -sum_{y != x} Q[x, y], and

    p(x_t = y | x_0 = x) = exp(sigma_bar(t) Q)[x, y]            (transition matrix P(sigma_bar), rows sum to 1)

The model estimates the concrete score s(x_t)_y = p_t(y) / p_t(x_t) for every y that differs from x_t at
one position (one (V,) vector per position; s_{x_t} = 1). The time reversal jumps x_t -> y at rate
sigma(t) Q[y, x_t] s(x_t)_y. Training minimises the denoising score entropy (DSE), per position

    DSE = sum_{y != x_t} Q[y, x_t] ( s_y - r_y log s_y + K(r_y) ),  r_y = P[x_0, y] / P[x_0, x_t],  K(a) = a (log a - 1)

which is >= 0 and exactly 0 at s = r. The loss is E_{t ~ U[eps, 1]} [ sigma(t) sum_positions DSE ], an upper
bound on -log p(x_0) (the diffusion-weighted DSE of the paper).

Graphs (GRAPHS registry; the vocabulary specials follow plan.md: PAD = 0, MASK = 1, EOS = 2):
  absorbing  every token jumps to MASK at rate 1. P[x, x] = e^-sigma, P[x, MASK] = 1 - e^-sigma, MASK stays.
             Parameterisation: at a masked position the true score is p(x_0 = y | x_t) / (e^sigma_bar - 1),
             so log s_y = log_softmax(raw logits, MASK excluded)_y - log(e^sigma_bar - 1): the model only ever
             predicts a distribution over clean tokens and never MASK. DSE is zero at unmasked positions;
             at masked ones it equals -log p(x_0 | x_t) / (e^sigma_bar - 1) exactly, the form the loss computes
             (one fused cross-entropy; diffusion.softmax_sample estimates it as the masked process does). With
             the log-linear noise sigma(t) / (e^sigma_bar - 1) = 1 / t: MDLM's cross-entropy / t.
  uniform    every token jumps to any other *real* token at rate 1/N, N = V - 1: the state space is every id
             except MASK (MASK never appears: noise tokens are drawn uniformly over ids != MASK). PAD and EOS
             are ordinary states. P = e^-sigma I + (1 - e^-sigma) / N 11^T on the states. The raw model
             output is the log-score (MASK entry -inf, current-token entry 0).

Noises (NOISES registry): loglinear sigma_bar(t) = -log(1 - (1 - eps) t); cosine sigma_bar(t) =
-log(1 - (1 - eps)(1 - cos(pi t/2))) (the absorbing graph then masks as the masked process's cosine schedule);
geometric sigma_bar(t) = sigma_min^(1-t) sigma_max^t. Time input: the model is fed t in [0, 1] itself (`model_time(t) = t`), not
sigma_bar (the decoder embeds its time input sinusoidally assuming [0, 1]). Samplers therefore work on a t grid.
"""

from __future__ import annotations

import math

import torch

from sgdd.diffusion.base import NOISES, PROCESSES, ModelFn, Process, SampledSoftmax
from sgdd.registry import ConfigError, Registry

PAD_ID = 0  # sgdd.data.Vocab.PAD (plan.md)
MASK_ID = 1  # sgdd.data.Vocab.MASK (plan.md)

GRAPHS = Registry("diffusion.graph")


# ---------------------------------------------------------------------------------------------------------
# small pure functions


def log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(e^x - 1) for x > 0, stable for small x (expm1) and large x (x + log(1 - e^-x))."""
    return torch.where(x > 10.0, x + torch.log1p(-torch.exp(-x)), torch.log(torch.expm1(x.clamp(max=10.0))))


def dse_term(log_s: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """s - r log s + K(r) with K(r) = r (log r - 1), written as r phi(log s - log r), phi(u) = e^u - u - 1 >= 0.

    The factored form is >= 0 by construction, exactly 0 at s = r, and free of the cancellation between the
    large terms r log s and K(r) when r is large (small noise)."""
    u = log_s - log_r
    return torch.exp(log_r) * (torch.expm1(u) - u)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from unnormalised non-negative probs (..., V) by the Gumbel-max trick in float64."""
    u = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
    return (probs.double().clamp(min=0).log() + gumbel).argmax(dim=-1)


def one_hot(x: torch.Tensor, V: int, dtype: torch.dtype) -> torch.Tensor:
    """x (...) long -> (..., V) float one-hot."""
    return torch.nn.functional.one_hot(x, V).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# noise schedules: total noise sigma_bar(t) and rate sigma(t) = d sigma_bar / dt on t in [0, 1]


class Noise:
    """Total noise sigma_bar(t) (increasing) and its rate. t: tensor of any shape, float."""

    def total(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_of_total(self, sigma_bar: torch.Tensor) -> torch.Tensor:
        """Inverse of total(), clamped to [0, 1]."""
        raise NotImplementedError

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total(t), self.rate(t)


@NOISES.register("loglinear")
class LogLinearNoise(Noise):
    """sigma_bar(t) = -log(1 - (1 - eps) t); sigma(t) = (1 - eps) / (1 - (1 - eps) t).

    With the absorbing graph the masked fraction 1 - e^-sigma_bar = (1 - eps) t is linear in t (MDLM's
    log-linear schedule); at t = 1 a fraction 1 - eps is masked.
    """

    def __init__(self, eps: float = 1.0e-3):
        self.eps = float(eps)

    @classmethod
    def from_config(cls, d) -> LogLinearNoise:
        return cls(d.eps)

    def total(self, t):
        return -torch.log1p(-(1.0 - self.eps) * t)

    def rate(self, t):
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def t_of_total(self, sigma_bar):
        return (-torch.expm1(-sigma_bar) / (1.0 - self.eps)).clamp(0.0, 1.0)


@NOISES.register("geometric")
class GeometricNoise(Noise):
    """sigma_bar(t) = sigma_min^(1-t) sigma_max^t; sigma(t) = sigma_bar(t) log(sigma_max / sigma_min)."""

    def __init__(self, sigma_min: float = 1.0e-4, sigma_max: float = 20.0):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(
                f"geometric noise needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    @classmethod
    def from_config(cls, d) -> GeometricNoise:
        return cls(d.sigma_min, d.sigma_max)

    def total(self, t):
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def rate(self, t):
        return self.total(t) * self.log_ratio

    def t_of_total(self, sigma_bar):
        return (torch.log(sigma_bar.clamp(min=self.sigma_min) / self.sigma_min) / self.log_ratio).clamp(
            0.0, 1.0
        )


@NOISES.register("cosine")
class CosineNoise(Noise):
    """sigma_bar(t) = -log(1 - (1 - eps)(1 - cos(pi t / 2))); sigma(t) = (1 - eps)(pi/2) sin(pi t/2) e^sigma_bar(t).

    With the absorbing graph the masked fraction 1 - e^-sigma_bar = (1 - eps)(1 - cos(pi t/2)) follows the masked
    process's cosine schedule (36 % masked on average under uniform t instead of log-linear's 50 %), and the
    loss weight sigma(t) / (e^sigma_bar - 1) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) is its ELBO weight. At t = 1
    a fraction 1 - eps is masked, as with loglinear.
    """

    def __init__(self, eps: float = 1.0e-3):
        if not 0.0 < eps < 1.0:
            raise ConfigError(f"cosine noise needs 0 < diffusion.eps < 1, got {eps}")
        self.eps = float(eps)

    @classmethod
    def from_config(cls, d) -> CosineNoise:
        return cls(d.eps)

    def _masked(self, t):
        # 1 - cos(pi t/2) = 2 sin^2(pi t/4): no cancellation near t = 0
        return (1.0 - self.eps) * 2.0 * torch.sin(0.25 * math.pi * t) ** 2

    def total(self, t):
        return -torch.log1p(-self._masked(t))

    def rate(self, t):
        return (1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1.0 - self._masked(t))

    def t_of_total(self, sigma_bar):
        # masked fraction m = 1 - e^-sigma_bar = (1 - eps) 2 sin^2(pi t/4)
        m = -torch.expm1(-sigma_bar)
        half = (m / (2.0 * (1.0 - self.eps))).clamp(0.0, 0.5)
        return (torch.arcsin(torch.sqrt(half)) * (4.0 / math.pi)).clamp(0.0, 1.0)


def build_noise(d) -> Noise:
    """d: DiffusionConfig."""
    return NOISES.get(d.noise).from_config(d)


# ---------------------------------------------------------------------------------------------------------
# graphs


class Graph:
    """A rate matrix Q over V token ids and the operations SEDD needs (row convention, see module docstring).

    Shapes: x (...) long token ids; sigma (...) float total noise broadcastable to x's shape; vectors over the
    vocabulary are (..., V). `states` (V,) bool marks the ids the chain can occupy.
    """

    absorbing_id: int | None = None

    def __init__(self, vocab_size: int, mask_id: int = MASK_ID):
        self.V = int(vocab_size)
        self.mask_id = int(mask_id)

    # --- dense forms (small V, tests)
    def rate_matrix(self, dtype=torch.float64) -> torch.Tensor:
        """Q (V, V)."""
        raise NotImplementedError

    def transition_matrix(self, sigma: float, dtype=torch.float64) -> torch.Tensor:
        """P(sigma) = exp(sigma Q) (V, V), closed form."""
        x = torch.arange(self.V)
        return self.transition(x, torch.full((self.V,), float(sigma), dtype=dtype))

    # --- per-position operations
    def states(self, device=None) -> torch.Tensor:
        raise NotImplementedError

    def rate_in(self, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Q[y, x] for every y: rates *into* x (..., V); entry x is the diagonal Q[x, x]."""
        raise NotImplementedError

    def transition(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """p(x_t = y | x_0) = P(sigma)[x0, y] (..., V), dtype of sigma."""
        raise NotImplementedError

    def transition_in(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """P(sigma)[y, x] for every y (..., V): probability of reaching x from y; dtype of sigma."""
        raise NotImplementedError

    def sample_transition(
        self, x0: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_t ~ p(x_t | x_0) for total noise sigma (broadcastable to x0); returns (...) long."""
        raise NotImplementedError

    def sample_limit(self, shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw from the t -> infinity limit: all MASK (absorbing) or uniform over the states."""
        raise NotImplementedError

    def log_score(self, raw: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Model output (..., V) -> log-scores (..., V) float32, entry x_t = 0 (s_{x_t} = 1)."""
        raise NotImplementedError

    def staggered_score(self, log_score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """P(-dsigma)^T s (..., V) from log s: p_{t-dt}(y) / p_t(x_t) when s is the exact score at x_t (Tweedie).
        Takes log-scores so that graphs whose scores sit near 1 at high noise (uniform) keep their precision."""
        raise NotImplementedError

    def score_entropy(
        self, log_score: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Denoising score entropy per position (...), unweighted by sigma(t); see the module docstring.
        log_score (..., V): only entries y != x_t that are reachable (Q[y, x_t] > 0) are read."""
        raise NotImplementedError

    # --- generic operations built on the above
    def reverse_rate(self, x_t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Reverse rates for unit forward rate: R[y] = Q[y, x_t] s_y (y != x_t), R[x_t] = -sum_{y != x_t} R[y].
        score (..., V) float -> (..., V); multiply by sigma(t) dt for an Euler step."""
        rate = self.rate_in(x_t, score.dtype) * score
        rate = rate.scatter(-1, x_t[..., None], 0.0)
        return rate.scatter(-1, x_t[..., None], -rate.sum(dim=-1, keepdim=True))

    def tweedie_probs(self, x_t: torch.Tensor, log_score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """Unnormalised p(x_{t-dt} = y | x_t) = [P(-dsigma)^T s]_y P(dsigma)[y, x_t] (..., V), clamped >= 0.
        Exact for the exact score (Tweedie tau-leaping), dsigma = sigma_bar(t) - sigma_bar(t - dt)."""
        dsigma = torch.as_tensor(dsigma, device=log_score.device, dtype=log_score.dtype)
        probs = self.staggered_score(log_score, dsigma) * self.transition_in(x_t, dsigma)
        return probs.clamp(min=0.0)


@GRAPHS.register("absorbing")
class AbsorbingGraph(Graph):
    """Every token jumps to MASK at rate 1: Q[x, MASK] = 1, Q[x, x] = -1 (x != MASK), MASK row zero."""

    def __init__(self, vocab_size: int, mask_id: int = MASK_ID):
        super().__init__(vocab_size, mask_id)
        self.absorbing_id = self.mask_id

    def states(self, device=None):
        return torch.ones(self.V, dtype=torch.bool, device=device)

    def rate_matrix(self, dtype=torch.float64):
        Q = -torch.eye(self.V, dtype=dtype)
        Q[:, self.mask_id] += 1.0
        return Q

    def rate_in(self, x, dtype=torch.float32):
        is_mask = (x == self.mask_id)[..., None]
        into_mask = torch.ones(*x.shape, self.V, dtype=dtype, device=x.device)
        into_mask[..., self.mask_id] = 0.0
        diag = -one_hot(x, self.V, dtype)
        return torch.where(is_mask, into_mask, diag)

    def transition(self, x0, sigma):
        sigma = torch.as_tensor(sigma, device=x0.device).expand(x0.shape)
        stay = torch.exp(-sigma)[..., None]
        p = one_hot(x0, self.V, sigma.dtype) * stay
        p[..., self.mask_id] += 1.0 - stay[..., 0]  # a MASK x0 gets e^-sigma + 1 - e^-sigma = 1
        return p

    def transition_in(self, x, sigma):
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape)
        stay = torch.exp(-sigma)[..., None]
        # into MASK: from any token with prob 1 - e^-sigma, from MASK with 1; into a token: only from itself
        into_mask = (-torch.expm1(-sigma))[..., None].expand(*x.shape, self.V).clone()
        into_mask[..., self.mask_id] = 1.0
        into_token = one_hot(x, self.V, sigma.dtype) * stay
        return torch.where((x == self.mask_id)[..., None], into_mask, into_token)

    def sample_transition(self, x0, sigma, generator=None):
        move = -torch.expm1(-torch.as_tensor(sigma, device=x0.device).expand(x0.shape))
        u = torch.rand(x0.shape, device=x0.device, generator=generator, dtype=move.dtype)
        return torch.where(u < move, torch.full_like(x0, self.mask_id), x0)

    def sample_limit(self, shape, device=None, generator=None):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def log_score(self, raw, sigma, x_t):
        raw = raw.float()
        raw = raw.masked_fill(torch.arange(self.V, device=raw.device) == self.mask_id, float("-inf"))
        sigma = torch.as_tensor(sigma, device=raw.device, dtype=torch.float32).expand(x_t.shape)
        ls = torch.log_softmax(raw, dim=-1) - log_expm1(sigma)[..., None]
        return ls.scatter(-1, x_t[..., None], 0.0)

    def staggered_score(self, log_score, dsigma):
        # P(-d)^T s: tokens y != MASK get s_y e^d; MASK gets s_MASK + (1 - e^d) sum_{y != MASK} s_y
        score = log_score.exp()
        dsigma = torch.as_tensor(dsigma, device=score.device, dtype=score.dtype)[..., None]
        not_mask = torch.arange(self.V, device=score.device) != self.mask_id
        tokens_sum = torch.where(not_mask, score, 0.0).sum(dim=-1, keepdim=True)
        out = score * torch.exp(dsigma)
        out[..., self.mask_id] = score[..., self.mask_id] - (torch.expm1(dsigma) * tokens_sum)[..., 0]
        return out

    def score_entropy(self, log_score, sigma, x_t, x0):
        # at x_t = MASK: Q[y, MASK] = 1 for y != MASK; r_y = [y = x0] / (e^sigma - 1). Zero elsewhere.
        sigma = torch.as_tensor(sigma, device=log_score.device, dtype=log_score.dtype).expand(x_t.shape)
        not_mask = torch.arange(self.V, device=log_score.device) != self.mask_id
        others = not_mask & (torch.arange(self.V, device=log_score.device) != x0[..., None])
        s_others = torch.where(others, log_score.exp(), 0.0).sum(dim=-1)  # r_y = 0 there: the term is s_y
        clean = x0 != self.mask_id
        ls_x0 = torch.where(clean, log_score.gather(-1, x0[..., None]).squeeze(-1), 0.0)
        dse = s_others + torch.where(clean, dse_term(ls_x0, -log_expm1(sigma)), 0.0)
        return torch.where(x_t == self.mask_id, dse, 0.0)


@GRAPHS.register("uniform")
class UniformGraph(Graph):
    """Every state jumps to every other state at rate 1/N, N = V - 1 states (all ids except MASK).
    Q = 11^T / N - I on the states; MASK's row and column are zero (it is never occupied)."""

    def __init__(self, vocab_size: int, mask_id: int = MASK_ID):
        super().__init__(vocab_size, mask_id)
        self.N = self.V - 1
        if self.N < 2:
            raise ValueError(f"the uniform graph needs at least 2 states besides MASK, got V = {vocab_size}")

    def states(self, device=None):
        return torch.arange(self.V, device=device) != self.mask_id

    def rate_matrix(self, dtype=torch.float64):
        st = self.states().to(dtype)
        return torch.outer(st, st) / self.N - torch.diag(st)

    def rate_in(self, x, dtype=torch.float32):
        st = self.states(x.device).to(dtype)
        q = st.expand(*x.shape, self.V) / self.N - one_hot(x, self.V, dtype)
        return torch.where((x == self.mask_id)[..., None], 0.0, q)  # MASK is no state: no rates at all

    def _transition(self, x, sigma):
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape)
        st = self.states(x.device).to(sigma.dtype)
        is_state = (x != self.mask_id)[..., None]
        off = (-torch.expm1(-sigma) / self.N)[..., None] * st  # (1 - e^-sigma) / N on the states
        p = off + one_hot(x, self.V, sigma.dtype) * torch.exp(-sigma)[..., None]
        return torch.where(is_state, p, one_hot(x, self.V, sigma.dtype))  # MASK (never occupied) stays put

    def transition(self, x0, sigma):
        return self._transition(x0, sigma)  # P is symmetric

    def transition_in(self, x, sigma):
        return self._transition(x, sigma)

    def _uniform_states(self, shape, device, generator):
        # an id in {0..V-2} shifted past MASK: uniform over the N states
        y = torch.randint(0, self.N, shape, device=device, generator=generator)
        return y + (y >= self.mask_id).long()

    def sample_transition(self, x0, sigma, generator=None):
        move = -torch.expm1(-torch.as_tensor(sigma, device=x0.device).expand(x0.shape))
        u = torch.rand(x0.shape, device=x0.device, generator=generator, dtype=move.dtype)
        noise = self._uniform_states(x0.shape, x0.device, generator)
        return torch.where(u < move, noise, x0)

    def sample_limit(self, shape, device=None, generator=None):
        return self._uniform_states(tuple(shape), device, generator)

    def log_score(self, raw, sigma, x_t):
        raw = raw.float()
        raw = raw.masked_fill(torch.arange(self.V, device=raw.device) == self.mask_id, float("-inf"))
        return raw.scatter(-1, x_t[..., None], 0.0)

    def staggered_score(self, log_score, dsigma):
        # P(-d) = e^d I + (1 - e^d) 11^T / N on the states:  e^d s_y - (e^d - 1) m = m + e^d (s_y - m),
        # m the mean score over the states. At high noise s ~ 1, so work with s - 1 = expm1(log s): the
        # deviations that carry the information are not lost to rounding before e^d amplifies them.
        dsigma = torch.as_tensor(dsigma, device=log_score.device, dtype=log_score.dtype)[..., None]
        st = self.states(log_score.device)
        dev = torch.where(st, torch.expm1(log_score), 0.0)  # s - 1
        mean_dev = dev.sum(dim=-1, keepdim=True) / self.N
        out = (1.0 + mean_dev) + torch.exp(dsigma) * (dev - mean_dev)
        return torch.where(st, out, 0.0)

    def score_entropy(self, log_score, sigma, x_t, x0):
        # weights Q[y, x_t] = 1/N on the N - 1 states y != x_t. With rho = (e^s - 1) / (N + e^s - 1):
        #   x_t == x0: r_y = rho for every y;  x_t != x0: r_y = 1 except r_{x0} = 1 / rho.
        # The sums over y with a common r_y are taken in closed form (one pass over V); the single x0 term
        # uses the factored dse_term, since 1 / rho is large at small noise.
        N = self.N
        sigma = torch.as_tensor(sigma, device=log_score.device, dtype=log_score.dtype).expand(x_t.shape)
        valid = self.states(log_score.device) & (
            torch.arange(self.V, device=log_score.device) != x_t[..., None]
        )
        ls = torch.where(valid, log_score, 0.0)
        s_sum = torch.where(valid, log_score.exp(), 0.0).sum(dim=-1)
        ls_sum = ls.sum(dim=-1)
        lem = log_expm1(sigma)
        log_rho = lem - torch.logaddexp(lem, torch.full_like(lem, math.log(N)))
        rho = torch.exp(log_rho)
        same = s_sum - rho * ls_sum + (N - 1) * rho * (log_rho - 1.0)
        ls_x0 = ls.gather(-1, x0[..., None]).squeeze(-1)
        rest = (s_sum - ls_x0.exp()) - (ls_sum - ls_x0) - (N - 2)  # r_y = 1: sum of s - log s - 1
        diff = rest + dse_term(ls_x0, -log_rho)
        return torch.where(x_t == x0, same, diff) / N


def build_graph(name: str, vocab_size: int, mask_id: int = MASK_ID) -> Graph:
    return GRAPHS.get(name)(vocab_size, mask_id)


# ---------------------------------------------------------------------------------------------------------
# the process


@PROCESSES.register("score_entropy")
class ScoreEntropyProcess(SampledSoftmax, Process):
    """SEDD on a graph and a noise, built from the whole Config.

    The vocabulary size V is not in the config: it is taken from `vocab_size` when given (or set later as an
    attribute), else from `model.vocab_size`, else from one probe forward (no grad) of one position.
    """

    pad_id = PAD_ID

    def __init__(self, cfg, vocab_size: int | None = None):
        d = cfg.diffusion
        self.cfg = cfg
        self.graph_name = d.graph
        GRAPHS.get(d.graph)  # fail early on an unknown graph
        self.noise = build_noise(d)
        self.eps = float(d.eps)
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"diffusion.eps must be in [0, 1), got {self.eps}")
        self.mask_id = MASK_ID if d.graph == "absorbing" else None
        self.vocab_size = vocab_size
        self._graphs: dict[int, Graph] = {}
        # diffusion.softmax_sample (absorbing graph, training steps): see SampledSoftmax and _per_sequence
        self.softmax_sample = int(getattr(d, "softmax_sample", 0))
        if self.softmax_sample > 0 and d.graph != "absorbing":
            raise ConfigError("diffusion.softmax_sample needs the absorbing graph (the uniform graph's loss is not a "
                              "cross-entropy); set it to 0 for diffusion.graph = uniform")
        SampledSoftmax.__init__(self)

    def graph(self, V: int) -> Graph:
        if V not in self._graphs:
            self._graphs[V] = build_graph(self.graph_name, V, MASK_ID)
        return self._graphs[V]

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input: t in [0, 1] itself (not sigma_bar)."""
        return t

    def resolve_vocab_size(self, model: ModelFn, x: torch.Tensor, z: torch.Tensor) -> int:
        """V from the attribute, the model, or a probe forward of one selected position of x[:1]."""
        if self.vocab_size is None:
            V = getattr(model, "vocab_size", None)
            if not isinstance(V, int):
                select = torch.zeros_like(x[:1], dtype=torch.bool)
                select[0, 0] = True
                t = torch.ones(1, device=x.device)
                with torch.no_grad():
                    V = int(model(x[:1], self.model_time(t), z[:1], None, select).shape[-1])
            self.vocab_size = V
        return self.vocab_size

    def log_scores(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        uncond: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        widths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model -> log-scores float32: (B, L, V), or (N, V) at the selected positions. t (B,) in [0, 1].
        widths (B,), optional, passes through to the model (each row's own width, Decoder.forward)."""
        extra = {} if widths is None else {"widths": widths}
        raw = model(x_t, self.model_time(t), z, uncond, select, **extra)
        V = raw.shape[-1]
        sigma = self.noise.total(t.float())[:, None].expand(x_t.shape)  # (B, L)
        if select is not None:
            return self.graph(V).log_score(raw, sigma[select], x_t[select])
        return self.graph(V).log_score(raw, sigma, x_t)

    def _per_sequence(self, model, x0, z, uncond, t, generator=None, sampled: bool = False):
        """One corruption of x0 (B, L) at times t (B,) -> (rate-weighted DSE summed per sequence (B,), metrics).

        sampled (absorbing graph, training steps): the cross-entropy's normaliser is the sampled softmax's
        estimate (SampledSoftmax); the metrics acc and ce are then over the step's columns."""
        B, L = x0.shape
        V = self.resolve_vocab_size(model, x0, z)
        graph = self.graph(V)
        sigma, rate = self.noise(t)  # (B,), (B,)
        sigma_bl = sigma[:, None].expand(B, L)
        x_t = graph.sample_transition(x0, sigma_bl, generator)  # (B, L)
        metrics: dict[str, float] = {}
        if graph.absorbing_id is not None:
            select = x_t == graph.absorbing_id  # DSE is zero at unmasked positions
            x0_sel = x0[select]
            # The scores are a softmax over the clean tokens scaled by 1 / (e^sigma - 1) (graph.log_score), so the
            # DSE at a masked position is exactly -log p(x0 | x_t) / (e^sigma - 1) (the scores of the other tokens
            # and K(r) cancel against the softmax's normaliser; graph.score_entropy computes the general form
            # and the tests check the two agree). The fused cross-entropy keeps one (N, V) buffer instead of
            # the general form's several: the same loss and gradients, fewer passes over the output.
            if sampled:  # (N, C + 1) over the step's columns, the own target last (MASK is never a column)
                logits, target = self.sampled_logits(model, x_t, self.model_time(t), z, uncond, select, x0_sel,
                                                     generator)
            else:
                raw = model(x_t, self.model_time(t), z, uncond, select)  # (N, V)
                logits = raw.float().masked_fill(torch.arange(V, device=raw.device) == graph.mask_id, float("-inf"))
                target = x0_sel
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")  # (N,) -log p(x0 | x_t)
            dse = ce / torch.expm1(sigma_bl[select].float())
            rows = select.nonzero()[:, 0]  # (N,) batch index of each selected position
            per_seq = torch.zeros(B, device=x0.device, dtype=dse.dtype).index_add(0, rows, dse * rate[rows])
            n_sel = int(select.sum())
            metrics["mask_frac"] = n_sel / (B * L)
            if n_sel:  # as the masked process reports them: accuracy and cross-entropy at masked positions
                metrics["acc"] = float((logits.detach().argmax(-1) == target).float().mean())
                metrics["ce"] = float(ce.detach().mean())  # -log p(x0 | x_t)
        else:
            raw = model(x_t, self.model_time(t), z, uncond, None)  # (B, L, V)
            ls = graph.log_score(raw, sigma_bl, x_t)
            dse = graph.score_entropy(ls, sigma_bl, x_t, x0)  # (B, L)
            per_seq = (dse * rate[:, None]).sum(dim=1)
            metrics["changed_frac"] = float((x_t != x0).float().mean())
        return per_seq, metrics

    def loss(self, model, x0, z, uncond=None):
        """Diffusion-weighted DSE: per sequence sum over positions of sigma(t) DSE, t ~ U[eps, 1]; batch mean.

        x0 (B, L) clean ids, z (B, Dz), uncond (B,) bool | None -> (loss scalar float32, metrics): loss (per
        sequence), nll (per token), and for the absorbing graph mask_frac, acc, ce at masked positions; for the
        uniform graph changed_frac. The absorbing graph runs the model's output layer only where x_t = MASK."""
        B, L = x0.shape
        t = self.eps + (1.0 - self.eps) * torch.rand(B, device=x0.device)  # (B,)
        sampled = self.softmax_sample > 0 and torch.is_grad_enabled()
        per_seq, metrics = self._per_sequence(model, x0, z, uncond, t, sampled=sampled)
        loss = per_seq.mean()
        metrics["loss"] = float(loss.detach())  # per sequence
        metrics["nll"] = metrics["loss"] / L  # per token: the NLL bound, comparable to the masked process's nll
        return loss, metrics

    @torch.no_grad()
    def nll(self, model, x0: torch.Tensor, z: torch.Tensor, num_t: int = 8, seed: int = 0) -> torch.Tensor:
        """Deterministic per-token NLL bound (B,): the time integral of the rate-weighted DSE over [eps, 1] by
        the midpoint rule on num_t points, corruptions from a seeded generator (as MaskedProcess.nll)."""
        B, L = x0.shape
        gen = torch.Generator(device=x0.device).manual_seed(seed)
        total = torch.zeros(B, device=x0.device)
        for k in range(num_t):
            t = torch.full((B,), self.eps + (1.0 - self.eps) * (k + 0.5) / num_t, device=x0.device)
            total += self._per_sequence(model, x0, z, None, t, gen)[0].float()
        return total * (1.0 - self.eps) / num_t / L

    def clean_logits(self, model, x_t, mask_ratio, z, uncond=None, select=None, shortlist=None, kv=None,
                     widths=None):
        """Absorbing graph only: logits of p(x_0 | x_t) (MASK at -inf), float32, (B, L, V) or (N, V).

        The masked fraction 1 - e^-sigma_bar gives sigma_bar = -log(1 - mask_ratio), hence t for the model.
        At masked positions the log-scores are log p(x_0 | x_t) minus a constant, so these are the logits.
        `shortlist`, `kv` and `widths` pass through to the model as in MaskedDiffusion.clean_logits (MaskGIT's
        sampling.shortlist, kv_refresh and row_widths); with a shortlist the logits are (N, F + K) over its ids,
        which never hold MASK.
        """
        if self.mask_id is None:
            raise ConfigError(
                "clean_logits (MaskGIT) needs the absorbing graph; diffusion.graph = 'uniform' has no MASK state: "
                "use sampling.sampler euler or analytic"
            )
        ratio = mask_ratio.float().clamp(0.0, 1.0 - 1e-6)
        t = self.noise.t_of_total(-torch.log1p(-ratio)).clamp(self.eps, 1.0)  # (B,)
        kw = {name: v for name, v in (("shortlist", shortlist), ("kv", kv), ("widths", widths)) if v is not None}
        raw = model(x_t, self.model_time(t), z, uncond, select, **kw).float()
        if shortlist is not None:
            return raw
        return raw.masked_fill(torch.arange(raw.shape[-1], device=raw.device) == self.mask_id, float("-inf"))
