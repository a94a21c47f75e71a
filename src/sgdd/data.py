"""Corpora, the decoder vocabulary, and batching.

Owns everything between "where the sentences come from" and "a LongTensor batch for the decoder":

- Corpus sources (`CORPORA` registry, config key `data.source`): `wiki_sample` (the English Wikipedia sample
  shipped with gensim, cleaned with gensim's wiki-markup filter and split into sentences), `text` (UTF-8 files,
  one sentence per line; a glob), `disk` (a `datasets.save_to_disk` folder), `bookcorpus` (the HF hub through
  `datasets`, optionally streaming). Each source yields candidate sentences in a seeded random order.
- `load_corpus`: whitespace normalisation, dedup, filtering by decoder token length
  (min_tokens .. max_length - 1, leaving room for the end token), a deterministic train/valid split (or an
  explicit valid file), `max_sentences`.
- `Vocab`: the decoder vocabulary = the encoder tokenizer pruned to the ids seen in training, plus specials
  PAD=0, MASK=1, EOS=2 (EOS is the tokenizer's eos, or [SEP] for BERT vocabularies).
- `make_batch` (token lists -> (B, L) with one EOS then PAD) and `LengthBucketSampler` (seeded, resumable,
  DDP-shardable length buckets).

The embedding cache and the `prepare(cfg)` bundle that training consumes live in sgdd.embed_cache.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgdd.config import Config, DataConfig, EncoderConfig
from sgdd.registry import ConfigError, Registry

CORPORA = Registry("data.source")

WIKI_SAMPLE_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CHUNK = 8192  # candidates tokenized per call of the fast tokenizer


def frequency_order(counts, first: Sequence[int] = (), exclude: Sequence[int] = ()) -> torch.Tensor:
    """All decoder ids but `exclude`, the ids in `first` leading (in id order), the rest by training count
    (V,), most frequent first, ties in id order. -> LongTensor (V - len(exclude),)."""
    c = torch.as_tensor(counts, dtype=torch.float64).flatten().clone()
    c[list(first)] = math.inf
    order = torch.argsort(c, descending=True, stable=True)
    if exclude:
        order = order[~torch.isin(order, torch.as_tensor(list(exclude), dtype=order.dtype))]
    return order


def _warn(msg: str) -> None:
    print(f"[sgdd.data] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# sentence splitting and prose filtering (for raw article text)

# words after which a period does not end a sentence
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st prof sr jr vs etc e.g i.e cf al no nos vol vols fig figs gen col lt capt sgt mt ft inc ltd "
    "co corp jan feb mar apr jun jul aug sep sept oct nov dec ca c approx est dept univ rev hon gov sen rep pp p "
    "op ed eds trans".split()
)
# end punctuation (+ closing quotes/brackets), whitespace, then something that can start a sentence
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)$")


def _is_abbreviation(before: str) -> bool:
    m = _LAST_WORD.search(before)
    if not m:
        return False
    word = m.group(1).lstrip("\"'“‘([").lower()
    if word in _ABBREVIATIONS:
        return True
    # an initial ("R. S. P. Beekes") or a dotted acronym ("U.S.", "e.g.")
    return len(word) == 1 and word.isalpha() or ("." in word and len(word) <= 6)


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences with a regex over end punctuation, guarding common abbreviations."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        punct_end = m.start() + len(m.group().rstrip())
        if text[m.start()] == "." and _is_abbreviation(text[start : m.start()]):
            continue
        sent = text[start:punct_end].strip()
        if sent:
            out.append(sent)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


_MARKUP = re.compile(r"[|{}\[\]<>=_\\#*~^@]|http|www\.")
_ENDS_LIKE_SENTENCE = re.compile(r"[.!?][\"'”’)]?$")
_STARTS_LIKE_SENTENCE = re.compile(r"^[\"'“‘(]?[A-Z]")


def looks_like_prose(s: str) -> bool:
    """A sentence of running text: capitalised start, end punctuation, real words, no markup debris."""
    if len(s) < 20 or len(s) > 600 or len(s.split()) < 4:
        return False
    if not _STARTS_LIKE_SENTENCE.match(s) or not _ENDS_LIKE_SENTENCE.search(s):
        return False
    if _MARKUP.search(s):
        return False
    if s.count("(") != s.count(")") or s.count('"') % 2:
        return False
    letters = sum(map(str.isalpha, s))
    digits = sum(map(str.isdigit, s))
    return letters >= 0.7 * (len(s) - s.count(" ")) and digits <= 0.15 * len(s)


# sections after which an article is lists and citations, not prose
_TAIL_SECTION = re.compile(
    r"^=+\s*(see also|references|notes|external links|bibliography|further reading|sources|footnotes|"
    r"citations|works cited|gallery)\s*=+\s*$",
    re.IGNORECASE,
)
_LINE_DEBRIS = ("=", "*", "#", ":", ";", "|", "!", "{", "}", "thumb", "File:", "Image:", "Category:")


def _clean_wiki_line(line: str) -> str:
    line = line.replace("'''", "").replace("''", "")
    # parentheses left empty or with dangling separators once templates are gone: "(; , Akhilleus, )"
    line = re.sub(r"\(\s*(?:[;,:]\s*)+", "(", line)
    line = re.sub(r"(?:\s*[;,:])+\s*\)", ")", line)
    line = re.sub(r"\(\s*\)", "", line)
    line = " ".join(line.split())
    line = re.sub(r"\s+([,.;:!?])", r"\1", line)
    return line


def wiki_paragraphs(markup: str) -> list[str]:
    """One article's wiki markup -> its prose paragraphs (gensim's filter, then line-level cleaning)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    paragraphs = []
    for raw in text.split("\n"):
        line = raw.strip()
        if _TAIL_SECTION.match(line):
            break
        if not line or line.startswith(_LINE_DEBRIS) or line.upper().startswith("#REDIRECT"):
            continue
        line = _clean_wiki_line(line)
        if _ENDS_LIKE_SENTENCE.search(line):
            paragraphs.append(line)
    return paragraphs


