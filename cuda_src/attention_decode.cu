// attention_decode.cu: grouped-query attention for a few query rows (decode).
//
// KV cache, per layer: ck, cv fp16, slab (n_seq, Hkv, n_ctx, hd) or paged (num_blocks, Hkv, bs, hd)
// with bs = n_ctx (common.cuh kv_row) -- head-major, so one head's keys are one contiguous run per
// sequence or block (coalesced, and the layout of reference/ops.attention's (Hkv, S, D) k/v). Rows are
// written by rope.cu's rope_kv_store. Row t reads sequence seq[t] (null: 0): in the paged layout its
// block table is tables[seq[t] * max_blocks ...] (tables null: the slab layout).
// attn_decode_hd<HD>(q f32 (T, H, hd), ck, cv, pos, seq, tables, part_o f32 (T, H, n_split, hd),
//   part_ml f32 (T, H, n_split, 2), out f32 (T, H*hd), T, H, Hkv, n_ctx, max_blocks, n_split, min_chunk,
//   scale, window, softcap): flash-decoding. Rows are independent: a batch's decode rows of different
//   sequences and lengths go in one launch. Row t attends keys [lo, pos[t]] with lo = max(0, pos[t] + 1 -
//   window) (window 0: lo = 0) of its sequence; that range is cut into chunks of ceil(n / n_split)
//   keys rounded up to a multiple of min_chunk, so a short context uses few splits: `used` =
//   ceil(n / chunk) (dec_range below, the same formula in both kernels). Blocks of splits >= used exit
//   at once; when used == 1 the one block normalizes and writes `out` itself (no partials, and the
//   combine kernel skips the row). Grid (Hkv * ceil(G/8), n_split, T), G = H/Hkv: one block serves up
//   to 8 query heads of one kv head, so each K/V byte is read once per block. Block 128 threads; per
//   tile of 128 keys the K and V tiles are staged in dynamic shared memory (128 * (2*HD + 8) halves;
//   all loads in flight at once), then scores one key per thread (its K row dotted with the G
//   queries), an online softmax per head by one warp, then P.V with threads over (head, dim pair).
//   The grid depends on T and n_split only, never on the length (read from pos in device memory):
//   graph-safe.
// attn_combine(part_o, part_ml, out f32 (T, H*hd), pos, T*H, H, hd, n_split, min_chunk, window):
//   merges the used chunks' (m, l, o) of rows with used > 1: the split weights exp(m_s - M) / den go
//   through shared memory once, then each thread sums its dims over the used splits.
// Numpy reference: reference/ops.attention (softcap, then mask, then softmax; scores * scale).
#include "common.cuh"

#define DEC_TK 128
#define DEC_GMAX 8

// Keys of row t: [lo, len); chunk size and the number of splits that hold keys (>= 1, <= n_split).
struct DecRange {
    int lo, len, chunk, used;
};
__device__ __forceinline__ DecRange dec_range(const int* __restrict__ pos, int t, int n_split, int min_chunk,
                                              int window) {
    DecRange r;
    r.len = pos[t] + 1;
    r.lo = window > 0 ? max(0, r.len - window) : 0;
    const int n = r.len - r.lo;
    // ceil(n / n_split) rounded up to a multiple of min_chunk: a split's keys fill its 128-key tiles
    // (fewer, fuller splits measured faster than many partial ones: bench/NOTES_kernels.md)
    r.chunk = ((n + n_split - 1) / n_split + min_chunk - 1) / min_chunk * min_chunk;
    r.used = (n + r.chunk - 1) / r.chunk;
    return r;
}

