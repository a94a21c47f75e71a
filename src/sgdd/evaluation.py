"""Reconstruction and paraphrase evaluation: metrics on strings, and the driver that makes a model decode.

The first half needs no model. The second half (`evaluate_reconstruction`, `evaluate_paraphrase`,
`evaluate_checkpoint` for src/evaluate.py, `format_report` / `print_report`, `render_ids` for
generate.py --show-steps) drives an sgdd.api.SGDD through its public methods, so what is scored is exactly
what users get: text produced by the sampler, never teacher-forced loss alone.

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

import contextlib
import json
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------------------
# the evaluation driver: a model (sgdd.api.SGDD) decodes, the functions above score


def render_ids(vocab: Any, ids: Sequence[int], mask_symbol: str = "_") -> str:
    """Decoder ids of a (possibly partly masked) row -> text with every MASK shown as `mask_symbol`.

    Follows vocab.decode (stops at the first EOS, skips PAD), so a row without MASK renders exactly as
    vocab.decode renders it. Masks are decoded as the tokenizer's own mask token and then replaced, so a
    WordPiece continuation after a mask attaches to it ("_ing") as it would to a word.
    """
    ids = [int(i) for i in ids]
    if vocab.MASK not in ids[: ids.index(vocab.EOS) if vocab.EOS in ids else len(ids)]:
        return vocab.decode(ids)
    tok = vocab.tokenizer
    mask_token, mask_enc = getattr(tok, "mask_token", None), getattr(tok, "mask_token_id", None)
    special = set(getattr(tok, "all_special_ids", []))
    if mask_token is None or mask_enc is None:  # no mask token: decode the runs between masks separately
        pieces, run = [], []
        for d in ids:
            if d == vocab.EOS:
                break
            if d == vocab.MASK:
                pieces.extend([vocab.decode(run)] if run else [])
                pieces.append(mask_symbol)
                run = []
            elif d != vocab.PAD:
                run.append(d)
        pieces.extend([vocab.decode(run)] if run else [])
        return " ".join(p for p in pieces if p)
    enc: list[int] = []
    for d in ids:
        if d == vocab.EOS:
            break
        if d == vocab.MASK:
            enc.append(mask_enc)
        elif d != vocab.PAD and 0 <= d < len(vocab.encoder_ids) and vocab.encoder_ids[d] not in special:
            enc.append(vocab.encoder_ids[d])
    text = tok.decode(enc, skip_special_tokens=False, clean_up_tokenization_spaces=True)
    return text.replace(mask_token, mask_symbol).strip()


def _vocab_is_cased(vocab: Any) -> bool:
    """Whether the decoder's tokenizer keeps case (the bundled MiniLM's BERT WordPiece lowercases)."""
    probe = "The Cat"
    tok = vocab.tokenizer
    return tok.decode(tok(probe, add_special_tokens=False)["input_ids"]) == probe


def _sampling_settings(model: Any, seed: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings an API call with these overrides uses (checkpoint config + overrides)."""
    import dataclasses

    resolved = {
        **dataclasses.asdict(model.cfg.sampling),
        **{k: v for k, v in overrides.items() if v is not None},
    }
    return {**resolved, "seed": seed}


@torch.no_grad()
def sequence_nll(
    model: Any, texts: Sequence[str], latents: torch.Tensor, batch_size: int, num_t: int = 8, seed: int = 0
) -> float | None:
    """Mean per-token NLL bound (nats, the process's `nll`) of the texts' own tokens given their posterior
    means `latents` (N, Dz); batches padded as the training loop pads its validation batches (pad_slack // 2),
    so the number is comparable to training's valid/nll. None when the process has no `nll` or num_t == 0."""
    from sgdd.data import make_batch
    from sgdd.precision import autocast

    nll_fn = getattr(model.process, "nll", None)
    if nll_fn is None or num_t <= 0 or not texts:
        return None
    cfg = model.cfg
    tokens = model.vocab.encode_batch(list(texts))
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x0 = make_batch(tokens[i : i + batch_size], cfg.data.max_length, cfg.data.pad_slack // 2).to(
            model.device
        )
        z = latents[i : i + batch_size].to(model.device)
        with autocast(cfg.training.precision, model.device):
            per_row = nll_fn(model.net.decoder, x0, z, num_t=num_t, seed=seed)  # (B,)
        total += float(per_row.float().sum())
        count += x0.shape[0]
    return total / count


