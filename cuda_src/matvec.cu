// matvec.cu: decode matmul, out[m, n] (+)= sum_k x[m, k] * W[n, k] (+ bias[n]), dequantizing W on the fly.
//
// Layout: W is (N, K) in the repacked layout of its ggml type (common.cuh / blocks.cuh); x is fp32
// (M, K) row-major, M = 1..8 activation rows (a decode batch); out fp32 (M, N); bias fp32 (N,)
// or null. accumulate != 0 adds into out (the residual-add epilogue of attn_output / ffn_down).
// Launch geometry: one warp per output row n, 4 warps (128 threads) per block, grid ceil(N / 4). Lane
// i decodes items i, i+32, ... of its row (an item = 32 or 64 values of one block; neighbouring lanes
// read neighbouring 16-byte pieces, so each warp load is one contiguous, coalesced span), keeps M fp32
// partial sums, and the warp reduces them with shuffles. Each weight byte is read from HBM once per
// launch whatever M is; x comes from L1/L2.
// Numpy reference: out = x @ aircupy.gguf.quants.dequantize(raw, type, (N, K)).T  (ops/reference.linear).
#include "blocks.cuh"

// acc[m] += <item `it` of block b, x row m> for m < M; one 16-value segment decoded at a time.
template <class F, int MR>
__device__ __forceinline__ void matvec_item(const typename F::Raw& r, int b, int it, const float* __restrict__ x,
                                            int K, int M, float (&acc)[MR]) {
#pragma unroll
    for (int s = 0; s < F::NSEG; ++s) {
        float w[16];
        F::seg(r, it, s, w);
        const float* xs = x + (long)b * F::BE + F::seg_off(it, s);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            if (m < M) {
                const float4* xp = reinterpret_cast<const float4*>(xs + (long)m * K);
                float a = 0.f;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float4 v = __ldg(xp + j);
                    a = fmaf(w[4 * j], v.x, a); a = fmaf(w[4 * j + 1], v.y, a);
                    a = fmaf(w[4 * j + 2], v.z, a); a = fmaf(w[4 * j + 3], v.w, a);
                }
                acc[m] += a;
            }
        }
    }
}

template <class F, int MR>
__device__ __forceinline__ void matvec_impl(const u8* __restrict__ body, const u8* __restrict__ head,
                                            const float* __restrict__ x, float* __restrict__ out,
                                            const float* __restrict__ bias, int N, int K, int M,
                                            int accumulate) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;
    const int nb = K / F::BE;
    const int nitems = nb * F::IPB;
    const long blk0 = (long)row * nb;
    float acc[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[m] = 0.f;
    // Two items per lane per trip, both loads issued before either is decoded: more bytes in flight.
    for (int i = lane; i < nitems; i += 2 * WARP) {
        const int i1 = i + WARP;
        const int b0 = i / F::IPB, it0 = i - b0 * F::IPB;
        const int b1 = i1 / F::IPB, it1 = i1 - b1 * F::IPB;
        const typename F::Raw r0 = F::load(body, head, blk0 + b0, it0);
        typename F::Raw r1;
        if (i1 < nitems) r1 = F::load(body, head, blk0 + b1, it1);
        matvec_item<F, MR>(r0, b0, it0, x, K, M, acc);
        if (i1 < nitems) matvec_item<F, MR>(r1, b1, it1, x, K, M, acc);
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
        if (m < M) {
            float r = warp_sum(acc[m]);
            if (lane == 0) {
                if (bias) r += bias[row];
                float* o = out + (long)m * N + row;
                *o = accumulate ? *o + r : r;
            }
        }
    }
}

// matvec_<type>_m<MR>: MR = 1, 2, 4, 8 bounds M (the launcher picks the smallest MR >= M): the x loads
// of all MR rows are unrolled, so the register count (and with it the occupancy) grows with MR.
#define MATVEC_KERNEL_MR(name, Fmt, MR)                                                               \
    extern "C" __global__ void __launch_bounds__(128) matvec_##name##_m##MR(                          \
        const u8* body, const u8* head, const float* x, float* out, const float* bias, int N, int K,  \
        int M, int accumulate) {                                                                      \
        matvec_impl<Fmt, MR>(body, head, x, out, bias, N, K, M, accumulate);                          \
    }
#define MATVEC_KERNELS(name, Fmt) \
    MATVEC_KERNEL_MR(name, Fmt, 1) MATVEC_KERNEL_MR(name, Fmt, 2) MATVEC_KERNEL_MR(name, Fmt, 4) \
    MATVEC_KERNEL_MR(name, Fmt, 8)
FOR_EACH_FORMAT(MATVEC_KERNELS)
