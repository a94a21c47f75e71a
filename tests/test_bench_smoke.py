"""Smoke tests of the benchmark scripts in their tiny modes, so they cannot rot. The numbers are not checked
(benchmarks are scripts that print measurements, never timed tests): only that every part runs, reports
positive rates, and writes its JSON and its RESULTS.md row.

The corpus is a few hundred sentences written to a temporary folder: English fiction from ../shared/data when
present, else the offline Wikipedia sample. One torch thread: on a shared machine, spinning OpenMP threads
slow tiny workloads down many times over.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgdd.api import SGDD
from sgdd.config import load_config
from sgdd.data import load_corpus

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/fiction_minilm.yaml"


def bench_env() -> dict[str, str]:
    """The environment for the bench scripts: the test process's own, without the SGDD_MALLOPT=0 conftest sets
    (the scripts report whether they tuned the allocator, and the tests check it)."""
    return {k: v for k, v in os.environ.items() if k != "SGDD_MALLOPT"}


def expected_allocator() -> str:
    """The malloc library file name the bench scripts should report under bench_env(): the one sgdd.cli would
    preload on this machine, else "libc"."""
    from sgdd.cli import allocator_to_preload, loaded_allocator

    path = loaded_allocator() or allocator_to_preload(bench_env(), platform.system(), os.path.isfile)
    return Path(os.path.realpath(path)).name if path else "libc"  # the file /proc/self/maps names


def _load_bench_script(name: str):
    """bench/NAME.py imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(train.txt, valid.txt): 300 and 40 sentences, one per line."""
    folder = tmp_path_factory.mktemp("bench_corpus")
    shared = os.environ.get("SGDD_SHARED_DATA")
    eltec = (Path(shared) if shared else ROOT.parent / "shared" / "data") / "eltec_eng"  # as conftest.py
    if (eltec / "train.txt").is_file() and (eltec / "valid.txt").is_file():
        with open(eltec / "train.txt", encoding="utf-8") as fh:
            train = [next(fh).strip() for _ in range(300)]
        with open(eltec / "valid.txt", encoding="utf-8") as fh:
            valid = [next(fh).strip() for _ in range(40)]
    else:
        from sgdd.data import wiki_sample_sentences

        sents = [s for s in wiki_sample_sentences() if len(s) < 200]
        train, valid = sents[:300], sents[300:340]
    (folder / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
    return folder / "train.txt", folder / "valid.txt"


def tiny_overrides(tiny_corpus, tmp_path: Path) -> list[str]:
    train, valid = tiny_corpus
    return [
        f"data.path={train}",
        f"data.valid_path={valid}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_sentences=0",
        "data.max_length=48",
        "model.init_from=scratch",  # the pretrained-init path is training's own (tested there); saves a model load
        "model.num_layers=1",
        "model.hidden_size=64",
        "model.num_heads=2",
        "model.latent_dim=32",
        "training.latent_pretrain_steps=10",  # the path runs; the config's 1,500 would eat into --minutes
        "training.threads=1",
    ]


def test_speed_quick_runs_every_part(tiny_corpus, tmp_path):
    results = tmp_path / "RESULTS.md"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "speed.py"),
        "--config",
        CONFIG,
        "--quick",
        "--results",
        str(results),
    ]
    for o in tiny_overrides(tiny_corpus, tmp_path):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=bench_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "training" in proc.stdout and "embedding cache" in proc.stdout

    text = results.read_text()
    assert "## Speed (bench/speed.py)" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 20")]
    assert len(rows) == 1 and "--quick" in rows[0] and "[quick]" in rows[0]

    (out,) = tmp_path.glob("speed_*.json")
    data = json.loads(out.read_text())
    parts = data["parts"]
    assert set(parts) == {"peak", "train_bf16", "train_fp32", "sample", "cache"}
    assert all("error" not in p for p in parts.values())
    peak = parts["peak"]
    assert peak["peak_bf16_gflops"] > 0 and peak["peak_fp32_gflops"] > 0
    # bf16 training runs only where bf16 matmuls are not slower than fp32 (emulated bf16 would take minutes)
    bf16_fast = peak["peak_bf16_gflops"] * 0.9 > peak["peak_fp32_gflops"]
    ran = ("bf16", "fp32") if bf16_fast else ("fp32",)
    if not bf16_fast:
        assert parts["train_bf16"]["skipped"].startswith("not run: bf16 matmuls are not faster than fp32")
    # the allocator the entry scripts run with: tcmalloc where installed (preloaded), else glibc's malloc, tuned
    want = expected_allocator()
    assert all(parts[k]["allocator"] == want for k in ("peak", "sample", "cache")), parts
    assert all(parts[k]["malloc_tuned"] is (want == "libc" and platform.libc_ver()[0] == "glibc")
               for k in ("peak", "sample", "cache"))
    assert all(parts[k]["peak_rss_mb"] > 0 for k in ("peak", "sample", "cache", *(f"train_{p}" for p in ran)))
    for precision in ran:
        train = parts[f"train_{precision}"]
        assert train["precision"] == precision and train["batch_size"] == 4
        assert (
            train["data"] == "corpus"
        )  # the tiny corpus has no embedding cache: never built by the benchmark
        assert train["sentences_per_s"] > 0 and train["tokens_per_s"] >= 4 * train["sentences_per_s"]
        assert train["flops_per_step"] > 0
    if bf16_fast:  # the same batches and masks in both precisions: the same counted FLOPs
        assert parts["train_bf16"]["flops_per_step"] == parts["train_fp32"]["flops_per_step"]
    grid = parts["sample"]["grid"]
    keys = {(g["sampler"], g["steps"], g["cfg_scale"], g["batch"]) for g in grid}
    assert keys == {
        (s, k, c, b)
        for s in ("maskgit", "euler", "analytic")
        for k in (4, 16)
        for c in (1.5, 1.0)
        for b in (1, 4)
    }
    assert all(g["sentences_per_s"] > 0 for g in grid)
    assert parts["sample"]["e2e"]["sentences_per_s"] > 0
    assert parts["cache"]["sentences"] == 16 and parts["cache"]["sentences_per_s"] > 0
    summary = data["summary"]
    assert summary["train_precision"] == ("bf16" if bf16_fast else "fp32")
    assert summary["mfu"] > 0 and summary["cfg_cost_ratio"] > 0
    if bf16_fast:
        assert summary["mfu_bf16"] > 0 and summary["bf16_speedup"] > 0
    assert not list((tmp_path / "cache").glob("*/embeddings.npy"))  # the cache part used its own temp folder


def test_synthetic_material_without_a_corpus(tmp_path):
    """No corpus file: a 20,000-id vocabulary and sentence lengths shaped like the fiction corpus."""
    speed = _load_bench_script("speed")
    cfg = load_config(
        CONFIG,
        [f"data.path={tmp_path / 'missing.txt'}", "data.valid_path=", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    material = speed.load_material(cfg, num_synthetic=2000)
    assert material.source == "synthetic" and material.emb is None
    assert len(material.vocab) == speed.SYNTHETIC_VOCAB and material.encoder_dim == 384
    lengths = [len(t) for t in material.tokens]
    assert 20 < sum(lengths) / len(lengths) < 28
    assert min(lengths) >= cfg.data.min_tokens and max(lengths) <= cfg.data.max_length - 1
    assert all(3 <= i < len(material.vocab) for t in material.tokens[:50] for i in t)  # never PAD/MASK/EOS
    assert material.held_out and all(isinstance(s, str) and s for s in material.held_out[:10])
    e = speed.batch_vectors(material, [0, 1, 2], seed=0)
    assert e.shape == (3, 384) and abs(float(e.norm(dim=-1).mean()) - 1.0) < 1e-5


class RandomEncoder:
    """Stand-in frozen encoder (the real tokenizer, random 384-d vectors): builds a cache quickly."""

    dim = 384

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, texts, batch_size=None):
        return torch.nn.functional.normalize(torch.randn(len(texts), self.dim), dim=-1)


def test_material_uses_a_built_cache_and_never_builds_one(tiny_corpus, tmp_path, bundled_tokenizer):
    from sgdd.embed_cache import prepare

    speed = _load_bench_script("speed")
    cfg = load_config(CONFIG, tiny_overrides(tiny_corpus, tmp_path))
    material = speed.load_material(cfg)
    assert material.source == "corpus" and material.emb is None
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*/embeddings.npy"))

    data = prepare(cfg, encoder=RandomEncoder(bundled_tokenizer), progress=False, log=lambda msg: None)
    material = speed.load_material(cfg)
    assert material.source == "cache"
    assert len(material.vocab) == len(data.vocab) and material.tokens == data.train_tokens
    assert material.emb.shape == (len(data.train_tokens), 384)
    assert material.held_out == data.valid_sentences
    e = speed.batch_vectors(material, [3, 1], seed=0)
    assert torch.equal(e, torch.as_tensor(data.train_emb[[3, 1]]))


def test_sample_part_from_a_checkpoint(tiny_corpus, tmp_path, tiny_vocab):
    """--checkpoint: the sampling part loads it through SGDD.from_pretrained and lets the length head decide."""
    import argparse

    from sgdd.checkpoint import save_checkpoint
    from sgdd.generation import choose_lengths
    from sgdd.models import SGDDNet

    speed = _load_bench_script("speed")
    overrides = tiny_overrides(tiny_corpus, tmp_path)
    cfg = load_config(CONFIG, overrides)
    net = SGDDNet(cfg, len(tiny_vocab), 384, encoder_ids=tiny_vocab.encoder_ids)
    tiny_vocab.save(tmp_path / "vocab.json")
    state = net.state_dict()
    save_checkpoint(
        tmp_path / "ck", config=cfg, model_state=state, ema_state=state, vocab_file=tmp_path / "vocab.json"
    )
    args = argparse.Namespace(
        config=CONFIG,
        set=overrides,
        checkpoint=str(tmp_path / "ck"),
        quick=True,
        steps="2",
        sample_batches="1,2",
        cache_sentences=0,
    )
    sizes = speed.sizes_for(args)
    assert sizes.sample_steps == (2,) and sizes.sample_batches == (1, 2)
    threads = torch.get_num_threads()
    try:
        out = speed.part_sample(args, speed.dataclasses.replace(sizes, e2e_batch=2))
    finally:
        torch.set_num_threads(threads)  # the checkpoint's training.threads=1 applies to this process
    assert out["model"] == f"checkpoint {tmp_path / 'ck'}"
    assert len(out["grid"]) == 3 * 2 * 2 and all(g["sentences_per_s"] > 0 for g in out["grid"])
    # lengths come from the checkpoint's length head (untrained: the same for every z)
    expected = choose_lengths(net, torch.zeros(1, cfg.model.latent_dim), cfg)
    assert out["mean_positions"] == float(expected[0])
    assert out["e2e"]["batch"] == 2 and out["e2e"]["sentences_per_s"] > 0


def test_quality_smoke(tiny_corpus, tmp_path):
    """6 seconds of training on the tiny corpus, then the plain and best-of-2 evaluations (about 35 s)."""
    results = tmp_path / "RESULTS.md"
    out_json = ROOT / "bench" / "out" / "bench_smoke_test.json"  # quality.py always writes there (gitignored)
    out_json.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "quality.py"),
        "--config",
        CONFIG,
        "--minutes",
        "0.1",
        "--num-valid",
        "8",
        "--rerank",
        "2",
        "--refine",
        "1",
        "--refine-candidates",
        "2",
        "--run-name",
        "bench_smoke_test",
        "--results",
        str(results),
        *tiny_overrides(tiny_corpus, tmp_path),
        f"training.output_dir={tmp_path / 'checkpoints'}",
        "training.batch_size=8",
        "training.eval_every=0",
        "training.save_every=0",
        "training.num_eval_sentences=4",
        "training.num_eval_batches=1",
        "training.log_every=5",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=bench_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = results.read_text()
    assert "## Quality (bench/quality.py)" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 20")]
    assert len(rows) == 1 and "bench/quality.py" in rows[0]
    out = json.loads(out_json.read_text())
    assert out["steps"] > 0 and out["plain"] and out["rerank"] and out["refine"]
    # the training rate is the whole loop's mean (sentences / loop seconds), in the row's budget cell too
    assert 0 < out["train_sentences_per_s"] < float("inf")
    assert f"{out['steps']} steps, {out['train_sentences_per_s']:.1f} sent/s" in rows[0]
    assert out["refine_settings"] == {"rounds": 1, "candidates": 2}
    # what src/train.py runs with: tcmalloc where installed (preloaded), else glibc's malloc, tuned
    assert out["allocator"] == expected_allocator()
    assert out["malloc_tuned"] is (out["allocator"] == "libc" and platform.libc_ver()[0] == "glibc")
    assert "refine 1 rounds x 2:" in rows[0] and "(round trip " in rows[0]
    allocator = "" if out["allocator"] == "libc" else f", {out['allocator']}"
    g = out["resolved_config"]["sampling"]["guidance_refresh"]  # null-pass reuse, named in the row when on
    assert g > 0  # the fiction config reuses the null pass with guidance, so the row must say so
    null = f", null pass every {g} steps"
    # so does a MaskGIT unmask schedule other than cosine (the fiction config ships linear)
    assert out["resolved_config"]["sampling"]["unmask_schedule"] == "linear"
    unmask = ", linear unmasking"
    assert f"| 16 steps, CFG 1.5{null}{unmask}{allocator}; " in rows[0]
    assert out["decoding"] == {"steps": 16, "cfg_scale": 1.5}
    latest = tmp_path / "checkpoints" / "bench_smoke_test" / "latest"
    assert latest.is_dir()

    # --checkpoint: no training; the same weights decoded with --config's sampling section (overrides included)
    again_json = ROOT / "bench" / "out" / "bench_smoke_test_ckpt.json"
    again_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--config", CONFIG, "--checkpoint", str(latest),
           "--num-valid", "8", "--rerank", "1", "--run-name", "bench_smoke_test_ckpt", "--results", str(results),
           *tiny_overrides(tiny_corpus, tmp_path), "sampling.repeat_penalty=2.5", "sampling.guidance_refresh=0",
           "sampling.unmask_schedule=cosine"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=bench_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [ln for ln in results.read_text().splitlines() if ln.startswith("| 20")]
    assert len(rows) == 2 and f"checkpoint {latest} (step {out['steps']}), not retrained" in rows[1]
    again = json.loads(again_json.read_text())
    assert again["steps"] == out["steps"] and again["train_seconds"] is None and again["rerank"] is None
    assert again["resolved_config"]["sampling"]["repeat_penalty"] == 2.5
    assert again["resolved_config"]["sampling"]["unmask_schedule"] == "cosine"
    assert "null pass every" not in rows[1] and "unmasking" not in rows[1] and "| 16 steps, CFG 1.5" in rows[1]


def test_decode_grid_smoke(tiny_checkpoint, tmp_path):
    """bench/decode_grid.py decodes the same sentences under each setting and writes one row per setting."""
    data = tmp_path / "s.txt"
    data.write_text("The cat sat on the mat.\nIt rained all day.\nShe laughed.\n", encoding="utf-8")
    out = tmp_path / "grid.json"
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "bench" / "decode_grid.py"), "--checkpoint", str(tiny_checkpoint),
            "--data", str(data), "--start", "1", "--end", "3"]
    grid = '[{"steps": 2}, {"steps": 3, "cfg_scale": 1.0, "repeat_penalty": 2.0}]'
    proc = subprocess.run([*base, "--grid", grid, "--output", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == [{"steps": 2}, {"steps": 3, "cfg_scale": 1.0, "repeat_penalty": 2.0}]
    assert all(r["sentences"] == 2 and r["seconds"] > 0 and 0 <= r["bleu_roundtrip"] <= 100 for r in rows)
    assert proc.stdout.count("BLEU") == 2
    assert json.loads(out.read_text())["weights"] == "ema" and "(EMA weights)" in proc.stdout
    raw = subprocess.run([*base, "--grid", '[{"steps": 2}]', "--raw", "--output", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert raw.returncode == 0 and json.loads(out.read_text())["weights"] == "raw" and "(raw weights)" in raw.stdout
    bad = subprocess.run([*base, "--grid", "{steps: 2}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env)
    assert bad.returncode == 2 and "--grid is not valid JSON" in bad.stderr and "Traceback" not in bad.stderr


def test_train_batches_are_representative_of_the_epochs_lengths():
    """speed.py times training on a few batches; they sit at evenly spaced length quantiles, so their mean padded
    length is the epoch's (the first batches of an epoch are a random, often short, sample)."""
    import numpy as np

    from sgdd.data import LengthBucketSampler

    speed = _load_bench_script("speed")
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.gamma(2.0, 12.0, size=20_000).astype(int), 1, 63)
    tokens = [[5] * int(n) for n in lengths]
    bucket = LengthBucketSampler(list(lengths), batch_size=64, seed=0, bucket=True)
    epoch_mean = np.mean([max(lengths[i] for i in idx) for idx in bucket.batches(0)])
    chosen = speed.representative_batches(bucket, tokens, 6)
    assert len(chosen) == 6 and all(len(idx) == 64 for idx in chosen)
    padded = [max(lengths[i] for i in idx) for idx in chosen]
    assert padded == sorted(padded) and padded[0] < padded[-1]  # spread over the quantiles, short to long
    assert abs(np.mean(padded) - epoch_mean) < 0.1 * epoch_mean


