// xquant.cuh: the decode matvec's 15-bit activation quantization, shared by matvec.cu (quantizing x
// while staging it in shared memory) and its producers that write x pre-quantized (elementwise.cu's
// glu_quant), so both give bit-identical planes.
//
// Per 32 consecutive values of a row (one "x block"), with s = amax/16256:  x ~= s * (128*h + l),
// h in [-127, 127], l in [-64, 64] (error <= amax/32512). A row of K values is stored as planes
//   xh: K int8 (h), xl: K int8 (l)  -- 16-value segment g at byte offset 16*xq_slot(g) + (v & 15)
//   xsc: K/32 float (s per x block), xqs: K/16 float (s * sum(128h + l) per segment: the zero-offset
//   and min terms of the dot products)
// xq_slot permutes segments inside aligned groups of 8 (128 bytes) so that every weight format's lane
// pattern reads 8 distinct 16-byte slots per wavefront (bank-conflict free). The permutation only moves
// bits 0-2 by bits 3-4, so a tile starting at a multiple of 512 values has the same layout as the row.
// Pre-quantized x in global memory (matvec xmode 2): per row m of M, at m * xq_row_nbytes(K):
//   [xh K][xl K][xsc K/32 f32][xqs K/16 f32]   (K a multiple of 512 keeps the floats 16-byte aligned)
#pragma once
#include "common.cuh"

__device__ __forceinline__ int xq_slot(int g) { return g ^ (3 * ((g >> 3) & 1)) ^ (4 * ((g >> 4) & 1)); }
__host__ __device__ __forceinline__ long xq_row_nbytes(int K) { return 2L * K + (K / 32) * 4L + (K / 16) * 4L; }

// Quantize xv = values [v, v+4) of one row (v % 4 == 0) and write them into the planes. The 8 lanes
// (lane & ~7 .. +7) hold one 32-value x block, 4 lanes one segment: every lane of the warp must call
// this together (shuffles); lanes with ok == false pass zeros and write nothing.
__device__ __forceinline__ void xq_put4(float4 xv, bool ok, int v, u8* xh, u8* xl, float* xsc, float* xqs) {
    float amax = fmaxf(fmaxf(fabsf(xv.x), fabsf(xv.y)), fmaxf(fabsf(xv.z), fabsf(xv.w)));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    const float s = amax * (1.f / 16256.f), inv = amax > 0.f ? 16256.f / amax : 0.f;
    const float e[4] = {xv.x, xv.y, xv.z, xv.w};
    u32 ph = 0, pl = 0;
    int isum = 0;
    // round to nearest with the 1.5*2^23 trick (F2I/I2F run at 1/8 of the FP32 rate):
    // |t| <= 16256, so h = rint(t/128) is in [-127, 127] and l = rint(t - 128h) in [-64, 64]
    const float RND = 12582912.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float t = e[j] * inv;
        const float hr = fmaf(t, 1.f / 128.f, RND);
        const float hf = hr - RND;                  // rint(t / 128), exact
        const float lr = fmaf(-128.f, hf, t) + RND;  // t - 128h is exact (|.| <= 64.5)
        const int hq = __float_as_int(hr) - 0x4B400000, lq = __float_as_int(lr) - 0x4B400000;
        ph |= (u32)(hq & 0xff) << (8 * j);
        pl |= (u32)(lq & 0xff) << (8 * j);
        isum += 128 * hq + lq;
    }
    isum += __shfl_xor_sync(0xffffffffu, isum, 1);  // 4 lanes = one 16-value segment
    isum += __shfl_xor_sync(0xffffffffu, isum, 2);
    if (ok) {
        const int so = (xq_slot(v >> 4) << 4) + (v & 15);
        *reinterpret_cast<u32*>(xh + so) = ph;
        *reinterpret_cast<u32*>(xl + so) = pl;
        if ((threadIdx.x & 3) == 0) xqs[v >> 4] = s * (float)isum;
        if ((threadIdx.x & 7) == 0) xsc[v >> 5] = s;
    }
}
