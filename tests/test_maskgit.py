"""MaskGIT sampler with a fake model and a fake process (no dependency on the real decoder)."""

import math

import pytest
import torch
from conftest import perturbed_decoder, record_decoder_calls

from sgdd.config import _CHOICES, Config, validate_config
from sgdd.registry import ConfigError
from sgdd.sampling.base import SAMPLERS, exempt_ids, penalize_repeats, slot_width
from sgdd.sampling.maskgit import (
    UNMASK_SCHEDULES,
    MaskGITSampler,
    choose_tokens,
    duplicate_predictions,
    filter_logits,
    masked_count,
    ranks_in_rows,
    reuses_null_pass,
    sample_categorical,
    shortlist_ids,
)

PAD, MASK, EOS = 0, 1, 2
V = 12


def make_cfg(**sampling):
    cfg = Config()
    cfg.sampling.pad_tail = 0  # the tests below set exact slot shapes; test_pad_tail_* covers the tail
    for k, v in sampling.items():
        setattr(cfg.sampling, k, v)
    return cfg


class FakeProcess:
    mask_id = MASK
    pad_id = PAD

    def __init__(self):
        self.ratios = []

    def clean_logits(self, model, x_t, mask_ratio, z, uncond=None, select=None, **sc_kw):
        self.ratios.append(mask_ratio.clone())
        out = model(x_t, mask_ratio, z, uncond=uncond, select=select, **sc_kw)
        return (out[0].float(), out[1]) if sc_kw.get("return_features") else out.float()


class TargetModel:
    """Logits favouring target[b, l] with a margin that differs by position, so confidences are distinct;
    b is read from z[:, -1] (see rowz); ignores x_t. Counts calls and rows."""

    def __init__(self, target, margin=None, extra=None):
        self.target = target  # (B, Lmax)
        B, L = target.shape
        self.margin = (
            margin
            if margin is not None
            else 2.0 + torch.rand(B, L, generator=torch.Generator().manual_seed(3))
        )
        self.extra = extra  # optional (V,) added everywhere
        self.calls = []

    def __call__(self, x_t, t, z, uncond=None, select=None):
        B, L = x_t.shape
        self.calls.append(B)
        rows = z[:, -1].long()  # the row's index in the sampled batch (rowz): idle rows skip calls
        logits = torch.zeros(B, L, V)
        logits.scatter_(2, self.target[rows, :L, None], self.margin[rows, :L, None])
        if self.extra is not None:
            logits = logits + self.extra
        if uncond is not None:
            logits = torch.where(uncond[:, None, None], logits * 0.5, logits)
        return logits[select] if select is not None else logits


def rowz(B, D=2):
    """(B, D) latents whose last column is the row index, so TargetModel knows each row in a subset call."""
    z = torch.ones(B, D)
    z[:, -1] = torch.arange(B, dtype=torch.float32)
    return z


def _target(B=4, L=9, seed=0):
    return torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_registered():
    assert SAMPLERS.get("maskgit") is MaskGITSampler


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("K", [1, 3, 16])
def test_schedule_counts(schedule, K):
    n = torch.arange(1, 65)
    prev = n
    for k in range(1, K + 1):
        m = masked_count(n, k, K, schedule)
        assert (m <= prev).all() and (m >= 0).all()
        prev = m
    assert (masked_count(n, 0, K, schedule) == n).all()
    assert (masked_count(n, K, K, schedule) == 0).all()
    assert (masked_count(n, 1, K, schedule) <= n - 1).all()


def test_linear_schedule_equal_shares():
    # floor(n (K - k) / K) exactly, no float rounding: n = a multiple of K commits n / K every step
    K = 16
    for n in (16, 32, 48, 64):
        counts = [int(masked_count(torch.tensor([n]), k, K, "linear")) for k in range(K + 1)]
        assert counts == [n - k * n // K for k in range(K + 1)]
    n = torch.arange(1, 65)
    for k in range(K):
        assert (masked_count(n, k, K, "linear") == (n * (K - k)) // K).all()
    # cosine commits fewer than linear in the first step and more in the last
    n = torch.tensor([64])
    assert n - masked_count(n, 1, K) < n - masked_count(n, 1, K, "linear")
    assert masked_count(n, K - 1, K) > masked_count(n, K - 1, K, "linear")


def test_linear_schedule_in_the_sampler():
    target = _target(B=2, L=10)
    lengths = torch.tensor([10, 7])
    K = 5
    states = []
    MaskGITSampler(make_cfg(steps=K, unmask_schedule="linear")).sample(
        TargetModel(target), FakeProcess(), rowz(2), lengths, 1.0, callback=lambda k, x: states.append(x)
    )
    masked = [(x == MASK).sum(1).tolist() for x in states]
    assert masked == [[8, 5], [6, 4], [4, 2], [2, 1], [0, 0]]  # floor(n (K - k) / K) for n = 10, 7
    with pytest.raises(ConfigError, match="unmask_schedule must be one of"):
        MaskGITSampler(make_cfg(unmask_schedule="sine"))
    # the config check names the same choices, so a bad value fails when the config is built
    assert set(UNMASK_SCHEDULES) == set(_CHOICES["sampling.unmask_schedule"])
    cfg = make_cfg(unmask_schedule="sine")
    with pytest.raises(ConfigError, match="unmask_schedule"):
        validate_config(cfg)


def test_ranks_in_rows():
    s = torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]])
    assert ranks_in_rows(s, descending=True).tolist() == [[2, 0, 1], [0, 2, 1]]
    assert ranks_in_rows(s, descending=False).tolist() == [[0, 2, 1], [2, 0, 1]]


