"""SEDD graphs, noises, score entropy and the score-entropy process (tiny vocabularies, CPU, float64 math)."""

from __future__ import annotations

import math

import pytest
import torch

from sgdd.config import _CHOICES, Config
from sgdd.diffusion.base import NOISES, PROCESSES, build_process
from sgdd.diffusion.schedules import CosineSchedule
from sgdd.diffusion.score_entropy import (
    GRAPHS,
    MASK_ID,
    CosineNoise,
    GeometricNoise,
    LogLinearNoise,
    ScoreEntropyProcess,
    build_graph,
    dse_term,
)
from sgdd.registry import ConfigError

GRAPH_NAMES = ["absorbing", "uniform"]
SIGMAS = [1e-3, 0.05, 0.7, 3.0, 12.0]


def dense_dse(graph, log_score, sigma, x_t, x0):
    """Brute-force score entropy of one position from the dense Q and exp(sigma Q) (float64)."""
    Q = graph.rate_matrix()
    P = torch.linalg.matrix_exp(sigma * Q)
    total = torch.zeros((), dtype=torch.float64)
    for y in range(graph.V):
        w = Q[y, x_t]
        if y == x_t or w == 0:
            continue
        r = P[x0, y] / P[x0, x_t]
        k = r * (torch.log(r) - 1) if r > 0 else torch.zeros((), dtype=torch.float64)
        total = total + w * (log_score[y].exp() - r * log_score[y] + k)
    return total


def random_pair(graph, gen, sigma):
    """A clean token x0 (never MASK) and an x_t drawn from p(x_t | x0)."""
    x0 = torch.randint(0, graph.V - 1, (), generator=gen)
    x0 = x0 + (x0 >= MASK_ID).long()
    x_t = graph.sample_transition(x0[None], torch.tensor([sigma], dtype=torch.float64), generator=gen)[0]
    return x0, x_t


# ---------------------------------------------------------------------------------------------------------
# graphs


@pytest.mark.parametrize("name", GRAPH_NAMES)
@pytest.mark.parametrize("V", [6, 9])
def test_transition_is_matrix_exponential_of_rate(name, V):
    g = build_graph(name, V)
    Q = g.rate_matrix()
    assert torch.allclose(Q.sum(dim=1), torch.zeros(V, dtype=torch.float64), atol=1e-12)  # rate rows sum to 0
    for sigma in SIGMAS:
        P = g.transition_matrix(sigma)
        assert torch.allclose(P, torch.linalg.matrix_exp(sigma * Q), atol=1e-10), (name, sigma)
        assert torch.allclose(P.sum(dim=1), torch.ones(V, dtype=torch.float64), atol=1e-12)
        assert (P >= 0).all()
        x = torch.arange(V)
        s = torch.full((V,), sigma, dtype=torch.float64)
        assert torch.allclose(g.transition(x, s), P, atol=1e-12)
        assert torch.allclose(g.transition_in(x, s), P.T, atol=1e-12)
    assert torch.allclose(g.rate_in(torch.arange(V), torch.float64), Q.T)


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_sample_transition_frequencies(name):
    V, n, sigma = 6, 40000, 0.8
    g = build_graph(name, V)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), 4, dtype=torch.long)
    x_t = g.sample_transition(x0, torch.full((n,), sigma), generator=gen)
    freq = torch.bincount(x_t, minlength=V).double() / n
    assert torch.allclose(freq, g.transition_matrix(sigma)[4], atol=0.01)
    if name == "uniform":
        assert (x_t != MASK_ID).all()


