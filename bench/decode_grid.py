"""Decode the same held-out sentences with one checkpoint under several sampling settings; no training.

    uv run python bench/decode_grid.py --checkpoint checkpoints/RUN/latest --start 200 --end 800 \\
        --grid '[{"steps": 16, "cfg_scale": 1.5}, {"steps": 24, "cfg_scale": 1.0}]'

Each grid entry is a dict of SamplingConfig fields applied on top of the checkpoint's sampling config (an empty
dict = the checkpoint's own settings). Sentences: lines START..END of the checkpoint config's validation split
(filtered as training filters it), or of --data FILE. Prints one line per setting: BLEU and token F1 against
the tokenizer round trip of the reference (what an uncased vocabulary can reach), BLEU against the raw input,
the length ratio and the wall-clock decoding time; --output writes them as JSON. --raw decodes the checkpoint's
raw weights instead of its EMA weights. Used for the sampler experiments in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder")
    ap.add_argument("--grid", default="[{}]", help="JSON list of dicts of sampling settings")
    ap.add_argument("--start", type=int, default=0, help="first sentence (0-based)")
    ap.add_argument("--end", type=int, default=200, help="one past the last sentence")
    ap.add_argument("--data", help="UTF-8 text file, one sentence per line (default: the validation split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--output", help="write the rows as JSON here")
    ap.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--raw", action="store_true", help="decode with the raw weights instead of the EMA weights")
    args = ap.parse_args()

    from sgdd.cli import read_sentences
    from sgdd.registry import ConfigError

    try:
        grid = json.loads(args.grid)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--grid is not valid JSON ({err}); give a list of dicts, e.g. '[{{\"steps\": 16}}]'") from None
    if not isinstance(grid, list) or not grid or not all(isinstance(g, dict) for g in grid):
        raise ConfigError("--grid must be a non-empty JSON list of dicts of sampling settings, e.g. "
                          "'[{\"steps\": 16}, {\"steps\": 24, \"cfg_scale\": 1.0}]'")
    if not 0 <= args.start < args.end:
        raise ConfigError(f"need 0 <= --start < --end, got {args.start} and {args.end}")

    import torch

    from sgdd.api import SGDD
    from sgdd.data import load_corpus
    from sgdd.evaluation import corpus_bleu, length_ratio, reference_roundtrip, token_f1

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = SGDD.from_pretrained(args.checkpoint, device=args.device, ema=not args.raw)
    pool = read_sentences(args.data) if args.data else load_corpus(model.cfg, valid_only=True).valid
    refs = pool[args.start : args.end]
    if not refs:
        raise ConfigError(f"no sentences in {args.start}..{args.end} (the set has {len(pool)})")
    roundtrip = reference_roundtrip(refs, model.vocab)
    rows = []
    weights = "raw" if args.raw else "EMA"
    print(f"{args.checkpoint} ({weights} weights): sentences {args.start}..{args.start + len(refs)} ({len(refs)})",
          flush=True)
    for setting in grid:
        t0 = time.perf_counter()
        hyps = model.reconstruct(refs, seed=args.seed, **setting)
        seconds = time.perf_counter() - t0
        row = {
            "setting": setting,
            "bleu_roundtrip": corpus_bleu(hyps, roundtrip),
            "token_f1_roundtrip": token_f1(hyps, roundtrip),
            "bleu": corpus_bleu(hyps, refs),
            "length_ratio": length_ratio(hyps, roundtrip),
            "seconds": seconds,
            "sentences": len(refs),
        }
        rows.append(row)
        print(f"{json.dumps(setting)}  BLEU {row['bleu_roundtrip']:.2f} (raw {row['bleu']:.2f})  "
              f"token F1 {row['token_f1_roundtrip']:.1f}  length ratio {row['length_ratio']:.2f}  "
              f"{seconds:.0f} s", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = {"checkpoint": args.checkpoint, "weights": weights.lower(), "rows": rows}
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    run_main(main)
