"""The device pool: one GPU allocation made at start-up, carved into named regions.

Everything the model touches on the GPU (weights, KV cache, activations, scratch) is a view into this
one arena, so the forward pass never allocates, a captured CUDA graph keeps valid addresses, and what
was allocated for what is reportable. Two halves:

  PoolPlan    pure arithmetic (no cupy): regions added by name and kind, each 256-byte aligned, a
              total, a per-kind breakdown and a budget check that raises ModelTooLargeError (a clear
              message, never an out-of-memory traceback). Testable on any machine.
  DevicePool  allocates the plan's total once through cupy and hands out typed views of regions.

A region can be shared by several users that are never live at the same time (e.g. the upload staging
buffer and the prefill dequantization scratch): ask for it once with the largest size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aircupy.errors import UnsupportedModelError

ALIGN = 256  # cudaMalloc's own alignment; keeps every region 16-byte-vector and texture aligned
KINDS = ("weights", "kv", "activations", "scratch")
GiB = 1 << 30


class ModelTooLargeError(UnsupportedModelError):
    """The model (with its KV cache and working buffers) does not fit the VRAM budget."""


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Region:
    name: str
    kind: str     # one of KINDS
    offset: int   # bytes from the arena start, multiple of ALIGN
    nbytes: int   # as asked (the next region starts at the next aligned offset)


class PoolPlan:
    """Regions laid out back to back; offsets are final once added."""

    def __init__(self):
        self.regions: dict[str, Region] = {}
        self._end = 0

    def add(self, name: str, nbytes: int, kind: str) -> Region:
        if kind not in KINDS:
            raise ValueError(f"region kind must be one of {KINDS}, got {kind!r}")
        if name in self.regions:
            raise ValueError(f"region {name!r} added twice")
        if nbytes < 0:
            raise ValueError(f"region {name!r}: negative size {nbytes}")
        r = Region(name, kind, self._end, int(nbytes))
        self.regions[name] = r
        self._end += -(-max(int(nbytes), 1) // ALIGN) * ALIGN
        return r

    @property
    def total(self) -> int:
        return self._end

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind, alignment padding included (it is what the arena really spends)."""
        out = dict.fromkeys(KINDS, 0)
        for r in self.regions.values():
            out[r.kind] += -(-max(r.nbytes, 1) // ALIGN) * ALIGN
        return out

    def report(self) -> str:
        """One line per kind and the total, e.g. for `--stats` and the start-up log."""
        k = self.by_kind()
        parts = ", ".join(f"{kind} {fmt_bytes(k[kind])}" for kind in KINDS if k[kind])
        return f"device pool {fmt_bytes(self.total)}: {parts}"

    def check_budget(self, budget: int, what: str = "the model") -> None:
        """Raise ModelTooLargeError naming every part when the plan exceeds `budget` bytes."""
        if self.total <= budget:
            return
        raise ModelTooLargeError(
            f"{what} needs {fmt_bytes(self.total)} of GPU memory ({self.report()}) but the VRAM "
            f"budget is {fmt_bytes(budget)}; use a smaller model, quantization or context (n_ctx), or "
            f"fewer forced resident layers")


class DevicePool:
    """One cupy allocation of plan.total bytes; `array(name, shape, dtype)` views a region."""

    def __init__(self, plan: PoolPlan, budget: int | None = None, margin: int = 512 << 20,
                 what: str = "the model"):
        """The plan must fit min(budget, free memory - margin); `margin` is left for cuBLAS
        workspaces, NVRTC modules and CUDA graphs, which allocate outside the pool."""
        import cupy as cp  # the one lazy import of the device layer

        free, total = cp.cuda.runtime.memGetInfo()
        self.device_total = int(total)
        room = max(0, int(free) - margin)
        self.budget = room if budget is None else min(int(budget), room)
        plan.check_budget(self.budget, what)
        try:
            self._mem = cp.cuda.alloc(max(plan.total, ALIGN))
        except cp.cuda.memory.OutOfMemoryError as e:
            raise ModelTooLargeError(
                f"could not allocate the device pool of {fmt_bytes(plan.total)} "
                f"({plan.report()}): {e}") from None
        self.plan = plan
        self._cp = cp
        self.free_after = int(cp.cuda.runtime.memGetInfo()[0])

    @property
    def ptr(self) -> int:
        return int(self._mem.ptr)

    def array(self, name: str, shape, dtype, offset: int = 0):
        """A cupy array of `shape`/`dtype` over region `name`, starting `offset` bytes into it."""
        r = self.plan.regions[name]
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset < 0 or offset + nbytes > r.nbytes:
            raise ValueError(f"view of {nbytes} B at +{offset} exceeds region {name!r} "
                             f"({r.nbytes} B)")
        return self._cp.ndarray(shape, dtype=dtype, memptr=self._mem + (r.offset + offset))

    def report(self) -> str:
        return (f"{self.plan.report()}; GPU {fmt_bytes(self.device_total)}, "
                f"{fmt_bytes(self.free_after)} free after allocation")
