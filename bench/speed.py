"""Throughput benchmarks: matmul peak, training speed and MFU, sampling speed, embedding-cache build rate.

    uv run python bench/speed.py --config configs/fiction_minilm.yaml [--checkpoint DIR] [--quick]

Each part runs in its own subprocess (`bench/speed.py --part NAME ...`, printing one JSON line) so its peak
RSS is its own:

- peak    the machine's matmul peak in this run: torch.mm of n x n matrices (2048, 4096) in bf16 and fp32, a few
          warm-up and timed repetitions, GFLOP/s, at torch.get_num_threads() threads.
- train   one subprocess per precision (bf16 autocast, fp32). The config's SGDDNet built as training builds it
          (load_pretrained_for_init + sync_model_sizes + build_net), TrainStep forward + backward, gradient
          clipping, AdamW step and float32 EMA update, at the config's batch size. Data: the real vocabulary,
          token lists and embeddings from prepare(cfg) when the embedding cache is already built; else the
          corpus' vocabulary and token lists with random unit vectors for e; else (no corpus) a synthetic
          20,000-id vocabulary and sentence lengths drawn like the fiction corpus' (mean about 24 tokens).
          A few fixed batches from LengthBucketSampler (the epoch's batches at evenly spaced quantiles of padded
          length, so their mean length is training's) are reused, padded by data.pad_slack // 2 (the mean of
          training's random slack): each is run once under FlopCounterMode (forward + backward, seeded) to count
          its model FLOPs, then the timed steps cycle through the same batches with the same seeds, so the FLOPs
          of every timed step are known exactly. Warm-up steps and batch building are not timed. Reports
          sentences/s, tokens/s (positions processed, padding included), FLOPs per step, achieved GFLOP/s; the
          orchestrator divides by the measured bf16 peak (MFU).
- sample  sentences/s of the model (the trained checkpoint's EMA weights with --checkpoint, else a freshly
          initialised net) for MaskGIT, and for the score-entropy Euler and analytic samplers (the same network:
          the decoder does not know the process; an untrained net is fine for speed), at 4/8/16/32 steps, with
          CFG (scale 1.5, one batch of 2B per forward) and without (1.0), batch 1 and 64, through
          generation.decode_latents (sampler under the training precision's autocast + detokenisation).
          z is the posterior mean of real held-out sentences' encoder vectors; lengths come from the length
          head with a checkpoint, else from the sentences' true token counts + EOS + sampling.length_slack (what
          a perfect length head gives). End to end: encode + sample + detokenise for a batch of 64 sentences at
          16 steps with CFG, through the SGDD API's encoder.
- cache   the embedding cache build rate: N sentences (default 2000) of the config's corpus encoded by
          embed_cache.load_or_build_embeddings into a temporary cache folder (the cache's own code path:
          length-sorted batches, bf16 autocast per encoder.precision, chunked writes and checksums);
          sentences/s excludes loading the encoder (reported separately); peak RSS.

The orchestrator prints a table, writes the JSON (bench/out/, or next to --results with --quick) and appends a
row to bench/RESULTS.md under "## Speed (bench/speed.py)". `--quick` shrinks every part for the smoke test
(small matmuls, batch 4, few steps and repetitions, 16 cache sentences); combine it with `--set key=value`
config overrides for a tiny model and `--results PATH` for a scratch results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# this checkout's sources first: the environment's editable install may point at another checkout (a
# benchmark run from a git worktree snapshot must time the snapshot's code, the commit its row records)
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from common import append_row, git_commit, peak_rss_mb  # noqa: E402

SECTION = "## Speed (bench/speed.py)"
PARTS = ("peak", "train", "sample", "cache")
SAMPLERS = ("maskgit", "euler", "analytic")
HEADLINE_STEPS = 16
CFG_SCALE = 1.5
SYNTHETIC_VOCAB = 20_000
PEAK_PROBE = 256  # matrix size of the quick rate probe before the peak measurement
PEAK_MAX_SECONDS = 60.0  # a peak size is measured only if its warm-up + timed reps fit in this (by the probe)
BF16_SLOW_RATIO = 0.9  # train in bf16 only where its measured peak beats fp32's by this factor (sgdd.precision)


@dataclass(frozen=True)
class Sizes:
    """How much work each part does (full run vs --quick)."""

    mm_sizes: tuple[int, ...] = (2048, 4096)
    mm_warmup: int = 2
    mm_reps: int = 5
    train_batches: int = 4  # distinct batches, FLOP-counted once each
    train_warmup: int = 3
    train_steps: int = 16  # timed optimizer steps (cycling through the batches)
    train_batch_size: int = 0  # 0 = the config's training.batch_size
    sample_steps: tuple[int, ...] = (4, 8, 16, 32)
    sample_batches: tuple[int, ...] = (1, 64)
    sample_min_seconds: float = 3.0  # repeat a sampling setting until this much time has been measured
    sample_max_reps: int = 64
    # untimed decodes of each sampling setting before its timing: the first decode after a change of setting
    # runs ~10 % slower (fresh buffers of other shapes), which biased whichever setting was timed first
    sample_warmup: int = 1
    e2e_batch: int = 64
    cache_sentences: int = 2000


QUICK = Sizes(
    mm_sizes=(512,),
    mm_warmup=1,
    mm_reps=2,
    train_batches=1,
    train_warmup=1,
    train_steps=2,
    train_batch_size=4,
    sample_steps=(4, 16),
    sample_batches=(1, 4),
    sample_min_seconds=0.0,
    sample_max_reps=1,
    sample_warmup=0,
    e2e_batch=4,
    cache_sentences=16,
)


def say(msg: str) -> None:
    print(f"[speed] {msg}", file=sys.stderr, flush=True)


def sizes_for(args: argparse.Namespace) -> Sizes:
    s = QUICK if args.quick else Sizes()
    if args.steps:
        s = dataclasses.replace(s, sample_steps=tuple(int(x) for x in args.steps.split(",")))
    if args.sample_batches:
        s = dataclasses.replace(s, sample_batches=tuple(int(x) for x in args.sample_batches.split(",")))
    if args.cache_sentences:
        s = dataclasses.replace(s, cache_sentences=args.cache_sentences)
    return s


def load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
    from sgdd.config import load_config

    cfg = load_config(args.config, [*(args.set or []), *(extra or [])])
    import torch

    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# data for the train and sample parts


@dataclass
class Material:
    """Vocabulary, token lists and (optionally) encoder vectors to benchmark with. emb None = random vectors."""

    source: str  # cache | corpus | synthetic
    vocab: Any  # sgdd.data.Vocab
    encoder_dim: int
    tokens: list[list[int]]  # training sentences as decoder ids, no EOS
    emb: Any  # (N, De) float32 memmap aligned with tokens, or None
    held_out: list[str]  # held-out sentences (for z and end-to-end); decoded synthetic ones without a corpus


def _cache_complete(cfg, sentences: list[str]) -> bool:
    from sgdd.embed_cache import cache_key, cache_key_fields, check_cache

    fields = cache_key_fields(cfg, sentences)
    key = cache_key(fields)
    folder = Path(cfg.data.cache_dir) / key
    return folder.is_dir() and check_cache(folder, key, fields, complete=True)[0] is not None


def _encoder_dim(cfg) -> int:
    from transformers import AutoConfig

    from sgdd.encoders import resolve_model_path

    return int(AutoConfig.from_pretrained(resolve_model_path(cfg.encoder.name)).hidden_size)


def synthetic_lengths(n: int, cfg, seed: int = 0) -> list[int]:
    """Token counts shaped like the fiction corpus (gamma, mean 24, median 21, 90th percentile 44)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.gamma(shape=2.5, scale=9.6, size=n).round().astype(int)
    return np.clip(lengths, cfg.data.min_tokens, cfg.data.max_length - 1).tolist()


