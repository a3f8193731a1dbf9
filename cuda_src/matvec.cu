// matvec.cu: decode matmul, out[m, n] (+)= sum_k x[m, k] * W[n, k] (+ bias[n]), dequantizing W on the fly.
//
// Layout: W is (N, K) in the repacked layout of its ggml type (common.cuh / blocks.cuh); x is fp32
// (M, K) row-major, M = 1..8 activation rows (a decode batch); out fp32 (M, N); bias fp32 (N,)
// or null. accumulate != 0 adds into out (the residual-add epilogue of attn_output / ffn_down).
// Launch geometry: 8 warps (256 threads) per block and a grid of at most a few blocks per SM; block c
// owns rows [c*rpb, (c+1)*rpb) and its warps take them in turn (one warp per row at a time). Per K tile
// the block stages x in shared memory once for all its rows; each warp then streams its rows' items as
// one software-pipelined sequence (lane i decodes items i, i+32, ... of a row; the next U items are in
// flight while the current U are decoded, across row boundaries too), keeps M fp32 partial sums and
// reduces them with shuffles at the end of each row. Neighbouring lanes read neighbouring 16-byte
// pieces of a row, so each warp load is one contiguous span; each weight byte is read once per launch.
//
// Two dot-product paths (ncu showed the fp32 one issue-bound at ~1/3 of HBM bandwidth for 4-bit types):
//  * quant formats (INT_DOT): x is quantized while staged, per 32 values, to two int8 planes
//    x ~= s * (128*h + l) (s = amax/16256: 15-bit fixed point, error <= amax/32512), and each 16-value
//    segment takes 8 dp4a: sum q*x = s * (128*dot(q, h) + dot(q, l)), exact in int32. The format's
//    zero offset and min use the segment sum of the same quantized x, so the error is sum(w_j * e_j)
//    with |e_j| <= amax/32512: ~3e-5 relative, far below the weights' own quantization error.
//  * float formats: fp32 x in shared memory and fp32 FMAs.
// Numpy reference: out = x @ aircupy.gguf.quants.dequantize(raw, type, (N, K)).T  (reference/ops.linear).
#include "blocks.cuh"
#include "xquant.cuh"

#define MV_SMEM_BYTES 40960
// Values of x per tile: float path MR*KT = 8192 floats; int path MR*KT = 16384 (2 bytes each + scales).
template <class F, int MR>
__host__ __device__ constexpr int mv_kt() { return (F::INT_DOT ? 16384 : 8192) / MR; }

// Float path: each 32-value chunk keeps its 8 float4 slots, XOR-permuted by chunk-index bits, so the
// float4 reads of any 8 neighbouring lanes (one wavefront) hit 8 different slots (all 32 banks) for the
// float formats' item pattern (lane -> chunk).
__device__ __forceinline__ int mv_swz(int v) { return ((v >> 5) & 7) ^ ((v >> 7) & 1) ^ (((v >> 8) & 1) << 1); }
__device__ __forceinline__ int mv_xoff(int v) { return (v & ~31) | ((((v >> 2) & 7) ^ mv_swz(v)) << 2); }
// Int path: 16-value segment g is one 16-byte slot; slots XOR-permuted within 8-slot (128-byte) groups
// so that every format's lane pattern (legacy: lane -> block; Q4_K/Q5_K: 8 items of a block;
// Q2_K/Q3_K/Q6_K: 4 items of each of 2 blocks) reads 8 distinct slots per wavefront (xquant.cuh).
__device__ __forceinline__ int mv_slot(int g) { return xq_slot(g); }

template <class F, int MR>
__device__ __forceinline__ void item_float(const typename F::Raw& r, int b, int it, const float* xs,
                                           int M, float (&acc)[MR]) {
    constexpr int XS = mv_kt<F, MR>();
#pragma unroll
    for (int s = 0; s < F::NSEG; ++s) {
        float q[16], sc, mn;
        F::seg(r, it, s, q, sc, mn);
        const int v = b * F::BE + F::seg_off(it, s);
        const float* xc = xs + (v & ~31);
        const int sw = mv_swz(v), s0 = (v >> 2) & 7;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            if (m < M) {
                float a = 0.f;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float4 xv = *reinterpret_cast<const float4*>(xc + m * XS + (((s0 + j) ^ sw) << 2));
                    a = fmaf(q[4 * j], xv.x, a); a = fmaf(q[4 * j + 1], xv.y, a);
                    a = fmaf(q[4 * j + 2], xv.z, a); a = fmaf(q[4 * j + 3], xv.w, a);
                }
                acc[m] = fmaf(sc, a, acc[m]);  // float formats: sc = 1, mn = 0
            }
        }
    }
}

