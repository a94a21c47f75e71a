"""Experiment tracking through wandb: online, offline or disabled; never fails a run for lack of network.

`tracking.mode: auto` is online when WANDB_API_KEY is set and offline otherwise. The resolved config goes into
every tracked run. Only the main process (rank 0) tracks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sgdd.config import Config, config_to_dict

log = logging.getLogger("sgdd")


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    """Thin wrapper over a wandb run; every method is a no-op when disabled or not the main process."""

    def __init__(self, cfg: Config, enabled: bool = True):
        self.run = None
        mode = resolve_mode(cfg.tracking.mode)
        if not enabled or mode == "disabled":
            return
        import wandb

        os.makedirs(cfg.tracking.dir, exist_ok=True)
        try:
            self.run = wandb.init(
                project=cfg.tracking.project,
                entity=cfg.tracking.entity or None,
                name=cfg.training.run_name,
                tags=list(cfg.tracking.tags) or None,
                config=config_to_dict(cfg),
                mode=mode,
                dir=cfg.tracking.dir,
                settings=wandb.Settings(silent=True),
            )
        except Exception as exc:  # wandb raises many types (network, auth); tracking must not stop training
            log.warning("wandb init failed in mode %s (%s); continuing without tracking", mode, exc)
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
