"""Helpers shared by the benchmark scripts: git commit id, RESULTS.md table rows, peak RSS, evaluation lines."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_row(path: Path, section: str, header: str, row: str) -> None:
    """Append `row` to the table under `section` in a markdown file, creating file and section as needed."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n\nNumbers as measured on this machine.\n"
    if section not in text:
        path.write_text(text.rstrip("\n") + "\n\n" + section + "\n\n" + header + row)
        return
    start = text.index(section)
    nxt = text.find("\n## ", start + len(section))
    end = len(text) if nxt < 0 else nxt
    block = text[start:end].rstrip("\n") + "\n" + row
    path.write_text(text[:start] + block + text[end:])


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_lines(path: str | Path, n: float) -> list[str]:
    """The first n non-empty lines of a UTF-8 file, stripped (n = math.inf: all): the evaluation sentences of
    quality.py and corrector_probe.py ("the first 1,000 lines of valid.txt")."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.strip())
            if len(lines) >= n:
                break
    return lines
