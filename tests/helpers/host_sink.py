"""HostSink: the numpy twin of cuda/load.py's CudaSink. Blocks are numpy uint8 arrays; a repack
follows ops.repack's layout (bodies at row0's blocks, heads in the stacked tensor's heads region), so
run_load into a HostSink writes the bytes the GPU load writes (tests/gpu/test_cold_load.py checks it).
Used by the CPU test of the staged load and by bench/probes/bench_cold_read.py."""
from __future__ import annotations

import numpy as np

from aircupy.cuda.ops.packing import HEADERS, heads_offset
from aircupy.gguf.ggml import BLOCK_GEOMETRY


class HostSink:
    def __init__(self, blocks, staging_bytes: int):
        self.blocks, self.staging = blocks, np.empty(staging_bytes, np.uint8)

    def copy(self, part, block, off):
        self.blocks[block][off:off + part.nbytes] = part

    def stage(self, part, off):
        self.staging[off:off + part.nbytes] = part

    def repack(self, block, piece, s, row0: int):
        be, bb = BLOCK_GEOMETRY[s.ggml_type]
        (total, k), rows = piece.shape, int(np.prod(s.shape[:-1]))
        nb, (off, hb) = k // be, HEADERS[s.ggml_type]
        blocks = self.staging[:s.nbytes].reshape(rows * nb, bb)
        dst = self.blocks[block][piece.offset:piece.offset + piece.nbytes]
        b0 = row0 * nb * (bb - hb)
        body = dst[b0:b0 + rows * nb * (bb - hb)].reshape(rows * nb, bb - hb)
        body[:, :off], body[:, off:] = blocks[:, :off], blocks[:, off + hb:]
        h0 = heads_offset(s.ggml_type, (total, k)) + row0 * nb * hb
        dst[h0:h0 + rows * nb * hb].reshape(rows * nb, hb)[...] = blocks[:, off:off + hb]

    def vector(self, block, piece, values):
        self.blocks[block][piece.offset:piece.offset + values.nbytes] = values.view(np.uint8)

    def fence(self):
        return None

    def finish(self):
        pass
