"""Reconstruction quality per CPU budget: train from scratch for a fixed wall-clock budget, then evaluate the
final EMA weights on held-out sentences through the sampler (16 MaskGIT steps with CFG 1.5 unless --steps /
--cfg-scale say otherwise, then best-of-K rerank; the row's note starts with the settings used).

    uv run python bench/quality.py --config configs/fiction_minilm.yaml --minutes 60

The embedding cache is built before the clock starts. Prints the metrics, writes JSON to bench/out/ and appends
a row to bench/RESULTS.md (date, commit, config, budget, metrics, command).

    uv run python bench/quality.py --config configs/fiction_minilm.yaml --checkpoint checkpoints/RUN/latest

skips training and evaluates an earlier run's weights, decoded with --config's sampling section (steps and
guidance from --steps / --cfg-scale; to measure a decoding change on the same weights); the row says which
checkpoint and step it evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# this checkout's sources first: the environment's editable install may point at another checkout (a
# benchmark run from a git worktree snapshot must time the snapshot's code, the commit its row records)
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from common import append_row, git_commit, read_lines  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    ap.add_argument("--valid", default=None, help="evaluation sentences (default: the config's valid_path)")
    ap.add_argument("--num-valid", type=int, default=1000)
    ap.add_argument("--rerank", type=int, default=8)
    ap.add_argument("--num-rerank", type=int, default=0,
                    help="evaluate the rerank on only the first N sentences (0 = all); best-of-K costs K decodes each")
    ap.add_argument("--refine", type=int, default=0,
                    help="also evaluate encoder-guided refinement (this many rounds) on the rerank subset; 0 = off")
    ap.add_argument("--refine-candidates", type=int, default=8)
    ap.add_argument("--checkpoint", default=None,
                    help="skip training: evaluate this checkpoint's EMA weights with --config's sampling section")
    ap.add_argument("--run-name", default=None)
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--steps", type=int, default=16, help="decoding steps (default 16, the benchmark's setting)")
    ap.add_argument("--cfg-scale", type=float, default=1.5,
                    help="guidance scale (default 1.5, the benchmark's setting; the config's own may differ)")
    ap.add_argument("--note", default="", help="free text for the RESULTS.md row (what this experiment changes)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from sgdd.cli import allocator_name, preload_allocator, setup_logging, tune_malloc

    setup_logging()
    # the heap allocator src/train.py runs with (sgdd.cli.run_main): tcmalloc when installed (re-executes this
    # process; SGDD_ALLOCATOR=system keeps the C library's), else glibc's malloc with the settings without which
    # training here ran at ~40-49 instead of ~55-62 sentences/s (bench/RESULTS.md, first 60-minute fp32 run)
    preload_allocator(__file__)
    malloc_tuned = tune_malloc()
    allocator = allocator_name()
    from sgdd.api import SGDD
    from sgdd.config import config_to_dict, load_config
    from sgdd.embed_cache import prepare
    from sgdd.evaluation import evaluate_reconstruction, print_report
    from sgdd.sampling.maskgit import reuses_null_pass
    from sgdd.training import train

    run_name = args.run_name or f"bench_quality_{time.strftime('%Y%m%d_%H%M%S')}"
    overrides = [f"training.max_minutes={args.minutes}", f"training.run_name={run_name}", "training.resume=",
                 "tracking.mode=disabled", *args.overrides]
    cfg = load_config(args.config, overrides)
    if args.checkpoint:
        from sgdd.checkpoint import load_checkpoint

        meta = load_checkpoint(args.checkpoint).meta
        model = SGDD.from_pretrained(args.checkpoint)
        model.cfg = dataclasses.replace(model.cfg, sampling=cfg.sampling)  # decode as --config says
        steps, train_s, train_rate = int(meta.get("step", 0)), None, float("nan")
        budget = f"checkpoint {args.checkpoint} (step {steps}), not retrained"
    else:
        prepare(cfg)  # cache built (or validated) before the clock starts
        t0 = time.monotonic()
        result = train(cfg)
        train_s = time.monotonic() - t0
        model = SGDD.from_pretrained(result.run_dir / "latest")  # final EMA weights
        steps = result.step
        # the whole loop's mean (before round 38 the last 50-step log window's rate: noisy with length buckets)
        train_rate = result.loop_sentences / result.loop_seconds if result.loop_seconds > 0 else float("nan")
        budget = f"{args.minutes:g} min, {steps} steps, {train_rate:.1f} sent/s"

    valid_path = Path(args.valid) if args.valid else (ROOT / cfg.data.valid_path if cfg.data.valid_path else None)
    if valid_path is not None and valid_path.is_file():
        sentences = read_lines(valid_path, args.num_valid)
    else:
        from sgdd.data import load_corpus

        sentences = load_corpus(cfg.data).valid[: args.num_valid]
    dec = {"steps": args.steps, "cfg_scale": args.cfg_scale}
    plain = evaluate_reconstruction(model, sentences, **dec)
    print_report(plain)
    rr_sents = sentences[: args.num_rerank] if args.num_rerank > 0 else sentences
    reranked = evaluate_reconstruction(model, rr_sents, rerank=args.rerank, **dec) if args.rerank > 1 else None
    subset_used = reranked is not None or args.refine > 0
    same_subset = (evaluate_reconstruction(model, rr_sents, **dec)
                   if subset_used and len(rr_sents) < len(sentences) else None)
    if reranked:
        print_report(reranked)
    refined = None
    if args.refine > 0:
        refined = evaluate_reconstruction(model, rr_sents, refine=args.refine, **dec,
                                          refine_candidates=args.refine_candidates)
        print_report(refined)

    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "config": args.config,
        "overrides": args.overrides,
        "checkpoint": args.checkpoint,
        "minutes": None if args.checkpoint else args.minutes,
        "decoding": dec,
        "train_seconds": train_s,
        "steps": steps,
        "train_sentences_per_s": train_rate,
        "malloc_tuned": malloc_tuned,
        "allocator": allocator,
        "plain": plain["metrics"],
        "rerank": reranked["metrics"] if reranked else None,
        "rerank_subset": len(rr_sents),
        "plain_on_rerank_subset": same_subset["metrics"] if same_subset else None,
        "refine": refined["metrics"] if refined else None,
        "refine_settings": {"rounds": args.refine, "candidates": args.refine_candidates} if refined else None,
        "resolved_config": config_to_dict(model.cfg),
        "examples": plain.get("examples", [])[:20],
        "command": "uv run python bench/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{run_name}.json"
    out_path.write_text(json.dumps(out, indent=2, default=str))
    m, r = plain["metrics"], (reranked or {}).get("metrics", {})
    sampling = model.cfg.sampling  # the row names null-pass reuse when the sampler applied it
    null_reuse = sampling.sampler == "maskgit" and reuses_null_pass(sampling, args.cfg_scale,
                                                                    model.cfg.model.self_condition)
    row = (f"| {out['date']} | {out['commit']} | {args.config} {' '.join(args.overrides)} | {budget} | {m.get('bleu', float('nan')):.2f} "
           f"(round trip {m.get('bleu_roundtrip', float('nan')):.2f}) | "
           f"{m.get('chrf', float('nan')):.1f} | {m.get('exact_match', float('nan')):.3f} | "
           f"{m.get('cosine', float('nan')):.3f} | {m.get('token_f1', float('nan')):.3f} | "
           f"{r.get('bleu', float('nan')):.2f} (n={len(rr_sents)}"
           + (f", plain on the same {len(rr_sents)}: {same_subset['metrics']['bleu']:.2f}" if same_subset else "")
           + ")"
           + (f"; refine {args.refine} rounds x {args.refine_candidates}: {refined['metrics']['bleu']:.2f}"
              if refined else "")
           + f" | {args.steps} steps, CFG {args.cfg_scale:g}"
           + (f", null pass every {sampling.guidance_refresh} steps" if null_reuse else "")
           + (f", {sampling.unmask_schedule} unmasking"
              if sampling.sampler == "maskgit" and sampling.unmask_schedule != "cosine" else "")
           + (f", {allocator}" if allocator != "libc" else "") + f"; {args.note} | `{out['command']}` |\n")
    results = Path(args.results)
    if not results.exists():
        results.write_text("# Benchmark results\n\n")
    header = ("| date | commit | config | budget | BLEU | chrF | exact | cosine | token F1 | BLEU rerank | note "
              "| command |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    append_row(results, "## Quality (bench/quality.py)", header, row)
    print(f"wrote {out_path} and a row in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
