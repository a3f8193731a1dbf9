// gemm_q.cu: prefill matmul on the tensor cores with the weight dequantization fused into the tile loader,
// out[m, n] (+)= sum_k x[m, k] * W[n, k] (+ bias[n]) for any M >= 1 (the alternative to dequant.cu's
// whole-tensor dequant into an fp16 scratch + cuBLAS GemmEx; ops/cuda_matmul.linear picks per shape).
//
// gemm_q_<type>_<h>_bm<BM>(body, head, x, out f32 (M, N), bias f32 (N,) or null, M, N, K, acc, xh, part)
//   type: the formats whose 32-value items tile a row in order (blocks.cuh: legacy q4_0 q4_1 q5_0 q5_1
//   q8_0, and q4_k q5_k, whose items 2g and 2g+1 cover values [64g, 64g+64) of a block); h: f16 | bf16,
//   the mma operand type (bf16 where activations may pass 65504). K % 32 == 0 (K % 256 for K-quants).
//   acc != 0 adds into out (residual epilogue), then bias is added: out = out + x W^T + bias.
//   x (M, K) row-major: fp32 (xh = 0, rounded to <h> while staged), or already <h> (xh = 1: u16 bits,
//   e.g. cast_half's output; half the bytes per re-read: x is read once per 128-column block).
// Split-K (part != null, grid z = splits > 1): split z runs K tiles [z*per, (z+1)*per), per =
//   ceil(ceil(K/64) / splits), and writes its plain sums to part f32 (splits, M, N) (a split with no
//   tile writes zeros); gemm_q_reduce then adds the splits in order (deterministic) with acc and bias:
//   out = (acc ? out : 0) + sum_z part[z] + bias. For few rows (a batch's decode rows) the grid of
//   ceil(N/128) blocks alone leaves most SMs idle.
// gemm_q_reduce(part, out, bias or null, M, N, splits, acc): one thread per output element.
// Launch geometry: grid (ceil(N / 128), ceil(M / BM), splits), block 256 threads = 8 warps, dynamic shared memory
//   gq_smem_bytes(BM) = 2 stages * (128 + BM) rows * 72 halves * 2 B (55 KB for BM 64, 74 KB for 128).
//   __launch_bounds__(256, 2): two blocks per SM (<= 128 registers; BM 128 alone would take ~168 and
//   run one block), so one block's dequant phase overlaps the other's mma phase (each block separates
//   them with its barrier). ptxas (CUDA 13): BM 64 111-123 registers, no spills; BM 128 capped at 128
//   with 0-24 bytes of spills on sm_90 (Q4_K the most), up to 56 (Q5_K) on sm_80. Unmeasured choice;
//   bench_kernels --gemm times BM 64 against 128.
//   Block (bx, by) owns the output tile rows [by*BM, +BM) x cols [bx*128, +128). Per 64-value K tile:
//   each thread loads one 32-value item of the 128 weight rows (row tid/2) and BM*64/256 values of x;
//   while the tensor cores work on the current stage (mma.sync m16n8k16, fp32 accumulate) those loads
//   are in flight, then the item is dequantized exactly as dequant.cu does (dequant_value, then round
//   to half: the same operands the cuBLAS path multiplies) and x rounded to half, into the other stage.
//   Warps are laid out (BM/32) x (8*32/BM): each owns a 32 x (128*BM/256) piece of the tile, fragments
//   through ldmatrix from rows padded to 72 halves (144 B: the 8 row addresses of a phase hit distinct
//   bank groups). Rows past M / N and values past K load as zeros and are never stored.
// mma.sync / ldmatrix / cvt.rn.bf16x2 exist on sm_80 and sm_90 alike (no Hopper-only instruction).
// Numpy reference: out = x @ quants.dequantize(raw, type, (N, K)).T (reference/ops.linear), with the
// operands rounded to fp16/bf16, as in the dequant + cuBLAS path.
#include "blocks.cuh"

#define GQ_BN 128
#define GQ_KT 64
#define GQ_LD (GQ_KT + 8)  // smem row stride in halves

__host__ __device__ constexpr int gq_smem_bytes(int bm) { return 2 * (GQ_BN + bm) * GQ_LD * 2; }

