"""Plan: where every byte lives, as a pure function of (manifest, model config, VRAM budget, settings).

    plan = make_plan(manifest, config, vram_budget, PlanSettings(n_ctx=4096))

VRAM holds, in this order of priority:
  1. what every step needs: the global tensors (embeddings, output head, final norm, rope factors)
     and the workspace (activations for one prefill chunk, the dequantization scratch of the largest
     matrix for tensor-core prefill, logits);
  2. the KV cache: all of it in VRAM, or, when that would cost more PCIe traffic than it saves, only
     the resident layers' KV, the streamed layers' KV living in pinned RAM and travelling up with its
     layer through `slots` KV slots ("KV shuttle");
  3. as many transformer blocks as fit ("resident"); the rest are "streamed" through `slots` (>= 3)
     device buffers of `slot_bytes` each, so that compute on one, the upload of the next and the disk
     read of the one after overlap.

Resident layers are spread evenly among the streamed ones rather than put first: while the GPU computes
a run of resident layers, the copy engine fills the slots for the streamed layers that follow, so
every streamed layer has about resident/streamed layers of compute to hide its upload behind.

Among the placements that fit, the plan picks the one that streams the fewest bytes per forward pass
at full context (weights plus shuttled KV). Budgets below the minimum (globals + workspace + one slot
set) raise PlanError, which states the minimum.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from aircupy.errors import AircupyError

GiB = 1 << 30
# Pinned host-to-device rate measured on the H100 host (ARCHITECTURE.md: 51-55 GB/s for 16-256 MB
# copies); only used to state the bound a plan implies. The engine replaces it by its own measurement.
DEFAULT_PCIE_GBPS = 53.0
_ALIGN = 256  # device allocations are carved from the pool at this alignment


class PlanError(AircupyError):
    """The VRAM budget cannot hold the minimum working set; the message states the minimum."""


@dataclass(frozen=True)
class PlanSettings:
    n_ctx: int = 4096             # KV cache length per sequence
    n_seq: int = 1                # sequences whose KV is kept
    prefill_chunk: int = 512      # tokens per forward pass when prefilling
    kv_elem_bytes: int = 2        # fp16 KV cache
    slots: int = 3                # streaming slots (>= 3: compute, upload, prefetch)
    pcie_gbps: float = DEFAULT_PCIE_GBPS
    host_ram_bytes: int | None = None   # RAM the RAM tier may pin (None: unknown, no RAM tier)


def _up(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


def kv_layer_bytes(config, s: PlanSettings) -> int:
    """K and V of one layer for n_seq sequences of n_ctx tokens."""
    per_tok = config.n_head_kv * (config.head_dim + config.head_dim_v) * s.kv_elem_bytes
    return _up(per_tok * s.n_ctx * s.n_seq)


def workspace_bytes(config, manifest, s: PlanSettings) -> int:
    """Activations for a prefill chunk of T tokens, the fp16 dequantization scratch of the largest
    weight matrix (prefill runs cuBLAS on it), the split-K partials of decode attention (prefill
    attention is tiled flash-style and keeps no score matrix) and the logits of the last position of
    each sequence.

    Per token (fp32): residual + normed input + attention output (3 x n_embd), q/k/v
    (n_head*head_dim + 2*n_head_kv*head_dim), gate/up/act (3 x n_ff). An estimate the pool checks
    against what it really carves: it errs high, never low.
    """
    c = config
    T = s.prefill_chunk
    per_tok = 4 * (3 * c.n_embd + c.n_head * c.head_dim + 2 * c.n_head_kv * c.head_dim + 3 * c.n_ff)
    largest = max((_elems(t.shape) for ch in manifest.layers for t in ch.tensors), default=0)
    split_partials = 4 * 8 * c.n_head * 64 * (c.head_dim + 2)   # 8 rows x 64 KV splits: (acc, max, sum)
    logits = 4 * c.vocab_size * s.n_seq
    return _up(T * per_tok) + _up(2 * largest) + _up(split_partials) + _up(logits)


def _elems(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _spread(n_layers: int, n_pick: int) -> list[int]:
    """n_pick layer indices spread evenly over range(n_layers)."""
    return sorted({int((k + 0.5) * n_layers / n_pick) for k in range(n_pick)}) if n_pick else []


def resident_set(n_layers: int, n_resident: int) -> list[int]:
    """The layers make_plan keeps resident when n_resident of n_layers fit (the streamed ones are
    spread evenly among them); the streaming model uses it to adjust the plan's count exactly."""
    picked = set(_spread(n_layers, n_layers - n_resident))
    return [i for i in range(n_layers) if i not in picked]