template <int HD>
__device__ __forceinline__ void attn_decode_impl(const float* __restrict__ q, const u16* __restrict__ ck,
                                                 const u16* __restrict__ cv, const int* __restrict__ pos,
                                                 const int* __restrict__ seq, const int* __restrict__ tables,
                                                 float* __restrict__ part_o, float* __restrict__ part_ml,
                                                 float* __restrict__ out, int T, int H, int Hkv, int n_ctx,
                                                 int max_blocks, int n_split, int min_chunk,
                                                 float scale, int window, float softcap) {
    constexpr int NP = HD / 2;             // dim pairs
    constexpr int NGRP = DEC_TK / NP;      // thread groups in P.V (each owns heads g = grp + NGRP*i)
    constexpr int GPT = DEC_GMAX / NGRP;   // heads per thread in P.V
    __shared__ __align__(16) float qs[DEC_GMAX][HD];
    __shared__ float sc[DEC_GMAX][DEC_TK];
    __shared__ float mrun[DEC_GMAX], lrun[DEC_GMAX], corr[DEC_GMAX];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int G = H / Hkv, ngrp = (G + DEC_GMAX - 1) / DEC_GMAX;
    const int kvh = blockIdx.x / ngrp, g0 = (blockIdx.x - kvh * ngrp) * DEC_GMAX;
    const int gc = min(DEC_GMAX, G - g0);
    const int sp = blockIdx.y, t = blockIdx.z;
    const DecRange rg = dec_range(pos, t, n_split, min_chunk, window);
    if (sp >= rg.used) return;  // no keys for this split (uniform over the block)
    const int k0 = rg.lo + sp * rg.chunk, k1 = min(rg.len, k0 + rg.chunk);
    const int h0 = kvh * G + g0;  // first query head of this block
    const long sq = seq ? seq[t] : 0;
    const int* tab = tables ? tables + sq * max_blocks : nullptr;

    // q is loaded into registers now and stored to shared memory with the first K/V tile, so its
    // global latency overlaps the tile's instead of costing a round of its own
    constexpr int QPT = DEC_GMAX * HD / DEC_TK;  // q values per thread
    float qreg[QPT];
#pragma unroll
    for (int u = 0; u < QPT; ++u) {
        const int i = tid + u * DEC_TK, g = i / HD, d = i - g * HD;
        qreg[u] = g < gc ? q[((long)t * H + h0 + g) * HD + d] * scale : 0.f;
    }
    if (tid < DEC_GMAX) { mrun[tid] = NEG_INF; lrun[tid] = 0.f; }
    const int grp = tid / NP, dp = tid - grp * NP;
    float o[GPT][2];
#pragma unroll
    for (int i = 0; i < GPT; ++i) o[i][0] = o[i][1] = 0.f;

    extern __shared__ __align__(16) u16 kvs[];  // K tile (rows padded by 8 halves) then V tile
    u16* Ks = kvs;
    u16* Vs = kvs + DEC_TK * (HD + 8);
    for (int kt = k0; kt < k1; kt += DEC_TK) {
        const int nk = min(DEC_TK, k1 - kt);
        // stage the K and V tiles: 16 independent 16-byte loads in flight per thread
        constexpr int C8 = HD / 8, TOT = DEC_TK * C8;
        for (int base = tid; base < TOT; base += DEC_TK * 8) {
            uint4 kr[8], vr[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = base + u * DEC_TK, r = i / C8, c = i - r * C8;
                const bool ok = i < TOT && r < nk;
                const long row = ok ? kv_row(tab, sq, Hkv, kvh, n_ctx, kt + r) * HD : 0;
                kr[u] = ok ? __ldg(reinterpret_cast<const uint4*>(ck + row) + c) : make_uint4(0, 0, 0, 0);
                vr[u] = ok ? __ldg(reinterpret_cast<const uint4*>(cv + row) + c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = base + u * DEC_TK, r = i / C8, c = i - r * C8;
                if (i < TOT) {
                    *reinterpret_cast<uint4*>(Ks + r * (HD + 8) + 8 * c) = kr[u];
                    *reinterpret_cast<uint4*>(Vs + r * HD + 8 * c) = vr[u];
                }
            }
        }
        if (kt == k0) {
#pragma unroll
            for (int u = 0; u < QPT; ++u) {
                const int i = tid + u * DEC_TK;
                qs[i / HD][i % HD] = qreg[u];
            }
        }
        __syncthreads();
        // scores: thread tid <-> key kt + tid (padded rows: the 16-byte reads of 8 lanes hit distinct banks)
        float s[DEC_GMAX];
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) s[g] = 0.f;
        if (tid < nk) {
            const uint4* kr = reinterpret_cast<const uint4*>(Ks + tid * (HD + 8));
#pragma unroll 4
            for (int c = 0; c < HD / 8; ++c) {
                const uint4 kv = kr[c];
                const u32 wv[4] = {kv.x, kv.y, kv.z, kv.w};
                float kf[8];
#pragma unroll
                for (int e = 0; e < 4; ++e) { kf[2 * e] = h2f((u16)(wv[e] & 0xffffu)); kf[2 * e + 1] = h2f((u16)(wv[e] >> 16)); }
#pragma unroll
                for (int g = 0; g < DEC_GMAX; ++g) {
                    if (g < gc) {
                        const float4 qa = *reinterpret_cast<const float4*>(&qs[g][8 * c]);
                        const float4 qb = *reinterpret_cast<const float4*>(&qs[g][8 * c + 4]);
                        s[g] += kf[0] * qa.x + kf[1] * qa.y + kf[2] * qa.z + kf[3] * qa.w + kf[4] * qb.x +
                                kf[5] * qb.y + kf[6] * qb.z + kf[7] * qb.w;
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) {
            float v = s[g];
            if (softcap > 0.f) v = softcap * tanhf(v / softcap);
            sc[g][tid] = tid < nk ? v : NEG_INF;
        }
        __syncthreads();
        // online softmax: warp w updates heads w, w+4
        for (int g = warp; g < gc; g += DEC_TK / 32) {
            float v[DEC_TK / 32], mx = NEG_INF;
#pragma unroll
            for (int i = 0; i < DEC_TK / 32; ++i) { v[i] = sc[g][lane + 32 * i]; mx = fmaxf(mx, v[i]); }
            mx = warp_max(mx);  // finite: key kt < k1 is valid
            const float mold = mrun[g], mnew = fmaxf(mold, mx);
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < DEC_TK / 32; ++i) { float p = __expf(v[i] - mnew); sc[g][lane + 32 * i] = p; sum += p; }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float cr = __expf(mold - mnew);
                corr[g] = cr;
                lrun[g] = lrun[g] * cr + sum;
                mrun[g] = mnew;
            }
        }
        __syncthreads();
        // P.V: thread (grp, dp) accumulates dims 2dp, 2dp+1 of heads grp, grp + NGRP, ...
        if (grp < NGRP) {
#pragma unroll
            for (int i = 0; i < GPT; ++i) {
                const int g = grp + NGRP * i;
                if (g < gc) { const float cr = corr[g]; o[i][0] *= cr; o[i][1] *= cr; }
            }
            const u32* vr = reinterpret_cast<const u32*>(Vs) + dp;
#pragma unroll 4
            for (int jj = 0; jj < nk; ++jj) {
                const u32 vv = vr[jj * NP];
                const float va = h2f((u16)(vv & 0xffffu)), vbv = h2f((u16)(vv >> 16));
#pragma unroll
                for (int i = 0; i < GPT; ++i) {
                    const int g = grp + NGRP * i;
                    if (g < gc) { const float p = sc[g][jj]; o[i][0] += p * va; o[i][1] += p * vbv; }
                }
            }
        }
        __syncthreads();
    }
    if (rg.used == 1) {  // the whole range was this block's: finish the softmax here, no combine
        if (grp < NGRP) {
#pragma unroll
            for (int i = 0; i < GPT; ++i) {
                const int g = grp + NGRP * i;
                if (g < gc) {
                    const float l = lrun[g], inv = l > 0.f ? 1.f / l : 0.f;
                    float* po = out + ((long)t * H + h0 + g) * HD + 2 * dp;
                    po[0] = o[i][0] * inv;
                    po[1] = o[i][1] * inv;
                }
            }
        }
        return;
    }
    if (grp < NGRP) {
#pragma unroll
        for (int i = 0; i < GPT; ++i) {
            const int g = grp + NGRP * i;
            if (g < gc) {
                float* po = part_o + (((long)t * H + h0 + g) * n_split + sp) * HD + 2 * dp;
                po[0] = o[i][0];
                po[1] = o[i][1];
            }
        }
    }
    if (tid < gc) {
        float* pm = part_ml + (((long)t * H + h0 + tid) * n_split + sp) * 2;
        pm[0] = mrun[tid];
        pm[1] = lrun[tid];
    }
}

#define ATTN_DECODE_KERNEL(HD)                                                                          \
    extern "C" __global__ void __launch_bounds__(DEC_TK) attn_decode_hd##HD(                            \
        const float* q, const u16* ck, const u16* cv, const int* pos, const int* seq, const int* tables, \
        float* part_o, float* part_ml, float* out, int T, int H, int Hkv, int n_ctx, int max_blocks,     \
        int n_split, int min_chunk, float scale, int window, float softcap) {                           \
        attn_decode_impl<HD>(q, ck, cv, pos, seq, tables, part_o, part_ml, out, T, H, Hkv, n_ctx,       \
                             max_blocks, n_split, min_chunk, scale, window, softcap);                   \
    }
