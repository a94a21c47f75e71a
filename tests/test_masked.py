"""Schedules and the masked diffusion process: corruption statistics, loss semantics, clean logits."""

import dataclasses
import math
import time

import pytest
import torch

import sgdd.diffusion.masked  # noqa: F401  (registers "masked")
import sgdd.diffusion.schedules  # noqa: F401
from sgdd.config import _CHOICES, Config, ModelConfig
from sgdd.diffusion.base import PROCESSES, SCHEDULES
from sgdd.diffusion.masked import MASK_ID, MaskedProcess, stratified_times
from sgdd.diffusion.schedules import build_schedule

V = 12


def make_process(schedule="cosine", weighting="elbo", eps=1e-3) -> MaskedProcess:
    cfg = Config()
    cfg.diffusion = dataclasses.replace(cfg.diffusion, schedule=schedule, loss_weighting=weighting, eps=eps)
    return PROCESSES.get("masked")(cfg)


class TableModel(torch.nn.Module):
    """Logits from a learnable (B, L, V) table, ignoring x_t; records what it was called with."""

    def __init__(self, B, L, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(B, L, V, generator=g))
        self.calls = []

    def forward(self, x_t, t, z, uncond=None, select=None, columns=None, target=None):
        self.calls.append((x_t.clone(), t.clone(), None if select is None else select.clone()))
        out = self.table if select is None else self.table[select]
        if columns is not None:  # the Decoder's sampled-softmax contract
            out = torch.cat([out[:, columns], out.gather(1, target[:, None])], dim=1)
        return out


def clean_batch(B=6, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(3, V, (B, L), generator=g)
    x0[:, 6] = 2  # EOS
    x0[:, 7:] = 0  # PAD
    return x0


# ---------------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("name", ["cosine", "loglinear", "sine"])
def test_schedule_endpoints_inverse_and_weight(name):
    s = build_schedule(name)
    assert float(s.alpha(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(s.alpha(torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-6)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64).requires_grad_(True)
    alpha = s.alpha(t)
    (dalpha,) = torch.autograd.grad(alpha.sum(), t)
    assert torch.allclose(s.inverse(alpha.detach()), t.detach(), atol=1e-6)
    w = s.weight(t.detach())
    assert (w > 0).all()
    assert torch.allclose(w, -dalpha / (1 - alpha.detach()), rtol=1e-5)
    # finite, large near t = 0
    w0 = s.weight(torch.tensor([0.0, 1e-6]))
    assert torch.isfinite(w0).all() and (w0 > 1e3).all()


def test_registries_hold_the_configured_names():
    assert set(SCHEDULES.names()) == set(_CHOICES["diffusion.schedule"])
    assert PROCESSES.get("masked") is MaskedProcess
    assert make_process().mask_id == MASK_ID == 1


def test_stratified_times_cover_every_stratum():
    t = stratified_times(8, 0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.sort((t * 8).floor()).values, torch.arange(8.0))
    t = stratified_times(64, 1e-3)
    assert t.min() >= 1e-3 and t.max() <= 1.0


# ---------------------------------------------------------------------------------------------------------
# corruption


@pytest.mark.parametrize("schedule", ["cosine", "loglinear", "sine"])
def test_masking_ratio_matches_the_schedule(schedule):
    p = make_process(schedule)
    x0 = torch.randint(0, V, (4, 20000))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    x_t, masked = p.corrupt(x0, t, torch.Generator().manual_seed(0))
    expected = 1 - p.schedule.alpha(t)
    # binomial std at n = 20000 is below 0.0036
    assert torch.allclose(masked.float().mean(1), expected, atol=0.015)
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], MASK_ID))
    assert torch.equal(x_t[~masked], x0[~masked])


def test_padding_and_eos_are_masked_and_predicted():
    p = make_process()
    x0 = clean_batch(B=64)
    model = TableModel(64, 9)
    p.loss(model, x0, torch.zeros(64, 4))
    x_t, _, select = model.calls[0]
    assert select[:, 7:].any() and select[:, 6].any()  # PAD and EOS positions get masked
    assert torch.equal(select, x_t == MASK_ID)


