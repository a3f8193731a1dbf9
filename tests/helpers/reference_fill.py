"""The per-tensor upload (GPU tier only): each tensor copied from the mmap view into its block, the
repacked types through a device staging buffer. The models load through cuda/load.py's staged load;
this simple path is the reference tests/gpu/test_cold_load.py holds the staged load's bytes against."""
from __future__ import annotations

import numpy as np

from aircupy.cuda.ops.packing import needs_repack
from aircupy.cuda.weights import direct_offset, repack_source, vector_values


def fill(layout, block, tensors, lib, staging, stream) -> int:
    """Upload every piece of `layout` into `block` (cupy uint8) on `stream`; bytes read from the file."""
    read = 0
    for p in layout.pieces.values():
        dst = block[p.offset:p.offset + p.nbytes]
        if not p.is_matrix:
            raw = {n: (tensors[n].data, tensors[n].ggml_type, tensors[n].shape) for n, _ in p.sources}
            host = vector_values(p, raw)
            dst[:host.nbytes].view(np.float32).set(host, stream=stream)
            read += sum(tensors[n].nbytes for n, _ in p.sources)
            continue
        for name, row0 in p.sources:
            info = tensors[name]
            src = np.ascontiguousarray(info.data)
            read += src.nbytes
            if not needs_repack(p.ggml_type):
                off = direct_offset(p, row0)
                dst[off:off + src.nbytes].data.copy_from_host_async(src.ctypes.data, src.nbytes, stream)
                continue
            stage = staging[:src.nbytes]
            stage.data.copy_from_host_async(src.ctypes.data, src.nbytes, stream)
            repack_source(lib, stage, dst, p, info.ggml_type, info.shape, row0, stream)
    stream.synchronize()
    return read