ATTN_DECODE_KERNEL(64)
ATTN_DECODE_KERNEL(128)
ATTN_DECODE_KERNEL(256)

#define DEC_MAX_SPLIT 64  // = cuda_layers.MAX_SPLITS

extern "C" __global__ void attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                        float* __restrict__ out, const int* __restrict__ pos, int rows, int H,
                                        int hd, int n_split, int min_chunk, int window) {
    __shared__ float wsp[DEC_MAX_SPLIT];
    __shared__ float red[32];
    const long r = blockIdx.x;  // = t * H + h
    if (r >= rows) return;
    const int used = dec_range(pos, (int)(r / H), n_split, min_chunk, window).used;
    if (used <= 1) return;  // the decode kernel wrote this row
    const float* ml = part_ml + r * n_split * 2;
    // every used split holds >= 1 key, so each m_s is finite
    const float m = (int)threadIdx.x < used ? ml[2 * threadIdx.x] : NEG_INF;
    const float l = (int)threadIdx.x < used ? ml[2 * threadIdx.x + 1] : 0.f;
    // block max, then block sum of exp(m_s - M) * l_s (threads >= used contribute 0)
    float M = warp_max(m);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = M;
    __syncthreads();
    M = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) M = fmaxf(M, red[w]);
    const float e = (int)threadIdx.x < used ? __expf(m - M) : 0.f;
    const float den = block_sum(e * l, red);
    const float inv = den > 0.f ? 1.f / den : 0.f;
    if ((int)threadIdx.x < used) wsp[threadIdx.x] = e * inv;
    __syncthreads();
    const float* po = part_o + r * n_split * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.f;
#pragma unroll 8
        for (int s = 0; s < used; ++s) num += wsp[s] * po[(long)s * hd + d];
        out[r * hd + d] = num;
    }
}