@lru_cache(maxsize=2)
def wiki_sample_sentences(path: str | None = None) -> tuple[str, ...]:
    """All prose sentences of gensim's Wikipedia sample (about 3 MB of text), in article order."""
    from gensim.corpora.wikicorpus import extract_pages
    from gensim.test.utils import datapath

    path = path or datapath(WIKI_SAMPLE_FILE)
    if not Path(path).is_file():
        raise ConfigError(f"the gensim Wikipedia sample is missing ({path}); reinstall gensim (uv sync)")
    out: list[str] = []
    with bz2.open(path, "rb") as f:
        for _title, markup, _pageid in extract_pages(f):
            for para in wiki_paragraphs(markup):
                out.extend(s for s in split_sentences(para) if looks_like_prose(s))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# raw sources: each yields candidate sentences, in a seeded random order where the source allows it


def read_text_lines(pattern: str) -> list[str]:
    """Lines of one file or of all files matching a glob (sorted), UTF-8; a bad byte names file and line."""
    p = Path(pattern).expanduser()
    files = (
        [p]
        if p.is_file()
        else sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    )
    if not files:
        raise ConfigError(f"data.path = '{pattern}' matches no file (looked for {p.resolve()})")
    lines: list[str] = []
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ConfigError(
                        f"{f}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                        "text corpora must be UTF-8, one sentence per line"
                    ) from None
                if lineno == 1:
                    line = line.lstrip("\ufeff")
                lines.append(line)
    return lines


def _permuted(items: Sequence[str], seed: int) -> Iterator[str]:
    order = np.random.default_rng(seed).permutation(len(items))
    for i in order:
        yield items[int(i)]


