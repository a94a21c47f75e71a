"""The Python API and the evaluation driver on a tiny trained checkpoint: outputs are strings of the right
count, save/load reproduces decodes, rerank picks among its candidates, reports carry the documented keys."""

import math
from types import SimpleNamespace

import pytest
import torch

from sgdd import evaluation as ev
from sgdd.api import SGDD, InputError
from sgdd.registry import ConfigError

METRIC_KEYS = {
    "bleu", "chrf", "exact_match", "token_f1", "length_ratio", "cosine",
    "bleu_roundtrip", "chrf_roundtrip", "exact_match_roundtrip", "token_f1_roundtrip",
    "exact_match_ceiling", "nll_per_token", "sentences_per_s", "end_to_end_sentences_per_s", "num_sentences",
}  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return SGDD.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def sentences(real_sentences):
    return real_sentences[:4]


def test_from_pretrained_applies_the_cli_allocator_settings(tiny_checkpoint, monkeypatch):
    import sgdd.cli

    calls = []
    monkeypatch.setattr(sgdd.cli, "tune_malloc", lambda: calls.append("tuned") or True)
    SGDD.from_pretrained(tiny_checkpoint, device="cpu")
    assert calls == ["tuned"]


def test_from_pretrained_loads_the_ema_or_the_raw_weights(tiny_checkpoint):
    """ema=True (the default) loads ema.safetensors, ema=False model.safetensors (bench/decode_grid.py --raw)."""
    from sgdd.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.ema_state is not None
    differ = [k for k in ckpt.model_state if not torch.equal(ckpt.model_state[k], ckpt.ema_state[k])]
    assert differ  # a trained tiny checkpoint: the EMA lags the raw weights
    for ema, want in ((True, ckpt.ema_state), (False, ckpt.model_state)):
        state = SGDD.from_pretrained(tiny_checkpoint, device="cpu", ema=ema).net.state_dict()
        assert all(torch.equal(state[k].float(), want[k].float()) for k in differ)


def test_reconstruct_paraphrase_interpolate_shapes(model, sentences):
    outs = model.reconstruct(sentences)
    assert len(outs) == len(sentences) and all(isinstance(o, str) for o in outs)
    groups = model.paraphrase(sentences[:2], n=3, seed=1)
    assert len(groups) == 2 and all(len(g) == 3 and all(isinstance(o, str) for o in g) for g in groups)
    line = model.interpolate(sentences[0], sentences[1], n=4)
    assert len(line) == 4 and all(isinstance(o, str) for o in line)


def test_save_pretrained_round_trip_decodes_identically(model, sentences, tmp_path):
    path = model.save_pretrained(tmp_path / "export")
    again = SGDD.from_pretrained(path, device="cpu")
    for k, v in model.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[k], v), k
    # sampled (not greedy) decodes exercise the seeded generator, and give non-empty text on a tiny model
    kw = dict(seed=3, greedy=False, temperature=1.0)
    a = model.reconstruct(sentences, **kw)
    assert any(a), "sampled decodes of the tiny model should not all be empty"
    assert again.reconstruct(sentences, **kw) == a
    assert again.paraphrase(sentences[:2], n=2, seed=5) == model.paraphrase(sentences[:2], n=2, seed=5)
    assert model.reconstruct(sentences, **kw) == a  # and a decode repeats itself


@pytest.mark.parametrize("greedy", [True, False])
def test_rerank_returns_a_candidate_and_never_lowers_cosine(model, sentences, monkeypatch, greedy):
    import sgdd.sampling.rerank as rerank_mod

    seen = {}
    real_pick = rerank_mod.pick_best

    def recording_pick(candidates, vectors, encode_fn):
        chosen, cos = real_pick(candidates, vectors, encode_fn)
        seen.update(candidates=[list(c) for c in candidates], cos=cos, chosen=chosen)
        return chosen, cos

    monkeypatch.setattr(rerank_mod, "pick_best", recording_pick)
    kw = dict(seed=0, greedy=greedy, temperature=1.0)
    single = model.reconstruct(sentences, rerank=1, **kw)
    assert not seen, "rerank=1 must not rerank"
    best = model.reconstruct(sentences, rerank=3, **kw)
    cands, cos = seen["candidates"], seen["cos"]
    assert cos.shape == (len(sentences), 3)
    for i, out in enumerate(best):
        assert out in cands[i]
        assert cands[i][0] == single[i]  # candidate 0 is the K=1 decode (same settings and seed)
        assert cos[i, cands[i].index(out)] == cos[i].max()
    # re-encoded separately (other batch padding), the chosen outputs are at least as close as the K=1 ones
    e_in = model.encode(sentences)
    cos_single = ev.cosine(e_in, model.encoder.encode(single).float())
    cos_best = ev.cosine(e_in, model.encoder.encode(best).float())
    assert bool((cos_best >= cos_single - 1e-4).all())
    assert float(cos_best.mean()) >= float(cos_single.mean()) - 1e-5


