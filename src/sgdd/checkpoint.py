"""Checkpoint folders: save, load, validate, rotate — written atomically, loaded without pickle.

A checkpoint is a folder:
    model.safetensors   raw (training) weights of SGDDNet, float32
    ema.safetensors     EMA weights (float32) — what evaluation and generation use
    config.yaml         the resolved Config
    vocab.json          the decoder vocabulary (decoder id -> encoder token id)
    state.pt            optimizer / LR scheduler / RNG / data-sampler / step state (torch.load weights_only=True)
    meta.json           step, time, metrics, format version, file list

Writes go to a temporary sibling folder that is renamed into place, so a crash mid-write leaves the previous
checkpoint intact (at worst it is found under `<name>.old`, which load_checkpoint falls back to).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sgdd.config import Config, config_from_dict, save_config
from sgdd.registry import ConfigError

FORMAT_VERSION = 1
REQUIRED = ("model.safetensors", "config.yaml", "vocab.json", "meta.json")


class CheckpointError(ConfigError):
    """A missing, partial or inconsistent checkpoint folder (a user-facing error)."""


@dataclass
class Checkpoint:
    path: Path
    config: Config
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    vocab_path: Path
    meta: dict[str, Any]
    train_state: dict[str, Any] | None = field(default=None)

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """EMA weights when present and asked for, else the raw training weights."""
        return self.ema_state if (ema and self.ema_state is not None) else self.model_state


def _tensors_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: tied parameters share storage, which safetensors refuses; float32 on CPU for portability
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone().contiguous()
            for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    *,
    config: Config,
    model_state: dict[str, torch.Tensor],
    vocab_file: str | Path,
    ema_state: dict[str, torch.Tensor] | None = None,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename). Returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_file(_tensors_for_saving(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_tensors_for_saving(ema_state), str(tmp / "ema.safetensors"))
        save_config(config, tmp / "config.yaml")
        shutil.copyfile(vocab_file, tmp / "vocab.json")
        if train_state is not None:
            torch.save(train_state, tmp / "state.pt")
        full_meta = {"format_version": FORMAT_VERSION, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        full_meta.update(meta or {})
        full_meta["files"] = sorted(p.name for p in tmp.iterdir()) + ["meta.json"]
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2), encoding="utf-8")
        _fsync_dir(tmp)
        old = path.parent / f"{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The folder to load: `path` itself, or `path.old` left by a crash between the two renames of a save."""
    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file():
        return path
    old = path.parent / f"{path.name}.old"
    if not path.exists() and old.is_dir() and (old / "meta.json").is_file():
        return old
    if not path.exists():
        raise CheckpointError(f"checkpoint folder '{path}' does not exist; train one with src/train.py "
                              f"(checkpoints are written to checkpoints/<run_name>/latest and /best)")
    if path.is_dir() and (path / "latest").is_dir():
        raise CheckpointError(f"'{path}' is a run folder, not a checkpoint; pass '{path / 'best'}' or '{path / 'latest'}'")
    raise CheckpointError(f"'{path}' is not a complete checkpoint folder (missing meta.json)")


def load_checkpoint(path: str | Path, with_train_state: bool = False) -> Checkpoint:
    """Load and validate a checkpoint folder. Raises CheckpointError with a one-line reason."""
    folder = resolve_checkpoint_dir(path)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint '{folder}' is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint '{folder}': meta.json is not valid JSON ({exc})") from None
    import yaml

    try:
        cfg_dict = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"checkpoint '{folder}': config.yaml is not valid YAML ({exc})") from None
    config = config_from_dict(cfg_dict, where=str(folder / "config.yaml"))

    def _load(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(folder / name))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint '{folder}': {name} is unreadable or truncated ({exc})") from None

    model_state = _load("model.safetensors")
    ema_state = _load("ema.safetensors") if (folder / "ema.safetensors").is_file() else None
    train_state = None
    if with_train_state:
        if not (folder / "state.pt").is_file():
            raise CheckpointError(f"checkpoint '{folder}' has no state.pt: it cannot be resumed (weights only)")
        train_state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    return Checkpoint(folder, config, model_state, ema_state, folder / "vocab.json", meta, train_state)


def load_weights_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a one-line error when the weights do not match the model built from the config."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise CheckpointError(f"weights in '{where}' do not match its config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def rotate_step_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the `keep` newest step-NNNNNNN folders of a run; latest/ and best/ are never touched."""
    run_dir = Path(run_dir)
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for p in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