def test_vector_probe_smoke(tiny_checkpoint, tmp_path):
    """bench/vector_probe.py encodes word-order variants of a few sentences; the climb only ever raises the cosine."""
    data = tmp_path / "s.txt"
    data.write_text("The cat sat on the mat by the door.\nIt rained all day and the roads were wet.\n"
                    "She laughed at him.\nWell.\n", encoding="utf-8")
    out = tmp_path / "probe.json"
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "bench" / "vector_probe.py"), "--config", CONFIG, "--data", str(data)]
    proc = subprocess.run([*base, "--end", "4", "--shuffles", "3", "--climb-rounds", "2", "--moves", "3",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert res["sentences"] == 3  # "Well." has no word order to probe
    assert res["cos_climb"] >= res["cos_random_order"] - 1e-6
    assert res["cos_adjacent_swap"] > res["cos_other_sentence"]
    assert 0 <= res["order_identified"] <= 100 and 0 <= res["bleu_exact_words_climb"] <= 100
    assert "hill climb on the cosine" in proc.stdout
    bad = subprocess.run([*base, "--start", "3", "--end", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert bad.returncode == 2 and "need 0 <= --start < --end" in bad.stderr and "Traceback" not in bad.stderr
    # with a checkpoint: its outputs, then their words re-ordered (the same bag of words: token F1 cannot move)
    proc = subprocess.run([*base, "--checkpoint", str(tiny_checkpoint), "--end", "4", "--shuffles", "2",
                           "--climb-rounds", "2", "--moves", "2", "--setting", '{"steps": 2}', "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    res = got["results"]
    assert got["setting"] == {"steps": 2} and got["checkpoint"] == str(tiny_checkpoint)
    assert res["cos_decoded_climb"] >= res["cos_decoded"] - 1e-6 and 0 <= res["bleu_decoded_climb"] <= 100
    assert "re-ordered by the climb" in proc.stdout
    both = subprocess.run([*base, "--checkpoint", str(tiny_checkpoint), "encoder.pooling=cls"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert both.returncode == 2 and "with --checkpoint the checkpoint's config is used" in both.stderr


def test_bow_probe_smoke(tiny_corpus, tmp_path):
    """bench/bow_probe.py trains its probe on the cached vectors for a few seconds and reports held-out recalls."""
    out = tmp_path / "bow.json"
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "bench" / "bow_probe.py"), "--config", CONFIG]
    proc = subprocess.run([*base, "--minutes", "0.05", "--hidden", "32", "--batch", "16", "--eval-every", "1",
                           "--output", str(out), *tiny_overrides(tiny_corpus, tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    final = got["final"]
    assert len(got["curve"]) >= 2 and final["step"] > 0 and final["sentences"] == final["step"] * 16
    for key in ("recall", "recall_2x", "content_recall"):
        assert 0.0 <= final[key] <= 1.0
    assert final["recall_2x"] >= final["recall"]  # a longer top list finds at least as many
    bad = subprocess.run([*base, "--minutes", "0", *tiny_overrides(tiny_corpus, tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "--minutes" in bad.stderr and "Traceback" not in bad.stderr



def test_profile_sampling_smoke(tiny_checkpoint, tmp_path):
    """bench/profile_sampling.py times the sampler on a checkpoint; a rerun (same seeds, here --against's A in a
    fresh process) prints the same outputs' hash, --torch-profile adds the operator tables, and a bad --split is a
    one-line error."""
    data = tmp_path / "s.txt"
    data.write_text("The cat sat on the mat.\nIt rained all day.\nShe laughed.\n", encoding="utf-8")
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "bench" / "profile_sampling.py"), "--checkpoint", str(tiny_checkpoint),
            "--data", str(data), "--batches", "2", "--batch", "4", "--steps", "2"]
    runs = [subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
            for extra in ([], ["--split", "2", "--torch-profile"])]
    for proc in runs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [next(line for line in p.stdout.splitlines() if "sentences/s" in line) for p in runs]
    rate = float(lines[0].split()[0])
    assert rate > 0 and "2 batches of 4, 2 steps" in lines[0] and "split 2" in lines[1]
    digest = [re.search(r"outputs (\w+), BLEU (\d+\.\d+)", line).group(1) for line in lines]
    assert len(digest[0]) == 12 and len(digest[1]) == 12
    assert "aten::" in runs[1].stdout and "aten::" not in runs[0].stdout
    # --against: both settings timed batch by batch; A is the plain run's setting with the same seeds, so its
    # outputs are the same text as the plain run's (another process: the rerun check)
    ab = subprocess.run([*base, "--against", "sampling.row_widths=false"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=env)
    assert ab.returncode == 0, ab.stdout[-3000:] + ab.stderr[-3000:]
    a_line = next(line for line in ab.stdout.splitlines() if line.startswith("A: "))
    assert re.search(r"outputs (\w+)", a_line).group(1) == digest[0]
    assert "B: " in ab.stdout and "A + sampling.row_widths=false" in ab.stdout
    assert re.search(r"time B / A: median \d+\.\d+ over 2 batches", ab.stdout)
    for extra, flag in ((["--split", "9"], "--split"), (["--against", "sampling.steps=4", "--torch-profile"],
                                                         "--against")):
        bad = subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr


def test_speed_summary_names_no_training_precision_without_the_peaks():
    """`--parts sample` measures no matmul peak: the summary must not claim the machine trains in fp32."""
    speed = _load_bench_script("speed")
    grid = [{"sampler": "maskgit", "steps": 16, "cfg_scale": 1.5, "batch": 64, "sentences_per_s": 70.0}]
    summary = speed.summarise({"sample": {"grid": grid}}, speed.Sizes())
    assert summary["train_precision"] == "-"
    peaks = {"peak_bf16_gflops": 900.0, "peak_fp32_gflops": 200.0}
    assert speed.summarise({"peak": peaks, "sample": {"grid": grid}}, speed.Sizes())["train_precision"] == "bf16"


def test_corrector_probe_packs_each_rows_draft_behind_its_latent():
    """The corrector's draft and e_hyp travel behind z; any row subset (as the sampler takes) unpacks to its own
    rows, each draft ending in EOS, trimmed to the subset's longest draft."""
    from conftest import perturbed_decoder

    probe = _load_bench_script("corrector_probe")
    dec = probe.DraftDecoder.convert(perturbed_decoder(40, 8), encoder_dim=6)
    z, e = torch.randn(3, 8), torch.randn(3, 6)
    drafts = [[5, 6, 7, 8], [9], [10, 11]]
    zp = probe.pack(z, e, drafts, 16)
    assert zp.shape == (3, 8 + 6 + 16)
    for rows in ([0, 1, 2], [2, 1], [1]):
        zs, es, d = dec.split(zp[rows])
        assert torch.equal(zs, z[rows]) and torch.equal(es, e[rows])
        width = max(len(drafts[r]) for r in rows) + 1
        assert d.shape == (len(rows), width)
        for i, r in enumerate(rows):
            assert d[i].tolist() == drafts[r] + [probe.EOS_ID] + [probe.PAD_ID] * (width - len(drafts[r]) - 1)
    # W e_hyp starts at zero: the latent is z until the corrector trains it
    assert torch.equal(dec.latent(z, e), z)
    # the draft reaches the output: another draft changes the logits at the same (x_t, t, z)
    x_t = torch.full((3, 10), 1)
    other = probe.pack(z, e, [[12, 13, 14, 15], [16], [17, 18]], 16)
    with torch.no_grad():
        assert not torch.allclose(dec(x_t, torch.full((3,), 0.5), zp), dec(x_t, torch.full((3,), 0.5), other))


def test_corrector_probe_smoke(tiny_checkpoint, tiny_corpus, tmp_path):
    """bench/corrector_probe.py drafts with the checkpoint, trains its corrector for a few seconds and scores every
    arm; a second run reuses the drafts."""
    train, valid = tiny_corpus
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cp"
    cmd = [sys.executable, str(ROOT / "bench" / "corrector_probe.py"), "--checkpoint", str(tiny_checkpoint),
           "--train-text", str(train), "--valid-text", str(valid), "--num-train", "48", "--num-valid", "6",
           "--batch-size", "16", "--out", str(out)]
    proc = subprocess.run([*cmd, "--minutes", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    for arm in ("base", "base_exact", "corrector", "corrector_other_drafts", "corrector_empty_draft",
                "corrector_round2"):
        assert 0 <= r[arm]["bleu_roundtrip"] <= 100 and 0 <= r[arm]["token_f1_roundtrip"] <= 100, arm
    assert r["train"]["steps"] >= 1 and r["train"]["sentences"] == 16 * r["train"]["steps"]
    # the drafted training sentences are the base's kind of training sentences: load_corpus's filtered training set
    # of --train-text (the length filter drops some of these 300 lines), never a validation line
    cfg = SGDD.from_pretrained(tiny_checkpoint).cfg
    data_cfg = dataclasses.replace(cfg.data, source="text", path=str(train), valid_path=str(valid))
    corpus = load_corpus(dataclasses.replace(cfg, data=data_cfg))
    drafted = torch.load(out / "drafts.pt")["train"]
    assert len(drafted) == 48 and set(drafted) <= set(corpus.train)
    assert len(corpus.train) < 300 and not set(drafted) & set(corpus.valid)
    again = subprocess.run([*cmd, "--minutes", "0.01", "--no-draft"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "drafts from" in again.stdout and json.loads((out / "results.json").read_text())["args"]["no_draft"]
    short = subprocess.run([*cmd, "--minutes", "0.01", "--num-train", "100000", "--out", str(tmp_path / "x")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert short.returncode != 0 and "lower --num-train" in short.stderr and "Traceback" not in short.stderr


def test_repro_compares_runs_with_the_first(tmp_path):
    """bench/repro.py's comparison: outputs counted one by one; weights by digest, then the largest difference, the
    tensor it is in and how many elements differ."""
    repro = _load_bench_script("repro")
    first = {"outputs": ["a b", "c d", "e"]}
    assert repro.compare("decode", first, {"outputs": ["a b", "c d", "e"]}) == {"match": True, "same_outputs": 3,
                                                                                "of": 3}
    assert repro.compare("decode", first, {"outputs": ["a b", "c", "e"]})["same_outputs"] == 2
    w = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    digest, flat = repro.weights_digest(w)
    assert repro.weights_digest({"y": w["y"].clone(), "x": w["x"].clone()})[0] == digest  # order-free
    w2 = {"x": w["x"].clone(), "y": w["y"].clone()}
    w2["x"][1, 2] += 0.25
    digest2, flat2 = repro.weights_digest(w2)
    assert digest2 != digest
    assert repro.weights_digest({"x": w["x"].to(torch.float64), "y": w["y"]})[0] != digest  # dtype counts
    torch.save(flat, tmp_path / "a.pt")
    torch.save(flat2, tmp_path / "b.pt")
    first = {"digest": digest, "weights": str(tmp_path / "a.pt")}
    assert repro.compare("train", first, dict(first)) == {"match": True, "max_abs_diff": 0.0}
    cmp = repro.compare("train", first, {"digest": digest2, "weights": str(tmp_path / "b.pt")})
    rel = cmp.pop("rel_l2_diff")
    assert cmp == {"match": False, "max_abs_diff": 0.25, "worst_tensor": "x", "tensors_differing": 1, "tensors": 2,
                   "elements_differing": 1, "elements": 8}
    assert abs(rel - 0.25 / float(torch.cat([flat["x"].flatten(), flat["y"]]).norm())) < 1e-6
    assert repro.parse_pairs(["A=1", "B=x=y"], "--env") == {"A": "1", "B": "x=y"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        repro.parse_pairs(["A"], "--env")
    assert repro.checked_overrides(["sampling.steps=16"], "--set") == ["sampling.steps=16"]
    with pytest.raises(SystemExit, match="'sampling.steps' must be an integer"):
        repro.checked_overrides(["sampling.steps=many"], "--set")


def test_repro_decode_smoke(tiny_checkpoint, tiny_corpus, tmp_path):
    """bench/repro.py repeats a decode in fresh processes; with one thread on an idle machine it repeats bit for bit,
    and the JSON says so."""
    _, valid = tiny_corpus
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "bench" / "repro.py"), "decode", "--checkpoint", str(tiny_checkpoint),
           "--data", str(valid), "--num", "4", "--runs", "2", "--set", "sampling.steps=4", "--env", "SGDD_TEST_MARK=1",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["summary"]["matched_first"] == "1 / 1" and r["runs"][1]["same_outputs"] == 4
    assert r["summary"]["distinct_results"] == 1
    assert r["summary"]["env"] == {"SGDD_TEST_MARK": "1"}
    assert r["summary"]["sampling"]["steps"] == 4  # --set overrides the checkpoint's config
    assert r["summary"]["sampling"]["cfg_scale"] == SGDD.from_pretrained(tiny_checkpoint).cfg.sampling.cfg_scale
    bad = subprocess.run([*cmd, "--runs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode != 0 and "--runs must be at least 2" in bad.stderr
    # a misspelt override fails before any run, naming the key
    typo = subprocess.run([*cmd, "--set", "sampling.stepz=4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert typo.returncode != 0 and "sampling.stepz" in typo.stderr and "Traceback" not in typo.stderr


@pytest.mark.slow
def test_repro_train_smoke(tiny_corpus, tmp_path):
    """bench/repro.py's train mode: two 3-step runs of a tiny model in fresh processes agree bit for bit with one
    thread (slow: ~30 s; its comparison is tested in-process above)."""
    from conftest import tiny_train_overrides

    train, _ = tiny_corpus
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    overrides = tiny_train_overrides(tmp_path, [line for line in train.read_text().splitlines() if line][:64])
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(ROOT / "bench" / "repro.py"), "train", "--steps", "3", "--runs", "2",
           "--output", str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["summary"]["matched_first"] == "1 / 1" and r["runs"][1]["max_abs_diff"] == 0.0
    assert r["summary"]["distinct_results"] == 1
