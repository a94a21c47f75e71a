"""Time (and optionally profile) the sampler on one checkpoint in issue 6's sampling case; no training.

    uv run python bench/profile_sampling.py --checkpoint checkpoints/RUN/latest --batches 6 \\
        [--batch 64] [--steps 16] [--cfg-scale 1.5] [--split 1] [--torch-profile] [--set sampling.kv_refresh=0]

Decodes --batches batches of --batch consecutive held-out sentences (the checkpoint config's validation split, or
--data FILE) as bench/speed.py's sampling grid draws them: posterior means of the encoder vectors, lengths from the
length head, `sgdd.generation.decode_latents` with the checkpoint's sampling settings at --steps and --cfg-scale.
One untimed warm-up batch first. Prints sentences/s, a hash of the outputs (equal hashes: identical text, for
checking that a speed change is exact) and their BLEU against the inputs' tokenizer round trip (as bench/decode_grid.py
reports it, but on these unsorted batches). --split N sorts each batch by length and decodes it as N sub-batches.
--torch-profile prints torch.profiler's operator tables (by operator, and by operator and input shapes) for the
timed batches; for Python-level stacks run the script under py-spy. Used in bench/RESULTS.md "Twenty-seventh round".

--against KEY=VALUE (repeatable) compares two settings on a machine whose speed drifts: every batch is decoded
under both (the checkpoint's settings + --set, and the same + --against), in alternating order, and the script
prints each one's sentences/s, output hash and the median over batches of the per-batch time ratio (B / A), which
cancels drifts slower than one batch. Used in bench/RESULTS.md "Thirtieth round".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder")
    ap.add_argument("--batches", type=int, default=6, help="timed batches")
    ap.add_argument("--batch", type=int, default=64, help="sentences per batch")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--split", type=int, default=1, help="decode each batch as this many length-sorted sub-batches")
    ap.add_argument("--data", help="UTF-8 text file, one sentence per line (default: the validation split)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--torch-profile", action="store_true", help="print torch.profiler tables of the timed batches")
    ap.add_argument("--against", action="append", metavar="KEY=VALUE",
                    help="second setting, timed batch by batch against the first (repeatable; see above)")
    args = ap.parse_args()

    from sgdd.registry import ConfigError

    if args.batches < 1 or args.batch < 1 or args.steps < 1 or not 1 <= args.split <= args.batch:
        raise ConfigError("need --batches, --batch and --steps >= 1 and 1 <= --split <= --batch, got "
                          f"{args.batches}, {args.batch}, {args.steps} and {args.split}")
    if args.against and args.torch_profile:
        raise ConfigError("--against times two settings; profile one at a time (drop --against or --torch-profile)")

    import torch

    from sgdd.api import SGDD
    from sgdd.cli import allocator_name, read_sentences
    from sgdd.config import apply_overrides, config_from_dict, config_to_dict, validate_config
    from sgdd.data import load_corpus
    from sgdd.diffusion import build_process
    from sgdd.evaluation import corpus_bleu, reference_roundtrip
    from sgdd.generation import choose_lengths, decode_latents
    from sgdd.sampling import build_sampler

    model = SGDD.from_pretrained(args.checkpoint, device="cpu")
    cfg = model.cfg
    if args.set:
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), args.set), "--set")
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, steps=args.steps,
                                                                cfg_scale=args.cfg_scale))
    validate_config(cfg, "profile_sampling")
    texts = read_sentences(args.data) if args.data else load_corpus(cfg, valid_only=True).valid
    need = args.batch * (args.batches + 1)
    texts = [texts[i % len(texts)] for i in range(need)]  # repeats when the file is short
    net = model.net.eval()
    with torch.no_grad():
        z = net.vib.posterior(model.encode(texts))[0].float()
        lengths = choose_lengths(net, z, cfg)
    sampler, process = build_sampler(cfg, model.vocab.counts), build_process(cfg)
    refs = reference_roundtrip(texts[: args.batch * args.batches], model.vocab)

    def bleu(outputs: list[list[str]]) -> float:
        return corpus_bleu([text for batch in outputs for text in batch], refs)

    def run(i: int, cfg=cfg, sampler=sampler, lengths=lengths) -> list[str]:
        gen = torch.Generator().manual_seed(i)
        rows = slice(i * args.batch, (i + 1) * args.batch)
        zb, lb = z[rows], lengths[rows]
        out: list[str] = []
        for part in lb.argsort().chunk(args.split) if args.split > 1 else [torch.arange(len(lb))]:
            out += decode_latents(net, process, sampler, model.vocab, zb[part], cfg, args.cfg_scale, gen,
                                  lengths=lb[part])
        return out

    if args.against:
        cfg_b = config_from_dict(apply_overrides(config_to_dict(cfg), args.against), "--against")
        validate_config(cfg_b, "profile_sampling --against")
        with torch.no_grad():  # B's own lengths, in case --against changes the length settings
            lengths_b = choose_lengths(net, z, cfg_b)
        settings = {"A": (cfg, sampler, lengths), "B": (cfg_b, build_sampler(cfg_b, model.vocab.counts), lengths_b)}
        return compare(args, run, bleu, settings)

    run(args.batches)  # warm-up, on the batch after the timed ones
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        ctx = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True)
    else:
        ctx = contextlib.nullcontext()
    outputs = []
    with ctx as prof:
        t0 = time.perf_counter()
        for i in range(args.batches):
            outputs.append(run(i))
        seconds = time.perf_counter() - t0
    n = args.batch * args.batches
    print(f"{n / seconds:.1f} sentences/s: {args.batches} batches of {args.batch}, {args.steps} steps, CFG "
          f"{args.cfg_scale}, split {args.split} ({seconds:.2f} s; {torch.get_num_threads()} threads; allocator "
          f"{allocator_name()}); outputs {digest(outputs)}, BLEU {bleu(outputs):.2f}")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40))
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=30, max_shapes_column_width=90))
    return 0


def digest(outputs: list[list[str]]) -> str:
    """A short hash of decoded texts: equal hashes, identical text."""
    return hashlib.sha1(repr(outputs).encode()).hexdigest()[:12]


def compare(args, run, bleu, settings: dict) -> int:
    """Time every batch under settings A and B ({name: (cfg, sampler, lengths)}), alternating which goes first;
    print both rates, output hashes, BLEU and the median per-batch time ratio B / A."""
    import torch

    for name in ("A", "B"):  # warm-up of both, on the batch after the timed ones
        run(args.batches, *settings[name])
    seconds = {"A": [], "B": []}
    outputs = {"A": [], "B": []}
    for i in range(args.batches):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            t0 = time.perf_counter()
            outputs[name].append(run(i, *settings[name]))
            seconds[name].append(time.perf_counter() - t0)
    ratios = sorted(b / a for a, b in zip(seconds["A"], seconds["B"], strict=True))
    median = statistics.median(ratios)
    n = args.batch * args.batches
    labels = (("A", " ".join(args.set or []) or "checkpoint settings"), ("B", "A + " + " ".join(args.against)))
    for name, label in labels:
        print(f"{name}: {n / sum(seconds[name]):.1f} sentences/s ({label}); outputs {digest(outputs[name])}, BLEU "
              f"{bleu(outputs[name]):.2f}")
    print(f"time B / A: median {median:.3f} over {args.batches} batches (range {ratios[0]:.3f}-{ratios[-1]:.3f}), "
          f"i.e. B is {1 / median:.2f}x A's speed; {args.batches} batches of {args.batch}, {args.steps} steps, CFG "
          f"{args.cfg_scale}, split {args.split}; {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    sys.exit(run_main(main))
