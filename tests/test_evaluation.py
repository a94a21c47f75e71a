"""String metrics on hand-computed examples, and best-of-K reranking with a fake encoder."""

import math

import numpy as np
import pytest
import torch

from sgdd import evaluation as ev
from sgdd.sampling.rerank import pick_best

# ---------------------------------------------------------------------------------------------------------
# rerank


def fake_encode(texts):
    """2-d 'embedding': (number of words, number of letters 'a')."""
    return torch.tensor([[len(t.split()), t.count("a")] for t in texts], dtype=torch.float32)


def test_rerank_returns_the_highest_cosine_candidate():
    candidates = [["a a a", "b b b b", "a b"], ["x", "aaaa y", "aaa"]]
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return fake_encode(texts)

    chosen, cos = pick_best(candidates, inputs, encode)
    assert len(calls) == 1 and len(calls[0]) == 6  # one batch of B*K
    assert cos.shape == (2, 3)
    # row 0: vectors (3,3), (4,0), (2,1) vs (1,0): cosines 0.707, 1.0, 0.894
    torch.testing.assert_close(cos[0], torch.tensor([1 / math.sqrt(2), 1.0, 2 / math.sqrt(5)]))
    assert chosen == ["b b b b", "aaa"]  # row 1: (1,0), (2,4), (1,3) vs (0,1): 0, 0.894, 0.949
    tie, _ = pick_best([["xa", "ya"]], torch.tensor([[0.0, 1.0]]), fake_encode)  # equal vectors: first wins
    assert tie == ["xa"]


def test_rerank_accepts_numpy_and_checks_shapes():
    chosen, _ = pick_best([["a", "b"]], np.array([[1.0, 1.0]]), lambda t: fake_encode(t).numpy())
    assert chosen == ["a"]
    with pytest.raises(ValueError):
        pick_best([["a", "b"], ["c"]], torch.ones(2, 2), fake_encode)
    with pytest.raises(ValueError):
        pick_best([["a"]], torch.ones(2, 2), fake_encode)


# ---------------------------------------------------------------------------------------------------------
# metrics


def test_exact_match_normalises_whitespace_only():
    hyps = ["the cat  sat", "The cat sat", " a dog ", "x"]
    refs = ["the cat sat", "the cat sat", "a dog", "y"]
    assert ev.exact_match(hyps, refs) == 50.0


def test_token_f1_by_hand():
    # bags: hyp {cat, sat, down}, ref {cat, sat, on, mat}; 'the' is an article, punctuation dropped
    # common 2: precision 2/3, recall 2/4 -> F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert ev.token_f1_single("The cat sat down.", "the cat sat on the mat") == pytest.approx(4 / 7)
    assert ev.token_f1_single("Hello, World!", "hello world") == 1.0
    assert ev.token_f1_single("", "") == 1.0
    assert ev.token_f1_single("a", "dog") == 0.0  # the hypothesis bag is empty
    assert ev.token_f1(["x y", "x y"], ["x y", "z w"]) == pytest.approx(50.0)
    # repeated words count with multiplicity: hyp {go, go, go}, ref {go} -> P 1/3, R 1 -> F1 1/2
    assert ev.token_f1_single("go go go", "go") == pytest.approx(0.5)


def test_distinct_2_by_hand():
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 5 bigrams, unique {ab, ba, bc} = 3
    assert ev.distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert ev.distinct_n(["one"], 2) == 0.0
    assert ev.distinct_n(["a b c d"], 1) == 1.0


def test_bleu_chrf_identical_and_unrelated():
    refs = ["the quick brown fox jumps over the lazy dog", "she sold sea shells by the sea shore today"]
    assert ev.corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert ev.corpus_chrf(refs, refs) == pytest.approx(100.0)
    unrelated = ["completely different words appear in this line", "nothing here matches anything at all"]
    assert ev.corpus_bleu(unrelated, refs) < 5.0
    assert ev.corpus_chrf(unrelated, refs) < 30.0
    assert ev.corpus_bleu([], []) == 0.0


def test_length_ratio_and_cosine():
    assert ev.length_ratio(["a b", "c"], ["a b c", "d e f"]) == pytest.approx(0.5)
    c = ev.cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 2.0], [2.0, 2.0]]))
    torch.testing.assert_close(c, torch.tensor([0.0, 1.0]))


def test_self_bleu_and_paraphrase_diversity():
    same = ["the cat sat on the mat", "the cat sat on the mat"]
    assert ev.self_bleu(same) == pytest.approx(100.0)
    div = ev.paraphrase_diversity([same, ["red green blue yellow", "one two three four"], ["lonely"]])
    assert div["groups"] == 2
    # distinct-2 per group: identical pair 5 unique / 10 = 0.5; disjoint pair 6 / 6 = 1.0
    assert div["distinct_2"] == pytest.approx(0.75)
    assert div["self_bleu"] < 55.0
    with pytest.raises(ValueError):
        ev.self_bleu(["only one"])


def test_reference_roundtrip_labels_both_scores():
    class LowerVocab:
        def encode(self, text):
            return text.lower().split()

        def decode(self, ids):
            return " ".join(ids)

    refs = ["The Cat sat .", "A Dog ran ."]
    hyps = ["the cat sat .", "a dog ran ."]
    rt = ev.reference_roundtrip(refs, LowerVocab())
    assert rt == hyps
    assert ev.reference_roundtrip(refs, str.upper) == ["THE CAT SAT .", "A DOG RAN ."]
    m = ev.reconstruction_metrics(hyps, refs, roundtrip_refs=rt, cosines=torch.tensor([0.5, 1.0]))
    assert m["exact_match"] == 0.0 and m["exact_match_roundtrip"] == 100.0
    assert m["bleu_roundtrip"] == pytest.approx(100.0) and m["bleu"] < 100.0
    assert m["token_f1"] == 100.0  # token F1 is case-insensitive anyway
    assert m["cosine"] == pytest.approx(0.75) and m["n"] == 2


def test_length_buckets():
    assert [ev.length_bucket(n) for n in (0, 1, 10, 11, 20, 21, 40, 41, 300)] == [
        "1-10",
        "1-10",
        "1-10",
        "11-20",
        "11-20",
        "21-40",
        "21-40",
        "41+",
        "41+",
    ]
    refs = ["w " * 5, "w " * 15, "w " * 3, "w " * 50]
    hyps = list(refs)
    hyps[1] = "nope"
    rows = ev.by_length_bucket(hyps, refs, cosines=[1.0, 0.0, 1.0, 0.5])
    assert list(rows) == ["1-10", "11-20", "41+"]
    assert rows["1-10"]["n"] == 2 and rows["1-10"]["exact_match"] == 100.0
    assert rows["11-20"]["exact_match"] == 0.0 and rows["11-20"]["cosine"] == 0.0
    assert rows["41+"]["cosine"] == 0.5


def test_format_table():
    text = ev.format_table({"all": {"n": 3, "bleu": 12.3456}, "1-10": {"n": 1, "bleu": 0.5}})
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["n", "bleu"]
    assert lines[2].split() == ["all", "3", "12.35"]
    assert lines[3].split() == ["1-10", "1", "0.5000"]