# ---------------------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_loss_ignores_unmasked_positions(weighting):
    p = make_process(weighting=weighting)
    x0 = clean_batch()
    model = TableModel(*x0.shape)
    torch.manual_seed(5)
    loss, _ = p.loss(model, x0, torch.zeros(6, 4))
    loss.backward()
    select = model.calls[0][2]
    grad_rows = model.table.grad.abs().sum(-1) > 0  # (B, L)
    assert not grad_rows[~select].any()
    assert grad_rows[select].all()
    # changing logits at unmasked positions does not change the loss
    with torch.no_grad():
        model.table[~select] = torch.randn_like(model.table[~select]) * 10
    torch.manual_seed(5)
    loss2, _ = p.loss(model, x0, torch.zeros(6, 4))
    assert torch.equal(loss, loss2)


def test_elbo_and_uniform_losses_match_their_formulas():
    x0 = clean_batch()
    B, L = x0.shape
    for weighting in ("elbo", "uniform"):
        p = make_process(weighting=weighting)
        model = TableModel(B, L)
        torch.manual_seed(11)
        loss, metrics = p.loss(model, x0, torch.zeros(B, 4))
        torch.manual_seed(11)
        t = stratified_times(B, p.eps)
        masked = torch.rand(B, L) < (1 - p.schedule.alpha(t))[:, None]
        logp = torch.log_softmax(model.table.detach().index_fill(-1, torch.tensor([MASK_ID]), -1e9), -1)
        ce = -logp.gather(-1, x0[..., None])[..., 0] * masked  # (B, L)
        if weighting == "elbo":
            expected = (p.schedule.weight(t) * ce.sum(1) / L).mean()
        else:
            expected = ce.sum() / masked.sum()
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
        assert metrics["ce"] == pytest.approx(float(ce.sum() / masked.sum()), rel=1e-5)
        assert metrics["nll"] == pytest.approx(float((p.schedule.weight(t) * ce.sum(1) / L).mean()), rel=1e-5)
        assert 0 <= metrics["acc"] <= 1 and metrics["mask_frac"] == pytest.approx(
            float(masked.float().mean())
        )


def test_model_time_is_the_time_of_the_realised_mask_ratio():
    p = make_process()
    x0 = clean_batch()
    model = TableModel(*x0.shape)
    p.loss(model, x0, torch.zeros(6, 4))
    x_t, t, select = model.calls[0]
    ratio = select.float().mean(1)
    assert torch.allclose(t, p.schedule.inverse(1 - ratio))


def test_no_masked_position_gives_a_finite_loss_with_a_graph():
    for weighting in ("elbo", "uniform"):
        p = make_process(weighting=weighting, eps=1e-7)
        p.schedule.mask_prob = lambda t: torch.zeros_like(t)  # nothing is ever masked
        x0 = clean_batch()
        model = TableModel(*x0.shape)
        loss, metrics = p.loss(model, x0, torch.zeros(6, 4))
        assert float(loss.detach()) == 0.0 and math.isfinite(metrics["nll"])
        loss.backward()


def test_clean_logits_maps_the_mask_ratio_to_time_and_excludes_mask():
    p = make_process()
    x0 = clean_batch(B=2)
    model = TableModel(2, 9)
    ratio = torch.tensor([1.0, 0.25])
    select = torch.zeros(2, 9, dtype=torch.bool)
    select[0, :3] = True
    out = p.clean_logits(model, x0, ratio, torch.zeros(2, 4), select=select)
    assert out.shape == (3, V) and out.dtype == torch.float32
    assert torch.isinf(out[:, MASK_ID]).all()
    assert torch.allclose(model.calls[0][1], torch.tensor([1.0, p.schedule.inverse(torch.tensor(0.75))]))


def test_nll_estimate_is_deterministic_and_positive():
    p = make_process()
    x0 = clean_batch()
    model = TableModel(*x0.shape)
    a = p.nll(model, x0, torch.zeros(6, 4), num_t=4)
    b = p.nll(model, x0, torch.zeros(6, 4), num_t=4)
    assert a.shape == (6,) and torch.equal(a, b) and (a > 0).all()


# ---------------------------------------------------------------------------------------------------------
# end to end: a tiny decoder memorises a few sentences from their latents


