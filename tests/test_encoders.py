"""Frozen encoder backends on the bundled all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sgdd.config import EncoderConfig
from sgdd.encoders import (
    ENCODERS,
    FlagEncoder,
    build_encoder,
    encode_ids,
    encoder_name_key,
    pool,
    resolve_model_path,
)
from sgdd.registry import ConfigError

TEXTS = [
    "The cat sat on the mat.",
    "A much longer sentence about the history of the Roman empire, its provinces and its slow decline.",
    "Hi.",
    "Achilles was a hero of the Trojan War.",
]


def test_bundled_minilm_resolves_to_the_package_folder():
    p = Path(resolve_model_path("bundled-minilm"))
    assert (p / "config.json").is_file() and (p / "tokenizer.json").is_file()
    assert resolve_model_path("BAAI/bge-m3") == "BAAI/bge-m3"  # hub ids pass through
    assert encoder_name_key(EncoderConfig()) != encoder_name_key(EncoderConfig(backend="flag"))


def test_registry_lists_backends():
    assert ENCODERS.names() == ["flag", "transformers"]
    with pytest.raises(ConfigError, match="valid choices: flag, transformers"):
        build_encoder(EncoderConfig(backend="sentence-transformers"))


def test_transformers_encoder_is_frozen_and_normalised(minilm_encoder):
    enc = minilm_encoder
    assert enc.dim == 384 and enc.hf_model is not None and not enc.hf_model.training
    assert not any(p.requires_grad for p in enc.hf_model.parameters())
    e = enc.encode(TEXTS)
    assert e.shape == (4, 384) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not e.requires_grad


def test_length_sorted_batches_keep_input_order(minilm_encoder):
    together = minilm_encoder.encode(TEXTS, batch_size=2)
    one_by_one = torch.cat([minilm_encoder.encode([t]) for t in TEXTS])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert minilm_encoder.encode([]).shape == (0, 384)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])  # (1, 3, 2), last position is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 1.0]]


def test_bf16_autocast_stays_close_to_fp32(minilm_encoder):
    cfg = dataclasses.replace(minilm_encoder.cfg, precision="bf16")
    bf16 = build_encoder(cfg)
    cos = F.cosine_similarity(bf16.encode(TEXTS), minilm_encoder.encode(TEXTS))
    assert (cos > 0.99).all()


def test_flag_backends_agree_with_transformers(minilm_encoder):
    """The BGE code path (FlagModel, and the BGE-M3 class that the name BAAI/bge-m3 selects) runs on the bundled
    folder and gives the transformers backend's vectors (mean pooling, as configured)."""
    ref = minilm_encoder.encode(TEXTS)
    cfg = dataclasses.replace(minilm_encoder.cfg, backend="flag")
    flag = build_encoder(cfg)
    assert isinstance(flag, FlagEncoder) and not flag.m3 and flag.dim == 384
    m3 = FlagEncoder(cfg, m3=True)
    assert m3.m3 and m3.dim == 384
    for enc in (flag, m3):
        e = enc.encode(TEXTS)
        assert e.shape == (4, 384) and e.dtype == torch.float32
        assert (F.cosine_similarity(e, ref) > 0.999).all()
    assert m3.hf_model is not None and not any(p.requires_grad for p in m3.hf_model.parameters())


def test_flag_backend_cls_pooling_agrees():
    cfg = EncoderConfig(pooling="cls", precision="fp32")
    ref = build_encoder(cfg).encode(TEXTS)
    flag = build_encoder(dataclasses.replace(cfg, backend="flag"))
    assert (F.cosine_similarity(flag.encode(TEXTS), ref) > 0.999).all()
    assert (F.cosine_similarity(flag.encode(TEXTS[:2]), ref[:2]) > 0.999).all()


def test_unreachable_hub_name_fails_fast(monkeypatch):
    import sgdd.encoders

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sgdd.encoders, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="hub is unreachable.*configs/quickstart.yaml"):
        build_encoder(EncoderConfig(name="BAAI/bge-m3", pooling="cls"))
    assert time.monotonic() - t0 < 10


def test_encode_ids_encodes_the_text_up_to_eos_and_an_empty_row_as_a_full_stop():
    class RecordingEncoder:
        def __init__(self):
            self.texts = []

        def encode(self, texts, batch_size=None):
            self.texts.append(list(texts))
            return torch.ones(len(texts), 3, dtype=torch.float64)

    class Vocab:  # ids 5, 6 spell "a", "b"; EOS = 2 ends the text
        def decode_batch(self, rows):
            words = {5: "a", 6: "b"}
            out = []
            for row in rows.tolist():
                row = row[: row.index(2)] if 2 in row else row
                out.append(" ".join(words[i] for i in row if i in words))
            return out

    enc = RecordingEncoder()
    vecs = encode_ids(enc, Vocab(), torch.tensor([[5, 6, 2, 5], [2, 5, 6, 0], [0, 0, 0, 0]]))
    assert enc.texts == [["a b", ".", "."]]
    assert vecs.dtype == torch.float32 and vecs.shape == (3, 3)