def test_limits():
    gen = torch.Generator().manual_seed(0)
    assert (build_graph("absorbing", 8).sample_limit((3, 5), generator=gen) == MASK_ID).all()
    x = build_graph("uniform", 8).sample_limit((400,), generator=gen)
    assert (x != MASK_ID).all() and x.min() >= 0 and x.max() <= 7
    assert set(x.tolist()) == set(range(8)) - {MASK_ID}


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_reverse_rate_rows_sum_to_zero(name):
    g = build_graph(name, 7)
    gen = torch.Generator().manual_seed(1)
    x = torch.tensor([0, 2, 3, 6, MASK_ID]) if name == "absorbing" else torch.tensor([0, 2, 3, 6])
    score = torch.rand(len(x), 7, generator=gen, dtype=torch.float64) * 3
    R = g.reverse_rate(x, score)
    assert torch.allclose(R.sum(dim=-1), torch.zeros(len(x), dtype=torch.float64), atol=1e-12)
    off = R.scatter(-1, x[:, None], 0.0)
    assert (off >= 0).all()


# ---------------------------------------------------------------------------------------------------------
# score entropy


def test_dse_term():
    log_s = torch.linspace(-5, 5, 11, dtype=torch.float64)
    log_r = torch.tensor(0.3, dtype=torch.float64)
    r = log_r.exp()
    direct = log_s.exp() - r * log_s + r * (log_r - 1)
    assert torch.allclose(dse_term(log_s, log_r), direct, atol=1e-12)
    assert dse_term(log_r, log_r).abs() < 1e-15


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_score_entropy_matches_dense_and_is_nonnegative(name):
    gen = torch.Generator().manual_seed(2)
    for V in (6, 8, 10):
        g = build_graph(name, V)
        for sigma in SIGMAS:
            for _ in range(4):
                x0, x_t = random_pair(g, gen, sigma)
                ls = torch.randn(V, generator=gen, dtype=torch.float64) * 2
                got = g.score_entropy(
                    ls[None], torch.tensor([sigma], dtype=torch.float64), x_t[None], x0[None]
                )[0]
                want = dense_dse(g, ls, sigma, int(x_t), int(x0))
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (V, sigma, got, want)
                assert got >= 0


