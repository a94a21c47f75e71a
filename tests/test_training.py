"""The training loop on tiny CPU configs: it runs and checkpoints, resumes exactly, stops cleanly on a signal,
guards against non-finite losses, and trains under DDP with 2 CPU processes."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_overrides

from sgdd.checkpoint import load_checkpoint
from sgdd.config import load_config
from sgdd.registry import ConfigError
from sgdd.training import EMA, TrainingError, kl_weight_at, lr_factor, train

ROOT = Path(__file__).resolve().parents[1]


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 0.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert kl_weight_at(5, 1.0, 10) == pytest.approx(0.5) and kl_weight_at(50, 1.0, 10) == 1.0


def test_ema_is_float32_and_moves_under_bf16_params():
    m = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(m, decay=0.999)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    for _ in range(5):
        ema.update(m)
    assert all(not torch.equal(a, b) for a, b in zip(before, ema.shadow, strict=True))


def test_train_runs_and_checkpoints(tmp_path, real_sentences):
    losses: list = []
    cfg = load_config(None, tiny_train_overrides(tmp_path, real_sentences[:48]))
    result = train(cfg, log_losses=losses)
    assert result.step == 6 and [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in losses)
    ck = load_checkpoint(result.run_dir / "latest", with_train_state=True)
    assert ck.meta["step"] == 6 and ck.train_state["step"] == 6 and ck.ema_state is not None
    assert ck.config.model.hidden_size == 64
    if sys.platform.startswith("linux"):
        assert result.last_metrics["train/rss_mb"] > 10  # the log's resident size (sgdd.cli.resident_mb)
    assert (result.run_dir / "step-0000003").is_dir() and (result.run_dir / "step-0000006").is_dir()


def test_the_logged_loss_is_the_mean_over_the_steps_since_the_last_log_line(tmp_path, real_sentences):
    # batches are length buckets, so one step's loss swings with its sentences' length; the log line and the
    # tracker report the window's mean (steps 5-8 here: logged at 1, 4, 8)
    losses: list = []
    overrides = tiny_train_overrides(tmp_path, real_sentences[:48]) + [
        "training.log_every=4", "training.max_steps=8", "training.save_every=0"]
    cfg = load_config(None, overrides)
    result = train(cfg, log_losses=losses)
    window = [v for s, v in losses if 5 <= s <= 8]
    assert len(window) == 4 and len({round(v, 6) for v in window}) > 1  # the steps differ, so a mean is testable
    assert result.last_metrics["train/loss"] == pytest.approx(sum(window) / 4, rel=1e-9)
    assert result.last_metrics["train/loss"] != pytest.approx(window[-1], rel=1e-9)
    assert 0.0 <= result.last_metrics["train/acc"] <= 1.0
    # the diffusion term alone has its own name: it never overwrites the total
    assert 0.0 < result.last_metrics["train/diffusion_loss"] < result.last_metrics["train/loss"]
    # validation uses the same name (sgdd.training.TrainStep renames the process's "loss")
    from sgdd.api import SGDD
    from sgdd.data import make_batch
    from sgdd.training import TrainStep, validation_loss

    model = SGDD.from_pretrained(result.run_dir / "latest", device="cpu")
    texts = real_sentences[:2]
    x0 = make_batch([model.vocab.encode(t) for t in texts], cfg.data.max_length)
    val = validation_loss(TrainStep(model.net, model.process, model.vocab.PAD), [(x0, model.encode(texts))], cfg)
    assert val["val/diffusion_loss"] > 0 and "val/loss" not in val
    # the whole loop's count and time (bench/quality.py's training rate): 8 steps of at most 8 rows (buckets can
    # leave a batch short), at least one row each
    assert result.step <= result.loop_sentences <= 8 * result.step and result.loop_seconds > 0


def test_training_with_the_sampled_softmax_counts_tokens_and_runs(tmp_path, real_sentences, monkeypatch):
    from sgdd.diffusion.masked import MaskedProcess
    draws = []
    original = MaskedProcess._sample_columns

    def spy(self, device, generator=None):
        cols, logw = original(self, device, generator)
        draws.append(cols.numel())
        return cols, logw

    monkeypatch.setattr(MaskedProcess, "_sample_columns", spy)
    losses: list = []
    overrides = tiny_train_overrides(tmp_path, real_sentences[:48]) + [
        "diffusion.softmax_sample=16", "training.eval_every=3"]  # validation runs at steps 3 and 6
    result = train(load_config(None, overrides), log_losses=losses)
    assert result.step == 6 and all(math.isfinite(v) for _, v in losses)
    assert draws == [16 + 8] * 6  # one draw per training step; validation uses the full vocabulary
    # the training token counts travel with the checkpoint's vocabulary (sampling.repeat_exempt reads them)
    from sgdd.api import SGDD

    counts = SGDD.from_pretrained(result.run_dir / "latest", device="cpu").vocab.counts
    assert counts is not None and counts[:3].tolist() == [0, 0, 0] and counts.sum() > 100


def train_recording_metrics(monkeypatch, overrides: list[str]):
    """train() with every MaskedProcess.loss call's metrics recorded (training steps and validation)."""
    from sgdd.diffusion.masked import MaskedProcess

    seen: list = []
    original = MaskedProcess.loss

    def spy(self, *args, **kw):
        loss, metrics = original(self, *args, **kw)
        seen.append(metrics)
        return loss, metrics

    monkeypatch.setattr(MaskedProcess, "loss", spy)
    return train(load_config(None, overrides)), seen


