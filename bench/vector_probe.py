"""How much of a sentence the frozen encoder's vector pins down: which words, and in which order.

    uv run python bench/vector_probe.py --config configs/fiction_minilm.yaml \\
        --data ../shared/data/eltec_eng/valid.txt --end 200
    uv run python bench/vector_probe.py --checkpoint checkpoints/RUN/latest \\
        --data ../shared/data/eltec_eng/valid.txt --end 200 --setting '{"steps": 16, "cfg_scale": 1.5}'

Each sentence is taken as the decoder can write it at best (its tokenizer round trip, decode(encode(s))) and
split into whitespace words (punctuation stays attached to the word before it, as the round trip writes it).
All cosines are to the input sentence's vector, what a decoder conditions on. With the config's encoder it
reports:

- the mean cosine to: the round trip; one adjacent pair of words swapped; one word dropped; the words shuffled;
  another sentence of the set;
- order identifiability: how often the round trip is closer to the input's vector than every one of K random
  orders of its words;
- BLEU (against the round trip) of three decoders that know every word of the sentence, the bag of words, and
  differ only in how they order it: a random order; the order closest to the vector among K random ones; and a
  hill climb on the cosine (from a random order, each round tries every adjacent swap and `--moves` random
  single-word moves and keeps the best if it raises the cosine). The climb is what the vector alone can say
  about word order; a decoder has to find the rest in its own model of the language.

With --checkpoint (its encoder and config replace --config's) it also decodes the sentences (the checkpoint's
sampling settings, overridden by --setting) and reports their BLEU, token F1 and cosine, then the same after the
climb re-orders each output's words (from the output's order; the words themselves stay).

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


def climb(starts, score, target, embed, cos, rounds: int, moves: int, rng: random.Random):
    """Hill-climb each word list's order on the cosine of its vector to its row of `target` (n, De).

    starts: n word lists; score (n,): their current cosines. Each round encodes every adjacent swap and `moves`
    random single-word moves of every list and keeps a list's best candidate if it raises that list's cosine;
    stops after `rounds` rounds or a round without a gain. Returns (word lists, cosines (n,))."""
    current = [list(w) for w in starts]
    for _ in range(rounds):
        cands = [_neighbours(w, moves, rng) for w in current]
        flat = [" ".join(c) for group in cands for c in group]
        if not flat:
            break
        owner = [i for i, group in enumerate(cands) for _ in group]
        cand_cos = cos(embed(flat), target[owner])
        improved, start = 0, 0
        for i, group in enumerate(cands):
            if group:
                j = int(cand_cos[start : start + len(group)].argmax())
                if float(cand_cos[start + j]) > float(score[i]) + 1e-6:
                    current[i], score[i] = group[j], cand_cos[start + j]
                    improved += 1
            start += len(group)
        if not improved:
            break
    return current, score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fiction_minilm.yaml", help="config whose encoder is probed")
    ap.add_argument("--checkpoint", help="also decode the sentences with this checkpoint (its encoder and config are "
                    "used instead of --config's) and climb the order of its outputs' words")
    ap.add_argument("--setting", default="{}", help="JSON dict of sampling settings for --checkpoint's decoding")
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
    if args.checkpoint and args.overrides:
        raise ConfigError("config overrides apply to --config; with --checkpoint the checkpoint's config is used "
                          "(sampling settings go in --setting)")
    if args.shuffles < 1 or args.climb_rounds < 0 or args.moves < 0:
        raise ConfigError("--shuffles must be >= 1, --climb-rounds and --moves >= 0")

    import torch

    from sgdd.config import load_config
    from sgdd.data import load_corpus
    from sgdd.encoders import build_encoder
    from sgdd.evaluation import corpus_bleu, reference_roundtrip, token_f1

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        setting = json.loads(args.setting)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--setting is not valid JSON ({err}); give a dict, e.g. '{{\"steps\": 16}}'") from None
    if not isinstance(setting, dict):
        raise ConfigError("--setting must be a JSON dict of sampling settings, e.g. '{\"steps\": 16}'")
    model = None
    if args.checkpoint:
        from sgdd.api import SGDD

        model = SGDD.from_pretrained(args.checkpoint)
        cfg = model.cfg
    else:
        cfg = load_config(args.config, args.overrides)
    pool = read_sentences(args.data) if args.data else load_corpus(cfg, valid_only=True).valid
    sents = pool[args.start : args.end]
    if not sents:
        raise ConfigError(f"no sentences in {args.start}..{args.end} (the set has {len(pool)})")
    if model is not None:
        encoder = model.encoder
        refs = reference_roundtrip(sents, model.vocab)  # as bench/quality.py and decode_grid.py score
        hyps_all = model.reconstruct(sents, seed=args.seed, **setting)
    else:
        encoder = build_encoder(cfg.encoder)
        tok = encoder.tokenizer
        refs = [tok.decode(tok.encode(s, add_special_tokens=False)) for s in sents]
    words = [r.split() for r in refs]
    keep = [i for i, w in enumerate(words) if len(set(w)) >= 2]  # one-word sentences have no order to probe
    raw, refs, words = [sents[i] for i in keep], [refs[i] for i in keep], [words[i] for i in keep]
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

    # the input sentences' vectors: what a decoder conditions on, and the climb's target
    target = embed(raw)  # (n, De)
    own = cos(embed(refs), target)  # the round trip's cosine (1 up to rounding for an uncased encoder)

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
        "cos_roundtrip": float(own.mean()),
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
    results["order_identified"] = 100.0 * float((own[:, None] > sc).all(dim=1).float().mean())
    random_order = [" ".join(group[0]) for group in shuffles]
    best_of_k = [" ".join(shuffles[i][int(sc[i].argmax())]) for i in range(n)]
    results["cos_random_order"] = float(sc[:, 0].mean())  # where the climb starts
    results["bleu_exact_words_random_order"] = corpus_bleu(random_order, refs)
    results["bleu_exact_words_best_of_k"] = corpus_bleu(best_of_k, refs)

    if args.climb_rounds:
        climbed, score = climb([list(group[0]) for group in shuffles], sc[:, 0].clone(), target, embed, cos,
                               args.climb_rounds, args.moves, rng)
        climbed = [" ".join(w) for w in climbed]
        results["bleu_exact_words_climb"] = corpus_bleu(climbed, refs)
        results["cos_climb"] = float(score.mean())
        results["climb_exact_order"] = 100.0 * sum(c == r for c, r in zip(climbed, refs, strict=True)) / n
    if model is not None:  # the checkpoint's own reconstructions, then their words re-ordered by the climb
        hyps = [hyps_all[i] for i in keep]
        hyp_words = [h.split() for h in hyps]
        hyp_cos = cos(embed([h if h.strip() else "." for h in hyps]), target)
        results["bleu_decoded"] = corpus_bleu(hyps, refs)
        results["token_f1_decoded"] = token_f1(hyps, refs)
        results["cos_decoded"] = float(hyp_cos.mean())
        if args.climb_rounds:
            moved, moved_cos = climb(hyp_words, hyp_cos.clone(), target, embed, cos, args.climb_rounds, args.moves,
                                     rng)
            results["bleu_decoded_climb"] = corpus_bleu([" ".join(w) for w in moved], refs)
            results["cos_decoded_climb"] = float(moved_cos.mean())
    results["sentences"] = n
    results["encoder_calls"] = calls
    results["seconds"] = time.perf_counter() - t0

    print(f"{args.checkpoint or args.config} encoder {cfg.encoder.name}: {n} sentences ({args.start}..{args.end}), "
          f"seed {args.seed}")
    print(f"  cosine to the input: its round trip {results['cos_roundtrip']:.3f}, adjacent swap "
          f"{results['cos_adjacent_swap']:.3f}, one word dropped {results['cos_one_word_dropped']:.3f}, shuffled "
          f"{results['cos_shuffled']:.3f}, another sentence {results['cos_other_sentence']:.3f}")
    print(f"  the sentence closer to its vector than all {args.shuffles} shuffles: {results['order_identified']:.1f} %")
    line = (f"  BLEU with every word known: random order {results['bleu_exact_words_random_order']:.2f}, "
            f"best of {args.shuffles} by cosine {results['bleu_exact_words_best_of_k']:.2f}")
    if "bleu_exact_words_climb" in results:
        line += (f", hill climb on the cosine {results['bleu_exact_words_climb']:.2f} (mean cosine "
                 f"{results['cos_climb']:.3f}, exact order {results['climb_exact_order']:.1f} %)")
    print(line)
    if "bleu_decoded" in results:
        line = (f"  {args.checkpoint} {json.dumps(setting)}: BLEU {results['bleu_decoded']:.2f}, token F1 "
                f"{results['token_f1_decoded']:.1f}, cosine {results['cos_decoded']:.3f}")
        if "bleu_decoded_climb" in results:
            line += (f"; its words re-ordered by the climb: BLEU {results['bleu_decoded_climb']:.2f}, cosine "
                     f"{results['cos_decoded_climb']:.3f}")
        print(line)
    print(f"  {results['encoder_calls']} encoder calls, {results['seconds']:.0f} s")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = {"config": None if args.checkpoint else args.config, "checkpoint": args.checkpoint, "setting": setting,
               "encoder": cfg.encoder.name, "data": args.data, "start": args.start, "end": args.end,
               "shuffles": args.shuffles, "climb_rounds": args.climb_rounds, "moves": args.moves,
               "seed": args.seed, "results": results}
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    run_main(main)