@pytest.mark.parametrize("scale", [1.0, 1.5])
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_no_mask_left_exact_step_count_pad_kept(scale, steps):
    target = _target()
    lengths = torch.tensor([9, 1, 5, 7])
    model, process = TargetModel(target), FakeProcess()
    sampler = MaskGITSampler(make_cfg(steps=steps))
    x = sampler.sample(model, process, rowz(4), lengths, scale)
    assert x.shape == (4, 9) and x.dtype == torch.long
    assert not (x == MASK).any()
    # one call per step in which the schedule commits something in some row, with only those rows (x2 with CFG)
    prev = [lengths] + [masked_count(lengths, k, steps) for k in range(1, steps + 1)]
    active = [int((prev[k] > prev[k + 1]).sum()) for k in range(steps)]
    assert model.calls == [a * (1 if scale == 1.0 else 2) for a in active if a > 0]
    if steps == 16:
        assert sum(active) < 4 * steps  # the 1- and 5-token rows sit most steps out
    beyond = torch.arange(9)[None, :] >= lengths[:, None]
    assert (x[beyond] == PAD).all()
    assert (x[~beyond] != PAD).all()  # the fake model never favours PAD


def test_greedy_reproduces_the_favoured_sequence():
    target = _target(B=3, L=12, seed=5)
    target[0, 6] = EOS  # PAD and EOS are legitimate predictions
    target[0, 7:] = PAD
    lengths = torch.tensor([12, 12, 8])
    x = MaskGITSampler(make_cfg(steps=5)).sample(
        TargetModel(target), FakeProcess(), rowz(3), lengths, 1.5
    )
    assert torch.equal(x[:2], target[:2])
    assert torch.equal(x[2, :8], target[2, :8]) and (x[2, 8:] == PAD).all()


def test_schedule_followed_and_most_confident_first():
    target = _target(B=2, L=10)
    margin = torch.arange(20, dtype=torch.float).view(2, 10) / 4  # confidence grows with position
    lengths = torch.tensor([10, 7])
    states = []
    process = FakeProcess()
    K = 6
    MaskGITSampler(make_cfg(steps=K)).sample(
        TargetModel(target, margin),
        process,
        rowz(2),
        lengths,
        1.0,
        callback=lambda k, x: states.append((k, x)),
    )
    assert [k for k, _ in states] == list(range(1, K + 1))
    for k, x in states:
        assert ((x == MASK).sum(1) == masked_count(lengths, k, K)).all()
    # the first step commits the highest-confidence (rightmost valid) positions
    x1 = states[0][1]
    for b in range(2):
        committed = (x1[b, : lengths[b]] != MASK).nonzero().flatten().tolist()
        n = len(committed)
        assert n > 0 and committed == list(range(int(lengths[b]) - n, int(lengths[b])))
    # mask ratio seen by the process = fraction of the row's L positions still masked (PAD tail visible)
    assert torch.allclose(process.ratios[0], lengths.float() / 10)
    m1, m2 = masked_count(lengths, 1, K), masked_count(lengths, 2, K)
    assert torch.allclose(process.ratios[1], m1[m1 > m2].float() / 10)  # rows committing at step 2 only


def test_mask_is_never_predicted():
    target = torch.full((2, 6), MASK)
    extra = torch.zeros(V)
    extra[7] = 1.0  # second best everywhere
    x = MaskGITSampler(make_cfg(steps=3)).sample(
        TargetModel(target, extra=extra), FakeProcess(), rowz(2), torch.tensor([6, 4]), 2.0
    )
    assert not (x == MASK).any()
    assert (x[0] == 7).all() and (x[1, :4] == 7).all()


def test_batch_rows_are_independent():
    target = _target(B=3, L=8, seed=2)
    lengths = torch.tensor([8, 3, 6])
    cfg = make_cfg(steps=4)
    full = MaskGITSampler(cfg).sample(TargetModel(target), FakeProcess(), rowz(3), lengths, 1.0)
    for b in range(3):
        one = MaskGITSampler(cfg).sample(
            TargetModel(target[b : b + 1], TargetModel(target).margin[b : b + 1]),
            FakeProcess(),
            rowz(1),
            lengths[b : b + 1],
            1.0,
        )
        assert torch.equal(one[0], full[b, : lengths[b]])


@pytest.mark.parametrize("C", [1, 2, 11, 50])
def test_sample_categorical_matches_softmax(C):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(C, generator=g) * 2
    if C > 2:
        logits[1] = float("-inf")
    rows = logits.expand(40000, C).contiguous()
    ids, logp = sample_categorical(rows, generator=g)
    assert ids.min() >= 0 and ids.max() < C
    probs = logits.softmax(-1)
    freq = torch.bincount(ids, minlength=C).float() / len(ids)
    assert (freq - probs).abs().max() < 0.01
    if C > 2:
        assert not (ids == 1).any()
    torch.testing.assert_close(logp, logits.log_softmax(-1)[ids])


def test_top_k_and_top_p_restrict_the_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, V, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        ids, logconf = choose_tokens(logits, greedy=False, temperature=2.0, top_k=3, generator=g)
        assert (ids[:, None] == top3).any(dim=1).all()
        torch.testing.assert_close(logconf, logits.log_softmax(-1).gather(1, ids[:, None]).squeeze(1))
    # top-p: two tokens hold ~0.95 of the mass in every row
    peaked = torch.full((64, V), -5.0)
    peaked[:, 4] = 3.0
    peaked[:, 9] = 2.5
    probs = peaked.softmax(-1)
    assert (probs[:, 4] + probs[:, 9] > 0.9).all() and (probs[:, 4] < 0.9).all()
    values, _ = filter_logits(peaked, top_p=0.9)
    assert (values.isfinite().sum(-1) == 2).all()
    seen = set()
    for _ in range(5):
        ids, _ = choose_tokens(peaked, greedy=False, top_p=0.9, generator=g)
        seen |= set(ids.tolist())
    assert seen == {4, 9}
    # top_p so small that only the best token remains
    ids, _ = choose_tokens(peaked, greedy=False, top_p=0.01, generator=g)
    assert (ids == 4).all()


