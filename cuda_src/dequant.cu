// dequant.cu: whole-tensor dequantization to fp16/bf16 (the prefill GEMM's weight operand), embedding
// row gather with dequantization, fp32 -> fp16/bf16 activation casts, and the GGUF -> repacked layout
// conversion.
//
// dequant_<type>(body, head, out u16 (N, K), N, K, bf): one thread per item (32 or 64 values of one
//   block), grid ceil(N*K/item_values / 256) x 256 threads; writes fp16 (bf = 0) or bf16 (bf = 1).
//   Reference: quants.dequantize(raw, type, (N, K)).astype(float16 | bfloat16).
// get_rows_<type>(body, head, ids int32 (T,), out f32 (T, K), T, K, V, scale): one block of 128
//   threads per token; out[t] = dequantize(row ids[t]) * scale (gemma's sqrt(n_embd)); an id outside
//   [0, V) yields a NaN row (the host validates ids; NaN makes a slip visible instead of reading
//   another tensor). Reference: reference/ops.embedding(...) * scale.
// cast_half(x f32 (n,), out u16 (n,), n, bf): elementwise round-to-nearest-even.
// repack_blocks(src u16 raw blocks, body, head, n_blocks, BB, head_off, HB): one thread per 16-bit
//   word of the raw tensor; moves the block's header words [head_off, head_off + HB) to the head region
//   and the rest to the body region. Reference: aircupy/cuda/ops/packing.repack_numpy.
#include "blocks.cuh"

template <class F>
__device__ __forceinline__ void dequant_impl(const u8* __restrict__ body, const u8* __restrict__ head,
                                             u16* __restrict__ out, int N, int K, int bf) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int nb = K / F::BE;
    if (i >= (long)N * nb * F::IPB) return;
    const long blk = i / F::IPB;
    const int it = (int)(i - blk * F::IPB);
    const long row = blk / nb;
    const int b = (int)(blk - row * nb);
    const typename F::Raw r = F::load(body, head, blk, it);
#pragma unroll
    for (int s = 0; s < F::NSEG; ++s) {
        float w[16], sc, mn;
        F::seg(r, it, s, w, sc, mn);
#pragma unroll
        for (int j = 0; j < 16; ++j) w[j] = dequant_value(w[j], sc, mn);
        u32 pk[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            u32 lo = bf ? f2bf(w[2 * j]) : f2h(w[2 * j]);
            u32 hi = bf ? f2bf(w[2 * j + 1]) : f2h(w[2 * j + 1]);
            pk[j] = lo | (hi << 16);
        }
        uint4* o = reinterpret_cast<uint4*>(out + row * K + (long)b * F::BE + F::seg_off(it, s));
        o[0] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
        o[1] = make_uint4(pk[4], pk[5], pk[6], pk[7]);
    }
}

template <class F>
__device__ __forceinline__ void get_rows_impl(const u8* __restrict__ body, const u8* __restrict__ head,
                                              const int* __restrict__ ids, float* __restrict__ out,
                                              int T, int K, int V, float scale) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int id = ids[t];
    const int nb = K / F::BE;
    float* o = out + (long)t * K;
    if (id < 0 || id >= V) {
        for (int k = threadIdx.x; k < K; k += blockDim.x) o[k] = __int_as_float(0x7fc00000);
        return;
    }
    for (int i = threadIdx.x; i < nb * F::IPB; i += blockDim.x) {
        const int b = i / F::IPB, it = i - b * F::IPB;
        const typename F::Raw r = F::load(body, head, (long)id * nb + b, it);
#pragma unroll
        for (int s = 0; s < F::NSEG; ++s) {
            float w[16], sc, mn;
            F::seg(r, it, s, w, sc, mn);
#pragma unroll
            for (int j = 0; j < 16; ++j) w[j] = dequant_value(w[j], sc, mn);
            float4* op = reinterpret_cast<float4*>(o + b * F::BE + F::seg_off(it, s));
#pragma unroll
            for (int j = 0; j < 4; ++j)
                op[j] = make_float4(w[4 * j] * scale, w[4 * j + 1] * scale, w[4 * j + 2] * scale,
                                    w[4 * j + 3] * scale);
        }
    }
}

#define DEQUANT_KERNELS(name, Fmt)                                                                    \
    extern "C" __global__ void dequant_##name(const u8* body, const u8* head, u16* out, int N, int K,  \
                                              int bf) {                                               \
        dequant_impl<Fmt>(body, head, out, N, K, bf);                                                 \
    }                                                                                                 \
    extern "C" __global__ void get_rows_##name(const u8* body, const u8* head, const int* ids,          \
                                               float* out, int T, int K, int V, float scale) {        \
        get_rows_impl<Fmt>(body, head, ids, out, T, K, V, scale);                                     \
    }
FOR_EACH_FORMAT(DEQUANT_KERNELS)

extern "C" __global__ void cast_half(const float* __restrict__ x, u16* __restrict__ out, long n, int bf) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf ? f2bf(x[i]) : f2h(x[i]);
}

extern "C" __global__ void repack_blocks(const u16* __restrict__ src, u8* __restrict__ body,
                                         u8* __restrict__ head, long n_blocks, int BB, int head_off, int HB) {
    const long w = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int wpb = BB >> 1;
    if (w >= n_blocks * wpb) return;
    const long blk = w / wpb;
    const int o = 2 * (int)(w - blk * wpb);
    const u16 v = src[w];
    if (o >= head_off && o < head_off + HB)
        *reinterpret_cast<u16*>(head + blk * HB + (o - head_off)) = v;
    else
        *reinterpret_cast<u16*>(body + blk * (BB - HB) + (o < head_off ? o : o - HB)) = v;
}
