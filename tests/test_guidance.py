"""Classifier-free guidance wrapper: identity at s = 1, null pass at s = 0, one batched forward otherwise."""

import torch

from sgdd.sampling.guidance import guided


class FakeModel:
    """Logits that depend on z unless uncond; records every call."""

    def __init__(self, V=7, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(3, V, generator=g)
        self.null = torch.randn(V, generator=g)
        self.dtype = dtype
        self.calls = []

    def __call__(self, x_t, t, z, uncond=None, select=None):
        self.calls.append({"B": x_t.shape[0], "uncond": None if uncond is None else uncond.clone()})
        B, L = x_t.shape
        cond = z @ self.W  # (B, V)
        if uncond is not None:
            cond = torch.where(uncond[:, None], self.null.expand_as(cond), cond)
        out = cond[:, None, :] + x_t[..., None].float() * 0.1 + t[:, None, None]  # (B, L, V)
        out = out.to(self.dtype)
        return out[select] if select is not None else out


def _inputs(B=3, L=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (B, L), generator=g)
    t = torch.rand(B, generator=g)
    z = torch.randn(B, 3, generator=g)
    select = torch.rand(B, L, generator=g) < 0.5
    return x, t, z, select


def test_scale_one_is_the_conditional_exactly():
    x, t, z, select = _inputs()
    m = FakeModel()
    for sel in (None, select):
        out = guided(m, 1.0)(x, t, z, select=sel)
        ref = FakeModel()(x, t, z, select=sel)
        assert torch.equal(out, ref)
    assert [c["B"] for c in m.calls] == [3, 3]
    assert all(c["uncond"] is None for c in m.calls)


def test_scale_zero_is_the_unconditional():
    x, t, z, select = _inputs()
    m = FakeModel()
    out = guided(m, 0.0)(x, t, z, select=select)
    ref = FakeModel()(x, t, z, uncond=torch.ones(3, dtype=torch.bool), select=select)
    assert torch.equal(out, ref)
    assert len(m.calls) == 1 and m.calls[0]["uncond"].all()


def test_other_scales_combine_one_forward_of_2b_rows():
    x, t, z, select = _inputs()
    for s in (1.5, 3.0, -0.5):
        for sel in (None, select):
            m = FakeModel()
            out = guided(m, s)(x, t, z, select=sel)
            assert len(m.calls) == 1 and m.calls[0]["B"] == 6
            assert m.calls[0]["uncond"].tolist() == [False] * 3 + [True] * 3
            ref = FakeModel()
            cond = ref(x, t, z, select=sel)
            null = ref(x, t, z, uncond=torch.ones(3, dtype=torch.bool), select=sel)
            assert out.shape == cond.shape and out.dtype == torch.float32
            torch.testing.assert_close(out, null + s * (cond - null), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, cond)


def test_low_precision_model_is_combined_in_float32():
    x, t, z, _ = _inputs()
    out = guided(FakeModel(dtype=torch.bfloat16), 2.0)(x, t, z)
    assert out.dtype == torch.float32
    m = FakeModel(dtype=torch.bfloat16)
    cond, null = m(x, t, z).float(), m(x, t, z, uncond=torch.ones(3, dtype=torch.bool)).float()
    torch.testing.assert_close(out, null + 2.0 * (cond - null))


def test_caller_uncond_applies_to_the_conditional_half():
    x, t, z, _ = _inputs()
    m = FakeModel()
    guided(m, 2.0)(x, t, z, uncond=torch.tensor([True, False, False]))
    assert m.calls[0]["uncond"].tolist() == [True, False, False, True, True, True]