def test_sampling_through_the_sampler_respects_top_k():
    extra = torch.linspace(0, 1, V)  # token V-1 best, then V-2, ...
    target = torch.full((8, 6), V - 1)
    model = TargetModel(target, margin=torch.full((8, 6), 0.01), extra=extra)
    cfg = make_cfg(steps=4, greedy=False, temperature=5.0, top_k=2)
    x = MaskGITSampler(cfg).sample(
        model,
        FakeProcess(),
        rowz(8),
        torch.full((8,), 6),
        1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(x.flatten().tolist()) <= {V - 1, V - 2}
    assert len(set(x.flatten().tolist())) == 2


def test_seeded_sampling_with_gumbel_noise_is_reproducible():
    target = _target()
    lengths = torch.tensor([9, 4, 6, 2])
    cfg = make_cfg(steps=5, greedy=False, gumbel_noise=2.0, temperature=1.5)
    runs = [
        MaskGITSampler(cfg).sample(
            TargetModel(target),
            FakeProcess(),
            rowz(4),
            lengths,
            1.5,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not (runs[0] == MASK).any()


def test_remask_path_ends_without_mask_and_keeps_the_schedule():
    target = _target(B=3, L=16, seed=4)
    lengths = torch.tensor([16, 11, 5])
    K = 8
    states = []
    model = TargetModel(target)
    x = MaskGITSampler(make_cfg(steps=K, remask=0.3)).sample(
        model, FakeProcess(), rowz(3), lengths, 1.5, callback=lambda k, x: states.append(x)
    )
    assert not (x == MASK).any() and len(model.calls) == K
    for k, s in enumerate(states, start=1):
        assert ((s == MASK).sum(1) == masked_count(lengths, k, K)).all()
    # some committed token was masked again at a later step
    remasked = any(((a != MASK) & (b == MASK)).any() for a, b in zip(states, states[1:], strict=False))
    assert remasked
    assert torch.equal(x, torch.where(torch.arange(16)[None] < lengths[:, None], target, PAD))


def test_bad_settings_are_rejected():
    with pytest.raises(ConfigError):
        MaskGITSampler(make_cfg(remask=1.0))
    with pytest.raises(ConfigError):
        MaskGITSampler(make_cfg(top_p=0.0))
    with pytest.raises(ConfigError, match="repeat_penalty"):
        MaskGITSampler(make_cfg(repeat_penalty=-1.0))
    with pytest.raises(ConfigError, match="repeat_exempt"):
        MaskGITSampler(make_cfg(repeat_exempt=-1))

    class NoMask(FakeProcess):
        mask_id = None

    with pytest.raises(ConfigError):
        MaskGITSampler(make_cfg()).sample(
            TargetModel(_target()), NoMask(), rowz(4), torch.full((4,), 3), 1.0
        )


@pytest.mark.parametrize("C", [5, 1024, 1030, 20000])
def test_row_max_matches_torch(C):
    from sgdd.sampling.maskgit import row_max

    g = torch.Generator().manual_seed(C)
    x = torch.randn(37, C, generator=g)
    x[3, -1] = 100.0  # the maximum in the tail
    x[4, 0] = 100.0
    values, ids = row_max(x)
    ref_values, ref_ids = x.max(dim=-1)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


def test_with_the_real_masked_process():
    """MaskedProcess.clean_logits (time from the mask ratio, MASK excluded) drives the sampler end to end."""
    from sgdd.diffusion import build_process

    cfg = make_cfg(steps=4)
    process = build_process(cfg)
    assert process.mask_id == MASK and process.pad_id == PAD
    target = _target(B=3, L=7, seed=9)
    target[1, 3] = EOS
    target[1, 4:] = PAD
    seen_t = []

    class Recording(TargetModel):
        def __call__(self, x_t, t, z, uncond=None, select=None):
            seen_t.append(t.clone())
            return super().__call__(x_t, t, z, uncond=uncond, select=select)

    model = Recording(target, extra=torch.eye(V)[MASK] * 50)  # the raw model loves MASK
    lengths = torch.tensor([7, 7, 5])
    x = MaskGITSampler(cfg).sample(model, process, rowz(3), lengths, 1.5)
    assert len(model.calls) == 4 and model.calls == [6] * 4
    expected = torch.where(torch.arange(7)[None] < lengths[:, None], target, PAD)
    assert torch.equal(x, expected)
    # times fall as the sentence fills in; the null rows see the same time as their conditional rows
    assert all(torch.equal(t[:3], t[3:]) for t in seen_t)
    assert (seen_t[0][:3] > seen_t[-1][:3]).all()


def test_duplicate_predictions_keep_the_most_confident_copy():
    pred = torch.tensor([[5, 5, 7, 5, 0, 0], [4, 4, 4, 6, 6, 3]])
    mask = torch.tensor([[True, True, True, False, True, True], [True, True, True, True, True, True]])
    score = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.3], [0.2, 0.2, 0.1, 0.4, 0.8, 0.0]], dtype=torch.float64)
    dup = duplicate_predictions(pred, mask, score, exempt=PAD)
    # row 0: position 0 loses to 1 (position 3 is not masked); PAD (positions 4, 5) is exempt
    # row 1: tie between 0 and 1 -> the earlier wins; 2 loses; 3 loses to 4
    assert dup.tolist() == [[True, False, False, False, False, False], [False, True, True, True, False, False]]


def test_dedupe_commits_one_copy_of_a_token_per_step():
    """Four positions confidently predict token 5, four others weakly predict distinct tokens. Without dedupe a
    step commits several fives at once; with it, one five per step and the weaker positions fill the rest."""
    B, Lr, K = 2, 8, 4
    target = torch.tensor([5, 5, 5, 5, 6, 7, 8, 9]).expand(B, Lr)
    margin = torch.tensor([4.0, 4.1, 4.2, 4.3, 1.0, 1.1, 1.2, 1.3]).expand(B, Lr)
    for dedupe in (True, False):
        cfg = make_cfg(steps=K, cfg_scale=1.0, dedupe=dedupe)
        states = []
        out = SAMPLERS.get("maskgit")(cfg).sample(TargetModel(target, margin), FakeProcess(), rowz(B, 4),
                                                  torch.full((B,), Lr), 1.0,
                                                  callback=lambda k, x, acc=states: acc.append(x.clone()))
        assert torch.equal(out, target) and len(states) == K
        before = [torch.full((B, Lr), MASK)] + states[:-1]
        new_fives = [int(((s == 5) & (p == MASK)).sum(1).max()) for p, s in zip(before, states, strict=True)]
        if dedupe:
            assert new_fives == [1, 1, 1, 1]
        else:
            assert max(new_fives) > 1


