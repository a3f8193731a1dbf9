"""Placement of a streamed CUDA model: which layers stay resident, and the exact device pool that implies.

    sp = StreamPlacement(config, glob_l, layer_ls, tensors, n_ctx, rows, hr, n_slots, scratch_b)
    resident, shuttle = sp.choose(budget)          # shuttle: None automatic, True/False forced
    pool_plan = sp.pool_plan(resident, shuttle)    # what DevicePool allocates; .total <= budget

make_plan (loader/plan.py) decides from the file's windows and an estimate of the workspace; the pool
holds packed blocks (a little larger than raw windows), the real activation buffers and scratch, and
the device staging buffers that repacks run from. This module makes make_plan's decision again on the
exact pool arithmetic, by the same rule: per KV placement the most resident layers that fit (always
the plan's spread, loader.plan.resident_set), then the placement that streams the fewest bytes per
pass at full context (KV in VRAM on a tie), so the shuttle is taken when KV in VRAM does not fit.

Pool regions besides the resident model's (cuda_model.py): `stream.slot{j}` (weights, min(n_slots,
streamed layers) x the largest streamed block) and `stream.staging0`/`stream.staging1` (scratch: two
buffers of the largest raw tensor that needs a repack, used in turn: the copy stream DMAs the next
tensor into one while the repack stream repacks the other into its slot, so the copy engine never
waits for a repack; they cannot share the compute stream's scratch).
KV: region `kv` holds every layer's K and V (float16 (2, layers, 1, Hkv, n_ctx, hd)) when it stays
in VRAM; with the shuttle (model/kv_shuttle.py) only the resident layers', plus `stream.kvslot{j}`,
one K and V block per weight slot, the streamed layers' KV living in pinned RAM.

Pure arithmetic, no cupy: tested on the CPU tier.
"""
from __future__ import annotations

from aircupy.cuda.pool import PoolPlan, fmt_bytes
from aircupy.cuda.plan import PlanError, resident_set
from aircupy.cuda.buffers import plan_buffers
from aircupy.cuda.layout import raw_nbytes

STAGING_BUFFERS = 2   # raw-tensor staging buffers of a streamed model (DMA into one, repack the other)


class StreamPlacement:
    def __init__(self, config, glob_l, layer_ls, tensors, n_ctx: int, rows: int, hr: int,
                 n_slots: int, scratch_b: int):
        self.c, self.glob_l, self.layer_ls, self.tensors = config, glob_l, layer_ls, tensors
        self.n_ctx, self.rows, self.hr, self.n_slots, self.scratch_b = n_ctx, rows, hr, n_slots, scratch_b
        self.L = len(layer_ls)

    @classmethod
    def for_model(cls, g, config, n_ctx: int, rows: int, n_slots: int):
        """(placement, global layout, layer layouts) of an open GGUFFile, as the model builds them."""
        import inspect

        from aircupy.gguf.arch import tensor_map
        from aircupy.cuda.buffers import scratch_nbytes
        from aircupy.cuda.forward import HEAD_ROWS
        from aircupy.cuda.layout import global_layout, layer_layout
        from aircupy.cuda import ops
        tm = tensor_map(config.arch, config.n_layers, g.tensors)
        stack = "row0" in inspect.signature(ops.repack).parameters
        glob_l = global_layout(tm.globals, g.tensors)
        layer_ls = [layer_layout(tm.layers[i], g.tensors, stack) for i in range(config.n_layers)]
        scratch_b = scratch_nbytes(ops, config, [glob_l] + layer_ls, g.tensors, rows, HEAD_ROWS)
        return (cls(config, glob_l, layer_ls, g.tensors, n_ctx, rows, HEAD_ROWS, n_slots, scratch_b),
                glob_l, layer_ls)

    def resident_for(self, n_resident: int) -> tuple[int, ...]:
        return tuple(resident_set(self.L, n_resident))

    def slot_count(self, streamed) -> int:
        """Fewer streamed layers than slots: each keeps its own slot (SlotSchedule.cached)."""
        return min(self.n_slots, len(streamed))

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

    def kv_layer_bytes(self) -> int:
        """K and V of one layer (float16 (1, Hkv, n_ctx, hd) each)."""
        return 2 * self.c.n_head_kv * self.n_ctx * self.c.head_dim * 2

    def pool_plan(self, resident, shuttle: bool = False) -> PoolPlan:
        resident = set(resident)
        streamed = [i for i in range(self.L) if i not in resident]
        plan = PoolPlan()
        plan.add("weights.globals", self.glob_l.nbytes, "weights")
        for i in sorted(resident):
            plan.add(f"weights.layer{i}", self.layer_ls[i].nbytes, "weights")
        if streamed:
            for j in range(self.slot_count(streamed)):
                plan.add(f"stream.slot{j}", self.slot_bytes(streamed), "weights")
            for j in range(STAGING_BUFFERS):
                plan.add(f"stream.staging{j}", self.staging_bytes(streamed), "scratch")
        kv_b = self.kv_layer_bytes()
        if shuttle and streamed:
            if resident:
                plan.add("kv", len(resident) * kv_b, "kv")
            for j in range(self.slot_count(streamed)):
                plan.add(f"stream.kvslot{j}", kv_b, "kv")
        else:
            plan.add("kv", self.L * kv_b, "kv")
        plan_buffers(plan, self.c, self.rows, self.hr)
        plan.add("scratch", self.scratch_b, "scratch")
        return plan

    def total(self, n_resident: int, shuttle: bool = False) -> int:
        return self.pool_plan(self.resident_for(n_resident), shuttle).total

    def bytes_per_pass(self, n_resident: int, shuttle: bool) -> int:
        """Bytes a forward pass streams at full context: streamed blocks, plus each shuttled
        layer's KV up and back (make_plan's measure)."""
        res = set(self.resident_for(n_resident))
        streamed = [i for i in range(self.L) if i not in res]
        kv = 2 * len(streamed) * self.kv_layer_bytes() if shuttle else 0
        return sum(self.layer_ls[i].nbytes for i in streamed) + kv

    def _most_resident(self, budget: int, shuttle: bool) -> int | None:
        """The most resident layers (< all) whose pool fits with this KV placement, or None."""
        for n in range(self.L - 1, -1, -1):
            if self.total(n, shuttle) <= budget:
                return n
        return None

    def choose(self, budget: int, shuttle: bool | None = None) -> tuple[tuple[int, ...], bool]:
        """(resident layers, KV shuttled?) whose exact pool fits `budget`. shuttle None: the
        placement streaming the fewest bytes per pass (KV in VRAM on a tie), so the shuttle when KV
        in VRAM does not fit; True/False force it. PlanError naming the minimum when nothing fits."""
        if self.total(self.L) <= budget:    # all resident: nothing streams, nothing is shuttled
            return self.resident_for(self.L), False
        options = []
        for sh in ((False, True) if shuttle is None else (bool(shuttle),)):
            n = self._most_resident(budget, sh)
            if n is not None:
                options.append((self.bytes_per_pass(n, sh), sh, n))
        if options:
            _, sh, n = min(options)
            return self.resident_for(n), sh
        sh = shuttle is not False
        low = self.pool_plan((), sh)
        kv = ("KV of streamed layers shuttled through pinned RAM" if sh else
              f"KV cache of {self.n_ctx} tokens in VRAM, the shuttle off")
        raise PlanError(f"VRAM budget {fmt_bytes(budget)} is below the streaming minimum "
                        f"{fmt_bytes(low.total)} ({low.report()}; {kv})")
