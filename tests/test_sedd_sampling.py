"""SEDD samplers (euler, analytic): end states, padding, exactness with exact scores, CFG, a tiny overfit."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import perturbed_decoder, record_decoder_calls

from sgdd.config import Config, config_from_dict
from sgdd.diffusion.base import Process
from sgdd.diffusion.score_entropy import MASK_ID, PAD_ID, ScoreEntropyProcess
from sgdd.registry import ConfigError
from sgdd.sampling.analytic import AnalyticSampler
from sgdd.sampling.base import build_sampler
from sgdd.sampling.euler import EulerSampler, choose_next
from sgdd.sampling.guidance import guided

SAMPLERS = ["euler", "analytic"]


def make_cfg(graph="absorbing", noise="loglinear", sampler="euler", steps=8, greedy=True, temperature=1.0):
    cfg = Config()
    cfg.diffusion.process = "score_entropy"
    cfg.diffusion.graph = graph
    cfg.diffusion.noise = noise
    cfg.sampling.sampler = sampler
    cfg.sampling.steps = steps
    cfg.sampling.greedy = greedy
    cfg.sampling.temperature = temperature
    cfg.sampling.pad_tail = 0  # exact slot shapes below; test_pad_tail_* covers the tail
    return cfg


class RandomModel(torch.nn.Module):
    """Model-signature stand-in with fixed random weights; uncond rows see a different latent."""

    def __init__(self, V, L, Dz=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, V, generator=g)
        self.pos = torch.randn(L, V, generator=g)
        self.zp = torch.randn(Dz, V, generator=g)
        self.null = torch.randn(Dz, generator=g)
        self.calls = 0

    def forward(self, x_t, t, z, uncond=None, select=None):
        self.calls += 1
        if uncond is not None:
            z = torch.where(uncond[:, None], self.null.expand_as(z), z)
        out = self.emb[x_t] + self.pos[: x_t.shape[1]] + (z @ self.zp)[:, None, :] + t[:, None, None]
        return out[select] if select is not None else out


class Oracle(torch.nn.Module):
    """Exact scores for the point-mass data distribution x_0 = targets[row] (rows are told apart by z[:, 0]).

    absorbing: logits peaked on the target token (p(x0 | x_t) = delta); uniform: log-score
    log P(sigma)[x0, y] - log P(sigma)[x0, x_t] with sigma = sigma_bar(t)."""

    def __init__(self, targets, process, V):
        super().__init__()
        self.targets, self.process, self.V = targets, process, V

    def forward(self, x_t, t, z, uncond=None, select=None):
        x0 = self.targets[z[:, 0].long()]  # (B, L)
        graph = self.process.graph(self.V)
        if graph.absorbing_id is not None:
            out = 40.0 * torch.nn.functional.one_hot(x0, self.V).float()
        else:
            sigma = self.process.noise.total(t.double())[:, None].expand(x0.shape)
            p = graph.transition(x0, sigma)  # (B, L, V)
            p_cur = p.gather(-1, x_t[..., None])
            out = (p.clamp(min=1e-300).log() - p_cur.log()).float()
        return out[select] if select is not None else out


def random_targets(n, L, V, gen):
    """n sequences of real tokens (ids >= 3) with EOS and PAD tails of different lengths."""
    x = torch.randint(3, V, (n, L), generator=gen)
    for i in range(n):
        end = L - 1 - (i % 3)
        x[i, end] = 2
        x[i, end + 1 :] = PAD_ID
    return x


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("greedy", [True, False])
def test_absorbing_sampler_leaves_no_mask_and_pads(sampler, steps, greedy):
    V, L = 9, 7
    cfg = make_cfg("absorbing", "loglinear", sampler, steps, greedy)
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    model = RandomModel(V, L)
    lengths = torch.tensor([7, 3, 5, 1])
    seen = []
    x = build_sampler(cfg).sample(
        model,
        proc,
        torch.randn(4, 4),
        lengths,
        1.0,
        generator=torch.Generator().manual_seed(0),
        callback=lambda k, x: seen.append((k, x.clone())),
    )
    assert x.shape == (4, 7) and x.dtype == torch.long
    assert (x != MASK_ID).all()
    assert ((x >= 0) & (x < V)).all()
    beyond = torch.arange(7)[None, :] >= lengths[:, None]
    assert (x[beyond] == PAD_ID).all()
    assert [k for k, _ in seen] == list(range(1, steps + 1))
    assert torch.equal(seen[-1][1], x)
    assert model.calls <= steps  # one forward per step (no call once nothing is masked)
    # the number of masked positions never grows
    masked = [int((s == MASK_ID).sum()) for _, s in seen]
    assert masked == sorted(masked, reverse=True)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("noise", ["geometric", "loglinear"])
def test_uniform_sampler_returns_valid_tokens(sampler, noise):
    V, L = 8, 6
    cfg = make_cfg("uniform", noise, sampler, 4, greedy=False)
    proc = ScoreEntropyProcess(cfg)  # V from model.vocab_size is absent: found by a probe forward
    model = RandomModel(V, L)
    lengths = torch.tensor([6, 2, 4])
    x = build_sampler(cfg).sample(
        model, proc, torch.randn(3, 4), lengths, 2.0, torch.Generator().manual_seed(1)
    )
    assert proc.vocab_size == V
    assert x.shape == (3, 6) and ((x >= 0) & (x < V)).all() and (x != MASK_ID).all()
    assert (x[torch.arange(6)[None, :] >= lengths[:, None]] == PAD_ID).all()


@pytest.mark.parametrize(
    "graph,noise",
    [("absorbing", "loglinear"), ("absorbing", "cosine"), ("absorbing", "geometric"), ("uniform", "geometric")],
)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps,greedy", [(1, True), (4, True), (16, False)])
def test_exact_scores_reconstruct_point_mass(graph, noise, sampler, steps, greedy):
    """With the exact score of a point-mass data distribution every sampler ends exactly on it."""
    V, L, n = 10, 8, 5
    gen = torch.Generator().manual_seed(2)
    targets = random_targets(n, L, V, gen)
    cfg = make_cfg(graph, noise, sampler, steps, greedy)
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    z = torch.zeros(n, 3)
    z[:, 0] = torch.arange(n)
    x = build_sampler(cfg).sample(Oracle(targets, proc, V), proc, z, torch.full((n,), L), 1.0, gen)
    assert torch.equal(x, targets)


def clean_log_probs(log_score, masked):
    """log p(x0 | x_t) over the clean tokens at the masked positions, from absorbing log-scores (B, L, V)."""
    V = log_score.shape[-1]
    return torch.log_softmax(log_score[masked][:, torch.arange(V) != MASK_ID], -1)


def test_guidance_identity_at_scale_one_and_log_score_combination():
    V, L, B = 9, 5, 3
    model = RandomModel(V, L)
    x = torch.randint(0, V, (B, L))
    x[0, :2] = MASK_ID
    t = torch.tensor([0.9, 0.5, 0.1])
    z = torch.randn(B, 4)
    null = torch.ones(B, dtype=torch.bool)
    for graph in ("absorbing", "uniform"):
        proc = ScoreEntropyProcess(make_cfg(graph), vocab_size=V)
        x_in = x if graph == "absorbing" else x.masked_fill(x == MASK_ID, 3)
        cond = proc.log_scores(model, x_in, t, z)
        assert torch.equal(proc.log_scores(guided(model, 1.0), x_in, t, z), cond)
        sel = x_in == MASK_ID if graph == "absorbing" else torch.ones_like(x_in, dtype=torch.bool)
        assert torch.equal(proc.log_scores(guided(model, 1.0), x_in, t, z, select=sel), cond[sel])
        unc = proc.log_scores(model, x_in, t, z, uncond=null)
        g2 = proc.log_scores(guided(model, 2.0), x_in, t, z)
        live = torch.isfinite(cond) & (cond != 0)
        if graph == "uniform":  # raw outputs are the log-scores: guidance acts on them directly
            assert torch.allclose(g2[live], (unc + 2 * (cond - unc))[live], atol=1e-5)
        else:  # absorbing: the guided log p(x0 | x_t) is renormalised
            m = x_in == MASK_ID
            lp_c, lp_u, lp_g = (clean_log_probs(ls, m) for ls in (cond, unc, g2))
            want = torch.log_softmax(lp_u + 2 * (lp_c - lp_u), -1)
            assert torch.allclose(lp_g, want, atol=1e-5)


def test_sampler_with_guidance_runs_one_batched_forward_per_step():
    V, L = 9, 6
    cfg = make_cfg("absorbing", "loglinear", "analytic", 3)
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    model = RandomModel(V, L)
    x = build_sampler(cfg).sample(model, proc, torch.randn(2, 4), torch.tensor([6, 4]), 3.0)
    assert (x != MASK_ID).all() and model.calls <= 3


def test_choose_next_rules():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.6, 0.1, 0.3], [0.5, 0.0, 0.5, 0.0]])
    x = torch.tensor([1, 0])
    assert choose_next(probs, x, greedy=True, final=True).tolist() == [1, 0]
    # greedy, not final: a move goes to the best other token, stays otherwise
    outs = torch.stack([choose_next(probs, x, greedy=True, generator=gen) for _ in range(400)])
    assert set(outs[:, 0].tolist()) <= {1, 3} and set(outs[:, 1].tolist()) <= {0, 2}
    moved = (outs[:, 0] == 3).float().mean()
    assert abs(float(moved) - 0.4) < 0.08
    exact = torch.stack([choose_next(probs, x, greedy=False, generator=gen) for _ in range(2000)])
    assert abs(float((exact[:, 0] == 2).float().mean()) - 0.1) < 0.03


def test_sampler_rejects_other_processes_and_config_combinations():
    cfg = make_cfg()
    assert isinstance(build_sampler(make_cfg(sampler="euler")), EulerSampler)
    assert isinstance(build_sampler(make_cfg(sampler="analytic")), AnalyticSampler)
    with pytest.raises(ConfigError, match="score_entropy"):
        EulerSampler(cfg).sample(RandomModel(5, 4), Process(), torch.randn(1, 4), torch.tensor([3]), 1.0)
    with pytest.raises(ConfigError, match="euler, analytic"):
        config_from_dict(
            {
                "diffusion": {"process": "score_entropy", "graph": "uniform"},
                "sampling": {"sampler": "maskgit"},
            }
        )
    with pytest.raises(ConfigError, match="maskgit"):
        config_from_dict({"diffusion": {"process": "masked"}, "sampling": {"sampler": "euler"}})


# ---------------------------------------------------------------------------------------------------------
# tiny overfit: the training loss and the samplers agree


def _overfit(graph, noise, train_steps, seed=0):
    from sgdd.models.decoder import Decoder

    torch.manual_seed(seed)
    V, L, n, Dz = 10, 8, 6, 8
    gen = torch.Generator().manual_seed(seed)
    targets = random_targets(n, L, V, gen)
    z = torch.randn(n, Dz, generator=gen)
    cfg = make_cfg(graph, noise)
    mc = cfg.model
    mc.init_from, mc.hidden_size, mc.num_heads, mc.num_layers, mc.latent_dim = "scratch", 64, 4, 2, Dz
    model = Decoder(mc, V, L)
    proc = ScoreEntropyProcess(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    reps = 8
    first = last = None
    for step in range(train_steps):
        loss, _ = proc.loss(model, targets.repeat(reps, 1), z.repeat(reps, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if step == 0 else first
        last = float(loss.detach())
    model.eval()
    return model, proc, cfg, targets, z, first, last


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "graph,noise,train_steps",
    [("absorbing", "loglinear", 150), pytest.param("uniform", "geometric", 700, marks=pytest.mark.slow)],
)
def test_tiny_overfit_reconstructs(graph, noise, train_steps, one_thread):
    t0 = time.time()
    model, proc, cfg, targets, z, first, last = _overfit(graph, noise, train_steps)
    assert last < first / 4
    n, L = targets.shape
    for sampler in SAMPLERS:
        for steps in (4, 16):
            cfg.sampling.sampler, cfg.sampling.steps = sampler, steps
            x = build_sampler(cfg).sample(
                model, proc, z, torch.full((n,), L), 1.0, torch.Generator().manual_seed(0)
            )
            acc = float((x == targets).float().mean())
            assert acc >= 0.95, (graph, sampler, steps, acc, x, targets)
    print(f"overfit {graph}: loss {first:.2f} -> {last:.3f} in {time.time() - t0:.1f}s")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_row_chunking_gives_the_same_result(sampler, monkeypatch):
    """The per-step work after the forward is split into row chunks (the uniform graph's loop; the absorbing graph
    draws without (V,) probabilities); the exact-score result is unchanged."""
    import sgdd.sampling.euler as euler

    V, L, n = 10, 8, 5
    gen = torch.Generator().manual_seed(3)
    targets = random_targets(n, L, V, gen)
    cfg = make_cfg("uniform", "geometric", sampler, 6, greedy=True)
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    z = torch.zeros(n, 3)
    z[:, 0] = torch.arange(n)
    monkeypatch.setattr(euler, "ROW_CHUNK_ELEMENTS", 3 * V)  # 3 rows at a time
    x = build_sampler(cfg).sample(Oracle(targets, proc, V), proc, z, torch.full((n,), L), 1.0, gen)
    assert torch.equal(x, targets)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("graph, noise", [("absorbing", "loglinear"), ("uniform", "geometric")])
def test_pad_tail_adds_visible_pad_after_the_longest_slot(sampler, graph, noise):
    V = 9
    cfg = make_cfg(graph, noise, sampler, 4, greedy=graph == "absorbing")
    cfg.sampling.pad_tail = 3
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    lengths = torch.tensor([5, 2])
    x = build_sampler(cfg).sample(RandomModel(V, 16), proc, torch.randn(2, 4), lengths, 1.0,
                                  generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 8)  # longest slot 5 + 3 tail positions
    assert (x != MASK_ID).all()
    assert (x[torch.arange(8)[None, :] >= lengths[:, None]] == PAD_ID).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_row_widths_give_each_row_its_own_width(sampler, scale):
    """sampling.row_widths (as in MaskGIT): every model call of the score samplers runs each row at its own width
    (slots + pad_tail), and the log-scores it gets are those of the row run alone at that width."""
    V = 12
    dec = perturbed_decoder(V, 4)
    calls = []
    forward = dec.forward

    def recording(x_t, t, z, uncond=None, select=None, **kw):
        out = forward(x_t, t, z, uncond, select, **kw)
        calls.append((x_t, t, z, uncond, select, kw.get("widths"), out.clone()))  # guidance overwrites out
        return out

    dec.forward = recording
    cfg = make_cfg("absorbing", "loglinear", sampler, steps=4, greedy=False)
    cfg.sampling.pad_tail = 3
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    lengths = torch.tensor([6, 2, 4])
    z0 = torch.randn(3, 4)
    x = build_sampler(cfg).sample(dec, proc, z0, lengths, scale, torch.Generator().manual_seed(0))
    assert x.shape == (3, 9) and (x != MASK_ID).all()
    assert (x[torch.arange(9)[None, :] >= lengths[:, None]] == PAD_ID).all()
    steps = [c for c in calls if c[4] is not None]  # the sampling steps (the vocabulary probe selects nothing)
    assert steps
    for x_t, t, z, uncond, select, widths, out in steps:
        rows = x_t.shape[0]  # the rows with an unmasking position; twice with guidance (the null rows repeat them)
        which = torch.cdist(z, z0).argmin(dim=1)  # each row's index in the batch, by its latent
        assert torch.equal(widths, torch.tensor([9, 5, 7])[which])
        with torch.no_grad():
            alone = torch.cat([forward(x_t[b : b + 1, : widths[b]], t[b : b + 1], z[b : b + 1],
                                       None if uncond is None else uncond[b : b + 1], select[b : b + 1, : widths[b]])
                               for b in range(rows)])
        assert torch.allclose(out, alone, atol=1e-4)
    # off: every row as wide as the batch, no widths passed
    calls.clear()
    cfg.sampling.row_widths = False
    build_sampler(cfg).sample(dec, proc, torch.randn(3, 4), lengths, scale, torch.Generator().manual_seed(0))
    assert calls and all(c[5] is None for c in calls)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("noise", ["loglinear", "cosine", "geometric"])
def test_absorbing_loop_draws_what_the_transition_probabilities_say(sampler, noise):
    """On the absorbing graph the loop draws 'unmask with move_prob, then a token from p(x0 | x_t)' instead of
    building each masked position's (V,) transition probabilities (step_probs): the two agree on the move
    probability and the destination distribution at every step of the grid."""
    V, N = 11, 5
    cfg = make_cfg("absorbing", noise, sampler, steps=8)
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    graph = proc.graph(V)
    smp = build_sampler(cfg)
    raw = torch.randn(N, V, generator=torch.Generator().manual_seed(0)) * 2
    x = torch.full((N,), MASK_ID)
    ts = torch.linspace(1.0, max(proc.eps, 1.0e-5), 8, dtype=torch.float64).tolist()
    p_token = torch.softmax(raw.masked_fill(torch.arange(V) == MASK_ID, float("-inf")), dim=-1).double()
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        sigma = proc.noise.total(torch.full((N,), t))
        probs = smp.step_probs(proc, graph, x, graph.log_score(raw, sigma, x), t, t_next).double()
        total = probs.sum(dim=-1)
        p_move = 1.0 - probs[:, MASK_ID] / total
        assert torch.allclose(p_move, torch.full((N,), smp.move_prob(proc, t, t_next), dtype=torch.float64),
                              rtol=1e-4, atol=1e-6), t
        dest = probs.clone()
        dest[:, MASK_ID] = 0.0
        if bool((p_move > 1e-6).all()):
            assert torch.allclose(dest / dest.sum(dim=-1, keepdim=True), p_token, atol=1e-5), t
    # steps where no position unmasks do not call the model (geometric noise: nothing unmasks at first)
    model = RandomModel(V, 8)
    out = smp.sample(model, proc, torch.randn(2, 4), torch.tensor([4, 3]), 1.0, torch.Generator().manual_seed(0))
    assert (out != MASK_ID).all() and 1 <= model.calls <= 8
    if noise == "geometric":
        assert model.calls < 8


class OneWord(torch.nn.Module):
    """Every position prefers token `word` (logit 5), then `second` (logit 4), then the rest (0)."""

    def __init__(self, V, word, second):
        super().__init__()
        self.V, self.word, self.second = V, word, second

    def forward(self, x_t, t, z, uncond=None, select=None):
        out = torch.zeros(*x_t.shape, self.V)
        out[..., self.word], out[..., self.second] = 5.0, 4.0
        return out[select] if select is not None else out


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_repeat_penalty_steers_away_from_visible_tokens(sampler):
    """Absorbing graph, 64 small steps for 4 positions (so they mostly unmask one at a time): without the penalty
    every position writes the favourite word; with it (no exempt ids) a position that sees the word visible takes
    the runner-up (logit 5 - 3 < 4)."""
    V, L = 9, 4
    lengths = torch.full((2,), L)
    outs = {}
    for penalty in (0.0, 3.0):
        cfg = make_cfg("absorbing", "loglinear", sampler, steps=64)
        cfg.sampling.repeat_penalty, cfg.sampling.repeat_exempt = penalty, 0
        proc = ScoreEntropyProcess(cfg, vocab_size=V)
        outs[penalty] = build_sampler(cfg, token_counts=torch.ones(V)).sample(
            OneWord(V, 5, 6), proc, torch.zeros(2, 4), lengths, 1.0, torch.Generator().manual_seed(0))
    assert (outs[0.0] == 5).all()
    per_row = (outs[3.0] == 5).sum(dim=1)
    assert (per_row >= 1).all() and (per_row < L).all() and (outs[3.0] == 6).any()


def test_repeat_penalty_needs_the_absorbing_graph():
    cfg = make_cfg("uniform", "geometric", "euler", steps=4)
    cfg.sampling.repeat_penalty = 3.0
    proc = ScoreEntropyProcess(cfg, vocab_size=8)
    with pytest.raises(ConfigError, match="absorbing graph"):
        build_sampler(cfg).sample(RandomModel(8, 4), proc, torch.randn(2, 4), torch.tensor([4, 2]), 1.0)
    from sgdd.config import validate_config

    with pytest.raises(ConfigError, match="repeat_penalty"):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------------------------
# the absorbing loop: unmasking steps drawn up front, key / value and null-pass reuse; MaskGIT on SEDD weights


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("noise", ["loglinear", "geometric"])
def test_unmask_steps_follow_the_per_step_move_probability(sampler, noise):
    """unmask_steps draws each position's unmasking step before decoding: step k < K with probability
    prod_{j<k} (1 - p_j) p_k (p = move_prob on the time grid), step K otherwise."""
    K, n = 6, 200_000
    cfg = make_cfg("absorbing", noise, sampler, steps=K)
    proc = ScoreEntropyProcess(cfg, vocab_size=8)
    smp = build_sampler(cfg)
    ts = torch.linspace(1.0, max(proc.eps, 1.0e-5), K, dtype=torch.float64).tolist()
    at = smp.unmask_steps(proc, ts, (n,), "cpu", torch.Generator().manual_seed(0))
    assert int(at.min()) >= 1 and int(at.max()) <= K
    left, expected = 1.0, []
    for k in range(1, K):
        p = smp.move_prob(proc, ts[k - 1], ts[k])
        expected.append(left * p)
        left *= 1.0 - p
    expected.append(left)
    freq = (torch.bincount(at, minlength=K + 1)[1:].double() / n).tolist()
    for k, (f, e) in enumerate(zip(freq, expected, strict=True), start=1):
        assert abs(f - e) <= 5 * (e * (1 - e) / n) ** 0.5 + 1e-12, (k, f, e)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_absorbing_reuse_is_exact_at_refresh_1_and_runs_less_otherwise(sampler):
    """A real (tiny, perturbed) decoder on the absorbing graph with guidance: kv_refresh 1 and guidance_refresh 1
    (a full pass and a null pass at every step) decode exactly as without reuse; at 3 the null pass runs at
    steps 1 and 4 only and the steps between run fewer positions than the longest row, ending with no MASK."""
    V = 12
    dec = perturbed_decoder(V, 4)
    lengths = torch.tensor([9, 6, 3])
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def run(**fields):
        cfg = make_cfg("absorbing", "loglinear", sampler, steps=6)
        cfg.sampling.pad_tail = 2
        for name, value in fields.items():
            setattr(cfg.sampling, name, value)
        proc = ScoreEntropyProcess(cfg, vocab_size=V)
        return build_sampler(cfg).sample(dec, proc, z, lengths, 1.5, torch.Generator().manual_seed(0))

    exact = run()
    for fields in ({"kv_refresh": 1}, {"guidance_refresh": 1}, {"kv_refresh": 1, "guidance_refresh": 1}):
        assert torch.equal(run(**fields), exact), fields
    calls = record_decoder_calls(dec)
    reused = run(kv_refresh=3, guidance_refresh=3)
    assert sum(null for null, _ in calls) == 2  # the null pass at steps 1 and 4 only
    partial = [ran for null, ran in calls if ran is not None]
    assert partial and max(partial) < 9
    assert (reused != MASK_ID).all()
    assert (reused[torch.arange(11)[None].expand(3, -1) >= lengths[:, None]] == PAD_ID).all()


@pytest.mark.parametrize("fields", [{}, {"kv_refresh": 3, "guidance_refresh": 2},
                                    {"shortlist": 3, "shortlist_frequent": 4}])
def test_maskgit_decodes_sedd_weights_with_row_widths_reuse_and_shortlist(fields):
    """`--sampler maskgit` on an absorbing score-entropy model takes MaskGIT's options (row widths, key / value
    and null-pass reuse, the shortlist): no MASK is left, PAD stays beyond the slots, and with row widths a
    batch decodes each row as it decodes alone."""
    from sgdd.sampling.maskgit import MaskGITSampler

    V = 12
    dec = perturbed_decoder(V, 4)
    cfg = make_cfg("absorbing", "loglinear", "maskgit", steps=6)
    cfg.sampling.pad_tail = 2
    for name, value in fields.items():
        setattr(cfg.sampling, name, value)
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    lengths = torch.tensor([9, 6, 3])
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    sampler = MaskGITSampler(cfg, token_counts=torch.arange(V, 0, -1))
    out = sampler.sample(dec, proc, z, lengths, 1.5)
    assert out.shape == (3, 11) and (out != MASK_ID).all()
    assert (out[torch.arange(11)[None].expand(3, -1) >= lengths[:, None]] == PAD_ID).all()
    for b in range(3):
        alone = sampler.sample(dec, proc, z[b : b + 1], lengths[b : b + 1], 1.5)
        assert torch.equal(out[b, : alone.shape[1]], alone[0]), b


# ---------------------------------------------------------------------------------------------------------
# sampling.time_grid


def test_time_grid_masked_is_uniform_in_the_masked_fraction():
    from sgdd.config import _CHOICES
    from sgdd.sampling.euler import TIME_GRIDS, time_grid

    assert set(TIME_GRIDS) == set(_CHOICES["sampling.time_grid"])

    proc = ScoreEntropyProcess(make_cfg("absorbing", "cosine"), vocab_size=8)
    K = 9
    uni, msk = time_grid(proc, K, "uniform"), time_grid(proc, K, "masked")
    assert len(msk) == K and msk[0] == 1.0 and msk[-1] == uni[-1]
    assert all(a > b for a, b in zip(msk[:-1], msk[1:], strict=True))
    frac = -torch.expm1(-proc.noise.total(torch.tensor(msk, dtype=torch.float64)))
    assert torch.allclose(frac.diff(), frac.diff().mean().expand(K - 1), rtol=1e-6)
    # cosine noise on a uniform t grid unmasks more in the first step than in the last; the masked grid does not
    frac_uni = -torch.expm1(-proc.noise.total(torch.tensor(uni, dtype=torch.float64)))
    assert -frac_uni.diff()[0] > 3 * -frac_uni.diff()[-1]
    # loglinear noise: the masked fraction is linear in t, so the grids agree
    ll = ScoreEntropyProcess(make_cfg("absorbing", "loglinear"), vocab_size=8)
    assert torch.allclose(torch.tensor(time_grid(ll, K, "masked")), torch.tensor(time_grid(ll, K, "uniform")))
    assert time_grid(proc, 1, "masked") == time_grid(proc, 1, "uniform")
    with pytest.raises(ConfigError, match="time_grid"):
        time_grid(proc, K, "log")
    with pytest.raises(ConfigError, match="uniform, masked"):
        config_from_dict({"sampling": {"time_grid": "log"}})


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_time_grid_masked_decodes(sampler):
    """Exact scores still reconstruct a point mass on the masked grid (cosine noise); under loglinear noise the
    masked grid decodes exactly as the uniform one (same seed, same outputs)."""
    V, L, n = 10, 8, 5
    gen = torch.Generator().manual_seed(2)
    targets = random_targets(n, L, V, gen)
    z = torch.zeros(n, 3)
    z[:, 0] = torch.arange(n)
    cfg = make_cfg("absorbing", "cosine", sampler, 6, greedy=False)
    cfg.sampling.time_grid = "masked"
    proc = ScoreEntropyProcess(cfg, vocab_size=V)
    x = build_sampler(cfg).sample(Oracle(targets, proc, V), proc, z, torch.full((n,), L), 1.0, gen)
    assert torch.equal(x, targets)
    outs = []
    for grid in ("uniform", "masked"):
        cfg = make_cfg("absorbing", "loglinear", sampler, 6, greedy=False)
        cfg.sampling.time_grid = grid
        proc = ScoreEntropyProcess(cfg, vocab_size=V)
        z_rand = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        x = build_sampler(cfg).sample(RandomModel(V, L), proc, z_rand, torch.tensor([8, 5, 3]), 1.5,
                                      torch.Generator().manual_seed(4))
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
