"""Manifest: what moves from the file to the GPU, as printable data.

One chunk per transformer block (all tensors named blk.{i}.*), and one per global tensor (embeddings,
output head, final norm, rope factors: loaded once, and scattered over the file, usually one at each
end, so one window around them all would span the whole model). Each chunk's byte range is widened to a 4 KiB
aligned file window (start rounded down, end rounded up, clipped at the end of the file): GGUF tensor
offsets are only 32-byte aligned, while O_DIRECT reads, page-cache readahead and cudaHostRegister all
work on pages. A tensor is then addressed as (window, offset inside the window).

The manifest is a pure function of the file's tensor table; it touches no tensor data.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from aircupy.gguf.ggml import GGMLType

PAGE = 4096
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorSlice:
    """One tensor inside its chunk's window: bytes [offset, offset + nbytes) of the window."""
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int          # relative to the window start
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """The file window holding every tensor of one block (layer >= 0) or the globals (layer == -1)."""
    layer: int
    offset: int          # absolute, multiple of PAGE
    nbytes: int          # window length (page multiple unless clipped at end of file)
    tensor_bytes: int    # bytes that belong to the chunk's own tensors (<= nbytes)
    tensors: tuple[TensorSlice, ...]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def slice(self, name: str) -> TensorSlice:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{name} is not in the chunk of layer {self.layer}")


@dataclass(frozen=True)
class Manifest:
    path: str
    file_size: int
    globals: tuple[Chunk, ...]     # one per global tensor, layer == -1
    layers: tuple[Chunk, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def max_layer_bytes(self) -> int:
        return max((c.nbytes for c in self.layers), default=0)

    @property
    def globals_bytes(self) -> int:
        return sum(c.tensor_bytes for c in self.globals)

    @property
    def layer_bytes_total(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "file_size": self.file_size,
            "globals": [_chunk_dict(c) for c in self.globals],
            "layers": [_chunk_dict(c) for c in self.layers],
        }


def _chunk_dict(c: Chunk) -> dict:
    d = asdict(c)
    d["tensors"] = [{**asdict(t), "ggml_type": t.ggml_type.name, "shape": list(t.shape)}
                    for t in c.tensors]
    return d


def _window(tensors, file_size: int, layer: int) -> Chunk:
    """Widen the byte span of `tensors` (TensorInfo-like: name, ggml_type, shape, offset, nbytes) to
    page boundaries and express each tensor relative to the window start."""
    if not tensors:
        return Chunk(layer, 0, 0, 0, ())
    lo = min(t.offset for t in tensors)
    hi = max(t.offset + t.nbytes for t in tensors)
    start = lo // PAGE * PAGE
    end = min(-(-hi // PAGE) * PAGE, file_size)
    slices = tuple(TensorSlice(t.name, GGMLType(t.ggml_type), tuple(t.shape), t.offset - start, t.nbytes)
                   for t in sorted(tensors, key=lambda t: t.offset))
    return Chunk(layer, start, end - start, sum(t.nbytes for t in tensors), slices)


def build_manifest(g) -> Manifest:
    """Group the tensors of GGUFFile `g` into per-layer chunks and the globals chunk.

    Layers are numbered by their `blk.N.` prefix; a gap in the numbering (blk.0 and blk.2 without
    blk.1) is kept as an empty chunk so that index == layer number; the model's own tensor map
    decides whether that is an error.
    """
    per_layer: dict[int, list] = {}
    globals_ = []
    for t in g.tensors.values():
        m = _LAYER_RE.match(t.name)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append(t)
        else:
            globals_.append(t)
    n = max(per_layer) + 1 if per_layer else 0
    layers = tuple(_window(per_layer.get(i, []), g.file_size, i) for i in range(n))
    glob = tuple(_window([t], g.file_size, -1) for t in sorted(globals_, key=lambda t: t.offset))
    return Manifest(str(g.path), g.file_size, glob, layers)
