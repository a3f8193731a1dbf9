"""The placement planner: which layers stay in VRAM, which stream, where the KV cache lives, and the
exact device pool that implies. The one planner: the CUDA model builds what `place` returns, and
`aircupy inspect --vram-budget` prints the same object.

    fp = Footprint.of(g, config, n_ctx)                  # layouts and buffer sizes: pure arithmetic
    p = place(fp, vram_budget, PlacementSettings())      # Placement: printable, p.pool is a PoolPlan
    p.to_dict()                                          # what inspect --json prints

The pool (cuda/pool.py) holds, by region:
  weights.globals, weights.layer{i} for every resident layer (packed blocks, cuda/layout.py);
  stream.slot{j}: min(slots, streamed layers) blocks of the largest streamed layer, through which the
    streamed layers pass every forward pass (compute on one, upload of the next, prefetch);
  stream.staging0/1: two buffers of the largest raw tensor that needs a repack, used in turn (the copy
    stream DMAs the next tensor into one while the repack stream repacks the other into its slot);
  kv: K and V of every layer as a paged block pool (float16 (2, layers, kv_tokens / KV_BLOCK, Hkv,
    KV_BLOCK, D), cuda/kv.py), kv_tokens >= n_ctx tokens shared by every running sequence; or with the
    KV shuttle one n_ctx-token slab (1, Hkv, n_ctx, D) per resident layer, plus stream.kvslot{j} (one K
    and V slab per weight slot) through which the streamed layers' KV, kept in pinned RAM, rides up
    with its layer (cuda/shuttle.py; one sequence at a time);
  act.* and scratch: activations for `prefill_rows` rows, a batch step's inputs for `max_seqs`
    sequences, and the one shared scratch (cuda/buffers.py).

The rule: if everything fits, everything is resident. Otherwise, per KV placement (in VRAM, or
shuttled), the most resident layers whose pool fits, spread evenly among the streamed ones
(`resident_set`: while the GPU computes a run of resident layers the copy engine fills the slots for
the streamed layers after them); of those two, the one that streams the fewest bytes per forward pass
at full context (weights, plus each shuttled layer's KV up and back) wins, KV in VRAM on a tie; a
model that batches (max_seqs > 1) keeps its KV in VRAM whenever that fits, since the shuttle serves one
sequence at a time. A budget
below the smallest pool raises PlanError naming it. `n_resident` and `kv_shuttle` force the choice
(tests, benchmarks); the pool must still fit.

Pure arithmetic, no cupy: tested on the CPU tier.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aircupy.cuda.buffers import plan_buffers, scratch_nbytes
from aircupy.cuda.kv import KV_BLOCK
from aircupy.cuda.layout import global_layout, layer_layout, raw_nbytes, refuse_experts
from aircupy.cuda.pool import PoolPlan, fmt_bytes
from aircupy.errors import AircupyError

PREFILL_ROWS = 512          # tokens per prefill pass (the engine feeds 512-token chunks too)
HEAD_ROWS = 8               # rows of the head per launch: the matvec kernels take 1..8 activation rows
STAGING_BUFFERS = 2         # raw-tensor staging buffers of a streamed model (DMA into one, repack the other)
POOL_MARGIN = 512 << 20     # device memory left outside the pool (cuBLAS workspaces, NVRTC modules, graphs)
# The CUDA context's device memory, assumed where no GPU measured it (`inspect` on a CPU machine); the
# model measures it (cuda/memory.py) and adds memory.OUTSIDE_RESERVE for what it creates later.
ASSUMED_CONTEXT = 560 << 20
# Pinned host-to-device rate assumed to state the bound a placement implies when none was measured.
ASSUMED_PCIE_GBPS = 53.0


class PlanError(AircupyError):
    """The VRAM budget cannot hold the smallest pool; the message states it."""


@dataclass(frozen=True)
class PlacementSettings:
    slots: int = 3                       # streaming slots (>= 3: compute, upload, prefetch)
    kv_shuttle: bool | None = None       # None: the rule above; True/False force it
    n_resident: int | None = None        # None: the rule above; else exactly this many (spread)
    host_ram_bytes: int | None = None    # available host RAM (the RAM tier takes at most half); None: none
    ram_tier_bytes: int | None = None    # force the RAM tier's capacity (None: from host_ram_bytes)
    pcie_gbps: float | None = None       # measured pinned host-to-device rate; None: ASSUMED_PCIE_GBPS
    outside_bytes: int = 0               # what the budget holds besides the pool (CUDA context, libraries)


def _spread(n_layers: int, n_pick: int) -> list[int]:
    """n_pick layer indices spread evenly over range(n_layers)."""
    return sorted({int((k + 0.5) * n_layers / n_pick) for k in range(n_pick)}) if n_pick else []


def resident_set(n_layers: int, n_resident: int) -> tuple[int, ...]:
    """The layers kept resident when n_resident of n_layers are (the streamed ones spread evenly)."""
    picked = set(_spread(n_layers, n_layers - n_resident))
    return tuple(i for i in range(n_layers) if i not in picked)


@dataclass
class Footprint:
    """Everything the pool arithmetic needs of a model: its block layouts, KV and buffer sizes."""
    config: object
    glob_l: object                       # BlockLayout of the globals
    layer_ls: list                       # BlockLayout per layer
    tensors: dict                        # name -> TensorInfo (for raw tensor sizes)
    manifest: object                     # stream/manifest.Manifest: each layer's 4 KiB-aligned window
    n_ctx: int
    rows: int = PREFILL_ROWS
    hr: int = HEAD_ROWS
    scratch_b: int = 0
    kv_tokens: int = 0                   # the paged pool's tokens (0: n_ctx rounded up to KV_BLOCK)
    max_seqs: int = 1                    # sequences a batch step may hold (step input buffers)

    def __post_init__(self):
        self.kv_tokens = -(-max(int(self.kv_tokens), self.n_ctx) // KV_BLOCK) * KV_BLOCK

    @classmethod
    def of(cls, g, config, n_ctx: int, rows: int = PREFILL_ROWS, kv_tokens: int | None = None,
           max_seqs: int = 1) -> "Footprint":
        """The footprint of an open GGUFFile's model at a context of n_ctx tokens, with a paged KV
        pool of kv_tokens (None: n_ctx) and batch steps of up to max_seqs sequences."""
        from aircupy.cuda import ops
        from aircupy.gguf.arch import tensor_map
        from aircupy.stream.manifest import build_manifest
        refuse_experts(config)
        tensors = g.tensors
        tm = tensor_map(config.arch, config.n_layers, tensors)
        manifest = build_manifest(g)
        glob_l = global_layout(tm.globals, tensors)
        layer_ls = [layer_layout(tm.layers[i], tensors, True) for i in range(config.n_layers)]
        scratch_b = scratch_nbytes(ops, config, [glob_l] + layer_ls, tensors, rows, HEAD_ROWS)
        return cls(config, glob_l, layer_ls, tensors, manifest, int(n_ctx), rows, HEAD_ROWS, scratch_b,
                   int(kv_tokens or 0), max(1, int(max_seqs)))

    @property
    def n_layers(self) -> int:
        return len(self.layer_ls)

    @property
    def windows(self) -> list[tuple[int, int]]:
        """(file offset, nbytes) of each layer's window."""
        return [(ch.offset, ch.nbytes) for ch in self.manifest.layers]

    def kv_layer_bytes(self) -> int:
        """K and V of one layer's n_ctx-token slab (float16 (1, Hkv, n_ctx, D) each): the shuttle's."""
        c = self.config
        return 2 * c.n_head_kv * self.n_ctx * c.head_dim * 2

    def kv_pool_layer_bytes(self) -> int:
        """K and V of one layer in the paged pool (kv_tokens tokens)."""
        c = self.config
        return 2 * c.n_head_kv * self.kv_tokens * c.head_dim * 2

    @property
    def max_blocks(self) -> int:
        """Blocks of one sequence's table: n_ctx tokens at most."""
        return -(-self.n_ctx // KV_BLOCK)

    def slot_bytes(self, streamed) -> int:
        return max((self.layer_ls[i].nbytes for i in streamed), default=0)

    def staging_bytes(self, streamed) -> int:
        from aircupy.cuda.ops.packing import needs_repack
        need = [256]
        for i in streamed:
            for p in self.layer_ls[i].matrices():
                if needs_repack(p.ggml_type):
                    need += [raw_nbytes(self.tensors, name) for name, _ in p.sources]
        return max(need)

    def pool_plan(self, resident, shuttle: bool, n_slots: int) -> PoolPlan:
        resident = set(resident)
        streamed = [i for i in range(self.n_layers) if i not in resident]
        slots = min(n_slots, len(streamed))   # fewer streamed layers than slots: one slot each
        plan = PoolPlan()
        plan.add("weights.globals", self.glob_l.nbytes, "weights")
        for i in sorted(resident):
            plan.add(f"weights.layer{i}", self.layer_ls[i].nbytes, "weights")
        if streamed:
            for j in range(slots):
                plan.add(f"stream.slot{j}", self.slot_bytes(streamed), "weights")
            for j in range(STAGING_BUFFERS):
                plan.add(f"stream.staging{j}", self.staging_bytes(streamed), "scratch")
        kv_b = self.kv_layer_bytes()
        if shuttle and streamed:
            if resident:
                plan.add("kv", len(resident) * kv_b, "kv")
            for j in range(slots):
                plan.add(f"stream.kvslot{j}", kv_b, "kv")
        else:
            plan.add("kv", self.n_layers * self.kv_pool_layer_bytes(), "kv")
        plan_buffers(plan, self.config, self.rows, self.hr, self.max_seqs, self.max_blocks)
        plan.add("scratch", self.scratch_b, "scratch")
        return plan

    def bytes_per_pass(self, resident, shuttle: bool) -> int:
        """Bytes a forward pass streams at full context: the streamed blocks, plus each shuttled
        layer's KV up before its compute and back after it."""
        streamed = [i for i in range(self.n_layers) if i not in set(resident)]
        kv = 2 * len(streamed) * self.kv_layer_bytes() if shuttle else 0
        return sum(self.layer_ls[i].nbytes for i in streamed) + kv


@dataclass(frozen=True)
class Placement:
    vram_budget: int                 # everything the process may hold on the device
    outside_bytes: int               # of it, held outside the pool (context, kernels, cuBLAS, graphs)
    n_ctx: int
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    slots: int                       # device slots the streamed layers pass through (0: none stream)
    slot_bytes: int
    staging_bytes: int               # each of the STAGING_BUFFERS repack staging buffers
    kv_placement: str                # "vram" (paged pool) | "shuttle" (slabs, one sequence)
    kv_layer_bytes: int              # one layer's K and V: the paged pool's, or the shuttle's slab
    kv_tokens: int                   # tokens the KV holds (all sequences): the pool's, or n_ctx
    max_seqs: int                    # sequences a step may batch (1 with the shuttle)
    vram_bytes: int                  # the pool's size
    breakdown: dict                  # pool bytes by kind (weights, kv, activations, scratch)
    bytes_streamed_per_pass: int     # at full context, shuttled KV included
    pcie_gbps: float
    pcie_rate_measured: bool
    pcie_bound_s: float
    host_buffers: int                # pinned staging ring: buffers of the largest streamed file window
    host_buffer_bytes: int
    windows: dict                    # streamed layer -> (file offset, nbytes) of its window
    ram_tier_bytes: int              # streamed windows kept pinned after their first read
    host_kv_bytes: int               # pinned KV of the shuttled layers (the start-up cache)
    pool: PoolPlan = field(repr=False, compare=False, default=None)
    footprint: Footprint = field(repr=False, compare=False, default=None)

    @property
    def streams(self) -> bool:
        return bool(self.streamed_layers)

    @property
    def shuttle(self) -> bool:
        return self.kv_placement == "shuttle"

    @property
    def host_pinned_bytes(self) -> int:
        return self.host_buffers * self.host_buffer_bytes + self.ram_tier_bytes + self.host_kv_bytes

    @property
    def decode_bound_tok_s(self) -> float | None:
        """Batch-1 decode tokens/s the PCIe link allows (None when nothing streams)."""
        return 1.0 / self.pcie_bound_s if self.pcie_bound_s > 0 else None

    def to_dict(self) -> dict:
        """Plain data (what `aircupy inspect --json` prints under "plan")."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("pool", "footprint")}
        d["resident_layers"] = list(self.resident_layers)
        d["streamed_layers"] = list(self.streamed_layers)
        d["host_pinned_bytes"] = self.host_pinned_bytes
        d["pool_budget"] = self.pool_budget
        d["decode_bound_tok_s"] = self.decode_bound_tok_s
        d["windows"] = {str(i): list(w) for i, w in self.windows.items()}
        d["regions"] = {r.name: r.nbytes for r in self.pool.regions.values()}
        return d

    @property
    def pool_budget(self) -> int:
        return self.vram_budget - self.outside_bytes

    def report(self) -> str:
        kv = "; KV of streamed layers shuttled" if self.shuttle else ""
        return (f"{len(self.resident_layers)} resident / {len(self.streamed_layers)} streamed layers "
                f"(budget {fmt_bytes(self.vram_budget)}, {fmt_bytes(self.outside_bytes)} of it outside "
                f"the pool{kv})")


def _choose(fp: Footprint, budget: int, s: PlacementSettings,
            outside: int = 0) -> tuple[tuple[int, ...], bool]:
    """(resident layers, KV shuttled?) for a pool of at most `budget` bytes."""
    L = fp.n_layers
    if s.n_resident is not None:
        if not 0 <= s.n_resident <= L:
            raise PlanError(f"n_resident must be 0 .. {L}, got {s.n_resident}")
        resident = resident_set(L, s.n_resident)
        if s.kv_shuttle is None:
            shuttle = fp.pool_plan(resident, False, s.slots).total > budget
        else:
            shuttle = bool(s.kv_shuttle)
        return resident, shuttle and s.n_resident < L
    if fp.pool_plan(range(L), False, s.slots).total <= budget:
        return resident_set(L, L), False        # all resident: nothing streams or is shuttled
    options = []
    for sh in ((False, True) if s.kv_shuttle is None else (bool(s.kv_shuttle),)):
        for n in range(L - 1, -1, -1):
            res = resident_set(L, n)
            if fp.pool_plan(res, sh, s.slots).total <= budget:
                options.append((fp.bytes_per_pass(res, sh), sh, n))
                break
    if fp.max_seqs > 1 and any(not o[1] for o in options):
        options = [o for o in options if not o[1]]   # batching: the shuttle holds one sequence
    if options:
        _, sh, n = min(options)
        return resident_set(L, n), sh
    sh = s.kv_shuttle is not False
    low = fp.pool_plan((), sh, s.slots)
    kv = ("KV of streamed layers shuttled through pinned RAM" if sh else
          f"KV cache of {fp.n_ctx} tokens in VRAM, the shuttle off")
    what = (f"VRAM budget {fmt_bytes(budget + outside)} less {fmt_bytes(outside)} for the CUDA context "
            f"and libraries leaves {fmt_bytes(max(0, budget))} for the pool, which" if outside else
            f"VRAM budget {fmt_bytes(budget)}")
    raise PlanError(f"{what} is below the streaming minimum {fmt_bytes(low.total)} ({low.report()}; {kv})")


def minimum_budget(fp: Footprint, settings: PlacementSettings | None = None) -> int:
    """The smallest budget `place` accepts (everything streamed, KV shuttled unless forced off)."""
    s = settings or PlacementSettings()
    return fp.pool_plan((), s.kv_shuttle is not False, s.slots).total


def place(fp: Footprint, vram_budget: int, settings: PlacementSettings | None = None) -> Placement:
    s = settings or PlacementSettings()
    if s.slots < 3:
        raise PlanError(f"streaming needs at least 3 slots (compute, upload, prefetch), got {s.slots}")
    budget = int(vram_budget) - int(s.outside_bytes)     # what the pool may take
    resident, shuttle = _choose(fp, budget, s, int(s.outside_bytes))
    pool = fp.pool_plan(resident, shuttle, s.slots)
    if pool.total > budget:
        pool.check_budget(budget, "the forced placement")
    streamed = tuple(i for i in range(fp.n_layers) if i not in set(resident))
    windows = fp.windows
    window_b = max((windows[i][1] for i in streamed), default=0)
    streamed_b = sum(windows[i][1] for i in streamed)
    if s.ram_tier_bytes is not None:
        tier = int(s.ram_tier_bytes) if streamed else 0
    else:
        tier = max(0, min(streamed_b, (s.host_ram_bytes or 0) // 2))
    per_pass = fp.bytes_per_pass(resident, shuttle)
    gbps = s.pcie_gbps or ASSUMED_PCIE_GBPS
    return Placement(
        vram_budget=int(vram_budget), outside_bytes=int(s.outside_bytes), n_ctx=fp.n_ctx,
        resident_layers=tuple(resident), streamed_layers=streamed,
        slots=min(s.slots, len(streamed)), slot_bytes=fp.slot_bytes(streamed),
        staging_bytes=fp.staging_bytes(streamed) if streamed else 0,
        kv_placement="shuttle" if shuttle else "vram",
        kv_layer_bytes=fp.kv_layer_bytes() if shuttle else fp.kv_pool_layer_bytes(),
        kv_tokens=fp.n_ctx if shuttle else fp.kv_tokens, max_seqs=1 if shuttle else fp.max_seqs,
        vram_bytes=pool.total, breakdown=pool.by_kind(), bytes_streamed_per_pass=per_pass,
        pcie_gbps=gbps, pcie_rate_measured=s.pcie_gbps is not None, pcie_bound_s=per_pass / (gbps * 1e9),
        host_buffers=s.slots + 2 if streamed else 0, host_buffer_bytes=window_b,
        windows={i: windows[i] for i in streamed},
        ram_tier_bytes=tier, host_kv_bytes=len(streamed) * fp.kv_layer_bytes() if shuttle else 0,
        pool=pool, footprint=fp)


@dataclass(frozen=True)
class CudaOptions:
    """Knobs for tests and benchmarks; the defaults are what the engine runs."""
    use_graphs: bool = True            # replay decode steps and prefill chunks as CUDA graphs
    prefill_rows: int = PREFILL_ROWS   # tokens per prefill pass
    prefill_graph_slots: int = 4       # prefill graphs kept (one per chunk length), 0: none
    kv_tokens: int | None = None       # the paged KV pool's tokens, all sequences (None: n_ctx)
    max_seqs: int = 1                  # sequences one batch step may hold
    slots: int = 3                     # streaming slots
    n_resident: int | None = None      # force the resident layer count (spread); the pool must fit
    kv_shuttle: bool | None = None     # force the KV shuttle on or off
    ram_tier_bytes: int | None = None  # force the RAM tier's capacity (None: half the available RAM)
    # pin the part of a budget held outside the pool (None: measured); pinned, the process check
    # after the load is off: tests of the placement rule at exact pool sizes
    outside_bytes: int | None = None


# Full contexts the default KV pool holds without a VRAM budget (sequences share it block by block).
KV_CONTEXTS = 8


def batch_options(n_ctx: int, vram_budget: int | None, max_num_seqs: int = 1,
                  max_batched_tokens: int | None = None, kv_tokens: int | None = None,
                  **other) -> CudaOptions:
    """The options of a model that batches: steps of up to max_num_seqs sequences and
    max_batched_tokens rows (the activation buffers' rows; None: PREFILL_ROWS) over a paged KV pool of
    kv_tokens tokens (None: with a VRAM budget n_ctx, which the placement trades against resident
    layers as before; without one n_ctx x min(max_num_seqs, KV_CONTEXTS), so a full batch of long
    sequences fits). The CUDA backend's loader and `aircupy inspect` both go through it."""
    if kv_tokens is None:
        kv_tokens = n_ctx if vram_budget is not None else n_ctx * min(max(1, max_num_seqs), KV_CONTEXTS)
    return CudaOptions(prefill_rows=int(max_batched_tokens or PREFILL_ROWS), max_seqs=max(1, int(max_num_seqs)),
                       kv_tokens=int(kv_tokens), **other)


def placement_settings(options: CudaOptions, host_ram_bytes: int | None, pcie_gbps: float | None = None,
                       outside_bytes: int = 0) -> PlacementSettings:
    """The planner's settings for these options: the model and `aircupy inspect` both go through it."""
    return PlacementSettings(slots=options.slots, kv_shuttle=options.kv_shuttle,
                             n_resident=options.n_resident, host_ram_bytes=host_ram_bytes,
                             ram_tier_bytes=options.ram_tier_bytes, pcie_gbps=pcie_gbps,
                             outside_bytes=outside_bytes)


def plan_model(g, config, n_ctx: int, vram_budget: int, options: CudaOptions | None = None,
               host_ram_bytes: int | None = None, pcie_gbps: float | None = None,
               footprint: Footprint | None = None, outside_bytes: int = 0) -> Placement:
    """The placement of an open GGUFFile's model at this budget (for the model: the budget after the
    device's free memory is taken into account). CudaModel builds exactly this, and `aircupy inspect
    --vram-budget` prints it. footprint: Footprint.of(g, config, n_ctx, options.prefill_rows) when
    the caller has it already. outside_bytes: the part of the budget held outside the pool."""
    o = options or CudaOptions()
    fp = footprint or Footprint.of(g, config, n_ctx, o.prefill_rows, o.kv_tokens, o.max_seqs)
    return place(fp, vram_budget, placement_settings(o, host_ram_bytes, pcie_gbps, outside_bytes))


def effective_budget(vram_budget: int | None, free_bytes: int, outside_bytes: int = 0) -> int:
    """The budget a model plans with: the stated one (which bounds `outside_bytes` too), never more
    than the pool can get of the free device memory (free minus POOL_MARGIN) plus outside_bytes;
    None: free memory minus POOL_MARGIN (outside_bytes is then 0: free memory excludes the context)."""
    room = max(0, int(free_bytes) - POOL_MARGIN)
    return room if vram_budget is None else min(int(vram_budget), room + int(outside_bytes))