def test_defer_end_commits_pad_and_eos_last():
    """Confident PAD / EOS predictions at the tail: by default they are committed first; with defer_end every
    content prediction is committed before them."""
    B, Lr, K = 1, 8, 4
    target = torch.tensor([[6, 7, 8, 9, EOS, PAD, PAD, PAD]])
    margin = torch.tensor([[1.0, 1.1, 1.2, 1.3, 5.0, 5.1, 5.2, 5.3]])
    for defer, content_first in ((False, False), (True, True)):
        states = []
        out = SAMPLERS.get("maskgit")(make_cfg(steps=K, cfg_scale=1.0, defer_end=defer)).sample(
            TargetModel(target, margin), FakeProcess(), rowz(B, 4), torch.full((B,), Lr), 1.0,
            callback=lambda k, x, acc=states: acc.append(x.clone()))
        assert torch.equal(out, target)
        first_end = next(i for i, x in enumerate(states) if ((x == EOS) | (x == PAD)).any())
        last_content = max(i for i, x in enumerate(states) if ((x >= 6) & (x != MASK)).sum() < 4) + 1
        assert (first_end >= last_content) == content_first


def test_position_penalty_decodes_left_to_right():
    """Confidence grows to the right: plain MaskGIT commits the right end first; a large position penalty
    commits exactly the schedule's count of leftmost masked positions at every step."""
    B, Lr, K = 1, 8, 4
    target = torch.tensor([[6, 7, 8, 9, 10, 11, EOS, PAD]])
    margin = torch.linspace(1.0, 3.0, Lr)[None, :]
    for penalty in (0.0, 100.0):
        states = []
        out = SAMPLERS.get("maskgit")(make_cfg(steps=K, cfg_scale=1.0, position_penalty=penalty)).sample(
            TargetModel(target, margin), FakeProcess(), rowz(B, 4), torch.full((B,), Lr), 1.0,
            callback=lambda k, x, acc=states: acc.append(x.clone()))
        assert torch.equal(out, target)
        for k, x in enumerate(states, start=1):
            done = (x != MASK)[0]
            n_done = int(done.sum())
            assert n_done == Lr - int(masked_count(torch.tensor([Lr]), k, K))
            expected = torch.arange(Lr) < n_done if penalty else torch.arange(Lr) >= Lr - n_done
            assert torch.equal(done, expected), (penalty, k, x)
    with pytest.raises(ConfigError, match="position_penalty"):
        MaskGITSampler(make_cfg(position_penalty=-1.0))


def test_exempt_ids_are_the_most_frequent_and_the_specials():
    counts = torch.tensor([0, 0, 50, 3, 90, 1, 7, 0, 0, 0, 0, 0])
    assert exempt_ids(V, counts, 2, (PAD, EOS)).nonzero().flatten().tolist() == [0, 2, 4]
    assert exempt_ids(V, None, 2, (PAD, EOS)).nonzero().flatten().tolist() == [0, 2]
    with pytest.raises(ValueError, match="13 entries"):
        exempt_ids(V, torch.ones(13), 2, (PAD,))


def test_penalize_repeats_lowers_each_visible_copy_once():
    x = torch.tensor([[5, MASK, 5, 4, MASK], [MASK, 6, EOS, PAD, PAD]])
    select = x == MASK  # row 0 positions 1 and 4, row 1 position 0
    logits = torch.zeros(3, V)
    exempt = torch.zeros(V, dtype=torch.bool)
    exempt[[PAD, EOS, 4]] = True
    out = penalize_repeats(logits.clone(), x, select, exempt, 1.5, MASK)
    expected = torch.zeros(3, V)
    expected[:2, 5] = -3.0  # two visible fives in row 0; 4 is exempt, MASK never counts
    expected[2, 6] = -1.5  # row 1: one six; EOS and PAD exempt
    assert torch.equal(out, expected)
    half = penalize_repeats(torch.zeros(3, V, dtype=torch.bfloat16), x, select, exempt, 1.5, MASK)
    assert half.dtype == torch.float32 and torch.equal(half, expected)


def test_repeat_penalty_stops_a_salient_word_filling_the_row():
    """Every position slightly prefers token 5 over its own target: plain MaskGIT writes 5 everywhere; with the
    penalty a committed 5 pushes the other positions to their own tokens, unless 5 is exempt as frequent."""
    B, Lr, K = 2, 6, 6
    target = torch.tensor([6, 7, 8, 9, 10, 11]).expand(B, Lr)
    extra = torch.zeros(V)
    extra[5] = 2.5  # beats each target's margin (2-3) only where the margin is below 2.5
    counts = torch.arange(V, dtype=torch.float64)  # 11 most frequent ... 5 is not among the top 3
    for penalty, top, most_fives in ((0.0, 0, Lr), (4.0, 3, 1), (4.0, 7, Lr)):
        cfg = make_cfg(steps=K, cfg_scale=1.0, repeat_penalty=penalty, repeat_exempt=top)
        model = TargetModel(target, torch.full((B, Lr), 2.0), extra)
        out = MaskGITSampler(cfg, token_counts=counts).sample(model, FakeProcess(), rowz(B, 4),
                                                              torch.full((B,), Lr), 1.0)
        fives = int((out == 5).sum(1).max())
        assert fives == most_fives, (penalty, top, out)
        if most_fives == 1:  # the rest are the positions' own targets
            assert ((out == target) | (out == 5)).all()


def test_repeat_penalty_without_counts_warns_and_spares_only_the_specials(caplog):
    sampler = MaskGITSampler(make_cfg(repeat_penalty=1.0, repeat_exempt=10))
    with caplog.at_level("WARNING", logger="sgdd"):
        exempt = sampler.exempt(V, PAD)
    assert "no training token counts" in caplog.text
    assert exempt.nonzero().flatten().tolist() == [PAD, EOS]