@pytest.fixture
def one_thread():
    """Tiny ops on 2 shared cores: a second OpenMP thread mostly waits for a descheduled peer."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_decoder_overfits_a_handful_of_sequences(one_thread):
    from sgdd.models import Decoder

    torch.manual_seed(0)
    B, L, Dz, Vocab = 8, 10, 8, 30
    x0 = torch.randint(3, Vocab, (B, L))
    lengths = torch.randint(5, L, (B,))
    pos = torch.arange(L)[None]
    x0 = torch.where(pos < lengths[:, None], x0, torch.zeros_like(x0))
    x0[torch.arange(B), lengths] = 2
    z = torch.randn(B, Dz)
    cfg = ModelConfig(init_from="scratch", num_layers=2, hidden_size=64, num_heads=4, latent_dim=Dz)
    dec = Decoder(cfg, Vocab, L)
    p = make_process()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-2, weight_decay=0.0)
    start = time.monotonic()
    for _ in range(250):
        loss, _ = p.loss(dec, x0, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # one-shot greedy reconstruction from all [MASK]
    dec.eval()
    with torch.no_grad():
        x_t = torch.full((B, L), MASK_ID)
        pred = p.clean_logits(dec, x_t, torch.ones(B), z).argmax(-1)
    acc = (pred == x0).float().mean()
    assert acc > 0.95, f"token accuracy {acc:.3f} after {time.monotonic() - start:.1f}s"


# ---------------------------------------------------------------------------------------------------------
# sampled softmax (diffusion.softmax_sample)


def sampled_process(K, weighting="elbo", counts=None) -> MaskedProcess:
    cfg = Config()
    cfg.diffusion = dataclasses.replace(cfg.diffusion, loss_weighting=weighting, softmax_sample=K)
    proc = PROCESSES.get("masked")(cfg)
    proc.set_token_counts(torch.arange(V) if counts is None else counts)
    return proc


def test_sampled_softmax_over_every_id_is_the_full_cross_entropy():
    """K >= V: nothing is drawn, the columns are the whole vocabulary but [MASK], so loss and gradient are exact."""
    x0 = clean_batch()
    t = torch.full((x0.shape[0],), 0.7)
    z = torch.zeros(x0.shape[0], 4)
    ces, grads = [], []
    for proc, sampled in ((make_process(), False), (sampled_process(V), True)):
        model = TableModel(*x0.shape)
        ce = proc._terms(model, x0, z, None, t, torch.Generator().manual_seed(5), sampled=sampled)[2]
        ce.sum().backward()
        ces.append(ce.detach())
        grads.append(model.table.grad)
    assert ces[0].shape == ces[1].shape and ces[0].numel() > 0
    assert torch.allclose(ces[0], ces[1], atol=1e-5)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


def test_sampled_softmax_normaliser_is_unbiased():
    """The columns' exp-sum (log-weights added), averaged over draws, is the normaliser over every id but [MASK]."""
    proc = sampled_process(4)  # 4 frequent ids (PAD, EOS and the two most counted), 2 of the other 7 drawn
    assert set(proc._frequent.tolist()) == {0, 2, V - 1, V - 2}
    assert MASK_ID not in proc._rest.tolist() and proc._rest.numel() == V - 1 - 4
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(4000):
        cols, logw = proc._sample_columns("cpu", g)
        assert cols.numel() == 6 and len(set(cols.tolist())) == 6
        draws.append(float(torch.exp(logits[cols] + logw).sum()))
    exact = float(torch.exp(logits[torch.arange(V) != MASK_ID]).sum())
    assert sum(draws) / len(draws) == pytest.approx(exact, rel=0.03)


def test_sampled_softmax_is_used_in_training_only_and_needs_counts():
    x0 = clean_batch()
    model = TableModel(*x0.shape)
    z = torch.zeros(x0.shape[0], 4)
    proc = sampled_process(3)
    loss, _ = proc.loss(model, x0, z)
    loss.backward()
    assert model.table.grad is not None and torch.isfinite(loss)
    with torch.no_grad():  # evaluation: the full vocabulary, exactly the unsampled process
        torch.manual_seed(9)
        a = proc.loss(model, x0, z)[0]
        torch.manual_seed(9)
        b = make_process().loss(model, x0, z)[0]
    assert float(a) == pytest.approx(float(b))
    cfg = Config()
    cfg.diffusion = dataclasses.replace(cfg.diffusion, softmax_sample=3)
    with pytest.raises(RuntimeError, match="set_token_counts"):
        PROCESSES.get("masked")(cfg).loss(model, x0, z)


class SelfCondModel(torch.nn.Module):
    """A self-conditioned stand-in: features are a function of x_t; records the sc each forward receives."""

    self_condition = True

    def __init__(self, B, L):
        super().__init__()
        self.table = TableModel(B, L)
        self.received = []

    def features(self, x_t, t, z, uncond=None, sc=None):
        return torch.stack([x_t.float(), t[:, None].expand_as(x_t).float()], dim=-1)  # (B, L, 2)

    def forward(self, x_t, t, z, uncond=None, select=None, columns=None, target=None, sc=None):
        self.received.append((x_t.clone(), t.clone(), None if sc is None else sc.clone()))
        return self.table(x_t, t, z, uncond=uncond, select=select, columns=columns, target=target)


