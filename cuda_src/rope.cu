// rope.cu: rotary position embedding of q and k fused with the KV-cache store, one launch per layer.
//
// The rotation (rope args: rope_dim, base, freq_scale, freq_factors f32 (rope_dim/2,) or null,
//      ext_factor, corr_low, corr_high, mscale, neox):
// Pair i (i < rope_dim/2) of every head rotates by theta_i(pos):
//   extrap = pos * base^(-2i/rope_dim) / freq_factors[i];  interp = freq_scale * extrap
//   mix = ext_factor * (1 - clip((i - corr_low) / max(0.001, corr_high - corr_low), 0, 1))
//   theta = interp * (1 - mix) + extrap * mix       (ext_factor 0: plain / linear scaling)
//   (a, b) -> (a cos - b sin, a sin + b cos) * mscale
// "norm" (neox = 0, llama.cpp's llama layout): pair i = dims (2i, 2i+1); "neox": (i, i + rope_dim/2).
// Dims >= rope_dim are left alone. Angles and their sin/cos are computed in double, like the reference
// (pos * inv_freq loses ~1e-4 rad in fp32 at position 1000), then rounded to fp32 (base^x as
// exp2(x log2 base)). theta depends on
// (t, i) only: each block computes its row's rope_dim/2 (cos, sin) pairs once into shared memory (one
// double pow + sincos per pair, in parallel) and every head reuses them (the per-(head, pair) double
// math cost one decode block ~20 serial pow+sincos per thread).
// Launch geometry: grid (T), block 256 (the launcher's); threads stride over H * rope_dim/2 pairs.
// Positions are read from device memory, so a captured CUDA graph stays valid as they change.
//
// rope_kv_store(q f32 (T, H, hd), k f32 (T, Hkv, hd), v f32 (T, Hkv, hd), ck, cv fp16, pos, seq int32
//   (T,) or null, slots int32 (T,) or null, T, H, Hkv, hd, n_ctx, <rope args as above>): rotates q and k
//   in place (the rotation above), then stores the rotated k and v of row t into the fp16 caches:
//   slots null: slab (n_seq, Hkv, n_ctx, hd) at [seq[t], :, pos[t], :];
//   slots given: paged (num_blocks, Hkv, bs, hd), bs = n_ctx (a power of two), at block slots[t] / bs,
//   offset slots[t] % bs (common.cuh kv_row); a negative slot stores nothing (a padding row).
//   One launch instead of three per layer.
// Numpy reference: reference/ops.rope_angles + apply_rope; reference.rope_kv_store for the fusion.
#include "common.cuh"

#define ROPE_MAX_HALF 128  // rope_dim <= 256

struct RopeArgs {
    int rope_dim;
    float base, freq_scale;
    const float* freq_factors;
    float ext_factor, corr_low, corr_high, mscale;
};

// cs[0][i], cs[1][i] = (cos, sin)(theta_i(p)) * mscale for i < rope_dim/2; ends with a block barrier.
__device__ __forceinline__ void rope_table(const RopeArgs& a, int p_int, float (*cs)[ROPE_MAX_HALF]) {
    const int half = a.rope_dim >> 1;
    const double p = (double)p_int;
    const double lb = log2((double)a.base);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        // base^(-2i/rope_dim) as exp2 (double pow is several times slower; the two differ by ~1e-15
        // relative, i.e. ~1e-10 rad at position 1e5, far below the fp32 result's rounding)
        double inv = exp2(-2.0 * i / (double)a.rope_dim * lb);
        if (a.freq_factors) inv /= (double)a.freq_factors[i];
        const double extrap = p * inv;
        const double interp = (double)a.freq_scale * extrap;
        double ramp = ((double)i - (double)a.corr_low) / fmax(0.001, (double)(a.corr_high - a.corr_low));
        ramp = 1.0 - fmin(fmax(ramp, 0.0), 1.0);
        const double mix = ramp * (double)a.ext_factor;
        const double theta = interp * (1.0 - mix) + extrap * mix;
        double sd, cd;
        sincos(theta, &sd, &cd);
        cs[0][i] = (float)(cd * (double)a.mscale);
        cs[1][i] = (float)(sd * (double)a.mscale);
    }
    __syncthreads();
}

