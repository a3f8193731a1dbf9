"""Manifest: what moves from the file to the GPU, as printable data.

One chunk per transformer block (all tensors named blk.{i}.*), and one per global tensor (embeddings,
output head, final norm, rope factors: loaded once, and scattered over the file, usually one at each
end, so one window around them all would span the whole model). Each chunk's byte range is widened to a 4 KiB
aligned file window (start rounded down, end rounded up, clipped at the end of the file): GGUF tensor
offsets are only 32-byte aligned, while O_DIRECT reads, page-cache readahead and cudaHostRegister all
work on pages. A tensor is then addressed as (window, offset inside the window).

Mixture-of-experts layers also get one window per (expert, stacked tensor): the routed experts are
stored stacked, blk.{i}.ffn_{gate,up,down}_exps.weight of numpy shape (X, R, C), and expert e is the
contiguous byte slice [e * n, (e + 1) * n) of the tensor, n = nbytes / X (R rows of C values). So a
streamer can move only the experts a token uses. Those slices start and end wherever the rows fall,
rarely on a page: each expert window is the slice widened the same way (start rounded down to
PAGE, end rounded up, clipped at the end of the file), and the slice sits at data_offset inside it.
The padding is the neighbours' bytes (another expert's, or another tensor's), not zeros: two
adjacent experts' windows may share one page, so reading every expert window of a tensor reads at
most one page per expert twice. The layer windows are unchanged: they still cover every tensor of
the layer, experts included.

The manifest is a pure function of the file's tensor table; it touches no tensor data.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from aircupy.gguf.ggml import GGMLType

PAGE = 4096
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
# Stacked routed experts (llama.cpp's LLM_TENSOR_FFN_*_EXPS), numpy shape (X, R, C).
_EXPERTS_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")


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
class ExpertWindow:
    """Expert `expert` of one stacked expert tensor of layer `layer`: its bytes are
    [data_offset, data_offset + data_bytes) of the page-aligned file window [offset, offset + nbytes)."""
    layer: int
    expert: int
    tensor: str          # the stacked tensor, e.g. blk.3.ffn_up_exps.weight
    ggml_type: GGMLType
    shape: tuple[int, ...]   # one expert's matrix (R, C)
    offset: int          # absolute, multiple of PAGE
    nbytes: int          # window length (page multiple unless clipped at end of file)
    data_offset: int     # the expert's first byte, relative to the window start: the padding before it
    data_bytes: int      # the expert's bytes in this tensor (the tensor's nbytes / X)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def file_offset(self) -> int:
        """Absolute offset of the expert's first byte."""
        return self.offset + self.data_offset


@dataclass(frozen=True)
class Manifest:
    path: str
    file_size: int
    globals: tuple[Chunk, ...]     # one per global tensor, layer == -1
    layers: tuple[Chunk, ...]
    # Per layer, its expert windows ordered by (expert, tensor offset); empty for a dense layer.
    experts: tuple[tuple[ExpertWindow, ...], ...] = ()

    def expert_windows(self, layer: int, expert: int | None = None) -> tuple[ExpertWindow, ...]:
        """The expert windows of `layer` (of one expert when given): () for a dense layer."""
        ws = self.experts[layer] if layer < len(self.experts) else ()
        return ws if expert is None else tuple(w for w in ws if w.expert == expert)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer` (its slices of every stacked tensor), 0 for a dense layer."""
        return sum(w.data_bytes for w in self.expert_windows(layer, 0))

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
        d = {
            "path": self.path, "file_size": self.file_size,
            "globals": [_chunk_dict(c) for c in self.globals],
            "layers": [_chunk_dict(c) for c in self.layers],
        }
        if any(self.experts):   # only MoE files carry the key: a dense model's dict is as before
            d["expert_windows"] = [[{**asdict(w), "ggml_type": w.ggml_type.name, "shape": list(w.shape)}
                                    for w in ws] for ws in self.experts]
        return d


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


def _expert_windows(t, layer: int, file_size: int) -> list[ExpertWindow]:
    """One window per expert of stacked tensor t (numpy shape (X, R, C)): expert e's bytes are the
    e-th of X equal slices, widened to pages."""
    X = int(t.shape[0])
    if len(t.shape) != 3 or X < 1 or t.nbytes % X:
        return []
    n = t.nbytes // X
    out = []
    for e in range(X):
        lo = t.offset + e * n
        start = lo // PAGE * PAGE
        end = min(-(-(lo + n) // PAGE) * PAGE, file_size)
        out.append(ExpertWindow(layer, e, t.name, GGMLType(t.ggml_type), tuple(t.shape[1:]), start,
                                end - start, lo - start, n))
    return out


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
    experts = []
    for i in range(n):
        stacked = sorted((t for t in per_layer.get(i, []) if _EXPERTS_RE.match(t.name)), key=lambda t: t.offset)
        ws = [w for t in stacked for w in _expert_windows(t, i, g.file_size)]
        experts.append(tuple(sorted(ws, key=lambda w: (w.expert, w.offset))))
    return Manifest(str(g.path), g.file_size, glob, layers, tuple(experts) if any(experts) else ())
