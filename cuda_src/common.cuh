// common.cuh: helpers shared by every kernel file, and the ggml block formats in the REPACKED layout.
//
// Compiled by NVRTC (through cupy.RawModule) and by nvcc for local checks: no system headers, so the
// half/bfloat16 conversions are written in PTX / bit arithmetic here rather than taken from cuda_fp16.h.
//
// Repacked weight layout (aircupy/cuda/ops/packing.py is the host-side twin and the authority):
//   a tensor of n_rows x n_cols values of a quant type with nb = n_cols / BE blocks per row is stored
//   as [bodies: n_rows*nb*BODY bytes][pad to 16][heads: n_rows*nb*HEAD bytes]. The head is the block's
//   fp16 header (d; or d,m / d,dmin) moved out of the block; the body is the rest, in ggml byte order.
//   GGUF blocks of Q4_0 (18 B), Q8_0 (34), Q5_0 (22), Q3_K (110), Q6_K (210) are only 2-byte aligned;
//   after the split every body starts 4-byte aligned and Q4_0/Q4_1 (16 B), Q8_0 (32), Q2_K (80),
//   Q6_K (208) 16-byte aligned, so kernels use 16-byte vector loads. Q4_K (144 B) and Q5_K (176 B) are
//   aligned as they are and keep the raw GGUF layout (HEAD = 0: d/dmin are read from the body).
//
// Every format is a struct with the same static interface, so one templated kernel serves all types:
//   BE    values per block;   BODY / HEAD  bytes per block in the two regions
//   IPB   "items" per block: the unit one thread decodes at a time (32 or 64 values)
//   NSEG  16-value segments per item; seg_off(it, s) is segment s's first value within the block
//   Raw load(body, head, blk, it)  issues the global loads of item `it` of global block `blk` (the
//                                  raw bytes and scales, a few registers);
//   seg(raw, it, s, q, sc, mn)     decodes segment s of that item: q[16] are exact small integers (the
//                                  quants with the format's offset applied), and value j = sc*q[j] - mn.
//                                  HAS_MIN says whether mn can be nonzero.
//   (quant formats, INT_DOT) iseg(raw, it, s, w, sc, mn): the same segment as 4 words of 4 bytes q
//                                  (value j = sc*(q_j - QOFF) - mn), for the matvec's dp4a dot products.
// Splitting load from decode lets a kernel put several items' loads in flight before the arithmetic,
// and keeps only 16 decoded values live at a time (register pressure decides the occupancy).
// sc and mn are computed with ggml's order of float operations (d*sc, dmin*m, ...), so dequant_value()
// (__fmul_rn then __fsub_rn: no FMA contraction) matches aircupy/gguf/quants.py dequantize() bit for bit.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WARP 32
#define NEG_INF __int_as_float(0xff800000u)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(u16 b) { return __int_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {
    // round to nearest even; NaN stays NaN (quiet bit set)
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); `red` is >= 32 floats of shared memory.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : NEG_INF;
    return warp_max(v);
}

// Exact small-integer -> float: 0x4B000000 | q is the float 2^23 + q, so one FADD removes the bias.
// Cheaper than I2F (16/clk/SM on Hopper) in the hot decode loops.
__device__ __forceinline__ float u2f(u32 q) { return __int_as_float(0x4B000000u | q) - 8388608.f; }

