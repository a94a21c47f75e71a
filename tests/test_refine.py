"""Encoder-guided refinement: variants re-mask only the hypothesis' region, the hill climb never lowers the
cosine and reaches a fixed point a fake scorer prefers; MaskGIT can start from a partly decoded state; the API
path runs on a tiny checkpoint and never returns a worse-scoring text than its start."""

import pytest
import torch
import torch.nn.functional as F

from sgdd.config import Config, load_config
from sgdd.registry import ConfigError
from sgdd.sampling.maskgit import MaskGITSampler
from sgdd.sampling.refine import make_variants, refine, refine_region

PAD, MASK, EOS = 0, 1, 2


def test_region_covers_tokens_end_and_spare_positions():
    x = torch.tensor([[5, 6, EOS, PAD, PAD, PAD, PAD], [7, EOS, PAD, PAD, PAD, PAD, PAD]])
    region = refine_region(x, PAD, spare=2)
    assert region.tolist() == [[True] * 5 + [False] * 2, [True] * 4 + [False] * 3]


def test_variants_mask_only_inside_the_region_and_at_least_once():
    x = torch.tensor([[5, 6, 7, 8, EOS, PAD, PAD, PAD, PAD, PAD]])
    gen = torch.Generator().manual_seed(0)
    v = make_variants(x, 50, 0.3, MASK, PAD, spare=1, generator=gen)
    assert v.shape == (50, 10)
    masked = v == MASK
    assert masked.any(dim=1).all()
    assert not masked[:, 6:].any()  # beyond EOS + 1 spare
    assert torch.equal(torch.where(masked, x.expand(50, -1), v), x.expand(50, -1))  # the rest is untouched
    frac = masked[:, :6].float().mean()
    assert 0.2 < frac < 0.45
    tiny = make_variants(x, 20, 1e-9, MASK, PAD, spare=1, generator=gen)
    assert ((tiny == MASK).sum(dim=1) == 1).all()


def test_hill_climb_never_decreases_and_reaches_the_target():
    target = torch.tensor([[5, 6, 7, 8, EOS, PAD], [9, 10, EOS, PAD, PAD, PAD]])
    start = torch.tensor([[3, 3, 3, 3, EOS, PAD], [4, 4, EOS, PAD, PAD, PAD]])
    gen = torch.Generator().manual_seed(1)

    def fill(xm):  # a noisy filler: the target token or a wrong one, at random
        coin = torch.rand(xm.shape, generator=gen) < 0.5
        rows = target.repeat_interleave(xm.shape[0] // 2, dim=0)
        guess = torch.where(coin, rows, torch.full_like(rows, 11))
        return torch.where(xm == MASK, guess, xm)

    def score(ids, rows):
        return (ids == target[rows]).float().mean(dim=1)

    best, cos, history = refine(start, fill, score, rounds=12, candidates=6, mask_frac=0.5, mask_id=MASK,
                                pad_id=PAD, spare=0, generator=gen)
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))
    assert history[-1] > history[0]
    assert torch.equal(best, target)
    assert torch.allclose(cos, score(best, torch.arange(2)))


def test_fill_function_must_not_leave_masks():
    x = torch.tensor([[5, EOS, PAD]])
    with pytest.raises(RuntimeError, match="MASK"):
        refine(x, lambda xm: xm, lambda ids, rows: torch.zeros(ids.shape[0]), 1, 2, 0.5, MASK, PAD)


class _Favour:
    """Logits favouring token 7 everywhere."""

    def __call__(self, x_t, t, z, uncond=None, select=None):
        n = int(select.sum()) if select is not None else x_t.numel()
        logits = torch.zeros(n, 12)
        logits[:, 7] = 5.0
        return logits


class _Process:
    mask_id, pad_id = MASK, PAD

    def clean_logits(self, model, x_t, mask_ratio, z, uncond=None, select=None):
        return model(x_t, mask_ratio, z, uncond=uncond, select=select).float()


def test_maskgit_from_a_partial_state_decodes_only_its_masks():
    cfg = Config()
    cfg.sampling.steps = 3
    init = torch.tensor([[5, MASK, 6, MASK, EOS, PAD], [MASK, MASK, MASK, EOS, PAD, PAD]])
    out = MaskGITSampler(cfg).sample(_Favour(), _Process(), torch.zeros(2, 4), None, 1.0, init=init)
    assert torch.equal(out, torch.where(init == MASK, torch.full_like(init, 7), init))


def test_bad_refine_settings_are_config_errors():
    with pytest.raises(ConfigError, match="sampling.refine must be >= 0"):
        load_config(None, ["sampling.refine=-1"])
    with pytest.raises(ConfigError, match="refine_mask"):
        load_config(None, ["sampling.refine_mask=0"])
    with pytest.raises(ConfigError, match="refine_candidates"):
        load_config(None, ["sampling.refine_candidates=0"])
    with pytest.raises(ConfigError, match="MASK"):
        load_config(None, ["diffusion.process=score_entropy", "diffusion.graph=uniform", "sampling.sampler=euler",
                           "sampling.refine=2"])


def test_api_refine_never_scores_below_its_start(tiny_checkpoint, real_sentences, monkeypatch):
    import sgdd.sampling.refine as refine_module
    from sgdd.api import SGDD

    histories = []
    original = refine_module.refine

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        histories.append(out[2])
        return out

    monkeypatch.setattr(refine_module, "refine", spy)
    model = SGDD.from_pretrained(tiny_checkpoint, device="cpu")
    texts = real_sentences[:3]
    plain = model.reconstruct(texts, steps=4)
    assert histories == []  # refine is off by default
    refined = model.reconstruct(texts, steps=4, refine=2, refine_candidates=3, refine_steps=2)
    assert len(histories) == 1 and len(histories[0]) == 3  # the start and two rounds
    assert len(refined) == 3 and all(isinstance(t, str) for t in refined)
    e = model.encode(texts)
    # the start is the plain decode re-tokenised; its cosine is what refinement can only improve on
    start = [model.vocab.decode(model.vocab.encode(t)) for t in plain]
    cos_start = F.cosine_similarity(model.encode([t or "." for t in start]), e)
    cos_ref = F.cosine_similarity(model.encode([t or "." for t in refined]), e)
    assert (cos_ref >= cos_start - 1e-4).all()
