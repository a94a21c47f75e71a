"""How many of a sentence's words its frozen-encoder vector determines: a bag-of-words probe trained to convergence.

    uv run python bench/bow_probe.py --config configs/fiction_minilm.yaml --minutes 10 \\
        data.path=../shared/data/eltec_eng/train.txt data.valid_path=../shared/data/eltec_eng/valid.txt

An MLP reads the cached sentence vector e (B, De) (no VIB, no decoder) and scores every decoder-vocabulary id
(B, V) for being in the sentence. It trains on the config's training sentences from the embedding cache (built
first if missing, not timed) for a wall-clock budget and reports, on the held-out sentences, at regular intervals:

- recall@|s|: the fraction of a sentence's distinct ids found among its top-|s| scored ids (|s| = its number of
  distinct ids; EOS and PAD left out, so the number is a little below the training log's `bow_recall`, which
  counts EOS);
- the same for the content ids only (ids outside the `--frequent` most frequent training ids, scored against
  the top-|content| of the content columns);
- recall@2|s|.

The decoder's own bag-of-words head is the same kind of probe, read through the VIB and trained for as long as
the decoder is; if this probe, with more width, depth and time, stays near the head's recall, the vector (not the
decoder) caps how many words any decoder of this design gets right.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def multi_hot(token_lists, idx, V: int, skip: tuple[int, ...]):
    """(B, V) float32 0/1: the distinct ids of each listed sentence, the `skip` ids cleared."""
    import torch

    out = torch.zeros(len(idx), V)
    for r, i in enumerate(idx):
        if token_lists[i]:
            out[r, torch.as_tensor(token_lists[i], dtype=torch.long)] = 1.0
    out[:, list(skip)] = 0.0
    return out


def recall_at(scores, target, factor: int = 1, columns=None) -> float:
    """Mean over sentences with any target of |top-(factor*|s|) ∩ s| / |s| (columns: restrict both to a subset)."""
    import torch

    if columns is not None:
        scores, target = scores[:, columns], target[:, columns]
    n = target.sum(1)
    keep = n > 0
    scores, target, n = scores[keep], target[keep], n[keep]
    k = int(min(scores.shape[1], factor * n.max().item()))
    hit = target.gather(1, scores.topk(k, dim=1).indices)  # (B, k)
    ranks = torch.arange(k)[None, :]
    found = (hit * (ranks < factor * n[:, None])).sum(1)
    return float((found / n).mean())


def build_probe(in_dim: int, hidden: int, layers: int, V: int):
    import torch.nn as nn

    mods: list = [nn.LayerNorm(in_dim)]
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    mods += [nn.LayerNorm(d), nn.Linear(d, V)]
    return nn.Sequential(*mods)


def main(argv=None) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sgdd.config import load_config
    from sgdd.data import Vocab
    from sgdd.embed_cache import prepare
    from sgdd.precision import autocast, resolve_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2, help="hidden layers of the MLP")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=("softmax", "bce"), default="softmax",
                   help="softmax: cross-entropy against the normalised bag; bce: per-id presence")
    p.add_argument("--frequent", type=int, default=100, help="ids counted as frequent (left out of content recall)")
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between held-out evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSON file for the evaluation curve")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)
    from sgdd.registry import ConfigError

    if args.minutes <= 0 or args.hidden <= 0 or args.layers < 0 or args.batch <= 0 or args.eval_every <= 0:
        raise ConfigError("--minutes, --hidden, --batch and --eval-every must be positive, --layers >= 0")

    torch.manual_seed(args.seed)
    cfg = load_config(args.config, args.overrides)
    data = prepare(cfg, progress=True)
    V = len(data.vocab)
    skip = (Vocab.PAD, Vocab.MASK, Vocab.EOS)
    counts = torch.as_tensor(np.asarray(data.vocab.counts, dtype=np.float64))
    counts[list(skip)] = -1.0
    content = torch.ones(V, dtype=torch.bool)
    content[counts.argsort(descending=True)[: args.frequent]] = False
    content[list(skip)] = False
    content_cols = content.nonzero()[:, 0]

    valid_e = torch.as_tensor(np.asarray(data.valid_emb), dtype=torch.float32)
    valid_t = multi_hot(data.valid_tokens, range(len(data.valid_tokens)), V, skip)
    precision = resolve_precision(cfg.training.precision, torch.device("cpu"))
    probe = build_probe(data.encoder_dim, args.hidden, args.layers, V)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(q.numel() for q in probe.parameters())
    print(f"probe: {n_params / 1e6:.1f}M parameters, V={V}, {len(data.train_tokens)} train / "
          f"{len(data.valid_tokens)} held-out sentences, {precision}", flush=True)

    def evaluate() -> dict:
        probe.eval()
        with torch.no_grad(), autocast(precision, torch.device("cpu")):
            s = torch.cat([probe(valid_e[i : i + 512]).float() for i in range(0, len(valid_e), 512)])
        probe.train()
        s[:, list(skip)] = -1e9
        return {"recall": recall_at(s, valid_t), "recall_2x": recall_at(s, valid_t, 2),
                "content_recall": recall_at(s, valid_t, columns=content_cols)}

    rng = np.random.default_rng(args.seed)
    N = len(data.train_tokens)
    perm, pos, step, seen = rng.permutation(N), 0, 0, 0
    budget = args.minutes * 60.0
    t0 = time.monotonic()
    next_eval = 0.0
    curve = []
    loss_f = float("nan")
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= next_eval or elapsed >= budget:
            m = {"seconds": round(elapsed, 1), "step": step, "sentences": seen, "loss": loss_f, **evaluate()}
            curve.append(m)
            print(json.dumps(m), flush=True)
            next_eval += args.eval_every
            if elapsed >= budget:
                break
        if pos + args.batch > N:
            perm, pos = rng.permutation(N), 0
        idx = np.sort(perm[pos : pos + args.batch])
        pos += args.batch
        e = torch.as_tensor(data.train_emb[idx], dtype=torch.float32)
        target = multi_hot(data.train_tokens, idx, V, skip)
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * (0.1 + 0.9 * max(0.0, 1.0 - elapsed / budget))
        with autocast(precision, torch.device("cpu")):
            logits = probe(e).float()
        if args.loss == "softmax":
            dist = target / target.sum(1, keepdim=True).clamp(min=1.0)
            loss = -(dist * F.log_softmax(logits, dim=1)).sum(1).mean()
        else:
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / target.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_f = float(loss.detach())
        step += 1
        seen += len(idx)
    result = {"args": vars(args), "params": n_params, "vocab": V, "curve": curve, "final": curve[-1]}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    run_main(main)
