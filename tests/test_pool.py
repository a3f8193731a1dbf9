"""Device pool accounting (pure arithmetic, no GPU) and the CUDA probe's answer on a machine without one."""
from __future__ import annotations

import importlib.util

import pytest

from aircupy.cuda.pool import ALIGN, ModelTooLargeError, PoolPlan, fmt_bytes
from aircupy.errors import UnsupportedModelError


def test_regions_are_aligned_back_to_back_and_accounted_by_kind():
    p = PoolPlan()
    a = p.add("w0", 1000, "weights")
    b = p.add("kv", 4096, "kv")
    c = p.add("x", 1, "activations")
    d = p.add("empty", 0, "scratch")  # zero-size regions still get a distinct aligned offset
    assert [r.offset for r in (a, b, c, d)] == [0, 1024, 1024 + 4096, 1024 + 4096 + 256]
    assert all(r.offset % ALIGN == 0 for r in (a, b, c, d))
    assert p.total == 1024 + 4096 + 256 + 256
    assert p.by_kind() == {"weights": 1024, "kv": 4096, "activations": 256, "scratch": 256}
    assert p.report() == "device pool 5.50 KiB: weights 1.00 KiB, kv 4.00 KiB, activations 256 B, scratch 256 B"


def test_bad_regions_are_refused():
    p = PoolPlan()
    p.add("a", 10, "weights")
    with pytest.raises(ValueError, match="twice"):
        p.add("a", 10, "weights")
    with pytest.raises(ValueError, match="kind"):
        p.add("b", 10, "bogus")
    with pytest.raises(ValueError, match="negative"):
        p.add("c", -1, "kv")


def test_over_budget_is_a_clear_unsupported_model_error():
    p = PoolPlan()
    p.add("w", 5 << 30, "weights")
    p.add("kv", 1 << 30, "kv")
    p.check_budget(6 << 30)  # exactly fits
    with pytest.raises(ModelTooLargeError) as e:
        p.check_budget(4 << 30, "llama.gguf")
    assert isinstance(e.value, UnsupportedModelError)
    msg = str(e.value)
    assert "llama.gguf needs 6.00 GiB" in msg and "weights 5.00 GiB, kv 1.00 GiB" in msg
    assert "budget is 4.00 GiB" in msg


def test_fmt_bytes():
    assert [fmt_bytes(n) for n in (5, 2048, 3 << 20, 5 << 30)] == ["5 B", "2.00 KiB", "3.00 MiB", "5.00 GiB"]


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy present: GPU tier covers it")
def test_probe_names_missing_cupy():
    from aircupy.cuda.backend import cuda_unavailable_reason
    assert "cupy" in cuda_unavailable_reason()