def test_pad_tail_adds_visible_pad_after_the_longest_slot():
    cfg = make_cfg(steps=4, pad_tail=6)
    cfg.data.max_length = 64
    lengths = torch.tensor([3, 5])
    proc = FakeProcess()
    x = MaskGITSampler(cfg).sample(TargetModel(_target(B=2, L=64)), proc, rowz(2), lengths, 1.0)
    assert x.shape == (2, 11)  # longest slot 5 + 6 tail positions
    assert (x[0, 3:] == PAD).all() and (x[1, 5:] == PAD).all()
    assert (x[0, :3] != PAD).all() and (x[1, :5] != PAD).all()
    # the time input counts the tail as visible: at the first step, all of a row's slot is masked
    assert torch.allclose(proc.ratios[0], torch.tensor([3 / 11, 5 / 11]))


def test_slot_width_caps_the_tail_at_max_length_and_defaults_to_pad_slack():
    cfg = make_cfg(pad_tail=6)
    cfg.data.max_length = 8
    assert slot_width(torch.tensor([3, 5]), cfg) == 8  # 5 + 6 capped at max_length
    assert slot_width(torch.tensor([10]), cfg) == 10  # never below the longest slot
    cfg.sampling.pad_tail = None
    cfg.data.max_length, cfg.data.pad_slack = 64, 12
    assert slot_width(torch.tensor([5]), cfg) == 5 + 12 + 4


class SelfCondTarget(TargetModel):
    """TargetModel with self-conditioning: returns (logits, features) where a row's features encode the call
    index, the row and whether it was a null pass; records every sc it receives."""

    self_condition = True

    def __init__(self, target):
        super().__init__(target)
        self.received = []  # (rows (b,), uncond (b,) | None, sc | None) per call

    def __call__(self, x_t, t, z, uncond=None, select=None, sc=None, return_features=False):
        logits = super().__call__(x_t, t, z, uncond=uncond, select=select)
        rows = z[:, -1].long()
        null = torch.zeros_like(rows) if uncond is None else uncond.long()
        self.received.append((rows.clone(), null.clone(), None if sc is None else sc.clone()))
        code = (len(self.calls) * 1000 + rows * 10 + null).float()  # (b,)
        feats = code[:, None, None].expand(x_t.shape[0], x_t.shape[1], 3).clone()
        return (logits, feats) if return_features else logits


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_self_conditioned_sampling_hands_each_row_its_last_estimate(scale):
    target = _target(B=4, L=9, seed=5)
    model = SelfCondTarget(target)
    lengths = torch.tensor([9, 2, 6, 9])  # short rows go idle at some steps
    x = MaskGITSampler(make_cfg(steps=6)).sample(model, FakeProcess(), rowz(4), lengths, scale)
    expected = torch.where(torch.arange(9)[None] < lengths[:, None], target, PAD)
    assert torch.equal(x, expected)
    assert model.received[0][2] is None  # the first call has no estimate
    last = {}  # (row, null) -> code of the features it last produced
    for call, (rows, null, sc) in enumerate(model.received, start=1):
        if sc is not None:
            got = sc[:, 0, 0]
            want = torch.tensor([float(last[(int(r), int(n))]) for r, n in zip(rows, null, strict=True)])
            assert torch.equal(got, want)
            assert (sc == sc[:, :1, :1]).all()
        for r, n in zip(rows, null, strict=True):
            last[(int(r), int(n))] = call * 1000 + int(r) * 10 + int(n)
    assert len(model.received) > 1
    if scale != 1.0:
        assert any(int(n.sum()) > 0 for _, n, _ in model.received)  # null passes keep their own estimates
    full = 4 if scale == 1.0 else 8  # rows per call without skipping (x2 with guidance)
    assert any(len(r) < full for r, _, _ in model.received)  # some calls skipped idle rows


def test_penalize_repeats_in_shortlist_columns():
    """With a shortlist the penalty lands on the column of each visible id in that row, if it has one."""
    x = torch.tensor([[5, 5, MASK, 7], [3, MASK, MASK, 4]])
    select = x == MASK
    column_of = torch.full((2, V), -1, dtype=torch.long)
    column_of[0, torch.tensor([0, 2, 5, 3])] = torch.arange(4)  # row 0's shortlist: ids 0, 2, 5, 3
    column_of[1, torch.tensor([0, 2, 4, 9])] = torch.arange(4)  # row 1's: ids 0, 2, 4, 9 (3 is absent)
    logits = torch.zeros(3, 4)
    out = penalize_repeats(logits, x, select, torch.zeros(V, dtype=torch.bool), 2.0, MASK, column_of)
    assert out[0].tolist() == [0.0, 0.0, -4.0, 0.0]  # id 5 visible twice in row 0; 7 is not in its shortlist
    assert out[1].tolist() == [0.0, 0.0, -2.0, 0.0] and out[2].tolist() == [0.0, 0.0, -2.0, 0.0]


def test_shortlist_ids_are_frequent_first_then_the_rows_best_bag_of_words_ids():
    counts = torch.arange(V, 0, -1).float()  # id 0 most frequent ... id V-1 least
    bow = torch.zeros(2, V)
    bow[0, 9], bow[0, 3], bow[1, 11] = 5.0, 4.0, 6.0
    bow[:, MASK] = 100.0  # never picked
    shared, own = shortlist_ids(bow, counts, 4, 2, (PAD, EOS), MASK)
    assert shared.tolist() == [0, 2, 3, 4]  # PAD, EOS first, MASK skipped
    assert own.shape == (2, 2) and own[0, 0] == 9 and own[1, 0] == 11
    assert 3 not in own[0].tolist()  # 3 (row 0's second best) is shared already: no id appears twice
    assert MASK not in own.flatten().tolist()
    shared, _ = shortlist_ids(bow, None, 4, 2, (PAD, EOS), MASK)
    assert shared.tolist() == [PAD, EOS]