template <class F, int MR>
__device__ __forceinline__ void item_int(const typename F::Raw& r, int b, int it, const u8* xh, const u8* xl,
                                         const float* xsc, const float* xqs, int M, float (&acc)[MR]) {
    constexpr int KT = mv_kt<F, MR>();
#pragma unroll
    for (int s = 0; s < F::NSEG; ++s) {
        u32 w[4];
        float sc, mn;
        F::iseg(r, it, s, w, sc, mn);
        const int v = b * F::BE + F::seg_off(it, s), g = v >> 4, so = mv_slot(g) << 4;
        const float off = sc * (float)F::QOFF + mn;  // value = sc*q - off
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            if (m < M) {
                const uint4 h = *reinterpret_cast<const uint4*>(xh + m * KT + so);
                const uint4 l = *reinterpret_cast<const uint4*>(xl + m * KT + so);
                int dh = __dp4a((int)w[0], (int)h.x, 0), dl = __dp4a((int)w[0], (int)l.x, 0);
                dh = __dp4a((int)w[1], (int)h.y, dh); dl = __dp4a((int)w[1], (int)l.y, dl);
                dh = __dp4a((int)w[2], (int)h.z, dh); dl = __dp4a((int)w[2], (int)l.z, dl);
                dh = __dp4a((int)w[3], (int)h.w, dh); dl = __dp4a((int)w[3], (int)l.w, dl);
                const float f = xsc[m * (KT / 32) + (v >> 5)] * (float)(dh * 128 + dl);
                acc[m] = fmaf(sc, f, acc[m]);
                if (F::QOFF != 0 || F::HAS_MIN) acc[m] = fmaf(-off, xqs[m * (KT / 16) + g], acc[m]);
            }
        }
    }
}

// Items per lane per pipeline stage. Achieved bandwidth follows the bytes each lane has in flight
// (bench/NOTES_kernels.md: wide F16 items ran twice the rate of Q4_0's), so small items get more of them,
// as far as two stages of Raw registers allow 2 blocks of 256 threads per SM.
template <class F>
__host__ __device__ constexpr int mv_unroll() {
    return F::BE == 32 && sizeof(typename F::Raw) <= 20 ? 8   // Q4_0, Q4_1
         : F::BE == 32 && sizeof(typename F::Raw) <= 24 ? 6   // Q5_0, Q5_1
         : sizeof(typename F::Raw) <= 20 ? 6                  // Q2_K
         : sizeof(typename F::Raw) <= 36 ? 4                  // Q8_0, Q4_K
         : sizeof(typename F::Raw) <= 56 ? 3                  // Q3_K, Q5_K, Q6_K
         : sizeof(typename F::Raw) <= 64 ? 2 : 1;             // F16/BF16, F32
}

