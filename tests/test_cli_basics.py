"""`aircupy --help`, `aircupy --version` and `python -m aircupy` work and list every command."""
from __future__ import annotations

import subprocess
import sys

import aircupy


def _run(*args):
    return subprocess.run([sys.executable, "-m", "aircupy", *args], capture_output=True, text=True, timeout=60)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"aircupy, version {aircupy.__version__}"


def test_help_lists_the_commands():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "serve", "inspect", "synth"):
        assert f"  {cmd}" in r.stdout, cmd


def test_unknown_command_is_a_usage_error():
    r = _run("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr and "Traceback" not in r.stderr