class BowTarget(TargetModel):
    """TargetModel with a bag-of-words head and the Decoder's shortlist contract."""

    vocab_size = V
    bow_mlp = True

    def __init__(self, target, bow):
        super().__init__(target)
        self.bow = bow  # (B, V) indexed by the row code in z

    def bow_logits(self, z):
        return self.bow[z[:, -1].long()]

    def __call__(self, x_t, t, z, uncond=None, select=None, shortlist=None):
        full = super().__call__(x_t, t, z, uncond=uncond, select=select)  # (N, V)
        if shortlist is None:
            return full
        shared, own = shortlist
        cols = torch.cat([shared[None].expand(x_t.shape[0], -1), own], dim=1)[select.nonzero()[:, 0]]
        return full.gather(1, cols)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_shortlist_decoding_equals_full_decoding_when_the_targets_are_listed(scale):
    target = _target(B=3, L=8, seed=4)
    bow = torch.zeros(3, V)
    bow.scatter_(1, target, 1.0)  # each row's bag of words holds its target ids
    counts = torch.arange(V, 0, -1).float()
    lengths = torch.tensor([8, 5, 7])
    full = MaskGITSampler(make_cfg(steps=4, repeat_penalty=1.0, repeat_exempt=2), counts).sample(
        BowTarget(target, bow), FakeProcess(), rowz(3), lengths, scale)
    short = MaskGITSampler(
        make_cfg(steps=4, repeat_penalty=1.0, repeat_exempt=2, shortlist=V - 3, shortlist_frequent=2), counts
    ).sample(BowTarget(target, bow), FakeProcess(), rowz(3), lengths, scale)
    assert torch.equal(short, full)
    # a shortlist too small to hold a row's target ids cannot write them
    tiny = MaskGITSampler(make_cfg(steps=4, shortlist=1, shortlist_frequent=2), counts).sample(
        BowTarget(target, bow), FakeProcess(), rowz(3), lengths, scale)
    for i in range(3):
        allowed = {PAD, EOS} | set(shortlist_ids(bow, counts, 2, 1, (PAD, EOS), MASK)[1][i].tolist())
        assert set(tiny[i].tolist()) <= allowed


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_kv_refresh_reuses_keys_and_values_of_unchanged_positions(scale):
    """A real (tiny, perturbed) decoder: kv_refresh 1 (a full pass every step) decodes exactly as without reuse;
    kv_refresh 3 runs only the stale positions between full passes and still ends with no MASK, PAD kept."""
    from sgdd.diffusion import build_process

    dec = _perturbed_decoder()
    process = build_process(make_cfg())
    calls = []
    forward = dec.forward

    def recording(*args, kv=None, **kw):
        if kv is not None:
            calls.append(None if kv.cache is None else kv.positions.shape[1])
        return forward(*args, kv=kv, **kw)

    dec.forward = recording
    lengths = torch.tensor([9, 6, 3])
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    plain = MaskGITSampler(make_cfg(steps=6)).sample(dec, process, z, lengths, scale)
    assert calls == []
    every = MaskGITSampler(make_cfg(steps=6, kv_refresh=1)).sample(dec, process, z, lengths, scale)
    assert torch.equal(every, plain) and calls and all(c is None for c in calls)
    calls.clear()
    reused = MaskGITSampler(make_cfg(steps=6, kv_refresh=3)).sample(dec, process, z, lengths, scale)
    assert calls[0] is None and calls[3] is None  # full passes at steps 1 and 4
    partial = [c for c in calls if c is not None]
    assert partial and max(partial) < 9  # the other calls ran fewer positions than the row
    assert (reused != MASK).all()
    assert (reused[torch.arange(9)[None].expand(3, -1) >= lengths[:, None]] == PAD).all()


@pytest.mark.parametrize("extra", [{}, {"kv_refresh": 3}, {"kv_refresh": 3, "guidance_refresh": 2},
                                   {"correct": 1, "correct_frac": 0.3}])
def test_row_widths_decode_each_row_as_if_it_were_alone(extra):
    """sampling.row_widths: a batch of rows of different lengths decodes each row exactly as it decodes alone (its
    own PAD tail, mask fraction and attention), with and without key / value and null-pass reuse and correction."""
    from sgdd.diffusion import build_process

    dec = _perturbed_decoder()
    process = build_process(make_cfg())
    cfg = make_cfg(steps=6, pad_tail=3, **extra)
    lengths = torch.tensor([9, 6, 3, 6])
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    sampler = MaskGITSampler(cfg)
    assert torch.equal(sampler.row_widths(dec, lengths), torch.tensor([12, 9, 6, 9]))
    batch = sampler.sample(dec, process, z, lengths, 1.5)
    assert batch.shape == (4, 12)
    for b in range(4):
        alone = sampler.sample(dec, process, z[b : b + 1], lengths[b : b + 1], 1.5)
        assert alone.shape == (1, int(lengths[b]) + 3)
        assert torch.equal(batch[b, : alone.shape[1]], alone[0]), b
        assert (batch[b, alone.shape[1] :] == PAD).all()
    # off, or a model that does not take widths: every row as wide as the batch
    assert MaskGITSampler(make_cfg(steps=6, pad_tail=3, row_widths=False)).row_widths(dec, lengths) is None
    assert sampler.row_widths(TargetModel(_target()), lengths) is None
    assert sampler.row_widths(dec, torch.tensor([5, 5])) is None  # all rows as wide as the batch