@dataclass(frozen=True)
class Plan:
    vram_budget: int
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    slots: int                    # 0 when nothing streams
    slot_bytes: int
    kv_placement: str             # "vram" | "shuttle"
    kv_layer_bytes: int
    kv_slot_bytes: int
    globals_bytes: int
    workspace_bytes: int
    vram_bytes: int               # planned peak: the pool size
    breakdown: dict               # vram_bytes by purpose
    bytes_streamed_per_pass: int  # at full context, KV shuttle included
    pcie_gbps: float
    pcie_bound_s: float           # bytes_streamed_per_pass / pcie rate
    host_pinned_bytes: int        # staging ring (+ RAM tier and shuttled KV when planned)
    ram_tier: bool
    windows: tuple[dict, ...] = field(default=())   # {layer, offset, nbytes} per layer

    @property
    def decode_bound_tok_s(self) -> float | None:
        """Batch-1 decode tokens/s the PCIe link allows (None when nothing streams)."""
        return 1.0 / self.pcie_bound_s if self.pcie_bound_s > 0 else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resident_layers"] = list(self.resident_layers)
        d["streamed_layers"] = list(self.streamed_layers)
        d["windows"] = list(self.windows)
        d["decode_bound_tok_s"] = self.decode_bound_tok_s
        return d


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def make_plan(manifest, config, vram_budget: int, settings: PlanSettings | None = None) -> Plan:
    s = settings or PlanSettings()
    if s.slots < 3:
        raise PlanError(f"streaming needs at least 3 slots (compute, upload, prefetch), got {s.slots}")
    L = manifest.n_layers
    layer_b = [_up(c.nbytes) for c in manifest.layers]
    globals_b = sum(_up(c.tensor_bytes) for c in manifest.globals)
    work_b = workspace_bytes(config, manifest, s)
    kv_b = kv_layer_bytes(config, s)
    slot_b = _up(manifest.max_layer_bytes)
    fixed = globals_b + work_b
    minimum = fixed + s.slots * (slot_b + kv_b)
    if vram_budget < minimum:
        raise PlanError(f"VRAM budget {_fmt(vram_budget)} is below the minimum {_fmt(minimum)} "
                        f"(globals {_fmt(globals_b)} + workspace {_fmt(work_b)} + {s.slots} slots of "
                        f"{_fmt(slot_b)} weights and {_fmt(kv_b)} KV)")

    # One candidate per KV placement: the most resident layers that fit with it.
    candidates = []
    for placement in ("vram", "shuttle"):
        for n_res in range(L, -1, -1):
            resident = resident_set(L, n_res)
            slots = s.slots if n_res < L else 0
            kv_vram = L * kv_b if placement == "vram" else (n_res + slots) * kv_b
            need = fixed + sum(layer_b[i] for i in resident) + slots * slot_b + kv_vram
            if need <= vram_budget:
                stream_b = sum(c.nbytes for c in manifest.layers) - sum(manifest.layers[i].nbytes
                                                                        for i in resident)
                if placement == "shuttle":
                    stream_b += 2 * (L - n_res) * kv_b    # up before its layer, back after it
                candidates.append((stream_b, placement, resident, slots, kv_vram, need))
                break
    # Fewest bytes per pass wins; on a tie KV in VRAM (no shuttle traffic to schedule).
    stream_b, placement, resident, slots, kv_vram, need = min(
        candidates, key=lambda c: (c[0], c[1] != "vram"))
    streamed = [i for i in range(L) if i not in resident]
    shuttled_kv = len(streamed) * kv_b if placement == "shuttle" else 0
    streamed_w = sum(manifest.layers[i].nbytes for i in streamed)
    ram_tier = s.host_ram_bytes is not None and streamed_w + shuttled_kv <= s.host_ram_bytes
    staging = slots * slot_b
    host_pinned = (streamed_w if ram_tier else staging) + shuttled_kv
    breakdown = {"globals": globals_b, "workspace": work_b,
                 "resident_layers": sum(layer_b[i] for i in resident),
                 "slots": slots * slot_b, "kv_cache": kv_vram}
    return Plan(
        vram_budget=vram_budget, resident_layers=tuple(resident), streamed_layers=tuple(streamed),
        slots=slots, slot_bytes=slot_b if slots else 0, kv_placement=placement, kv_layer_bytes=kv_b,
        kv_slot_bytes=kv_b if placement == "shuttle" else 0, globals_bytes=globals_b,
        workspace_bytes=work_b, vram_bytes=need, breakdown=breakdown,
        bytes_streamed_per_pass=stream_b, pcie_gbps=s.pcie_gbps,
        pcie_bound_s=stream_b / (s.pcie_gbps * 1e9), host_pinned_bytes=host_pinned, ram_tier=ram_tier,
        windows=tuple({"layer": c.layer, "offset": c.offset, "nbytes": c.nbytes} for c in manifest.layers),
    )
