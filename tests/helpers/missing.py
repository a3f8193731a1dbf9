"""What a test does when something it needs is not installed: skip, saying what to install, or, where
the environment variable CI is set, fail. CI runs the README's test command, which installs every
model and test dependency, so a missing one there is a broken set-up, never a reason to pass."""
from __future__ import annotations

import os

import pytest

# Starts every such skip's reason, so the run's summary can count them (tests/conftest.py).
PREFIX = "not installed: "


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, install: str) -> None:
    """Skip (or, in CI, fail) the calling test or fixture: `what` is not installed, `install` gets it."""
    skip_or_fail(f"{PREFIX}{what} ({install})")


def skip_or_fail(reason: str) -> None:
    """pytest.skip(reason), or where CI is set pytest.fail: what CI lacks, its set-up failed to provide."""
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this fails instead of skipping", pytrace=False)
    pytest.skip(reason)
