"""The embedding cache (keys, validation, rebuild, resume) and prepare()."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgdd.config import Config, DataConfig, EncoderConfig
from sgdd.data import Vocab
from sgdd.embed_cache import cache_key, cache_key_fields, load_or_build_embeddings, prepare
from sgdd.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]


class FakeEncoder:
    """Deterministic stand-in for a FrozenEncoder: a vector from the text's hash; counts rows encoded."""

    dim = 8

    def __init__(self, fail_after_calls: int | None = None):
        self.rows = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    @staticmethod
    def vector(text: str) -> np.ndarray:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).standard_normal(FakeEncoder.dim).astype(np.float32)

    def encode(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.rows += len(texts)
        return torch.from_numpy(np.stack([self.vector(t) for t in texts]))


SENTS = [f"Sentence number {i} of the little test corpus." for i in range(50)]


def make_cfg(tmp_path: Path, **encoder) -> Config:
    return Config(data=DataConfig(cache_dir=str(tmp_path / "cache")), encoder=EncoderConfig(**encoder))


def expected() -> np.ndarray:
    return np.stack([FakeEncoder.vector(s) for s in SENTS])


def cache_folder(cfg: Config, sentences=SENTS) -> Path:
    return Path(cfg.data.cache_dir) / cache_key(cache_key_fields(cfg, sentences))


def test_key_changes_with_encoder_pooling_settings_and_corpus(tmp_path):
    base = make_cfg(tmp_path)

    def key(cfg, sents=SENTS):
        return cache_key(cache_key_fields(cfg, sents))

    k = key(base)
    assert key(make_cfg(tmp_path)) == k
    variants = [
        make_cfg(tmp_path, name="BAAI/bge-m3"),
        make_cfg(tmp_path, backend="flag"),
        make_cfg(tmp_path, pooling="cls"),
        make_cfg(tmp_path, normalize=False),
        make_cfg(tmp_path, max_length=64),
        # the key holds the resolved precision (auto -> bf16 or fp32 by this machine): flip to the other one
        make_cfg(tmp_path, precision="bf16" if resolve_precision("auto") == "fp32" else "fp32"),
    ]
    keys = {key(c) for c in variants}
    assert k not in keys and len(keys) == len(variants)
    assert key(base, SENTS[:-1]) != k
    assert key(base, [SENTS[0] + "!", *SENTS[1:]]) != k
    assert key(base, SENTS[::-1]) != k  # rows are aligned with sentences: order matters
    # batch size does not change the vectors, so it does not change the key
    assert key(make_cfg(tmp_path, batch_size=7)) == k


def test_build_then_load_without_encoder(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    enc = FakeEncoder()
    arr = load_or_build_embeddings(cfg, SENTS, "train", enc, chunk_rows=16, progress=False)
    assert isinstance(arr, np.memmap) and arr.shape == (50, 8) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, expected())
    assert enc.rows == 50 and enc.calls == 4
    meta = json.loads((cache_folder(cfg) / "meta.json").read_text())
    assert meta["complete"] and meta["rows_done"] == 50 and len(meta["chunk_sha256"]) == 4
    # warm: the real encoder is never built; the result is read-only
    import sgdd.embed_cache

    def no_encoder(*args, **kwargs):
        raise AssertionError("a warm cache must not load the encoder")

    monkeypatch.setattr(sgdd.embed_cache, "build_encoder", no_encoder)
    again = load_or_build_embeddings(cfg, SENTS, "train", None, progress=False)
    np.testing.assert_array_equal(again, expected())
    with pytest.raises(ValueError):
        again[0, 0] = 1.0


def _corrupt_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _bad_key(path: Path) -> None:
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["fields"]["pooling"] = "cls"
    meta_path.write_text(json.dumps(meta))


def _wrong_shape(path: Path) -> None:
    np.save(path, np.zeros((50, 4), dtype=np.float32))


def _wrong_dtype(path: Path) -> None:
    np.save(path, np.zeros((50, 8), dtype=np.float64))


@pytest.mark.parametrize("damage", [_corrupt_bytes, _truncate, _bad_key, _wrong_shape, _wrong_dtype])
def test_damaged_cache_is_reported_and_rebuilt(tmp_path, capsys, damage):
    cfg = make_cfg(tmp_path)
    load_or_build_embeddings(cfg, SENTS, "train", FakeEncoder(), chunk_rows=16, progress=False)
    damage(cache_folder(cfg) / "embeddings.npy")
    enc = FakeEncoder()
    arr = load_or_build_embeddings(cfg, SENTS, "train", enc, chunk_rows=16, progress=False)
    assert "rebuilding" in capsys.readouterr().err
    assert enc.rows == 50
    np.testing.assert_array_equal(arr, expected())


def test_interrupted_build_resumes_where_it_stopped(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        load_or_build_embeddings(
            cfg, SENTS, "train", FakeEncoder(fail_after_calls=2), chunk_rows=16, progress=False
        )
    meta = json.loads((cache_folder(cfg) / "meta.json").read_text())
    assert meta["rows_done"] == 32 and not meta["complete"]
    enc = FakeEncoder()
    arr = load_or_build_embeddings(cfg, SENTS, "train", enc, chunk_rows=16, progress=False)
    assert "resuming" in capsys.readouterr().err
    assert enc.rows == 18  # only the rows that were missing
    np.testing.assert_array_equal(arr, expected())


def test_interrupted_build_with_damaged_rows_starts_over(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        load_or_build_embeddings(
            cfg, SENTS, "train", FakeEncoder(fail_after_calls=2), chunk_rows=16, progress=False
        )
    path = cache_folder(cfg) / "embeddings.npy"
    arr = np.load(path, mmap_mode="r+")
    arr[3, 0] += 1.0
    arr.flush()
    del arr
    enc = FakeEncoder()
    out = load_or_build_embeddings(cfg, SENTS, "train", enc, chunk_rows=16, progress=False)
    assert enc.rows == 50
    np.testing.assert_array_equal(out, expected())


def _write_corpus(tmp_path: Path, n: int) -> Path:
    words = ["river", "house", "garden", "letter", "window", "morning", "voice", "road"]
    lines = [f"The {words[i % 8]} beside the {words[(i * 5) % 8]} was quiet on day {i}." for i in range(n)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_prepare_with_the_bundled_encoder(tmp_path, minilm_encoder):
    path = _write_corpus(tmp_path, 60)
    cfg = Config(
        data=DataConfig(source="text", path=str(path), valid_size=10, cache_dir=str(tmp_path / "cache")),
        encoder=EncoderConfig(precision="fp32"),
    )
    data = prepare(cfg, encoder=minilm_encoder, progress=False)
    assert len(data.train_sentences) == 50 and len(data.valid_sentences) == 10
    assert data.train_emb.shape == (50, 384) and data.valid_emb.shape == (10, 384) and data.encoder_dim == 384
    assert len(data.train_tokens) == 50 and data.stats["encoded"] == 60
    # rows are aligned with sentences and tokens
    i = 17
    direct = minilm_encoder.encode([data.train_sentences[i]])[0].numpy()
    np.testing.assert_allclose(data.train_emb[i], direct, atol=1e-5)
    assert data.vocab.decode(data.train_tokens[i]) == data.train_sentences[i].lower()
    vocab = Vocab.load(data.vocab_path, minilm_encoder.tokenizer)
    assert vocab.encoder_ids == data.vocab.encoder_ids
    again = prepare(cfg, encoder=minilm_encoder, progress=False)
    assert again.stats["encoded"] == 0
    np.testing.assert_array_equal(again.train_emb, data.train_emb)


def test_prepare_data_cli_user_error_is_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "src/prepare_data.py"), "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
