"""The embedding cache, and `prepare(cfg)`: everything training needs from the data side, in one bundle.

The encoder is frozen, so a corpus is encoded once. A cache entry is a folder `cfg.data.cache_dir/<key>/`:

    embeddings.npy   raw float32 (N, De), written through np.lib.format.open_memmap, read back memory-mapped
    meta.json        the key and its fields, N, De, dtype, chunk size, per-chunk sha256, rows_done, complete

The key hashes the encoder identity (backend + name), pooling, normalisation, encoder max length, precision and
the sha256 of the sentences (joined by newlines). The build encodes `CHUNK_ROWS` rows at a time and records each
chunk (data flushed before meta), so an interrupted build resumes at `rows_done`. On load, a cache whose shape,
dtype, checksums or key do not match is reported and rebuilt, never used. The encoder is loaded only when rows
must be encoded.

With DDP, let rank 0 call `prepare` first and the other ranks after a barrier (training does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sgdd.config import Config
from sgdd.encoders import FrozenEncoder, build_encoder, encoder_name_key, load_tokenizer
from sgdd.precision import resolve_precision

CHUNK_ROWS = 4096
META_FORMAT = "sgdd-embed-cache-1"


def _log(msg: str) -> None:
    print(f"[sgdd.embed_cache] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# keys


def corpus_hash(sentences: list[str]) -> str:
    """sha256 of the sentences joined by newlines (order matters: rows are aligned with sentences)."""
    h = hashlib.sha256()
    for i, s in enumerate(sentences):
        if i:
            h.update(b"\n")
        h.update(s.encode("utf-8"))
    return h.hexdigest()


def cache_key_fields(cfg: Config, sentences: list[str]) -> dict[str, Any]:
    e = cfg.encoder
    return {
        "encoder": encoder_name_key(e),
        "pooling": e.pooling,
        "normalize": e.normalize,
        "max_length": e.max_length,
        "precision": resolve_precision(e.precision, "cpu"),  # the precision actually used (auto resolved)
        "corpus_sha256": corpus_hash(sentences),
        "num_sentences": len(sentences),
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def _chunk_sha(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float32).data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# cache folder


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, folder / "meta.json")


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _open(path: Path, mode: str) -> np.memmap | None:
    try:
        arr = np.load(path, mmap_mode=mode)
    except (OSError, ValueError, EOFError):
        return None  # missing, truncated or a broken header
    return arr if isinstance(arr, np.memmap) else None


def check_cache(
    folder: Path, key: str, fields: dict[str, Any], complete: bool
) -> tuple[np.memmap | None, str]:
    """Validate a cache folder against the expected key. Returns (array, "") when usable, else (None, reason).

    complete=True: every chunk must be present and match its checksum; complete=False (resume): the rows
    recorded as done must match theirs. The array is opened read-only (complete) or read-write (resume).
    """
    meta = _read_meta(folder)
    if meta is None:
        return None, "meta.json is missing or unreadable"
    if meta.get("format") != META_FORMAT or meta.get("key") != key or meta.get("fields") != fields:
        return None, "its key does not match the corpus/encoder settings"
    n, dim = meta.get("num_rows"), meta.get("dim")
    if meta.get("dtype") != "float32" or not isinstance(n, int) or not isinstance(dim, int):
        return None, "meta.json has a wrong dtype or shape"
    if complete and not meta.get("complete"):
        return None, f"the build stopped at row {meta.get('rows_done')} of {n}"
    arr = _open(folder / "embeddings.npy", "r" if complete else "r+")
    if arr is None:
        return None, "embeddings.npy is missing or truncated"
    if arr.shape != (n, dim) or arr.dtype != np.float32:
        return None, f"embeddings.npy has shape {arr.shape} {arr.dtype}, expected ({n}, {dim}) float32"
    chunk, shas = meta.get("chunk_rows"), meta.get("chunk_sha256", [])
    done = n if complete else int(meta.get("rows_done", 0))
    if not isinstance(chunk, int) or chunk <= 0 or len(shas) != -(-done // chunk):
        return None, "meta.json's chunk records do not cover the rows it claims"
    for i, expected in enumerate(shas):
        if _chunk_sha(arr[i * chunk : min((i + 1) * chunk, done)]) != expected:
            return None, f"checksum mismatch in rows {i * chunk}..{min((i + 1) * chunk, done) - 1}"
    return arr, ""


class LazyEncoder:
    """Builds the frozen encoder on first use, so a warm cache never loads the model."""

    def __init__(self, cfg: Config, encoder: FrozenEncoder | None = None):
        self.cfg = cfg
        self._encoder = encoder

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> FrozenEncoder:
        if self._encoder is None:
            _log(f"loading encoder {self.cfg.encoder.name} ({self.cfg.encoder.backend})")
            self._encoder = build_encoder(self.cfg.encoder, device="cpu")
        return self._encoder


def load_or_build_embeddings(
    cfg: Config,
    sentences: list[str],
    split_name: str,
    encoder: FrozenEncoder | LazyEncoder | None = None,
    chunk_rows: int = CHUNK_ROWS,
    stats: dict[str, Any] | None = None,
    progress: bool = True,
) -> np.memmap:
    """(N, De) float32 read-only memmap of the frozen encoder's vectors for `sentences`, row i <-> sentence i.

    Uses the cache entry when it validates; resumes an interrupted build; otherwise (stale, truncated,
    mismatched) says why and rebuilds. `stats`, when given, receives rows encoded and seconds spent.
    """
    if not sentences:
        raise ValueError(f"{split_name}: no sentences to embed")
    lazy = encoder if isinstance(encoder, LazyEncoder) else LazyEncoder(cfg, encoder)
    fields = cache_key_fields(cfg, sentences)
    key = cache_key(fields)
    folder = Path(cfg.data.cache_dir) / key
    n = len(sentences)

    if folder.exists():
        arr, reason = check_cache(folder, key, fields, complete=True)
        if arr is not None:
            if stats is not None:
                stats[split_name] = {"rows": n, "encoded": 0, "seconds": 0.0, "cache": str(folder)}
            return arr
        resume, resume_reason = check_cache(folder, key, fields, complete=False)
        meta = _read_meta(folder) if resume is not None else None
        if resume is not None and meta is not None:
            _log(
                f"{split_name}: resuming the interrupted cache build in {folder} at row {meta['rows_done']} of {n}"
            )
            return _build(
                cfg,
                folder,
                key,
                fields,
                sentences,
                split_name,
                lazy,
                chunk_rows,
                stats,
                progress,
                meta,
                resume,
            )
        _log(f"{split_name}: cache {folder} is unusable ({reason}; {resume_reason}): rebuilding it")
        shutil.rmtree(folder)
    return _build(
        cfg, folder, key, fields, sentences, split_name, lazy, chunk_rows, stats, progress, None, None
    )


def _build(
    cfg: Config,
    folder: Path,
    key: str,
    fields: dict[str, Any],
    sentences: list[str],
    split_name: str,
    lazy: LazyEncoder,
    chunk_rows: int,
    stats: dict[str, Any] | None,
    progress: bool,
    meta: dict[str, Any] | None,
    arr: np.memmap | None,
) -> np.memmap:
    from tqdm import tqdm

    n = len(sentences)
    enc = lazy.get()
    if meta is None or arr is None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": META_FORMAT,
            "key": key,
            "fields": fields,
            "split": split_name,
            "num_rows": n,
            "dim": int(enc.dim),
            "dtype": "float32",
            "chunk_rows": chunk_rows,
            "chunk_sha256": [],
            "rows_done": 0,
            "complete": False,
        }
        arr = np.lib.format.open_memmap(
            folder / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, enc.dim)
        )
        _write_meta(folder, meta)
    start, chunk_rows = int(meta["rows_done"]), int(meta["chunk_rows"])  # a resumed build keeps its chunking
    t0 = time.perf_counter()
    bar = tqdm(
        total=n, initial=start, unit="sent", desc=f"encode {split_name}", disable=not progress, mininterval=5
    )
    for a in range(start, n, chunk_rows):
        b = min(a + chunk_rows, n)
        vec = enc.encode(sentences[a:b]).numpy().astype(np.float32, copy=False)  # (b - a, De)
        if vec.shape != (b - a, meta["dim"]):
            raise RuntimeError(f"encoder returned {vec.shape}, expected ({b - a}, {meta['dim']})")
        arr[a:b] = vec
        arr.flush()  # rows on disk before meta claims them
        meta["chunk_sha256"].append(_chunk_sha(vec))
        meta["rows_done"] = b
        _write_meta(folder, meta)
        bar.update(b - a)
    bar.close()
    seconds = time.perf_counter() - t0
    meta["complete"] = True
    meta["encode_seconds"] = round(seconds, 3)
    _write_meta(folder, meta)
    del arr
    encoded = n - start
    if stats is not None:
        stats[split_name] = {"rows": n, "encoded": encoded, "seconds": seconds, "cache": str(folder)}
    if encoded:
        _log(
            f"{split_name}: encoded {encoded} sentences in {seconds:.1f} s ({encoded / max(seconds, 1e-9):.1f}/s)"
        )
    out = _open(folder / "embeddings.npy", "r")
    if out is None:
        raise RuntimeError(f"cache {folder} could not be reopened after building it")
    return out


# ---------------------------------------------------------------------------------------------------------
# prepare: corpus + vocab + caches


@dataclass
class TrainData:
    """What training consumes. Rows are aligned: sentence i <-> tokens i <-> embedding row i.

    `*_tokens` are decoder ids without EOS (make_batch adds it); `*_emb` are (N, De) float32 read-only memmaps;
    `vocab_path` is the saved vocabulary that travels with checkpoints.
    """

    vocab: Any  # sgdd.data.Vocab
    vocab_path: Path
    tokenizer: Any
    encoder_dim: int
    train_sentences: list[str]
    valid_sentences: list[str]
    train_tokens: list[list[int]]
    valid_tokens: list[list[int]]
    train_emb: np.memmap
    valid_emb: np.memmap
    stats: dict[str, Any] = field(default_factory=dict)


def prepare(
    cfg: Config,
    encoder: FrozenEncoder | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> TrainData:
    """Load the corpus, build (and save) the decoder vocabulary, load or build both embedding caches."""
    from sgdd.data import Vocab, load_corpus, vocab_sizes

    log = log or _log
    t0 = time.perf_counter()
    tokenizer = encoder.tokenizer if encoder is not None else load_tokenizer(cfg.encoder)
    corpus = load_corpus(cfg, tokenizer=tokenizer)
    t_corpus = time.perf_counter() - t0
    vocab = Vocab.build(corpus.train_ids, tokenizer, prune=cfg.data.prune_vocab)
    vocab_key = cache_key(
        {
            "encoder": encoder_name_key(cfg.encoder),
            "train_sha256": corpus_hash(corpus.train),
            "prune": cfg.data.prune_vocab,
            "tokenizer_size": len(tokenizer),
        }
    )
    vocab_path = Path(cfg.data.cache_dir) / f"vocab-{vocab_key}.json"
    train_tokens = [vocab.map_encoder_ids(ids) for ids in corpus.train_ids]
    valid_tokens = [vocab.map_encoder_ids(ids) for ids in corpus.valid_ids]
    vocab.count_tokens(train_tokens)  # travels with checkpoints (sampling.repeat_exempt)
    vocab.save(vocab_path)
    sizes = vocab_sizes(vocab)
    log(
        f"corpus '{cfg.data.source}': {len(corpus.train)} train / {len(corpus.valid)} valid sentences "
        f"({t_corpus:.1f} s); vocabulary {sizes['decoder']} decoder ids (tokenizer: {sizes['tokenizer']}) "
        f"-> {vocab_path}"
    )
    stats: dict[str, Any] = {"vocab": sizes, "corpus_seconds": t_corpus}
    lazy = LazyEncoder(cfg, encoder)
    train_emb = load_or_build_embeddings(cfg, corpus.train, "train", lazy, stats=stats, progress=progress)
    valid_emb = load_or_build_embeddings(cfg, corpus.valid, "valid", lazy, stats=stats, progress=progress)
    if train_emb.shape[1] != valid_emb.shape[1]:
        raise RuntimeError(f"train/valid embedding widths differ: {train_emb.shape} vs {valid_emb.shape}")
    encoded = sum(stats[s]["encoded"] for s in ("train", "valid"))
    seconds = sum(stats[s]["seconds"] for s in ("train", "valid"))
    stats["encoded"] = encoded
    stats["encode_sentences_per_s"] = encoded / seconds if encoded and seconds > 0 else None
    return TrainData(
        vocab=vocab,
        vocab_path=vocab_path,
        tokenizer=tokenizer,
        encoder_dim=int(train_emb.shape[1]),
        train_sentences=corpus.train,
        valid_sentences=corpus.valid,
        train_tokens=train_tokens,
        valid_tokens=valid_tokens,
        train_emb=train_emb,
        valid_emb=valid_emb,
        stats=stats,
    )


__all__ = [
    "CHUNK_ROWS",
    "LazyEncoder",
    "TrainData",
    "cache_key",
    "cache_key_fields",
    "check_cache",
    "corpus_hash",
    "load_or_build_embeddings",
    "prepare",
]