def self_cond_process(prob):
    proc = make_process()
    proc.self_condition, proc.self_condition_prob = True, prob
    return proc


def test_self_condition_training_feeds_the_models_own_estimate_to_a_share_of_rows():
    x0 = clean_batch(B=64, L=9)
    z = torch.zeros(64, 2)
    model = SelfCondModel(64, 9)
    torch.manual_seed(0)
    self_cond_process(1.0).loss(model, x0, z)
    x_t, t, sc = model.received[-1]
    assert torch.equal(sc, model.features(x_t, t, z))  # every row: its own estimate at the same x_t, t
    torch.manual_seed(0)
    self_cond_process(0.5).loss(model, x0, z)
    x_t, t, sc = model.received[-1]
    picked = sc.flatten(1).abs().sum(dim=1) > 0
    assert 10 < int(picked.sum()) < 54  # about half the rows
    assert torch.equal(sc[picked], model.features(x_t, t, z)[picked])
    assert (sc[~picked] == 0).all()  # the others: no estimate, as at the first sampling step
    self_cond_process(0.0).loss(model, x0, z)
    assert model.received[-1][2] is None
    with torch.no_grad():  # validation: always the estimate (sampling has one after its first step)
        self_cond_process(0.0).loss(model, x0, z)
    x_t, t, sc = model.received[-1]
    assert torch.equal(sc, model.features(x_t, t, z))
    # a model without self-conditioning is never handed sc
    plain = TableModel(64, 9)
    self_cond_process(1.0).loss(plain, x0, z)


def test_self_condition_trains_its_input_map_with_a_real_decoder():
    from sgdd.models import Decoder

    cfg = ModelConfig(init_from="scratch", num_layers=1, hidden_size=32, num_heads=4, latent_dim=4,
                      bow_head=False, self_condition=True)
    dec = Decoder(cfg, V, 9)
    proc = self_cond_process(1.0)
    torch.manual_seed(0)
    loss, _ = proc.loss(dec, clean_batch(), torch.randn(6, 4))
    loss.backward()
    assert dec.sc_proj.weight.grad is not None and dec.sc_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# substitution noise (diffusion.substitute)


def substitute_process(p, weight=1.0, counts=None) -> MaskedProcess:
    cfg = Config()
    cfg.diffusion = dataclasses.replace(cfg.diffusion, substitute=p, substitute_weight=weight)
    proc = PROCESSES.get("masked")(cfg)
    if counts is None:  # only id 5 has a count: every unigram draw is 5
        counts = torch.zeros(V)
        counts[[0, 1, 2, 5]] = 100.0  # specials' counts are never drawn
    proc.set_token_counts(counts)
    return proc


class BowTableModel(TableModel):
    """TableModel with a bag-of-words head that puts all its mass on id 7."""

    bow_mlp = torch.nn.Identity()

    def bow_logits(self, z):
        out = torch.full((z.shape[0], V), -30.0)
        out[:, 7] = 30.0
        out[:, [0, 1, 2]] = 60.0  # specials: never drawn even when the head favours them
        return out


def _x0_without(ids, B=40, L=9, seed=0):
    """clean_batch-shaped rows whose tokens avoid `ids`, so a substituted position is recognisable."""
    x0 = clean_batch(B, L, seed)
    allowed = torch.tensor([i for i in range(3, V) if i not in ids])
    tokens = x0 >= 3
    x0[tokens] = allowed[torch.randint(len(allowed), (int(tokens.sum()),), generator=torch.Generator().manual_seed(1))]
    return x0


@pytest.mark.parametrize("bow", [False, True])
def test_substitution_replaces_visible_tokens_only_and_scores_them(bow):
    x0 = _x0_without({5, 7})
    model = (BowTableModel if bow else TableModel)(*x0.shape)
    proc = substitute_process(0.5)
    torch.manual_seed(0)
    proc.loss(model, x0, torch.zeros(x0.shape[0], 4))
    x_t, _, select = model.calls[0]
    masked = x_t == MASK_ID
    changed = ~masked & (x_t != x0)
    assert not (changed & (x0 == 0)).any()  # PAD never substituted
    visible_tokens = ~masked & (x0 != 0)
    share = float(changed.sum()) / float(visible_tokens.sum())
    assert 0.4 < share < 0.6
    drawn = set(x_t[changed].tolist())
    assert drawn == ({5, 7} if bow else {5})  # unigram (and bag-of-words) draws, never a special id
    # scored: every masked position, every substituted one, and some (not all) of the unchanged visible tokens
    assert select[masked].all() and select[changed].all()
    kept = visible_tokens & ~changed
    assert 0 < int((select & kept).sum()) < int(kept.sum())
    assert not (select & ~masked & (x0 == 0)).any()  # visible PAD is never scored


