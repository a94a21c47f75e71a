"""Shared command-line plumbing for the entry scripts: --config + dotted overrides, logging, and turning
user errors into one-line messages (exit code 2) instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from sgdd.registry import ConfigError


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    # quiet the libraries' own chatter about offline mode and unused weights
    for name in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock", "gensim", "smart_open"):
        logging.getLogger(name).setLevel(logging.ERROR)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=200 model.num_layers=2")


def run_main(fn: Callable[[], int | None]) -> None:
    """Run an entry point; user errors print one line to stderr and exit 2."""
    setup_logging()
    try:
        code = fn()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