@contextlib.contextmanager
def _input_encoding_timer(model: Any) -> Iterator[dict[str, Any]]:
    """Within the block, the first call of the model's frozen encoder (an API call encoding its inputs) is
    timed and its vectors kept: yields {"seconds", "vectors" (N, De) float32 on CPU}. Later encoder calls
    (rerank re-encoding candidates) count as decoding. The encoder is loaded before the block starts."""
    encoder = model.encoder
    found: dict[str, Any] = {"seconds": 0.0, "vectors": None}
    original = encoder.encode

    def timed(texts, *args, **kwargs):
        t0 = time.perf_counter()
        out = original(texts, *args, **kwargs)
        if found["vectors"] is None:
            found["seconds"] = time.perf_counter() - t0
            found["vectors"] = out.detach().float().cpu()
        return out

    encoder.encode = timed  # an instance attribute shadows the method for the duration of the block
    try:
        yield found
    finally:
        del encoder.encode
    if found["vectors"] is None:
        raise RuntimeError("the model decoded without encoding its inputs through model.encoder")


def _encode_outputs(model: Any, texts: Sequence[str]) -> torch.Tensor:
    """Frozen-encoder vectors of generated texts (N, De); unlike model.encode, empty outputs are allowed."""
    return model.encoder.encode(list(texts), batch_size=model.cfg.encoder.batch_size).float().cpu()


