"""How much a better bag would buy a bag-token decoder (model.bag_tokens > 0): decode the same held-out sentences
with the bag its own head predicts, with an oracle bag and with another sentence's bag; no training.

    uv run python bench/bag_oracle.py --checkpoint checkpoints/RUN/latest --end 400 \\
        --setting '{"steps": 16, "cfg_scale": 1.5}'

The oracle bag of a sentence holds its own content ids (the ids its bag may hold: the most frequent training ids
and the specials left out), up to K of them, ranked by the head's scores, and fills the remaining slots with the
head's best other ids. It is a diagnostic, not a decoding option: the true words are not known at decoding time.
If the oracle decodes far better than the head's own bag, the bag's quality is the lever (a stronger bag-of-words
predictor); if not, the decoder does not use what the bag offers. The third bag, the head's bag of the next
sentence in the set, is the control: how far the decoder leans on its bag at all.

Prints BLEU / token F1 against the tokenizer round trip, BLEU against the raw input, the length ratio, and the
bag's recall of the sentence's content ids, for each bag; --output writes JSON. The oracle bag reaches the
decoder by replacing the decoder's `bag_ids` for the rows whose latent is a sentence's posterior mean (looked up by
value; the guidance pass's null latent keeps the head's bag); the script reports how many rows it replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def oracle_bags(head_ids, content: list[list[int]]):
    """head_ids (N, K) the head's ranking; content: each sentence's content ids, ranked -> (N, K) oracle bags."""
    import torch

    out = head_ids.clone()
    K = head_ids.shape[1]
    for i, ids in enumerate(content):
        own = list(dict.fromkeys(ids))[:K]
        fill = [j for j in head_ids[i].tolist() if j not in set(own)]
        out[i] = torch.as_tensor((own + fill)[:K])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--end", type=int, default=400)
    ap.add_argument("--data", help="UTF-8 text file, one sentence per line (default: the validation split)")
    ap.add_argument("--setting", default="{}", help="JSON dict of sampling settings over the checkpoint's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output")
    args = ap.parse_args()

    import torch

    from sgdd.api import SGDD
    from sgdd.cli import read_sentences
    from sgdd.data import load_corpus
    from sgdd.evaluation import corpus_bleu, length_ratio, reference_roundtrip, token_f1
    from sgdd.registry import ConfigError

    model = SGDD.from_pretrained(args.checkpoint)
    dec = model.net.decoder
    if getattr(dec, "num_bag", 0) == 0:
        raise ConfigError(f"{args.checkpoint} has no bag tokens (model.bag_tokens = 0): nothing to compare")
    try:
        setting = json.loads(args.setting)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--setting is not valid JSON ({err}); give a dict, e.g. '{{\"steps\": 16}}'") from None
    if not isinstance(setting, dict):
        raise ConfigError("--setting must be a JSON dict of sampling settings, e.g. '{\"steps\": 16}'")
    if not 0 <= args.start < args.end:
        raise ConfigError(f"need 0 <= --start < --end, got {args.start} and {args.end}")
    pool = read_sentences(args.data) if args.data else load_corpus(model.cfg, valid_only=True).valid
    refs = pool[args.start : args.end]
    if not refs:
        raise ConfigError(f"no sentences in {args.start}..{args.end} (the set has {len(pool)})")
    roundtrip = reference_roundtrip(refs, model.vocab)
    cfg = model._sampling_cfg(**setting)
    with torch.no_grad():
        mu, _ = model.net.vib.posterior(model.encode(refs).to(model.device))
        head = dec.bag_ids(mu)  # (N, K)
        scores = dec.bow_logits(mu).float()
    allowed = dec.bag_allowed
    content = []
    for i, s in enumerate(refs):
        ids = [j for j in dict.fromkeys(model.vocab.encode(s)) if allowed[j]]
        content.append(sorted(ids, key=lambda j, i=i: -float(scores[i, j])))
    n_content = sum(len(c) for c in content)

    def recall(bags) -> float:
        return sum(len(set(c) & set(b.tolist())) for c, b in zip(content, bags, strict=True)) / max(1, n_content)

    # control: each sentence gets the head's bag of the next sentence (a bag that fits another meaning)
    bags = {"head": head, "oracle": oracle_bags(head, content), "other": head.roll(1, dims=0)}
    original = dec.bag_ids
    rows = []
    for name, table in bags.items():
        lookup = {mu[i].numpy().tobytes(): table[i] for i in range(len(refs))}
        hits = {"replaced": 0, "kept": 0}

        def hooked(z, lookup=lookup, hits=hits):
            out = original(z)
            for r in range(z.shape[0]):
                row = lookup.get(z[r].detach().float().cpu().numpy().tobytes())
                if row is None:
                    hits["kept"] += 1
                else:
                    out[r] = row.to(out.device)
                    hits["replaced"] += 1
            return out

        dec.bag_ids = hooked
        try:
            t0 = time.perf_counter()
            hyps = model._decode(mu, cfg, args.seed)
            seconds = time.perf_counter() - t0
        finally:
            dec.bag_ids = original
        row = {"bag": name, "bag_recall": recall(table), "bleu_roundtrip": corpus_bleu(hyps, roundtrip),
               "token_f1_roundtrip": token_f1(hyps, roundtrip), "bleu": corpus_bleu(hyps, refs),
               "length_ratio": length_ratio(hyps, roundtrip), "seconds": round(seconds, 1), **hits,
               "examples": [{"input": r, "output": h} for r, h in zip(refs[:5], hyps[:5], strict=True)]}
        rows.append(row)
        print(f"{name:7s} bag recall {row['bag_recall']:.3f} | BLEU {row['bleu_roundtrip']:.2f} (raw "
              f"{row['bleu']:.2f}) | token F1 {row['token_f1_roundtrip']:.1f} | length {row['length_ratio']:.2f} | "
              f"rows replaced {hits['replaced']}, kept {hits['kept']} | {seconds:.0f} s", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"checkpoint": args.checkpoint, "setting": setting,
                                                 "sentences": [args.start, args.start + len(refs)],
                                                 "content_ids": n_content, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    run_main(main)
