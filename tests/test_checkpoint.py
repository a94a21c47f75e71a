"""Checkpoint round trip, validation errors, atomic replacement and crash recovery, rotation."""

import json
import os

import pytest
import torch
from torch import nn

from sgdd.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights_into,
    rotate_step_checkpoints,
    save_checkpoint,
)
from sgdd.config import load_config


@pytest.fixture()
def parts(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"encoder_ids": [0, 103, 102, 7]}))
    return load_config(None, ["training.run_name=t"]), module, vocab


def test_roundtrip(tmp_path, parts):
    cfg, module, vocab = parts
    ema = {k: v + 1 for k, v in module.state_dict().items()}
    opt = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "rng": {"torch": torch.get_rng_state()}}
    save_checkpoint(tmp_path / "ck", config=cfg, model_state=module.state_dict(), ema_state=ema,
                    vocab_file=vocab, train_state=state, meta={"step": 7})
    ck = load_checkpoint(tmp_path / "ck", with_train_state=True)
    assert ck.config == cfg and ck.meta["step"] == 7 and ck.train_state["step"] == 7
    for k, v in module.state_dict().items():
        assert torch.equal(ck.model_state[k], v)
        assert torch.equal(ck.weights(ema=True)[k], ema[k])
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    load_weights_into(fresh, ck.model_state, "ck")
    assert torch.equal(fresh[0].weight, module[0].weight)
    opt2 = torch.optim.AdamW(fresh.parameters())
    opt2.load_state_dict(ck.train_state["optimizer"])
    assert json.loads((tmp_path / "ck" / "vocab.json").read_text())["encoder_ids"] == [0, 103, 102, 7]


def test_tied_weights_save(tmp_path, parts):
    cfg, _, vocab = parts
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    save_checkpoint(tmp_path / "ck", config=cfg, model_state=m.state_dict(), vocab_file=vocab)
    again = nn.ModuleDict({"emb": nn.Embedding(5, 3), "head": nn.Linear(3, 5, bias=False)})
    again["head"].weight = again["emb"].weight
    load_weights_into(again, load_checkpoint(tmp_path / "ck").model_state, "ck")
    assert torch.equal(again["emb"].weight, emb.weight)


def test_mismatched_weights_one_line_error(tmp_path, parts):
    cfg, module, vocab = parts
    save_checkpoint(tmp_path / "ck", config=cfg, model_state=module.state_dict(), vocab_file=vocab)
    other = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match="do not match its config.*other shapes"):
        load_weights_into(other, load_checkpoint(tmp_path / "ck").model_state, "ck")


def test_missing_and_partial_folders(tmp_path, parts):
    cfg, module, vocab = parts
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "ck", config=cfg, model_state=module.state_dict(), vocab_file=vocab)
    (tmp_path / "ck" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="missing vocab.json"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck2", config=cfg, model_state=module.state_dict(), vocab_file=vocab)
    data = (tmp_path / "ck2" / "model.safetensors").read_bytes()
    (tmp_path / "ck2" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(tmp_path / "ck2")
    save_checkpoint(tmp_path / "ck3", config=cfg, model_state=module.state_dict(), vocab_file=vocab)
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        load_checkpoint(tmp_path / "ck3", with_train_state=True)


def test_crash_mid_write_keeps_previous(tmp_path, parts, monkeypatch):
    cfg, module, vocab = parts
    save_checkpoint(tmp_path / "latest", config=cfg, model_state=module.state_dict(), vocab_file=vocab,
                    meta={"step": 1})
    import sgdd.checkpoint as ckmod

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckmod, "save_config", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "latest", config=cfg, model_state=module.state_dict(), vocab_file=vocab,
                        meta={"step": 2})
    assert load_checkpoint(tmp_path / "latest").meta["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest.tmp")]


def test_crash_between_renames_falls_back_to_old(tmp_path, parts):
    cfg, module, vocab = parts
    save_checkpoint(tmp_path / "latest", config=cfg, model_state=module.state_dict(), vocab_file=vocab,
                    meta={"step": 3})
    os.rename(tmp_path / "latest", tmp_path / "latest.old")  # the state a kill between the renames leaves
    assert load_checkpoint(tmp_path / "latest").meta["step"] == 3
    save_checkpoint(tmp_path / "latest", config=cfg, model_state=module.state_dict(), vocab_file=vocab,
                    meta={"step": 4})
    assert load_checkpoint(tmp_path / "latest").meta["step"] == 4
    assert not (tmp_path / "latest.old").exists()


def test_rotation_keeps_newest(tmp_path):
    for s in (100, 200, 300, 400):
        (tmp_path / f"step-{s:07d}").mkdir()
    (tmp_path / "latest").mkdir()
    (tmp_path / "best").mkdir()
    rotate_step_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest", "step-0000300", "step-0000400"]