def _hf_column(ds: Any, text_field: str, where: str) -> None:
    columns = list(getattr(ds, "column_names", None) or [])
    if columns and text_field not in columns:
        raise ConfigError(
            f"{where} has no column '{text_field}' (data.text_field); its columns: {', '.join(columns)}"
        )


def _iter_hf_dataset(ds: Any, cfg: DataConfig, where: str) -> Iterator[str]:
    """A map-style `datasets.Dataset` in seeded random order, read in blocks; an IterableDataset shuffled in a
    buffer (streaming)."""
    import datasets

    _hf_column(ds, cfg.text_field, where)
    if isinstance(ds, datasets.Dataset):
        order = np.random.default_rng(cfg.seed).permutation(len(ds))
        for start in range(0, len(order), CHUNK):
            block = ds[order[start : start + CHUNK].tolist()][cfg.text_field]
            yield from (t for t in block if isinstance(t, str))
    else:
        for ex in ds.shuffle(seed=cfg.seed, buffer_size=10_000):
            t = ex.get(cfg.text_field)
            if isinstance(t, str):
                yield t


def _pick_split(ds: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in ds:
            raise ConfigError(
                f"{where} has no split '{split}' (data.hf_split); its splits: {', '.join(ds.keys())}"
            )
        return ds[split]
    return ds


@CORPORA.register("wiki_sample")
def wiki_sample_source(cfg: DataConfig) -> Iterator[str]:
    return _permuted(wiki_sample_sentences(), cfg.seed)


@CORPORA.register("text")
def text_source(cfg: DataConfig) -> Iterator[str]:
    return _permuted(read_text_lines(cfg.path), cfg.seed)


@CORPORA.register("disk")
def disk_source(cfg: DataConfig) -> Iterator[str]:
    import datasets

    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path = '{cfg.path}': no such datasets folder ({p.resolve()})")
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as exc:
        raise ConfigError(f"data.path = '{cfg.path}' is not a datasets.save_to_disk folder: {exc}") from None
    ds = _pick_split(ds, cfg.hf_split, f"datasets folder '{cfg.path}'")
    return _iter_hf_dataset(ds, cfg, f"datasets folder '{cfg.path}'")


@CORPORA.register("bookcorpus")
def bookcorpus_source(cfg: DataConfig) -> Iterator[str]:
    import datasets

    from sgdd.encoders import OFFLINE_HINT, check_hub_name

    check_hub_name(cfg.hf_dataset, "dataset")
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split, streaming=cfg.streaming)
    except (ConnectionError, OSError, ValueError) as exc:
        # offline mode without a cached copy, an unknown id, or a network failure mid-way
        raise ConfigError(
            f"cannot load dataset '{cfg.hf_dataset}' (split '{cfg.hf_split}') from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}; {OFFLINE_HINT}"
        ) from None
    return _iter_hf_dataset(ds, cfg, f"dataset '{cfg.hf_dataset}'")


# ---------------------------------------------------------------------------------------------------------
# corpus: normalise, dedup, filter by token length, split


@dataclass
class Corpus:
    """Filtered, deduplicated sentences. `*_ids` are the encoder tokenizer's ids (no special tokens), aligned."""

    train: list[str]
    valid: list[str]
    train_ids: list[list[int]] = field(default_factory=list, repr=False)
    valid_ids: list[list[int]] = field(default_factory=list, repr=False)


def normalize_sentence(s: str) -> str:
    return " ".join(s.split())


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Encoder-tokenizer ids without special tokens, one fast batch call; literal special tokens dropped."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    if not special:
        return ids
    return [[t for t in row if t not in special] if any(t in special for t in row) else row for row in ids]


