// rope.cu: rotary position embedding, in place on q or k.
//
// rope(x f32 (T, H, hd), pos int32 (T,), T, H, hd, rope_dim, base, freq_scale, freq_factors f32
//      (rope_dim/2,) or null, ext_factor, corr_low, corr_high, mscale, neox)
// Pair i (i < rope_dim/2) of every head rotates by theta_i(pos):
//   extrap = pos * base^(-2i/rope_dim) / freq_factors[i];  interp = freq_scale * extrap
//   mix = ext_factor * (1 - clip((i - corr_low) / max(0.001, corr_high - corr_low), 0, 1))
//   theta = interp * (1 - mix) + extrap * mix       (ext_factor 0: plain / linear scaling)
//   (a, b) -> (a cos - b sin, a sin + b cos) * mscale
// "norm" (neox = 0, llama.cpp's llama layout): pair i = dims (2i, 2i+1); "neox": (i, i + rope_dim/2).
// Dims >= rope_dim are left alone. Angles and their sin/cos are computed in double, like the reference
// (pos * inv_freq loses ~1e-4 rad in fp32 at position 1000), then rounded to fp32.
// Launch geometry: grid (T), block 128; threads stride over H * rope_dim/2 pairs. Positions are read
// from device memory, so a captured CUDA graph stays valid as they change.
// Numpy reference: ops/reference.rope_angles + apply_rope.
#include "common.cuh"

extern "C" __global__ void rope(float* x, const int* __restrict__ pos, int T, int H, int hd, int rope_dim,
                                float base, float freq_scale, const float* __restrict__ freq_factors,
                                float ext_factor, float corr_low, float corr_high, float mscale, int neox) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int half = rope_dim >> 1;
    const double p = (double)pos[t];
    for (int k = threadIdx.x; k < H * half; k += blockDim.x) {
        const int h = k / half, i = k - h * half;
        double inv = pow((double)base, -2.0 * i / (double)rope_dim);
        if (freq_factors) inv /= (double)freq_factors[i];
        const double extrap = p * inv;
        const double interp = (double)freq_scale * extrap;
        double ramp = ((double)i - (double)corr_low) / fmax(0.001, (double)(corr_high - corr_low));
        ramp = 1.0 - fmin(fmax(ramp, 0.0), 1.0);
        const double mix = ramp * (double)ext_factor;
        const double theta = interp * (1.0 - mix) + extrap * mix;
        double sd, cd;
        sincos(theta, &sd, &cd);
        const float c = (float)(cd * (double)mscale), s = (float)(sd * (double)mscale);
        float* xh = x + ((long)t * H + h) * hd;
        const int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
        const float a = xh[ia], b = xh[ib];
        xh[ia] = a * c - b * s;
        xh[ib] = a * s + b * c;
    }
}
