// attention_prefill.cu: causal, tiled (flash-style) attention of many query rows on tensor cores.
//
// attn_prefill_hd<HD>(q f32 (T, H, HD), ck, cv fp16 slab or paged (attention_decode.cu's cache layouts,
//   common.cuh kv_row; this step's keys already stored by rope_kv_store), pos int32 (T,), seq int32 (T,)
//   or null, tables int32 (n_tables, max_blocks) or null (slab), out f32 (T, H*HD), T, H, Hkv, n_ctx,
//   max_blocks, scale, window, softcap)
// Row t attends cache keys j with j <= pos[t] and (window == 0 or pos[t] - j < window), so a prompt
// chunk continuing an existing cache is just rows with larger positions. Rows of one block must share
// one sequence (seq[t] of the block's first row is used): the launcher passes single-sequence prefill.
// Launch geometry: grid (ceil(T/64), H), block 128 = 4 warps, each warp owns 16 query rows. Per key
// tile of BK keys (64; 32 when HD = 256, for registers): K and V tiles go to shared memory (rows padded
// by 16 bytes: conflict-free ldmatrix), S = Q K^T with mma.sync m16n8k16 (fp16 in, fp32 accumulate),
// online softmax in fp32 on the accumulator fragments (exp2 domain), then O += P V with P converted in
// registers to the A operand and V read through ldmatrix.trans. mma.sync/ldmatrix exist on sm_80 and
// sm_90 alike (no Hopper-only instruction). Dynamic shared memory: (64 + 2*BK) * (HD + 8) * 2 bytes.
// Numpy reference: reference/ops.attention (scores * scale, softcap, mask, softmax; fp32 throughout:
// q, k, v and p are rounded to fp16 here, hence the tolerance in the tests).
#include "common.cuh"

#define PF_BQ 64

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32 addr, u32& r0, u32& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_t(u32 addr, u32& r0, u32& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}

