"""Is a run bit-reproducible across processes? Repeats one decode (or one short training run) in fresh processes,
optionally with busy-loop processes competing for the cores, and compares every run with the first.

    uv run python bench/repro.py decode --checkpoint checkpoints/RUN/latest --data valid.txt --num 100 --runs 10 \\
        [--load 1] [--env MKL_DYNAMIC=FALSE --env OMP_DYNAMIC=FALSE] [--set sampling.steps=16 --set sampling.cfg_scale=1.5]
    uv run python bench/repro.py train --config configs/fiction_minilm.yaml --steps 50 --runs 4 [--load 1] \\
        [--env ...] [key=value config overrides ...]

decode: each run loads the checkpoint (EMA weights) and reconstructs the first --num non-empty lines of --data
with seed 0 and the checkpoint's config (--set KEY=VALUE overrides it, as in bench/speed.py); a run
matches when all its outputs equal the first run's, else the report gives how many do.
train: each run trains --steps optimizer steps from the config's seed (no time budget, no latent pre-training
unless the overrides ask for it, no evaluation) into a scratch folder; a run matches when its final raw weights
hash to the first run's, else the report gives the largest absolute weight difference.
--load N starts N processes spinning on the CPU for the whole series (a machine under load); --env KEY=VALUE sets
an environment variable in every run. Prints one line per run and a summary; --output writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def _spin() -> None:
    while True:
        pass


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, got '{p}'")
        out[key] = value
    return out


def checked_overrides(overrides: list[str], flag: str) -> list[str]:
    """--set KEY=VALUE config overrides, checked against the config's sections, fields and types (on the default
    config: the parent has not loaded the checkpoint) so a typo fails before the first run."""
    from sgdd.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict

    try:
        config_from_dict(apply_overrides(config_to_dict(Config()), overrides), flag)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    return overrides


def child_decode(args) -> dict:
    import torch
    from common import read_lines

    from sgdd.api import SGDD

    texts = read_lines(args.data, args.num)
    if not texts:
        raise SystemExit(f"--data {args.data} has no non-empty lines")
    from sgdd.config import apply_overrides, config_from_dict, config_to_dict, validate_config

    model = SGDD.from_pretrained(args.checkpoint, device="cpu")
    if args.set:  # the checkpoint's config with the overrides, as bench/speed.py applies them
        model.cfg = config_from_dict(apply_overrides(config_to_dict(model.cfg), args.set), "--set")
        validate_config(model.cfg, "--set")
    t0 = time.time()
    outputs = model.reconstruct(texts, seed=0)
    return {"outputs": outputs, "seconds": time.time() - t0, "threads": torch.get_num_threads(),
            "sampling": dataclasses.asdict(model.cfg.sampling)}


def weights_digest(state: dict) -> tuple[str, dict]:
    """sha256 over the tensors' names, dtypes, shapes and bytes in name order; the tensors themselves (float32)."""
    import torch

    h = hashlib.sha256()
    flat = {}
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        flat[name] = t.float()
    return h.hexdigest(), flat


def child_train(args) -> dict:
    import torch

    from sgdd.checkpoint import load_checkpoint
    from sgdd.config import load_config
    from sgdd.training import train

    out = Path(args.workdir)
    # defaults the caller's overrides may change, then what the series needs (a fresh folder per run, no budget)
    overrides = [
        "training.eval_every=0", "training.final_eval=false", "training.latent_pretrain_steps=0",
        "tracking.mode=disabled", *args.overrides, f"training.max_steps={args.steps}", "training.max_minutes=0",
        f"training.save_every={args.steps}", f"training.output_dir={out}", "training.run_name=repro",
    ]
    cfg = load_config(args.config, overrides)
    t0 = time.time()
    result = train(cfg)
    seconds = time.time() - t0
    ckpt = load_checkpoint(result.run_dir / "latest")
    digest, flat = weights_digest(ckpt.model_state)
    torch.save(flat, out / "weights.pt")
    return {"digest": digest, "step": result.step, "seconds": seconds, "threads": torch.get_num_threads(),
            "weights": str(out / "weights.pt")}