template <bool BF>
__device__ __forceinline__ u32 gq_pack2(float lo, float hi) {
    u32 r;
    if (BF) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <bool BF>
__device__ __forceinline__ void gq_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void gq_ldsm4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// One thread's share of a K tile, held in registers between the global loads and the smem stores.
template <class F, int BM>
struct GqStage {
    static constexpr int XV = BM * GQ_KT / 4 / 256;  // float4 of x per thread
    typename F::Raw w;
    float4 x[XV];
    bool w_ok;
};

template <class F, int BM>
__device__ __forceinline__ void gq_load(GqStage<F, BM>& st, const u8* __restrict__ body,
                                        const u8* __restrict__ head, const void* __restrict__ x, int xh,
                                        int M, int N, int K, int m0, int n0, int k0) {
    const int tid = threadIdx.x;
    const int row = n0 + (tid >> 1);
    const int q = (k0 >> 5) + (tid & 1);  // 32-value item of the row (items tile rows in order)
    st.w_ok = row < N && 32 * q < K;
    if (st.w_ok) {
        const int nb = K / F::BE;
        const int blk = q / F::IPB;
        st.w = F::load(body, head, (long)row * nb + blk, q - blk * F::IPB);
    }
#pragma unroll
    for (int u = 0; u < GqStage<F, BM>::XV; ++u) {
        const int i = tid + 256 * u;
        const int r = i >> 4, c = k0 + 4 * (i & 15);
        const bool ok = m0 + r < M && c < K;
        const long o = (long)(m0 + r) * K + c;
        if (xh) {  // 4 halves in the low 2 words
            const uint2 h = ok ? __ldg(reinterpret_cast<const uint2*>(static_cast<const u16*>(x) + o)) : make_uint2(0, 0);
            st.x[u] = make_float4(__uint_as_float(h.x), __uint_as_float(h.y), 0.f, 0.f);
        } else {
            st.x[u] = ok ? __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(x) + o))
                         : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
}

template <class F, int BM, bool BF>
__device__ __forceinline__ void gq_store(const GqStage<F, BM>& st, u16* ws, u16* xs, int xh, int k0) {
    const int tid = threadIdx.x;
    const int q = (k0 >> 5) + (tid & 1);
    const int blk = q / F::IPB, it = q - blk * F::IPB;
    u16* wr = ws + (tid >> 1) * GQ_LD;
#pragma unroll
    for (int s = 0; s < F::NSEG; ++s) {
        float v[16], sc, mn;
        F::seg(st.w, it, s, v, sc, mn);
        u32 pk[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
            pk[j] = st.w_ok ? gq_pack2<BF>(dequant_value(v[2 * j], sc, mn), dequant_value(v[2 * j + 1], sc, mn)) : 0u;
        uint4* o = reinterpret_cast<uint4*>(wr + blk * F::BE + F::seg_off(it, s) - k0);
        o[0] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
        o[1] = make_uint4(pk[4], pk[5], pk[6], pk[7]);
    }
#pragma unroll
    for (int u = 0; u < GqStage<F, BM>::XV; ++u) {
        const int i = tid + 256 * u;
        const float4 v = st.x[u];
        *reinterpret_cast<uint2*>(xs + (i >> 4) * GQ_LD + 4 * (i & 15)) =
            xh ? make_uint2(__float_as_uint(v.x), __float_as_uint(v.y))
               : make_uint2(gq_pack2<BF>(v.x, v.y), gq_pack2<BF>(v.z, v.w));
    }
}

template <class F, int BM, bool BF>
__device__ __forceinline__ void gemm_q_impl(const u8* __restrict__ body, const u8* __restrict__ head,
                                            const void* __restrict__ x, float* __restrict__ out,
                                            const float* __restrict__ bias, int M, int N, int K, int acc,
                                            int xh, float* __restrict__ part) {
    static_assert(F::IPB * 32 == F::BE && F::NSEG == 2, "items must be 32 consecutive-in-order values");
    static_assert(BM == 64 || BM == 128, "BM is 64 or 128");
    constexpr int WM = BM / 32, WN = 8 / WM;  // warp grid
    constexpr int WNC = GQ_BN / WN, NT = WNC / 8;  // columns and n-tiles of one warp
    extern __shared__ __align__(16) u16 gq_smem[];
    constexpr int STAGE = (GQ_BN + BM) * GQ_LD;  // halves per stage: W rows, then x rows
    const u32 sbase = (u32)__cvta_generic_to_shared(gq_smem);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp - wm * WN;
    const int n0 = blockIdx.x * GQ_BN, m0 = blockIdx.y * BM;
    const int nk_all = (K + GQ_KT - 1) / GQ_KT;
    const int per = (nk_all + gridDim.z - 1) / gridDim.z;
    const int kt0 = min(nk_all, (int)blockIdx.z * per), nk = min(nk_all, kt0 + per);

    float c[2][NT][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) c[i][j][0] = c[i][j][1] = c[i][j][2] = c[i][j][3] = 0.f;

    GqStage<F, BM> st;
    if (kt0 < nk) {
        gq_load<F, BM>(st, body, head, x, xh, M, N, K, m0, n0, kt0 * GQ_KT);
        gq_store<F, BM, BF>(st, gq_smem, gq_smem + GQ_BN * GQ_LD, xh, kt0 * GQ_KT);
    }
    __syncthreads();

    for (int kt = kt0; kt < nk; ++kt) {
        const int b = (kt - kt0) & 1;
        if (kt + 1 < nk) gq_load<F, BM>(st, body, head, x, xh, M, N, K, m0, n0, (kt + 1) * GQ_KT);
        const u32 wa = sbase + 2 * b * STAGE, xa = wa + 2 * GQ_BN * GQ_LD;
#pragma unroll
        for (int kk = 0; kk < GQ_KT / 16; ++kk) {
            u32 a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const int r = wm * 32 + mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                gq_ldsm4(xa + 2 * (r * GQ_LD + kk * 16 + 8 * (lane >> 4)), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b0, b1, b2, b3;  // n-tile 2np: (b0, b1); 2np + 1: (b2, b3)
                const int r = wn * WNC + np * 16 + (lane & 7) + 8 * (lane >> 4);
                gq_ldsm4(wa + 2 * (r * GQ_LD + kk * 16 + 8 * ((lane >> 3) & 1)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    gq_mma<BF>(c[mt][2 * np], a[mt], b0, b1);
                    gq_mma<BF>(c[mt][2 * np + 1], a[mt], b2, b3);
                }
            }
        }
        if (kt + 1 < nk) {
            u16* ws = gq_smem + (b ^ 1) * STAGE;
            gq_store<F, BM, BF>(st, ws, ws + GQ_BN * GQ_LD, xh, (kt + 1) * GQ_KT);
        }
        __syncthreads();  // stage b ^ 1 written; stage b free for the next iteration's store
    }

    // epilogue: accumulator e of tile (mt, nt) is row g (+8 for e >= 2), column 2*(lane%4) + (e & 1)
    const int g = lane >> 2, cq = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = m0 + wm * 32 + mt * 16 + g + 8 * (e >> 1);
                const int col = n0 + wn * WNC + nt * 8 + 2 * cq + (e & 1);
                if (r < M && col < N && part) {
                    part[((long)blockIdx.z * M + r) * N + col] = c[mt][nt][e];
                } else if (r < M && col < N) {
                    float* o = out + (long)r * N + col;
                    float v = c[mt][nt][e];
                    if (acc) v = *o + v;
                    if (bias) v += bias[col];
                    *o = v;
                }
            }
}

#define GEMM_Q_KERNEL(name, Fmt, hname, BF, BM)                                                        \
    extern "C" __global__ void __launch_bounds__(256, 2) gemm_q_##name##_##hname##_bm##BM(                \
        const u8* body, const u8* head, const void* x, float* out, const float* bias, int M, int N,     \
        int K, int acc, int xh, float* part) {                                                          \
        gemm_q_impl<Fmt, BM, BF>(body, head, x, out, bias, M, N, K, acc, xh, part);                     \
    }
#define GEMM_Q_KERNELS(name, Fmt)                                                                      \
    GEMM_Q_KERNEL(name, Fmt, f16, false, 64) GEMM_Q_KERNEL(name, Fmt, f16, false, 128)                \
    GEMM_Q_KERNEL(name, Fmt, bf16, true, 64) GEMM_Q_KERNEL(name, Fmt, bf16, true, 128)
// Keep in sync with GEMM_Q_FORMATS in aircupy/cuda/ops/cuda_matmul.py.
#define FOR_EACH_GEMM_Q_FORMAT(X) \
    X(q4_0, FmtQ4_0) X(q4_1, FmtQ4_1) X(q5_0, FmtQ5_0) X(q5_1, FmtQ5_1) X(q8_0, FmtQ8_0) X(q4_k, FmtQ4_K) \
    X(q5_k, FmtQ5_K)
FOR_EACH_GEMM_Q_FORMAT(GEMM_Q_KERNELS)

extern "C" __global__ void gemm_q_reduce(const float* __restrict__ part, float* __restrict__ out,
                                         const float* __restrict__ bias, int M, int N, int splits, int acc) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long mn = (long)M * N;
    if (i >= mn) return;
    float v = acc ? out[i] : 0.f;
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += part[z * mn + i];
    v += s;
    if (bias) v += bias[i % N];
    out[i] = v;
}