def test_substitution_adds_the_weighted_visible_cross_entropy():
    x0 = clean_batch(B=8)
    z = torch.zeros(x0.shape[0], 4)
    model = TableModel(*x0.shape)
    losses = {}
    for w in (0.0, 2.0):
        torch.manual_seed(3)
        loss, metrics = substitute_process(0.3, weight=w).loss(model, x0, z)
        losses[w] = float(loss.detach()), metrics
    (l0, m0), (l2, m2) = losses[0.0], losses[2.0]
    assert m2["ce"] == pytest.approx(m0["ce"])  # the same draw: the masked term is unchanged
    assert m0["visible_ce"] == pytest.approx(m2["visible_ce"]) and m2["visible_ce"] > 0
    assert l2 == pytest.approx(l0 + 2.0 * m2["visible_ce"], rel=1e-5)


def test_substitution_is_training_only_and_needs_counts():
    x0 = clean_batch()
    z = torch.zeros(x0.shape[0], 4)
    model = TableModel(*x0.shape)
    with torch.no_grad():  # validation: no substitution, the plain process's loss
        torch.manual_seed(9)
        a, metrics = substitute_process(0.5).loss(model, x0, z)
        torch.manual_seed(9)
        b = make_process().loss(model, x0, z)[0]
    assert float(a) == pytest.approx(float(b)) and "visible_ce" not in metrics
    x_t = model.calls[0][0]
    assert ((x_t == MASK_ID) | (x_t == x0)).all()
    cfg = Config()
    cfg.diffusion = dataclasses.replace(cfg.diffusion, substitute=0.2)
    with pytest.raises(RuntimeError, match="set_token_counts"):
        PROCESSES.get("masked")(cfg).loss(model, x0, z)
    with pytest.raises(ValueError, match="token counts"):
        PROCESSES.get("masked")(cfg).set_token_counts(None)
    cfg.diffusion = dataclasses.replace(cfg.diffusion, substitute=1.0)
    with pytest.raises(ValueError, match="substitute"):
        PROCESSES.get("masked")(cfg)


# ---------------------------------------------------------------------------------------------------------
# trained corrector (diffusion.corrector)


class PositionModel(torch.nn.Module):
    """Logits from a learnable (L, V) table shared by all rows (any batch size), ignoring x_t and z; records its
    calls; a hypothesis input that adds nothing (hypothesis_latent returns z)."""

    def __init__(self, L, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(L, V, generator=g))
        self.hyp_proj = torch.nn.Linear(3, 4)
        self.calls = []

    def hypothesis_latent(self, z, e_hyp):
        self.calls.append(("hyp", e_hyp.clone()))
        return z

    def forward(self, x_t, t, z, uncond=None, select=None, columns=None, target=None):
        self.calls.append((x_t.clone(), None if select is None else select.clone()))
        out = self.table.expand(x_t.shape[0], -1, -1)
        out = out if select is None else out[select]
        if columns is not None:
            out = torch.cat([out[:, columns], out.gather(1, target[:, None])], dim=1)
        return out


def corrector_process(q, weight=1.0) -> MaskedProcess:
    cfg = Config()
    cfg.diffusion = dataclasses.replace(cfg.diffusion, corrector=q, corrector_weight=weight)
    return PROCESSES.get("masked")(cfg)