@pytest.mark.parametrize("field", ["z_positions", "self_condition"])
def test_kv_refresh_falls_back_with_a_warning_for_decoders_that_cannot_reuse(caplog, field):
    from sgdd.config import ModelConfig
    from sgdd.diffusion import build_process
    from sgdd.models import Decoder

    torch.manual_seed(0)
    mc = ModelConfig(init_from="scratch", num_layers=1, hidden_size=32, num_heads=4, latent_dim=2,
                     **{field: True})
    dec = Decoder(mc, V, 16).eval()
    assert not dec.supports_kv
    process = build_process(make_cfg())
    z, lengths = torch.randn(2, 2), torch.tensor([5, 3])
    plain = MaskGITSampler(make_cfg(steps=4)).sample(dec, process, z, lengths, 1.5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sgdd"):
        reused = MaskGITSampler(make_cfg(steps=4, kv_refresh=2)).sample(dec, process, z, lengths, 1.5)
    assert torch.equal(reused, plain)
    assert "cannot reuse keys / values" in caplog.text


# null-pass reuse (sampling.guidance_refresh)


def _perturbed_decoder(layers=2):
    return perturbed_decoder(V, 2, layers)


@pytest.mark.parametrize("extra", [{"guidance_refresh": 3}, {"guidance_refresh": 3, "kv_refresh": 3}, {}])
def test_first_null_pass_runs_once_per_length(extra):
    """The null pass of the first step sees the same all-[MASK] rows for every row of one length (and width):
    the decoder runs one of them per length (Decoder.share_null_rows), and the decoded ids are those of running
    every row."""
    from sgdd.diffusion import build_process

    dec = _perturbed_decoder()
    process = build_process(make_cfg())
    lengths = torch.tensor([9, 6, 9, 3, 6, 9])
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    cfg = make_cfg(steps=6, pad_tail=3, **extra)
    ran = []
    dispatch = dec._dispatch_hidden

    def counting(x_t, t, z, uncond, *args):
        ran.append((x_t.shape[0], None if uncond is None else int(uncond.sum())))
        return dispatch(x_t, t, z, uncond, *args)

    dec._dispatch_hidden = counting
    out = {}
    for share in (True, False):
        dec.share_null_rows = share
        ran.clear()
        out[share] = MaskGITSampler(cfg).sample(dec, process, z, lengths, 1.5)
        first = ran[0]
        if extra.get("guidance_refresh"):  # the conditional pass, then the null pass on its own
            assert ran[1] == ((3, 3) if share else (6, 6)), ran[:2]
        else:  # exact guidance: one call of conditional + null rows (2B), the null half shares
            assert first == ((6 + 3, 3) if share else (12, 6)), first
    assert torch.equal(out[True], out[False])


def test_guidance_refresh_1_decodes_exactly_as_guidance_at_every_step():
    from sgdd.diffusion import build_process

    dec = _perturbed_decoder()
    process = build_process(make_cfg())
    lengths = torch.tensor([9, 6, 3])
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    # with key / value reuse only at kv_refresh 1 (full passes): a reused null pass runs without the cache, so at
    # kv_refresh > 1 it is exact where guidance at every step reuses keys / values for both passes
    for extra in ({}, {"kv_refresh": 1}):
        exact = MaskGITSampler(make_cfg(steps=6, **extra)).sample(dec, process, z, lengths, 1.5)
        every = MaskGITSampler(make_cfg(steps=6, guidance_refresh=1, **extra)).sample(dec, process, z, lengths, 1.5)
        assert torch.equal(every, exact), extra


def test_guidance_refresh_runs_the_null_pass_only_at_refresh_steps():
    from sgdd.diffusion import build_process

    dec = _perturbed_decoder()
    calls = record_decoder_calls(dec)
    process = build_process(make_cfg())
    lengths = torch.tensor([9, 7, 8])
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    out = MaskGITSampler(make_cfg(steps=6, guidance_refresh=3)).sample(dec, process, z, lengths, 2.0)
    # every row commits at every step (lengths >= steps): 6 conditional calls + null passes at steps 1 and 4
    assert [null for null, _ in calls].count(True) == 2 and len(calls) == 8
    assert (out != MASK).all()
    assert (out[torch.arange(9)[None].expand(3, -1) >= lengths[:, None]] == PAD).all()
    # at scale 1 there is no null pass at all, with or without the option
    calls.clear()
    MaskGITSampler(make_cfg(steps=6, guidance_refresh=3)).sample(dec, process, z, lengths, 1.0)
    assert not any(null for null, _ in calls) and len(calls) == 6


def test_reuses_null_pass_says_what_the_sampler_does():
    from sgdd.diffusion import build_process
    from sgdd.sampling.guidance import guidance_passes, guided

    for scale in (0.0, 1.0, 1.5, 3.0):  # the pass count guided() wraps the model with
        assert guidance_passes(scale) == guided(lambda *a, **k: None, scale).passes
    dec = _perturbed_decoder()
    calls = record_decoder_calls(dec)
    process = build_process(make_cfg())
    lengths = torch.tensor([9, 7, 8])
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    # reuse on: fewer null passes than steps; off (no guidance, or G = 0): none, or one at every step
    for g, scale, reuses in ((3, 2.0, True), (3, 1.0, False), (3, 0.0, False), (0, 2.0, False)):
        calls.clear()
        cfg = make_cfg(steps=6, guidance_refresh=g)
        MaskGITSampler(cfg).sample(dec, process, z, lengths, scale)
        assert reuses_null_pass(cfg.sampling, scale) is reuses, (g, scale)
        nulls = sum(null for null, _ in calls)
        assert (0 < nulls < 6) is reuses, (g, scale, nulls)
    assert not reuses_null_pass(make_cfg(guidance_refresh=3).sampling, 2.0, self_condition=True)


def test_null_reuse_adds_the_kept_guidance_direction_of_each_position():
    from sgdd.sampling.maskgit import NullReuse

    B, L, C = 2, 4, 5
    reuse = NullReuse(refresh=3, scale=2.0, B=B, L=L, device="cpu")
    x = torch.full((B, L), MASK)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    x[~mask] = 7
    null1 = torch.arange(5 * C, dtype=torch.float32).view(5, C)
    cond1 = torch.ones(5, C)
    out1 = reuse.guide(1, cond1.clone(), lambda: null1, x, mask, MASK, forbid=None)
    assert torch.allclose(out1, null1 + 2.0 * (cond1 - null1)) and reuse.null_passes == 1  # exact at refresh
    # step 2: position (0, 1) was committed, row 1 is idle; only (0, 0) and (0, 2) run
    x[0, 1] = 9
    mask2 = torch.tensor([[True, False, True, False], [False, False, False, False]])
    cond2 = torch.full((2, C), -1.0)

    def must_not_run():
        raise AssertionError("the null pass ran at a reuse step")

    out2 = reuse.guide(2, cond2.clone(), must_not_run, x, mask2, MASK, forbid=None)
    kept = (cond1 - null1)[[0, 2]]  # the directions of (0, 0) and (0, 2) at step 1
    assert torch.allclose(out2, cond2 + (2.0 - 1.0) * kept)
    # step 4 refreshes: row 0 runs, idle row 1 keeps its step-1 entries for a later step
    x[0, 0] = 5
    mask4 = torch.tensor([[False, False, True, False], [False, False, False, False]])
    null4 = torch.full((1, C), 100.0)
    reuse.guide(4, torch.zeros(1, C), lambda: null4, x, mask4, MASK, forbid=None)
    assert reuse.null_passes == 2
    mask5 = torch.tensor([[False, False, False, False], [True, True, False, False]])
    out5 = reuse.guide(5, torch.zeros(2, C), must_not_run, x, mask5, MASK, forbid=None)
    assert torch.allclose(out5, (cond1 - null1)[[3, 4]])  # 0 + (2 - 1) * row 1's step-1 directions
    # a masked position with no kept entry (re-masked) makes the step run the null pass; forbid stays -inf
    x[0, 1] = MASK
    mask6 = torch.tensor([[False, True, True, False], [False, False, False, False]])
    null6 = torch.zeros(2, C)
    null6[:, 1] = -math.inf
    cond6 = torch.zeros(2, C)
    cond6[:, 1] = -math.inf
    out6 = reuse.guide(6, cond6, lambda: null6, x, mask6, MASK, forbid=1)
    assert reuse.null_passes == 3 and torch.isneginf(out6[:, 1]).all() and not out6.isnan().any()


def test_guidance_refresh_is_validated():
    from sgdd.config import validate_config

    cfg = Config()
    cfg.sampling.guidance_refresh = -1
    with pytest.raises(ConfigError, match="guidance_refresh must be >= 0"):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------------------------
# self-correction (sampling.correct)


def test_correction_remasks_the_least_likely_token_and_refills_it():
    """TargetModel's probability of a visible token is low where it differs from the target: each round fixes
    the row's worst token (frac small: one per row); positions outside `decoded` are never touched."""
    B, L = 3, 9
    target = _target(B, L, seed=5)
    x = target.clone()
    x[0, 3] = (target[0, 3] - 3 + 1) % (V - 3) + 3  # a wrong token
    x[0, 6] = (target[0, 6] - 3 + 1) % (V - 3) + 3  # a second one in the same row
    x[1, 5] = (target[1, 5] - 3 + 1) % (V - 3) + 3
    decoded = torch.ones(B, L, dtype=torch.bool)
    sampler = MaskGITSampler(make_cfg())
    model = TargetModel(target)
    one = sampler.correct(model, FakeProcess(), rowz(B), x, decoded, 1.0, rounds=1, frac=0.01)
    assert len(model.calls) == 2  # one scoring pass, one refill step
    assert torch.equal(one[1:], target[1:])  # row 1's only error fixed, row 2 unchanged
    assert int((one[0] != target[0]).sum()) == 1  # one of row 0's two errors left
    two = sampler.correct(TargetModel(target), FakeProcess(), rowz(B), x, decoded, 1.0, rounds=2, frac=0.01)
    assert torch.equal(two, target)
    decoded[0, 3] = False  # not this call's to decode: kept as is
    kept = sampler.correct(TargetModel(target), FakeProcess(), rowz(B), x, decoded, 1.0, rounds=3, frac=0.01)
    assert kept[0, 3] == x[0, 3] and torch.equal(kept[0, 4:], target[0, 4:]) and torch.equal(kept[1:], target[1:])


def test_sample_runs_the_configured_correction_rounds():
    target = _target(B=3, L=12, seed=6)
    lengths = torch.tensor([12, 8, 4])
    K = 6
    model = TargetModel(target)
    x = MaskGITSampler(make_cfg(steps=K, correct=2, correct_frac=0.2)).sample(
        model, FakeProcess(), rowz(3), lengths, 1.0)
    assert len(model.calls) == K + 2 * 2
    assert torch.equal(x, torch.where(torch.arange(12)[None] < lengths[:, None], target, PAD))
    for bad in ({"correct": -1}, {"correct_frac": 0.0}, {"correct_frac": 1.0}):
        with pytest.raises(ConfigError, match="correct"):
            MaskGITSampler(make_cfg(**bad))


class HypTarget(TargetModel):
    """TargetModel with a hypothesis input: hypothesis_latent marks z's first column (the row index in the last
    column is kept); records the latents each call received."""

    hyp_proj = object()

    def __init__(self, target):
        super().__init__(target)
        self.latents = []

    def hypothesis_latent(self, z, e_hyp):
        out = z.clone()
        out[:, 0] = 100.0 + e_hyp[:, 0]
        return out

    def __call__(self, x_t, t, z, uncond=None, select=None):
        self.latents.append(z.clone())
        return super().__call__(x_t, t, z, uncond, select)


def test_correction_rounds_condition_on_each_rounds_reembedded_hypothesis():
    B, L = 2, 9
    target = _target(B, L, seed=5)
    x = target.clone()
    x[0, 3] = (target[0, 3] - 3 + 1) % (V - 3) + 3
    x[1, 5] = (target[1, 5] - 3 + 1) % (V - 3) + 3
    decoded = torch.ones(B, L, dtype=torch.bool)
    sampler = MaskGITSampler(make_cfg())
    hyps = []
    sampler.hypothesis_fn = lambda ids: (hyps.append(ids.clone()), torch.full((ids.shape[0], 3), float(len(hyps))))[1]
    model = HypTarget(target)
    out = sampler.correct(model, FakeProcess(), rowz(B), x, decoded, 1.0, rounds=2, frac=0.01)
    assert torch.equal(out, target)
    assert len(hyps) == 2 and torch.equal(hyps[0], x) and torch.equal(hyps[1], target)  # each round's hypothesis
    assert len(model.latents) == 4  # scoring + refill per round, each with that round's condition
    assert all((zz[:, 0] == 101.0).all() for zz in model.latents[:2])
    assert all((zz[:, 0] == 102.0).all() for zz in model.latents[2:])
    # a decoder without a hypothesis input ignores hypothesis_fn
    plain = TargetModel(target)
    sampler.correct(plain, FakeProcess(), rowz(B), x, decoded, 1.0, rounds=1, frac=0.01)
    assert len(hyps) == 2