// Stage x[:, k0:k0+kt] (kt a multiple of 32): fp32 (float path) or quantized planes (int path).
// xmode 0: x fp32 (M, K) as is; 1: rms-normed on the way, x * xinv[m] * nw (the launch computed xinv);
// 2 (int path only): x is already quantized (xquant.cuh's global planes, M rows): a plain copy.
template <class F, int MR>
__device__ __forceinline__ void stage_x(const float* __restrict__ x, int K, int M, int k0, int kt, u8* sm,
                                        int xmode, const float* __restrict__ nw, const float* xinv) {
    constexpr int KT = mv_kt<F, MR>();
    if constexpr (F::INT_DOT) {
        if (xmode == 2) {
            const u8* xq = reinterpret_cast<const u8*>(x);
            const long rowb = xq_row_nbytes(K);
            const int n16 = kt >> 4;  // 16-byte pieces of one plane of one row
            for (int i = threadIdx.x; i < 2 * M * n16; i += blockDim.x) {
                const int pl = i / (M * n16), r = i - pl * M * n16, m = r / n16, c = r - m * n16;
                const uint4 w4 = __ldg(reinterpret_cast<const uint4*>(xq + m * rowb + (long)pl * K + k0) + c);
                *reinterpret_cast<uint4*>(sm + pl * MR * KT + m * KT + 16 * c) = w4;
            }
            float* xsc = reinterpret_cast<float*>(sm + 2 * MR * KT);
            float* xqs = xsc + MR * (KT / 32);
            const int n32 = kt >> 5, n16s = kt >> 4;
            for (int i = threadIdx.x; i < M * (n32 + n16s); i += blockDim.x) {
                const int m = i / (n32 + n16s), j = i - m * (n32 + n16s);
                const float* src = reinterpret_cast<const float*>(xq + m * rowb + 2L * K);  // xsc, then xqs
                if (j < n32) xsc[m * (KT / 32) + j] = __ldg(src + (k0 >> 5) + j);
                else xqs[m * (KT / 16) + j - n32] = __ldg(src + (K >> 5) + (k0 >> 4) + j - n32);
            }
            return;
        }
    }
    const int n4 = M * (kt >> 2);
    for (int i0 = 0; i0 < n4; i0 += blockDim.x) {  // uniform trip count: the shuffles below see full warps
        const int i = i0 + threadIdx.x;
        const bool ok = i < n4;
        const int m = ok ? i / (kt >> 2) : 0, v = ok ? (i - m * (kt >> 2)) << 2 : 0;
        float4 xv = ok ? __ldg(reinterpret_cast<const float4*>(x + (long)m * K + k0 + v)) : make_float4(0.f, 0.f, 0.f, 0.f);
        if (xmode == 1 && ok) {  // rms_norm's (x * inv) * w, in its order of operations
            const float inv = xinv[m];
            const float4 w4 = __ldg(reinterpret_cast<const float4*>(nw + k0 + v));
            xv = make_float4((xv.x * inv) * w4.x, (xv.y * inv) * w4.y, (xv.z * inv) * w4.z, (xv.w * inv) * w4.w);
        }
        if constexpr (!F::INT_DOT) {
            if (ok) *reinterpret_cast<float4*>(reinterpret_cast<float*>(sm) + m * KT + mv_xoff(v)) = xv;
        } else {
            float* xsc = reinterpret_cast<float*>(sm + 2 * MR * KT);
            xq_put4(xv, ok, v, sm + m * KT, sm + MR * KT + m * KT, xsc + m * (KT / 32), xsc + MR * (KT / 32) + m * (KT / 16));
        }
    }
}

// xinv[m] = 1 / sqrt(mean(x[m]^2) + eps) for the M rows (rms_norm's formula), into shared memory.
template <int MR>
__device__ __forceinline__ void row_inv_rms(const float* __restrict__ x, int K, int M, float eps, float* xinv,
                                            float* red) {
    for (int m = 0; m < M; ++m) {
        float ss = 0.f;
        for (int i = threadIdx.x; i < (K >> 2); i += blockDim.x) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(x + (long)m * K) + i);
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        ss = block_sum(ss, red);
        if (threadIdx.x == 0) xinv[m] = 1.f / sqrtf(ss / (float)K + eps);
    }
}

