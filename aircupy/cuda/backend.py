"""Is the CUDA backend usable here? The one door from the CUDA-free core into the GPU side.

aircupy/engine/backend.py calls these three functions (and imports nothing else of the GPU side):
    cuda_unavailable_reason() -> str | None   None when cupy imports and a usable CUDA device exists;
                                              otherwise what is missing, in a few words
    start_warmer(path, size) -> warmer        the cold-start page-cache reader, handed to load_model
    load_model(g, config, *, vram_budget=None, progress=None, n_ctx=None, read_ahead=None) -> CudaModel
The check is cheap (an import and a device query, no kernel compilation) and runs only when asked.
"""
from __future__ import annotations

MIN_COMPUTE_CAPABILITY = 80  # cuda_src targets Ampere and newer (tested on sm_90)


def cuda_unavailable_reason() -> str | None:
    try:
        import cupy as cp
    except ImportError as e:
        return f"cupy cannot be imported ({e})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or the driver is older than cupy's CUDA
        return f"the CUDA runtime reports no usable driver ({e})"
    if n == 0:
        return "no CUDA device is visible"
    try:
        cc = int(cp.cuda.Device().compute_capability)
    except Exception as e:
        return f"the CUDA device cannot be queried ({e})"
    if cc < MIN_COMPUTE_CAPABILITY:
        return (f"the GPU's compute capability {cc // 10}.{cc % 10} is below the "
                f"{MIN_COMPUTE_CAPABILITY // 10}.{MIN_COMPUTE_CAPABILITY % 10} aircupy's kernels need")
    return None


def start_warmer(path, size: int):
    """The cold-start page-cache warmer over a whole file in file order, started before anything else
    is known of it (the Engine's first step, before the header is parsed); the model given it as
    `read_ahead` takes it over and closes it. A child process reads the file sequentially while this
    one parses the header, imports cupy and sets up the GPU."""
    from aircupy.cuda.load import start_read_ahead
    return start_read_ahead(path, [(0, size)], 1)


def load_model(g, config, *, vram_budget: int | None = None, progress=None,
               n_ctx: int | None = None, read_ahead=None, max_num_seqs: int = 1,
               max_batched_tokens: int | None = None, kv_tokens: int | None = None):
    """The CUDA model for an open GGUFFile: resident when everything fits the VRAM budget, else with
    layers streamed (cuda/placement.py decides); below the streaming minimum a one-line PlanError
    states it. read_ahead: a started warmer (start_warmer) for the model to take over, None: the
    model's own. Batching: placement.batch_options says what max_num_seqs, max_batched_tokens and
    kv_tokens (None: its default) size."""
    from aircupy.cuda.layout import refuse_experts

    refuse_experts(config)   # a MoE file stops here, before cupy is imported (a CPU-side check)
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import batch_options

    if n_ctx is None:
        n_ctx = config.default_n_ctx
    options = batch_options(n_ctx, vram_budget, max_num_seqs, max_batched_tokens, kv_tokens)
    kw = {} if read_ahead is None else dict(read_ahead=read_ahead)
    return CudaModel(g, config, n_ctx, vram_budget=vram_budget, progress=progress, options=options, **kw)