// Rotate every pair of heads [0, H1) of x1 and [0, H2) of x2 (row t's heads; x2 may be null). Each
// thread loads ROPE_B pairs before it stores any: x1/x2 may alias as far as the compiler knows, so a
// plain loop would wait one memory round trip per pair.
#define ROPE_B 4
__device__ __forceinline__ void rope_rotate(float* x1, int H1, float* x2, int H2, int hd, int half, int neox,
                                            const float (*cs)[ROPE_MAX_HALF]) {
    const int total = (H1 + H2) * half;
    for (int k0 = 0; k0 < total; k0 += ROPE_B * blockDim.x) {
        float a[ROPE_B], b[ROPE_B];
        float* pa[ROPE_B];
        int off[ROPE_B], ii[ROPE_B];
#pragma unroll
        for (int u = 0; u < ROPE_B; ++u) {
            const int kk = k0 + u * blockDim.x + threadIdx.x;
            pa[u] = nullptr;
            if (kk < total) {
                const int h = kk / half, i = kk - h * half;
                float* xh = h < H1 ? x1 + (long)h * hd : x2 + (long)(h - H1) * hd;
                const int ia = neox ? i : 2 * i;
                off[u] = neox ? half : 1;  // ib - ia
                ii[u] = i;
                pa[u] = xh + ia;
                a[u] = pa[u][0];
                b[u] = pa[u][off[u]];
            }
        }
#pragma unroll
        for (int u = 0; u < ROPE_B; ++u) {
            if (pa[u]) {
                const float c = cs[0][ii[u]], s = cs[1][ii[u]];
                pa[u][0] = a[u] * c - b[u] * s;
                pa[u][off[u]] = a[u] * s + b[u] * c;
            }
        }
    }
}

extern "C" __global__ void rope_kv_store(float* q, float* k, const float* __restrict__ v, u16* ck, u16* cv,
                                         const int* __restrict__ pos, const int* __restrict__ seq,
                                         const int* __restrict__ slots, int T, int H,
                                         int Hkv, int hd, int n_ctx, int rope_dim, float base, float freq_scale,
                                         const float* __restrict__ freq_factors, float ext_factor,
                                         float corr_low, float corr_high, float mscale, int neox) {
    __shared__ float cs[2][ROPE_MAX_HALF];
    const int t = blockIdx.x;
    if (t >= T) return;
    const RopeArgs a{rope_dim, base, freq_scale, freq_factors, ext_factor, corr_low, corr_high, mscale};
    const int p = pos[t];
    rope_table(a, p, cs);
    float* kt = k + (long)t * Hkv * hd;
    rope_rotate(q + (long)t * H * hd, H, kt, Hkv, hd, rope_dim >> 1, neox, cs);
    __syncthreads();  // the rotated k (written by other threads of this block) is read below
    const long s = seq ? seq[t] : 0;
    const int slot = slots ? slots[t] : 0;
    if (slot < 0) return;  // uniform over the block
    const int sh = slots ? __ffs(n_ctx) - 1 : 0;
    const float* vt = v + (long)t * Hkv * hd;
    for (int e0 = 0; e0 < Hkv * hd; e0 += ROPE_B * blockDim.x) {  // loads first, then the stores
        float kv[ROPE_B][2];
#pragma unroll
        for (int u = 0; u < ROPE_B; ++u) {
            const int e = e0 + u * blockDim.x + threadIdx.x;
            if (e < Hkv * hd) { kv[u][0] = kt[e]; kv[u][1] = vt[e]; }
        }
#pragma unroll
        for (int u = 0; u < ROPE_B; ++u) {
            const int e = e0 + u * blockDim.x + threadIdx.x;
            if (e < Hkv * hd) {
                const int h = e / hd, d = e - h * hd;
                const long dst = (slots ? (((long)(slot >> sh) * Hkv + h) * n_ctx + (slot & (n_ctx - 1)))
                                        : ((s * Hkv + h) * n_ctx + p)) * hd + d;
                ck[dst] = f2h(kv[u][0]);
                cv[dst] = f2h(kv[u][1]);
            }
        }
    }
}
