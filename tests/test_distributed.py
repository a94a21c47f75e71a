"""DistributedDataParallel on CPU: two gloo ranks launched by torchrun, as a multi-GPU user launches training
(`uv run torchrun --nproc_per_node N src/train.py ...`), then the run resumed on one process."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_ranks_then_resume_on_one(tmp_path, real_sentences, caplog):
    from sgdd.checkpoint import load_checkpoint
    from sgdd.config import load_config
    from sgdd.data import LengthBucketSampler
    from sgdd.embed_cache import prepare
    from sgdd.training import train

    overrides = tiny_train_overrides(tmp_path, real_sentences[:96], **{"training.max_steps": 6,
                                                                        "training.save_every": 3,
                                                                        "training.threads": 1})
    config = tmp_path / "tiny.yaml"  # the defaults; the overrides make it tiny
    config.write_text("training:\n  run_name: tiny\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "src" / "train.py"), "--config", str(config), *overrides],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    # only rank 0 reports: one log line per logged step, not one per rank
    step_lines = [line for line in res.stdout.splitlines() if " INFO step " in line]
    assert [line.split(" INFO step ")[1].split(" |")[0] for line in step_lines] == ["1", "2", "3", "4", "5", "6"]

    latest = tmp_path / "checkpoints" / "tiny" / "latest"
    ckpt = load_checkpoint(latest, with_train_state=True)
    ddp_state = ckpt.train_state["sampler"]
    assert ckpt.train_state["step"] == 6 and ddp_state["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.model_state.values() if v.is_floating_point())
    # each rank took one batch per step: 6 of its batches, across the epoch boundary if need be
    cfg = load_config(None, overrides + ["training.max_steps=9", "training.resume=auto"])
    lengths = [len(t) for t in prepare(cfg).train_tokens]

    def sampler(world: int) -> LengthBucketSampler:
        return LengthBucketSampler(lengths, 8, seed=cfg.training.seed, bucket=cfg.data.bucket_by_length,
                                   world_size=world)

    assert ddp_state["epoch"] * len(sampler(2)) + ddp_state["pos"] == 6

    # the same run resumed on one process: three more steps, going on from the same place in the data
    caplog.set_level(logging.WARNING, logger="sgdd")
    result = train(cfg)
    assert result.step == 9
    assert any("saved with 2 processes on 1" in r.getMessage() for r in caplog.records), caplog.text
    state = load_checkpoint(latest, with_train_state=True).train_state["sampler"]
    # one process goes on after the 2 x pos batches the two ranks took in this epoch, and took 3 more
    n_one = len(sampler(1))
    expected = ddp_state["epoch"] * n_one + 2 * ddp_state["pos"] + 3
    assert (state["world_size"], state["epoch"] * n_one + state["pos"]) == (1, expected)
