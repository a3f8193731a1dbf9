"""Placement of a streamed CUDA model: which layers stay resident, and the exact device pool that implies.

    sp = StreamPlacement(config, glob_l, layer_ls, tensors, n_ctx, rows, hr, n_slots, scratch_b)
    resident = sp.choose(budget, plan)      # plan = loader.plan.make_plan(...) for the same budget
    pool_plan = sp.pool_plan(resident)      # what DevicePool allocates; .total <= budget

make_plan (loader/plan.py) decides from the file's windows and an estimate of the workspace; the pool
holds packed blocks (a little larger than raw windows), the real activation buffers and scratch, and
the device staging buffer that repacks run from. So the plan's resident count is the starting point
and this module adjusts it against the exact pool arithmetic: more resident layers while they fit,
fewer while the pool exceeds the budget, always the plan's spread (loader.plan.resident_set).

Pool regions besides the resident model's (cuda_model.py): `stream.slot{j}` (weights, min(n_slots,
streamed layers) x the largest streamed block) and `stream.staging0`/`stream.staging1` (scratch: two
buffers of the largest raw tensor that needs a repack, used in turn: the copy stream DMAs the next
tensor into one while the repack stream repacks the other into its slot, so the copy engine never
waits for a repack; they cannot share the compute stream's scratch).
KV stays in VRAM for every layer (the plan's "vram" placement); the KV shuttle is not implemented.

Pure arithmetic, no cupy: tested on the CPU tier.
"""
from __future__ import annotations

from aircupy.device.pool import PoolPlan, fmt_bytes
from aircupy.loader.plan import PlanError, resident_set
from aircupy.model.cuda_buffers import plan_buffers
from aircupy.model.cuda_layout import raw_nbytes

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

        from aircupy.loader.arch import tensor_map
        from aircupy.model.cuda_buffers import scratch_nbytes
        from aircupy.model.cuda_forward import HEAD_ROWS
        from aircupy.model.cuda_layout import global_layout, layer_layout
        from aircupy.ops import cuda_ops as ops
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
        from aircupy.ops.packing import needs_repack
        need = [256]
        for i in streamed:
            for p in self.layer_ls[i].matrices():
                if needs_repack(p.ggml_type):
                    need += [raw_nbytes(self.tensors, name) for name, _ in p.sources]
        return max(need)

    def pool_plan(self, resident) -> PoolPlan:
        c, resident = self.c, set(resident)
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
        kv_layer = c.n_head_kv * self.n_ctx * c.head_dim * 2  # float16 bytes, one of k or v
        plan.add("kv", 2 * self.L * kv_layer, "kv")
        plan_buffers(plan, c, self.rows, self.hr)
        plan.add("scratch", self.scratch_b, "scratch")
        return plan

    def total(self, n_resident: int) -> int:
        return self.pool_plan(self.resident_for(n_resident)).total

    def choose(self, budget: int, plan=None) -> tuple[int, ...]:
        """The most resident layers (plan's spread) whose exact pool fits `budget`, searched from
        the plan's count; PlanError naming the minimum when not even all-streamed fits."""
        if self.total(self.L) <= budget:    # all resident (no slots, no staging: below total(L-1))
            return self.resident_for(self.L)
        n = len(plan.resident_layers) if plan is not None else 0
        n = min(n, self.L - 1)
        if self.total(n) <= budget:
            while n < self.L - 1 and self.total(n + 1) <= budget:
                n += 1
            return self.resident_for(n)
        while n > 0:
            n -= 1
            if self.total(n) <= budget:
                return self.resident_for(n)
        minimum = self.pool_plan(()).total
        raise PlanError(f"VRAM budget {fmt_bytes(budget)} is below the streaming minimum "
                        f"{fmt_bytes(minimum)} ({self.pool_plan(()).report()}; KV cache of "
                        f"{self.n_ctx} tokens in VRAM: the KV shuttle is not implemented)")
