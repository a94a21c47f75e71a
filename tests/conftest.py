"""Shared pytest fixtures: real sentences, the bundled tokenizer / encoder / a tiny vocabulary, the dev corpus.

Session-scoped so the gensim Wikipedia sample is parsed and the MiniLM weights are loaded once per run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sgdd.config import EncoderConfig

# SGDD.from_pretrained and the CLIs tune glibc's allocator for the whole process (sgdd.cli.tune_malloc); the test
# process keeps its own (tests that check the tuning patch it in)
os.environ.setdefault("SGDD_MALLOPT", "0")


def shared_data_dir() -> Path:
    """../shared/data next to the repository, or $SGDD_SHARED_DATA."""
    env = os.environ.get("SGDD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data"


@pytest.fixture(scope="session")
def real_sentences() -> list[str]:
    """200 clean English sentences from the offline Wikipedia sample (deterministic)."""
    from sgdd.data import wiki_sample_sentences

    sents = wiki_sample_sentences()
    return [s for s in sents if len(s) < 200][:200]


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled all-MiniLM-L6-v2 (BERT WordPiece, uncased) tokenizer."""
    from sgdd.encoders import load_tokenizer

    return load_tokenizer(EncoderConfig())


@pytest.fixture(scope="session")
def tiny_vocab(real_sentences, bundled_tokenizer):
    """A decoder Vocab pruned to the tokens of `real_sentences`."""
    from sgdd.data import Vocab, token_ids

    return Vocab.build(token_ids(bundled_tokenizer, real_sentences), bundled_tokenizer)


@pytest.fixture(scope="session")
def minilm_encoder():
    """The bundled MiniLM through the transformers backend (mean pooling, normalised, fp32), loaded once."""
    from sgdd.encoders import build_encoder

    return build_encoder(EncoderConfig(precision="fp32"))


@pytest.fixture(scope="session")
def eltec_dir() -> Path:
    """../shared/data/eltec_eng (English fiction), or skip when this machine does not have it."""
    p = shared_data_dir() / "eltec_eng"
    if not (p / "train.txt").is_file():
        pytest.skip(f"development corpus not found at {p} (set SGDD_SHARED_DATA)")
    return p


def tiny_train_overrides(root: Path, sentences: list[str], **extra) -> list[str]:
    """Dotted overrides for a seconds-long CPU training run on `sentences` (written to root/corpus.txt):
    a 2-layer 64-d decoder from scratch, short sequences, caches and checkpoints under root."""
    corpus = root / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    base = {
        "data.source": "text",
        "data.path": str(corpus),
        "data.valid_size": 8,
        "data.max_length": 40,
        "data.cache_dir": str(root / "cache"),
        "encoder.precision": "fp32",
        "model.init_from": "scratch",
        "model.hidden_size": 64,
        "model.num_heads": 4,
        "model.num_layers": 2,
        "model.latent_dim": 32,
        "model.kl_warmup_steps": 0,
        "training.output_dir": str(root / "checkpoints"),
        "training.run_name": "tiny",
        "training.batch_size": 8,
        "training.max_steps": 6,
        "training.max_minutes": 0,
        "training.warmup_steps": 2,
        "training.lr": 1e-3,
        "training.log_every": 1,
        "training.eval_every": 0,
        "training.save_every": 3,
        "training.keep_last": 3,
        "training.num_eval_sentences": 4,
        "training.num_eval_batches": 1,
        "training.final_eval": False,
        "training.precision": "fp32",
        "sampling.steps": 4,
        "sampling.batch_size": 8,
        "tracking.mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, real_sentences) -> Path:
    """A tiny trained checkpoint (seconds of training; output quality is not the point) for CLI / API tests."""
    from sgdd.config import load_config
    from sgdd.training import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = load_config(None, tiny_train_overrides(root, real_sentences[:64], **{"training.max_steps": 20,
                                                                               "training.eval_every": 10,
                                                                               "training.save_every": 10}))
    result = train(cfg)
    return result.run_dir / "latest"


def perturbed_decoder(vocab_size: int, latent_dim: int, layers: int = 2, max_length: int = 16):
    """A small scratch Decoder (eval mode) with every parameter moved by N(0, 0.3) noise (seed 0), so that the AdaLN
    modulation and the output layer are non-zero as after training."""
    import torch

    from sgdd.config import ModelConfig
    from sgdd.models import Decoder

    torch.manual_seed(0)
    dec = Decoder(ModelConfig(init_from="scratch", num_layers=layers, hidden_size=32, num_heads=4,
                              latent_dim=latent_dim), vocab_size, max_length)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return dec.eval()


def record_decoder_calls(dec):
    """Wrap dec.forward to record, per call, (every row unconditional: a null pass on its own, positions run with
    reused keys / values, or None for a full pass or a call without reuse); returns the list it appends to."""
    calls = []
    forward = dec.forward

    def recording(x_t, t, z, uncond=None, select=None, kv=None, **kw):
        ran = None if kv is None or kv.cache is None else int(kv.positions.shape[1])
        calls.append((bool(uncond is not None and uncond.all()), ran))
        return forward(x_t, t, z, uncond=uncond, select=select, kv=kv, **kw)

    dec.forward = recording
    return calls