def load_material(cfg, num_synthetic: int = 4096) -> Material:
    """Real data when the embedding cache is built (never builds it), else the corpus, else synthetic."""
    import numpy as np

    from sgdd.data import Vocab, load_corpus
    from sgdd.encoders import load_tokenizer
    from sgdd.registry import ConfigError

    tokenizer = load_tokenizer(cfg.encoder)
    try:
        corpus = load_corpus(cfg, tokenizer=tokenizer)
    except (ConfigError, OSError) as exc:
        say(f"corpus unavailable ({exc}); using a synthetic {SYNTHETIC_VOCAB}-id vocabulary")
        corpus = None
    if corpus is not None and _cache_complete(cfg, corpus.train) and _cache_complete(cfg, corpus.valid):
        from sgdd.embed_cache import prepare

        data = prepare(cfg, progress=False, log=say)
        return Material(
            "cache", data.vocab, data.encoder_dim, data.train_tokens, data.train_emb, data.valid_sentences
        )
    if corpus is not None:
        say("embedding cache not built: corpus vocabulary and token lists, random unit vectors for e")
        vocab = Vocab.build(corpus.train_ids, tokenizer, prune=cfg.data.prune_vocab)
        tokens = [vocab.map_encoder_ids(ids) for ids in corpus.train_ids]
        vocab.count_tokens(tokens)
        return Material("corpus", vocab, _encoder_dim(cfg), tokens, None, corpus.valid or corpus.train)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special][: SYNTHETIC_VOCAB - 3]
    vocab = Vocab(Vocab.special_encoder_ids(tokenizer) + ids, tokenizer)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(3, len(vocab), size=n).tolist() for n in synthetic_lengths(num_synthetic, cfg)]
    vocab.count_tokens(tokens)
    held_out = [vocab.decode(t) for t in tokens[:256]]
    return Material("synthetic", vocab, _encoder_dim(cfg), tokens, None, held_out)


