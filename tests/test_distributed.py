"""DistributedDataParallel on CPU: two gloo ranks launched by torchrun, as a multi-GPU user launches training
(`uv run torchrun --nproc_per_node N src/train.py ...`), resumed on two ranks, then on one process."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_ranks_resume_on_two_and_on_one(tmp_path, real_sentences, caplog):
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

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "src" / "train.py"), "--config", str(config), *overrides, *extra],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 0, res.stderr[-4000:]
        assert "Traceback" not in res.stderr, res.stderr[-4000:]
        assert "weights differ" not in res.stdout + res.stderr, res.stdout[-4000:]  # save() compares the ranks
        return res

    res = torchrun()
    # only rank 0 reports: one log line per logged step, not one per rank
    step_lines = [line for line in res.stdout.splitlines() if " INFO step " in line]
    assert [line.split(" INFO step ")[1].split(" |")[0] for line in step_lines] == ["1", "2", "3", "4", "5", "6"]

    latest = tmp_path / "checkpoints" / "tiny" / "latest"
    ckpt = load_checkpoint(latest, with_train_state=True)
    ddp_state = ckpt.train_state["sampler"]
    assert ckpt.train_state["step"] == 6 and ddp_state["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.model_state.values() if v.is_floating_point())
    rngs = ckpt.train_state["rng_ranks"]  # each rank's own random streams, for a resume on two ranks
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])

    # resumed on two ranks from the step-3 checkpoint (into another run folder): the same 6-step weights, bit for
    # bit, as the uninterrupted run (data position, both ranks' random streams, optimizer and EMA all restored)
    torchrun("training.run_name=again", f"training.resume={latest.parent / 'step-0000003'}")
    again = load_checkpoint(tmp_path / "checkpoints" / "again" / "latest")
    assert again.meta["step"] == 6
    for name, value in ckpt.model_state.items():
        assert torch.equal(value, again.model_state[name]), name
    for name, value in ckpt.ema_state.items():
        assert torch.equal(value, again.ema_state[name]), name
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


def test_gpu_process_group_keeps_a_cpu_backend_for_control_tensors():
    """NCCL only takes CUDA tensors; the loop's stop flag, clock and RNG states are CPU tensors, so on GPUs the
    group must pair NCCL with gloo (a plain "nccl" group fails at the first step: "No backend type associated with
    device type cpu")."""
    from sgdd.training import Dist, agree_time, any_rank, gather_objects, process_group_backend

    assert process_group_backend(cuda=False) == "gloo"
    gpu = dict(part.split(":") for part in process_group_backend(cuda=True).split(","))
    assert gpu == {"cpu": "gloo", "cuda": "nccl"}
    # one process: no collective, the inputs come back
    one = Dist()
    assert agree_time(True, 12.5, one) == (True, 12.5) and any_rank(False, one) is False
    assert gather_objects({"a": 1}, one) == [{"a": 1}]
