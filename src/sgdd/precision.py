"""Which floating-point precision to run matmuls in: `precision: auto | bf16 | fp32`.

bf16 autocast is about 3-4x faster than fp32 on CPUs with native bf16 instructions (AVX512-BF16 / AMX) and
on recent GPUs, but hundreds of times slower where bf16 is emulated: on an AVX2-only CPU torch 2.15 multiplies
bf16 matrices at ~0.3 GFLOP/s against ~140 GFLOP/s in fp32. A fixed bf16 default would make training and the
embedding cache unusable there, so the default is `auto`: bf16 where the device has it natively (CPU: its
instruction set; else measured faster than fp32 by more than ~1.1x), else fp32.

- CUDA: bf16 when `torch.cuda.is_bf16_supported()`.
- CPU with bf16 matmul instructions (AVX512-BF16 or AMX, as torch reports them): bf16, without timing anything.
  The timing probe below used to decide here too, and it is too short for that: on a native-bf16 Xeon it put bf16
  at 0.49-0.64x fp32's time in 11 of 12 fresh processes and at 1.12x in one, so `auto` chose fp32 in about one
  process in twelve (bench/RESULTS.md, round 46): that run trained at half speed, built a second embedding cache,
  and decoded other sentences than the rest.
- Other CPUs: a micro-benchmark (a 256^3 matmul in each dtype, best of a few runs, ~0.4 s where bf16 is emulated,
  where it is ~400x slower and the probe's noise cannot flip the choice), run once per process (at the thread count
  of that first call) and cached.
- An explicit `bf16` on a device where it is slow is kept (the user asked for it) with one warning saying how
  much slower it is.

`resolve_precision(name, device)` returns "bf16" or "fp32"; every place that picks an autocast calls it, and the
embedding cache keys on the resolved value (bf16 and fp32 vectors differ slightly).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch

from sgdd.registry import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
_warned: set[str] = set()


def _matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_matmul_times() -> tuple[float, float]:
    """(bf16 seconds, fp32 seconds) for one 256^3 matmul on this CPU, measured once per process at the thread
    count of the first call."""
    return _matmul_seconds(torch.bfloat16), _matmul_seconds(torch.float32)


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """True where torch reports bf16 matmul instructions on this CPU (AVX512-BF16 or AMX tiles), False where it
    reports neither, None where this torch build cannot tell (then the timing probe decides)."""
    checks = [getattr(getattr(torch, "cpu", None), name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if callable(c)]
    if not checks:
        return None
    try:
        return any(bool(c()) for c in checks)
    except Exception:  # a private torch helper: any failure means "cannot tell"
        return None


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls beat fp32 ones on `device` (CPU: native bf16 instructions, else measured; CUDA:
    the device's bf16 support)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    if cpu_has_native_bf16():
        return True
    t_bf16, t_fp32 = cpu_matmul_times()
    return t_bf16 < 0.9 * t_fp32


def resolve_precision(name: str, device: str | torch.device = "cpu") -> str:
    """"auto" -> "bf16" or "fp32" for `device`; "bf16" / "fp32" are returned as given (bf16 with a warning
    where it is slow). Anything else is a ConfigError."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision '{name}' is not valid; choose one of: {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if name == "bf16" and torch.device(device).type == "cpu" and not bf16_is_fast(device):
        key = str(torch.device(device))
        if key not in _warned:
            _warned.add(key)
            t_bf16, t_fp32 = cpu_matmul_times()
            log.warning(
                "precision bf16 was asked for, but this CPU has no native bf16 matmul: bf16 runs %.0fx slower "
                "than fp32 here; set training.precision / encoder.precision to auto or fp32",
                t_bf16 / max(t_fp32, 1e-12),
            )
    return name


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast when `precision` resolves to bf16 on `device`, else a no-op (fp32)."""
    dev = torch.device(device)
    if resolve_precision(precision, dev) == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