def batch_vectors(material: Material, idx: list[int], seed: int):
    import torch

    if material.emb is not None:
        return torch.as_tensor(material.emb[idx], dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(len(idx), material.encoder_dim, generator=gen)
    return torch.nn.functional.normalize(e, dim=-1)


def build_fresh_net(cfg, material: Material):
    """SGDDNet initialised exactly as training initialises it; returns (cfg with synced sizes, net)."""
    from sgdd.training import build_net, load_pretrained_for_init, sync_model_sizes

    pretrained = load_pretrained_for_init(cfg)
    cfg = sync_model_sizes(cfg, pretrained)
    net = build_net(cfg, len(material.vocab), material.encoder_dim, material.vocab.encoder_ids, pretrained)
    del pretrained
    return cfg, net


# ---------------------------------------------------------------------------------------------------------
# part: peak


def part_peak(args: argparse.Namespace, sizes: Sizes) -> dict:
    import torch

    load_cfg(args)  # applies training.threads
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "gflops": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        # a probe first: where bf16 is emulated (AVX2-only CPUs: ~0.3 GFLOP/s) a 2048^3 product takes a minute,
        # so sizes whose repetitions would exceed PEAK_MAX_SECONDS are skipped (the table shows which ran)
        probe = PEAK_PROBE
        a = torch.randn(probe, probe).to(dtype)
        torch.mm(a, a)
        t0 = time.perf_counter()
        torch.mm(a, a)
        probe_rate = 2.0 * probe**3 / max(time.perf_counter() - t0, 1e-9)  # FLOP/s
        runs = [n for n in sizes.mm_sizes
                if 2.0 * n**3 * (sizes.mm_warmup + sizes.mm_reps) / probe_rate <= PEAK_MAX_SECONDS]
        if not runs:
            runs = [probe]
            out[f"{name}_sizes_note"] = (f"{name} probe {probe_rate / 1e9:.2f} GFLOP/s: larger sizes would take over "
                                         f"{PEAK_MAX_SECONDS:.0f} s, measured at {probe} only")
            say(out[f"{name}_sizes_note"])
        for n in runs:
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            for _ in range(sizes.mm_warmup):
                torch.mm(a, b)
            t0 = time.perf_counter()
            for _ in range(sizes.mm_reps):
                torch.mm(a, b)
            dt = (time.perf_counter() - t0) / sizes.mm_reps
            gflops = 2.0 * n**3 / dt / 1e9
            out["gflops"][f"{name}_{n}"] = gflops
            say(f"peak: {name} {n}x{n}: {gflops:.1f} GFLOP/s")
        out[f"peak_{name}_gflops"] = max(out["gflops"][f"{name}_{n}"] for n in runs)
    return out


# ---------------------------------------------------------------------------------------------------------
# part: train


def representative_batches(bucket, tokens, n: int) -> list[list[int]]:
    """n of the epoch's batches at evenly spaced quantiles of padded length ((k + 0.5) / n): a few batches taken
    in epoch order are a noisy sample of the lengths training sees (4 of them once averaged 24 positions per row
    against about 31 in training)."""
    epoch = bucket.batches(0)
    ranked = sorted(epoch, key=lambda idx: max(len(tokens[i]) for i in idx))
    return [ranked[min(len(ranked) - 1, int((k + 0.5) / n * len(ranked)))] for k in range(n)]


def part_train(args: argparse.Namespace, sizes: Sizes) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sgdd.data import LengthBucketSampler, make_batch
    from sgdd.diffusion import build_process
    from sgdd.precision import autocast
    from sgdd.training import EMA, TrainStep, param_groups

    extra = [f"training.precision={args.precision}"]
    if sizes.train_batch_size:
        extra.append(f"training.batch_size={sizes.train_batch_size}")
    cfg = load_cfg(args, extra)
    torch.manual_seed(cfg.training.seed)
    material = load_material(cfg)
    cfg, net = build_fresh_net(cfg, material)
    process = build_process(cfg)
    if cfg.diffusion.softmax_sample > 0:  # as training does: the sampled softmax's frequent ids
        process.set_token_counts(material.vocab.counts)
    tc = cfg.training
    step_module = TrainStep(net, process, material.vocab.PAD, cfg.model.bow_weight)
    # as training.train builds it (fused AdamW)
    optimizer = torch.optim.AdamW(
        param_groups(net, tc.weight_decay, tc.pretrained_lr_scale), lr=tc.lr, betas=tuple(tc.betas), eps=1e-8, fused=True
    )
    ema = EMA(net, tc.ema_decay)
    net.train()

    bucket = LengthBucketSampler(
        [len(t) for t in material.tokens],
        batch_size=tc.batch_size,
        seed=tc.seed,
        bucket=cfg.data.bucket_by_length,
    )
    batches = []
    for j, idx in enumerate(representative_batches(bucket, material.tokens, sizes.train_batches)):
        # training draws the slack from U{0..pad_slack} per batch; the benchmark uses its mean
        toks = [material.tokens[i] for i in idx]
        x0 = make_batch(toks, cfg.data.max_length, cfg.data.pad_slack // 2)  # (B, L)
        batches.append((x0, batch_vectors(material, idx, seed=j)))
    klw = cfg.model.kl_weight
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")

    def forward_backward(j: int) -> None:
        x0, e = batches[j]
        torch.manual_seed(10_000 + j)  # same masks and noise whenever batch j is run
        uncond = torch.rand(x0.shape[0]) < cfg.model.cond_dropout
        with autocast(tc.precision):
            loss, _ = step_module(x0, e, uncond, klw)
        loss.backward()

    def full_step(j: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(j)
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        ema.update(net)

    flops = []
    for j in range(len(batches)):
        with FlopCounterMode(display=False) as counter:
            forward_backward(j)
        flops.append(int(counter.get_total_flops()))
        optimizer.zero_grad(set_to_none=True)
    for i in range(sizes.train_warmup):
        full_step(i % len(batches))

    times, total_flops, sentences, positions = [], 0, 0, 0
    for i in range(sizes.train_steps):
        j = i % len(batches)
        t0 = time.perf_counter()
        full_step(j)
        times.append(time.perf_counter() - t0)
        total_flops += flops[j]
        sentences += batches[j][0].shape[0]
        positions += batches[j][0].numel()
    seconds = sum(times)
    n_params = sum(p.numel() for p in net.parameters())
    result = {
        "precision": tc.precision,
        "threads": torch.get_num_threads(),
        "data": material.source,
        "batch_size": tc.batch_size,
        "mean_length": positions / max(1, sentences),
        "vocab_size": len(material.vocab),
        "params_m": n_params / 1e6,
        "steps_timed": sizes.train_steps,
        "step_seconds_mean": seconds / len(times),
        "step_seconds_min": min(times),
        "sentences_per_s": sentences / seconds,
        "tokens_per_s": positions / seconds,
        "flops_per_step": total_flops / len(times),
        "achieved_gflops": total_flops / seconds / 1e9,
    }
    say(
        f"train {tc.precision}: {result['sentences_per_s']:.1f} sent/s, {result['tokens_per_s']:.0f} tok/s, "
        f"{result['flops_per_step'] / 1e9:.1f} GFLOP/step, {result['achieved_gflops']:.1f} GFLOP/s"
    )
    return result


# ---------------------------------------------------------------------------------------------------------
# part: sample


def sampler_config(cfg, name: str):
    """cfg with sampling.sampler = name and a process that fits it (the model's own when it does)."""
    from sgdd.config import SAMPLERS_FOR, validate_config

    d = cfg.diffusion
    own = SAMPLERS_FOR.get((d.process, d.graph if d.process == "score_entropy" else None), ())
    if name not in own:
        # softmax_sample is a masked-process training option; sampling never uses it
        d = dataclasses.replace(d, process="score_entropy" if name in ("euler", "analytic") else "masked",
                                softmax_sample=0)
    out = dataclasses.replace(cfg, diffusion=d, sampling=dataclasses.replace(cfg.sampling, sampler=name))
    validate_config(out, f"bench sampler {name}")
    return out


def timed_rate(fn, items_per_call: int, min_seconds: float, max_reps: int, warmup: int = 0) -> tuple[float, int]:
    """Items per second over repeated calls fn(rep): at least one call, until min_seconds or max_reps; `warmup`
    untimed calls first (reps -1, -2, ...)."""
    for i in range(warmup):
        fn(-1 - i)
    spent, reps = 0.0, 0
    while reps < 1 or (spent < min_seconds and reps < max_reps):
        t0 = time.perf_counter()
        fn(reps)
        spent += time.perf_counter() - t0
        reps += 1
    return items_per_call * reps / spent, reps


def part_sample(args: argparse.Namespace, sizes: Sizes) -> dict:
    import torch

    from sgdd.api import SGDD
    from sgdd.diffusion import build_process
    from sgdd.generation import choose_lengths, decode_latents
    from sgdd.sampling import build_sampler

    if args.checkpoint:
        model = SGDD.from_pretrained(args.checkpoint, device="cpu")
        if args.set:  # --set KEY=VALUE applies to the checkpoint's config too (e.g. sampling.shortlist=256)
            from sgdd.config import apply_overrides, config_from_dict, config_to_dict, validate_config

            model.cfg = config_from_dict(apply_overrides(config_to_dict(model.cfg), args.set), "--set")
            validate_config(model.cfg, "--set")
        cfg = model.cfg
        if cfg.training.threads > 0:
            torch.set_num_threads(cfg.training.threads)
        from sgdd.data import load_corpus
        from sgdd.registry import ConfigError

        try:
            held_out = load_corpus(cfg, valid_only=True).valid
        except (ConfigError, OSError) as exc:
            say(f"held-out sentences unavailable ({exc}); using a repeated stand-in sentence")
            held_out = ["The old house stood at the end of the lane, its windows dark."] * 64
        source = f"checkpoint {args.checkpoint}"  # named in the RESULTS row: rows from two checkpoints differ here
    else:
        cfg = load_cfg(args)
        material = load_material(cfg)
        cfg, net = build_fresh_net(cfg, material)
        model = SGDD(cfg, net, material.vocab, device="cpu")
        held_out = material.held_out
        source = f"fresh net ({material.source} data)"
    net, vocab = model.net.eval(), model.vocab
    n_max = max(max(sizes.sample_batches), sizes.e2e_batch)
    texts = [held_out[i % len(held_out)] for i in range(n_max)]
    say(f"sample: encoding {len(texts)} held-out sentences (model from {source})")
    encoder = model.encoder  # loaded here, outside every timing
    e = model.encode(texts)
    with torch.no_grad():
        z = net.vib.posterior(e)[0].float()  # (n_max, Dz)
        if args.checkpoint:
            lengths = choose_lengths(net, z, cfg)
        else:
            true = [len(vocab.encode(t)[: cfg.data.max_length - 1]) + 1 for t in texts]  # tokens + EOS
            lengths = (torch.tensor(true) + cfg.sampling.length_slack).clamp(min=2, max=cfg.data.max_length)

    def decode(kcfg, sampler, process, start: int, B: int, scale: float, seed: int) -> None:
        rows = slice(start, start + B)
        gen = torch.Generator().manual_seed(seed)
        decode_latents(net, process, sampler, vocab, z[rows], kcfg, scale, gen, lengths=lengths[rows])

    grid: list[dict] = []
    for name in SAMPLERS:
        scfg = sampler_config(cfg, name)
        process = build_process(scfg)
        for B in sizes.sample_batches:
            warm = dataclasses.replace(scfg, sampling=dataclasses.replace(scfg.sampling, steps=2))
            decode(warm, build_sampler(warm, model.vocab.counts), process, 0, B, CFG_SCALE, 0)
            for steps in sizes.sample_steps:
                kcfg = dataclasses.replace(scfg, sampling=dataclasses.replace(scfg.sampling, steps=steps))
                sampler = build_sampler(kcfg, model.vocab.counts)
                for scale in (CFG_SCALE, 1.0):

                    def run(rep: int, B=B, kcfg=kcfg, sampler=sampler, scale=scale, process=process) -> None:
                        start = (rep * B) % (n_max - B + 1)  # small batches: different sentences each rep
                        decode(kcfg, sampler, process, start, B, scale, rep)

                    max_reps = sizes.sample_max_reps if B < 8 else max(1, sizes.sample_max_reps // 8)
                    rate, reps = timed_rate(run, B, sizes.sample_min_seconds, max_reps, sizes.sample_warmup)
                    grid.append(
                        {
                            "sampler": name,
                            "steps": steps,
                            "cfg_scale": scale,
                            "batch": B,
                            "sentences_per_s": rate,
                            "reps": reps,
                        }
                    )
                    say(f"sample {name:8s} steps {steps:2d} cfg {scale:.1f} batch {B:3d}: {rate:8.2f} sent/s")

    # end to end: frozen encoder + sampler + detokenisation, 16 steps with CFG
    B = sizes.e2e_batch
    ecfg = dataclasses.replace(
        cfg, sampling=dataclasses.replace(cfg.sampling, steps=HEADLINE_STEPS, cfg_scale=CFG_SCALE)
    )
    sampler, process = build_sampler(ecfg, model.vocab.counts), build_process(ecfg)
    split = {"encode": 0.0, "total": 0.0}

    def end_to_end(rep: int) -> None:
        t0 = time.perf_counter()
        e_b = model.encode(texts[:B])
        t1 = time.perf_counter()
        with torch.no_grad():
            z_b = net.vib.posterior(e_b)[0].float()
        lens = None if args.checkpoint else lengths[:B]  # checkpoint: the length head decides
        gen = torch.Generator().manual_seed(rep)
        decode_latents(net, process, sampler, vocab, z_b, ecfg, CFG_SCALE, gen, lengths=lens)
        split["encode"] += t1 - t0
        split["total"] += time.perf_counter() - t0

    e2e_rate, e2e_reps = timed_rate(
        end_to_end, B, sizes.sample_min_seconds, max(1, sizes.sample_max_reps // 8)
    )
    say(
        f"end to end ({HEADLINE_STEPS} steps, CFG {CFG_SCALE}, batch {B}): {e2e_rate:.2f} sent/s, "
        f"encoder {100 * split['encode'] / split['total']:.0f}% of the time"
    )
    return {
        "model": source,
        "threads": torch.get_num_threads(),
        "precision": cfg.training.precision,
        "encoder": encoder.name_key,
        "mean_positions": float(lengths.float().mean()),
        "grid": grid,
        "e2e": {
            "steps": HEADLINE_STEPS,
            "cfg_scale": CFG_SCALE,
            "batch": B,
            "sentences_per_s": e2e_rate,
            "reps": e2e_reps,
            "encode_fraction": split["encode"] / split["total"],
        },
    }


# ---------------------------------------------------------------------------------------------------------
# part: cache


def part_cache(args: argparse.Namespace, sizes: Sizes) -> dict:
    from sgdd.data import load_corpus
    from sgdd.embed_cache import LazyEncoder, load_or_build_embeddings

    n = sizes.cache_sentences
    with tempfile.TemporaryDirectory(prefix="sgdd-bench-cache-") as tmp:
        cfg = load_cfg(args, [f"data.max_sentences={n}", f"data.cache_dir={tmp}"])
        sentences = load_corpus(cfg).train[:n]
        lazy = LazyEncoder(cfg)
        t0 = time.perf_counter()
        lazy.get()
        load_s = time.perf_counter() - t0
        stats: dict[str, Any] = {}
        arr = load_or_build_embeddings(cfg, sentences, "bench", lazy, stats=stats, progress=False)
        shape = tuple(arr.shape)
        del arr
    seconds = stats["bench"]["seconds"]
    import torch

    result = {
        "sentences": len(sentences),
        "dim": shape[1],
        "encoder": cfg.encoder.name,
        "encoder_precision": cfg.encoder.precision,
        "encoder_batch_size": cfg.encoder.batch_size,
        "threads": torch.get_num_threads(),
        "encoder_load_seconds": load_s,
        "encode_seconds": seconds,
        "sentences_per_s": len(sentences) / seconds,
    }
    say(
        f"cache: {len(sentences)} sentences in {seconds:.1f} s = {result['sentences_per_s']:.1f}/s "
        f"(encoder load {load_s:.1f} s)"
    )
    return result


# ---------------------------------------------------------------------------------------------------------
# orchestration


def run_part(args: argparse.Namespace, part: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--config", args.config]
    for s in args.set or []:
        cmd += ["--set", s]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if args.quick:
        cmd.append("--quick")
    for flag in ("steps", "sample_batches", "cache_sentences"):
        value = getattr(args, flag)
        if value:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    cmd += extra
    say(f"part {part} {' '.join(extra)}".rstrip())
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        say(f"part {part} failed (exit {proc.returncode}); its error is above")
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(lines[-1])
    out["wall_seconds"] = time.monotonic() - t0
    return out


def pick(grid: list[dict], sampler: str, steps: int, scale: float, batch: int) -> float:
    for g in grid:
        if (g["sampler"], g["steps"], g["cfg_scale"], g["batch"]) == (sampler, steps, scale, batch):
            return g["sentences_per_s"]
    return math.nan


def summarise(res: dict, sizes: Sizes) -> dict:
    """Ratios and headline numbers from the parts' results."""
    peak = res.get("peak", {})
    bf, fp = res.get("train_bf16", {}), res.get("train_fp32", {})
    nan = math.nan
    peak_bf16 = peak.get("peak_bf16_gflops", nan)
    peak_fp32 = peak.get("peak_fp32_gflops", nan)
    grid = res.get("sample", {}).get("grid", [])
    big = max(sizes.sample_batches)
    head = HEADLINE_STEPS if HEADLINE_STEPS in sizes.sample_steps else max(sizes.sample_steps)
    cfg_rate = pick(grid, "maskgit", head, CFG_SCALE, big)
    plain_rate = pick(grid, "maskgit", head, 1.0, big)
    # the precision training uses here (precision: auto): bf16 where its peak beats fp32's, else fp32; "-" when
    # the peaks were not measured (--parts without peak)
    if math.isnan(peak_bf16) or math.isnan(peak_fp32):
        auto = "-"
    else:
        auto = "bf16" if peak_bf16 * BF16_SLOW_RATIO > peak_fp32 else "fp32"
    trained = bf if auto == "bf16" else fp
    return {
        "train_precision": auto,
        "mfu": trained.get("achieved_gflops", nan) / (peak_bf16 if auto == "bf16" else peak_fp32),
        "peak_bf16_gflops": peak_bf16,
        "peak_fp32_gflops": peak_fp32,
        "bf16_speedup": bf.get("sentences_per_s", nan) / fp.get("sentences_per_s", nan),
        "mfu_bf16": bf.get("achieved_gflops", nan) / peak_bf16,
        "mfu_fp32_vs_bf16_peak": fp.get("achieved_gflops", nan) / peak_bf16,
        "mfu_fp32_vs_fp32_peak": fp.get("achieved_gflops", nan) / peak_fp32,
        "headline_steps": head,
        "headline_batch": big,
        "sample_cfg_sentences_per_s": cfg_rate,
        "sample_nocfg_sentences_per_s": plain_rate,
        "cfg_cost_ratio": plain_rate / cfg_rate,
    }


def fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def grid_text(grid: list[dict], sizes: Sizes) -> list[str]:
    """One line per (sampler, batch, cfg): sentences/s at each step count."""
    lines = []
    for name in SAMPLERS:
        for B in sizes.sample_batches:
            for scale in (CFG_SCALE, 1.0):
                rates = "/".join(fmt(pick(grid, name, k, scale, B)) for k in sizes.sample_steps)
                lines.append(f"{name} b{B} {'cfg' if scale != 1.0 else 'nocfg'} {rates}")
    return lines


def report(res: dict, summary: dict, sizes: Sizes) -> str:
    peak, bf, fp = res.get("peak", {}), res.get("train_bf16", {}), res.get("train_fp32", {})
    tr = bf if "params_m" in bf else fp  # model facts from whichever precision ran
    sample, cache = res.get("sample", {}), res.get("cache", {})
    steps = "/".join(str(k) for k in sizes.sample_steps)
    out = [
        f"threads {peak.get('threads', '-')}",
        "matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peak.get("gflops", {}).items()),
        "",
        f"{'training':10s} {'sent/s':>8s} {'tok/s':>8s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'MFU':>6s} {'RSS MB':>7s}",
    ]
    for name, r, mfu in (("bf16", bf, summary["mfu_bf16"]), ("fp32", fp, summary["mfu_fp32_vs_fp32_peak"])):
        out.append(
            f"{name:10s} {fmt(r.get('sentences_per_s')):>8s} {fmt(r.get('tokens_per_s'), '.0f'):>8s} "
            f"{fmt(r.get('flops_per_step', math.nan) / 1e9, '.2f'):>10s} "
            f"{fmt(r.get('achieved_gflops')):>8s} {fmt(100 * mfu, '.1f'):>5s}% {fmt(r.get('peak_rss_mb'), '.0f'):>7s}"
        )
    out += [
        f"model {fmt(tr.get('params_m'), '.1f')}M params, vocabulary {tr.get('vocab_size', '-')}, "
        f"batch {tr.get('batch_size', '-')}, mean length {fmt(tr.get('mean_length'))}, data: {tr.get('data', '-')}",
        f"bf16/fp32 training speed-up {fmt(summary['bf16_speedup'], '.2f')}x; MFU = counted model FLOPs / step time "
        f"/ the measured peak of the same precision",
        f"training precision on this machine (precision: auto): {summary['train_precision']}, "
        f"MFU {fmt(100 * summary['mfu'], '.1f')}%" + (f"; bf16 {bf['skipped']}" if "skipped" in bf else ""),
        "",
        f"sampling sentences/s at {steps} steps ({sample.get('model', '-')}, peak RSS "
        f"{fmt(sample.get('peak_rss_mb'), '.0f')} MB):",
        *("  " + ln for ln in grid_text(sample.get("grid", []), sizes)),
        f"CFG cost ratio (maskgit, {summary['headline_steps']} steps, batch {summary['headline_batch']}): "
        f"{fmt(summary['cfg_cost_ratio'], '.2f')}x",
        f"end to end (encode + {HEADLINE_STEPS} steps CFG + detokenise, batch {sample.get('e2e', {}).get('batch', '-')}): "
        f"{fmt(sample.get('e2e', {}).get('sentences_per_s'))} sent/s, encoder "
        f"{fmt(100 * sample.get('e2e', {}).get('encode_fraction', math.nan), '.0f')}% of it",
        "",
        f"embedding cache: {cache.get('sentences', '-')} sentences at {fmt(cache.get('sentences_per_s'))}/s "
        f"(encoder load {fmt(cache.get('encoder_load_seconds'))} s), peak RSS {fmt(cache.get('peak_rss_mb'), '.0f')} MB",
    ]
    failed = [k for k, v in res.items() if "error" in v]
    if failed:
        out.append(f"FAILED parts: {', '.join(failed)}")
    return "\n".join(out)


def results_row(
    res: dict, summary: dict, sizes: Sizes, args: argparse.Namespace, date: str, commit: str, command: str
) -> tuple[str, str]:
    peak, bf, fp = res.get("peak", {}), res.get("train_bf16", {}), res.get("train_fp32", {})
    tr = bf if "params_m" in bf else fp  # model facts from whichever precision ran
    sample, cache = res.get("sample", {}), res.get("cache", {})
    e2e = sample.get("e2e", {})
    header = (
        "| date | commit | config | threads | peak GFLOP/s bf16 / fp32 | train sent/s bf16 / fp32 (speed-up) "
        "| train tok/s bf16 / fp32 | GFLOP/step | MFU (precision used: % of its own peak) | train RSS MB bf16 / fp32 "
        "| sample sent/s maskgit b64 16 steps CFG / no CFG (CFG cost) | end-to-end sent/s | sampling grid sent/s "
        "| sample RSS MB | cache sent/s (N) | cache RSS MB | note | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    k = "/".join(str(s) for s in sizes.sample_steps)
    grid = "; ".join(grid_text(sample.get("grid", []), sizes))
    model = (
        f"{fmt(tr.get('params_m'), '.1f')}M params, V={tr.get('vocab_size', '-')}, "
        f"batch {tr.get('batch_size', '-')}, data: {tr.get('data', '-')}; sampling: {sample.get('model', '-')}"
    )
    cells = [
        date,
        commit,
        f"{args.config} {' '.join(args.set or [])} ({model})".replace("|", "/"),
        str(peak.get("threads", "-")),
        f"{fmt(summary['peak_bf16_gflops'])} / {fmt(summary['peak_fp32_gflops'])}",
        f"{fmt(bf.get('sentences_per_s'))} / {fmt(fp.get('sentences_per_s'))} ({fmt(summary['bf16_speedup'], '.2f')}x)",
        f"{fmt(bf.get('tokens_per_s'), '.0f')} / {fmt(fp.get('tokens_per_s'), '.0f')}",
        fmt((bf if "flops_per_step" in bf else fp).get("flops_per_step", math.nan) / 1e9, ".2f"),
        f"{fmt(100 * summary['mfu'])}% {summary['train_precision']}"
        + (" (bf16 not run: see train_bf16.skipped)" if "skipped" in bf else ""),
        f"{fmt(bf.get('peak_rss_mb'), '.0f')} / {fmt(fp.get('peak_rss_mb'), '.0f')}",
        f"{fmt(summary['sample_cfg_sentences_per_s'])} / {fmt(summary['sample_nocfg_sentences_per_s'])} "
        f"({fmt(summary['cfg_cost_ratio'], '.2f')}x)"
        + (
            ""
            if (summary["headline_steps"], summary["headline_batch"]) == (16, 64)
            else f" [b{summary['headline_batch']}, {summary['headline_steps']} steps]"
        ),
        f"{fmt(e2e.get('sentences_per_s'))} (b{e2e.get('batch', '-')})",
        f"steps {k}: {grid}",
        fmt(sample.get("peak_rss_mb"), ".0f"),
        f"{fmt(cache.get('sentences_per_s'))} ({cache.get('sentences', '-')})",
        fmt(cache.get("peak_rss_mb"), ".0f"),
        (args.note + (" [quick]" if args.quick else "")).strip(),
        f"`{command}`",
    ]
    return header, "| " + " | ".join(cells) + " |\n"


SKIP_BF16 = ("not run: bf16 matmuls are not faster than fp32 on this machine ({peak_bf16_gflops:.2f} vs "
             "{peak_fp32_gflops:.1f} GFLOP/s; precision: auto trains in fp32 here)")


def train_precisions(args: argparse.Namespace, peak: dict) -> tuple[str, ...]:
    """fp32 always; bf16 too unless the peak part measured it slower than fp32 (emulated bf16: a bf16 training
    step would take minutes). --train-precisions forces a list."""
    if args.train_precisions:
        chosen = tuple(p.strip() for p in args.train_precisions.split(",") if p.strip())
        bad = sorted(set(chosen) - {"bf16", "fp32"})
        if bad or not chosen:
            raise SystemExit(f"--train-precisions: {', '.join(bad) or 'nothing given'} is not valid; "
                             "give bf16, fp32 or bf16,fp32")
        return chosen
    bf, fp = peak.get("peak_bf16_gflops"), peak.get("peak_fp32_gflops")
    if bf is not None and fp is not None and bf < fp / BF16_SLOW_RATIO:
        return ("fp32",)
    return ("bf16", "fp32")


def orchestrate(args: argparse.Namespace) -> int:
    sizes = sizes_for(args)
    wanted = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    if args.train_precisions:
        train_precisions(args, {})  # a bad list fails here, before any part has run
    res: dict[str, dict] = {}
    if "peak" in wanted:
        res["peak"] = run_part(args, "peak", [])
    if "train" in wanted:
        precisions = train_precisions(args, res.get("peak", {}))
        for precision in precisions:
            res[f"train_{precision}"] = run_part(args, "train", ["--precision", precision])
        if "train_bf16" not in res:
            peak = res.get("peak", {})
            measured = "peak_bf16_gflops" in peak and "peak_fp32_gflops" in peak
            res["train_bf16"] = {"skipped": SKIP_BF16.format(**peak) if measured and not args.train_precisions
                                 else "not run: not requested (--train-precisions)"}
    if "sample" in wanted:
        res["sample"] = run_part(args, "sample", [])
    if "cache" in wanted:
        res["cache"] = run_part(args, "cache", [])
    summary = summarise(res, sizes)
    text = report(res, summary, sizes)
    print(text)

    date, commit = time.strftime("%Y-%m-%d %H:%M"), git_commit()
    command = "uv run python bench/speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = Path(args.results)
    out_dir = results.parent if args.quick else ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"speed_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out_path.write_text(
        json.dumps(
            {
                "date": date,
                "commit": commit,
                "command": command,
                "config": args.config,
                "overrides": args.set or [],
                "quick": args.quick,
                "sizes": dataclasses.asdict(sizes),
                "summary": summary,
                "parts": res,
            },
            indent=2,
            default=str,
        )
    )
    if all("error" in v for v in res.values()):  # nothing measured: no row of dashes in the results table
        print(f"wrote {out_path}; every part failed, so no row in {results}")
        return 1
    header, row = results_row(res, summary, sizes, args, date, commit, command)
    append_row(results, SECTION, header, row)
    print(f"wrote {out_path} and a row in {results}")
    return 1 if any("error" in v for v in res.values()) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint folder for the sampling part")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--parts", default="", help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--steps", default="", help="sampling step counts, e.g. 4,8,16,32")
    ap.add_argument("--sample-batches", default="", help="sampling batch sizes, e.g. 1,64")
    ap.add_argument(
        "--cache-sentences", type=int, default=0, help="sentences for the cache part (default 2000)"
    )
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--note", default="", help="free text for the RESULTS.md row")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--train-precisions", default="", help="bf16,fp32 (default: fp32, and bf16 where it is fast)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from sgdd.cli import allocator_name, preload_allocator, setup_logging, tune_malloc

    # the heap allocator of src/train.py and the other entry points (sgdd.cli.run_main): tcmalloc when installed
    # (the parts inherit it from the orchestrator), else glibc's malloc, tuned
    preload_allocator(__file__)
    if not args.part:
        return orchestrate(args)

    setup_logging()
    malloc_tuned = tune_malloc()
    sizes = sizes_for(args)
    fn = {"peak": part_peak, "train": part_train, "sample": part_sample, "cache": part_cache}[args.part]
    result = fn(args, sizes)
    result["peak_rss_mb"] = peak_rss_mb()
    result["malloc_tuned"] = malloc_tuned
    result["allocator"] = allocator_name()
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