def _accepted(
    candidates: Iterable[str],
    tokenizer: Any,
    cfg: DataConfig,
    seen: set[str],
    exclude: frozenset[str] | set[str] = frozenset(),
) -> Iterator[tuple[str, list[int]]]:
    """Candidates -> (sentence, encoder ids) that pass: normalised, deduplicated (through `seen`, shared by
    the splits), min_tokens..max_length-1 tokens. Tokenizes in chunks; take what you need with islice."""
    max_tokens = cfg.max_length - 1  # room for the end token
    max_chars = cfg.max_length * 25  # a line this long cannot fit; don't make the tokenizer chew on it
    it = iter(candidates)
    while True:
        chunk: list[str] = []
        for raw in it:
            s = normalize_sentence(raw)
            if not s or len(s) > max_chars or s in exclude:
                continue
            if cfg.dedup:
                if s in seen:
                    continue
                seen.add(s)
            chunk.append(s)
            if len(chunk) >= CHUNK:
                break
        if not chunk:
            return
        for s, ids in zip(chunk, token_ids(tokenizer, chunk), strict=True):
            if cfg.min_tokens <= len(ids) <= max_tokens:
                yield s, ids


def _take(accepted: Iterator[tuple[str, list[int]]], n: int) -> tuple[list[str], list[list[int]]]:
    """The next n accepted sentences (0 = all of them) as (sentences, ids)."""
    items = list(itertools.islice(accepted, n)) if n else list(accepted)
    return [s for s, _ in items], [ids for _, ids in items]


def load_corpus(cfg: Config | DataConfig, tokenizer: Any = None, valid_only: bool = False) -> Corpus:
    """The corpus `cfg.data` describes: filtered, deduplicated, split deterministically (seeded).

    Token lengths are measured with `tokenizer`, else with the tokenizer of `cfg.encoder` (pass the whole
    Config), else (a bare DataConfig) with the default encoder's tokenizer. The split: with `data.valid_path`,
    that file (filtered the same way) is the validation set and its sentences are removed from training;
    otherwise the first `valid_size` kept sentences of the seeded order are held out. `max_sentences` caps
    the training set; the validation set does not depend on it. `valid_only` skips loading training data.
    """
    data_cfg = cfg.data if isinstance(cfg, Config) else cfg
    if tokenizer is None:
        from sgdd.encoders import load_tokenizer

        if isinstance(cfg, Config):
            tokenizer = load_tokenizer(cfg.encoder)
        else:
            _warn("load_corpus got a bare DataConfig: filtering with the default encoder's tokenizer")
            tokenizer = load_tokenizer(EncoderConfig())
    source = CORPORA.get(data_cfg.source)
    seen: set[str] = set()
    n_train = data_cfg.max_sentences
    if data_cfg.valid_path:
        vcfg = dataclasses.replace(data_cfg, dedup=True)
        valid, valid_ids = _take(_accepted(read_text_lines(data_cfg.valid_path), tokenizer, vcfg, set()), 0)
        if not valid:
            raise ConfigError(
                f"data.valid_path = '{data_cfg.valid_path}': no sentence survives the length filter"
            )
        if valid_only:
            return Corpus([], valid, [], valid_ids)
        accepted = _accepted(source(data_cfg), tokenizer, data_cfg, seen, exclude=frozenset(valid))
        train, train_ids = _take(accepted, n_train)
    else:
        if data_cfg.valid_size <= 0:
            raise ConfigError("data.valid_size must be positive when data.valid_path is empty")
        n_valid = data_cfg.valid_size
        accepted = _accepted(source(data_cfg), tokenizer, data_cfg, seen)
        valid, valid_ids = _take(accepted, n_valid)
        if valid_only and len(valid) == n_valid:
            return Corpus([], valid, [], valid_ids)
        train, train_ids = _take(accepted, n_train)
        if len(train) < n_valid:
            raise ConfigError(
                f"data.source = '{data_cfg.source}' gives only {len(valid) + len(train)} sentences of "
                f"{data_cfg.min_tokens}..{data_cfg.max_length - 1} tokens: too few for data.valid_size = {n_valid} "
                "plus at least as many for training; lower data.valid_size or use a larger corpus"
            )
    if not train:
        raise ConfigError(
            f"data.source = '{data_cfg.source}': no training sentence survives the length filter"
        )
    return Corpus(train, valid, train_ids, valid_ids)


