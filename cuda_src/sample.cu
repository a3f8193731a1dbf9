// sample.cu: token selection on the device, one block of 1024 threads per row of logits, so only the
// chosen ids (int32) cross to the host.
//
// argmax_rows(logits f32 (B, V), out int32 (B,), V): lowest id among the maxima.
// apply_penalties(logits f32 (B, V) in place, ids int32 (B, P) (-1 = unused slot), bias f32 (B, P),
//   rep int32 (B, P), counts f32 (B, P), params f32 (B, 4) = [repeat_penalty, presence, frequency, -], V, P)
//   per entry, in engine/sampler.py's order: x += bias; if rep: x = x > 0 ? x / rp : x * rp;
//   if count > 0: x -= presence + frequency * count. Ids must be unique within a row. Grid B, block 128.
// sample_rows(logits f32 (B, V), params f32 (B, 4) = [temperature, top_k, top_p, min_p],
//   rng u32 (B, 2) = [seed, counter], out int32 (B,), V):
//   temperature <= 0: argmax. Else z = x / temperature and the candidates, in the sampler's order
//   (probability descending, ties by lower id), are cut by top-k (k > 0), then top-p over the top-k set
//   renormalised (smallest prefix whose mass reaches top_p), then min-p (z - max z >= log min_p); one
//   Gumbel-max draw picks argmax(z - zmax + g_i), g_i = -log(-log u_i) with u_i = hash(seed, counter, i)
//   (aircupy/cuda/ops/gumbel.py is its numpy twin): the same distribution as the numpy sampler's
//   inverse-CDF draw. The counter is incremented on the device, so a replayed CUDA graph draws fresh
//   noise each step. The cuts are found by radix selection on a 64-bit key (value bits, then ~id, so
//   every key is distinct and the key order is the sampler's order): 8 bits per pass over the row (it
//   stays in L2), stopping as soon as the selected bin holds the exact boundary.
#include "common.cuh"

#define SMP_THREADS 1024
#define SMP_HIST 8  // sub-histograms (4 warps each) to spread shared-memory atomics

__device__ __forceinline__ u32 ord_key(float z) {  // monotone float -> u32
    const u32 u = __float_as_uint(z);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ u64 key64(float z, int i) { return ((u64)ord_key(z) << 32) | (u64)(0xffffffffu - (u32)i); }

__device__ __forceinline__ float gumbel_u(u32 seed, u32 counter, u32 i) {
    u64 z = (((u64)seed << 32) | counter) + (u64)(i + 1u) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1), exact in fp32
}

// fn(i, x[i]) for this thread's share of the row, ids increasing per thread; 16-byte loads when the
// row allows (V % 4 == 0 keeps every row 16-byte aligned), unrolled so several loads are in flight.
template <class Fn>
__device__ __forceinline__ void for_row(const float* __restrict__ x, int V, Fn fn) {
    if ((V & 3) == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
        for (int i = threadIdx.x; i < (V >> 2); i += blockDim.x) {
            const float4 v = __ldg(x4 + i);
            fn(4 * i, v.x); fn(4 * i + 1, v.y); fn(4 * i + 2, v.z); fn(4 * i + 3, v.w);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) fn(i, __ldg(x + i));
    }
}

// Best (value, id) of the block: larger value, then lower id. Every thread gets the result.
__device__ __forceinline__ void block_argmax(float& v, int& id, float* rv, int* ri) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, id, o);
        if (v2 > v || (v2 == v && i2 < id)) { v = v2; id = i2; }
    }
    __syncthreads();
    if (lane == 0) { rv[w] = v; ri[w] = id; }
    __syncthreads();
    v = rv[lane]; id = ri[lane];  // blockDim == 1024: 32 warps
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, id, o);
        if (v2 > v || (v2 == v && i2 < id)) { v = v2; id = i2; }
    }
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS) argmax_rows(const float* __restrict__ logits, int* out, int V) {
    __shared__ float rv[32];
    __shared__ int ri[32];
    const float* x = logits + (long)blockIdx.x * V;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for_row(x, V, [&](int i, float v) { if (v > best) { best = v; bi = i; } });  // strict: lowest id wins
    block_argmax(best, bi, rv, ri);
    if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}

extern "C" __global__ void apply_penalties(float* logits, const int* __restrict__ ids, const float* __restrict__ bias,
                                           const int* __restrict__ rep, const float* __restrict__ counts,
                                           const float* __restrict__ params, int V, int P) {
    const int b = blockIdx.x;
    const float rp = params[4 * b], presence = params[4 * b + 1], freq = params[4 * b + 2];
    for (int e = threadIdx.x; e < P; e += blockDim.x) {
        const long k = (long)b * P + e;
        const int id = ids[k];
        if (id < 0 || id >= V) continue;
        float x = logits[(long)b * V + id] + bias[k];
        if (rep[k]) x = x > 0.f ? x / rp : x * rp;
        const float cnt = counts[k];
        if (cnt > 0.f) x -= presence + freq * cnt;
        logits[(long)b * V + id] = x;
    }
}

