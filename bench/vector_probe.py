"""How much of a sentence the frozen encoder's vector pins down: which words, and in which order. No decoder.

    uv run python bench/vector_probe.py --config configs/fiction_minilm.yaml \\
        --data ../shared/data/eltec_eng/valid.txt --end 200

Each sentence is taken as the encoder's tokenizer writes it back (decode(encode(s)), what an uncased decoder can
reach at best) and split into words. With the config's encoder it reports:

- the mean cosine between the sentence's vector and that of: one adjacent pair of words swapped, one word
  dropped, all words shuffled, another sentence of the set;
- order identifiability: how often the sentence's own vector is closer to the sentence than to every one of K
  random orders of its words;
- BLEU (against the round trip) of three decoders that know every word of the sentence, the bag of words, and
  differ only in how they order it: a random order; the order closest to the vector among K random ones; and a
  hill climb on the cosine (from a random order, each round tries every adjacent swap and `--moves` random
  single-word moves and keeps the best if it raises the cosine). The climb is what the vector alone can say
  about word order; a decoder has to find the rest in its own model of the language.

Numbers go to stdout and, with --output, to JSON. The probe is CPU-heavy only in the climb (about
sentences x rounds x (words + moves) encoder calls).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _shuffled(words: list[str], rng: random.Random) -> list[str]:
    """A random order of `words` that differs from the given one whenever the words allow it."""
    out = list(words)
    if len(set(words)) < 2:
        return out
    while out == words:
        rng.shuffle(out)
    return out


def _neighbours(words: list[str], moves: int, rng: random.Random) -> list[list[str]]:
    """Every adjacent swap of `words` and `moves` random single-word moves (word i taken out, put back at j)."""
    n = len(words)
    out = []
    for i in range(n - 1):
        if words[i] != words[i + 1]:
            cand = list(words)
            cand[i], cand[i + 1] = cand[i + 1], cand[i]
            out.append(cand)
    for _ in range(moves if n > 2 else 0):
        i, j = rng.randrange(n), rng.randrange(n)
        if abs(i - j) < 2:
            continue
        cand = list(words)
        cand.insert(j, cand.pop(i))
        out.append(cand)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fiction_minilm.yaml", help="config whose encoder is probed")
    ap.add_argument("--data", help="UTF-8 text file, one sentence per line (default: the config's validation split)")
    ap.add_argument("--start", type=int, default=0, help="first sentence (0-based)")
    ap.add_argument("--end", type=int, default=200, help="one past the last sentence")
    ap.add_argument("--shuffles", type=int, default=16, help="K random orders per sentence")
    ap.add_argument("--climb-rounds", type=int, default=15, help="hill-climbing rounds (0 = no climb)")
    ap.add_argument("--moves", type=int, default=24, help="random single-word moves tried per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--output", help="write the numbers as JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. encoder.name=...")
    args = ap.parse_args()

    from sgdd.cli import read_sentences
    from sgdd.registry import ConfigError

    if not 0 <= args.start < args.end:
        raise ConfigError(f"need 0 <= --start < --end, got {args.start} and {args.end}")
    if args.shuffles < 1 or args.climb_rounds < 0 or args.moves < 0:
        raise ConfigError("--shuffles must be >= 1, --climb-rounds and --moves >= 0")

    import torch

    from sgdd.config import load_config
    from sgdd.data import load_corpus
    from sgdd.encoders import build_encoder
    from sgdd.evaluation import corpus_bleu

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    pool = read_sentences(args.data) if args.data else load_corpus(cfg, valid_only=True).valid
    sents = pool[args.start : args.end]
    if not sents:
        raise ConfigError(f"no sentences in {args.start}..{args.end} (the set has {len(pool)})")
    encoder = build_encoder(cfg.encoder)
    tok = encoder.tokenizer
    refs = [tok.decode(tok.encode(s, add_special_tokens=False)) for s in sents]
    words = [r.split() for r in refs]
    keep = [i for i, w in enumerate(words) if len(set(w)) >= 2]  # one-word sentences have no order to probe
    refs, words = [refs[i] for i in keep], [words[i] for i in keep]
    n = len(refs)
    if n < 2:
        raise ConfigError("need at least two sentences of two or more distinct words")
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    calls = 0

    def embed(texts: list[str]) -> torch.Tensor:
        nonlocal calls
        calls += len(texts)
        return encoder.encode(texts)

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)

    target = embed(refs)  # (n, De)

    def variant_cosine(make) -> float:
        texts = [" ".join(make(w)) for w in words]
        return float(cos(embed(texts), target).mean())

    def swap_one(w):
        i = rng.randrange(len(w) - 1)
        w = list(w)
        w[i], w[i + 1] = w[i + 1], w[i]
        return w

    def drop_one(w):
        w = list(w)
        w.pop(rng.randrange(len(w)))
        return w

    results: dict[str, float] = {
        "cos_adjacent_swap": variant_cosine(swap_one),
        "cos_one_word_dropped": variant_cosine(drop_one),
        "cos_shuffled": variant_cosine(lambda w: _shuffled(w, rng)),
    }
    other = [(i + 1 + rng.randrange(n - 1)) % n for i in range(n)]
    results["cos_other_sentence"] = float(cos(target[other], target).mean())

    # K random orders per sentence
    shuffles = [[_shuffled(w, rng) for _ in range(args.shuffles)] for w in words]
    flat = [" ".join(s) for group in shuffles for s in group]
    sc = cos(embed(flat).view(n, args.shuffles, -1), target[:, None, :])  # (n, K)
    own = cos(target, target)  # 1 up to rounding
    results["order_identified"] = 100.0 * float((own[:, None] > sc).all(dim=1).float().mean())
    random_order = [" ".join(group[0]) for group in shuffles]
    best_of_k = [" ".join(shuffles[i][int(sc[i].argmax())]) for i in range(n)]
    results["cos_random_order"] = float(sc[:, 0].mean())  # where the climb starts
    results["bleu_exact_words_random_order"] = corpus_bleu(random_order, refs)
    results["bleu_exact_words_best_of_k"] = corpus_bleu(best_of_k, refs)

    if args.climb_rounds:
        current = [list(group[0]) for group in shuffles]
        score = sc[:, 0].clone()
        for _ in range(args.climb_rounds):
            cands = [_neighbours(w, args.moves, rng) for w in current]
            flat = [" ".join(c) for group in cands for c in group]
            if not flat:
                break
            vecs = embed(flat)
            owner = torch.tensor([i for i, group in enumerate(cands) for _ in group])
            cand_cos = cos(vecs, target[owner])
            improved = 0
            start = 0
            for i, group in enumerate(cands):
                if group:
                    j = int(cand_cos[start : start + len(group)].argmax())
                    if float(cand_cos[start + j]) > float(score[i]) + 1e-6:
                        current[i], score[i] = group[j], cand_cos[start + j]
                        improved += 1
                start += len(group)
            if not improved:
                break
        climbed = [" ".join(w) for w in current]
        results["bleu_exact_words_climb"] = corpus_bleu(climbed, refs)
        results["cos_climb"] = float(score.mean())
        results["climb_exact_order"] = 100.0 * sum(c == r for c, r in zip(climbed, refs, strict=True)) / n
    results["sentences"] = n
    results["encoder_calls"] = calls
    results["seconds"] = time.perf_counter() - t0

    print(f"{args.config} encoder {cfg.encoder.name}: {n} sentences ({args.start}..{args.end}), seed {args.seed}")
    print(f"  cosine to the sentence: adjacent swap {results['cos_adjacent_swap']:.3f}, one word dropped "
          f"{results['cos_one_word_dropped']:.3f}, shuffled {results['cos_shuffled']:.3f}, another sentence "
          f"{results['cos_other_sentence']:.3f}")
    print(f"  the sentence closer to its vector than all {args.shuffles} shuffles: {results['order_identified']:.1f} %")
    line = (f"  BLEU with every word known: random order {results['bleu_exact_words_random_order']:.2f}, "
            f"best of {args.shuffles} by cosine {results['bleu_exact_words_best_of_k']:.2f}")
    if "bleu_exact_words_climb" in results:
        line += (f", hill climb on the cosine {results['bleu_exact_words_climb']:.2f} (mean cosine "
                 f"{results['cos_climb']:.3f}, exact order {results['climb_exact_order']:.1f} %)")
    print(line)
    print(f"  {results['encoder_calls']} encoder calls, {results['seconds']:.0f} s")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = {"config": args.config, "encoder": cfg.encoder.name, "data": args.data, "start": args.start,
               "end": args.end, "shuffles": args.shuffles, "climb_rounds": args.climb_rounds, "moves": args.moves,
               "seed": args.seed, "results": results}
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    run_main(main)
