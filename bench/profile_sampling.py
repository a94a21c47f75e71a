"""Time (and optionally profile) the sampler on one checkpoint in issue 6's sampling case; no training.

    uv run python bench/profile_sampling.py --checkpoint checkpoints/RUN/latest --batches 6 \\
        [--batch 64] [--steps 16] [--cfg-scale 1.5] [--split 1] [--torch-profile] [--set sampling.kv_refresh=0]

Decodes --batches batches of --batch consecutive held-out sentences (the checkpoint config's validation split, or
--data FILE) as bench/speed.py's sampling grid draws them: posterior means of the encoder vectors, lengths from the
length head, `sgdd.generation.decode_latents` with the checkpoint's sampling settings at --steps and --cfg-scale.
One untimed warm-up batch first. Prints sentences/s and a hash of the outputs (equal hashes: identical text, for
checking that a speed change is exact). --split N sorts each batch by length and decodes it as N sub-batches.
--torch-profile prints torch.profiler's operator tables (by operator, and by operator and input shapes) for the
timed batches; for Python-level stacks run the script under py-spy. Used in bench/RESULTS.md "Twenty-seventh round".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
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
    args = ap.parse_args()

    from sgdd.registry import ConfigError

    if args.batches < 1 or args.batch < 1 or args.steps < 1 or not 1 <= args.split <= args.batch:
        raise ConfigError("need --batches, --batch and --steps >= 1 and 1 <= --split <= --batch, got "
                          f"{args.batches}, {args.batch}, {args.steps} and {args.split}")

    import torch

    from sgdd.api import SGDD
    from sgdd.cli import allocator_name, read_sentences
    from sgdd.config import apply_overrides, config_from_dict, config_to_dict, validate_config
    from sgdd.data import load_corpus
    from sgdd.diffusion import build_process
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

    def run(i: int) -> list[str]:
        gen = torch.Generator().manual_seed(i)
        rows = slice(i * args.batch, (i + 1) * args.batch)
        zb, lb = z[rows], lengths[rows]
        out: list[str] = []
        for part in lb.argsort().chunk(args.split) if args.split > 1 else [torch.arange(len(lb))]:
            out += decode_latents(net, process, sampler, model.vocab, zb[part], cfg, args.cfg_scale, gen,
                                  lengths=lb[part])
        return out

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
    digest = hashlib.sha1(repr(outputs).encode()).hexdigest()[:12]
    print(f"{n / seconds:.1f} sentences/s: {args.batches} batches of {args.batch}, {args.steps} steps, CFG "
          f"{args.cfg_scale}, split {args.split} ({seconds:.2f} s; {torch.get_num_threads()} threads; allocator "
          f"{allocator_name()}); outputs {digest}")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40))
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=30, max_shapes_column_width=90))
    return 0


if __name__ == "__main__":
    from sgdd.cli import run_main

    sys.exit(run_main(main))