def test_training_with_substitution_noise_runs_and_corrects_at_decoding(tmp_path, real_sentences, monkeypatch):
    overrides = tiny_train_overrides(tmp_path, real_sentences[:48]) + [
        "diffusion.softmax_sample=16", "diffusion.substitute=0.2", "training.eval_every=3"]
    result, seen = train_recording_metrics(monkeypatch, overrides)
    assert result.step == 6
    trained = [m for m in seen if "visible_ce" in m]  # training steps score visible tokens; validation does not
    assert len(trained) == 6 and all(math.isfinite(m["visible_ce"]) and m["visible_ce"] > 0 for m in trained)
    assert len(seen) > len(trained)
    from sgdd.api import SGDD

    model = SGDD.from_pretrained(result.run_dir / "latest", device="cpu")
    out = model.reconstruct(real_sentences[:3], correct=2, correct_frac=0.3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)


def test_training_with_corrector_rows_conditions_correction_on_the_hypothesis(tmp_path, real_sentences, monkeypatch):
    overrides = tiny_train_overrides(tmp_path, real_sentences[:48]) + [
        "diffusion.softmax_sample=16", "diffusion.corrector=0.25", "training.eval_every=3",
        "sampling.correct=1"]  # the in-training evaluations correct with the hypothesis too
    import sgdd.training

    encoded: list = []
    build = sgdd.training.ids_encoder

    def counting(*args):
        fn = build(*args)
        return lambda ids: (encoded.append(ids.shape[0]), fn(ids))[1]

    monkeypatch.setattr(sgdd.training, "ids_encoder", counting)
    result, seen = train_recording_metrics(monkeypatch, overrides)
    assert len(encoded) > 6  # one call per training step (the corrector rows), more from the evaluations' rounds
    trained = [m for m in seen if "corrector_ce" in m]  # training steps only
    assert len(trained) == 6 and all(math.isfinite(m["corrector_ce"]) and 0 <= m["hyp_acc"] <= 1 for m in trained)
    assert len(seen) > len(trained)
    from sgdd.api import SGDD

    model = SGDD.from_pretrained(result.run_dir / "latest", device="cpu")
    assert model.net.decoder.hyp_proj is not None
    assert model.net.decoder.hyp_proj.weight.abs().sum() > 0  # trained away from its zero start
    calls: list = []
    encode_ids = model._encode_ids
    monkeypatch.setattr(model, "_encode_ids", lambda ids: (calls.append(ids.shape), encode_ids(ids))[1])
    out = model.reconstruct(real_sentences[:3], correct=2, correct_frac=0.3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert len(calls) == 2 and all(c[0] == 3 for c in calls)  # one re-embedding per correction round
    model.reconstruct(real_sentences[:3], correct=0)
    assert len(calls) == 2


def test_resume_continues_with_identical_losses(tmp_path, real_sentences):
    full: list = []
    (tmp_path / "a").mkdir()
    cfg = load_config(None, tiny_train_overrides(tmp_path / "a", real_sentences[:48]))
    run = train(cfg, log_losses=full).run_dir
    resumed: list = []
    cfg_b = load_config(None, tiny_train_overrides(tmp_path / "a", real_sentences[:48], **{
        "training.resume": str(run / "step-0000003"), "training.run_name": "resumed",
        "training.heap_trim_every": 1}))  # trimming the heap must not change what is computed
    result = train(cfg_b, log_losses=resumed)
    assert result.step == 6
    assert [s for s, _ in resumed] == [4, 5, 6]
    for (s1, l1), (s2, l2) in zip(full[3:], resumed, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6), (s1, l1, l2)


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, real_sentences):
    (tmp_path / "r").mkdir()
    cfg = load_config(None, tiny_train_overrides(tmp_path / "r", real_sentences[:48], **{
        "training.resume": "auto", "training.max_steps": 2}))
    assert train(cfg).step == 2
    cfg2 = load_config(None, tiny_train_overrides(tmp_path / "r", real_sentences[:48], **{
        "training.resume": "auto", "training.max_steps": 4}))
    losses: list = []
    assert train(cfg2, log_losses=losses).step == 4
    assert [s for s, _ in losses] == [3, 4]