// One radix pass: histogram (count, and mass when mass_of) over digit (key >> shift) & 255 of the keys
// whose bits above shift+8 equal `prefix` (and that are >= floor64, the earlier cut). Returns in hc/hm.
__device__ void radix_pass(const float* __restrict__ x, int V, float inv_t, float zmax, u64 floor64, u64 prefix,
                           int shift, bool mass_of, u32 (*hc)[256], float (*hm)[256]) {
    const int sub = (threadIdx.x >> 5) % SMP_HIST;
    for (int i = threadIdx.x; i < SMP_HIST * 256; i += blockDim.x) { hc[i / 256][i % 256] = 0; hm[i / 256][i % 256] = 0.f; }
    __syncthreads();
    for_row(x, V, [&](int i, float xv) {
        const float z = xv * inv_t;
        const u64 k = key64(z, i);
        if (k < floor64 || (shift < 56 && (k >> (shift + 8)) != prefix)) return;
        const int d = (int)((k >> shift) & 255u);
        atomicAdd(&hc[sub][d], 1u);
        if (mass_of) atomicAdd(&hm[sub][d], __expf(z - zmax));
    });
    __syncthreads();
    for (int d = threadIdx.x; d < 256; d += blockDim.x) {  // fold the sub-histograms into [0]
        u32 c = 0; float m = 0.f;
        for (int s = 0; s < SMP_HIST; ++s) { c += hc[s][d]; m += hm[s][d]; }
        hc[0][d] = c; hm[0][d] = m;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS) sample_rows(const float* __restrict__ logits,
                                                                      const float* __restrict__ params, u32* rng,
                                                                      int* out, int V) {
    __shared__ float rv[32];
    __shared__ int ri[32];
    __shared__ u32 hc[SMP_HIST][256];
    __shared__ float hm[SMP_HIST][256];
    __shared__ u64 sel_s;
    const int b = blockIdx.x;
    const float* x = logits + (long)b * V;
    const float temp = params[4 * b], top_p = params[4 * b + 2], min_p = params[4 * b + 3];
    const int top_k = (int)params[4 * b + 1];

    float best = NEG_INF;
    int bi = 0x7fffffff;
    for_row(x, V, [&](int i, float v) { if (v > best) { best = v; bi = i; } });
    block_argmax(best, bi, rv, ri);
    if (!(temp > 0.f)) {
        if (threadIdx.x == 0) out[b] = bi == 0x7fffffff ? 0 : bi;
        return;
    }
    const float inv_t = 1.f / temp;
    const float zmax = best * inv_t;

    // top-k: cut = the k-th largest key; candidates are the keys >= cut
    u64 cut = 0;
    if (top_k > 0 && top_k < V) {
        u64 prefix = 0;
        u32 r = (u32)top_k;  // rank still to find among the keys matching prefix
        for (int shift = 56; shift >= 0; shift -= 8) {
            radix_pass(x, V, inv_t, zmax, 0, prefix, shift, false, hc, hm);
            if (threadIdx.x == 0) {
                u32 cum = 0;
                int d = 255;
                for (; d > 0; --d) { if (cum + hc[0][d] >= r) break; cum += hc[0][d]; }
                r -= cum;
                prefix = (prefix << 8) | (u64)d;
                ri[0] = (hc[0][d] == r || shift == 0);  // the whole bin is in: its lowest key is the cut
                ri[1] = (int)r;
                sel_s = prefix;
            }
            __syncthreads();
            prefix = sel_s;
            r = (u32)ri[1];
            const bool done = ri[0];
            __syncthreads();
            if (done) { cut = prefix << shift; break; }
        }
    }
    // top-p over the candidates: the key at which the cumulative mass first reaches top_p of their total
    if (top_p < 1.f) {
        float tot = 0.f;
        for_row(x, V, [&](int i, float xv) {
            const float z = xv * inv_t;
            if (key64(z, i) >= cut) tot += __expf(z - zmax);
        });
        tot = block_sum(tot, rv);
        float r = top_p * tot;  // mass still to cover within the keys matching prefix
        u64 prefix = 0;
        for (int shift = 56; shift >= 0; shift -= 8) {
            radix_pass(x, V, inv_t, zmax, cut, prefix, shift, true, hc, hm);
            if (threadIdx.x == 0) {
                float cum = 0.f;
                int d = 255, last = 0;
                for (; d >= 0; --d) {
                    if (hc[0][d] == 0) continue;
                    last = d;
                    if (cum + hm[0][d] >= r) break;
                    cum += hm[0][d];
                }
                if (d < 0) { d = last; cum -= hm[0][d]; }  // rounding left the target unreached: take all
                r -= cum;
                prefix = (prefix << 8) | (u64)d;
                ri[0] = (hc[0][d] <= 1u || shift == 0);  // one key left in the bin: it is the boundary
                sel_s = prefix;
                rv[0] = r;
            }
            __syncthreads();
            prefix = sel_s;
            r = rv[0];
            const bool done = ri[0];
            __syncthreads();
            if (done) {
                const u64 c2 = prefix << shift;
                if (c2 > cut) cut = c2;
                break;
            }
        }
    }
    // Gumbel-max over the surviving candidates
    const float lmin = min_p > 0.f ? logf(min_p) : NEG_INF;
    const u32 seed = rng[2 * b], counter = rng[2 * b + 1];
    float gb = NEG_INF;
    int gi = 0x7fffffff;
    for_row(x, V, [&](int i, float xv) {
        const float z = xv * inv_t;
        if (key64(z, i) < cut || z - zmax < lmin) return;
        const float s = (z - zmax) - logf(-logf(gumbel_u(seed, counter, (u32)i)));
        if (s > gb) { gb = s; gi = i; }
    });
    block_argmax(gb, gi, rv, ri);
    if (threadIdx.x == 0) {
        out[b] = gi == 0x7fffffff ? bi : gi;
        rng[2 * b + 1] = counter + 1u;
    }
}