def test_api_rejects_bad_input(model):
    with pytest.raises(InputError, match="empty"):
        model.reconstruct(["fine", "   "])
    with pytest.raises(InputError, match="no input"):
        model.reconstruct([])
    with pytest.raises(ConfigError, match="valid samplers: maskgit"):
        model.reconstruct(["fine"], sampler="nope")
    with pytest.raises(InputError, match="unknown sampling option"):
        model.reconstruct(["fine"], stepz=3)


def test_evaluate_reconstruction_report(model, sentences):
    report = ev.evaluate_reconstruction(model, sentences, steps=3, seed=0)
    assert {"metrics", "by_length", "settings", "examples", "checkpoint", "timing", "vocab"} <= set(report)
    m = report["metrics"]
    assert METRIC_KEYS <= set(m)
    assert m["num_sentences"] == len(sentences)
    assert -1.0 <= m["cosine"] <= 1.0 and m["sentences_per_s"] > 0 and m["end_to_end_sentences_per_s"] > 0
    assert m["sentences_per_s"] >= m["end_to_end_sentences_per_s"]
    assert math.isfinite(m["nll_per_token"]) and m["nll_per_token"] > 0
    assert m["exact_match_ceiling"] == 0.0  # uncased MiniLM vocabulary vs capitalised Wikipedia sentences
    s = report["settings"]
    assert (s["steps"], s["seed"], s["sampler"], s["rerank"]) == (3, 0, "maskgit", 1)
    assert s["cfg_scale"] == model.cfg.sampling.cfg_scale
    assert sum(b["n"] for b in report["by_length"].values()) == len(sentences)
    assert report["checkpoint"] == str(model.source)
    assert report["vocab"]["cased"] is False
    ex = report["examples"]
    assert [e["input"] for e in ex] == sentences
    assert {"input", "output", "reference_roundtrip", "cosine"} <= set(ex[0])
    assert ex[0]["reference_roundtrip"] == model.vocab.decode(model.vocab.encode(sentences[0]))
    # the driver decodes exactly what the API returns for the same settings
    assert [e["output"] for e in ex] == model.reconstruct(sentences, steps=3, seed=0)
    text = ev.format_report(report)
    assert "round trip" in text and "uncased" in text and "sentences/s" in text and "in:" in text


def test_evaluate_paraphrase_report(model, sentences):
    report = ev.evaluate_paraphrase(model, sentences[:3], n=3, temperature=1.0, steps=3, seed=2)
    m = report["metrics"]
    assert {"self_bleu", "distinct_2", "cosine", "bleu", "bleu_roundtrip", "num_paraphrases"} <= set(m)
    assert 0.0 <= m["distinct_2"] <= 1.0 and 0.0 <= m["self_bleu"] <= 100.0
    assert m["num_sentences"] == 3 and m["num_paraphrases"] == 3
    assert all(len(e["outputs"]) == 3 and len(e["cosines"]) == 3 for e in report["examples"])
    assert report["settings"]["temperature"] == 1.0 and report["settings"]["greedy"] is False
    assert "self-BLEU" in ev.format_report(report)


def test_nll_is_skipped_for_a_process_without_it():
    fake = SimpleNamespace(process=object())
    assert ev.sequence_nll(fake, ["a sentence"], torch.zeros(1, 4), batch_size=2) is None


def test_render_ids_shows_masks_and_matches_decode_without_them(tiny_vocab):
    v = tiny_vocab
    ids = v.encode("the political philosophy")
    assert len(ids) >= 3
    assert ev.render_ids(v, ids + [v.EOS, v.PAD]) == v.decode(ids + [v.EOS, v.PAD])
    partly = [ids[0], v.MASK, *ids[2:], v.EOS, v.MASK]  # masks after EOS are not shown, as decode stops there
    text = ev.render_ids(v, partly)
    assert text.split()[1] == "_" and text.count("_") == 1
    assert ev.render_ids(v, [v.MASK] * 5 + [v.PAD]) == "_ _ _ _ _"


@pytest.mark.parametrize("fast", [False, True])
def test_a_bf16_checkpoint_runs_in_fp32_where_bf16_is_slow(tiny_checkpoint, tmp_path, monkeypatch, fast):
    import shutil

    import sgdd.precision

    ck = tmp_path / "bf16_ckpt"
    shutil.copytree(tiny_checkpoint, ck)
    cfg_file = ck / "config.yaml"
    text = cfg_file.read_text()
    assert text.count("precision: fp32") == 2  # training and encoder sections of the tiny checkpoint
    cfg_file.write_text(text.replace("precision: fp32", "precision: bf16"))
    monkeypatch.setattr(sgdd.precision, "bf16_is_fast", lambda device="cpu": fast)
    loaded = SGDD.from_pretrained(ck, device="cpu")
    expected = "bf16" if fast else "auto"
    assert (loaded.cfg.training.precision, loaded.cfg.encoder.precision) == (expected, expected)
