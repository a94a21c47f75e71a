"""Shared command-line plumbing for the entry scripts: --config + dotted overrides, logging, reading input
sentences from files or stdin, the generate command, and turning user errors into one-line messages (exit
code 2) instead of tracebacks."""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from sgdd.registry import ConfigError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def setup_logging(stream: IO[str] | None = None) -> None:
    """INFO on rank 0 (WARNING elsewhere) to `stream` (default stdout; generate.py keeps stdout for results)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=stream or sys.stdout,
    )
    # quiet the libraries' own chatter about offline mode and unused weights
    for name in (
        "transformers",
        "datasets",
        "huggingface_hub",
        "urllib3",
        "filelock",
        "gensim",
        "smart_open",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------
# heap allocator

ALLOCATOR_ENV = "SGDD_ALLOCATOR"  # auto (default) | system | the path of a malloc library to preload
_PRELOADED_ENV = "_SGDD_PRELOADED"  # set on the re-executed process: the library it was started with
# tcmalloc builds found by `auto` (Debian / Ubuntu: apt install libtcmalloc-minimal4; Fedora: gperftools-libs)
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_ALLOCATOR_KEYS = ("tcmalloc", "jemalloc", "mimalloc")


def allocator_to_preload(env: dict[str, str], system: str, is_file: Callable[[str], bool]) -> str | None:
    """The malloc library the entry scripts should re-execute themselves with (LD_PRELOAD), or None.

    Training with glibc's malloc fragments the heap: the fiction config's resident size grows with time (9.2 GB
    after 7 minutes, 12.8 GB after 60) while its live memory is ~2.5 GB; with tcmalloc preloaded it stays near
    3.8-4.0 GB for the whole 60 minutes and trains ~4 % faster (jemalloc and mimalloc hold the memory too but train
    0.6x as fast; bench/RESULTS.md "Twenty-fifth round"). `env[SGDD_ALLOCATOR]`: "auto" (default) = the first
    tcmalloc of LIBRARY_DIRS, if any; "system" = never; a path = that library (ConfigError if it is not a file).
    Linux only; None when the process already runs with a preloaded allocator or was re-executed once already.
    """
    choice = env.get(ALLOCATOR_ENV, "auto").strip() or "auto"
    if system != "Linux" or choice == "system" or _PRELOADED_ENV in env:
        return None
    if any(key in part for part in env.get("LD_PRELOAD", "").split(":") for key in _ALLOCATOR_KEYS):
        return None  # the user preloaded one already
    if choice == "auto":
        return next((f"{d}/{n}" for d in LIBRARY_DIRS for n in TCMALLOC_NAMES if is_file(f"{d}/{n}")), None)
    if not is_file(choice):
        raise ConfigError(f"{ALLOCATOR_ENV}={choice}: no such file; set it to auto (preload tcmalloc when it is "
                          "installed), system (the C library's malloc) or the path of a malloc library (.so)")
    return choice


def preload_allocator(script: str) -> None:
    """Re-execute this process with a better heap allocator preloaded (see allocator_to_preload), keeping its pid,
    arguments and environment. Only when the process was started to run `script`, so never inside a test runner
    that runs the script in-process. (A library the loader cannot preload is skipped by it with a message, and
    the process runs on with the C library's malloc.)"""
    argv = list(getattr(sys, "orig_argv", []))
    target = os.path.realpath(script)
    if not any(a.endswith(".py") and os.path.realpath(a) == target for a in argv[1:]):
        return
    path = allocator_to_preload(dict(os.environ), platform.system(), os.path.isfile)
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env[_PRELOADED_ENV] = path
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


@functools.cache
def loaded_allocator() -> str | None:
    """The tcmalloc / jemalloc / mimalloc library mapped into this process (Linux /proc), or None (the C
    library's malloc, or no /proc). Read once: a malloc replacement is only ever loaded at process start."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    return next((p for p in sorted(paths) if any(k in Path(p).name for k in _ALLOCATOR_KEYS)), None)


def allocator_name() -> str:
    """The file name of the malloc library serving this process (loaded_allocator), or "libc"; what the
    benchmarks record."""
    lib = loaded_allocator()
    return Path(lib).name if lib else "libc"


def allocator_description() -> str:
    """One line for the training log: which malloc serves this process and, where it is glibc's on Linux, how to
    get tcmalloc."""
    lib = loaded_allocator()
    if lib is not None:
        return f"{Path(lib).name} ({lib})"
    if platform.system() != "Linux":
        return "the system's malloc"
    return ("the C library's malloc: the resident size grows with training time by heap fragmentation (fiction "
            "config: 12.8 GB after 60 minutes); with tcmalloc installed (Debian / Ubuntu: apt install "
            f"libtcmalloc-minimal4) the scripts preload it ({ALLOCATOR_ENV}=auto): 4.0 GB after 60 minutes, ~4 % "
            "faster")


def tune_malloc() -> bool:
    """Keep freed memory in the process heap instead of handing large blocks back to the kernel (glibc only).

    glibc serves allocations above 32 MiB with fresh mmap()s and unmaps them on free, so every large tensor
    (the (N, V) logits of a sampling step, activations of a training step) is page-faulted in and zero-filled
    anew. With mmap disabled (M_MMAP_MAX = 0) and a 1 GiB trim threshold the blocks are reused: measured here
    on 64 sentences x 16 MaskGIT steps with a 20k vocabulary, page faults fell 12x and decoding took 10.0 s
    instead of 15.0 s (2 threads; 16.0 vs 20.3 s on 1), for about 0.3 GB more peak RSS. A no-op off glibc or
    with SGDD_MALLOPT=0. Returns whether the settings were applied.
    """
    if os.environ.get("SGDD_MALLOPT", "1") == "0" or loaded_allocator() is not None:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def trim_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc malloc_trim; a no-op elsewhere).

    A training run's heap fragments (tensors of many sizes from length-bucketed batches leave free holes), so its
    resident size keeps growing: the fiction config reached 9.7 GB in 8 minutes and 12.8 GB in 60, and 8.3 GB in 7
    minutes with glibc's default settings too. Trimming every step (`training.heap_trim_every: 1`) held it at
    2.3-4.2 GB for 23 % fewer steps, every 10 near 6.6 GB for ~7 % fewer; every 50 steps lowered the resting
    size, not the peak (bench/RESULTS.md "Nineteenth round"). Returns whether it ran (not with another malloc
    loaded: see preload_allocator).
    """
    libc = _glibc()
    if libc is None or loaded_allocator() is not None:  # glibc's heap is not the one in use
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc with the two allocator calls used here typed, loaded once (tune_malloc, and trim_heap in the training
    step); None off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def resident_mb() -> float | None:
    """This process's resident set size in MB (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=200 model.num_layers=2"
    )


# the decoding options generate.py and evaluate.py share: (flag, SamplingConfig field, type, help)
_DECODING_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--steps", "steps", int, "denoising steps"),
    ("--cfg-scale", "cfg_scale", float, "classifier-free guidance scale (1 = conditional only)"),
    ("--sampler", "sampler", str, "maskgit | euler | analytic (must fit the checkpoint's process)"),
    ("--unmask-schedule", "unmask_schedule", str,
     "MaskGIT: how many positions stay masked after each step, cosine | linear (equal shares, the masked "
     "fractions of score-entropy training); default: the checkpoint's"),
    ("--time-grid", "time_grid", str,
     "euler / analytic: uniform (in t) | masked (uniform in the masked fraction: equal unmasking shares per step); "
     "default: the checkpoint's"),
    ("--rerank", "rerank", int, "best of K decodes by re-embedding cosine (reconstruct)"),
    ("--refine", "refine", int, "rounds of encoder-guided refinement after decoding (reconstruct; 0 = off)"),
    ("--length-quantile", "length_quantile", float,
     "decode this quantile of the length head's distribution (+ sampling.length_slack); "
     "default: the checkpoint's (0.5 for new ones)"),
    ("--repeat-penalty", "repeat_penalty", float,
     "MaskGIT: logit penalty per visible copy of a non-frequent token (0 = off); default: the checkpoint's"),
    ("--shortlist", "shortlist", int,
     "MaskGIT: score only the frequent ids + this many bag-of-words ids per sentence (0 = the whole "
     "vocabulary); default: the checkpoint's"),
    ("--kv-refresh", "kv_refresh", int,
     "MaskGIT: reuse keys / values of unchanged positions, a full pass every R steps (0 = off, exact); "
     "default: the checkpoint's"),
    ("--guidance-refresh", "guidance_refresh", int,
     "MaskGIT with guidance: run the null pass every G steps and add its last guidance direction in between "
     "(0 = every step, exact); default: the checkpoint's"),
    ("--correct", "correct", int,
     "MaskGIT: self-correction rounds after decoding (re-mask the lowest-scoring decoded tokens, refill them; "
     "0 = off); default: the checkpoint's"),
    ("--correct-frac", "correct_frac", float,
     "MaskGIT: share of each row's decoded tokens re-masked per self-correction round; default: the checkpoint's"),
)


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """Add the sampling flags both scripts share; every one defaults to None (= keep the checkpoint's)."""
    for flag, _, tp, help_text in _DECODING_FLAGS:
        parser.add_argument(flag, type=tp, help=help_text)


def decoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingConfig fields given by add_decoding_flags' flags (None = not given)."""
    return {field: getattr(args, field) for _, field, _, _ in _DECODING_FLAGS}


def run_main(fn: Callable[[], int | None], log_stream: IO[str] | None = None) -> None:
    """Run an entry point; user errors print one line to stderr and exit 2. First, when the process was started
    to run fn's script, re-execute it with tcmalloc preloaded if installed (preload_allocator, SGDD_ALLOCATOR)."""
    setup_logging(log_stream)
    # transformers' per-load "Loading weights" bar is noise on stderr (read once, when transformers is imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        preload_allocator(fn.__code__.co_filename)
        tune_malloc()
        code = fn()
    except ConfigError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# ---------------------------------------------------------------------------------------------------------
# input sentences


def _input_error(message: str) -> ConfigError:
    from sgdd.api import InputError

    return InputError(message)


def read_sentence_lines(lines: Iterable[bytes], name: str) -> list[str]:
    """UTF-8 byte lines -> stripped non-blank sentences; an undecodable line raises InputError naming
    `name` and the line number."""
    out: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _input_error(
                f"{name}, line {lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                "save the file as UTF-8, one sentence per line"
            ) from None
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            out.append(line.strip())
    return out


def read_sentences(path: str | Path) -> list[str]:
    """The sentences of a UTF-8 text file, one per line; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise _input_error(f"input file '{p}' {what}; give a UTF-8 text file with one sentence per line")
    with open(p, "rb") as fh:
        sentences = read_sentence_lines(fh, f"'{p}'")
    if not sentences:
        raise _input_error(f"input file '{p}' has no sentences (it is empty or blank)")
    return sentences


def gather_inputs(sentences: Sequence[str], input_path: str | None, stdin: IO[Any] | None) -> list[str]:
    """Sentences from the command line, else from --input FILE, else from stdin when it is not a terminal.
    Empty or whitespace-only command-line sentences raise InputError (blank file / stdin lines are skipped)."""
    from sgdd.api import check_texts

    if sentences and input_path:
        raise _input_error("give sentences on the command line or --input FILE, not both")
    if input_path:
        return read_sentences(input_path)
    if sentences:
        return check_texts(list(sentences))
    if stdin is not None and not stdin.isatty():
        texts = read_sentence_lines(getattr(stdin, "buffer", stdin), "stdin")
        if not texts:
            raise _input_error("stdin has no sentences; pipe one sentence per line")
        return texts
    raise _input_error(
        'no input: give sentences ("A sentence." "Another one."), --input FILE, or pipe them on stdin'
    )


# ---------------------------------------------------------------------------------------------------------
# generate.py


def run_generate(
    checkpoint: str,
    sentences: Sequence[str] = (),
    input_path: str | None = None,
    mode: str = "reconstruct",
    num_samples: int | None = None,
    seed: int = 0,
    show_steps: bool = False,
    plain: bool = False,
    device: str | None = None,
    stdin: IO[Any] | None = None,
    write: Callable[[str], None] = print,
    **sampling: Any,
) -> list[str]:
    """Load a checkpoint and decode the input sentences; prints (through `write`) `input -> output` lines, or
    only the outputs with `plain`, and returns the outputs (flattened).

    mode: reconstruct (one decode of each sentence's posterior mean), paraphrase (num_samples, default 5,
    stochastic decodes per sentence), interpolate (exactly two sentences; num_samples, default 5, points on
    the line between their latents). sampling: SamplingConfig fields (steps, cfg_scale, temperature, top_k,
    top_p, rerank, sampler, ...; None keeps the checkpoint's). In reconstruct mode, giving temperature, top_k
    or top_p switches from greedy to sampled tokens. show_steps (reconstruct only) prints the text after every
    denoising step, masked positions as `_`.
    """
    from sgdd.api import SGDD

    sampling = {k: v for k, v in sampling.items() if v is not None}
    if mode not in ("reconstruct", "paraphrase", "interpolate"):
        raise _input_error(f"unknown mode '{mode}'; choose reconstruct, paraphrase or interpolate")
    texts = gather_inputs(sentences, input_path, stdin)
    if mode == "interpolate" and len(texts) != 2:
        raise _input_error(f"interpolate needs exactly 2 input sentences, got {len(texts)}")
    if mode == "reconstruct" and num_samples is not None:
        raise _input_error(
            "--num-samples applies to paraphrase and interpolate; reconstruct makes one output per input"
        )
    if show_steps and (mode != "reconstruct" or sampling.get("rerank", 1) > 1 or sampling.get("refine", 0) > 0):
        raise _input_error(
            "--show-steps follows a single decode: use it with --mode reconstruct and no --rerank / --refine"
        )
    if mode != "reconstruct" and sampling.get("rerank", 1) > 1:
        raise _input_error("--rerank applies to --mode reconstruct")
    if mode != "reconstruct" and sampling.get("refine", 0) > 0:
        raise _input_error("--refine applies to --mode reconstruct")
    n = 5 if num_samples is None else num_samples

    model = SGDD.from_pretrained(checkpoint, device=device)
    if mode == "reconstruct":
        if any(k in sampling for k in ("temperature", "top_k", "top_p")):
            sampling.setdefault("greedy", False)
        if show_steps:
            sampling["rerank"] = 1  # a checkpoint's config may ask for rerank; the steps follow one decode
            sampling["refine"] = 0
            outputs = _reconstruct_showing_steps(model, texts, seed, sampling, write)
        else:
            outputs = model.reconstruct(texts, seed=seed, **sampling)
        for t, o in zip(texts, outputs, strict=True):
            write(o if plain else f"{t} -> {o}")
        return outputs
    if mode == "paraphrase":
        temperature = sampling.pop("temperature", 1.0)
        groups = model.paraphrase(texts, n=n, temperature=temperature, seed=seed, **sampling)
        for t, group in zip(texts, groups, strict=True):
            if not plain:
                write(t)
            for o in group:
                write(o if plain else f"  -> {o}")
        return [o for g in groups for o in g]
    outputs = model.interpolate(texts[0], texts[1], n=n, seed=seed, **sampling)
    if not plain:
        write(f"{texts[0]}  =>  {texts[1]}")
    for i, o in enumerate(outputs):
        write(o if plain else f"  {i / (len(outputs) - 1):.2f}  {o}")
    return outputs


def _reconstruct_showing_steps(
    model: Any, texts: list[str], seed: int, sampling: dict[str, Any], write: Callable[[str], None]
) -> list[str]:
    """model.reconstruct with a callback that records every intermediate state; then, per input, one line per
    step (step 0 = the all-[MASK] start, for processes with a MASK state), masks shown as `_`."""
    from sgdd.evaluation import render_ids
    from sgdd.generation import choose_lengths

    K = sampling.get("steps", model.cfg.sampling.steps)
    steps: list[dict[int, str]] = [{} for _ in texts]
    mask_id = getattr(model.process, "mask_id", None)
    if mask_id is not None:  # the samplers start from MASK on the first lengths[i] positions
        lengths = choose_lengths(model.net, model.latents(texts), model.cfg).tolist()
        for i, n in enumerate(lengths):
            steps[i][0] = render_ids(model.vocab, [model.vocab.MASK] * int(n))

    def record(k: int, x, rows: list[int]) -> None:  # the API decodes in batches of similar length
        for i, row in zip(rows, x.tolist(), strict=True):
            steps[i][k] = render_ids(model.vocab, row)

    outputs = model.reconstruct(texts, seed=seed, callback=record, **sampling)
    width = len(str(K))
    for t, states in zip(texts, steps, strict=True):
        write(f"input: {t}")
        for k in sorted(states):
            write(f"  step {k:>{width}}/{K}  {states[k]}")
    return outputs