def evaluate_reconstruction(
    model: Any,
    sentences: Sequence[str],
    steps: int | None = None,
    cfg_scale: float | None = None,
    sampler: str | None = None,
    rerank: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    num_examples: int | None = None,
    nll_steps: int = 8,
    **sampling: Any,
) -> dict[str, Any]:
    """Reconstruct `sentences` through the sampler (model.reconstruct) and score the generated text.

    model: a loaded sgdd.api.SGDD. steps / cfg_scale / sampler / rerank / batch_size (and any other
    SamplingConfig field in `sampling`) override the checkpoint's sampling config; None keeps it.
    Returns a JSON-ready dict:
      metrics    flat: bleu, chrf, exact_match, token_f1, length_ratio against the inputs as written, the
                 same with `_roundtrip` against each input's tokenizer round trip, exact_match_ceiling
                 (raw exact match of the round trip itself: the best any model with this vocabulary can
                 reach), cosine (mean, input vector vs re-encoded output), nll_per_token (None when the
                 process has no nll), sentences_per_s (decoding only), end_to_end_sentences_per_s
                 (encoding the inputs + decoding), num_sentences;
      by_length  the string metrics per input length bucket (words);
      settings   the resolved sampling settings (steps, cfg_scale, sampler, rerank, seed, ...);
      timing     seconds spent encoding, decoding (incl. rerank), scoring the NLL;
      vocab      {"cased": bool, "size": int};
      examples   [{input, output, reference_roundtrip, cosine}] (the first num_examples; None = all);
      checkpoint the folder the model was loaded from (None for an in-memory model).
    Decoding speed is the reconstruct() wall time minus a separate timed encoding of the same inputs.
    """
    from sgdd.api import check_texts

    texts = check_texts(list(sentences))
    overrides = dict(
        steps=steps, cfg_scale=cfg_scale, sampler=sampler, rerank=rerank, batch_size=batch_size, **sampling
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    N = len(texts)
    with _input_encoding_timer(model) as enc:
        t0 = time.perf_counter()
        outputs = model.reconstruct(texts, seed=seed, **overrides)
        end_to_end_s = time.perf_counter() - t0
    e_in, encode_s = enc["vectors"], enc["seconds"]  # (N, De) float32: the inputs' vectors
    decode_s = max(end_to_end_s - encode_s, 1e-9)

    cos = cosine(e_in.cpu(), _encode_outputs(model, outputs))  # (N,)
    roundtrip = reference_roundtrip(texts, model.vocab)
    metrics: dict[str, Any] = reconstruction_metrics(outputs, texts, roundtrip, cos)
    metrics.pop("n")
    metrics["exact_match_ceiling"] = exact_match(roundtrip, texts)

    t0 = time.perf_counter()
    with torch.no_grad():
        mu, _ = model.net.vib.posterior(e_in.to(model.device))
    bs = overrides.get("batch_size", model.cfg.sampling.batch_size)
    metrics["nll_per_token"] = sequence_nll(model, texts, mu, bs, num_t=nll_steps, seed=seed)
    nll_s = time.perf_counter() - t0

    metrics["sentences_per_s"] = N / decode_s
    metrics["end_to_end_sentences_per_s"] = N / end_to_end_s
    metrics["num_sentences"] = N
    examples = [
        {"input": t, "output": o, "reference_roundtrip": r, "cosine": float(c)}
        for t, o, r, c in zip(texts, outputs, roundtrip, cos.tolist(), strict=True)
    ]
    return {
        "kind": "reconstruction",
        "metrics": metrics,
        "by_length": by_length_bucket(outputs, texts, roundtrip, cos),
        "settings": _sampling_settings(model, seed, overrides),
        "timing": {"encode_s": encode_s, "decode_s": decode_s, "end_to_end_s": end_to_end_s, "nll_s": nll_s},
        "vocab": {"cased": _vocab_is_cased(model.vocab), "size": len(model.vocab)},
        "examples": examples if num_examples is None else examples[:num_examples],
        "checkpoint": None if model.source is None else str(model.source),
    }


def evaluate_paraphrase(
    model: Any,
    sentences: Sequence[str],
    n: int = 5,
    temperature: float = 1.0,
    cfg_scale: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    num_examples: int | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """n paraphrases per sentence (model.paraphrase: z drawn from the VIB posterior, tokens sampled at
    `temperature`), scored for diversity and faithfulness.

    metrics: self_bleu (0-100, within each input's set; lower = more diverse), distinct_2 (0-1, higher = more
    diverse), cosine (mean over all paraphrases of input vector vs paraphrase vector), bleu / chrf /
    token_f1 / exact_match / length_ratio of the paraphrases against their input (as written, and `_roundtrip`
    against its tokenizer round trip), sentences_per_s (paraphrases decoded per second),
    end_to_end_sentences_per_s, num_sentences (inputs), num_paraphrases (n).
    by_length: those metrics per input length bucket. examples: [{input, outputs, cosines}].
    """
    from sgdd.api import InputError, check_texts

    texts = check_texts(list(sentences))
    if n < 1:
        raise InputError(f"the number of paraphrases per sentence must be at least 1, got {n}")
    overrides = dict(steps=steps, sampler=sampler, batch_size=batch_size, **sampling)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    N = len(texts)
    with _input_encoding_timer(model) as enc:
        t0 = time.perf_counter()
        groups = model.paraphrase(
            texts, n=n, temperature=temperature, cfg_scale=cfg_scale, seed=seed, **overrides
        )
        end_to_end_s = time.perf_counter() - t0
    e_in, encode_s = enc["vectors"], enc["seconds"]
    decode_s = max(end_to_end_s - encode_s, 1e-9)

    flat = [p for g in groups for p in g]
    refs = [t for t in texts for _ in range(n)]
    roundtrip = [r for r in reference_roundtrip(texts, model.vocab) for _ in range(n)]
    cos = cosine(e_in.cpu().repeat_interleave(n, 0), _encode_outputs(model, flat))  # (N * n,)
    metrics: dict[str, Any] = reconstruction_metrics(flat, refs, roundtrip, cos)
    metrics.pop("n")
    diversity = paraphrase_diversity(groups)
    metrics["self_bleu"] = diversity["self_bleu"] if n >= 2 else None
    metrics["distinct_2"] = diversity["distinct_2"] if n >= 2 else None
    metrics["sentences_per_s"] = len(flat) / decode_s
    metrics["end_to_end_sentences_per_s"] = len(flat) / end_to_end_s
    metrics["num_sentences"] = N
    metrics["num_paraphrases"] = n
    cos_rows = cos.view(N, n).tolist()
    examples = [
        {"input": t, "outputs": g, "cosines": c} for t, g, c in zip(texts, groups, cos_rows, strict=True)
    ]
    settings = _sampling_settings(
        model, seed, {**overrides, "temperature": temperature, "cfg_scale": cfg_scale, "greedy": False}
    )
    return {
        "kind": "paraphrase",
        "metrics": metrics,
        "by_length": by_length_bucket(flat, refs, roundtrip, cos),
        "settings": {**settings, "num_paraphrases": n},
        "timing": {"encode_s": encode_s, "decode_s": decode_s, "end_to_end_s": end_to_end_s},
        "vocab": {"cased": _vocab_is_cased(model.vocab), "size": len(model.vocab)},
        "examples": examples if num_examples is None else examples[:num_examples],
        "checkpoint": None if model.source is None else str(model.source),
    }


# ---------------------------------------------------------------------------------------------------------
# printing a report

_METRIC_ROWS = (  # (label, raw key, round-trip key)
    ("BLEU", "bleu", "bleu_roundtrip"),
    ("chrF", "chrf", "chrf_roundtrip"),
    ("exact match %", "exact_match", "exact_match_roundtrip"),
    ("token F1", "token_f1", "token_f1_roundtrip"),
    ("length ratio", "length_ratio", None),
)


def format_report(report: Mapping[str, Any], num_examples: int = 5) -> str:
    """A report of evaluate_reconstruction / evaluate_paraphrase as plain text: settings, the metrics
    against raw and round-trip references, the by-length table, speed and a few `in -> out` examples."""
    m, s = report["metrics"], report["settings"]
    para = report.get("kind") == "paraphrase"
    against = "input" if para else "reference"
    lines = [
        f"{'paraphrase' if para else 'reconstruction'}: {m['num_sentences']} sentences"
        + (f" x {m['num_paraphrases']} paraphrases" if para else "")
        + f"  |  checkpoint {report.get('checkpoint')}",
        f"sampler {s.get('sampler')}, {s.get('steps')} steps, cfg scale {s.get('cfg_scale')}, "
        f"rerank {s.get('rerank')}, seed {s.get('seed')}"
        + (f", temperature {s.get('temperature')}" if para else ""),
        "",
    ]
    rows = {
        label: {f"vs raw {against}": m.get(raw), "vs round trip": m.get(rt) if rt else None}
        for label, raw, rt in _METRIC_ROWS
    }
    lines.append(format_table(rows))
    extra = [
        ("cosine (input vector vs output vector)", m.get("cosine")),
        ("self-BLEU (lower = more diverse)", m.get("self_bleu") if para else None),
        ("distinct-2", m.get("distinct_2") if para else None),
        ("NLL / token (nats, bound)", None if para else m.get("nll_per_token")),
    ]
    for label, v in extra:
        if v is not None:
            lines.append(f"{label:<42}{v:.4f}")
    if not para:
        if m.get("nll_per_token") is None:
            lines.append(f"{'NLL / token':<42}- (this diffusion process has no likelihood bound)")
        lines.append(f"{'exact-match ceiling vs raw reference %':<42}{m.get('exact_match_ceiling', 0.0):.2f}")
    lines.append("")
    lines.append(
        f"raw = against the {'input' if para else 'input sentence'} as written; round trip = against "
        "decode(encode(input)), the best the decoder vocabulary can write."
    )
    if not report.get("vocab", {}).get("cased", True):
        lines.append(
            "the decoder vocabulary is uncased (e.g. the bundled MiniLM's): it cannot reproduce capitals, so exact "
            "match against raw references is ~0 by construction; read the round-trip column."
        )
    what = "paraphrases" if para else "sentences"
    lines.append(
        f"speed: {m['sentences_per_s']:.1f} {what}/s decoding, {m['end_to_end_sentences_per_s']:.1f} {what}/s "
        "end to end (incl. encoding the inputs)"
    )
    by_length = report.get("by_length") or {}
    if by_length:
        cols = ["n", "bleu", "bleu_roundtrip", "chrf", "token_f1", "exact_match_roundtrip", "cosine"]
        lines += ["", "by input length (words):", format_table(by_length, cols)]
    examples = report.get("examples") or []
    if examples and num_examples > 0:
        lines += ["", "examples:"]
        for ex in examples[:num_examples]:
            if para:
                lines.append(f"  in:  {ex['input']}")
                lines += [f"   -> {o}" for o in ex["outputs"][:3]]
            else:
                lines.append(f"  in:  {ex['input']}")
                lines.append(f"  out: {ex['output'] or '(empty)'}   (cosine {ex['cosine']:.3f})")
    return "\n".join(lines)


def print_report(report: Mapping[str, Any], num_examples: int = 5) -> None:
    print(format_report(report, num_examples))


# ---------------------------------------------------------------------------------------------------------
# evaluate.py


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    num_samples: int = 200,
    mode: str = "reconstruct",
    output: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
    num_paraphrases: int = 5,
    temperature: float = 1.0,
    **settings: Any,
) -> dict[str, Any]:
    """Load a checkpoint, evaluate it on `data` (a UTF-8 file, one sentence per line; default: the checkpoint
    config's validation split), print the report and write it as JSON to `output` when given.

    num_samples: the first N sentences (0 = all). settings: steps, cfg_scale, sampler, rerank, batch_size
    (None keeps the checkpoint's sampling config). The JSON holds the report of evaluate_reconstruction /
    evaluate_paraphrase plus config (the checkpoint's resolved config), checkpoint_meta (step, kind, run name,
    save time from meta.json) and data (where the sentences came from, how many).
    """
    from sgdd.api import SGDD, InputError
    from sgdd.cli import read_sentences
    from sgdd.config import config_to_dict
    from sgdd.registry import ConfigError

    if mode not in ("reconstruct", "paraphrase"):
        raise InputError(f"unknown evaluation mode '{mode}'; choose reconstruct or paraphrase")
    if num_samples < 0:
        raise InputError(f"the number of sentences must be >= 0 (0 = all), got {num_samples}")
    if mode == "paraphrase" and (settings.get("rerank") or 1) > 1:
        raise InputError("rerank applies to reconstruction; drop it for --mode paraphrase")
    if mode == "paraphrase" and (settings.get("refine") or 0) > 0:
        raise InputError("refine applies to reconstruction; drop it for --mode paraphrase")
    sentences = read_sentences(data) if data is not None else None  # a bad file fails before loading anything
    model = SGDD.from_pretrained(checkpoint, device=device)
    if sentences is None:
        from sgdd.data import load_corpus

        try:
            sentences = load_corpus(model.cfg, tokenizer=model.vocab.tokenizer, valid_only=True).valid
        except ConfigError as exc:
            raise InputError(
                f"cannot load the checkpoint config's validation split ({exc}); pass --data FILE"
            ) from None
        source = f"validation split (data.source = {model.cfg.data.source})"
    else:
        source = str(data)
    if num_samples:
        sentences = sentences[:num_samples]

    if mode == "reconstruct":
        report = evaluate_reconstruction(model, sentences, seed=seed, **settings)
    else:
        report = evaluate_paraphrase(
            model, sentences, n=num_paraphrases, temperature=temperature, seed=seed, **settings
        )
    meta_path = Path(model.source) / "meta.json" if model.source is not None else None
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path and meta_path.is_file() else {}
    report["checkpoint_meta"] = {k: meta.get(k) for k in ("step", "kind", "run_name", "saved_at")}
    report["config"] = config_to_dict(model.cfg)
    report["data"] = {"source": source, "num_sentences": len(sentences)}
    print_report(report)
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {out}")
    return report