__device__ __forceinline__ uint4 ld16(const u8* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ u32 ld4(const u8* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ u16 ld2(const u8* p) { return *reinterpret_cast<const u16*>(p); }
__device__ __forceinline__ u32 byte_of(const uint4& v, int i) {  // i compile-time after unrolling
    u32 w = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
    return (w >> (8 * (i & 3))) & 0xffu;
}
__device__ __forceinline__ u32 byte_of3(u32 a, u32 b, u32 c, int i) {  // 12 packed scale bytes
    u32 w = i < 4 ? a : i < 8 ? b : c;
    return (w >> (8 * (i & 3))) & 0xffu;
}

// 4 small unsigned bytes of w -> 4 floats, each byte - (bias - 2^23): PRMT builds the float 2^23 + byte
// (0x4B00_00bb) and one FADD removes the bias (and the format's zero offset): 2 instructions per value,
// where extract + I2F would cost more and I2F runs at 1/8 rate.
__device__ __forceinline__ void bytes4(u32 w, float bias, float* q) {
    q[0] = __int_as_float(__byte_perm(w, 0x4Bu, 0x4550u)) - bias;
    q[1] = __int_as_float(__byte_perm(w, 0x4Bu, 0x4551u)) - bias;
    q[2] = __int_as_float(__byte_perm(w, 0x4Bu, 0x4552u)) - bias;
    q[3] = __int_as_float(__byte_perm(w, 0x4Bu, 0x4553u)) - bias;
}
#define BIAS(off) (8388608.f + (float)(off))

// ---------------------------------------------------------------------------------------------
// Float formats: one "block" = 32 values (a row is a whole number of them: launchers check K % 32).
struct FmtF32 {
    static constexpr int BE = 32, BODY = 128, HEAD = 0, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = false, HAS_MIN = false;
    struct Raw { float4 v[8]; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8*, long blk, int) {
        Raw r;
        const float4* p = reinterpret_cast<const float4*>(body + blk * BODY);
#pragma unroll
        for (int i = 0; i < 8; ++i) r.v[i] = __ldg(p + i);
        return r;
    }
    __device__ static void seg(const Raw& r, int, int s, float (&w)[16], float& sc, float& mn) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float4 v = r.v[4 * s + i];
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
        sc = 1.f; mn = 0.f;
    }
};
template <bool BF>
struct FmtHalfT {
    static constexpr int BE = 32, BODY = 64, HEAD = 0, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = false, HAS_MIN = false;
    struct Raw { uint4 v[4]; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8*, long blk, int) {
        Raw r;
        const uint4* p = reinterpret_cast<const uint4*>(body + blk * BODY);
#pragma unroll
        for (int i = 0; i < 4; ++i) r.v[i] = __ldg(p + i);
        return r;
    }
    __device__ static void seg(const Raw& r, int, int s, float (&w)[16], float& sc, float& mn) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const uint4 v = r.v[2 * s + i];
            const u32 ws[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                u16 lo = (u16)(ws[j] & 0xffffu), hi = (u16)(ws[j] >> 16);
                w[8 * i + 2 * j] = BF ? bf2f(lo) : h2f(lo);
                w[8 * i + 2 * j + 1] = BF ? bf2f(hi) : h2f(hi);
            }
        }
        sc = 1.f; mn = 0.f;
    }
};
typedef FmtHalfT<false> FmtF16;
typedef FmtHalfT<true> FmtBF16;

// One dequantized value, rounded as ggml does: (sc * q) then - mn, two roundings.
__device__ __forceinline__ float dequant_value(float q, float sc, float mn) { return __fsub_rn(__fmul_rn(sc, q), mn); }

// KV-cache addressing shared by rope_kv_store and the attention kernels. Per layer, fp16, either
//   slab  (tab == null): (n_seq, Hkv, n_ctx, hd); sequence sq's key j at [sq, h, j, :]
//   paged (tab != null): (num_blocks, Hkv, bs, hd), bs = the kernels' n_ctx argument, a power of two;
//                        tab is the sequence's block table; key j at [tab[j / bs], h, j % bs, :]
// (the numpy twin: reference/paged_kv.py's slot = block * bs + offset, head-major within a block).
// Returns the row index; the caller multiplies by hd.
__device__ __forceinline__ long kv_row(const int* __restrict__ tab, long sq, int Hkv, int kvh, int n_ctx, int j) {
    if (!tab) return (sq * Hkv + kvh) * (long)n_ctx + j;
    const int sh = __ffs(n_ctx) - 1;
    return ((long)__ldg(tab + (j >> sh)) * Hkv + kvh) * (long)n_ctx + (j & (n_ctx - 1));
}