# ---------------------------------------------------------------------------------------------------------
# the decoder vocabulary


class Vocab:
    """Decoder vocabulary: decoder id -> encoder-tokenizer id (`encoder_ids`).

    Decoder ids 0, 1, 2 are PAD, MASK and EOS; they map to the tokenizer's pad, mask and end token (eos, or
    [SEP] for BERT vocabularies, which have no eos). The rest are corpus tokens in ascending encoder id, plus
    the tokenizer's unk (so unseen validation tokens have somewhere to go).

    `counts` (V,) int64 or None: how often each decoder id occurs in the training corpus (set by
    `count_tokens`, saved with the vocabulary; None in vocabularies saved before they were recorded). Samplers
    use it to tell function words from content words (sampling.repeat_exempt).
    """

    PAD, MASK, EOS = 0, 1, 2
    FORMAT = "sgdd-vocab-1"

    def __init__(self, encoder_ids: list[int], tokenizer: Any, counts: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.encoder_ids = [int(i) for i in encoder_ids]
        self.counts: np.ndarray | None = None
        if counts is not None:
            c = np.asarray(counts, dtype=np.int64)
            if c.shape != (len(self.encoder_ids),):
                raise ConfigError(
                    f"vocabulary token counts have shape {c.shape}, expected ({len(self.encoder_ids)},)"
                )
            self.counts = c
        # corpus tokens only: specials in text never map onto PAD/MASK/EOS
        self._to_decoder = {e: d for d, e in enumerate(self.encoder_ids) if d > self.EOS}
        unk = getattr(tokenizer, "unk_token_id", None)
        self._unk = self._to_decoder.get(unk) if unk is not None else None

    @staticmethod
    def special_encoder_ids(tokenizer: Any) -> list[int]:
        """[pad, mask, eos] in the tokenizer's ids, with fallbacks for tokenizers lacking some."""
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ConfigError(
                "the encoder tokenizer has neither an eos nor a sep token to end sentences with"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        mask = tokenizer.mask_token_id
        if mask is None:
            mask = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad
        return [int(pad), int(mask), int(eos)]

    @classmethod
    def build(cls, token_id_lists: Iterable[Sequence[int]], tokenizer: Any, prune: bool = True) -> Vocab:
        """From the training corpus' encoder-tokenizer ids; prune=False keeps the tokenizer's whole vocabulary."""
        special = set(tokenizer.all_special_ids)
        unk = tokenizer.unk_token_id
        if prune:
            seen: set[int] = set()
            for ids in token_id_lists:
                seen.update(ids)
        else:
            seen = set(range(len(tokenizer)))
        corpus_ids = sorted(i for i in seen if i not in special)
        if unk is not None:
            corpus_ids = sorted([*corpus_ids, unk])
        return cls(cls.special_encoder_ids(tokenizer) + corpus_ids, tokenizer)

    def __len__(self) -> int:
        return len(self.encoder_ids)

    def count_tokens(self, token_lists: Iterable[Sequence[int]]) -> np.ndarray:
        """Set and return `counts`: how often each decoder id occurs in `token_lists` (decoder ids)."""
        flat = np.fromiter((i for ids in token_lists for i in ids), dtype=np.int64)
        self.counts = np.bincount(flat, minlength=len(self))[: len(self)]
        return self.counts

    @property
    def full_size(self) -> int:
        """Size of the encoder tokenizer's vocabulary (what an unpruned decoder would predict over)."""
        return len(self.tokenizer)

    # ids
    def map_encoder_ids(self, ids: Sequence[int]) -> list[int]:
        """Encoder-tokenizer ids -> decoder ids; unknown -> unk when the vocab has it, else dropped."""
        out = []
        for e in ids:
            d = self._to_decoder.get(e, self._unk)
            if d is not None:
                out.append(d)
        return out

    def encode(self, text: str) -> list[int]:
        """Text -> decoder ids (no specials, no EOS)."""
        return self.map_encoder_ids(token_ids(self.tokenizer, [text])[0])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.map_encoder_ids(ids) for ids in token_ids(self.tokenizer, list(texts))]

    def _to_encoder(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for d in ids:
            d = int(d)
            if d == self.EOS:
                break
            if d in (self.PAD, self.MASK) or not 0 <= d < len(self.encoder_ids):
                continue
            out.append(self.encoder_ids[d])
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decoder ids -> text: stops at the first EOS, skips PAD/MASK, detokenizes with the tokenizer."""
        return self.tokenizer.decode(
            self._to_encoder(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True
        )

    def decode_batch(self, rows: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """(B, L) decoder ids -> B strings."""
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return self.tokenizer.batch_decode(
            [self._to_encoder(r) for r in rows], skip_special_tokens=True, clean_up_tokenization_spaces=True
        )

    # files
    def save(self, path: str | Path) -> None:
        data = {
            "format": self.FORMAT,
            "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
            "tokenizer_size": len(self.tokenizer),
            "specials": {"PAD": self.PAD, "MASK": self.MASK, "EOS": self.EOS},
            "encoder_ids": self.encoder_ids,
        }
        if self.counts is not None:
            data["counts"] = self.counts.tolist()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any) -> Vocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read vocabulary file {path}: {exc}") from None
        if data.get("format") != cls.FORMAT:
            raise ConfigError(f"{path} is not an SGDD vocabulary file (format {data.get('format')!r})")
        if data["tokenizer_size"] != len(tokenizer):
            raise ConfigError(
                f"{path} was built with a tokenizer of {data['tokenizer_size']} tokens, but the encoder tokenizer "
                f"has {len(tokenizer)}: the checkpoint and the configured encoder do not match"
            )
        return cls(data["encoder_ids"], tokenizer, counts=data.get("counts"))


def vocab_sizes(vocab: Vocab) -> dict[str, int]:
    """{'decoder': pruned size incl. specials, 'tokenizer': the encoder tokenizer's full size}."""
    return {"decoder": len(vocab), "tokenizer": vocab.full_size}


def tokenize_corpus(sentences: list[str], vocab: Vocab, max_length: int) -> list[list[int]]:
    """Sentences -> decoder ids, truncated to max_length - 1 (room for EOS)."""
    out = []
    for start in range(0, len(sentences), CHUNK):
        out.extend(ids[: max_length - 1] for ids in vocab.encode_batch(sentences[start : start + CHUNK]))
    return out


# ---------------------------------------------------------------------------------------------------------
# batching


def make_batch(token_lists: Sequence[Sequence[int]], max_length: int, pad_slack: int = 0) -> torch.Tensor:
    """Decoder id lists -> (B, L) long: tokens, one EOS, then PAD; L = min(max_length, longest + 1 + pad_slack)."""
    if not token_lists:
        raise ValueError("make_batch needs at least one sentence")
    rows = [list(t[: max_length - 1]) for t in token_lists]
    B = len(rows)
    L = min(max_length, max(len(r) for r in rows) + 1 + pad_slack)
    x = torch.full((B, L), Vocab.PAD, dtype=torch.long)  # (B, L)
    for i, r in enumerate(rows):
        n = len(r)
        if n:
            x[i, :n] = torch.tensor(r, dtype=torch.long)
        x[i, n] = Vocab.EOS
    return x


def batch_slack(longest: int, max_length: int, pad_slack: int, multiple: int, rng: Any) -> int:
    """A training batch's PAD slack: U{0..pad_slack} (multiple = 0), or (multiple > 0) one drawn uniformly from
    the slacks in 0..pad_slack whose padded length min(max_length, longest + 1 + slack) is a multiple of
    `multiple` or max_length itself; when none is, the slack that rounds up to the next multiple. longest: the
    batch's longest row in decoder tokens (EOS excluded); rng: a random.Random or the random module."""
    if multiple <= 0:
        return rng.randint(0, pad_slack)
    base = min(longest, max_length - 1) + 1  # with its EOS
    fits = [s for s in range(pad_slack + 1) if base + s >= max_length or (base + s) % multiple == 0]
    return rng.choice(fits) if fits else -base % multiple


class LengthBucketSampler:
    """Index batches of similar length, for less padding.

    Each epoch: a permutation seeded by (seed, epoch), cut into chunks of `chunk_batches` batches; each chunk is
    sorted by length and cut into batches; the batch order is shuffled. With world_size > 1 every rank takes
    every world_size-th batch, truncated so all ranks get the same count (disjoint batches).

    Iterating yields the rest of the current epoch from the saved position; the next iteration starts the next
    epoch. `state_dict()` / `load_state_dict()` resume exactly where training stopped.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        bucket: bool = True,
        chunk_batches: int = 100,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket = bucket
        self.chunk_batches = chunk_batches
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.pos = 0  # batches of the current epoch already handed out
        self._cache: tuple[int, list[list[int]]] | None = None
        if len(self) == 0:
            raise ValueError(
                f"{len(self.lengths)} sentences give no batch of {batch_size} for each of {world_size} ranks"
            )

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        n, bs = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n)
        batches: list[np.ndarray] = []
        if self.bucket:
            chunk = bs * self.chunk_batches
            for start in range(0, n, chunk):
                idx = perm[start : start + chunk]
                idx = idx[np.argsort(self.lengths[idx], kind="stable")]
                batches.extend(idx[i : i + bs] for i in range(0, len(idx), bs))
        else:
            batches.extend(perm[i : i + bs] for i in range(0, n, bs))
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
        if self.bucket:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        glob_batches = self._global_batches(epoch)
        per_rank = len(glob_batches) // self.world_size
        mine = [b.tolist() for b in glob_batches[self.rank :: self.world_size][:per_rank]]
        self._cache = (epoch, mine)
        return mine

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same every epoch)."""
        n, bs = len(self.lengths), self.batch_size
        per_batch = math.floor if self.drop_last else math.ceil
        if self.bucket:
            chunk = bs * self.chunk_batches
            total = (n // chunk) * self.chunk_batches + per_batch((n % chunk) / bs)
        else:
            total = per_batch(n / bs)
        return total // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        if self.pos >= len(batches):
            self.epoch, self.pos = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        while self.pos < len(batches):
            b = batches[self.pos]
            self.pos += 1  # counted as handed out before the consumer trains on it
            yield b

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "num_samples": len(self.lengths),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved epoch and position. A state saved with another world size (a torchrun job resumed
        on a different number of processes) resumes at the same place in the epoch's global batch order: the
        batches the old ranks had taken, rounded up to whole rounds of this world size (fewer than world_size
        batches of that epoch are skipped, none repeated)."""
        for key in ("num_samples", "batch_size", "seed"):
            mine = {"num_samples": len(self.lengths)}.get(key, getattr(self, key, None))
            if key in state and state[key] != mine:
                raise ValueError(
                    f"sampler state has {key}={state[key]}, this sampler has {mine}: cannot resume"
                )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:
            taken = self.pos * old_world  # global batches of this epoch handed out across the old ranks
            self.pos = min(len(self), -(-taken // self.world_size))


__all__ = [
    "CORPORA",
    "Corpus",
    "LengthBucketSampler",
    "Vocab",
    "batch_slack",
    "load_corpus",
    "looks_like_prose",
    "make_batch",
    "read_text_lines",
    "split_sentences",
    "token_ids",
    "tokenize_corpus",
    "vocab_sizes",
    "wiki_sample_sentences",
]