class _SignalAt(list):
    """A log_losses sink that sends SIGTERM to this process when step `at` is logged."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def append(self, item):
        super().append(item)
        if item[0] == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_latest_and_stops(tmp_path, real_sentences):
    (tmp_path / "s").mkdir()
    cfg = load_config(None, tiny_train_overrides(tmp_path / "s", real_sentences[:48], **{
        "training.max_steps": 50, "training.save_every": 0}))
    result = train(cfg, log_losses=_SignalAt(2))
    assert result.step == 2
    assert load_checkpoint(result.run_dir / "latest", with_train_state=True).train_state["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored (not ours)


def test_nonfinite_loss_aborts_with_message(tmp_path, real_sentences, monkeypatch):
    from sgdd.diffusion.masked import MaskedProcess

    original = MaskedProcess.loss

    def nan_loss(self, model, x0, z, uncond=None):
        loss, metrics = original(self, model, x0, z, uncond)
        return loss * float("nan"), metrics

    monkeypatch.setattr(MaskedProcess, "loss", nan_loss)
    (tmp_path / "n").mkdir()
    cfg = load_config(None, tiny_train_overrides(tmp_path / "n", real_sentences[:48], **{
        "training.max_nonfinite": 3, "training.max_steps": 20}))
    with pytest.raises(TrainingError, match="non-finite for 3 steps"):
        train(cfg)


def test_ddp_two_cpu_processes(tmp_path, real_sentences):
    (tmp_path / "d").mkdir()
    overrides = tiny_train_overrides(tmp_path / "d", real_sentences[:48], **{"training.max_steps": 3,
                                                                              "training.save_every": 0})
    # build the cache in this process first so the two ranks only read it
    from sgdd.embed_cache import prepare

    prepare(load_config(None, overrides), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "src" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "d" / "checkpoints" / "tiny" / "latest", with_train_state=True)
    assert ck.meta["step"] == 3
    # the workers re-execute themselves with tcmalloc where it is installed (sgdd.cli.preload_allocator) and the
    # log says which allocator runs; where it is not, how to get it
    if sys.platform.startswith("linux"):
        from sgdd.cli import allocator_to_preload, loaded_allocator

        line = next((ln for ln in proc.stdout.splitlines() if "heap allocator:" in ln), "")
        installed = loaded_allocator() or allocator_to_preload(env, "Linux", os.path.isfile)
        want = os.path.realpath(installed) if installed else "apt install libtcmalloc-minimal4"
        assert want in line, proc.stdout[-2000:]


def test_latent_pretraining_fits_the_bow_head_and_leaves_the_transformer_alone(tmp_path, real_sentences):
    """pretrain_latent moves only the VIB and the bag-of-words head, and lowers the bag-of-words loss on the
    sentences it trained on."""
    from sgdd.embed_cache import prepare
    from sgdd.training import bow_loss, build_net, pretrain_latent

    cfg = load_config(None, tiny_train_overrides(tmp_path, real_sentences[:64], **{
        "training.latent_pretrain_steps": 60, "training.latent_pretrain_batch": 32,
        "training.latent_pretrain_lr": 3e-3, "model.kl_weight": 0.0}))
    data = prepare(cfg)
    torch.manual_seed(0)
    net = build_net(cfg, len(data.vocab), data.encoder_dim, data.vocab.encoder_ids)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    from sgdd.data import make_batch

    x0 = make_batch(data.train_tokens, cfg.data.max_length)
    e = torch.tensor(np.array(data.train_emb), dtype=torch.float32)

    def measured() -> float:
        net.eval()
        with torch.no_grad():
            z, _ = net.vib(e)
            return float(bow_loss(net.decoder, z, x0, data.vocab.PAD)[0])

    loss0 = measured()
    out = pretrain_latent(net, data.train_tokens, data.train_emb, data.vocab.PAD, cfg, torch.device("cpu"), seed=0)
    loss1 = measured()
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    assert math.isfinite(out["pretrain/bow_loss"]) and 0.0 <= out["pretrain/bow_recall"] <= 1.0
    after = net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "nothing was trained"
    assert all(k.startswith(("vib.", "decoder.bow_", "length_head.")) for k in moved), sorted(moved)
    assert any(k.startswith("vib.") for k in moved) and "decoder.bow_emb" in moved


def test_latent_pretraining_time_counts_towards_the_budget(tmp_path, real_sentences):
    """A wall-clock budget shorter than the latent pre-training leaves no time for decoder steps."""
    cfg = load_config(None, tiny_train_overrides(tmp_path, real_sentences[:48], **{
        "training.latent_pretrain_steps": 100, "training.latent_pretrain_batch": 16,
        "training.max_minutes": 0.0005, "training.max_steps": 1000}))
    result = train(cfg)
    ck = load_checkpoint(result.run_dir / "latest", with_train_state=True)
    assert ck.train_state["elapsed"] >= 0.03  # 0.0005 minutes: spent by the pre-training alone
    assert result.step == 0


def test_param_groups_split_pretrained_weights_and_decay():
    from sgdd.config import Config
    from sgdd.training import build_net, is_pretrained_param, param_groups

    cfg = Config()
    cfg.model.init_from, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers = "scratch", 32, 4, 2
    cfg.model.latent_dim, cfg.data.max_length = 8, 12
    net = build_net(cfg, 30, 16, None)
    names = dict(net.named_parameters())
    assert is_pretrained_param("decoder.blocks.1.attn.qkv.weight")
    assert is_pretrained_param("decoder.tok_emb.weight") and is_pretrained_param("decoder.pos_emb")
    assert not is_pretrained_param("decoder.blocks.1.adaLN_modulation.1.weight")
    assert not is_pretrained_param("decoder.bow_emb") and not is_pretrained_param("vib.mu.weight")
    groups = param_groups(net, 0.01, pretrained_lr_scale=0.25)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == len(names)  # every parameter exactly once
    for name, p in names.items():
        g = by_id[id(p)]
        assert g["lr_scale"] == (0.25 if is_pretrained_param(name) else 1.0), name
        no_decay = p.ndim < 2 or name.endswith(("tok_emb.weight", "pos_emb", "bow_emb", "z_null"))
        assert (g["weight_decay"] == 0.0) == no_decay, name
    assert {g["lr_scale"] for g in param_groups(net, 0.01)} == {1.0}


@pytest.mark.slow
def test_tiny_config_overfits_32_sentences_until_greedy_sampling_reproduces_them(tmp_path, real_sentences):
    """The whole path on 32 real sentences: cache, train(), checkpoint, SGDD.from_pretrained, greedy MaskGIT
    decoding of each sentence's own encoder vector. After overfitting, the decodes are the sentences."""
    from sgdd.api import SGDD

    short = [s for s in real_sentences if 5 <= len(s.split()) <= 16][:32]
    assert len(short) == 32
    cfg = load_config(None, tiny_train_overrides(tmp_path, short, **{
        "data.valid_size": 2, "data.pad_slack": 4, "data.max_length": 48, "model.hidden_size": 128, "model.latent_dim": 64,
        "model.cond_dropout": 0.0, "model.kl_weight": 1e-4, "training.batch_size": 30,
        "training.max_steps": 1500, "training.lr": 2e-3, "training.warmup_steps": 50, "training.ema_decay": 0.9,
        "training.save_every": 0, "training.log_every": 500, "sampling.cfg_scale": 1.0, "sampling.steps": 16,
        "sampling.length_quantile": 0.5, "sampling.length_slack": 0}))
    result = train(cfg)
    model = SGDD.from_pretrained(result.run_dir / "latest", device="cpu")
    from sgdd.embed_cache import prepare

    train_sents = prepare(cfg).train_sentences  # the 30 the model trained on (2 held out)
    refs = [model.vocab.decode(model.vocab.encode(s)) for s in train_sents]
    outs = model.reconstruct(train_sents)
    exact = sum(o == r for o, r in zip(outs, refs, strict=True)) / len(refs)
    assert exact >= 0.9, list(zip(refs, outs, strict=True))[:5]


def test_final_eval_sentences_zero_skips_the_final_evaluation(tmp_path, real_sentences, monkeypatch):
    import sgdd.evaluation
    from sgdd.training import train_and_report

    def refuse(*args, **kwargs):
        raise AssertionError("the final evaluation ran")

    monkeypatch.setattr(sgdd.evaluation, "evaluate_reconstruction", refuse)
    overrides = tiny_train_overrides(tmp_path, real_sentences[:48], **{
        "training.final_eval": True, "training.final_eval_sentences": 0, "training.max_steps": 2})
    result = train_and_report(load_config(None, overrides))
    assert (result.run_dir / "latest").exists()


def test_eval_sentence_counts_are_checked_before_training():
    with pytest.raises(ConfigError, match="num_eval_sentences must be positive when training.eval_every > 0"):
        load_config(None, ["training.eval_every=100", "training.num_eval_sentences=0"])
    assert load_config(None, ["training.eval_every=0", "training.num_eval_sentences=0"]).training.eval_every == 0
    with pytest.raises(ConfigError, match="final_eval_sentences must be >= 0"):
        load_config(None, ["training.final_eval_sentences=-1"])
