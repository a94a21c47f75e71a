"""Corpora (sources, filtering, dedup, split), the decoder vocabulary, make_batch and the bucket sampler."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from sgdd.config import Config, DataConfig, load_config
from sgdd.data import (
    LengthBucketSampler,
    Vocab,
    batch_slack,
    load_corpus,
    looks_like_prose,
    make_batch,
    read_text_lines,
    split_sentences,
    token_ids,
    tokenize_corpus,
    vocab_sizes,
    wiki_sample_sentences,
)
from sgdd.registry import ConfigError

# ------------------------------------------------------------------------------------------------ helpers


def n_token_sentence(n: int, word: str = "cat") -> str:
    """A sentence of exactly n BERT tokens ('cat' is one WordPiece token)."""
    return " ".join([word] * n)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def numbered_corpus(path: Path, n: int) -> Path:
    """n distinct sentences of 6..12 tokens."""
    words = ["river", "house", "garden", "letter", "window", "morning", "voice", "road"]
    lines = [f"The {words[i % 8]} number {i} was {words[(i * 3) % 8]} again." for i in range(n)]
    return write_lines(path, lines)


def text_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="text", path=str(path), **kw)


# ------------------------------------------------------------------------------------------------ text cleaning


def test_split_sentences_guards_abbreviations_and_initials():
    text = 'Dr. Smith met Mr. Jones in St. Louis. R. S. P. Beekes agreed. "Why?" she asked. It ended.'
    assert split_sentences(text) == [
        "Dr. Smith met Mr. Jones in St. Louis.",
        "R. S. P. Beekes agreed.",
        '"Why?" she asked.',
        "It ended.",
    ]


def test_looks_like_prose_rejects_markup_and_fragments():
    assert looks_like_prose("Achilles was a hero of the Trojan War in Greek mythology.")
    assert not looks_like_prose("== Etymology ==")
    assert not looks_like_prose("thumb|left|Achilles and Penthesilea, from a vase.")
    assert not looks_like_prose("see also the list of heroes")  # no capital, no end punctuation
    assert not looks_like_prose("In 1990 1991 1992 1993 1994 1995 1996 1997 1998.")


def test_wiki_sample_gives_many_clean_sentences():
    sents = wiki_sample_sentences()
    assert len(sents) > 1000
    assert all(looks_like_prose(s) for s in sents)
    assert not any("'''" in s or "[[" in s or "{{" in s or "|" in s for s in sents)


# ------------------------------------------------------------------------------------------------ corpus loading


def test_length_filter_keeps_room_for_eos(tmp_path, bundled_tokenizer):
    lines = [
        n_token_sentence(n, w) for n, w in [(3, "cat"), (4, "dog"), (10, "sun"), (63, "day"), (64, "man")]
    ]
    lines += [n_token_sentence(5, w) for w in ("red", "blue", "green", "gold", "grey", "pink")]
    cfg = text_cfg(write_lines(tmp_path / "c.txt", lines), min_tokens=4, max_length=64, valid_size=2)
    corpus = load_corpus(cfg, bundled_tokenizer)
    kept = corpus.train + corpus.valid
    lengths = sorted(len(ids) for ids in corpus.train_ids + corpus.valid_ids)
    assert lengths[0] == 4 and lengths[-1] == 63  # 3 and 64 tokens are dropped
    assert n_token_sentence(64, "man") not in kept and n_token_sentence(3, "cat") not in kept
    assert len(kept) == 9
    for s, ids in zip(corpus.train, corpus.train_ids, strict=True):
        assert ids == bundled_tokenizer(s, add_special_tokens=False)["input_ids"]


def test_dedup_normalises_whitespace(tmp_path, bundled_tokenizer):
    base = [f"Sentence number {i} is here today." for i in range(10)]
    lines = base + ["Sentence  number 3 is here\ttoday.", " Sentence number 4 is here today. ", ""]
    cfg = text_cfg(write_lines(tmp_path / "c.txt", lines), valid_size=2)
    corpus = load_corpus(cfg, bundled_tokenizer)
    assert sorted(corpus.train + corpus.valid) == sorted(base)
    no_dedup = load_corpus(dataclasses.replace(cfg, dedup=False), bundled_tokenizer)
    assert len(no_dedup.train) + len(no_dedup.valid) == 12


def test_split_is_deterministic_disjoint_and_stable_under_max_sentences(tmp_path, bundled_tokenizer):
    cfg = text_cfg(numbered_corpus(tmp_path / "c.txt", 300), valid_size=20, seed=3)
    a = load_corpus(cfg, bundled_tokenizer)
    b = load_corpus(cfg, bundled_tokenizer)
    assert a.train == b.train and a.valid == b.valid
    assert len(a.valid) == 20 and len(a.train) == 280
    assert not set(a.train) & set(a.valid)
    other_seed = load_corpus(dataclasses.replace(cfg, seed=4), bundled_tokenizer)
    assert other_seed.valid != a.valid
    capped = load_corpus(dataclasses.replace(cfg, max_sentences=50), bundled_tokenizer)
    assert capped.valid == a.valid and len(capped.train) == 50 and capped.train == a.train[:50]
    only_valid = load_corpus(cfg, bundled_tokenizer, valid_only=True)
    assert only_valid.valid == a.valid and only_valid.train == []


def test_explicit_valid_file_is_removed_from_train(tmp_path, bundled_tokenizer):
    train_path = numbered_corpus(tmp_path / "train.txt", 100)
    train_lines = [line.strip() for line in read_text_lines(str(train_path))]
    valid_path = write_lines(
        tmp_path / "valid.txt", [*train_lines[:5], "A held out sentence from another book."]
    )
    cfg = text_cfg(train_path, valid_path=str(valid_path))
    corpus = load_corpus(cfg, bundled_tokenizer)
    assert corpus.valid == [*train_lines[:5], "A held out sentence from another book."]
    assert len(corpus.train) == 95 and not set(corpus.train) & set(corpus.valid)


def test_glob_of_text_files(tmp_path, bundled_tokenizer):
    numbered_corpus(tmp_path / "a.txt", 30)
    write_lines(tmp_path / "b.txt", [f"Another file holds sentence {i} for us." for i in range(30)])
    corpus = load_corpus(text_cfg(tmp_path / "*.txt", valid_size=5), bundled_tokenizer)
    assert len(corpus.train) + len(corpus.valid) == 60


def test_bad_utf8_names_file_and_line(tmp_path, bundled_tokenizer):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"A fine first line of text.\nA second line \xff\xfe broken.\n")
    with pytest.raises(ConfigError, match=r"bad\.txt:2: not valid UTF-8"):
        load_corpus(text_cfg(p), bundled_tokenizer)


def test_missing_file_and_too_small_corpus(tmp_path, bundled_tokenizer):
    with pytest.raises(ConfigError, match="matches no file"):
        load_corpus(text_cfg(tmp_path / "nope.txt"), bundled_tokenizer)
    small = numbered_corpus(tmp_path / "small.txt", 30)
    with pytest.raises(ConfigError, match="valid_size"):
        load_corpus(text_cfg(small, valid_size=20), bundled_tokenizer)


def test_disk_source(tmp_path, bundled_tokenizer):
    import datasets

    rows = [f"Saved dataset sentence number {i} reads well." for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(tmp_path / "ds")
    cfg = DataConfig(source="disk", path=str(tmp_path / "ds"), valid_size=5)
    corpus = load_corpus(cfg, bundled_tokenizer)
    assert sorted(corpus.train + corpus.valid) == sorted(rows)
    with pytest.raises(ConfigError, match="no column 'body'"):
        load_corpus(dataclasses.replace(cfg, text_field="body"), bundled_tokenizer)


def test_bookcorpus_without_hub_fails_fast_naming_offline_configs(monkeypatch, bundled_tokenizer):
    import sgdd.encoders

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sgdd.encoders, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(source="bookcorpus"), bundled_tokenizer)
    msg = str(err.value)
    assert "unreachable" in msg and "configs/quickstart.yaml" in msg and "configs/fiction_minilm.yaml" in msg


@pytest.mark.parametrize("streaming", [False, True])
def test_bookcorpus_path_through_datasets(monkeypatch, bundled_tokenizer, streaming):
    """The hub path end to end, with datasets.load_dataset answered locally (no hub on this machine)."""
    import datasets

    import sgdd.encoders

    rows = [f"the hub sentence number {i} , as bookcorpus writes it ." for i in range(60)]
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        ds = datasets.Dataset.from_dict({"text": rows})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(sgdd.encoders, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="bookcorpus", streaming=streaming, valid_size=10, max_sentences=30)
    corpus = load_corpus(cfg, bundled_tokenizer)
    assert calls == [("bookcorpus", "train", streaming)]
    assert len(corpus.valid) == 10 and len(corpus.train) == 30
    assert set(corpus.train + corpus.valid) <= set(rows)
    assert load_corpus(cfg, bundled_tokenizer).valid == corpus.valid  # seeded, also when streaming


def test_load_corpus_takes_the_whole_config(tmp_path):
    path = numbered_corpus(tmp_path / "c.txt", 40)
    cfg = load_config(None, ["data.source=text", f"data.path={path}", "data.valid_size=5"])
    assert isinstance(cfg, Config)
    corpus = load_corpus(cfg)
    assert len(corpus.valid) == 5 and len(corpus.train) == 35


def test_eltec_fiction_loads(eltec_dir, bundled_tokenizer):
    cfg = DataConfig(
        source="text",
        path=str(eltec_dir / "train.txt"),
        valid_path=str(eltec_dir / "valid.txt"),
        max_sentences=500,
    )
    corpus = load_corpus(cfg, bundled_tokenizer)
    assert len(corpus.train) == 500 and len(corpus.valid) > 1500
    assert all(4 <= len(ids) <= 63 for ids in corpus.train_ids)


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocab_specials_and_pruning(tiny_vocab, bundled_tokenizer):
    v = tiny_vocab
    assert (v.PAD, v.MASK, v.EOS) == (0, 1, 2)
    # BERT has no eos: the end token is [SEP]
    tok = bundled_tokenizer
    assert v.encoder_ids[:3] == [tok.pad_token_id, tok.mask_token_id, tok.sep_token_id]
    assert tok.unk_token_id in v.encoder_ids
    assert len(v) < v.full_size == len(tok)
    assert len(set(v.encoder_ids)) == len(v)
    assert vocab_sizes(v) == {"decoder": len(v), "tokenizer": len(tok)}


def test_vocab_round_trips_training_text(tiny_vocab, real_sentences, bundled_tokenizer):
    tok = bundled_tokenizer
    for s in real_sentences[:100]:
        ids = tiny_vocab.encode(s)
        assert all(i > Vocab.EOS for i in ids)
        expected = tok.decode(
            tok(s, add_special_tokens=False)["input_ids"],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=True,
        )
        assert tiny_vocab.decode(ids) == expected
    rows = [tiny_vocab.encode(s) for s in real_sentences[:4]]
    assert tiny_vocab.decode_batch(make_batch(rows, 64)) == [tiny_vocab.decode(r) for r in rows]


def test_vocab_decode_stops_at_eos_and_skips_pad_mask(tiny_vocab):
    ids = tiny_vocab.encode("the history of the war")
    noisy = [Vocab.MASK, *ids[:2], Vocab.PAD, *ids[2:], Vocab.EOS, *ids]
    assert tiny_vocab.decode(noisy) == tiny_vocab.decode(ids) == "the history of the war"
    assert tiny_vocab.decode(torch.tensor(noisy)) == "the history of the war"


def test_vocab_unknown_tokens_go_to_unk(tiny_vocab, bundled_tokenizer):
    unk = tiny_vocab.encoder_ids.index(bundled_tokenizer.unk_token_id)
    ids = tiny_vocab.encode("the zyzzyva xylophonist")  # word pieces this tiny corpus never saw
    assert unk in ids and ids[0] != unk


def test_vocab_save_load(tmp_path, tiny_vocab, bundled_tokenizer):
    tiny_vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json", bundled_tokenizer)
    assert again.encoder_ids == tiny_vocab.encoder_ids
    assert again.encode("the war") == tiny_vocab.encode("the war")
    assert again.counts is None  # never counted: older vocabulary files load the same way

    counted = Vocab(tiny_vocab.encoder_ids, bundled_tokenizer)
    counts = counted.count_tokens([[3, 4, 4], [4, 7]])
    assert counts.tolist()[:9] == [0, 0, 0, 1, 3, 0, 0, 1, 0] and counts.shape == (len(counted),)
    counted.save(tmp_path / "counted.json")
    assert Vocab.load(tmp_path / "counted.json", bundled_tokenizer).counts.tolist() == counts.tolist()
    with pytest.raises(ConfigError, match="token counts have shape"):
        Vocab(tiny_vocab.encoder_ids, bundled_tokenizer, counts=[1, 2])

    class OtherTokenizer:
        def __len__(self):
            return 250002

    with pytest.raises(ConfigError, match="do not match"):
        Vocab.load(tmp_path / "vocab.json", OtherTokenizer())


def test_unpruned_vocab_covers_the_tokenizer(bundled_tokenizer):
    full = Vocab.build([], bundled_tokenizer, prune=False)
    specials = len(set(bundled_tokenizer.all_special_ids))
    assert len(full) == len(bundled_tokenizer) - specials + 1 + 3  # + unk back + PAD/MASK/EOS


def test_tokenize_corpus_truncates(tiny_vocab):
    toks = tokenize_corpus(["the war " * 40, "the war"], tiny_vocab, max_length=16)
    assert len(toks[0]) == 15 and len(toks[1]) == 2


def test_token_ids_drop_literal_special_tokens(bundled_tokenizer):
    (ids,) = token_ids(bundled_tokenizer, ["a [SEP] b [MASK] c"])
    assert bundled_tokenizer.sep_token_id not in ids and bundled_tokenizer.mask_token_id not in ids
    assert len(ids) == 3


# ------------------------------------------------------------------------------------------------ batching


def test_make_batch_layout():
    x = make_batch([[5, 6, 7], [8], [9, 10, 11, 12, 13]], max_length=64, pad_slack=2)
    assert x.dtype == torch.long and x.shape == (3, 5 + 1 + 2)
    assert x[0].tolist() == [5, 6, 7, Vocab.EOS, 0, 0, 0, 0]
    assert x[1].tolist() == [8, Vocab.EOS, 0, 0, 0, 0, 0, 0]
    assert x[2].tolist() == [9, 10, 11, 12, 13, Vocab.EOS, 0, 0]
    assert ((x == Vocab.EOS).sum(1) == 1).all()
    capped = make_batch([list(range(3, 100))], max_length=16, pad_slack=4)
    assert capped.shape == (1, 16) and capped[0, -1] == Vocab.EOS and capped[0, 14] == 17


def test_batch_slack_lands_on_multiples_and_stays_in_the_window():
    rng = random.Random(0)
    for longest in range(1, 70):
        lengths = set()
        for _ in range(200):
            slack = batch_slack(longest, 64, 12, 8, rng)
            L = min(64, min(longest, 63) + 1 + slack)
            assert L % 8 == 0 or L == 64, (longest, slack)
            assert 0 <= slack <= 12
            lengths.add(L)
        base = min(longest, 63) + 1
        window = {min(64, base + s) for s in range(13)}
        assert lengths == {n for n in window if n % 8 == 0 or n == 64}  # every admissible length is drawn
    # no multiple of 16 within a slack of 2: round up past the window
    assert batch_slack(17, 64, 2, 16, rng) == 32 - 18
    # off: U{0..pad_slack}, every value drawn
    assert {batch_slack(10, 64, 5, 0, rng) for _ in range(300)} == set(range(6))


def test_pad_multiple_must_not_be_negative():
    with pytest.raises(ConfigError, match="data.pad_multiple must be >= 0"):
        load_config(None, ["data.pad_multiple=-8"])


def _lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (n,), generator=g).tolist()


def test_bucket_sampler_covers_each_index_once_and_buckets():
    lengths = _lengths(1000)
    s = LengthBucketSampler(lengths, batch_size=32, seed=1, chunk_batches=10)
    batches = list(s)
    assert len(batches) == len(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = list(LengthBucketSampler(lengths, batch_size=32, seed=1, bucket=False))
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < plain_spread / 4


def test_bucket_sampler_is_seeded_and_changes_per_epoch():
    lengths = _lengths(500)
    a, b = LengthBucketSampler(lengths, 16, seed=5), LengthBucketSampler(lengths, 16, seed=5)
    e0 = list(a)
    assert e0 == list(b)
    assert list(a) != e0  # next epoch
    assert a.epoch == 1
    assert list(LengthBucketSampler(lengths, 16, seed=6)) != e0


def test_bucket_sampler_resumes_exactly():
    lengths = _lengths(700)
    ref = LengthBucketSampler(lengths, 16, seed=2)
    full = list(ref) + list(ref)  # two epochs
    s = LengthBucketSampler(lengths, 16, seed=2)
    it = iter(s)
    seen = [next(it) for _ in range(11)]
    state = s.state_dict()
    resumed = LengthBucketSampler(lengths, 16, seed=2)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert seen + rest[: len(full) - 11] == full
    # resuming from the very end of an epoch starts the next one
    end = LengthBucketSampler(lengths, 16, seed=2)
    end.load_state_dict({**state, "pos": len(end)})
    assert list(end) == full[len(ref) :]
    with pytest.raises(ValueError, match="cannot resume"):
        LengthBucketSampler(lengths[:-1], 16, seed=2).load_state_dict(state)


def test_bucket_sampler_resumes_across_world_sizes():
    """A torchrun job's sampler state resumes on another number of processes at the same place in the epoch's
    global batch order: nothing repeated, fewer than world_size batches skipped."""
    lengths = _lengths(1003)
    glob = LengthBucketSampler(lengths, 8, seed=0).batches(0)  # one process: every global batch, in order
    # two ranks took 5 batches each (global batches 0-9); one process goes on from global batch 10
    two = [LengthBucketSampler(lengths, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in two:
        it = iter(s)
        for _ in range(5):
            next(it)
    one = LengthBucketSampler(lengths, 8, seed=0)
    one.load_state_dict(two[0].state_dict())
    assert list(one) == glob[10:]
    # one process took 7 (global 0-6); rank r of two goes on at global 8 + r, 10 + r, ... (7 skipped)
    single = LengthBucketSampler(lengths, 8, seed=0)
    it = iter(single)
    for _ in range(7):
        next(it)
    for r in range(2):
        s = LengthBucketSampler(lengths, 8, seed=0, rank=r, world_size=2)
        s.load_state_dict(single.state_dict())
        rest = list(s)
        assert rest[0] == glob[8 + r] and rest[1] == glob[10 + r]
        assert not any(b in glob[:7] for b in rest)
    # a position past this world size's epoch starts the next epoch
    late = LengthBucketSampler(lengths, 8, seed=0, rank=0, world_size=3)
    late.load_state_dict({**single.state_dict(), "pos": len(single)})
    assert late.pos == len(late) and list(late) == LengthBucketSampler(lengths, 8, seed=0, rank=0,
                                                                        world_size=3).batches(1)


@pytest.mark.parametrize("bucket,drop_last", [(True, False), (True, True), (False, False), (False, True)])
def test_bucket_sampler_shards_for_ddp(bucket, drop_last):
    lengths = _lengths(1003)
    shards = [
        list(
            LengthBucketSampler(lengths, 8, seed=0, bucket=bucket, drop_last=drop_last, rank=r, world_size=3)
        )
        for r in range(3)
    ]
    counts = {len(s) for s in shards}
    assert len(counts) == 1
    assert counts.pop() == len(
        LengthBucketSampler(lengths, 8, bucket=bucket, drop_last=drop_last, world_size=3)
    )
    sets = [{i for b in s for i in b} for s in shards]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(len(x) for x in sets) > 1003 - 3 * 8 * 2
    if drop_last:
        assert all(len(b) == 8 for s in shards for b in s)