@pytest.mark.parametrize("name", GRAPH_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_entropy_is_zero_at_true_ratios(name, dtype):
    gen = torch.Generator().manual_seed(3)
    sigmas = SIGMAS if dtype == torch.float64 else [0.1, 0.7, 3.0]
    for V in (6, 7, 10):
        g = build_graph(name, V)
        for sigma in sigmas:
            P = g.transition_matrix(sigma)
            for _ in range(4):
                x0, x_t = random_pair(g, gen, sigma)
                ratio = P[int(x0)] / P[int(x0), int(x_t)]  # r_y = p(y | x0) / p(x_t | x0)
                ls = torch.log(ratio).to(dtype)
                got = g.score_entropy(ls[None], torch.tensor([sigma], dtype=dtype), x_t[None], x0[None])[0]
                assert abs(float(got)) < 1e-6, (name, V, sigma, float(got))
                if name == "absorbing" and int(x_t) != MASK_ID:
                    continue  # no loss at unmasked positions, whatever the scores
                # any other log-score costs more
                worse = ls + torch.randn(V, generator=gen).to(dtype) * 0.3
                assert (
                    g.score_entropy(worse[None], torch.tensor([sigma], dtype=dtype), x_t[None], x0[None])[0]
                    > 0
                )


def test_absorbing_parameterisation_gives_scaled_cross_entropy():
    """log s = log p(x0 | x_t) - log(e^sigma - 1) at a masked position: DSE = -log p(x0 | x_t) / (e^sigma - 1)."""
    V = 9
    g = build_graph("absorbing", V)
    gen = torch.Generator().manual_seed(4)
    raw = torch.randn(5, V, generator=gen)
    sigma = torch.tensor([0.01, 0.3, 1.0, 4.0, 15.0])
    x_t = torch.full((5,), MASK_ID)
    x0 = torch.tensor([0, 2, 3, 5, 8])
    ls = g.log_score(raw, sigma, x_t)
    assert torch.isneginf(ls[:, :MASK_ID]).sum() == 0 and (ls[:, MASK_ID] == 0).all()  # s at x_t = MASK is 1
    logp = torch.log_softmax(raw.masked_fill(torch.arange(V) == MASK_ID, float("-inf")), -1)
    # the scores over clean tokens sum to 1 / (e^sigma - 1)
    clean = torch.arange(V) != MASK_ID
    assert torch.allclose(ls[:, clean].exp().sum(-1), 1 / torch.expm1(sigma), rtol=1e-4)
    want = -logp.gather(-1, x0[:, None]).squeeze(-1) / torch.expm1(sigma)
    assert torch.allclose(g.score_entropy(ls, sigma, x_t, x0), want, rtol=1e-4)
    # unmasked positions carry no loss
    x_t2 = torch.tensor([0, 2, 4, 5, 8])
    assert (g.score_entropy(g.log_score(raw, sigma, x_t2), sigma, x_t2, x0) == 0).all()


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_tweedie_step_is_exact_for_true_scores(name):
    """One position with a random data distribution p0: [P(-d)^T s]_y P(d)[y, x] = p(x_{t-dt} = y | x_t = x)."""
    V = 7
    g = build_graph(name, V)
    gen = torch.Generator().manual_seed(5)
    p0 = torch.rand(V, generator=gen, dtype=torch.float64)
    p0[MASK_ID] = 0
    p0 /= p0.sum()
    sigma_t, sigma_s = 1.3, 0.4
    p_t = p0 @ g.transition_matrix(sigma_t)
    p_s = p0 @ g.transition_matrix(sigma_s)
    d = sigma_t - sigma_s
    for x in range(V):
        if p_t[x] == 0:
            continue
        score = p_t / p_t[x]  # (V,) exact concrete score at x
        xt = torch.tensor([x])
        stag = g.staggered_score(score.log()[None], torch.tensor([d], dtype=torch.float64))[0]
        states = g.states()
        assert torch.allclose(stag[states], (p_s / p_t[x])[states], atol=1e-10)
        probs = g.tweedie_probs(xt, score.log()[None], torch.tensor([d], dtype=torch.float64))[0]
        exact = p_s * g.transition_matrix(d)[:, x] / p_t[x]
        assert torch.allclose(probs, exact, atol=1e-10), (name, x)
        assert torch.allclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# noises


@pytest.mark.parametrize("noise", [LogLinearNoise(1e-3), CosineNoise(1e-3), GeometricNoise(1e-4, 20.0)])
def test_noise_monotone_rate_is_derivative_and_inverse(noise):
    t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    total, rate = noise(t)
    assert (total.diff() > 0).all() and (rate > 0).all()
    h = 1e-6
    fd = (noise.total(t + h) - noise.total(t - h)) / (2 * h)
    assert torch.allclose(fd, rate, rtol=1e-5)
    assert torch.allclose(noise.t_of_total(total), t, atol=1e-9)


def test_noise_endpoints():
    ll = LogLinearNoise(1e-3)
    assert float(ll.total(torch.tensor(0.0))) == 0.0
    assert math.isclose(
        float(ll.total(torch.tensor(1.0, dtype=torch.float64))), -math.log(1e-3), rel_tol=1e-9
    )
    geo = GeometricNoise(1e-4, 20.0)
    assert math.isclose(float(geo.total(torch.tensor(0.0, dtype=torch.float64))), 1e-4, rel_tol=1e-9)
    assert math.isclose(float(geo.total(torch.tensor(1.0, dtype=torch.float64))), 20.0, rel_tol=1e-9)


def test_cosine_noise_masks_as_the_cosine_schedule():
    """On the absorbing graph the cosine noise's masked fraction is (1 - eps) x the masked process's cosine mask
    probability, and its loss weight sigma(t) / (e^sigma_bar - 1) is the cosine schedule's ELBO weight."""
    eps = 1e-3
    noise, sched = CosineNoise(eps), CosineSchedule()
    t = torch.linspace(0.001, 1.0, 400, dtype=torch.float64)
    total, rate = noise(t)
    assert torch.allclose(-torch.expm1(-total), (1 - eps) * sched.mask_prob(t), rtol=1e-10, atol=1e-14)
    assert torch.allclose(rate / torch.expm1(total), sched.weight(t), rtol=1e-9)
    assert math.isclose(float(noise.total(torch.tensor(1.0, dtype=torch.float64))), -math.log(eps), rel_tol=1e-9)
    assert float(noise.total(torch.tensor(0.0))) == 0.0
    assert float(noise.t_of_total(torch.tensor(0.0))) == 0.0
    # accurate at small t (no 1 - cos cancellation): the masked fraction ~ (1 - eps)(pi t)^2 / 8
    small = torch.tensor([1e-4], dtype=torch.float32)
    want = (1 - eps) * (math.pi * 1e-4) ** 2 / 8
    assert math.isclose(float(noise.total(small)), want, rel_tol=1e-4)
    with pytest.raises(ConfigError, match="eps"):
        CosineNoise(0.0)


def test_registries_match_config_choices():
    import sgdd.diffusion.score_entropy  # noqa: F401

    assert set(GRAPHS.names()) == set(_CHOICES["diffusion.graph"])
    assert set(NOISES.names()) == set(_CHOICES["diffusion.noise"])
    assert "score_entropy" in PROCESSES


# ---------------------------------------------------------------------------------------------------------
# the process


class TinyLogits(torch.nn.Module):
    """Model-signature stand-in: per-(position, token) logits plus a z projection; records the calls."""

    def __init__(self, V, L, Dz=4):
        super().__init__()
        self.emb = torch.nn.Embedding(V, V)
        self.pos = torch.nn.Parameter(torch.randn(L, V) * 0.1)
        self.zp = torch.nn.Linear(Dz, V)
        self.calls = []

    def forward(self, x_t, t, z, uncond=None, select=None, columns=None, target=None):
        self.calls.append((x_t.shape, t.clone(), None if select is None else select.clone()))
        out = self.emb(x_t) + self.pos[: x_t.shape[1]] + self.zp(z)[:, None, :] + t[:, None, None]
        out = out[select] if select is not None else out
        if columns is not None:  # the decoder's sampled-softmax output: the columns, then the own target
            out = torch.cat([out[:, columns], out.gather(-1, target[:, None])], dim=-1)
        return out


def make_cfg(graph, noise="loglinear"):
    cfg = Config()
    cfg.diffusion.process = "score_entropy"
    cfg.diffusion.graph = graph
    cfg.diffusion.noise = noise
    return cfg


@pytest.mark.parametrize(
    "graph,noise",
    [("absorbing", "loglinear"), ("absorbing", "cosine"), ("uniform", "geometric"), ("uniform", "loglinear")],
)
def test_process_loss_runs_backward(graph, noise):
    torch.manual_seed(0)
    V, L, B = 9, 8, 16
    proc = build_process(make_cfg(graph, noise))
    assert isinstance(proc, ScoreEntropyProcess)
    model = TinyLogits(V, L)
    x0 = torch.randint(3, V, (B, L))
    x0[:, -2] = 2  # EOS then PAD
    x0[:, -1] = 0
    loss, metrics = proc.loss(model, x0, torch.randn(B, 4))
    assert proc.vocab_size == V  # found by one probe forward
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    value = float(loss.detach())
    assert metrics["loss"] == pytest.approx(value) and metrics["nll"] == pytest.approx(value / L)
    loss.backward()
    assert model.emb.weight.grad.abs().sum() > 0
    _, t, select = model.calls[-1]
    assert ((t >= proc.eps) & (t <= 1)).all()  # the model is fed t itself
    if graph == "absorbing":
        assert select is not None and metrics["mask_frac"] == pytest.approx(float(select.float().mean()))
        assert proc.mask_id == MASK_ID
    else:
        assert select is None and proc.mask_id is None


def test_absorbing_loss_equals_weighted_cross_entropy():
    """With the loglinear noise, sigma(t) / (e^sigma_bar - 1) = 1 / t: the loss is MDLM's sum CE / t."""
    torch.manual_seed(1)
    V, L, B = 8, 6, 4
    proc = ScoreEntropyProcess(make_cfg("absorbing"), vocab_size=V)
    model = TinyLogits(V, L)
    x0 = torch.randint(3, V, (B, L))
    z = torch.randn(B, 4)
    torch.manual_seed(7)
    loss, _ = proc.loss(model, x0, z)
    # replay the same random draws
    torch.manual_seed(7)
    t = proc.eps + (1 - proc.eps) * torch.rand(B)
    x_t = proc.graph(V).sample_transition(x0, proc.noise.total(t)[:, None].expand(B, L))
    logits = model(x_t, t, z).masked_fill(torch.arange(V) == MASK_ID, float("-inf"))
    ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
    want = ((ce * (x_t == MASK_ID)).sum(1) / t).mean()
    assert torch.allclose(loss, want, rtol=1e-4)


def test_clean_logits():
    V, L, B = 8, 5, 3
    model = TinyLogits(V, L)
    x = torch.full((B, L), MASK_ID)
    z = torch.randn(B, 4)
    proc = ScoreEntropyProcess(make_cfg("absorbing"), vocab_size=V)
    logits = proc.clean_logits(model, x, torch.tensor([1.0, 0.5, 0.2]), z)
    assert logits.shape == (B, L, V) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., MASK_ID]).all()
    t = model.calls[-1][1]
    assert torch.allclose(t, torch.tensor([1.0, 0.5 / 0.999, 0.2 / 0.999]), atol=1e-4)  # masked fraction -> t
    sel = torch.rand(B, L) < 0.5
    assert proc.clean_logits(model, x, torch.ones(B), z, select=sel).shape == (int(sel.sum()), V)
    uni = ScoreEntropyProcess(make_cfg("uniform"), vocab_size=V)
    with pytest.raises(ConfigError, match="absorbing"):
        uni.clean_logits(model, x, torch.ones(B), z)