def test_corrector_rows_fill_a_hypothesis_reembed_it_and_score_the_wrong_tokens():
    B, L = 64, 9
    x0 = clean_batch(1, L).repeat(B, 1)  # identical rows: whichever rows become corrector rows, x_0 is known
    model = PositionModel(L)
    proc = corrector_process(0.25)
    seen = []
    proc.set_hypothesis_encoder(lambda ids: (seen.append(ids.clone()), torch.ones(ids.shape[0], 3))[1])
    torch.manual_seed(0)
    loss, metrics = proc.loss(model, x0, torch.zeros(B, 4))
    assert torch.isfinite(loss) and metrics["corrector_ce"] > 0 and 0 <= metrics["hyp_acc"] <= 1
    (x_h, sel_h), (tag, e_hyp), (x_c, sel_c), (x_main, _) = model.calls
    n = B // 4
    assert tag == "hyp" and torch.equal(e_hyp, torch.ones(n, 3))
    assert x_h.shape[0] == x_c.shape[0] == n and x_main.shape[0] == B - n  # a quarter of the rows
    # the hypothesis: x_0 where the hypothesis pass saw it, the model's argmax (per position here) where masked
    hyp = seen[0]
    t = model.table.detach().clone()
    t[:, MASK_ID] = float("-inf")
    assert torch.equal(hyp, torch.where(sel_h, t.argmax(-1).expand_as(hyp), x0[:n]))
    assert torch.equal(sel_h, x_h == MASK_ID) and float(sel_h.float().mean()) > 0.5  # times in [1/2, 1]: ~63 %
    right = float(((hyp == x0[:n]) & (x0[:n] != 0)).sum()) / float((x0[:n] != 0).sum())
    assert metrics["hyp_acc"] == pytest.approx(right)
    # the corrector's input: the hypothesis partly re-masked (at most about half); scored: every masked and every
    # wrong visible position, some but not all of the right ones, never a position PAD in both
    masked = x_c == MASK_ID
    assert torch.equal(x_c[~masked], hyp[~masked]) and 0 < float(masked.float().mean()) < 0.5
    wrong = ~masked & (hyp != x0[:n])
    assert sel_c[masked].all() and sel_c[wrong].all()
    right_visible = ~masked & ~wrong & ((x0[:n] != 0) | (hyp != 0))
    assert 0 < int((sel_c & right_visible).sum()) < int(right_visible.sum())
    assert not (sel_c & ~masked & (x0[:n] == 0) & (hyp == 0)).any()


def test_corrector_loss_weight_training_only_and_needs_the_encoder():
    x0 = clean_batch(B=8)
    z = torch.zeros(8, 4)
    losses = {}
    for w in (0.0, 3.0):
        proc = corrector_process(0.5, weight=w)
        proc.set_hypothesis_encoder(lambda ids: torch.ones(ids.shape[0], 3))
        torch.manual_seed(4)
        loss, metrics = proc.loss(PositionModel(9), x0, z)
        losses[w] = float(loss.detach()), metrics
    (l0, m0), (l3, m3) = losses[0.0], losses[3.0]
    assert m0["corrector_ce"] == pytest.approx(m3["corrector_ce"]) and m3["corrector_ce"] > 0
    assert l3 == pytest.approx(l0 + 3.0 * m3["corrector_ce"], rel=1e-5)
    with torch.no_grad():  # validation: every row an ordinary row, no encoder needed
        torch.manual_seed(9)
        a, metrics = corrector_process(0.5).loss(PositionModel(9), x0, z)
        torch.manual_seed(9)
        b = make_process().loss(PositionModel(9), x0, z)[0]
    assert float(a) == pytest.approx(float(b)) and "corrector_ce" not in metrics
    with pytest.raises(RuntimeError, match="set_hypothesis_encoder"):
        corrector_process(0.5).loss(PositionModel(9), x0, z)
    with pytest.raises(ValueError, match="corrector"):
        corrector_process(1.0)


def test_corrector_trains_the_zero_initialised_hypothesis_map_of_a_real_decoder():
    from sgdd.models import Decoder

    cfg = ModelConfig(init_from="scratch", num_layers=1, hidden_size=32, num_heads=4, latent_dim=4, bow_head=False)
    assert Decoder(cfg, V, 9).hyp_proj is None
    dec = Decoder(cfg, V, 9, hypothesis_dim=3)
    z, e = torch.randn(6, 4), torch.randn(6, 3)
    assert torch.equal(dec.hypothesis_latent(z, e), z)  # zero map: a hypothesis changes nothing at step 0
    with torch.no_grad():  # zero AdaLN modulation would block every gradient into the condition: a trained decoder
        for block in dec.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    proc = corrector_process(0.5)
    proc.set_hypothesis_encoder(lambda ids: torch.randn(ids.shape[0], 3))
    torch.manual_seed(0)
    loss, _ = proc.loss(dec, clean_batch(), torch.randn(6, 4))
    loss.backward()
    assert dec.hyp_proj.weight.grad is not None and dec.hyp_proj.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="corrector: 0"):
        Decoder(cfg, V, 9).hypothesis_latent(z, e)