template <class F, int MR>
__device__ __forceinline__ void matvec_impl(const u8* __restrict__ body, const u8* __restrict__ head,
                                            const float* __restrict__ x, float* __restrict__ out,
                                            const float* __restrict__ bias, int N, int K, int M, int accumulate,
                                            const float* __restrict__ normw, float eps, int xmode) {
    constexpr int KT = mv_kt<F, MR>(), U = mv_unroll<F>();
    __shared__ __align__(16) u8 sm[MV_SMEM_BYTES];
    __shared__ float xinv[MR], red[32];
    // xmode bits 0-1: how x arrives (stage_x); bit 2: issue the loads of the first two pipeline steps
    // before staging x (both stages' latencies overlap the staging; matters when a warp has few steps)
    const int xm = xmode & 3;
    const bool pre2 = (xmode & 4) != 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int rpb = (N + gridDim.x - 1) / gridDim.x;  // rows of this block: [rb, re)
    const int rb = blockIdx.x * rpb, re = min(N, rb + rpb);
    const int nr = re - rb - warp > 0 ? (re - rb - warp + nw - 1) / nw : 0;  // rows of this warp
    const int nb = K / F::BE;
    float acc[MR];
    typename F::Raw ra[U], rb2[U];  // two pipeline stages (ping-pong: no register copies)
    for (int k0 = 0; k0 < K; k0 += KT) {
        const int kt = min(KT, K - k0);
        const int nitems = (kt / F::BE) * F::IPB;
        const int G = (nitems + U * WARP - 1) / (U * WARP);  // item groups per row
        const int total = nr * G;
        const long tb = k0 / F::BE;
        // step st = (row rb + warp + (st / G) * nw, item group st % G)
        auto load_step = [&](int st, typename F::Raw (&r)[U]) {
            const int row = rb + warp + (st / G) * nw, i0 = (st % G) * U * WARP + lane;
            const long bt = (long)row * nb + tb;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = i0 + u * WARP, b = i / F::IPB;
                if (i < nitems) r[u] = F::load(body, head, bt + b, i - b * F::IPB);
            }
        };
        auto run_step = [&](int st, const typename F::Raw (&r)[U]) {
            const int g = st % G, i0 = g * U * WARP + lane;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = i0 + u * WARP, b = i / F::IPB;
                if (i < nitems) {
                    if constexpr (F::INT_DOT) {
                        const float* xsc = reinterpret_cast<const float*>(sm + 2 * MR * KT);
                        item_int<F, MR>(r[u], b, i - b * F::IPB, sm, sm + MR * KT, xsc, xsc + MR * (KT / 32), M, acc);
                    } else {
                        item_float<F, MR>(r[u], b, i - b * F::IPB, reinterpret_cast<const float*>(sm), M, acc);
                    }
                }
            }
            if (g == G - 1) {  // row done: reduce, write (first tile: set or accumulate, + bias; later: add)
                const int row = rb + warp + (st / G) * nw;
#pragma unroll
                for (int m = 0; m < MR; ++m) {
                    if (m < M) {
                        float res = warp_sum(acc[m]);
                        acc[m] = 0.f;
                        if (lane == 0) {
                            float* o = out + (long)m * N + row;
                            if (k0 == 0) {
                                if (bias) res += bias[row];
                                *o = accumulate ? *o + res : res;
                            } else {
                                *o += res;
                            }
                        }
                    }
                }
            }
        };
        if (total > 0) load_step(0, ra);  // issued before staging: the two latencies overlap
        if (pre2 && total > 1) load_step(1, rb2);  // and the second stage too (short row ranges)
        if (xm == 1 && k0 == 0) row_inv_rms<MR>(x, K, M, eps, xinv, red);  // ends with a barrier read
        __syncthreads();                   // the previous tile is consumed (and xinv is visible)
        stage_x<F, MR>(x, K, M, k0, kt, sm, xm, normw, xinv);
        __syncthreads();
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[m] = 0.f;
        for (int st = 0; st < total; st += 2) {
            if (st + 1 < total && !(pre2 && st == 0)) load_step(st + 1, rb2);
            run_step(st, ra);
            if (st + 2 < total) load_step(st + 2, ra);
            if (st + 1 < total) run_step(st + 1, rb2);
        }
    }
}

// matvec_<type>_m<MR>: MR = 1, 2, 4, 8 bounds M (the launcher picks the smallest MR >= M): the x reads
// of all MR rows are unrolled, so the register count (and with it the occupancy) grows with MR.
#define MATVEC_KERNEL_MR(name, Fmt, MR)                                                               \
    extern "C" __global__ void __launch_bounds__(256) matvec_##name##_m##MR(                          \
        const u8* body, const u8* head, const float* x, float* out, const float* bias, int N, int K,  \
        int M, int accumulate, const float* nw, float eps, int xmode) {                               \
        matvec_impl<Fmt, MR>(body, head, x, out, bias, N, K, M, accumulate, nw, eps, xmode);          \
    }
#define MATVEC_KERNELS(name, Fmt) \
    MATVEC_KERNEL_MR(name, Fmt, 1) MATVEC_KERNEL_MR(name, Fmt, 2) MATVEC_KERNEL_MR(name, Fmt, 4) \
    MATVEC_KERNEL_MR(name, Fmt, 8)
FOR_EACH_FORMAT(MATVEC_KERNELS)