def sampled_absorbing(K, V):
    cfg = make_cfg("absorbing")
    cfg.diffusion.softmax_sample = K
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    proc.set_token_counts(torch.arange(V))
    return proc


def test_absorbing_sampled_softmax_over_every_id_is_exact():
    """K >= V: the columns are every id but [MASK] and nothing is drawn, so loss and gradients are the full ones."""
    V, L, B = 8, 6, 4
    x0 = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(2))
    z = torch.randn(B, 4, generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for proc in (ScoreEntropyProcess(make_cfg("absorbing"), vocab_size=V), sampled_absorbing(V, V)):
        torch.manual_seed(0)
        model = TinyLogits(V, L)
        torch.manual_seed(7)
        loss, metrics = proc.loss(model, x0, z)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.emb.weight.grad.clone())
        assert metrics["mask_frac"] > 0
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_absorbing_sampled_softmax_trains_only_and_needs_counts_and_absorbing():
    V, L, B = 12, 6, 4
    x0 = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(2))
    z = torch.randn(B, 4)
    model = TinyLogits(V, L)
    proc = sampled_absorbing(3, V)  # 3 frequent columns + 1 drawn + the own target
    loss, _ = proc.loss(model, x0, z)
    assert torch.isfinite(loss) and model.calls[-1][2] is not None
    with torch.no_grad():  # evaluation: the full vocabulary, exactly the unsampled process
        torch.manual_seed(9)
        a = proc.loss(model, x0, z)[0]
        torch.manual_seed(9)
        b = ScoreEntropyProcess(make_cfg("absorbing"), vocab_size=V).loss(model, x0, z)[0]
    assert float(a) == pytest.approx(float(b))
    cfg = make_cfg("absorbing")
    cfg.diffusion.softmax_sample = 3
    with pytest.raises(RuntimeError, match="set_token_counts"):
        ScoreEntropyProcess(cfg, vocab_size=V).loss(model, x0, z)
    cfg = make_cfg("uniform")
    cfg.diffusion.softmax_sample = 3
    with pytest.raises(ConfigError, match="absorbing graph"):
        ScoreEntropyProcess(cfg, vocab_size=V)
