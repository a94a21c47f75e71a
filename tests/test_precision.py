"""precision: auto picks bf16 only where bf16 matmuls are measured faster than fp32."""

from __future__ import annotations

import logging

import pytest
import torch

from sgdd import precision as P
from sgdd.config import load_config
from sgdd.registry import ConfigError


@pytest.fixture
def fake_cpu(monkeypatch):
    """Make the CPU micro-benchmark report given (bf16 seconds, fp32 seconds)."""

    def set_times(t_bf16: float, t_fp32: float, native: bool | None = None) -> None:
        monkeypatch.setattr(P, "cpu_matmul_times", lambda: (t_bf16, t_fp32))
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)  # None: the timing decides
        monkeypatch.setattr(P, "_warned", set())

    return set_times


def test_auto_is_fp32_where_bf16_is_emulated(fake_cpu):
    fake_cpu(0.2, 0.0005)  # AVX2-only CPU: bf16 ~400x slower
    assert P.resolve_precision("auto", "cpu") == "fp32"
    with P.autocast("auto", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_auto_is_bf16_where_bf16_is_native(fake_cpu):
    fake_cpu(0.0001, 0.0004)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    with P.autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_native_bf16_instructions_decide_without_the_timing(fake_cpu):
    """A CPU with bf16 instructions gets bf16 even when one noisy probe says otherwise (round 46: 1 process in 12)."""
    fake_cpu(0.000174, 0.000156, native=True)  # the probe of the odd process: bf16 1.12x fp32's time
    assert P.resolve_precision("auto", "cpu") == "bf16"
    fake_cpu(0.000174, 0.000156, native=False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    fake_cpu(0.0001, 0.0004, native=False)  # no bf16 instructions, yet measured faster: the timing still decides
    assert P.resolve_precision("auto", "cpu") == "bf16"


def test_explicit_choices_are_kept_and_slow_bf16_warns_once(fake_cpu, caplog):
    fake_cpu(0.2, 0.0005)
    with caplog.at_level(logging.WARNING, logger="sgdd.precision"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_precision("fp32", "cpu") == "fp32"
    warnings = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == 1
    assert "400x slower" in warnings[0].getMessage()
    with P.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="fp16"):
        P.resolve_precision("fp16")
    with pytest.raises(ConfigError, match="training.precision = 'fp16'.*auto, bf16, fp32"):
        load_config(None, ["training.precision=fp16"])


def test_defaults_are_auto():
    cfg = load_config(None)
    assert cfg.training.precision == "auto" and cfg.encoder.precision == "auto"


def test_cache_key_uses_the_resolved_precision(fake_cpu):
    from sgdd.embed_cache import cache_key_fields

    cfg = load_config(None)
    fake_cpu(0.2, 0.0005)
    assert cache_key_fields(cfg, ["a b c"])["precision"] == "fp32"
    fake_cpu(0.0001, 0.0004)
    assert cache_key_fields(cfg, ["a b c"])["precision"] == "bf16"


def test_the_real_benchmark_returns_positive_times():
    t_bf16, t_fp32 = P.cpu_matmul_times()
    assert t_bf16 > 0 and t_fp32 > 0
    native = P.cpu_has_native_bf16()
    assert native in (True, False, None)
    assert P.bf16_is_fast("cpu") == (bool(native) or t_bf16 < 0.9 * t_fp32)
