"""The wheel ships every subpackage and the CUDA sources (setup.cfg lists packages explicitly)."""
from __future__ import annotations

import configparser
from importlib import resources
from pathlib import Path

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
