"""Reconstruction and paraphrase metrics on strings (no model needed).

Scales: BLEU, chrF, self-BLEU, exact match and token F1 are percentages (0-100); distinct-2 is a fraction
(0-1); length ratio is hypothesis words / reference words over the corpus; cosine is in [-1, 1].

- corpus BLEU and chrF through sacrebleu directly (`sacrebleu.metrics`; the HF `evaluate` library must not be
  imported: src/evaluate.py shadows it),
- exact match after whitespace normalisation (case-sensitive),
- token F1: SQuAD-style bag of words (lowercase, punctuation and articles removed), averaged over sentences,
- self-BLEU and distinct-2 within sets of paraphrases of the same input,
- a breakdown by reference length bucket and a plain-text table printer.

An uncased decoder vocabulary cannot reproduce case (exact match on cased text is then zero), so
`reconstruction_metrics` can also score against each reference's own tokenizer round-trip
(`reference_roundtrip`), reported under keys ending in `_roundtrip` next to the raw-reference ones.
The semantic cosine needs the encoder: the caller encodes and passes the rowwise `cosine(a, b)` in.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF

LENGTH_BUCKET_EDGES = (10, 20, 40)  # reference word counts: 1-10, 11-20, 21-40, 41+


# ---------------------------------------------------------------------------------------------------------
# single metrics


def _check_pair(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (13a tokenisation, one reference per hypothesis), 0-100."""
    _check_pair(hyps, refs)
    if not hyps:
        return 0.0
    return float(BLEU().corpus_score(list(hyps), [list(refs)]).score)


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus chrF (character 6-grams, beta 2), 0-100."""
    _check_pair(hyps, refs)
    if not hyps:
        return 0.0
    return float(CHRF().corpus_score(list(hyps), [list(refs)]).score)


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Percentage of hypotheses equal to their reference after whitespace normalisation (case-sensitive)."""
    _check_pair(hyps, refs)
    if not hyps:
        return 0.0
    hits = sum(normalize_whitespace(h) == normalize_whitespace(r) for h, r in zip(hyps, refs, strict=True))
    return 100.0 * hits / len(hyps)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def bag_of_words(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def token_f1_single(hyp: str, ref: str) -> float:
    """Bag-of-words F1 in [0, 1]; two empty bags count as a perfect match."""
    h, r = bag_of_words(hyp), bag_of_words(ref)
    if not h or not r:
        return float(h == r)
    common = sum((Counter(h) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(h), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean SQuAD-style token F1 over sentences, 0-100."""
    _check_pair(hyps, refs)
    if not hyps:
        return 0.0
    return 100.0 * sum(token_f1_single(h, r) for h, r in zip(hyps, refs, strict=True)) / len(hyps)


def length_ratio(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Total whitespace words in the hypotheses / in the references (1.0 = same length)."""
    _check_pair(hyps, refs)
    ref_words = sum(len(r.split()) for r in refs)
    return sum(len(h.split()) for h in hyps) / ref_words if ref_words else 0.0


def cosine(a: Any, b: Any) -> torch.Tensor:
    """Rowwise cosine similarity of two (N, D) arrays or tensors -> (N,) float32 tensor."""
    a = torch.as_tensor(a).float()
    b = torch.as_tensor(b).float()
    if a.shape != b.shape:
        raise ValueError(f"cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a, b, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# diversity of paraphrase sets


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over the texts (whitespace words, as written), in [0, 1]."""
    grams = [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(group: Sequence[str]) -> float:
    """Mean sentence BLEU (0-100) of each text against the other texts of its group; needs >= 2 texts."""
    if len(group) < 2:
        raise ValueError("self-BLEU needs at least two texts in a group")
    bleu = BLEU(effective_order=True)
    scores = [
        bleu.sentence_score(text, [other for j, other in enumerate(group) if j != i]).score
        for i, text in enumerate(group)
    ]
    return float(sum(scores) / len(scores))


def paraphrase_diversity(groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """groups: for each input, its paraphrases. Returns self_bleu (0-100, lower = more diverse) and distinct_2
    (0-1, higher = more diverse), each averaged over the groups with at least two paraphrases."""
    usable = [g for g in groups if len(g) >= 2]
    if not usable:
        return {"self_bleu": 0.0, "distinct_2": 0.0, "groups": 0}
    return {
        "self_bleu": sum(self_bleu(g) for g in usable) / len(usable),
        "distinct_2": sum(distinct_n(g, 2) for g in usable) / len(usable),
        "groups": len(usable),
    }


# ---------------------------------------------------------------------------------------------------------
# references through the decoder's tokenizer


def reference_roundtrip(texts: Sequence[str], tokenizer: Any) -> list[str]:
    """Each text as the decoder vocabulary can write it at best: decode(encode(text)).

    tokenizer: a callable str -> str, or an object with encode(text) -> ids and decode(ids) -> str (sgdd.data.Vocab).
    """
    if callable(tokenizer) and not hasattr(tokenizer, "decode"):
        return [tokenizer(t) for t in texts]
    return [tokenizer.decode(tokenizer.encode(t)) for t in texts]


# ---------------------------------------------------------------------------------------------------------
# bundles, buckets, tables


def reconstruction_metrics(
    hyps: Sequence[str],
    refs: Sequence[str],
    roundtrip_refs: Sequence[str] | None = None,
    cosines: Any = None,
) -> dict[str, float]:
    """All string metrics in one flat dict: n, bleu, chrf, exact_match, token_f1, length_ratio; with
    roundtrip_refs also bleu_roundtrip, chrf_roundtrip, exact_match_roundtrip, token_f1_roundtrip; with
    cosines (N,) (input vector vs re-encoded output vector) also cosine (their mean)."""
    _check_pair(hyps, refs)
    out: dict[str, float] = {
        "n": len(hyps),
        "bleu": corpus_bleu(hyps, refs),
        "chrf": corpus_chrf(hyps, refs),
        "exact_match": exact_match(hyps, refs),
        "token_f1": token_f1(hyps, refs),
        "length_ratio": length_ratio(hyps, refs),
    }
    if roundtrip_refs is not None:
        _check_pair(hyps, roundtrip_refs)
        out["bleu_roundtrip"] = corpus_bleu(hyps, roundtrip_refs)
        out["chrf_roundtrip"] = corpus_chrf(hyps, roundtrip_refs)
        out["exact_match_roundtrip"] = exact_match(hyps, roundtrip_refs)
        out["token_f1_roundtrip"] = token_f1(hyps, roundtrip_refs)
    if cosines is not None:
        c = torch.as_tensor(cosines).float()
        if c.numel() != len(hyps):
            raise ValueError(f"{c.numel()} cosines for {len(hyps)} hypotheses")
        out["cosine"] = float(c.mean()) if c.numel() else 0.0
    return out


def length_bucket(num_words: int, edges: Sequence[int] = LENGTH_BUCKET_EDGES) -> str:
    """Bucket label of a word count: with edges (10, 20, 40): '1-10' (also 0), '11-20', '21-40', '41+'."""
    lo = 1
    for hi in edges:
        if num_words <= hi:
            return f"{lo}-{hi}"
        lo = hi + 1
    return f"{lo}+"


def by_length_bucket(
    hyps: Sequence[str],
    refs: Sequence[str],
    roundtrip_refs: Sequence[str] | None = None,
    cosines: Any = None,
    edges: Sequence[int] = LENGTH_BUCKET_EDGES,
    metric_fn: Callable[..., dict[str, float]] = reconstruction_metrics,
) -> dict[str, dict[str, float]]:
    """reconstruction_metrics per reference-length bucket (word count), buckets in increasing length, empty
    buckets omitted."""
    _check_pair(hyps, refs)
    labels = [length_bucket(len(r.split()), edges) for r in refs]
    order = [length_bucket(e, edges) for e in edges] + [length_bucket(edges[-1] + 1, edges)]
    cos = None if cosines is None else torch.as_tensor(cosines).float()
    out: dict[str, dict[str, float]] = {}
    for label in order:
        idx = [i for i, lab in enumerate(labels) if lab == label]
        if not idx:
            continue
        out[label] = metric_fn(
            [hyps[i] for i in idx],
            [refs[i] for i in idx],
            roundtrip_refs=None if roundtrip_refs is None else [roundtrip_refs[i] for i in idx],
            cosines=None if cos is None else cos[idx],
        )
    return out


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table: one line per row name, one column per metric (union of keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(key for metrics in rows.values() for key in metrics))
    header = ["", *columns]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool) or isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)

    body = [[name, *(cell(metrics.get(c)) for c in columns)] for name, metrics in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def print_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None) -> None:
    print(format_table(rows, columns))