template <int HD, int BK>
__device__ __forceinline__ void attn_prefill_impl(const float* __restrict__ q, const u16* __restrict__ ck,
                                                  const u16* __restrict__ cv, const int* __restrict__ pos,
                                                  const int* __restrict__ seq, const int* __restrict__ tables,
                                                  float* __restrict__ out, int T, int H, int Hkv, int n_ctx,
                                                  int max_blocks, float scale, int window,
                                                  float softcap) {
    constexpr int LD = HD + 8;  // smem row stride in halves (16-byte pad)
    extern __shared__ __align__(16) u16 smem[];
    u16* Qs = smem;
    u16* Ks = Qs + PF_BQ * LD;
    u16* Vs = Ks + BK * LD;
    __shared__ int pmin_s[4], pmax_s[4];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int q0 = blockIdx.x * PF_BQ, h = blockIdx.y;
    const int kvh = h / (H / Hkv);
    const long sq = seq ? seq[q0] : 0;
    const int* tab = tables ? tables + sq * max_blocks : nullptr;

    // Q tile -> fp16 shared memory (rows past T are zeros); key range of the block from its positions
    for (int i = tid; i < PF_BQ * HD / 2; i += blockDim.x) {
        const int r = i / (HD / 2), d2 = i - r * (HD / 2);
        float2 v = make_float2(0.f, 0.f);
        if (q0 + r < T) v = *reinterpret_cast<const float2*>(q + ((long)(q0 + r) * H + h) * HD + 2 * d2);
        *reinterpret_cast<u32*>(Qs + r * LD + 2 * d2) = pack_h2(v.x, v.y);
    }
    int pmn = 0x7fffffff, pmx = -1;
    for (int r = tid; r < PF_BQ; r += blockDim.x)
        if (q0 + r < T) { const int p = pos[q0 + r]; pmn = min(pmn, p); pmx = max(pmx, p); }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        pmn = min(pmn, __shfl_xor_sync(0xffffffffu, pmn, o));
        pmx = max(pmx, __shfl_xor_sync(0xffffffffu, pmx, o));
    }
    if (lane == 0) { pmin_s[warp] = pmn; pmax_s[warp] = pmx; }
    __syncthreads();
    pmn = min(min(pmin_s[0], pmin_s[1]), min(pmin_s[2], pmin_s[3]));
    pmx = max(max(pmax_s[0], pmax_s[1]), max(pmax_s[2], pmax_s[3]));
    const int klo = window > 0 ? max(0, pmn - window + 1) : 0, khi = pmx + 1;  // keys [klo, khi)

    // this thread's two rows (g and g + 8 of the warp's 16) and their positions
    const int ra = q0 + warp * 16 + g, rb = ra + 8;
    const int pa = ra < T ? pos[ra] : -1, pb = rb < T ? pos[rb] : -1;
    const float sl2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2 e)
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float O[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) O[n][0] = O[n][1] = O[n][2] = O[n][3] = 0.f;

    const u32 qs_base = (u32)__cvta_generic_to_shared(Qs), ks_base = (u32)__cvta_generic_to_shared(Ks),
              vs_base = (u32)__cvta_generic_to_shared(Vs);
    for (int kt = klo; kt < khi; kt += BK) {
        __syncthreads();  // previous tile fully consumed
        for (int i = tid; i < BK * HD / 8; i += blockDim.x) {
            const int r = i / (HD / 8), c8 = i - r * (HD / 8);
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (kt + r < khi) {
                const long row = kv_row(tab, sq, Hkv, kvh, n_ctx, kt + r) * HD;
                kv = __ldg(reinterpret_cast<const uint4*>(ck + row) + c8);
                vv = __ldg(reinterpret_cast<const uint4*>(cv + row) + c8);
            }
            *reinterpret_cast<uint4*>(Ks + r * LD + 8 * c8) = kv;
            *reinterpret_cast<uint4*>(Vs + r * LD + 8 * c8) = vv;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows x BK keys
        float S[BK / 8][4];
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) S[n][0] = S[n][1] = S[n][2] = S[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            u32 a0, a1, a2, a3;
            const int arow = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), acol = kk * 16 + 8 * (lane >> 4);
            ldsm_x4(qs_base + 2 * (arow * LD + acol), a0, a1, a2, a3);
#pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
                u32 b0, b1;
                const int brow = n * 8 + (lane & 7), bcol = kk * 16 + 8 * ((lane >> 3) & 1);
                ldsm_x2(ks_base + 2 * (brow * LD + bcol), b0, b1);
                mma16816(S[n], a0, a1, a2, a3, b0, b1);
            }
        }
        // scale, cap, mask, online softmax (rows a = g, b = g + 8; a quad of lanes shares a row)
        float mxa = NEG_INF, mxb = NEG_INF;
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = kt + n * 8 + 2 * c + (e & 1);
                const int p = e < 2 ? pa : pb;
                float s = S[n][e];
                if (softcap > 0.f) s = softcap * tanhf(s * scale / softcap) * 1.4426950408889634f;
                else s *= sl2;
                const bool ok = j < khi && j <= p && (window <= 0 || p - j < window);
                s = ok ? s : NEG_INF;
                S[n][e] = s;
                if (e < 2) mxa = fmaxf(mxa, s); else mxb = fmaxf(mxb, s);
            }
        }
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, o));
            mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, o));
        }
        const float mna = fmaxf(m_a, mxa), mnb = fmaxf(m_b, mxb);
        const float sha = mna == NEG_INF ? 0.f : mna, shb = mnb == NEG_INF ? 0.f : mnb;
        const float cra = exp2f(m_a - sha), crb = exp2f(m_b - shb);
        m_a = mna; m_b = mnb;
        l_a *= cra; l_b *= crb;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) { O[n][0] *= cra; O[n][1] *= cra; O[n][2] *= crb; O[n][3] *= crb; }
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
            S[n][0] = exp2f(S[n][0] - sha); S[n][1] = exp2f(S[n][1] - sha);
            S[n][2] = exp2f(S[n][2] - shb); S[n][3] = exp2f(S[n][3] - shb);
            l_a += S[n][0] + S[n][1];
            l_b += S[n][2] + S[n][3];
        }
        // O += P V: P's accumulator layout is the A-operand layout of the next mma (k = keys)
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            const u32 a0 = pack_h2(S[2 * ks][0], S[2 * ks][1]), a1 = pack_h2(S[2 * ks][2], S[2 * ks][3]);
            const u32 a2 = pack_h2(S[2 * ks + 1][0], S[2 * ks + 1][1]), a3 = pack_h2(S[2 * ks + 1][2], S[2 * ks + 1][3]);
            const int vrow = ks * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
            for (int n = 0; n < HD / 8; ++n) {
                u32 b0, b1;
                ldsm_x2_t(vs_base + 2 * (vrow * LD + n * 8), b0, b1);
                mma16816(O[n], a0, a1, a2, a3, b0, b1);
            }
        }
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, o);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, o);
    }
    const float ia = l_a > 0.f ? 1.f / l_a : 0.f, ib = l_b > 0.f ? 1.f / l_b : 0.f;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        if (ra < T) *reinterpret_cast<float2*>(out + ((long)ra * H + h) * HD + n * 8 + 2 * c) = make_float2(O[n][0] * ia, O[n][1] * ia);
        if (rb < T) *reinterpret_cast<float2*>(out + ((long)rb * H + h) * HD + n * 8 + 2 * c) = make_float2(O[n][2] * ib, O[n][3] * ib);
    }
}

#define ATTN_PREFILL_KERNEL(HD, BK)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) attn_prefill_hd##HD(                             \
        const float* q, const u16* ck, const u16* cv, const int* pos, const int* seq, const int* tables, \
        float* out, int T, int H, int Hkv, int n_ctx, int max_blocks, float scale, int window,         \
        float softcap) {                                                                               \
        attn_prefill_impl<HD, BK>(q, ck, cv, pos, seq, tables, out, T, H, Hkv, n_ctx, max_blocks, scale, \
                                  window, softcap);                                                    \
    }
ATTN_PREFILL_KERNEL(64, 64)
ATTN_PREFILL_KERNEL(128, 64)
ATTN_PREFILL_KERNEL(256, 32)
