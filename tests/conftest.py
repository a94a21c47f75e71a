"""Shared pytest fixtures: real sentences, the bundled tokenizer / encoder / a tiny vocabulary, the dev corpus.

Session-scoped so the gensim Wikipedia sample is parsed and the MiniLM weights are loaded once per run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sgdd.config import EncoderConfig


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