def run_child(args, mode: str, env: dict, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, "--child", "--workdir", str(workdir)]
    if mode == "decode":
        cmd += ["--checkpoint", args.checkpoint, "--data", args.data, "--num", str(args.num)]
        cmd += [x for s in args.set for x in ("--set", s)]
    else:
        cmd += (["--config", args.config] if args.config else []) + ["--steps", str(args.steps), *args.overrides]
    # the caller's working directory: relative paths in the arguments and overrides mean what they meant to the caller
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"a {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result_file = workdir / "result.json"
    return json.loads(result_file.read_text(encoding="utf-8"))


def compare(mode: str, first: dict, run: dict) -> dict:
    if mode == "decode":
        same = sum(a == b for a, b in zip(first["outputs"], run["outputs"], strict=True))
        return {"match": same == len(first["outputs"]), "same_outputs": same, "of": len(first["outputs"])}
    if first["digest"] == run["digest"]:
        return {"match": True, "max_abs_diff": 0.0}
    import torch

    a, b = torch.load(first["weights"]), torch.load(run["weights"])
    diffs = {k: (a[k] - b[k]).abs() for k in a}
    worst = max(diffs, key=lambda k: float(diffs[k].max()) if diffs[k].numel() else 0.0)
    return {"match": False, "max_abs_diff": float(diffs[worst].max()), "worst_tensor": worst,
            "tensors_differing": sum(bool((d > 0).any()) for d in diffs.values()), "tensors": len(diffs),
            "elements_differing": sum(int((d > 0).sum()) for d in diffs.values()),
            "elements": sum(d.numel() for d in diffs.values()),
            "rel_l2_diff": float(sum(float((d ** 2).sum()) for d in diffs.values()) ** 0.5
                                 / max(1e-30, sum(float((a[k] ** 2).sum()) for k in a) ** 0.5))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("decode", "train"):
        p = sub.add_parser(mode)
        p.add_argument("--runs", type=int, default=10, help="fresh processes, the first one included")
        p.add_argument("--load", type=int, default=0, help="busy-loop processes running during the series")
        p.add_argument("--env", action="append", default=[], help="KEY=VALUE set in every run (repeatable)")
        p.add_argument("--output", help="write the runs and the summary as JSON here")
        p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--workdir", help=argparse.SUPPRESS)
        if mode == "decode":
            p.add_argument("--checkpoint", required=True)
            p.add_argument("--data", required=True, help="UTF-8 text, one sentence per line")
            p.add_argument("--num", type=int, default=100, help="sentences: the first NUM non-empty lines")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="config override on the checkpoint's config, e.g. sampling.steps=16 (repeatable)")
        else:
            p.add_argument("--config", help="YAML config (default: the built-in defaults)")
            p.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
            p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()

    if args.child:
        result = child_decode(args) if args.mode == "decode" else child_train(args)
        Path(args.workdir, "result.json").write_text(json.dumps(result), encoding="utf-8")
        return 0

    if args.runs < 2:
        raise SystemExit(f"--runs must be at least 2 (the first run is the reference), got {args.runs}")
    if args.mode == "decode" and not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: no such file")
    checked_overrides(getattr(args, "set", []), "--set")
    env = {**os.environ, **parse_pairs(args.env, "--env")}
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    rows, results = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="sgdd_repro_") as tmp:
            first = None
            for i in range(args.runs):
                workdir = Path(tmp, f"run{i}")
                workdir.mkdir()
                run = run_child(args, args.mode, env, workdir)
                if first is None:
                    first, cmp = run, {"match": True}
                else:
                    cmp = compare(args.mode, first, run)
                row = {"run": i, "seconds": round(run["seconds"], 1), "threads": run["threads"], **cmp}
                results.append(run["digest"] if args.mode == "train" else tuple(run["outputs"]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for s in spinners:
            s.kill()
    matched = sum(r["match"] for r in rows[1:])
    summary = {"mode": args.mode, "runs": args.runs, "load": args.load, "env": parse_pairs(args.env, "--env"),
               "matched_first": f"{matched} / {args.runs - 1}", "distinct_results": len(set(results))}
    if args.mode == "decode":  # the sampling settings the runs decoded with: the checkpoint's, after --set
        summary["sampling"] = first["sampling"]
    print(f"{args.mode}: {matched} of {args.runs - 1} runs identical to the first, {len(set(results))} distinct "
          f"result(s) in {args.runs} runs (load {args.load}, env {summary['env'] or '-'})")
    if args.output:
        Path(args.output).write_text(json.dumps({"summary": summary, "runs": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
