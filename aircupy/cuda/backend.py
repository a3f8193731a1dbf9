"""Is the CUDA backend usable here? The one door from the CUDA-free core into the GPU side.

aircupy/engine/backend.py calls these two functions (and imports nothing else of the device layer):
    cuda_unavailable_reason() -> str | None   None when cupy imports and a usable CUDA device exists;
                                              otherwise what is missing, in a few words
    load_model(g, config, *, vram_budget=None, progress=None, n_ctx=None) -> CudaModel
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


def load_model(g, config, *, vram_budget: int | None = None, progress=None,
               n_ctx: int | None = None, read_ahead=None):
    """The resident CUDA model for an open GGUFFile, or, when weights + KV cache + buffers exceed
    the VRAM budget, the streamed one (layers through device slots each pass, issue 5); below the
    streaming minimum a one-line PlanError states it. read_ahead: a started ReadAhead for the model
    to take over (the resident attempt leaves it to the streamed one), None: the model's own."""
    from aircupy.cuda.pool import ModelTooLargeError
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.streamed import StreamedCudaModel

    if n_ctx is None:
        n_ctx = config.default_n_ctx
    kw = {} if read_ahead is None else dict(read_ahead=read_ahead)
    try:
        return CudaModel(g, config, n_ctx, vram_budget=vram_budget, progress=progress, **kw)
    except ModelTooLargeError:  # raised before anything is allocated: stream instead
        if progress is not None:
            progress("the model exceeds the VRAM budget: streaming layers")
        return StreamedCudaModel(g, config, n_ctx, vram_budget=vram_budget, progress=progress, **kw)
