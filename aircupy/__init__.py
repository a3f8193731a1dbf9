"""aircupy: run LLMs larger than VRAM by streaming GGUF layers through a pinned-RAM pipeline.

Public API: Engine, SamplingParams, __version__. Everything else is reachable from the submodules
(see README.md, "Low-level pieces").
"""
from __future__ import annotations

from aircupy.version import __version__

__all__ = ["Engine", "SamplingParams", "__version__"]


def __getattr__(name):  # lazy: `import aircupy` stays cheap and cupy is never imported here
    if name == "Engine":
        from aircupy.engine.engine import Engine
        return Engine
    if name == "SamplingParams":
        from aircupy.engine.params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'aircupy' has no attribute {name!r}")
